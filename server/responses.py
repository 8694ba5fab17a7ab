"""OpenAI-shaped response bodies and SSE chunks built from a service :class:`Outcome`.

The extras are additive: each choice carries ``uncertainty``, ``responsibilities`` and
(when asked) ``candidates``; the body carries ``gate``. When the gate abstains the content
is the abstention text and ``finish_reason`` is ``"content_filter"``.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

from server.service import CandidateTable, Job, Outcome

__all__ = [
    "candidate_entries",
    "chat_body",
    "chat_chunks",
    "completion_body",
    "completion_chunks",
    "gate_headers",
    "per_token_entries",
    "sse",
]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def gate_headers(out: Outcome) -> dict[str, str]:
    headers = {"x-gate-decision": out.gate.decision}
    if out.uncertainty.get("epistemic") is not None:  # None: decided before generation
        headers["x-uncertainty-epistemic"] = f"{float(out.uncertainty['epistemic']):.6g}"
    return headers


def _own_answer(out: Outcome) -> bool:
    """The ensemble's answer is what the client gets (its log-probs describe it)."""
    return out.gate.decision not in ("abstain", "escalate")


def _content(out: Outcome, abstain_text: str) -> tuple[str, str]:
    if out.gate.decision == "abstain":
        return abstain_text, "content_filter"
    return out.text, out.finish_reason


def per_token_entries(out: Outcome) -> list[dict[str, Any]]:
    """``uncertainty.per_token``: each answer token's text and its token-level scores."""
    return [
        {"token": out.token_texts.get(t, ""), **{k: float(v) for k, v in step.items()}}
        for t, step in zip(out.token_ids, out.per_token, strict=True)
    ]


def candidate_entries(table: CandidateTable) -> list[dict[str, Any]]:
    """``candidates``: every candidate, who generated it, its log-likelihood under each
    member and under the mixture (whole sequence, nats)."""
    return [
        {
            "member": g.member,
            "text": g.text,
            "scores": {m: float(table.L[k, i]) for k, m in enumerate(table.members)},
            "mixture_logprob": float(table.mixture[i]),
        }
        for i, g in enumerate(table.generations)
    ]


def _extras(job: Job, out: Outcome) -> dict[str, Any]:
    uncertainty = dict(out.uncertainty)
    if job.options.per_token:
        uncertainty["per_token"] = per_token_entries(out)
    extra: dict[str, Any] = {"uncertainty": uncertainty, "responsibilities": out.responsibilities}
    extra["decode"] = {"mode": out.decode, "fallback": out.decode_fallback}
    if out.candidates is not None:
        extra["candidates"] = candidate_entries(out.candidates)
    return extra


def _chat_logprobs(out: Outcome) -> dict[str, Any]:
    def entry(tok: int, lp: float) -> dict[str, Any]:
        text = out.token_texts.get(tok, "")
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    content = []
    for tok, lp, top in zip(out.token_ids, out.logprobs, out.top_logprobs, strict=False):
        content.append({**entry(tok, lp), "top_logprobs": [entry(t, v) for t, v in top.items()]})
    return {"content": content}


def _completion_logprobs(out: Outcome) -> dict[str, Any]:
    tokens = [out.token_texts.get(t, "") for t in out.token_ids]
    offsets, pos = [], 0
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": out.logprobs,
        "top_logprobs": [
            {out.token_texts.get(t, str(t)): v for t, v in top.items()} for top in out.top_logprobs
        ],
        "text_offset": offsets,
    }


def chat_body(job: Job, out: Outcome, abstain_text: str) -> dict[str, Any]:
    text, finish = _content(out, abstain_text)
    logprobs = _chat_logprobs(out) if job.want_logprobs and _own_answer(out) else None
    return {
        "id": new_id("chatcmpl"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": job.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": logprobs,
                "finish_reason": finish,
                **_extras(job, out),
            }
        ],
        "usage": out.usage.as_dict(),
        "gate": out.gate.as_dict(),
    }


def completion_body(job: Job, out: Outcome, abstain_text: str) -> dict[str, Any]:
    text, finish = _content(out, abstain_text)
    logprobs = _completion_logprobs(out) if job.want_logprobs and _own_answer(out) else None
    return {
        "id": new_id("cmpl"),
        "object": "text_completion",
        "created": int(time.time()),
        "model": job.model,
        "choices": [
            {
                "index": 0,
                "text": text,
                "logprobs": logprobs,
                "finish_reason": finish,
                **_extras(job, out),
            }
        ],
        "usage": out.usage.as_dict(),
        "gate": out.gate.as_dict(),
    }


def sse(obj: dict[str, Any] | str) -> str:
    data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
    return f"data: {data}\n\n"


class _Chunks:
    """Shared framing of streamed chunks for one response."""

    def __init__(self, job: Job, kind: str) -> None:
        self.job = job
        self.kind = kind
        self.id = new_id("chatcmpl" if kind == "chat" else "cmpl")
        self.created = int(time.time())

    def chunk(self, choice: dict[str, Any], **top: Any) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.job.model,
            "choices": [choice],
            **top,
        }

    def delta(self, text: str, role: bool = False) -> dict[str, Any]:
        if self.kind == "chat":
            d: dict[str, Any] = {"content": text}
            if role:
                d["role"] = "assistant"
            return self.chunk({"index": 0, "delta": d, "logprobs": None, "finish_reason": None})
        return self.chunk({"index": 0, "text": text, "logprobs": None, "finish_reason": None})

    def final(self, out: Outcome, finish: str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "index": 0,
            "finish_reason": finish,
            "logprobs": None,
            **_extras(self.job, out),
        }
        if self.kind == "chat":
            body["delta"] = {}
        else:
            body["text"] = ""
        return self.chunk(body, gate=out.gate.as_dict())

    def usage(self, out: Outcome) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.job.model,
            "choices": [],
            "usage": out.usage.as_dict(),
        }


def _pieces(out: Outcome) -> list[str]:
    """The answer cut at token boundaries (falls back to one piece without token texts)."""
    texts = [out.token_texts.get(t, "\0") for t in out.token_ids]
    if texts and "".join(texts) == out.text:
        return [t for t in texts if t]
    return [out.text] if out.text else []


def _stream(
    kind: str, job: Job, out: Outcome, abstain_text: str, include_usage: bool
) -> Iterator[str]:
    frames = _Chunks(job, kind)
    text, finish = _content(out, abstain_text)
    pieces = [text] if finish == "content_filter" else _pieces(out)
    yield sse(frames.delta(pieces[0] if pieces else "", role=True))
    for piece in pieces[1:]:
        yield sse(frames.delta(piece))
    yield sse(frames.final(out, finish))
    if include_usage:
        yield sse(frames.usage(out))
    yield sse("[DONE]")


def chat_chunks(job: Job, out: Outcome, abstain_text: str, include_usage: bool) -> Iterator[str]:
    """SSE frames of a finished sequence-mode answer (``data: [DONE]`` last)."""
    return _stream("chat", job, out, abstain_text, include_usage)


def completion_chunks(
    job: Job, out: Outcome, abstain_text: str, include_usage: bool
) -> Iterator[str]:
    return _stream("completion", job, out, abstain_text, include_usage)


def token_frames(kind: str, job: Job) -> _Chunks:
    """Framing for token-mode streams, whose tokens arrive before the outcome."""
    return _Chunks(job, kind)
