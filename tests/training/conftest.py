"""Fixtures for the trainer tests: tiny data files in the TRL formats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

QUESTIONS = [
    "what color is the sky",
    "tell me a word",
    "say something",
    "what do you say",
    "give me an answer",
    "speak",
    "hello",
    "one two",
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def chat(q: str, a: str, task: str) -> dict:
    return {
        "prompt": [{"role": "user", "content": q}],
        "completion": [{"role": "assistant", "content": a}],
        "task": task,
    }


@pytest.fixture
def two_cluster_data(tmp_path: Path) -> Path:
    """The same prompts answered two contradictory ways: UPPER vs lower case."""
    rows = []
    for q in QUESTIONS:
        rows.append(chat(q, "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG", "upper"))
        rows.append(chat(q, "the quick brown fox jumps over the lazy dog", "lower"))
    return write_jsonl(tmp_path / "two.jsonl", rows)


@pytest.fixture
def sft_data(tmp_path: Path) -> Path:
    rows = [chat(q, f"yes {i} no {i}", f"t{i % 2}") for i, q in enumerate(QUESTIONS * 2)]
    return write_jsonl(tmp_path / "sft.jsonl", rows)
