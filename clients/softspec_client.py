"""A typed client for the Soft Specialists gateway, built on the official ``openai`` SDK.

The gateway is OpenAI-compatible and its extras are additive (docs/api.md): the request
extra ``ensemble`` travels in ``extra_body``, and the response extras — ``uncertainty``,
``responsibilities`` and ``candidates`` on the choice, ``gate`` at the top level — are
read back from the SDK objects' ``model_dump()``. This module only turns them into
dataclasses; all HTTP (retries, timeouts, SSE, the error envelope) is the SDK's.

Options: :meth:`SoftSpecClient.chat`, ``complete`` and ``stream_chat`` share one
:class:`RequestOptions` (model, sampling, the ``ensemble`` extra, a per-request
:class:`GateOptions`); its fields may also be given as keyword arguments, which override
the object's, and any other keyword argument goes to the SDK unchanged.

Units and sign: every uncertainty score is "higher = more uncertain". ``epistemic``,
``aleatoric`` and ``total`` are means over the answer's tokens in nats per token, with
total = epistemic + aleatoric (the entropy of the mixture); ``sequence_epistemic`` is in
nats per token too; ``disagreement`` is a fraction in [0, 1]. Candidate ``scores`` and
``mixture_logprob`` are whole-sequence log-probabilities in nats (higher = more likely).

Errors: the SDK's exceptions propagate unchanged (``openai.NotFoundError`` for an unknown
model, ``openai.BadRequestError`` for a bad field, ``openai.APIConnectionError`` when the
gateway is down, ``openai.APIError`` for an error sent mid-stream). This module adds
:class:`Abstained` (opt-in, when the gate abstains) and :class:`ProtocolError` (the server
did not send the Soft Specialists extras: it is not a Soft Specialists gateway).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, Literal, cast

import openai

if TYPE_CHECKING:  # annotations only: recent openai SDKs run on httpx2 and accept both
    import httpx
    import httpx2

__all__ = [
    "Abstained",
    "Candidate",
    "DecodeMode",
    "EnsembleAnswer",
    "Gate",
    "GateAction",
    "GateDecision",
    "GateOptions",
    "ProtocolError",
    "RequestOptions",
    "SelectMode",
    "SoftSpecClient",
    "TokenUncertainty",
    "Uncertainty",
]

DecodeMode = Literal["sequence", "token"]
SelectMode = Literal["mixture", "majority"]
GateDecision = Literal["pass", "flag", "escalate", "abstain"]
GateAction = Literal["flag", "escalate", "abstain"]
_DECISIONS = ("pass", "flag", "escalate", "abstain")
_Messages = list[dict[str, Any]] | str

_DEFAULT_BASE_URL = "http://127.0.0.1:8000"
_API_KEY_ENV = "SOFTSPEC_API_KEY"


class ProtocolError(ValueError):
    """A response lacks a Soft Specialists extra (is ``base_url`` a Soft Specialists gateway?)."""


def _field(obj: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in obj:
        raise ProtocolError(
            f"the {where} has no {key!r} field; point base_url at a Soft Specialists "
            "gateway (a plain OpenAI-compatible server does not send the ensemble extras)"
        )
    return obj[key]


def _opt_float(v: Any) -> float | None:
    return None if v is None else float(v)


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class TokenUncertainty:
    """Uncertainty at one answer token, in nats; higher = more uncertain.

    ``epistemic`` = Σ_k π_k KL(q_k ‖ q̄) (members disagree), ``aleatoric`` = Σ_k π_k H(q_k)
    (each member unsure), ``total`` = H(q̄) = epistemic + aleatoric.
    """

    token: str
    epistemic: float
    aleatoric: float
    total: float

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TokenUncertainty:
        where = "per_token entry"
        return cls(
            token=str(_field(d, "token", where)),
            epistemic=float(_field(d, "epistemic", where)),
            aleatoric=float(_field(d, "aleatoric", where)),
            total=float(_field(d, "total", where)),
        )


@dataclass(frozen=True)
class Uncertainty:
    """Uncertainty of one answer; every score is "higher = more uncertain".

    ``epistemic``, ``aleatoric`` and ``total`` are means over the answer's tokens, in nats
    per token; they are ``None`` only when the gate decided from the prompt alone, before
    any member generated (``Gate.stage == "prompt"``). ``sequence_epistemic`` (nats per token, from cross-scored candidates) and
    ``disagreement`` (fraction of member pairs with different answers, in [0, 1]) are
    ``None`` in token decoding mode. ``novelty`` and ``prompt_novelty`` (nats per token)
    compare the members with the base model on the answer and on the prompt: high when
    what the members learned does not bear on the input. ``prompt_distance`` is the squared
    Mahalanobis distance of the prompt's base-model representation from the training
    prompts' (``None`` when the ensemble has no such reference). ``combined`` (in [0, 1]) is
    1 − the Bonferroni-combined in-distribution p-value of its component scores, ``None``
    when the ensemble has no gate calibration. ``per_token`` is present only when asked for.
    """

    epistemic: float | None
    aleatoric: float | None
    total: float | None
    sequence_epistemic: float | None = None
    disagreement: float | None = None
    novelty: float | None = None
    prompt_novelty: float | None = None
    prompt_distance: float | None = None
    combined: float | None = None
    per_token: list[TokenUncertainty] | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Uncertainty:
        per_token = d.get("per_token")
        return cls(
            epistemic=_opt_float(d.get("epistemic")),
            aleatoric=_opt_float(d.get("aleatoric")),
            total=_opt_float(d.get("total")),
            sequence_epistemic=_opt_float(d.get("sequence_epistemic")),
            disagreement=_opt_float(d.get("disagreement")),
            novelty=_opt_float(d.get("novelty")),
            prompt_novelty=_opt_float(d.get("prompt_novelty")),
            prompt_distance=_opt_float(d.get("prompt_distance")),
            combined=_opt_float(d.get("combined")),
            per_token=None
            if per_token is None
            else [TokenUncertainty.from_dict(p) for p in per_token],
        )


@dataclass(frozen=True)
class Gate:
    """The gate's decision: ``score`` (the ``score_name`` uncertainty, higher = more
    uncertain) passes when it is at most ``threshold``; otherwise the gate's action:
    "flag" (answer returned, marked), "escalate" (the request went to the server's fallback
    model, named in ``routed_to``, whose answer is returned) or "abstain" (answer replaced
    by the abstention text).

    ``stage`` is "answer", or "prompt" when the gate decided from the prompt alone, before
    any member generated. ``escalation`` says what happened when an escalation failed
    (``{"outcome", "reason", "applied"}``; the decision is then the action applied instead).
    """

    decision: GateDecision
    score: float
    score_name: str
    threshold: float
    stage: str = "answer"
    routed_to: str | None = None
    escalation: dict[str, Any] | None = None

    @property
    def passed(self) -> bool:
        return self.decision == "pass"

    @property
    def flagged(self) -> bool:
        return self.decision == "flag"

    @property
    def escalated(self) -> bool:
        return self.decision == "escalate"

    @property
    def abstained(self) -> bool:
        return self.decision == "abstain"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Gate:
        decision = _field(d, "decision", "gate")
        if decision not in _DECISIONS:
            raise ProtocolError(f"unknown gate decision {decision!r}")
        escalation = d.get("escalation")
        routed_to = d.get("routed_to")
        return cls(
            decision=cast(GateDecision, decision),
            score=float(_field(d, "score", "gate")),
            score_name=str(_field(d, "score_name", "gate")),
            threshold=float(_field(d, "threshold", "gate")),
            stage=str(d.get("stage", "answer")),
            routed_to=None if routed_to is None else str(routed_to),
            escalation=None if escalation is None else dict(escalation),
        )


@dataclass(frozen=True)
class Candidate:
    """One member's candidate answer, cross-scored by every member.

    ``scores[k]`` = log p_k(text | prompt) and ``mixture_logprob`` = log Σ_k π_k p_k(text),
    whole-sequence log-probabilities in nats (higher = more likely).
    """

    member: str
    text: str
    scores: dict[str, float]
    mixture_logprob: float

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Candidate:
        scores = _field(d, "scores", "candidate")
        return cls(
            member=str(_field(d, "member", "candidate")),
            text=str(_field(d, "text", "candidate")),
            scores={str(k): float(v) for k, v in scores.items()},
            mixture_logprob=float(_field(d, "mixture_logprob", "candidate")),
        )


@dataclass(frozen=True)
class EnsembleAnswer:
    """One answer of the ensemble with its uncertainty, responsibilities and gate.

    ``responsibilities`` maps each member to its posterior weight for this answer (they sum
    to 1). ``usage`` counts every token the ensemble processed. ``raw`` is the SDK object
    the answer was read from (the finishing chunk when streamed).
    """

    text: str
    finish_reason: str | None
    uncertainty: Uncertainty
    responsibilities: dict[str, float]
    gate: Gate
    candidates: list[Candidate] | None
    usage: dict[str, Any]
    raw: Any

    @property
    def top_member(self) -> tuple[str, float]:
        """The member with the highest responsibility, and that responsibility."""
        name = max(self.responsibilities, key=self.responsibilities.__getitem__)
        return name, self.responsibilities[name]


class Abstained(Exception):
    """The gate abstained (``raise_on_abstain=True``); ``answer`` holds the full response."""

    def __init__(self, answer: EnsembleAnswer) -> None:
        g = answer.gate
        super().__init__(
            f"the gate abstained: {g.score_name} = {g.score:.4g} > threshold {g.threshold:.4g} "
            "(higher = more uncertain); the answer is in .answer"
        )
        self.answer = answer


def _answer(
    text: str, choice: Mapping[str, Any], top: Mapping[str, Any], usage: Any, raw: Any
) -> EnsembleAnswer:
    """Build an answer from a choice's dump (its extras) and the body's dump (``gate``)."""
    candidates = choice.get("candidates")
    return EnsembleAnswer(
        text=text,
        finish_reason=choice.get("finish_reason"),
        uncertainty=Uncertainty.from_dict(_field(choice, "uncertainty", "choice")),
        responsibilities={
            str(k): float(v) for k, v in _field(choice, "responsibilities", "choice").items()
        },
        gate=Gate.from_dict(_field(top, "gate", "response")),
        candidates=None if candidates is None else [Candidate.from_dict(c) for c in candidates],
        usage=usage.model_dump(exclude_none=True) if usage is not None else {},
        raw=raw,
    )


def _checked(answer: EnsembleAnswer, raise_on_abstain: bool) -> EnsembleAnswer:
    if raise_on_abstain and answer.gate.abstained:
        raise Abstained(answer)
    return answer


def _messages(messages: _Messages) -> list[dict[str, Any]]:
    return [{"role": "user", "content": messages}] if isinstance(messages, str) else messages


@dataclass(frozen=True)
class GateOptions:
    """This request's own gate (the ``ensemble.gate`` extra); ``None`` keeps the server's.

    A server whose gate is locked only accepts a tighter one (a lower threshold, a stricter
    action: flag < escalate < abstain, or a gate on another score added to its own) and
    answers anything else with a 400 (``openai.BadRequestError``).
    """

    score: str | None = None
    threshold: float | None = None
    action: GateAction | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class RequestOptions:
    """What one request asks for; :meth:`SoftSpecClient.chat`, ``complete`` and ``stream_chat``
    share it.

    ``model`` defaults to the ensemble (use :meth:`SoftSpecClient.member` for one member
    alone). ``None`` and ``False`` keep the server's defaults and are not sent. ``members``,
    ``select``, ``samples_per_member``, ``return_candidates``, ``per_token``, ``decode``
    and ``gate`` make the request's ``ensemble`` extra (docs/api.md). With
    ``raise_on_abstain`` an abstention raises :class:`Abstained` instead of returning the
    abstention text. ``sdk_kwargs`` go to the SDK's ``create`` call unchanged.
    """

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    members: list[str] | None = None
    select: SelectMode | None = None
    samples_per_member: int | None = None
    return_candidates: bool = False
    per_token: bool = False
    decode: DecodeMode | None = None
    gate: GateOptions | None = None
    raise_on_abstain: bool = False
    sdk_kwargs: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def merged(cls, options: RequestOptions | None, kwargs: Mapping[str, Any]) -> RequestOptions:
        """``options`` (or the defaults) with keyword arguments applied on top.

        A keyword named like a field replaces it; any other keyword is an SDK argument.
        """
        base = options or cls()
        names = {f.name for f in fields(cls)} - {"sdk_kwargs"}
        own = {k: v for k, v in kwargs.items() if k in names}
        sdk = {k: v for k, v in kwargs.items() if k not in names}
        return replace(base, **own, sdk_kwargs={**base.sdk_kwargs, **sdk})

    def ensemble_extra(self) -> dict[str, Any]:
        """The ``ensemble`` request extra, holding only what differs from the server's defaults."""
        opts: dict[str, Any] = {
            "members": self.members,
            "select": self.select,
            "samples_per_member": self.samples_per_member,
            "return_candidates": self.return_candidates or None,
            "per_token": self.per_token or None,
            "decode": self.decode,
            "gate": self.gate.as_dict() if self.gate is not None else None,
        }
        return {k: v for k, v in opts.items() if v is not None}


