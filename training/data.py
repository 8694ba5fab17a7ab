"""Training data: read TRL-format JSONL, validate it, tokenize with completion-only labels.

Accepted SFT rows (TRL formats), each optionally with a ``task`` and/or ``source`` string:

* conversational prompt-completion: ``{"prompt": [messages], "completion": [messages]}``
* standard prompt-completion: ``{"prompt": str, "completion": str}``
* conversational language modelling: ``{"messages": [messages]}`` (assistant turns learned)

DPO rows: ``{"prompt", "chosen", "rejected"}`` (conversational or standard), optional
``source`` / ``conflict``.

Only completion (assistant) tokens carry labels: the sequence log-likelihood
``log p(y|x)`` of docs/math.md is the sum over exactly those tokens. With a chat template,
an assistant turn ends at its end-of-turn token (``<|im_end|>`` for ChatML): whatever the
template appends after it (a newline) is not part of the answer vLLM would generate, so it
is not learned either. Every problem is a :class:`~ensemble.errors.DataError` naming the
file, the line and the field, raised before training starts.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ensemble.errors import DataError
from ensemble.jsonl import read_jsonl

log = logging.getLogger("softspec.training")

__all__ = [
    "IGNORE",
    "DPOExample",
    "OverlongError",
    "SFTExample",
    "group_of",
    "load_dpo",
    "load_sft",
    "read_rows",
]

IGNORE = -100  # label of tokens that are not learned (transformers' convention)
PREFERENCE_KEYS = ("source", "task")  # DPO routing groups: who preferred (witty / upbeat)
ROLES = {"system", "user", "assistant"}


@dataclass(frozen=True)
class SFTExample:
    """One tokenized example: labels are ``IGNORE`` except on completion tokens."""

    input_ids: list[int]
    labels: list[int]
    group: str  # the row's task / source, "" when absent (for routing statistics)

    @property
    def n_completion(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)


@dataclass(frozen=True)
class DPOExample:
    """A preference pair, both sides tokenized with completion-only labels."""

    chosen: SFTExample
    rejected: SFTExample
    group: str
    conflict: bool


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSONL file: one JSON object per non-blank line (rows carry their ``_line``);
    clear errors otherwise, and an empty file is one too."""
    rows = read_jsonl(path, line_numbers=True)
    if not rows:
        raise DataError(f"{path}: the file is empty; it needs at least one example")
    return rows


def group_of(row: dict[str, Any], keys: Sequence[str] = ("task", "source")) -> str:
    """The routing-statistics group of a row: its ``task``, else its ``source``, else ''."""
    for key in keys:
        value = row.get(key)
        if isinstance(value, str) and value:
            return value
    return ""


# ----------------------------------------------------------------------- validation


def _where(path: Path, row: dict[str, Any]) -> str:
    return f"{path}:{row['_line']}"


def _messages(value: Any, where: str, name: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field {name!r} must be a non-empty list of messages")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: {name}[{i}] must be {{'role': ..., 'content': str}}")
        if m.get("role") not in ROLES:
            raise DataError(f"{where}: {name}[{i}] has role {m.get('role')!r}; use {sorted(ROLES)}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _text_or_messages(row: dict[str, Any], key: str, where: str) -> str | list[dict[str, str]]:
    if key not in row:
        raise DataError(f"{where}: missing field {key!r}")
    value = row[key]
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: field {key!r} is empty")
        return value
    return _messages(value, where, key)


# ----------------------------------------------------------------------- tokenization


class _Encoder:
    """Turns (prompt, completion) into ids + labels with the tokenizer's chat template."""

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tok = tokenizer
        self.max_length = max_length
        self.eos = tokenizer.eos_token_id
        self.chat = getattr(tokenizer, "chat_template", None) is not None

    def _template(self, messages: list[dict[str, str]], generation_prompt: bool) -> list[int]:
        ids = self.tok.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=generation_prompt, return_dict=False
        )
        return list(ids["input_ids"] if isinstance(ids, dict) else ids)

    def _turn(
        self, before: list[dict[str, str]], turn: dict[str, str], where: str
    ) -> tuple[list[int], list[int]]:
        """(context ids, answer ids) for one assistant turn; the answer ends at its EOS."""
        context = self._template(before, generation_prompt=True)
        full = self._template([*before, turn], generation_prompt=False)
        if full[: len(context)] != context:
            raise DataError(
                f"{where}: the chat template does not extend the prompt; cannot mask it"
            )
        answer = full[len(context) :]
        if self.eos in answer:
            answer = answer[: len(answer) - answer[::-1].index(self.eos)]
        return context, answer

    def encode(
        self, prompt: str | list[dict[str, str]], completion: str | list[dict[str, str]], where: str
    ) -> tuple[list[int], list[int]]:
        if isinstance(prompt, str) != isinstance(completion, str):
            raise DataError(f"{where}: prompt and completion must both be strings or both messages")
        if isinstance(prompt, str):
            assert isinstance(completion, str)
            ids = list(self.tok(prompt, add_special_tokens=True)["input_ids"])
            answer = [*list(self.tok(completion, add_special_tokens=False)["input_ids"]), self.eos]
            return ids + answer, [IGNORE] * len(ids) + answer
        assert isinstance(completion, list)
        if not self.chat:
            raise DataError(f"{where}: conversational data needs a tokenizer with a chat template")
        if any(m["role"] != "assistant" for m in completion):
            raise DataError(f"{where}: completion messages must have role 'assistant'")
        return self.encode_messages([*prompt, *completion], where, learn_from=len(prompt))

    def encode_messages(
        self, messages: list[dict[str, str]], where: str, learn_from: int = 0
    ) -> tuple[list[int], list[int]]:
        """Ids and labels of a conversation; assistant turns at index >= learn_from are learned."""
        ids: list[int] = []
        labels: list[int] = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant" or i < learn_from:
                continue
            context, answer = self._turn(messages[:i], m, where)
            if context[: len(ids)] != ids:
                raise DataError(f"{where}: the chat template re-renders earlier turns; cannot mask")
            labels += [IGNORE] * (len(context) - len(ids)) + answer
            ids = context + answer
        if not ids:
            raise DataError(f"{where}: no assistant turn to learn from")
        return ids, labels

    def truncate(
        self, ids: list[int], labels: list[int], where: str
    ) -> tuple[list[int], list[int]]:
        ids, labels = ids[: self.max_length], labels[: self.max_length]
        if all(t == IGNORE for t in labels):
            raise OverlongError(
                f"{where}: no completion tokens left after truncation to --max-length "
                f"{self.max_length}; raise --max-length, shorten the prompt or pass --drop-overlong"
            )
        return ids, labels


