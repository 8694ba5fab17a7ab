"""OpenAI-compatible request and response models, plus the additive ``ensemble`` extras.

Fields follow OpenAI's order; everything non-standard is grouped under one comment per
model. Unknown request fields are rejected (OpenAI does the same), so a typo is a 400
with the field's name rather than a silently ignored option.
"""

from __future__ import annotations

import math
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, field_validator, model_validator

from ensemble.scores import GATE_SCORES
from server.engine import SamplingParams

__all__ = [
    "COMPLETION_MAX_TOKENS",
    "DEFAULT_MAX_TOKENS",
    "ChatCompletionRequest",
    "ChatMessage",
    "CompletionRequest",
    "DecodeMode",
    "EnsembleOptions",
    "GateOptions",
    "SelectMode",
    "StreamOptions",
]

MAX_TOP_LOGPROBS = 20
# max_tokens when the request does not say: OpenAI's 16 for /v1/completions; for chat, up
# to 256, shrunk to what the context leaves after the prompt (EnsembleService.prompt_ids).
COMPLETION_MAX_TOKENS = 16
DEFAULT_MAX_TOKENS = 256
GREEDY_BELOW = 1e-5  # vLLM's sampling epsilon: lower temperatures sample greedily

# Where the OpenAI API is strict, so are we: JSON ``true`` is not the number 1, ``1`` is
# not ``true`` and ``2.0`` is not a token count. Floats still take JSON integers.
StrictInt = Annotated[int, Strict()]
StrictFloat = Annotated[float, Strict()]
StrictBool = Annotated[bool, Strict()]
TokenId = Annotated[int, Strict(), Field(ge=0)]


class DecodeMode(StrEnum):
    """How the members produce an answer (docs/api.md)."""

    SEQUENCE = "sequence"  # each member generates; candidates cross-scored; one is selected
    TOKEN = "token"  # lock-step mixture decoding, one token at a time (both engines)


class SelectMode(StrEnum):
    """How sequence mode picks the answer among the candidates."""

    MIXTURE = "mixture"  # highest per-token mixture log-likelihood
    MAJORITY = "majority"  # most frequent normalised answer (ties: mixture score)


# Not sent to a fallback: ours (stream is set per call), or log-prob options an escalated
# answer does not return, or only accepted at their neutral values.
_NOT_FORWARDED = {
    "stream", "n", "logprobs", "top_logprobs", "echo", "presence_penalty", "frequency_penalty",
}  # fmt: skip


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Request):
    include_usage: StrictBool = False


class GateOptions(_Request):
    """``ensemble.gate``: this request's gate (docs/routing.md). Unset fields take the
    server's values; a locked server gate (SOFTSPEC_GATE_ALLOW_LOOSEN=false) can only be
    tightened: a lower threshold, a stricter action (flag < escalate < abstain), or a gate
    on another score added to the server's."""

    score: str | None = None
    threshold: StrictFloat | None = None
    action: Literal["flag", "escalate", "abstain"] | None = None

    @field_validator("score")
    @classmethod
    def _known_score(cls, v: str | None) -> str | None:
        if v is not None and v not in GATE_SCORES:
            raise ValueError(f"must be one of {', '.join(GATE_SCORES)}")
        return v

    @field_validator("threshold")
    @classmethod
    def _finite(cls, v: float | None) -> float | None:
        if v is not None and not math.isfinite(v):
            raise ValueError("must be a finite number")
        return v


class EnsembleOptions(_Request):
    """The ``ensemble`` request extra (all optional)."""

    decode: DecodeMode | None = None  # None: token mode wherever it works (resolve_decode)
    select: SelectMode = SelectMode.MIXTURE
    samples_per_member: StrictInt = Field(default=1, ge=1, le=16)
    members: list[str] | None = Field(default=None, min_length=1)
    return_candidates: StrictBool = False
    per_token: StrictBool = False
    gate: GateOptions | None = None