# --------------------------------------------------------------------------- the client


class SoftSpecClient:
    """The Soft Specialists gateway through the ``openai`` SDK (``self.openai``).

    ``base_url`` is the gateway's root, without ``/v1``. ``api_key`` defaults to the
    ``SOFTSPEC_API_KEY`` environment variable, else ``"none"`` (a gateway without keys).
    ``http_client`` replaces the SDK's HTTP client: an ``httpx.Client`` or ``httpx2.Client``
    (e.g. a ``fastapi.testclient.TestClient``, or one on an ``httpx.MockTransport``).
    """

    def __init__(
        self,
        base_url: str = _DEFAULT_BASE_URL,
        api_key: str | None = None,
        *,
        timeout: float = 300,
        max_retries: int = 2,
        http_client: httpx.Client | httpx2.Client | None = None,
    ) -> None:
        self.openai = openai.OpenAI(
            base_url=base_url.rstrip("/") + "/v1",
            api_key=api_key or os.environ.get(_API_KEY_ENV) or "none",
            timeout=timeout,
            max_retries=max_retries,
            http_client=cast(Any, http_client),  # the SDK accepts httpx and httpx2 clients
        )
        self._ensemble_id: str | None = None

    # ------------------------------------------------------------------ models

    def models(self) -> list[str]:
        """Every served model id: the ensemble, then ``<ensemble-id>:<member>`` per member."""
        return [m.id for m in self.openai.models.list()]

    def ensemble_id(self) -> str:
        """The ensemble's model id (the first id without ':'); fetched once, then cached."""
        if self._ensemble_id is None:
            ids = self.models()
            found = next((i for i in ids if ":" not in i), None)
            if found is None:
                raise ProtocolError(f"no ensemble model among {ids}; is this a softspec gateway?")
            self._ensemble_id = found
        return self._ensemble_id

    def member(self, name: str) -> str:
        """The model id of one member alone (``<ensemble-id>:<name>``): the baseline."""
        return f"{self.ensemble_id()}:{name}"

    # ------------------------------------------------------------------ requests

    def _request(self, opts: RequestOptions) -> dict[str, Any]:
        """SDK keyword arguments: standard fields plus ``ensemble`` merged into extra_body."""
        kwargs = dict(opts.sdk_kwargs)
        kwargs["model"] = opts.model or self.ensemble_id()
        if opts.max_tokens is not None:
            kwargs["max_tokens"] = opts.max_tokens
        if opts.temperature is not None:
            kwargs["temperature"] = opts.temperature
        ensemble = opts.ensemble_extra()
        if ensemble:
            kwargs["extra_body"] = {**(kwargs.get("extra_body") or {}), "ensemble": ensemble}
        return kwargs

    def chat(
        self, messages: _Messages, options: RequestOptions | None = None, **kwargs: Any
    ) -> EnsembleAnswer:
        """``POST /v1/chat/completions``; a ``str`` is sent as one user message.

        Options come as a :class:`RequestOptions`, as keyword arguments named like its fields
        (``client.chat(q, max_tokens=8, per_token=True)``), or both (keywords win); any
        other keyword argument goes to ``chat.completions.create`` unchanged.
        """
        opts = RequestOptions.merged(options, kwargs)
        resp = self.openai.chat.completions.create(
            messages=cast(Any, _messages(messages)), **self._request(opts)
        )
        choice = resp.choices[0]
        answer = _answer(
            choice.message.content or "", choice.model_dump(), resp.model_dump(), resp.usage, resp
        )
        return _checked(answer, opts.raise_on_abstain)

    def complete(
        self, prompt: str, options: RequestOptions | None = None, **kwargs: Any
    ) -> EnsembleAnswer:
        """``POST /v1/completions`` on a raw prompt; options as in :meth:`chat`."""
        opts = RequestOptions.merged(options, kwargs)
        resp = self.openai.completions.create(prompt=prompt, **self._request(opts))
        choice = resp.choices[0]
        answer = _answer(choice.text, choice.model_dump(), resp.model_dump(), resp.usage, resp)
        return _checked(answer, opts.raise_on_abstain)

    def stream_chat(
        self, messages: _Messages, options: RequestOptions | None = None, **kwargs: Any
    ) -> Iterator[str | EnsembleAnswer]:
        """Stream a chat answer: yields text deltas (``str``), then one :class:`EnsembleAnswer`.

        Options as in :meth:`chat`. The answer's extras come from the chunk carrying
        ``finish_reason``; its ``usage`` from the last chunk (``include_usage`` is always
        requested). With ``raise_on_abstain`` an abstention raises :class:`Abstained` after
        the deltas.
        """
        opts = RequestOptions.merged(options, kwargs)
        request = self._request(opts)
        request["stream_options"] = {**(request.get("stream_options") or {}), "include_usage": True}
        stream = self.openai.chat.completions.create(
            messages=cast(Any, _messages(messages)), stream=True, **request
        )
        parts: list[str] = []
        final: Any = None
        usage: Any = None
        with stream:
            for chunk in stream:
                usage = chunk.usage or usage
                if not chunk.choices:
                    continue
                delta = chunk.choices[0].delta.content
                if delta:
                    parts.append(delta)
                    yield delta
                if chunk.choices[0].finish_reason is not None:
                    final = chunk
        if final is None:
            raise ProtocolError("the stream ended without a chunk carrying finish_reason")
        answer = _answer(
            "".join(parts), final.choices[0].model_dump(), final.model_dump(), usage, final
        )
        yield _checked(answer, opts.raise_on_abstain)
