"""The prompt_distance reference's prompt selection and the CLI's bad-input errors (the fit
itself runs on the real model in tests/integration/test_prompt_distance_e2e.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ensemble.errors import ConfigError
from training.reference import reference_prompts, run_reference


def _row(line: int, text: str) -> dict:  # type: ignore[type-arg]
    return {"_line": line, "prompt": [{"role": "user", "content": text}], "completion": []}


def test_distinct_prompts_without_the_held_out_lines() -> None:
    rows = [_row(1, "a"), _row(2, "b"), _row(3, "a"), _row(4, "c"), _row(5, "d")]
    got = reference_prompts(rows, limit=10, seed=0, exclude_lines=frozenset({4}))
    assert sorted(p[0]["content"] for p in got) == ["a", "b", "d"]


def test_a_limit_takes_a_seeded_sample() -> None:
    rows = [_row(i, f"p{i}") for i in range(50)]
    a = reference_prompts(rows, limit=7, seed=1)
    assert len(a) == 7 and len({p[0]["content"] for p in a}) == 7
    assert a == reference_prompts(rows, limit=7, seed=1)
    assert a != reference_prompts(rows, limit=7, seed=2)


@pytest.mark.parametrize(("args", "match"), [
    (["--shrinkage", "0"], "--shrinkage 0.0: must be in"),
    (["--max-prompts", "3"], "--max-prompts 3: give at least 10"),
    (["--data", "missing.jsonl"], "--data missing.jsonl: no such file"),
])  # fmt: skip
def test_bad_input_is_one_clear_error(args: list[str], match: str, tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text("")
    base = ["--ensemble", str(tmp_path), "--data", str(data)]
    with pytest.raises(ConfigError, match=match):
        run_reference([*base, *args])
