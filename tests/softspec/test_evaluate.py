"""softspec eval: metrics from per-prompt records (hand-made), and bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from ensemble import metrics as M
from ensemble.scores import BASELINES, EVAL_SCORES
from softspec.cli import main
from softspec.evaluate import calibrate_gate, compute_metrics


def record(
    ood: bool, correct: bool | None, epi: float, ppl: float, group: str, resp: tuple[float, float]
) -> dict:
    return {
        "ood": ood, "correct": correct, "group": group, "confidence": 0.9 if correct else 0.2,
        "epistemic": epi, "aleatoric": 1.0, "total": 1.0 + epi, "sequence_epistemic": epi / 2,
        "disagreement": 0.0, "novelty": -epi, "prompt_novelty": ppl - epi,
        "prompt_distance": 100 * epi + ppl, "combined": None,
        "perplexity": ppl, "mean_token_entropy": 2.0,
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
    assert set(m["scores"]) == set(EVAL_SCORES)
    ood = [p["ood"] for p in PREDS]
    for s in EVAL_SCORES:
        if s == "combined":  # not served (no calibration): no metrics rather than a crash
            assert m["scores"][s] == {}
            continue
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
    # by hand: epistemic in (0.1, 0.2, 0.3) vs OOD (0.9, 0.8, 0.3): 8 of 9 pairs ordered and
    # one tie (0.3 vs 0.3) counted as half
    assert m["scores"]["epistemic"]["ood_auroc"] == pytest.approx(8.5 / 9)
    assert m["scores"]["novelty"]["ood_auroc"] == pytest.approx(0.5 / 9)  # −epistemic: reversed
    assert m["epistemic_minus_best_baseline"] == pytest.approx(
        m["scores"]["epistemic"]["ood_auroc"] - max(m["scores"][b]["ood_auroc"] for b in BASELINES)
    )
    assert "combined_minus_best_baseline" not in m  # combined is not served here
    assert "gate_flag_rate" not in m  # the records carry no gate decision
    gated = compute_metrics(
        [{**p, "gate": "flag" if p["epistemic"] > 0.25 else "pass"} for p in PREDS], ["m0", "m1"]
    )
    assert gated["gate_flag_rate"] == {"in_distribution": pytest.approx(1 / 3), "ood": 1.0}
    assert m["routing"]["groups"] == ["a", "b", "c"]
    assert m["routing"]["matrix"][0] == pytest.approx([0.85, 0.15])
    assert m["routing"]["task_member_mi"] == pytest.approx(
        M.mutual_information([p["group"] for p in PREDS], ["m0", "m0", "m1", "m1", "m0", "m1"])
    )
    # epistemic, total and sequence_epistemic tie at 8.5/9; the first in table order wins
    assert m["best_ood_score"] == "epistemic"
    assert m["epistemic_minus_best_baseline"] == pytest.approx(8.5 / 9 - 0.5)


def test_constant_score_has_auroc_one_half() -> None:
    m = compute_metrics(PREDS, ["m0", "m1"])
    assert m["scores"]["disagreement"]["ood_auroc"] == pytest.approx(0.5)


def test_eval_rejects_bad_input(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["eval", "--ensemble", str(tmp_path), "--data", str(tmp_path / "x.jsonl")]) == 2
    assert "ensemble.json not found" in capsys.readouterr().err
    bad_fpr = ["--calibrate-gate", "1.5"]
    assert main(["eval", "--ensemble", str(tmp_path), "--data", "x.jsonl", *bad_fpr]) == 2
    assert "false-positive rate must be in (0, 1)" in capsys.readouterr().err
    both = ["--calibrate-gate", "0.05", "--gate-risk", "0.2"]
    assert main(["eval", "--ensemble", str(tmp_path), "--data", "x.jsonl", *both]) == 2
    assert "give one" in capsys.readouterr().err
    assert main(["eval", "--ensemble", str(tmp_path), "--data", "x.jsonl", "--gate-risk", "2"]) == 2
    assert "target error must be in (0, 1)" in capsys.readouterr().err


def test_calibrate_gate_fits_combined_from_in_distribution_rows_only() -> None:
    from ensemble.calibration import combined_score
    from ensemble.errors import ConfigError, DataError

    rows = [record(i % 3 == 0, None, 0.01 * i, 0.5 + 0.02 * i, "a", (0.5, 0.5)) for i in range(60)]
    # an ensemble with a prompt_distance reference: the gate is calibrated on the distance
    served = calibrate_gate(rows, 0.1, source="test")
    assert served.calibration is not None
    assert served.calibration.components == ["prompt_distance"]
    assert served.calibration.scores["prompt_distance"] == sorted(
        r["prompt_distance"] for r in rows if not r["ood"]
    )
    # without one (the score is null in every row): on prompt_novelty
    rows = [{**r, "prompt_distance": None} for r in rows]
    gate = calibrate_gate(rows, 0.1, source="test")
    ind = [r for r in rows if not r["ood"]]
    cal = gate.calibration
    assert cal is not None and cal.n == len(ind) == 40
    # 0.1 snaps to the attainable level 4/41; the threshold sits half a step above it
    assert cal.level == pytest.approx(4 / 41) and cal.target_rate == 0.1
    assert gate.score_name == "combined" and gate.threshold == pytest.approx(1 - 4.5 / 41)
    assert "at most 9.76% in expectation" in cal.guarantee
    # only in-distribution values were used: OOD rows' scores are not in the calibration
    assert cal.scores["prompt_novelty"] == sorted(r["prompt_novelty"] for r in ind)
    # p ≤ 4/41 on its own rows means at most 3 of the 40 scores at or above it: the top 3
    flagged = [combined_score(cal, r) > gate.threshold for r in ind]  # type: ignore[operator]
    top3 = sorted(r["prompt_novelty"] for r in ind)[-3:]
    assert [r["prompt_novelty"] for r, f in zip(ind, flagged, strict=True) if f] == top3
    with pytest.raises(ConfigError):
        calibrate_gate(rows, 1.5)
    with pytest.raises(DataError, match="at least 20 in-distribution rows"):
        calibrate_gate(rows[:12], 0.1)
    with pytest.raises(DataError, match="can promise no flag rate below 0.024"):
        calibrate_gate(rows, 0.01)


def test_risk_gate_certifies_the_error_among_passed_answers() -> None:
    """Errors only above a score of 0.6: the loosest certified threshold passes the clean
    answers, and the gate records its guarantee."""
    from ensemble.errors import DataError
    from softspec.evaluate import risk_gate

    rows = []
    for i in range(200):
        r = record(False, None, 0.0, 0.0, "a", (0.5, 0.5))
        r["prompt_novelty"] = i / 200
        r["correct"] = i / 200 < 0.6 or i % 2 == 0  # error rate 0 below 0.6, 1/2 above
        rows.append(r)
    gate = risk_gate(rows, 0.1, "prompt_novelty", delta=0.1)
    rc = gate.risk_control
    assert rc is not None and gate.score_name == "prompt_novelty"
    # coverage 0.6 is clean (0 of 120 wrong); 0.7 has 10 of 140 wrong: P(Bin(140, 0.1) ≤ 10)
    # = 0.16 > δ/10, so 0.6 is the loosest certified candidate
    assert rc.coverage == pytest.approx(0.6) and rc.error_rate == 0.0
    assert gate.threshold == pytest.approx(119 / 200) and rc.n == 200
    with pytest.raises(DataError, match="no threshold keeps the error"):
        risk_gate(rows[:10], 0.01, "prompt_novelty")
    with pytest.raises(DataError, match="gold answer"):
        risk_gate([record(False, None, 0, 0, "a", (1, 0))], 0.1, "epistemic")


def test_plots_leave_out_scores_the_server_did_not_serve(tmp_path: Path) -> None:
    """`combined` is None without a gate calibration: the plots skip it instead of failing."""
    from softspec.eval_plots import write_plots

    assert all(p["combined"] is None for p in PREDS)
    written = write_plots(PREDS, compute_metrics(PREDS, ["m0", "m1"]), tmp_path)
    assert (tmp_path / "roc.png") in written and (tmp_path / "risk_coverage.png") in written
