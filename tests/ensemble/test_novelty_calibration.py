"""Base-relative scores and the calibrated `combined` gate score against brute force."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from ensemble.calibration import (
    GateCalibration,
    beta_quantile,
    binomial_cdf,
    combined_score,
    fit_calibration,
    fit_conformal_gate,
    fit_risk_control,
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


def naive_combined(cal: GateCalibration, u: dict) -> float | None:
    """The definition written out with loops: discrete p-values, Bonferroni, tie-break."""
    ps = {}
    for c in cal.components:
        if u.get(c) is None:
            continue
        ref, s = cal.scores[c], u[c]
        ps[c] = (1 + sum(1 for x in ref if x >= s)) / (len(ref) + 1)
    if not ps:
        return None
    p = min(ps.values())
    taus = []
    for c in (k for k in ps if ps[k] == p):  # ties: the component whose score sits highest
        ref, s = cal.scores[c], u[c]
        below = [x for x in ref if x < s]
        above = [x for x in ref if x >= s]
        if not below:
            taus.append(-0.5)
        elif not above:
            taus.append(-0.5 * math.exp(-(s - max(ref)) / (max(ref) - min(ref))))
        else:
            lo, hi = max(below), min(above)
            taus.append(-0.5 * (1 - (s - lo) / (hi - lo)))
    tau = max(taus)
    return max(0.0, 1 - min(1.0, len(ps) * p) + tau / (cal.n + 1))


def test_combined_matches_the_definition_written_out() -> None:
    cal = GateCalibration(
        components=["a", "b"],
        scores={"a": [0.0, 1.0, 2.0, 3.0], "b": [10.0, 20.0, 30.0, 40.0]},
        n=4,
    )
    # a = 2.5 → p_a = 2/5, halfway between 2 and 3 → τ = −¼; b = 5 → p_b = 1;
    # combined = 1 − 2 · 0.4 − ¼ / 5
    assert combined_score(cal, {"a": 2.5, "b": 5.0}) == pytest.approx(0.2 - 0.05)
    # beyond every calibration score: p = 1/5 each, τ = −½·e^(−6/3) for a
    assert combined_score(cal, {"a": 9.0, "b": 99.0}) == pytest.approx(
        1 - 2 * 0.2 - 0.5 * math.exp(-2.0) / 5
    )
    # a missing component leaves the minimum and the Bonferroni factor
    assert combined_score(cal, {"a": 9.0, "b": None}) == pytest.approx(
        1 - 0.2 - 0.5 * math.exp(-2.0) / 5
    )
    assert combined_score(cal, {"a": None, "b": None}) is None
    rng = np.random.default_rng(0)
    for a, b in rng.normal(scale=[2.0, 20.0], loc=[1.5, 25.0], size=(500, 2)):
        u = {"a": float(a), "b": float(b)}
        assert combined_score(cal, u) == pytest.approx(naive_combined(cal, u))


def test_tie_break_orders_scores_without_adding_flags() -> None:
    """combined is non-decreasing in the score, and at every attainable level L the snapped
    threshold flags exactly the prompts with discrete p ≤ L."""
    rng = np.random.default_rng(2)
    cal = fit_calibration([{"s": float(x)} for x in rng.normal(size=39)], ["s"])
    grid = np.linspace(-4, 6, 4001)
    comb = [combined_score(cal, {"s": float(s)}) for s in grid]
    assert all(b >= a for a, b in itertools.pairwise(comb))  # type: ignore[operator]
    above_all = [c for s, c in zip(grid, comb, strict=True) if s > cal.scores["s"][-1]]
    assert len(set(above_all)) == len(above_all)  # no ties beyond the largest score
    for j in range(1, 6):
        thr = threshold_for_rate(j / 40 + 1e-6, cal)
        for s, c in zip(grid, comb, strict=True):
            assert (c > thr) == (p_value(cal.scores["s"], float(s)) <= j / 40)  # type: ignore[operator]
        assert (np.array(comb) > 1 - (j / 40 + 0.001)).sum() <= (  # type: ignore[operator]
            np.array([p_value(cal.scores["s"], float(s)) < j / 40 + 0.001 for s in grid]).sum()
        )


def test_calibrated_gate_flags_the_requested_share_of_in_distribution() -> None:
    """Fitted on 300 in-distribution rows, the gate flags ≤ 5 % of 20,000 fresh ones, and
    most of a shifted (out-of-distribution) population."""
    rng = np.random.default_rng(1)
    rate = 0.05

    def rows(n: int, shift: float = 0.0) -> list[dict[str, float]]:
        x = rng.normal(size=(n, 2)) + shift
        return [{"prompt_novelty": float(a), "novelty": float(3 * b - 1)} for a, b in x]

    cal, thr = fit_conformal_gate(rows(300), ["prompt_novelty", "novelty"], rate)
    assert cal.level == pytest.approx(2 * 7 / 301)  # m·⌊0.05 · 301 / 2⌋ / 301
    fresh = np.mean([combined_score(cal, r) > thr for r in rows(20_000)])  # type: ignore[operator]
    assert rate - 0.015 <= fresh <= rate + 0.005  # Bonferroni over 2: ≈ 1 − (1 − a/2)² ≈ 0.049
    shifted = np.mean([combined_score(cal, r) > thr for r in rows(2_000, shift=3.0)])  # type: ignore[operator]
    assert shifted > 0.9


def test_binomial_and_beta_against_brute_force() -> None:
    for n, p in ((7, 0.3), (12, 0.05), (1, 0.9)):
        pmf = [math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(n + 1)]
        for k in range(-1, n + 2):
            assert binomial_cdf(k, n, p) == pytest.approx(sum(pmf[: max(0, k + 1)]))
    rng = np.random.default_rng(3)
    draws = rng.beta(2, 31, size=200_000)
    for q in (0.5, 0.9, 0.99):
        assert beta_quantile(q, 2, 31) == pytest.approx(np.quantile(draws, q), rel=0.02)


def test_pac_bound_holds_over_calibration_draws() -> None:
    """Across 400 calibration draws of n = 32 (rate 5 %, δ = 0.1) the true in-distribution
    flag rate (known: scores are N(0, 1)) exceeds pac_bound in about δ of the draws, never
    far more, and its mean is about the level 1/33."""
    rng = np.random.default_rng(4)
    true_rates, exceed = [], 0
    for _ in range(400):
        cal, _ = fit_conformal_gate(
            [{"s": float(x)} for x in rng.normal(size=32)], ["s"], 0.05, delta=0.1
        )
        top = cal.scores["s"][-1]  # level 1/33 flags exactly the scores above the largest
        rate = 0.5 * math.erfc(top / math.sqrt(2))
        true_rates.append(rate)
        exceed += rate > cal.pac_bound  # type: ignore[operator]
    assert cal.level == pytest.approx(1 / 33) and cal.pac_bound == pytest.approx(
        beta_quantile(0.9, 1, 32)
    )
    assert np.mean(true_rates) == pytest.approx(1 / 33, abs=0.006)
    assert 0.05 <= exceed / 400 <= 0.15


def test_risk_control_certifies_the_error_among_passed_answers() -> None:
    """Errors grow with the score; over 200 draws the certified threshold's true error
    among passed answers exceeds the target in at most about δ of them."""
    rng = np.random.default_rng(5)

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        s = rng.uniform(size=n)
        return s, rng.uniform(size=n) < 0.5 * s  # P(error | s) = s/2

    target, delta, bad, covs = 0.15, 0.1, 0, []
    for _ in range(200):
        s, e = draw(1000)
        rc = fit_risk_control(s.tolist(), e.tolist(), target, score_name="x", delta=delta)
        lam = min(rc.threshold, 1.0)
        true_err = 0.25 * lam  # E[s/2 | s ≤ λ] for s ~ U(0, 1)
        bad += true_err > target
        covs.append(rc.coverage)
        passed = s <= rc.threshold
        assert rc.coverage == pytest.approx(passed.mean())
        assert rc.error_rate == pytest.approx(e[passed].mean())
    assert bad / 200 <= delta
    assert 0.3 < np.mean(covs) < 0.6  # the exact frontier is coverage 0.6 (error 0.15)
    assert binomial_cdf(300, 2000, 0.15) == pytest.approx(0.5, abs=0.02)  # no overflow
    with pytest.raises(ValueError, match="no threshold"):
        fit_risk_control([0.1, 0.2, 0.3], [False, False, False], 0.05, score_name="x")


def test_calibration_validation() -> None:
    with pytest.raises(ValueError, match="sorted"):
        GateCalibration(components=["a"], scores={"a": [2.0, 1.0]}, n=2)
    with pytest.raises(ValueError, match="no scores"):
        GateCalibration(components=["a", "b"], scores={"a": [1.0]}, n=1)
    with pytest.raises(ValueError, match="no in-distribution values"):
        fit_calibration([{"a": None}], ["a"])
    with pytest.raises(ValueError):
        threshold_for_rate(0.0)


def test_pac_bound_with_two_components_uses_each_components_own_steps() -> None:
    """m = 2: flagging m·min p ≤ L = 2·7/301 flags each component above its 7th-largest
    score, so the bound is 2 × the (1 − δ/2) quantile of Beta(7, 294) (above the level)."""
    rng = np.random.default_rng(6)
    rows = [{"a": float(x), "b": float(y)} for x, y in rng.normal(size=(300, 2))]
    cal, _ = fit_conformal_gate(rows, ["a", "b"], 0.05, delta=0.1)
    assert cal.level == pytest.approx(14 / 301)
    assert cal.pac_bound == pytest.approx(2 * beta_quantile(0.95, 7, 294))
    assert cal.pac_bound > cal.level  # type: ignore[operator]