class ChatMessage(_Request):
    role: Literal["system", "user", "assistant", "developer"]
    content: str
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, v: Any) -> Any:
        """Accept OpenAI's list-of-parts content when every part is text."""
        if isinstance(v, list):
            texts = [
                str(p.get("text", "")) for p in v if isinstance(p, dict) and p.get("type") == "text"
            ]
            if len(texts) != len(v):
                raise ValueError("only text content parts are supported")
            return "".join(texts)
        return v


class _Sampling(_Request):
    model: str
    temperature: StrictFloat | None = Field(default=None, ge=0.0, le=2.0)
    top_p: StrictFloat | None = Field(default=None, gt=0.0, le=1.0)
    n: StrictInt = Field(default=1, ge=1)
    stop: str | list[str] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    seed: StrictInt | None = None
    user: str | None = None
    presence_penalty: StrictFloat | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: StrictFloat | None = Field(default=None, ge=-2.0, le=2.0)
    # --- Soft Specialists extras -------------------------------------------------
    ensemble: EnsembleOptions = Field(default_factory=EnsembleOptions)

    @field_validator("n")
    @classmethod
    def _single_choice(cls, v: int) -> int:
        if v != 1:
            raise ValueError(
                "only n=1 is supported; use ensemble.samples_per_member for more candidates"
            )
        return v

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalties(cls, v: float | None) -> float | None:
        if v:  # accepted for SDK compatibility only at their neutral value
            raise ValueError(
                "penalties are not supported by the ensemble gateway; omit them or send 0"
            )
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        return v

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    # --- what each endpoint defines ----------------------------------------------
    @property
    def token_limit(self) -> int | None:
        """max_tokens as the client gave it (``None``: fit to the context)."""
        raise NotImplementedError

    @property
    def logprobs_wanted(self) -> bool:
        raise NotImplementedError

    @property
    def logprobs_top(self) -> int:
        """Top log-probs per position the client asked for (0: none)."""
        raise NotImplementedError

    def fallback_body(self) -> dict[str, Any]:
        """The request as the gate's fallback gets it (server/fallback.py): the OpenAI
        fields the client sent, without the ensemble extra and the log-prob options (an
        escalated answer carries none); the fallback adds its model and ``stream``."""
        body = self.model_dump(
            mode="json", exclude_none=True, exclude=_NOT_FORWARDED | {"model", "ensemble"}
        )
        for m in body.get("messages", []):
            if m["role"] == "developer":  # as the ensemble saw it (routes.chat_completions)
                m["role"] = "system"
        return body

    def to_sampling_params(self, top_n: int) -> SamplingParams:
        """The engine's sampling parameters (``top_n``: log-probs the engine returns)."""
        temperature = 1.0 if self.temperature is None else self.temperature
        if temperature < GREEDY_BELOW:  # as vLLM does: a vanishing temperature is greedy
            temperature = 0.0
        return SamplingParams(
            max_tokens=self.token_limit or DEFAULT_MAX_TOKENS,
            temperature=temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            stop=tuple(self.stop_list),
            seed=self.seed,
            n=self.ensemble.samples_per_member,
            top_n=top_n,
        )


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs=true")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def logprobs_wanted(self) -> bool:
        return self.logprobs

    @property
    def logprobs_top(self) -> int:
        return self.top_logprobs or 0


class CompletionRequest(_Sampling):
    """``POST /v1/completions`` (one prompt: a string or a list of token ids)."""

    prompt: str | list[TokenId]
    max_tokens: StrictInt = Field(default=COMPLETION_MAX_TOKENS, ge=1)
    logprobs: StrictInt | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: StrictBool = False

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[int]) -> str | list[int]:
        if isinstance(v, str) and not v:
            raise ValueError("prompt must not be empty")
        if isinstance(v, list) and not v:
            raise ValueError("prompt must hold at least one token id")
        return v

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v: bool) -> bool:
        if v:
            raise ValueError("echo is not supported")
        return v

    @property
    def token_limit(self) -> int:
        return self.max_tokens

    @property
    def logprobs_wanted(self) -> bool:
        return self.logprobs is not None

    @property
    def logprobs_top(self) -> int:
        return self.logprobs or 0
