"""Gateway settings: flags and ``SOFTSPEC_*`` environment variables, validated at start-up."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from ensemble.scores import GATE_SCORES
from server.gate import GateAction

__all__ = ["Settings", "get_settings"]


class Settings(BaseSettings):
    """Everything ``softspec serve`` can be told; env vars are ``SOFTSPEC_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="SOFTSPEC_", extra="ignore")

    ensemble: Path = Field(description="ensemble directory (ensemble.json + adapters/)")
    engine: Literal["vllm", "local"] = "vllm"
    vllm_url: str | None = Field(default=None, description="external vLLM server; else start one")
    base_model: str | None = Field(default=None, description="override the manifest's base model")
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated bearer keys; empty = no auth"
    )
    gate_score: str | None = Field(default=None, description="override the manifest's gate score")
    gate_threshold: float | None = None
    gate_action: GateAction = GateAction.FLAG
    abstain_text: str = "I'm not confident enough to answer that."
    request_timeout: float = Field(default=120.0, gt=0, description="seconds per upstream call")
    top_logprobs: int = Field(default=20, ge=1, le=20, description="N top log-probs per position")
    max_model_len: int = Field(default=2048, ge=16)
    vllm_startup_timeout: float = Field(default=600.0, gt=0)
    vllm_dtype: str = "float32"
    vllm_args: Annotated[list[str], NoDecode] = Field(default_factory=list)
    log_level: str = "info"

    @field_validator("api_keys", "vllm_args", mode="before")
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


@lru_cache
def get_settings() -> Settings:  # pragma: no cover - replaced by the app factory
    return Settings()  # type: ignore[call-arg]
