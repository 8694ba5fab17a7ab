"""The ensemble directory and its manifest, ``ensemble.json`` (docs/ensemble-format.md).

    <dir>/ensemble.json
    <dir>/adapters/<member>/adapter_config.json, adapter_model.safetensors   (peft format)

The manifest is written atomically; :func:`load` verifies every adapter's sha256 and
raises :class:`~ensemble.errors.ManifestError` naming the member when one does not match.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from ensemble.atomic import atomic_write_text, sha256_file
from ensemble.calibration import GateCalibration, RiskControl
from ensemble.errors import ManifestError
from ensemble.scores import DEFAULT_GATE_SCORE, DEFAULT_GATE_THRESHOLD, GATE_SCORES

__all__ = [
    "ADAPTER_FILE",
    "FORMAT",
    "MANIFEST_FILE",
    "DensitySpec",
    "EnsembleManifest",
    "GateSpec",
    "LoraSpec",
    "MemberSpec",
    "load",
    "sha256_file",
]

FORMAT = "softspec.ensemble/v1"
MANIFEST_FILE = "ensemble.json"
ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MemberSpec(_Model):
    """One ensemble member: a LoRA adapter and its mixture weight π_k."""

    name: str = Field(description="member name, e.g. m0; letters, digits, '_', '.', '-'")
    adapter: str = Field(description="adapter directory, relative to the ensemble directory")
    weight: float = Field(ge=0.0, le=1.0, description="mixture weight π_k")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of the adapter weights")

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if not _NAME.match(v) or ":" in v:
            raise ValueError(f"member name {v!r} must match {_NAME.pattern}")
        return v

    @field_validator("adapter")
    @classmethod
    def _relative(cls, v: str) -> str:
        p = Path(v)
        if p.is_absolute() or ".." in p.parts:
            raise ValueError(f"adapter path {v!r} must be relative to the ensemble directory")
        return v


class LoraSpec(_Model):
    """LoRA hyper-parameters shared by all members."""

    r: int = Field(ge=1)
    alpha: float = Field(gt=0)
    target_modules: list[str] = Field(min_length=1)


class GateSpec(_Model):
    """Default gate: which score to threshold (higher = more uncertain) and where."""

    score_name: str = DEFAULT_GATE_SCORE
    threshold: float = DEFAULT_GATE_THRESHOLD
    calibration: GateCalibration | None = Field(
        default=None,
        description="in-distribution scores behind the 'combined' gate score, and the "
        "flag-rate guarantee of its threshold",
    )
    risk_control: RiskControl | None = Field(
        default=None, description="the error-rate guarantee, when the threshold was fitted so"
    )

    @model_serializer(mode="wrap")
    def _omit_empty(self, handler: Any) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        for key in ("calibration", "risk_control"):
            if data.get(key) is None:
                data.pop(key, None)
        return data

    @model_validator(mode="after")
    def _risk_matches(self) -> GateSpec:
        rc = self.risk_control
        if rc is not None and (rc.score_name != self.score_name or rc.threshold != self.threshold):
            raise ValueError(
                "gate.risk_control was fitted for another score or threshold "
                f"({rc.score_name} ≤ {rc.threshold}); refit it or remove it"
            )
        return self

    @field_validator("score_name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in GATE_SCORES:
            raise ValueError(f"gate score {v!r} is not one of {', '.join(GATE_SCORES)}")
        return v


class DensitySpec(_Model):
    """The reference of the ``prompt_distance`` score (``ensemble/density.py``): a Gaussian
    fitted to the base model's pooled last-layer hidden states of the training prompts."""

    file: str = Field(default="reference.npz", description="relative to the ensemble directory")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    layer: Literal["last"] = Field(
        default="last", description="the base's final hidden states (after its last norm)"
    )
    pooling: Literal["user"] = Field(
        default="user", description="mean over the tokens of the user's text (template left out)"
    )
    shrinkage: float = Field(gt=0.0, le=1.0)
    n: int = Field(ge=2, description="distinct training prompts the Gaussian was fitted to")
    dim: int = Field(ge=1)
    source: str = ""

    @field_validator("file")
    @classmethod
    def _relative(cls, v: str) -> str:
        if Path(v).is_absolute() or ".." in Path(v).parts:
            raise ValueError(f"the reference file must be inside the ensemble directory, got {v!r}")
        return v


