"""ensemble.math against naive loops, its limits, and property tests."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from ensemble.math import (
    align_top_logprobs,
    disagreement,
    mixture_logprob,
    renyi_loss,
    responsibilities,
    sequence_epistemic,
    token_uncertainty,
    update_mixture_weights,
)

RNG = np.random.default_rng(0)


def rand_weights(k: int, rng: np.random.Generator = RNG) -> np.ndarray:
    w = rng.dirichlet(np.ones(k))
    return np.log(w)


def rand_logdist(k: int, v: int, rng: np.random.Generator = RNG) -> np.ndarray:
    p = rng.dirichlet(np.ones(v) * 0.5, size=k)
    return np.log(p)


# ----------------------------------------------------------------------- naive versions


def naive_renyi(logp: list[float], alpha: float, w: list[float]) -> float:
    if alpha == 0:
        return -sum(wk * lk for wk, lk in zip(w, logp, strict=True))
    s = sum(wk * math.exp(alpha * lk) for wk, lk in zip(w, logp, strict=True))
    return -math.log(s) / alpha


def naive_resp(logp: list[float], alpha: float, w: list[float]) -> list[float]:
    num = [wk * math.exp(alpha * lk) for wk, lk in zip(w, logp, strict=True)]
    return [n / sum(num) for n in num]


def naive_entropy(p: list[float]) -> float:
    return -sum(x * math.log(x) for x in p if x > 0)


def naive_uncertainty(lq: np.ndarray, w: list[float]) -> tuple[float, float, float]:
    k, v = lq.shape
    q = [[math.exp(lq[i, j]) for j in range(v)] for i in range(k)]
    mix = [sum(w[i] * q[i][j] for i in range(k)) for j in range(v)]
    total = naive_entropy(mix)
    ale = sum(w[i] * naive_entropy(q[i]) for i in range(k))
    return total, ale, total - ale


# ----------------------------------------------------------------------- vs naive


@pytest.mark.parametrize("alpha", [0.0, 1e-3, 0.3, 1.0, 2.5])
@pytest.mark.parametrize("k", [1, 2, 5])
def test_renyi_loss_and_responsibilities_match_naive(alpha: float, k: int) -> None:
    lw = rand_weights(k)
    w = np.exp(lw).tolist()
    logp = RNG.uniform(-20, -0.1, size=(k, 7))
    got = renyi_loss(logp, alpha, lw)
    resp = responsibilities(logp, alpha, lw)
    assert got.shape == (7,) and resp.shape == (k, 7)
    for b in range(7):
        col = logp[:, b].tolist()
        assert got[b] == pytest.approx(naive_renyi(col, alpha, w), rel=1e-9, abs=1e-9)
        assert resp[:, b] == pytest.approx(naive_resp(col, alpha, w), rel=1e-9, abs=1e-12)
        single = renyi_loss(logp[:, b], alpha, lw)
        assert isinstance(single, float) and single == pytest.approx(got[b], rel=1e-12)


def test_mixture_logprob_matches_naive() -> None:
    lw = rand_weights(4)
    logp = RNG.uniform(-30, 0, size=(4, 5))
    got = mixture_logprob(logp, lw)
    for m in range(5):
        naive = math.log(sum(math.exp(lw[k] + logp[k, m]) for k in range(4)))
        assert got[m] == pytest.approx(naive, rel=1e-12)
    assert mixture_logprob(logp[:, 0], lw) == pytest.approx(got[0])


@pytest.mark.parametrize("k,v", [(1, 3), (3, 4), (4, 50)])
def test_token_uncertainty_matches_naive(k: int, v: int) -> None:
    lw = rand_weights(k)
    lq = rand_logdist(k, v)
    got = token_uncertainty(lq, lw)
    total, ale, epi = naive_uncertainty(lq, np.exp(lw).tolist())
    assert got["total"] == pytest.approx(total, abs=1e-10)
    assert got["aleatoric"] == pytest.approx(ale, abs=1e-10)
    assert got["epistemic"] == pytest.approx(epi, abs=1e-10)


def test_sequence_epistemic_matches_naive() -> None:
    k, m = 3, 7
    lw = rand_weights(k)
    w = np.exp(lw)
    L = RNG.uniform(-40, -1, size=(k, m))
    gen = np.array([0, 0, 1, 2, 2, 2, 1])
    lens = np.array([3, 5, 2, 8, 1, 4, 6])
    total = 0.0
    for member in range(k):
        terms = []
        for j in range(m):
            if gen[j] != member:
                continue
            mix = math.log(sum(w[i] * math.exp(L[i, j]) for i in range(k)))
            terms.append((L[member, j] - mix) / lens[j])
        total += w[member] * sum(terms) / len(terms)
    assert sequence_epistemic(L, gen, lens, lw) == pytest.approx(total, rel=1e-12)


def test_sequence_epistemic_renormalises_over_members_with_candidates() -> None:
    L = np.array([[-3.0, -4.0], [-5.0, -1.0], [-2.0, -2.0]])
    gen = np.array([0, 1])
    lens = np.array([1, 1])
    mix = mixture_logprob(L)
    expected = 0.5 * (L[0, 0] - mix[0]) + 0.5 * (L[1, 1] - mix[1])
    assert sequence_epistemic(L, gen, lens) == pytest.approx(expected)


def test_align_top_logprobs_documented_rule() -> None:
    tops = [
        {"a": math.log(0.5), "b": math.log(0.3)},  # rest 0.2, absent {c}
        {"a": math.log(0.6), "c": math.log(0.1)},  # rest 0.3, absent {b}
    ]
    out = align_top_logprobs(tops)
    assert out.shape == (2, 4)  # a, b, c, rest
    p = np.exp(out)
    # member 0: c gets min(0.2/2, 0.3) = 0.1; rest keeps 0.1
    assert p[0] == pytest.approx([0.5, 0.3, 0.1, 0.1])
    # member 1: b gets min(0.3/2, 0.1) = 0.1 (capped by its smallest top prob); rest 0.2
    assert p[1] == pytest.approx([0.6, 0.1, 0.1, 0.2])
    assert p.sum(axis=1) == pytest.approx([1.0, 1.0])


def test_align_top_logprobs_full_support_is_exact() -> None:
    lq = rand_logdist(3, 5)
    tops = [{j: lq[i, j] for j in range(5)} for i in range(3)]
    out = align_top_logprobs(tops)
    assert np.exp(out[:, :5]) == pytest.approx(np.exp(lq), abs=1e-12)
    assert np.exp(out[:, 5]) == pytest.approx(np.zeros(3), abs=1e-12)


# ----------------------------------------------------------------------- limits


def test_alpha_zero_is_exact_limit_and_continuous() -> None:
    lw = rand_weights(4)
    logp = RNG.uniform(-200, -1, size=(4, 6))
    exact = -(np.exp(lw)[:, None] * logp).sum(axis=0)
    assert renyi_loss(logp, 0.0, lw) == pytest.approx(exact, rel=1e-14)
    assert renyi_loss(logp, 1e-8, lw) == pytest.approx(exact, rel=1e-6)
    # first-order expansion: ℓ_α ≈ E[-log p] − (α/2) Var[log p]
    a = 1e-4
    var = (np.exp(lw)[:, None] * (logp + exact) ** 2).sum(axis=0)
    assert renyi_loss(logp, a, lw) == pytest.approx(exact - a / 2 * var, rel=1e-5)
    assert responsibilities(logp, 0.0, lw) == pytest.approx(
        np.broadcast_to(np.exp(lw)[:, None], logp.shape)
    )


def test_alpha_one_is_mixture_nll() -> None:
    lw = rand_weights(3)
    logp = RNG.uniform(-50, -1, size=(3, 4))
    assert renyi_loss(logp, 1.0, lw) == pytest.approx(-mixture_logprob(logp, lw), rel=1e-12)


def test_loss_non_increasing_in_alpha() -> None:
    logp = RNG.uniform(-60, -0.5, size=(5, 20))
    alphas = [0.0, 1e-6, 0.01, 0.1, 0.5, 1.0, 2.0, 10.0]
    losses = np.stack([renyi_loss(logp, a) for a in alphas])
    assert (np.diff(losses, axis=0) <= 1e-9).all()


def test_single_or_identical_members_have_no_epistemic() -> None:
    lq = rand_logdist(1, 10)
    assert token_uncertainty(lq)["epistemic"] == 0.0
    same = np.repeat(rand_logdist(1, 10), 4, axis=0)
    lw = rand_weights(4)
    u = token_uncertainty(same, lw)
    assert u["epistemic"] == pytest.approx(0.0, abs=1e-12)
    assert u["total"] == pytest.approx(u["aleatoric"])
    logp = np.full((4, 3), -7.5)
    assert responsibilities(logp, 1.0, lw) == pytest.approx(
        np.broadcast_to(np.exp(lw)[:, None], (4, 3))
    )
    L = np.full((4, 4), -12.0)
    assert sequence_epistemic(L, np.arange(4), np.full(4, 5), lw) == pytest.approx(0.0, abs=1e-12)
    assert disagreement(["Paris.", " paris. ", "PARIS.", "paris."]) == 0.0


def test_zero_probability_member_is_handled() -> None:
    logp = np.array([-np.inf, -2.0, -3.0])
    assert renyi_loss(logp, 0.0) == math.inf
    loss = renyi_loss(logp, 1.0)
    assert loss == pytest.approx(-math.log((math.exp(-2) + math.exp(-3)) / 3))
    assert math.isfinite(renyi_loss(logp, 1e-6))
    w = responsibilities(logp, 0.7)
    assert w[0] == 0.0 and w.sum() == pytest.approx(1.0)
    # every member at zero probability: fall back to π
    assert responsibilities(np.full(3, -np.inf), 1.0) == pytest.approx(np.full(3, 1 / 3))
    # a token with zero probability under one member
    with np.errstate(divide="ignore"):
        lq = np.log(np.array([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]]))
    u = token_uncertainty(lq)
    total, _ale, epi = naive_uncertainty(lq, [0.5, 0.5])
    assert u["epistemic"] == pytest.approx(epi) and u["total"] == pytest.approx(total)


def test_disagreement_fraction_of_pairs() -> None:
    assert disagreement(["yes", "Yes ", "no", "no"]) == pytest.approx(4 / 6)
    assert disagreement(["a  b", "A B"]) == 0.0
    assert disagreement(["x"]) == 0.0
    naive = ["a", "b", "a", "c", "b"]
    pairs = list(itertools.combinations(naive, 2))
    assert disagreement(naive) == pytest.approx(sum(x != y for x, y in pairs) / len(pairs))


def test_update_mixture_weights_floor_and_smoothing() -> None:
    pi = update_mixture_weights([1.0, 0.0, 0.0, 0.0], smoothing=0.0, floor=0.05)
    assert pi.sum() == pytest.approx(1.0)
    assert pi.min() >= 0.05 / (1 + 3 * 0.05) - 1e-12
    assert update_mixture_weights([0.25] * 4) == pytest.approx([0.25] * 4)


# ----------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: renyi_loss([-1.0, np.nan], 1.0), "NaN"),
        (lambda: renyi_loss([-1.0, -2.0], -0.5), "alpha"),
        (lambda: renyi_loss(np.zeros((2, 2, 2)), 1.0), "shape"),
        (lambda: renyi_loss([-1.0, np.inf], 1.0), r"\+inf"),
        (lambda: responsibilities([-1.0, -2.0], 1.0, np.log([0.3, 0.3])), "sum to 1"),
        (lambda: responsibilities([-1.0, -2.0], 1.0, np.log([0.5, 0.2, 0.3])), "shape"),
        (lambda: token_uncertainty(np.log([[0.5, 0.2]])), "log-distribution"),
        (lambda: sequence_epistemic(np.zeros((2, 2)), [0, 2], [1, 1]), "member indices"),
        (lambda: sequence_epistemic(np.zeros((2, 2)), [0, 1], [0, 1]), "length"),
        (lambda: align_top_logprobs([]), "one"),
        (lambda: align_top_logprobs([{"a": 0.5}]), "<= 0"),
        (lambda: disagreement([]), "at least one"),
    ],
)
def test_bad_input_raises_clear_value_error(call, match: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=match):
        call()


# ----------------------------------------------------------------------- properties

logps = st.integers(1, 6).flatmap(
    lambda k: arrays(
        np.float64,
        (k, 3),
        elements=st.floats(-1e4, 0.0, allow_nan=False, allow_infinity=False),
    )
)
alphas = st.floats(0.0, 5.0, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(logp=logps, alpha=alphas)
def test_responsibilities_sum_to_one_and_loss_is_finite(logp: np.ndarray, alpha: float) -> None:
    w = responsibilities(logp, alpha)
    assert np.isfinite(w).all() and (w >= 0).all()
    assert w.sum(axis=0) == pytest.approx(np.ones(3), abs=1e-12)
    loss = renyi_loss(logp, alpha)
    assert np.isfinite(loss).all()
    # the loss lies between the best member's NLL and the π-average NLL
    assert (loss >= -logp.max(axis=0) - 1e-6 * (1 + np.abs(loss))).all()
    assert (loss <= -logp.mean(axis=0) + 1e-6 * (1 + np.abs(loss))).all()


@settings(max_examples=200, deadline=None)
@given(
    k=st.integers(1, 5),
    v=st.integers(2, 12),
    seed=st.integers(0, 2**32 - 1),
    conc=st.floats(0.01, 10.0),
)
def test_decomposition_identities(k: int, v: int, seed: int, conc: float) -> None:
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(v, conc), size=k)
    with np.errstate(divide="ignore"):
        lq = np.log(p)
    lw = np.log(rng.dirichlet(np.ones(k)))
    u = token_uncertainty(lq, lw)
    # each term against its own naive loop: H(q̄), Σπ H(q_k), and H(q̄) − Σπ H(q_k)
    total, ale, epi = naive_uncertainty(lq, np.exp(lw).tolist())
    assert u["total"] == pytest.approx(total, abs=1e-9)
    assert u["aleatoric"] == pytest.approx(ale, abs=1e-9)
    assert u["epistemic"] == pytest.approx(epi, abs=1e-9)


@settings(max_examples=200, deadline=None)
@given(
    k=st.integers(1, 4),
    n=st.integers(1, 6),
    seed=st.integers(0, 2**32 - 1),
    scale=st.sampled_from([1.0, 30.0, 1e4]),
)
def test_aligned_top_logprobs_are_distributions_with_nonnegative_mi(
    k: int, n: int, seed: int, scale: float
) -> None:
    rng = np.random.default_rng(seed)
    vocab = 10
    tops = []
    for _ in range(k):
        logits = rng.normal(size=vocab) * scale
        lp = logits - np.logaddexp.reduce(logits)
        ids = np.argsort(-lp)[:n]
        tops.append({int(t): float(lp[t]) for t in ids})
    out = align_top_logprobs(tops)
    assert np.exp(out).sum(axis=1) == pytest.approx(np.ones(k), abs=1e-9)
    # each member keeps its own top-n log-probs exactly on the shared support
    union = list(dict.fromkeys(tok for top in tops for tok in top))  # first appearance
    for row, top in zip(out, tops, strict=True):
        for tok, lp in top.items():
            assert row[union.index(tok)] == pytest.approx(lp, abs=1e-9)
    u = token_uncertainty(out)
    total, ale, epi = naive_uncertainty(out, [1.0 / k] * k)
    assert (u["total"], u["aleatoric"], u["epistemic"]) == pytest.approx(
        (total, ale, epi), abs=1e-9
    )


@pytest.mark.parametrize("alpha", [5e-324, 1e-300, 1e-20, 1e-9, 1e-4])
def test_loss_at_tiny_alpha_matches_high_precision(alpha: float) -> None:
    """Down to subnormal α (hypothesis found 5e-324 giving twice the mean NLL): the loss
    equals −(1/α)·log Σπ e^{α l} computed with 400 significant digits."""
    from decimal import Decimal, getcontext

    getcontext().prec = 400
    lp = np.array([[-3.0, -1.5], [0.0, -0.2], [-0.5, -7.0]])
    a = Decimal(alpha)
    for b in range(2):
        s = sum(Decimal(1) / 3 * (a * Decimal(float(v))).exp() for v in lp[:, b])
        ref = float(-s.ln() / a)
        assert renyi_loss(lp, alpha)[b] == pytest.approx(ref, rel=1e-14, abs=1e-14)
