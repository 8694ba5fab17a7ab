"""A tiny `softspec eval` through the real gateway (vLLM + SmolLM2): the pipeline works."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ensemble.manifest import load as load_manifest
from ensemble.scores import GATE_SCORES
from softspec.cli import main

pytestmark = pytest.mark.slow


def test_tiny_eval_end_to_end(
    smol_ensemble: Path, smol_gateway: str, default_data: Path, tmp_path: Path
) -> None:
    rows = [json.loads(x) for x in (default_data / "eval_ood.jsonl").read_text().splitlines()]
    ind = [r for r in rows if not r["ood"]][:3]
    ood = [r for r in rows if r["ood"]][:3]
    data = tmp_path / "mini.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ind + ood))
    out = tmp_path / "report"
    copy = tmp_path / "smol"
    shutil.copytree(smol_ensemble, copy)  # the calibrated gate is written into this copy
    code = main(["eval", "--ensemble", str(copy), "--data", str(data), "--url", smol_gateway,
                 "--out", str(out), "--max-tokens", "12", "--calibrate-gate", "0.34"])  # fmt: skip
    assert code == 0
    gate = load_manifest(copy).gate
    assert gate.score_name in GATE_SCORES and gate.threshold >= 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 6
    for score in ("epistemic", "msp", "mean_token_entropy", "total"):
        auc = metrics["scores"][score]["ood_auroc"]
        assert auc is None or 0.0 <= auc <= 1.0
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 6 and all(p["answer"] is not None for p in preds)
    assert all(abs(sum(p["responsibilities"].values()) - 1) < 1e-6 for p in preds)
    assert (out / "report.md").exists() and (out / "roc.png").exists()
    assert "routing" in metrics and (out / "routing.png").exists()