class OverlongError(DataError):
    """An example whose completion starts beyond --max-length tokens."""


def _report_dropped(path: Path, dropped: int, max_length: int) -> None:
    if dropped:
        log.warning(
            "%s: dropped %d examples whose completion starts beyond --max-length %d",
            path,
            dropped,
            max_length,
        )


def load_sft(
    path: str | Path,
    tokenizer: Any,
    max_length: int,
    drop_overlong: bool = False,
    exclude_lines: frozenset[int] = frozenset(),
) -> list[SFTExample]:
    """Read, validate and tokenize an SFT file (see the module docstring for formats)."""
    path = Path(path)
    enc = _Encoder(tokenizer, max_length)
    out: list[SFTExample] = []
    dropped = 0
    for row in read_rows(path):
        if row["_line"] in exclude_lines:  # held out (e.g. for the gate's calibration)
            continue
        where = _where(path, row)
        if "messages" in row:
            ids, labels = enc.encode_messages(_messages(row["messages"], where, "messages"), where)
        elif "prompt" in row or "completion" in row:
            prompt = _text_or_messages(row, "prompt", where)
            completion = _text_or_messages(row, "completion", where)
            ids, labels = enc.encode(prompt, completion, where)
        else:
            raise DataError(
                f"{where}: an SFT row needs 'prompt' and 'completion', or 'messages' "
                f"(found keys {sorted(k for k in row if k != '_line')})"
            )
        try:
            ids, labels = enc.truncate(ids, labels, where)
        except OverlongError:
            if not drop_overlong:
                raise
            dropped += 1
            continue
        out.append(SFTExample(ids, labels, group_of(row)))
    _report_dropped(path, dropped, max_length)
    if not out:
        raise DataError(f"{path}: every example is longer than --max-length {max_length}")
    return out


def load_dpo(
    path: str | Path,
    tokenizer: Any,
    max_length: int,
    drop_overlong: bool = False,
    exclude_lines: frozenset[int] = frozenset(),
) -> list[DPOExample]:
    """Read, validate and tokenize a DPO file of {prompt, chosen, rejected} rows."""
    path = Path(path)
    enc = _Encoder(tokenizer, max_length)
    out: list[DPOExample] = []
    dropped = 0
    for row in read_rows(path):
        if row["_line"] in exclude_lines:  # held out (e.g. for the gate's calibration)
            continue
        where = _where(path, row)
        for key in ("prompt", "chosen", "rejected"):
            if key not in row:
                raise DataError(
                    f"{where}: a DPO row needs 'prompt', 'chosen' and 'rejected'; missing {key!r}"
                )
        prompt = _text_or_messages(row, "prompt", where)
        chosen = _text_or_messages(row, "chosen", where)
        rejected = _text_or_messages(row, "rejected", where)
        if _norm(chosen) == _norm(rejected):
            raise DataError(
                f"{where}: 'chosen' and 'rejected' are identical; the pair teaches nothing"
            )
        sides = []
        try:
            for completion in (chosen, rejected):
                ids, labels = enc.encode(prompt, completion, where)
                ids, labels = enc.truncate(ids, labels, where)
                sides.append(SFTExample(ids, labels, group_of(row, PREFERENCE_KEYS)))
        except OverlongError:
            if not drop_overlong:
                raise
            dropped += 1
            continue
        group = group_of(row, PREFERENCE_KEYS)
        out.append(DPOExample(sides[0], sides[1], group, bool(row.get("conflict", False))))
    _report_dropped(path, dropped, max_length)
    if not out:
        raise DataError(f"{path}: every pair is longer than --max-length {max_length}")
    return out


def _norm(value: str | Sequence[dict[str, str]]) -> str:
    if isinstance(value, str):
        return " ".join(value.split())
    return "\n".join(" ".join(m["content"].split()) for m in value)
