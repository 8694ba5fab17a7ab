"""Gateway settings: flags and ``SOFTSPEC_*`` environment variables, validated at start-up."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ensemble.scores import GATE_SCORES
from server.gate import GateAction
from server.vllm_args import VLLMShape

__all__ = ["MIN_DEADLINE", "Settings"]

MIN_DEADLINE = 1.0  # seconds: no deadline below this fits even a one-token generation


class Settings(VLLMShape, BaseSettings):
    """Everything ``softspec serve`` can be told; env vars are ``SOFTSPEC_<NAME>``.

    The settings that shape vLLM (``base_model``, ``top_logprobs``, ``max_model_len``,
    ``vllm_dtype``, ``vllm_args``) come from :class:`server.vllm_args.VLLMShape`.
    Lists are comma- or space-separated strings (no JSON decoding).
    """

    model_config = SettingsConfigDict(env_prefix="SOFTSPEC_", extra="ignore", enable_decoding=False)

    ensemble: Path = Field(description="ensemble directory (ensemble.json + adapters/)")
    engine: Literal["vllm", "local"] = "vllm"
    vllm_url: str | None = Field(default=None, description="external vLLM server; else start one")
    embed_url: str | None = Field(
        default=None,
        description="external vLLM pooling server of the base model (prompt_distance); without "
        "it serve starts one when it starts vLLM and the ensemble has a reference",
    )
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    api_keys: list[str] = Field(
        default_factory=list, repr=False, description="comma-separated bearer keys; empty = no auth"
    )
    gate_score: str | None = Field(default=None, description="override the manifest's gate score")
    gate_threshold: float | None = None
    gate_action: GateAction = GateAction.FLAG
    abstain_text: str = "I'm not confident enough to answer that."
    gate_allow_loosen: bool = Field(
        default=False, description="clients may loosen the gate per request (ensemble.gate)"
    )
    # --- escalation (docs/routing.md) ----------------------------------------------
    fallback_url: str | None = Field(
        default=None, description="OpenAI-compatible base URL (…/v1) the gate escalates to"
    )
    fallback_model: str | None = Field(
        default=None, description="the fallback's model id (default: its first listed model)"
    )
    fallback_api_key: str | None = Field(default=None, repr=False, description="bearer key")
    fallback_timeout: float = Field(default=60.0, gt=0, description="seconds per fallback call")
    fallback_on_error: Literal["abstain", "flag"] = Field(
        default="abstain",
        description="when the fallback fails or times out: abstain, or flag the ensemble's answer",
    )
    request_timeout: float = Field(default=120.0, gt=0, description="seconds per upstream call")
    vllm_startup_timeout: float = Field(default=600.0, gt=0)
    log_level: str = "info"
    # --- reliability (docs/reliability.md) -----------------------------------------
    # measured on the reference machine (2 CPU cores, vLLM CPU, K=4): answers/s peak at 2
    # requests in flight and do not grow beyond; 8 waiting = four rounds, about 30 s of
    # queue at that rate (docs/reliability.md, "Defaults")
    max_concurrency: int = Field(
        default=2, gt=0, description="ensemble requests running at once; more wait in the queue"
    )
    max_queue: int = Field(
        default=8, gt=0, description="requests waiting for a slot; beyond it: 429 at once"
    )
    request_deadline: float = Field(
        default=300.0, gt=0, description="seconds a request may take in all (queue + engine)"
    )
    max_body_bytes: int = Field(default=1 << 20, gt=0, description="request body limit (413)")
    max_prompt_chars: int = Field(
        default=100_000, gt=0, description="prompt characters (or token ids) before tokenising"
    )
    vllm_max_restarts: int = Field(
        default=5, gt=0, description="failed vLLM restarts in a row before the gateway exits"
    )
    vllm_health_interval: float = Field(
        default=2.0, gt=0, description="seconds between vLLM health checks"
    )
    vllm_health_timeout: float = Field(
        default=10.0, gt=0, description="a health check slower than this counts as a failure"
    )
    vllm_health_failures: int = Field(
        default=3, gt=0, description="failed health checks in a row that mean vLLM is down"
    )
    vllm_restart_backoff: float = Field(
        default=1.0, gt=0, description="delay after a failed restart; doubles per failure (≤ 30 s)"
    )

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split(cls, v: object) -> object:
        if isinstance(v, str):
            return [s.strip() for s in v.replace(",", " ").split() if s.strip()]
        return v

    @field_validator("gate_score")
    @classmethod
    def _score(cls, v: str | None) -> str | None:
        if v is not None and v not in GATE_SCORES:
            raise ValueError(f"must be one of {', '.join(GATE_SCORES)}")
        return v

    @field_validator("fallback_url", "fallback_model", "fallback_api_key", mode="before")
    @classmethod
    def _unset(cls, v: object) -> object:
        return None if v == "" else v  # an empty variable (compose pass-through) = unset

    @field_validator("fallback_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("http://", "https://")):
            raise ValueError(f"{v!r} is not an http(s) URL (e.g. http://host:8000/v1)")
        return v.rstrip("/") if v else None

    @model_validator(mode="after")
    def _limits(self) -> Settings:
        if self.gate_action is GateAction.ESCALATE and self.fallback_url is None:
            raise ValueError(
                "gate action 'escalate' needs a fallback model: set --fallback-url "
                "(SOFTSPEC_FALLBACK_URL), or choose --gate-action flag or abstain"
            )
        if self.max_queue < self.max_concurrency:
            raise ValueError(
                f"max_queue ({self.max_queue}) is smaller than max_concurrency "
                f"({self.max_concurrency}); raise max_queue or lower max_concurrency"
            )
        if self.request_deadline < MIN_DEADLINE:
            raise ValueError(
                f"request_deadline ({self.request_deadline:g} s) is shorter than a minimal "
                f"generation ({MIN_DEADLINE:g} s)"
            )
        return self
