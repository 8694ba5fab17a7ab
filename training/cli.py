"""``softspec train sft|dpo``: parse the TRL-style config dataclass and run the training.

Works under ``accelerate launch -m softspec.cli train sft ...`` for data-parallel runs.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from training.config import DPOConfig, SFTConfig

__all__ = ["run_train"]

CONFIGS = {"sft": SFTConfig, "dpo": DPOConfig}


def run_train(objective: str, argv: Sequence[str]) -> int:
    from transformers import HfArgumentParser

    from ensemble.manifest import MANIFEST_FILE
    from ensemble.manifest import load as load_manifest
    from softspec.default_model import export_default_model
    from training.run import train_ensemble

    parser = HfArgumentParser(CONFIGS[objective], prog=f"softspec train {objective}")  # type: ignore[arg-type]
    (cfg,) = parser.parse_args_into_dataclasses(list(argv), look_for_args_file=False)
    init_from = getattr(cfg, "init_from", "")
    if not cfg.base and init_from and (Path(init_from) / MANIFEST_FILE).is_file():
        cfg.base = load_manifest(init_from).resolve_base_model(Path(init_from))  # its base
    if not cfg.base:
        cfg.base = str(export_default_model())
    result = train_ensemble(cfg)
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
