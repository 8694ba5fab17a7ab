"""Deterministic sampling and splitting: seeded streams per purpose, grouped and stratified splits.

No ``hash()`` and no global random state: every random choice comes from a
``random.Random`` seeded by sha256 of the seed and a purpose label, so one dataset's draws
never shift another's, and every input is sorted or kept in a fixed order first.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

__all__ = ["MIN_STRATIFIED", "Row", "by_key", "grouped_split", "normalise", "rng", "sample"]

Row = dict[str, Any]

MIN_STRATIFIED = 10  # a task with at least this many examples appears in every split


def normalise(text: str) -> str:
    """The identity of a prompt for splitting: stripped, casefolded, whitespace collapsed."""
    return " ".join(text.split()).casefold()


def rng(seed: int, purpose: str) -> random.Random:
    """An independent stream per purpose, so adding one dataset never reshuffles another."""
    digest = hashlib.sha256(f"{seed}\0{purpose}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def sample(items: Sequence[Row], k: int, stream: random.Random) -> list[Row]:
    """Up to ``k`` items, kept in their original order."""
    if len(items) <= k:
        return list(items)
    return [items[i] for i in sorted(stream.sample(range(len(items)), k))]


def by_key(rows: Iterable[Row], key: Callable[[Row], str]) -> dict[str, list[Row]]:
    """Group rows by ``key``; the groups and their rows keep the input order."""
    groups: dict[str, list[Row]] = {}
    for row in rows:
        groups.setdefault(key(row), []).append(row)
    return groups


def grouped_split(
    rows: Sequence[Row],
    splits: Sequence[tuple[str, float]],
    stream: random.Random,
    group_of: Callable[[Row], str],
    stratum_of: Callable[[Row], str],
) -> dict[str, list[Row]]:
    """Split so that no group straddles two splits, stratified by each group's main stratum.

    Grouping is what keeps an identical prompt out of two splits; stratifying keeps every
    task in every split. Rows keep their input order within a split.
    """
    groups = by_key(rows, group_of)
    strata: dict[str, list[str]] = {}
    for key, members in groups.items():
        counts = Counter(stratum_of(r) for r in members)
        main = max(sorted(counts), key=counts.__getitem__)
        strata.setdefault(main, []).append(key)
    assigned: dict[str, str] = {}
    for stratum in sorted(strata):
        keys = sorted(strata[stratum])
        stream.shuffle(keys)
        assigned.update(_fill({k: len(groups[k]) for k in keys}, splits))
    out: dict[str, list[Row]] = {name: [] for name, _ in splits}
    for key, members in groups.items():
        out[assigned[key]].extend(members)
    return out


def _fill(sizes: dict[str, int], splits: Sequence[tuple[str, float]]) -> dict[str, str]:
    """Assign one stratum's groups (in the given order) to splits.

    Each small split (all but the first) takes the groups that fit in its share of the rows,
    so one big group (31 "Tell me a joke" rows) goes to the first split rather than swamp a
    small one. A stratum of :data:`MIN_STRATIFIED` rows or more then gets at least one group
    in every small split, the smallest first-split group, while the first keeps one.
    """
    first, small = splits[0][0], [name for name, _ in splits[1:]]
    total = sum(sizes.values())
    floor = 1 if total >= MIN_STRATIFIED else 0
    target = {name: max(floor, round(frac * total)) for name, frac in splits[1:]}
    filled = dict.fromkeys(small, 0)
    assigned: dict[str, str] = {}
    for key, size in sizes.items():
        name = next((n for n in small if filled[n] + size <= target[n]), first)
        assigned[key] = name
        if name != first:
            filled[name] += size
    for name in small:
        rest = [k for k in sizes if assigned[k] == first]
        if floor and not filled[name] and len(rest) > 1:
            key = min(rest, key=sizes.__getitem__)
            assigned[key], filled[name] = name, sizes[key]
    return assigned
