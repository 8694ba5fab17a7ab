"""The α-Rényi ensemble math: loss, soft routing, mixtures and uncertainty (numpy only).

Reference: "Soft Specialists: α-Rényi Ensembles for Uncertainty-Aware LLM Post-Training",
arXiv 2605.27747 (2026); the definitions and sign conventions are in docs/math.md.

Conventions used throughout:

* ``logp`` holds sequence log-likelihoods ``log p_k(y|x)`` in nats, members on axis 0:
  shape ``(K,)`` for one example or ``(K, B)`` for a batch.
* ``log_weights`` are the log mixture weights ``log π_k``, shape ``(K,)``; ``None`` means
  uniform. They must be normalised (``Σ π_k = 1``).
* Uncertainties are in nats; higher means more uncertain.
* ``-inf`` log-probabilities (probability 0) are allowed; NaN and ``+inf`` are not.

Every function validates its inputs and raises :class:`ValueError` saying what is wrong.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "align_top_logprobs",
    "disagreement",
    "entropy",
    "mixture_logprob",
    "normalize_answer",
    "preference_logprob",
    "renyi_loss",
    "responsibilities",
    "sequence_epistemic",
    "token_uncertainty",
    "token_uncertainty_many",
    "update_mixture_weights",
]

FloatArray = NDArray[np.float64]

# How far Σπ may be from 1, and a row of probabilities from summing to 1, before we refuse.
_WEIGHT_TOL = 1e-6
_ROW_TOL = 1e-3


# --------------------------------------------------------------------------- validation


def _as_logp(logp: ArrayLike, name: str = "logp") -> FloatArray:
    """``logp`` as a float64 array of shape (K,) or (K, B); no NaN, no +inf."""
    arr = np.asarray(logp, dtype=np.float64)
    if arr.ndim not in (1, 2) or arr.shape[0] < 1 or arr.size == 0:
        raise ValueError(f"{name} must have shape (K,) or (K, B) with K >= 1, got {arr.shape}")
    if np.isnan(arr).any():
        raise ValueError(f"{name} contains NaN")
    if np.isposinf(arr).any():
        raise ValueError(f"{name} contains +inf; log-probabilities must be <= 0 or -inf")
    return arr


def _check_alpha(alpha: float) -> float:
    a = float(alpha)
    if not np.isfinite(a) or a < 0:
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
    return a


def _log_weights(log_weights: ArrayLike | None, k: int) -> FloatArray:
    """Validated log mixture weights of shape (K,); uniform when ``None``."""
    if log_weights is None:
        return np.full(k, -np.log(k))
    lw = np.asarray(log_weights, dtype=np.float64)
    if lw.shape != (k,):
        raise ValueError(f"log_weights must have shape ({k},), got {lw.shape}")
    if np.isnan(lw).any() or np.isposinf(lw).any():
        raise ValueError("log_weights must be finite log-probabilities (or -inf)")
    total = float(np.exp(lw).sum())
    if abs(total - 1.0) > _WEIGHT_TOL:
        raise ValueError(f"mixture weights must sum to 1, got {total:.8f}")
    return lw


def _bcast(lw: FloatArray, arr: FloatArray) -> FloatArray:
    """Reshape (K,) weights to broadcast against (K,) or (K, B)."""
    return lw if arr.ndim == 1 else lw[:, None]


def _logsumexp(a: FloatArray, axis: int = 0) -> FloatArray:
    """Stable log Σ exp along ``axis``; all ``-inf`` gives ``-inf`` (no warnings)."""
    m = np.max(a, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        out = np.log(np.sum(np.exp(a - m), axis=axis, keepdims=True)) + m
    return np.squeeze(out, axis=axis)


def _scalar_or_array(x: FloatArray) -> Any:
    return float(x) if np.ndim(x) == 0 else x


# --------------------------------------------------------------------------- training


def renyi_loss(logp: ArrayLike, alpha: float, log_weights: ArrayLike | None = None) -> Any:
    """Per-example α-Rényi ensemble loss (nats; lower is better).

        ℓ_α(x, y) = −(1/α) · log Σ_k π_k p_k(y|x)^α
                  = −(1/α) · logsumexp_k(log π_k + α log p_k(y|x))

    α = 0 is the exact limit ``−Σ_k π_k log p_k`` (independent members); α = 1 is the
    mixture negative log-likelihood ``−log Σ_k π_k p_k``. ℓ_α is non-increasing in α.

    Args:
        logp: sequence log-likelihoods, (K,) or (K, B).
        alpha: α >= 0.
        log_weights: log π, (K,); ``None`` = uniform.

    Returns:
        a float for (K,) input, an array (B,) for (K, B) input.
    """
    lp = _as_logp(logp)
    a = _check_alpha(alpha)
    lw = _bcast(_log_weights(log_weights, lp.shape[0]), lp)
    pi = np.exp(lw)
    live = pi > 0
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        mean = np.where(live, pi * lp, 0.0).sum(axis=0)  # E_π[log p]
        if a == 0.0:
            return _scalar_or_array(-mean)
        direct = -_logsumexp(lw + a * lp, axis=0) / a
        # Small α·spread: log Σπ e^{αl} = αm + log1p(Σπ expm1(α(l−m))), m = E_π[l], keeps
        # full precision where the plain logsumexp loses it to cancellation (α → 0).
        finite = np.isfinite(mean)
        dev = a * (lp - np.where(finite, mean, 0.0))
        spread = np.where(live, np.abs(dev), 0.0).max(axis=0)
        small = finite & (spread < 1.0)
        dev = np.where(small & live, dev, 0.0)
        series = -mean - np.log1p((pi * np.expm1(dev)).sum(axis=0)) / a
        # Tiny α·spread (down to subnormal α, where α·(l−m) itself loses its digits): the
        # Taylor form −m − (α/2)·Var_π(l), exact to O(α²·spread³) below float precision.
        centred = np.where(live & finite, lp - np.where(finite, mean, 0.0), 0.0)
        taylor = -mean - 0.5 * a * (pi * centred**2).sum(axis=0)
        tiny = finite & (spread < 1e-8)
    return _scalar_or_array(np.where(tiny, taylor, np.where(small, series, direct)))


def responsibilities(
    logp: ArrayLike, alpha: float, log_weights: ArrayLike | None = None
) -> FloatArray:
    """Soft routing weights of each example to each member (sum to 1 over members).

        w_k(x, y) = softmax_k(log π_k + α log p_k(y|x))

    so that ∂ℓ_α/∂θ_k = −w_k ∂log p_k/∂θ_k. At α = 0 they are exactly π. A column where
    every member has probability 0 (all ``-inf``) falls back to π.

    Returns:
        an array of the same shape as ``logp``.
    """
    lp = _as_logp(logp)
    a = _check_alpha(alpha)
    lw = _bcast(_log_weights(log_weights, lp.shape[0]), lp)
    if a == 0.0:
        return np.broadcast_to(np.exp(lw), lp.shape).copy()
    z = lw + a * lp
    top = np.max(z, axis=0, keepdims=True)
    dead = ~np.isfinite(top)
    with np.errstate(invalid="ignore"):
        e = np.exp(z - np.where(dead, 0.0, top))
        w = e / np.sum(e, axis=0, keepdims=True)
    return np.where(dead, np.exp(lw) * np.ones_like(lp), w)


def mixture_logprob(logp: ArrayLike, log_weights: ArrayLike | None = None) -> Any:
    """Log-likelihood under the mixture: ``log Σ_k π_k p_k`` = logsumexp over members.

    (K,) -> float, (K, M) -> (M,).
    """
    lp = _as_logp(logp)
    lw = _bcast(_log_weights(log_weights, lp.shape[0]), lp)
    return _scalar_or_array(_logsumexp(lw + lp, axis=0))


def preference_logprob(margin: ArrayLike) -> FloatArray:
    """``log σ(h)``: the log-likelihood of a preference under a DPO margin h (stable)."""
    h = np.asarray(margin, dtype=np.float64)
    if np.isnan(h).any():
        raise ValueError("margin contains NaN")
    return -np.logaddexp(0.0, -h)


def update_mixture_weights(
    mean_responsibility: ArrayLike, *, smoothing: float = 0.1, floor: float = 0.05
) -> FloatArray:
    """EM-style update of π from the mean α = 1 responsibilities, with smoothing and a floor.

        π ← normalise(max(floor, (1 − s)·r̄ + s/K))

    The floor keeps every member alive (a member at π = 0 would never receive data again).
    """
    r = np.asarray(mean_responsibility, dtype=np.float64)
    if r.ndim != 1 or r.size < 1 or np.isnan(r).any() or (r < 0).any():
        raise ValueError(f"mean_responsibility must be a non-negative (K,) vector, got {r}")
    if not 0.0 <= smoothing <= 1.0:
        raise ValueError(f"smoothing must be in [0, 1], got {smoothing}")
    k = r.size
    if not 0.0 <= floor <= 1.0 / k:
        raise ValueError(f"floor must be in [0, 1/K] = [0, {1.0 / k:.4f}], got {floor}")
    r = r / r.sum() if r.sum() > 0 else np.full(k, 1.0 / k)
    pi = np.maximum(floor, (1.0 - smoothing) * r + smoothing / k)
    return pi / pi.sum()


# --------------------------------------------------------------------------- uncertainty


def entropy(logprobs: ArrayLike) -> FloatArray:
    """Shannon entropy (nats) of log-distributions along the last axis; 0·log 0 = 0."""
    lq = np.asarray(logprobs, dtype=np.float64)
    q = np.exp(lq)
    with np.errstate(invalid="ignore"):
        terms = np.where(q > 0, q * lq, 0.0)
    return np.asarray(-terms.sum(axis=-1))


def _as_distributions(logprobs: ArrayLike) -> FloatArray:
    """(T, K, V) log-distributions, each renormalised after checking it sums to ~1."""
    lq = np.asarray(logprobs, dtype=np.float64)
    if lq.ndim != 3 or 0 in lq.shape:
        raise ValueError(f"logprobs must have shape (K, V) or (T, K, V), got {lq.shape}")
    if np.isnan(lq).any() or np.isposinf(lq).any():
        raise ValueError("logprobs contains NaN or +inf")
    norm = _logsumexp(lq, axis=2)  # (T, K)
    if not np.all(np.abs(np.expm1(norm)) <= _ROW_TOL):
        raise ValueError(
            "each row of logprobs must be a log-distribution summing to 1 "
            f"(got sums {np.round(np.exp(norm), 6).ravel().tolist()[:8]}); "
            "use align_top_logprobs for top-N"
        )
    return lq - norm[..., None]


def token_uncertainty_many(
    logprobs: ArrayLike, log_weights: ArrayLike | None = None
) -> dict[str, FloatArray]:
    """:func:`token_uncertainty` at T positions at once: (T, K, V) -> three (T,) arrays.

    Positions with different supports can be stacked by padding with ``-inf`` columns
    (probability 0), which change nothing.
    """
    lq = _as_distributions(logprobs)  # (T, K, V)
    lw = _log_weights(log_weights, lq.shape[1])
    pi = np.exp(lw)
    mix = _logsumexp(lw[None, :, None] + lq, axis=1)  # (T, V) log q̄
    q = np.exp(lq)
    with np.errstate(invalid="ignore"):
        h = -np.where(q > 0, q * lq, 0.0).sum(axis=2)  # (T, K) member entropies
        kl = np.where(q > 0, q * (lq - mix[:, None, :]), 0.0).sum(axis=2)  # (T, K)
    aleatoric = h @ pi
    epistemic = np.maximum(kl @ pi, 0.0)
    return {"total": aleatoric + epistemic, "aleatoric": aleatoric, "epistemic": epistemic}


def token_uncertainty(
    logprobs: ArrayLike, log_weights: ArrayLike | None = None
) -> dict[str, float]:
    """Decompose the predictive uncertainty at one position (nats; higher = more uncertain).

        total     = H(q̄),  q̄ = Σ_k π_k q_k
        aleatoric = Σ_k π_k H(q_k)
        epistemic = total − aleatoric = Σ_k π_k KL(q_k ‖ q̄)  (mutual information, ≥ 0)

    Epistemic is computed as the π-weighted KL (exact, no cancellation when members nearly
    agree) and ``total`` is reported as ``aleatoric + epistemic`` so the identity is exact.

    Args:
        logprobs: (K, V), each row a log-distribution over a common support.
    """
    lq = np.asarray(logprobs, dtype=np.float64)
    if lq.ndim != 2:
        raise ValueError(f"logprobs must have shape (K, V), got {lq.shape}")
    many = token_uncertainty_many(lq[None], log_weights)
    return {key: float(v[0]) for key, v in many.items()}


def align_top_logprobs(tops: Sequence[Mapping[Any, float]]) -> FloatArray:
    """Put K members' top-N log-probs at one position on a common support.

    Returns a (K, U + 1) array of log-probabilities: one column per token in the union U
    of the members' top-N lists (in order of first appearance), plus a last "rest" column.
    Every row is a proper distribution:

    * a token in member k's list keeps its log-prob;
    * member k's missing mass R_k = 1 − Σ_top p is shared between the union tokens absent
      from its list and its rest bucket: each absent token gets
      ``min(R_k / (n_absent + 1), p_min_k)`` — an equal share, capped at the smallest
      probability in k's list, since a token outside the top-N cannot be more likely than
      one inside it — and the rest bucket holds what remains.

    So the decomposition of :func:`token_uncertainty` applies exactly (epistemic ≥ 0).
    """
    if len(tops) == 0:
        raise ValueError("tops must hold one {token: logprob} dict per member, got none")
    union: dict[Any, int] = {}
    for top in tops:
        if len(top) == 0:
            raise ValueError("every member needs at least one top log-prob")
        for tok in top:
            union.setdefault(tok, len(union))
    k, u = len(tops), len(union)
    out = np.full((k, u + 1), -np.inf)
    for i, top in enumerate(tops):  # plain floats: this runs per token on the hot path
        lps = [float(v) for v in top.values()]
        if any(v != v or v > 1e-6 for v in lps):
            raise ValueError(f"member {i}: log-probs must be <= 0 and not NaN, got {lps}")
        lps = [min(v, 0.0) for v in lps]
        probs = [math.exp(v) for v in lps]
        mass = sum(probs)
        if mass > 1.0:  # rounding in the server's float32: renormalise
            lps = [v - math.log(mass) for v in lps]
            probs = [p / mass for p in probs]
            mass = 1.0
        rest = max(1.0 - mass, 0.0)
        absent = [j for tok, j in union.items() if tok not in top]
        share = min(rest / (len(absent) + 1), min(probs)) if absent else 0.0
        row = out[i]
        for tok, v in zip(top, lps, strict=True):
            row[union[tok]] = v
        if absent and share > 0.0:
            row[absent] = math.log(share)
        left = rest - share * len(absent)
        if left > 0.0:
            row[u] = math.log(left)
    return out


def sequence_epistemic(
    L: ArrayLike,
    generator: ArrayLike,
    lengths: ArrayLike,
    log_weights: ArrayLike | None = None,
) -> float:
    """Sequence-level epistemic uncertainty from cross-scored candidates (nats per token).

        log p̄(y_m) = logsumexp_k(log π_k + L[k, m])
        SE = Σ_k π_k · mean_{m: g(m)=k} (L[k, m] − log p̄(y_m)) / |y_m|

    A Monte-Carlo estimate of Σ_k π_k KL(p_k ‖ p̄), the mutual information between member
    and answer, normalised per token; higher = members disagree more. Members without a
    candidate are left out and π is renormalised over the rest.

    Args:
        L: (K, M) cross-scores, L[k, m] = log p_k(y_m | x).
        generator: (M,) the member index that generated each candidate.
        lengths: (M,) token counts |y_m| >= 1.
    """
    lp = _as_logp(L, "L")
    if lp.ndim != 2:
        raise ValueError(f"L must have shape (K, M), got {lp.shape}")
    k, m = lp.shape
    gen = np.asarray(generator)
    lens = np.asarray(lengths, dtype=np.float64)
    if gen.shape != (m,) or lens.shape != (m,):
        raise ValueError(f"generator and lengths must have shape ({m},)")
    if not np.issubdtype(gen.dtype, np.integer) or (gen < 0).any() or (gen >= k).any():
        raise ValueError(f"generator must hold member indices in [0, {k})")
    if (lens < 1).any() or np.isnan(lens).any():
        raise ValueError("every candidate length must be >= 1 token")
    lw = _log_weights(log_weights, k)
    mix = _logsumexp(lw[:, None] + lp, axis=0)  # (M,)
    total, mass = 0.0, 0.0
    for member in range(k):
        cols = np.flatnonzero(gen == member)
        if cols.size == 0:
            continue
        pi = float(np.exp(lw[member]))
        with np.errstate(invalid="ignore"):
            terms = (lp[member, cols] - mix[cols]) / lens[cols]
        total += pi * float(np.mean(terms))
        mass += pi
    if mass == 0.0:
        raise ValueError("no candidate comes from a member with non-zero weight")
    return total / mass


def normalize_answer(text: str) -> str:
    """Normalisation for answer comparison: strip, case-fold, collapse whitespace."""
    return " ".join(text.split()).casefold()


def disagreement(answers: Sequence[str]) -> float:
    """Fraction of member pairs whose normalised answers differ (0 for a single answer)."""
    if len(answers) == 0:
        raise ValueError("disagreement needs at least one answer")
    norm = [normalize_answer(a) for a in answers]
    k = len(norm)
    if k == 1:
        return 0.0
    differ = sum(norm[i] != norm[j] for i in range(k) for j in range(i + 1, k))
    return differ / (k * (k - 1) / 2)
