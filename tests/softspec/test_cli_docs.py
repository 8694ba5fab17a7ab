"""docs/cli.md lists every option of every ``softspec`` command, in that command's section.

The option tables in docs/cli.md are generated from the parsers; this test fails when an
option is added, renamed or removed without updating them.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

import pytest

from server import launch
from server.settings import Settings
from softspec import cli, demo, diagnose, evaluate
from training import reference
from training.config import DPOConfig, SFTConfig

DOC = Path(__file__).resolve().parents[2] / "docs" / "cli.md"


def sections() -> dict[str, str]:
    """Each ``## `softspec ...``` section's text, keyed by its heading."""
    text = DOC.read_text(encoding="utf-8")
    parts = re.split(r"^## ", text, flags=re.MULTILINE)[1:]
    return {p.splitlines()[0]: p for p in parts}


def section(command: str) -> str:
    found = [text for head, text in sections().items() if f"`softspec {command}" in head]
    assert len(found) == 1, f"docs/cli.md has no single section for softspec {command}"
    return found[0]


def documented(text: str) -> set[str]:
    """The options in a section's table rows: the first cell's ``--name``."""
    return set(re.findall(r"^\| `(--[a-z][a-z0-9-]*)", text, flags=re.MULTILINE))


def flags(parser: argparse.ArgumentParser) -> set[str]:
    return {
        max(a.option_strings, key=len)
        for a in parser._actions
        if a.option_strings and not isinstance(a, argparse._HelpAction)
    }


def subparser(*path: str) -> argparse.ArgumentParser:
    parser = cli.build_parser()
    for name in path:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


PARSERS = {
    "model export-default": lambda: subparser("model", "export-default"),
    "data build": lambda: subparser("data", "build"),
    "serve": launch.build_parser,
    "eval": evaluate._parser,
    "demo": demo._parser,
    "diagnose": diagnose._parser,
    "reference": reference._parser,
}


@pytest.mark.parametrize("command", sorted(PARSERS))
def test_every_option_is_documented_in_its_section(command: str) -> None:
    assert documented(section(command)) == flags(PARSERS[command]())


def config_flags(cls: type) -> set[str]:
    return {"--" + f.name.replace("_", "-") for f in dataclasses.fields(cls) if f.init}


def test_every_training_option_is_documented() -> None:
    text = section("train sft")
    assert documented(text) == config_flags(SFTConfig) | config_flags(DPOConfig)
    dpo_only = text.partition("DPO only:")[2]
    assert documented(dpo_only) == config_flags(DPOConfig) - config_flags(SFTConfig)


def test_every_serve_setting_without_a_flag_is_documented_as_a_variable() -> None:
    text = section("serve")
    with_flags = {f.removeprefix("--").replace("-", "_") for f in flags(launch.build_parser())}
    env_only = set(Settings.model_fields) - with_flags
    assert env_only, "expected settings that have no flag"
    listed = set(re.findall(r"`SOFTSPEC_([A-Z0-9_]+)`", text))
    assert {name.upper() for name in env_only} <= listed
