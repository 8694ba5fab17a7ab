"""softspec eval: metrics from per-prompt records (hand-made), and bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from ensemble import metrics as M
from softspec.cli import main
from softspec.evaluate import BASELINES, SCORES, calibrate_gate, compute_metrics


def record(
    ood: bool, correct: bool | None, epi: float, msp: float, group: str, resp: tuple[float, float]
) -> dict:
    return {
        "ood": ood, "correct": correct, "group": group, "confidence": 0.9 if correct else 0.2,
        "epistemic": epi, "aleatoric": 1.0, "total": 1.0 + epi, "sequence_epistemic": epi / 2,
        "disagreement": 0.0, "msp": msp, "mean_token_entropy": 2.0,
        "responsibilities": {"m0": resp[0], "m1": resp[1]},
    }  # fmt: skip


PREDS = [
    record(False, True, 0.1, 0.5, "a", (0.9, 0.1)),
    record(False, True, 0.2, 0.4, "a", (0.8, 0.2)),
    record(False, False, 0.3, 0.9, "b", (0.2, 0.8)),
    record(True, False, 0.9, 0.3, "b", (0.1, 0.9)),
    record(True, None, 0.8, 0.6, "c", (0.5, 0.5)),
    record(True, False, 0.3, 0.9, "c", (0.4, 0.6)),
]


def test_metrics_match_the_metric_functions() -> None:
    m = compute_metrics(PREDS, ["m0", "m1"])
    assert set(m["scores"]) == set(SCORES) and set(BASELINES) <= set(SCORES)
    ood = [p["ood"] for p in PREDS]
    for s in SCORES:
        assert m["scores"][s]["ood_auroc"] == pytest.approx(M.auroc([p[s] for p in PREDS], ood))
    graded = [p for p in PREDS if p["correct"] is not None]
    err = [0.0 if p["correct"] else 1.0 for p in graded]
    assert m["scores"]["epistemic"]["error_auroc"] == pytest.approx(
        M.auroc([p["epistemic"] for p in graded], err)
    )
    assert m["scores"]["epistemic"]["prr"] == pytest.approx(
        M.prediction_rejection_ratio([p["epistemic"] for p in graded], err)
    )
    assert m["accuracy"] == pytest.approx(2 / 5)
    assert m["ece"] == pytest.approx(
        M.expected_calibration_error([p["confidence"] for p in graded], [1 - e for e in err])
    )
    # epistemic separates OOD perfectly but for one tie-free inversion: 8/9 pairs ordered
    assert m["scores"]["epistemic"]["ood_auroc"] == pytest.approx(
        M.auroc([0.1, 0.2, 0.3, 0.9, 0.8, 0.3], ood)
    )
    assert m["epistemic_minus_best_baseline"] == pytest.approx(
        m["scores"]["epistemic"]["ood_auroc"] - max(m["scores"][b]["ood_auroc"] for b in BASELINES)
    )
    assert m["routing"]["groups"] == ["a", "b", "c"]
    assert m["routing"]["matrix"][0] == pytest.approx([0.85, 0.15])
    assert m["routing"]["task_member_mi"] == pytest.approx(
        M.mutual_information([p["group"] for p in PREDS], ["m0", "m0", "m1", "m1", "m0", "m1"])
    )
    assert m["best_ood_score"] in SCORES


def test_constant_score_has_auroc_one_half() -> None:
    m = compute_metrics(PREDS, ["m0", "m1"])
    assert m["scores"]["disagreement"]["ood_auroc"] == pytest.approx(0.5)


def test_eval_rejects_bad_input(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["eval", "--ensemble", str(tmp_path), "--data", str(tmp_path / "x.jsonl")]) == 2
    assert "ensemble.json not found" in capsys.readouterr().err
    bad_fpr = ["--calibrate-gate", "1.5"]
    assert main(["eval", "--ensemble", str(tmp_path), "--data", "x.jsonl", *bad_fpr]) == 2
    assert "false-positive rate must be in (0, 1)" in capsys.readouterr().err


def test_calibrated_gate_flags_the_requested_share_of_in_distribution() -> None:
    import numpy as np

    from ensemble.errors import ConfigError

    m = compute_metrics(PREDS, ["m0", "m1"])
    score, threshold = calibrate_gate(PREDS, m, 0.34)
    gate_scores = ["epistemic", "aleatoric", "total", "sequence_epistemic", "disagreement"]
    assert score == max(gate_scores, key=lambda s: m["scores"][s]["ood_auroc"])
    ind = np.array([p[score] for p in PREDS if not p["ood"]])
    assert threshold == pytest.approx(np.quantile(ind, 0.66))
    assert (ind > threshold).mean() <= 0.34
    with pytest.raises(ConfigError):
        calibrate_gate(PREDS, m, 1.5)
