"""``train sft|dpo`` arguments: parse the TRL-style config dataclass and run the training.

The application's command (``softspec train``) calls :func:`run_train` with its wiring: the
default base model and the stability diagnosis. Works under ``accelerate launch`` for
data-parallel runs.

``--alpha auto`` (SFT): runs the given diagnosis on the same --data/--base/--seed/LoRA
shape first, trains with its recommended α, and records the diagnosis in the manifest's
``training.alpha_diagnosis`` (the manifest is re-written atomically).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ensemble.errors import ConfigError
from training.config import DPOConfig, SFTConfig, TrainConfig

__all__ = ["record_diagnosis", "run_train", "split_alpha_auto"]

CONFIGS = {"sft": SFTConfig, "dpo": DPOConfig}
AUTO = "auto"
DIAGNOSIS_KEY = "alpha_diagnosis"


def split_alpha_auto(argv: Sequence[str]) -> tuple[list[str], bool]:
    """``argv`` with ``--alpha auto`` replaced by a placeholder number, and whether it was."""
    out: list[str] = []
    auto = False
    args = list(argv)
    i = 0
    while i < len(args):
        a = args[i]
        if a in ("--alpha", "--alpha=auto") and (
            a == "--alpha=auto" or args[i + 1 : i + 2] == [AUTO]
        ):
            out += ["--alpha", "1.0"]
            auto = True
            i += 1 if a == "--alpha=auto" else 2
            continue
        out.append(a)
        i += 1
    return out, auto


def record_diagnosis(out: Path, diagnosis: dict[str, Any]) -> None:
    """Add the diagnosis to ``out``'s manifest (``training.alpha_diagnosis``), atomically."""
    from ensemble.manifest import load as load_manifest

    manifest = load_manifest(out)
    keep = (
        "alpha_star",
        "criterion",
        "estimator",
        "cross_fit",
        "lambda_max",
        "eigenvalues",
        "recommended",
        "converged",
        "relative_residual",
        "effective_examples",
        "n_examples",
        "n_params",
        "layers",
        "top_examples",
        "groups",
        "theta",
        "settings",
        "seconds",
        "data",
    )
    training = {
        **manifest.training,
        DIAGNOSIS_KEY: {k: diagnosis[k] for k in keep if k in diagnosis},
    }
    manifest.model_copy(update={"training": training}).save(out)


def run_train(
    objective: str,
    argv: Sequence[str],
    *,
    default_base: Callable[[], str | Path] | None = None,
    diagnose: Callable[[TrainConfig], dict[str, Any]] | None = None,
) -> int:
    """Parse ``argv`` into the objective's config and train.

    The application supplies the wiring: ``default_base`` gives the base model when
    ``--base`` is not passed, ``diagnose`` runs the stability diagnosis for ``--alpha auto``
    (both are ``softspec``'s; this library does not know them).
    """
    from transformers import HfArgumentParser

    from ensemble.manifest import MANIFEST_FILE
    from ensemble.manifest import load as load_manifest
    from training.run import train_ensemble

    argv, alpha_auto = split_alpha_auto(argv)
    if alpha_auto and objective != "sft":
        raise ConfigError("--alpha auto is for SFT (the criterion uses sequence log-likelihoods)")
    parser = HfArgumentParser(CONFIGS[objective], prog=f"softspec train {objective}")  # type: ignore[arg-type]
    (cfg,) = parser.parse_args_into_dataclasses(list(argv), look_for_args_file=False)
    init_from = getattr(cfg, "init_from", "")
    if not cfg.base and init_from and (Path(init_from) / MANIFEST_FILE).is_file():
        cfg.base = load_manifest(init_from).resolve_base_model(Path(init_from))  # its base
    if not cfg.base:
        if default_base is None:
            raise ConfigError("--base is required: a Hugging Face model directory")
        cfg.base = str(default_base())
    diagnosis: dict[str, Any] | None = None
    if alpha_auto:
        if diagnose is None:
            raise ConfigError("--alpha auto needs the stability diagnosis: use `softspec train`")
        cfg.check_paths()  # a bad --out fails now, not after the diagnosis
        diagnosis = diagnose(cfg)
        cfg.alpha = float(diagnosis["recommended"]["alpha"])
        print(
            f"--alpha auto: α* = {diagnosis['alpha_star']:.4g}; training with α = {cfg.alpha:g} "
            f"(recommended K = {diagnosis['recommended']['members']}, --members {cfg.members})",
            file=sys.stderr,
        )
    result = train_ensemble(cfg)
    main_process = int(os.environ.get("RANK", "0")) == 0
    if diagnosis is not None and main_process and (Path(cfg.out) / MANIFEST_FILE).is_file():
        record_diagnosis(Path(cfg.out), diagnosis)
    routing = result.routing
    if routing:
        mean = ", ".join(f"{k}={v:.3f}" for k, v in routing["mean_responsibility"].items())
        print(
            f"trained {result.steps} steps in {result.seconds:.0f}s; responsibilities {mean}; "
            f"routing entropy {routing['mean_routing_entropy']:.3f} nats",
            file=sys.stderr,
        )
        print(result.out)
    return 0
