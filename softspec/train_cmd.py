"""``softspec train sft|dpo``: the application's wiring of the training library.

The library (:mod:`training.cli`) parses the options and trains; this module supplies what
only the application knows: the default base model (the exported SmolLM2) and, for
``--alpha auto``, the stability diagnosis of ``softspec diagnose`` on the run's own data,
base, seed and LoRA shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ensemble.errors import ConfigError
from training.cli import split_alpha_auto
from training.config import TrainConfig

__all__ = ["diagnose_for", "run_train", "split_alpha_auto"]


def diagnose_for(cfg: TrainConfig) -> dict[str, Any]:
    """The stability diagnosis on the training run's own data, base, seed and LoRA shape."""
    from softspec.diagnose import DiagnoseOptions, diagnose
    from training.data import read_rows
    from training.stability import MIN_EXAMPLES

    # cross-fitted, with θ* fitted on rows it never measures and J centred on each fold's
    # mean (docs/stability.md): the in-sample λ_max measures the most poorly fitted example,
    # and rows θ* was fitted on have shrunken gradients. Half the file (up to 256 rows) for
    # the fit, the other half for the estimate, in batches small enough for three folds.
    rows = len(read_rows(cfg.data))
    need = 2 * 3 * MIN_EXAMPLES
    if rows < need:
        raise ConfigError(
            f"--alpha auto: {cfg.data} has {rows} examples; the stability estimate needs at "
            f"least {need} (half to fit θ* on, three folds of {MIN_EXAMPLES} to measure on "
            "the other half); pass a fixed --alpha"
        )
    examples = min(DiagnoseOptions.examples, rows // 2)
    opts = DiagnoseOptions(
        cross_fit=True,
        center=True,
        examples=examples,
        fit_examples=min(DiagnoseOptions.examples, rows - examples),
        batch_size=max(1, min(DiagnoseOptions.batch_size, examples // 6)),
        data=cfg.data,
        base=cfg.base,
        seed=cfg.seed,
        lora_r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        target_modules=cfg.target_modules,
        max_length=min(cfg.max_length, 256),
        drop_overlong=True,  # a sample for the estimate: an example too long for 256 tokens is left out
        normalize_by_length=cfg.normalize_by_length,  # the criterion of the objective trained
    )
    return diagnose(opts)


def _default_base() -> Path:
    from softspec.default_model import export_default_model

    return export_default_model()


def run_train(objective: str, argv: Sequence[str]) -> int:
    """``softspec train <objective> ARGS``: train with the application's defaults."""
    from training.cli import run_train as train

    return train(objective, argv, default_base=_default_base, diagnose=diagnose_for)
