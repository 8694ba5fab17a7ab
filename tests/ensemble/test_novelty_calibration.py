"""Base-relative scores and the calibrated `combined` gate score against brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ensemble.calibration import (
    GateCalibration,
    combined_score,
    fit_calibration,
    p_value,
    threshold_for_rate,
)
from ensemble.novelty import mixture_token_logprobs, novelty


def test_novelty_is_the_mean_base_minus_mixture_log_likelihood() -> None:
    rng = np.random.default_rng(0)
    k, t = 3, 7
    members = np.log(rng.dirichlet(np.ones(5), size=(k, t)))[..., 0]  # (K, T) log-probs
    base = np.log(rng.dirichlet(np.ones(5), size=t))[:, 0]
    w = np.array([0.5, 0.3, 0.2])
    brute = np.mean([base[j] - math.log(sum(w[i] * math.exp(members[i, j]) for i in range(k)))
                     for j in range(t)])  # fmt: skip
    assert novelty(members, base, np.log(w)) == pytest.approx(brute, abs=1e-12)
    assert mixture_token_logprobs(members, np.log(w)) == pytest.approx(
        [math.log(sum(w[i] * math.exp(members[i, j]) for i in range(k))) for j in range(t)]
    )


def test_novelty_limits() -> None:
    base = np.log(np.array([0.2, 0.5, 0.1]))
    lw = np.log([0.25] * 4)
    # members equal to the base: the adapters add nothing
    assert novelty(np.tile(base, (4, 1)), base, lw) == pytest.approx(0.0, abs=1e-12)
    # every member doubles each token's probability: novelty = −log 2 exactly
    assert novelty(np.tile(base + math.log(2), (4, 1)), base, lw) == pytest.approx(-math.log(2))
    # one member certain of every token, the others at the base
    sure = np.vstack([np.zeros(3), np.tile(base, (3, 1))])
    assert novelty(sure, base, lw) == pytest.approx(
        np.mean(base - np.log(0.25 + 0.75 * np.exp(base)))
    )
    assert novelty(np.zeros((4, 0)), [], lw) is None
    with pytest.raises(ValueError):
        mixture_token_logprobs(np.zeros((3, 2)), lw)  # K = 3 log-probs, 4 weights


def test_p_value_is_the_conformal_rank() -> None:
    cal = [0.1, 0.2, 0.2, 0.5, 0.9]
    for s in (-1.0, 0.1, 0.15, 0.2, 0.7, 0.9, 2.0):
        assert p_value(cal, s) == pytest.approx((1 + sum(c >= s for c in cal)) / 6)


def test_combined_is_one_minus_the_bonferroni_min_p_value() -> None:
    cal = GateCalibration(
        components=["a", "b"],
        scores={"a": [0.0, 1.0, 2.0, 3.0], "b": [10.0, 20.0, 30.0, 40.0]},
        n=4,
    )
    # a = 2.5 → p_a = (1 + 1) / 5; b = 5 → p_b = 1; combined = 1 − min(1, 2 · 0.4)
    assert combined_score(cal, {"a": 2.5, "b": 5.0}) == pytest.approx(1 - 0.8)
    assert combined_score(cal, {"a": 9.0, "b": 99.0}) == pytest.approx(1 - 2 * 0.2)
    # a missing component leaves the minimum and the factor
    assert combined_score(cal, {"a": 9.0, "b": None}) == pytest.approx(1 - 0.2)
    assert combined_score(cal, {"a": None, "b": None}) is None


def test_calibrated_gate_flags_the_requested_share_of_in_distribution() -> None:
    """Fitted on 300 in-distribution rows, the gate flags ≤ 5 % of 20,000 fresh ones, and
    most of a shifted (out-of-distribution) population."""
    rng = np.random.default_rng(1)
    rate = 0.05

    def rows(n: int, shift: float = 0.0) -> list[dict[str, float]]:
        x = rng.normal(size=(n, 2)) + shift
        return [{"prompt_novelty": float(a), "novelty": float(3 * b - 1)} for a, b in x]

    cal = fit_calibration(rows(300), ["prompt_novelty", "novelty"])
    thr = threshold_for_rate(rate)
    fresh = np.mean([combined_score(cal, r) > thr for r in rows(20_000)])  # type: ignore[operator]
    assert rate - 0.015 <= fresh <= rate + 0.005  # Bonferroni over 2: ≈ 1 − (1 − a/2)² ≈ 0.049
    shifted = np.mean([combined_score(cal, r) > thr for r in rows(2_000, shift=3.0)])  # type: ignore[operator]
    assert shifted > 0.9


def test_calibration_validation() -> None:
    with pytest.raises(ValueError, match="sorted"):
        GateCalibration(components=["a"], scores={"a": [2.0, 1.0]}, n=2)
    with pytest.raises(ValueError, match="no scores"):
        GateCalibration(components=["a", "b"], scores={"a": [1.0]}, n=1)
    with pytest.raises(ValueError, match="no in-distribution values"):
        fit_calibration([{"a": None}], ["a"])
    with pytest.raises(ValueError):
        threshold_for_rate(0.0)
