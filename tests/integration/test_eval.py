"""A tiny `softspec eval` through the real gateway (vLLM + SmolLM2): the pipeline works."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ensemble import metrics as M
from ensemble.manifest import load as load_manifest
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
                 "--out", str(out), "--max-tokens", "12"])  # fmt: skip
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 6
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    ood = [p["ood"] for p in preds]
    for score in ("epistemic", "perplexity", "mean_token_entropy", "novelty", "prompt_novelty"):
        assert all(isinstance(p[score], float) for p in preds), score  # served and recorded
        assert metrics["scores"][score]["ood_auroc"] == pytest.approx(
            M.auroc([p[score] for p in preds], ood)
        )
    # --calibrate-gate needs 20 in-distribution rows: refused before any work on these 3
    assert main(["eval", "--ensemble", str(copy), "--data", str(data), "--url", smol_gateway,
                 "--out", str(tmp_path / "r2"), "--calibrate-gate", "0.1"]) == 2  # fmt: skip
    assert load_manifest(copy).gate == load_manifest(smol_ensemble).gate
    assert len(preds) == 6 and all(p["answer"] is not None for p in preds)
    assert all(abs(sum(p["responsibilities"].values()) - 1) < 1e-6 for p in preds)
    assert (out / "report.md").exists() and (out / "roc.png").exists()
    assert "routing" in metrics and (out / "routing.png").exists()
