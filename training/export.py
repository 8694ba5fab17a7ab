"""Write the ensemble directory (docs/ensemble-format.md) atomically from a trained EnsembleLM."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ensemble.atomic import atomic_dir, sha256_file
from ensemble.manifest import ADAPTER_FILE, EnsembleManifest, GateSpec, LoraSpec, MemberSpec
from training.config import TrainConfig
from training.model import EnsembleLM
from training.plots import plot_routing_matrix, plot_training_curves, read_log

__all__ = ["LOG_FILE", "export_ensemble"]

LOG_FILE = "train_log.jsonl"


def _weights(log_weights: np.ndarray) -> list[float]:
    """π as floats that sum to 1 exactly enough for the manifest (renormalised)."""
    w = np.exp(log_weights - log_weights.max())
    w = w / w.sum()
    return [float(x) for x in w]


def export_ensemble(
    ens: EnsembleLM,
    cfg: TrainConfig,
    base: str,
    run_dir: Path,
    training: dict[str, Any],
    finish: Callable[[Path], None] | None = None,
) -> Path:
    """Save adapters, manifest, log and plots to ``cfg.out`` in one atomic rename.

    ``finish`` completes the directory before the rename (the prompt_distance reference,
    the calibrated gate: both rewrite the manifest), so ``cfg.out/ensemble.json`` appears
    only once the ensemble is final: whoever waits for it (a compose gateway, a script)
    never loads a half-finished ensemble. When ``finish`` fails nothing is written."""
    out = Path(cfg.out)
    lora_cfg = next(iter(ens.peft.peft_config.values()))
    weights = _weights(ens.log_weights.double().cpu().numpy())
    with atomic_dir(out, replace=cfg.overwrite) as tmp:
        members = []
        for name, w in zip(ens.members, weights, strict=True):
            ens.peft.save_pretrained(tmp / "adapters", selected_adapters=[name])
            adir = tmp / "adapters" / name
            _set_base(adir / "adapter_config.json", base)
            members.append(
                MemberSpec(
                    name=name,
                    adapter=f"adapters/{name}",
                    weight=w,
                    sha256=sha256_file(adir / ADAPTER_FILE),
                )
            )
        readme = tmp / "adapters" / "README.md"
        readme.unlink(missing_ok=True)
        log = run_dir / LOG_FILE
        if log.exists():
            shutil.copy2(log, tmp / LOG_FILE)
        plots = tmp / "plots"
        plots.mkdir()
        plot_training_curves(read_log(log), plots / "training_curves.png", ens.members)
        if "routing" in training:
            plot_routing_matrix(training["routing"], plots / "routing_matrix.png")
        manifest = EnsembleManifest(
            name=cfg.name,
            base_model=base,
            objective=cfg.objective,  # type: ignore[arg-type]
            alpha=cfg.alpha,
            members=members,
            lora=LoraSpec(
                r=int(lora_cfg.r),
                alpha=float(lora_cfg.lora_alpha),
                target_modules=sorted({t.rsplit(".", 1)[-1] for t in lora_cfg.target_modules}),
            ),
            training=training,
            gate=GateSpec(),
        )
        manifest.save(tmp)
        if finish is not None:
            finish(tmp)
    return out


def _set_base(path: Path, base: str) -> None:
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = base
    config["inference_mode"] = True
    path.write_text(json.dumps(config, indent=2) + "\n")
