"""``softspec data build``: every dataset into one directory, atomically, rebuilt only when stale.

The directory holds the JSONL files, ``data.json`` (the summary: format version, seed,
source versions, row counts, skip counts) and ``README.md``. A complete directory built
with the same seed and format is returned as is; one that holds anything else is replaced
only with ``force``. The new directory is built in a temporary sibling and renamed into
place, so a crash never leaves half of it behind.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ensemble.atomic import atomic_dir, atomic_write_json, atomic_write_text
from ensemble.errors import ConfigError
from softspec.default_data import datasets
from softspec.default_data.report import readme
from softspec.default_data.sources import (
    CHATTERBOT,
    CHITCHAT,
    load_chatterbot,
    load_chitchat,
    package_dir,
    package_version,
)
from softspec.default_data.splits import Row
from softspec.paths import default_data_dir

__all__ = ["FORMAT_VERSION", "build_datasets"]

FORMAT_VERSION = 1


def _datasets(seed: int) -> tuple[dict[str, list[Row]], Row]:
    """Every JSONL file's rows, by file name, and the summary that describes them."""
    corpus = load_chatterbot(package_dir(CHATTERBOT))
    convs, chitchat_skipped = load_chitchat(package_dir(CHITCHAT))
    topics = datasets.sft_topics(corpus, seed)
    ood = datasets.ood_rows(corpus, seed)
    conflict = datasets.sft_conflict(corpus, seed)
    dpo, dpo_stats = datasets.dpo_chitchat(convs, seed)
    files = {f"sft_topics_{name}.jsonl": rows for name, rows in topics.items()}
    files["ood.jsonl"] = ood
    files["eval_ood.jsonl"] = datasets.eval_ood(topics["test"], ood, seed)
    files.update({f"sft_conflict_{name}.jsonl": rows for name, rows in conflict.items()})
    files.update({f"dpo_chitchat_{name}.jsonl": rows for name, rows in dpo.items()})
    summary: Row = {
        "format_version": FORMAT_VERSION,
        "seed": seed,
        "sources": {dist: package_version(dist) for dist in (CHATTERBOT[1], CHITCHAT[1])},
        "files": {name: len(rows) for name, rows in files.items()},
        "sft_topics_tasks": _task_counts(topics),
        "ood_tasks": dict(sorted(Counter(str(r["task"]) for r in ood).items())),
        "dpo": dpo_stats,
        "skipped": {
            "chatterbot_files": list(corpus.skipped_files),
            "chatterbot_dialogues": corpus.skipped_dialogues,
            "chitchat_conversations": dict(chitchat_skipped),
        },
    }
    return files, summary


def _task_counts(splits: dict[str, list[Row]]) -> dict[str, dict[str, int]]:
    tasks = sorted({str(r["task"]) for rows in splits.values() for r in rows})
    return {
        task: {name: sum(r["task"] == task for r in rows) for name, rows in splits.items()}
        for task in tasks
    }


def _write_jsonl(path: Path, rows: Iterable[Row]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _existing_summary(out: Path) -> Row | None:
    try:
        summary = json.loads((out / "data.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def _is_current(summary: Row, out: Path, seed: int) -> bool:
    files = summary.get("files")
    return (
        summary.get("format_version") == FORMAT_VERSION
        and summary.get("seed") == seed
        and isinstance(files, dict)
        and all((out / name).is_file() for name in files)
    )


def build_datasets(
    out: Path | None = None, seed: int = 0, *, force: bool = False
) -> dict[str, Any]:
    """Build every default dataset into ``out`` and return the summary (also ``data.json``).

    Idempotent: a complete directory built with the same seed and format is returned as is.
    A directory that holds something else is only replaced with ``force=True``, and always
    atomically: the new directory is built aside and renamed into place when complete.
    """
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"the data seed must be an integer, not {seed!r}")
    out = Path(out) if out is not None else default_data_dir()
    existing = _existing_summary(out)
    if not force and existing is not None and _is_current(existing, out, seed):
        return existing
    occupied = out.exists() and (not out.is_dir() or any(out.iterdir()))
    if occupied and not force:
        what = (
            f"seed {existing.get('seed')!r} (format {existing.get('format_version')!r})"
            if existing
            else "other files"
        )
        raise ConfigError(
            f"{out} already exists with {what}; rebuild it with force (`softspec data build "
            f"--force`) or choose another directory"
        )
    files, summary = _datasets(seed)
    with atomic_dir(out, replace=True) as tmp:
        for name, rows in files.items():
            _write_jsonl(tmp / name, rows)
        atomic_write_json(tmp / "data.json", summary)
        atomic_write_text(tmp / "README.md", readme(summary))
    return summary
