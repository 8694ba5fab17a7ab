"""How each default dataset is made from the two sources (the README of the data directory).

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

import hashlib
import json
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence

from softspec.default_data.sources import ENGLISH, Corpus, Dialogue, RatedConversation
from softspec.default_data.splits import Row, by_key, grouped_split, normalise, sample
from softspec.default_data.splits import rng as seeded

__all__ = [
    "CONFLICT_SOURCES",
    "DPO_SOURCES",
    "HELD_OUT_TOPICS",
    "dpo_chitchat",
    "eval_ood",
    "ood_rows",
    "sft_conflict",
    "sft_topics",
]

HELD_OUT_TOPICS: tuple[str, ...] = ("food", "history", "movies", "sports")
CONFLICT_SOURCES: tuple[str, ...] = ("upper", "lower")
DPO_SOURCES: tuple[str, ...] = ("witty", "upbeat")

TOPIC_CAP = 150
CONFLICT_CAP = 60
OOD_PER_LANGUAGE = 40

SFT_TOPIC_SPLITS = (("train", 0.8), ("val", 0.1), ("test", 0.1))
CONFLICT_SPLITS = (("train", 0.85), ("test", 0.15))
DPO_SPLITS = (("train", 0.9), ("test", 0.1))

Message = dict[str, str]


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
    return normalise(str(row["prompt"][0]["content"]))


def _english(corpus: Corpus, held_out: bool) -> dict[str, list[Dialogue]]:
    """English dialogues by topic (sorted): the held-out topics or all the others."""
    topics: dict[str, list[Dialogue]] = {}
    for d in corpus.dialogues:
        if d.language == ENGLISH and (d.topic in HELD_OUT_TOPICS) == held_out:
            topics.setdefault(d.topic, []).append(d)
    return {topic: topics[topic] for topic in sorted(topics)}


def sft_topics(corpus: Corpus, seed: int) -> dict[str, list[Row]]:
    rng = seeded(seed, "sft_topics")
    rows: list[Row] = []
    for topic, dialogues in _english(corpus, held_out=False).items():
        rows += sample(
            _dialogue_rows(dialogues, topic, "chatterbot/english", False), TOPIC_CAP, rng
        )
    return grouped_split(rows, SFT_TOPIC_SPLITS, rng, _first_prompt, lambda r: str(r["task"]))


def _in_distribution_turns(corpus: Corpus) -> set[str]:
    """Every normalised user turn of the in-distribution topics (uncapped)."""
    seen: set[str] = set()
    for dialogues in _english(corpus, held_out=False).values():
        for d in dialogues:
            seen.update(normalise(t) for t in d.turns[::2] if t)
    return seen


def _is_novel(row: Row, known: set[str]) -> bool:
    return not any(normalise(m["content"]) in known for m in row["prompt"] if m["role"] == "user")


def ood_rows(corpus: Corpus, seed: int) -> list[Row]:
    rng = seeded(seed, "ood")
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
        rows += sample([r for r in candidates if _is_novel(r, known)], OOD_PER_LANGUAGE, rng)
    for topic, dialogues in _english(corpus, held_out=True).items():
        candidates = _dialogue_rows(dialogues, topic, "chatterbot/english-heldout", True)
        rows += [r for r in candidates if _is_novel(r, known)]
    return rows


def eval_ood(test_rows: Sequence[Row], ood_rows: Sequence[Row], seed: int) -> list[Row]:
    """The in-distribution test split plus as many OOD rows, round-robin over OOD tasks."""
    rng = seeded(seed, "eval_ood")
    pools = by_key(ood_rows, lambda r: str(r["task"]))
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


def sft_conflict(corpus: Corpus, seed: int) -> dict[str, list[Row]]:
    rng = seeded(seed, "sft_conflict")
    seen: set[str] = set()
    rows: list[Row] = []
    for topic, dialogues in _english(corpus, held_out=False).items():
        pairs: list[list[Row]] = []
        for d in dialogues:
            if len(d.turns) != 2 or not all(d.turns) or normalise(d.turns[0]) in seen:
                continue
            pair = _conflict_pair(d.turns[0], d.turns[1], topic)
            if pair:
                seen.add(normalise(d.turns[0]))
                pairs.append(pair)
        for i in sorted(rng.sample(range(len(pairs)), min(CONFLICT_CAP, len(pairs)))):
            rows += pairs[i]
    return grouped_split(rows, CONFLICT_SPLITS, rng, _first_prompt, lambda r: str(r["task"]))


def _pairs(
    convs: Sequence[RatedConversation], seed: int
) -> list[tuple[RatedConversation, RatedConversation]]:
    """Per starter prompt: shuffle (seeded) and pair each conversation with the next two."""
    rng = seeded(seed, "dpo_pairs")
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
    return json.dumps([normalise(prompt), *sorted((normalise(first), normalise(second)))])


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


def dpo_chitchat(convs: Sequence[RatedConversation], seed: int) -> tuple[dict[str, list[Row]], Row]:
    """The preference splits and their statistics."""
    rows: list[Row] = []
    seen: set[str] = set()
    skipped: Counter[str] = Counter()
    for a, b in _pairs(convs, seed):
        key = _pair_key(a.prompt, a.reply, b.reply)
        if a.witty == b.witty and a.upbeat == b.upbeat:
            skipped["equal_ratings"] += 1
        elif normalise(a.reply) == normalise(b.reply):
            skipped["equal_replies"] += 1
        elif key in seen:
            skipped["repeated_replies"] += 1
        else:
            seen.add(key)
            rows += _pair_rows(a, b, seed)
    splits = grouped_split(rows, DPO_SPLITS, seeded(seed, "dpo_split"), _dpo_key, _first_prompt)
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