class EnsembleManifest(_Model):
    """``ensemble.json``: everything needed to serve an ensemble (docs/ensemble-format.md)."""

    format: Literal["softspec.ensemble/v1"] = "softspec.ensemble/v1"
    name: str
    base_model: str = Field(description="base model: a path (absolute or relative) or hub id")
    objective: Literal["sft", "dpo"]
    alpha: float = Field(ge=0.0)
    members: list[MemberSpec] = Field(min_length=1)
    lora: LoraSpec
    training: dict[str, Any] = Field(default_factory=dict)
    gate: GateSpec = Field(default_factory=GateSpec)
    density: DensitySpec | None = Field(
        default=None, description="reference of the prompt_distance score (absent: not served)"
    )

    @model_serializer(mode="wrap")
    def _omit_density(self, handler: Any) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        if data.get("density") is None:
            data.pop("density", None)
        return data

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if not _NAME.match(v) or ":" in v:
            raise ValueError(f"ensemble name {v!r} must match {_NAME.pattern}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> EnsembleManifest:
        names = [m.name for m in self.members]
        if len(set(names)) != len(names):
            raise ValueError(f"member names must be unique, got {names}")
        total = sum(m.weight for m in self.members)
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            raise ValueError(f"member weights must sum to 1, got {total:.8f}")
        return self

    # ------------------------------------------------------------------ derived

    @property
    def member_names(self) -> list[str]:
        return [m.name for m in self.members]

    def log_weights(self) -> np.ndarray:
        """log π as a (K,) float64 array, normalised exactly."""
        w = np.array([m.weight for m in self.members], dtype=np.float64)
        with np.errstate(divide="ignore"):
            return np.log(w / w.sum())

    def member(self, name: str) -> MemberSpec:
        for m in self.members:
            if m.name == name:
                return m
        raise KeyError(name)

    @property
    def version(self) -> str:
        """Short content hash: changes whenever any adapter, weight or α changes."""
        h = hashlib.sha256(f"{self.base_model}|{self.alpha}".encode())
        for m in self.members:
            h.update(f"|{m.name}:{m.weight}:{m.sha256}".encode())
        return h.hexdigest()[:10]

    def served_name(self, member: str) -> str:
        """Versioned adapter name for vLLM, so a retrained adapter never reuses a stale cache."""
        return f"{self.name}-{self.version}-{member}"

    def adapter_dir(self, root: Path, member: str) -> Path:
        return Path(root) / self.member(member).adapter

    def resolve_base_model(self, root: Path) -> str:
        """The base model as a loadable path (absolute, or relative to ``root``) or hub id."""
        p = Path(self.base_model).expanduser()
        if p.is_absolute():
            return str(p)
        rel = Path(root) / p
        return str(rel.resolve()) if rel.exists() else self.base_model

    # ------------------------------------------------------------------ I/O

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2, ensure_ascii=False) + "\n"

    def save(self, root: Path) -> Path:
        """Write ``root/ensemble.json`` atomically; returns its path."""
        path = Path(root) / MANIFEST_FILE
        atomic_write_text(path, self.to_json())
        return path


def load(root: str | Path, *, verify: bool = True) -> EnsembleManifest:
    """Read ``root/ensemble.json`` and (by default) verify every adapter's sha256."""
    root = Path(root)
    path = root / MANIFEST_FILE
    if not path.is_file():
        raise ManifestError(
            f"{path} not found: pass an ensemble directory written by `softspec train`"
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ManifestError(f"{path} is not valid JSON ({exc}); re-run training") from exc
    if isinstance(raw, dict) and raw.get("format") not in (None, FORMAT):
        raise ManifestError(f"{path}: unsupported format {raw.get('format')!r}, need {FORMAT!r}")
    try:
        manifest = EnsembleManifest.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "(root)"
        raise ManifestError(f"{path}: field {where}: {first['msg']}") from exc
    if verify:
        verify_adapters(manifest, root)
        verify_reference(manifest, root)
    return manifest


def verify_reference(manifest: EnsembleManifest, root: Path) -> None:
    """Check that the prompt-distance reference (when recorded) exists and matches its sha256."""
    spec = manifest.density
    if spec is None:
        return
    path = Path(root) / spec.file
    if not path.is_file():
        raise ManifestError(
            f"density: {path} is missing; restore it, or remove the manifest's 'density' entry "
            "to serve without prompt_distance"
        )
    digest = sha256_file(path)
    if digest != spec.sha256:
        raise ManifestError(
            f"density: {path} has sha256 {digest[:12]}…, the manifest records {spec.sha256[:12]}…; "
            "the reference changed after it was fitted: refit it (`softspec reference`) or restore it"
        )


def verify_adapters(manifest: EnsembleManifest, root: Path) -> None:
    """Check that every member's adapter files exist and match the recorded sha256."""
    for m in manifest.members:
        adir = Path(root) / m.adapter
        weights, config = adir / ADAPTER_FILE, adir / ADAPTER_CONFIG
        for f in (weights, config):
            if not f.is_file():
                raise ManifestError(f"member {m.name}: {f} is missing; the ensemble is incomplete")
        digest = sha256_file(weights)
        if digest != m.sha256:
            raise ManifestError(
                f"member {m.name}: {weights} has sha256 {digest[:12]}…, the manifest records "
                f"{m.sha256[:12]}…; the adapter changed after training: retrain or restore it"
            )
