"""The one JSONL reader: one JSON object per non-blank line, errors that name the line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ensemble.errors import DataError

__all__ = ["read_jsonl"]


def read_jsonl(path: str | Path, *, line_numbers: bool = False) -> list[dict[str, Any]]:
    """The objects of a JSONL file, blank lines skipped.

    A missing or unreadable file, a line that is not JSON and a line that is not an object
    are each a :class:`DataError` of the form ``path:line: what is wrong``. With
    ``line_numbers`` every row carries its 1-based line number under ``"_line"``.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read it ({exc})") from exc
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise DataError(f"{path}:{number}: not valid JSON ({exc.args[0]})") from exc
        if not isinstance(row, dict):
            raise DataError(f"{path}:{number}: each line must be a JSON object")
        rows.append({**row, "_line": number} if line_numbers else row)
    return rows
