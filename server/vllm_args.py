"""vLLM's command line for an ensemble: the one builder of it.

``softspec serve`` starts its vLLM child with these arguments (:mod:`server.vllm_process`);
a vLLM started outside it (docker compose, Kubernetes) gets them from
``deploy/vllm-args.py``. Both call :func:`ensemble_args`, so the two cannot drift.

The adapters' served names carry the manifest's content hash
(``EnsembleManifest.served_name``), which is why the arguments are computed from the
ensemble directory rather than written by hand.

This module needs only the standard library, pydantic and :mod:`ensemble.manifest`, so it
also runs in the stock ``vllm/vllm-openai`` image (which has pydantic) with the
repository's ``ensemble/`` and ``server/`` mounted.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from pydantic import BaseModel, Field, field_validator

from ensemble.errors import SoftspecError
from ensemble.manifest import EnsembleManifest
from server.lockstep import vllm_flags as lockstep_flags

__all__ = [
    "VLLM_MODULE",
    "VLLMShape",
    "cuda_available",
    "embedder_args",
    "ensemble_adapters",
    "ensemble_args",
    "ensemble_embedder_args",
    "lora_rank_bucket",
    "server_args",
]

VLLM_MODULE = "vllm.entrypoints.openai.api_server"
_RANK_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's --max-lora-rank choices


class VLLMShape(BaseModel):
    """The settings that shape the vLLM server; the gateway's ``Settings`` inherits them,
    so vLLM and the gateway read the same ``SOFTSPEC_*`` variables with the same rules."""

    base_model: str | None = Field(default=None, description="override the manifest's base model")
    top_logprobs: int = Field(default=20, ge=1, le=20, description="N top log-probs per position")
    max_model_len: int = Field(default=2048, ge=16)
    vllm_dtype: str = "float32"
    vllm_args: list[str] = Field(default_factory=list)

    @field_validator("vllm_args", mode="before")
    @classmethod
    def _split_args(cls, v: object) -> object:
        if isinstance(v, str):
            return [s.strip() for s in v.replace(",", " ").split() if s.strip()]
        return v

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> VLLMShape:
        """The shape from ``SOFTSPEC_<FIELD>`` variables (for a process without Settings)."""
        env = os.environ if environ is None else environ
        given = {
            f: env[f"SOFTSPEC_{f.upper()}"]
            for f in cls.model_fields
            if f"SOFTSPEC_{f.upper()}" in env
        }
        return cls.model_validate(given)


class ArgsError(SoftspecError):
    """The ensemble cannot be served by vLLM as configured."""


def lora_rank_bucket(r: int) -> int:
    """vLLM accepts only some --max-lora-rank values; take the smallest that fits ``r``."""
    for bucket in _RANK_BUCKETS:
        if r <= bucket:
            return bucket
    raise ArgsError(f"LoRA rank {r} is larger than vLLM supports ({_RANK_BUCKETS[-1]})")


def cuda_available() -> bool:
    """True when an NVIDIA GPU is visible (checked without importing torch)."""
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and b"GPU" in out.stdout


def server_args(
    *,
    model: str,
    adapters: Mapping[str, str],
    host: str,
    port: int,
    max_lora_rank: int = 16,
    max_logprobs: int = 20,
    max_model_len: int = 2048,
    dtype: str = "float32",
    eager: bool = False,
    lockstep: bool = True,
    extra: Sequence[str] = (),
) -> list[str]:
    """The arguments after ``python -m vllm.entrypoints.openai.api_server`` (pure).

    With adapters and ``lockstep``, the lock-step processor and group scheduler are loaded
    (token mode, :mod:`server.lockstep`)."""
    args = [
        "--model", model,
        "--host", host, "--port", str(port),
        "--dtype", dtype,
        "--max-model-len", str(max_model_len),
        "--max-logprobs", str(max_logprobs),
        "--enable-prefix-caching",
        "--disable-uvicorn-access-log",
    ]  # fmt: skip
    if adapters:
        args += ["--enable-lora", "--max-loras", str(len(adapters))]
        args += ["--max-lora-rank", str(lora_rank_bucket(max_lora_rank))]
        args += ["--lora-modules", *(f"{n}={p}" for n, p in adapters.items())]
        if lockstep:
            args += lockstep_flags(len(adapters), max_model_len)
    if eager:  # the CPU backend: eager mode starts faster
        args += ["--enforce-eager"]
    return args + list(extra)


# The pooling configuration under which vLLM returns every prompt token's last hidden state
# (after the model's final norm, no normalisation or activation on top): measured equal to
# transformers' hidden_states[-1] within 1.3e-4 on SmolLM2 (vLLM 0.32, CPU, float32).
EMBEDDER_POOLER = '{"task":"token_embed","tok_pooling_type":"ALL","use_activation":false}'


def embedder_args(
    *,
    model: str,
    host: str,
    port: int,
    max_model_len: int = 2048,
    dtype: str = "float32",
    eager: bool = False,
    extra: Sequence[str] = (),
) -> list[str]:
    """The arguments of the ``prompt_distance`` embedder: the base model as a pooling model
    (no adapters; ``POST /pooling`` with ``task: token_embed``)."""
    args = [
        "--model", model,
        "--host", host, "--port", str(port),
        "--dtype", dtype,
        "--max-model-len", str(max_model_len),
        "--runner", "pooling", "--convert", "embed",
        "--pooler-config", EMBEDDER_POOLER,
        "--disable-uvicorn-access-log",
    ]  # fmt: skip
    if eager:
        args += ["--enforce-eager"]
    return args + list(extra)


def ensemble_adapters(root: Path, manifest: EnsembleManifest) -> dict[str, str]:
    """Served name → absolute adapter directory, for every member."""
    return {
        manifest.served_name(m): str(manifest.adapter_dir(root, m).resolve())
        for m in manifest.member_names
    }


def ensemble_model(root: Path, manifest: EnsembleManifest, shape: VLLMShape) -> str:
    """The base model vLLM loads: the setting, else the manifest's (resolved)."""
    return shape.base_model or manifest.resolve_base_model(root)


def ensemble_args(
    root: Path,
    manifest: EnsembleManifest,
    shape: VLLMShape,
    host: str,
    port: int,
    *,
    eager: bool | None = None,
) -> list[str]:
    """vLLM's arguments for an ensemble directory; ``eager`` defaults to "no GPU"."""
    return server_args(
        model=ensemble_model(root, manifest, shape),
        adapters=ensemble_adapters(root, manifest),
        host=host,
        port=port,
        max_lora_rank=manifest.lora.r,
        max_logprobs=shape.top_logprobs,
        max_model_len=shape.max_model_len,
        dtype=shape.vllm_dtype,
        eager=not cuda_available() if eager is None else eager,
        extra=shape.vllm_args,
    )


def ensemble_embedder_args(
    root: Path,
    manifest: EnsembleManifest,
    shape: VLLMShape,
    host: str,
    port: int,
    *,
    eager: bool | None = None,
) -> list[str]:
    """The ``prompt_distance`` embedder's arguments for an ensemble directory (its base)."""
    return embedder_args(
        model=ensemble_model(root, manifest, shape),
        host=host,
        port=port,
        max_model_len=shape.max_model_len,
        dtype=shape.vllm_dtype,
        eager=not cuda_available() if eager is None else eager,
    )
