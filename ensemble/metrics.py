"""Evaluation metrics for uncertainty scores (numpy only).

Conventions used throughout:

* ``scores`` are uncertainty scores: **higher = more uncertain**. They may be ±inf (a
  ranking is still defined) but not NaN.
* ``labels`` are binary (0/1 or bool): 1 is the positive class to detect, e.g. "out of
  distribution" or "the answer is wrong".
* ``errors`` are per-example losses in [0, 1] (1 = wrong, 0 = right; fractional allowed);
  ``correct`` is the opposite, in [0, 1]; ``confidences`` are in [0, 1].
* Every input is a 1-D array of one value per example, except responsibilities, (N, K).
* Ties in ``scores`` never depend on input order: AUROC counts a tied pair as 1/2, and the
  rejection curves average over every ordering of a tie group (see :func:`_tie_sorted`).
* Entropies and mutual information are in nats.

Every function validates its inputs and raises :class:`ValueError` saying what is wrong.

References: Fadeeva et al. (2023), "LM-Polygraph: Uncertainty Estimation for Language
Models" (EMNLP demo; PRR and the rejection curves); Geifman & El-Yaniv (2017), "Selective
Classification for Deep Neural Networks" (risk–coverage); Guo et al. (2017), "On Calibration
of Modern Neural Networks" (ECE); Rajpurkar et al. (2016), SQuAD (answer normalisation).
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "answer_match",
    "area_under_risk_coverage",
    "auroc",
    "expected_calibration_error",
    "mutual_information",
    "normalized_mutual_information",
    "prediction_rejection_ratio",
    "reliability_diagram",
    "risk_coverage_curve",
    "roc_curve",
    "routing_matrix",
    "specialisation",
]

FloatArray = NDArray[np.float64]

# How far a row of responsibilities may be from summing to 1 before we refuse.
_ROW_TOL = 1e-3


# --------------------------------------------------------------------------- validation


def _as_1d(x: ArrayLike, name: str) -> FloatArray:
    """``x`` as a non-empty float64 vector without NaN."""
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a 1-D array of numbers: {exc}") from exc
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array, got shape {arr.shape}")
    if np.isnan(arr).any():
        raise ValueError(f"{name} contains NaN at index {int(np.flatnonzero(np.isnan(arr))[0])}")
    return arr


def _as_unit(x: ArrayLike, name: str) -> FloatArray:
    """A non-empty vector of values in [0, 1]."""
    arr = _as_1d(x, name)
    if (arr < 0).any() or (arr > 1).any():
        raise ValueError(f"{name} must lie in [0, 1], got min {arr.min()} and max {arr.max()}")
    return arr


def _as_labels(labels: ArrayLike) -> NDArray[np.bool_]:
    """Binary labels (0/1 or bool) with both classes present."""
    arr = _as_1d(labels, "labels")
    if not np.isin(arr, (0.0, 1.0)).all():
        raise ValueError(f"labels must be 0/1 (1 = positive), got values {np.unique(arr)[:5]}")
    pos = arr == 1.0
    if pos.all() or not pos.any():
        raise ValueError("labels must contain both classes (0 and 1); got only one")
    return pos


def _check_lengths(a: np.ndarray, b: np.ndarray, names: str) -> None:
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"{names} must have the same length, got {a.shape[0]} and {b.shape[0]}")


def _as_resp(resp: ArrayLike) -> FloatArray:
    """(N, K) responsibilities: finite, non-negative, rows summing to 1."""
    r = np.asarray(resp, dtype=np.float64)
    if r.ndim != 2 or r.shape[0] == 0 or r.shape[1] == 0:
        raise ValueError(f"resp must have shape (N, K) with N, K >= 1, got {r.shape}")
    if not np.isfinite(r).all() or (r < 0).any():
        raise ValueError("resp must hold finite, non-negative responsibilities")
    sums = r.sum(axis=1)
    if not np.all(np.abs(sums - 1.0) <= _ROW_TOL):
        bad = int(np.flatnonzero(np.abs(sums - 1.0) > _ROW_TOL)[0])
        raise ValueError(f"each row of resp must sum to 1; row {bad} sums to {sums[bad]:.6f}")
    return r


# --------------------------------------------------------------------------- detection


def auroc(scores: ArrayLike, labels: ArrayLike) -> float:
    """Area under the ROC curve for detecting ``labels == 1`` by a high score.

        AUROC = P(s⁺ > s⁻) + ½ P(s⁺ = s⁻)
              = (Σ_{i: y_i=1} rank_i − n₁(n₁+1)/2) / (n₁ n₀)

    the Mann–Whitney U statistic over (positive, negative) pairs, with ranks ascending in the
    score and tied scores given their average rank (so a tied pair counts ½). 1 = every
    positive scores above every negative; 0.5 = chance (or all scores tied); 0 = reversed.

    Raises:
        ValueError: lengths differ, NaN present, or only one class in ``labels``.
    """
    s = _as_1d(scores, "scores")
    pos = _as_labels(labels)
    _check_lengths(s, pos, "scores and labels")
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    avg_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based mean rank of each tie group
    ranks = avg_rank[inverse.reshape(-1)]
    n1 = float(pos.sum())
    n0 = float(s.size) - n1
    return float((ranks[pos].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def roc_curve(scores: ArrayLike, labels: ArrayLike) -> tuple[FloatArray, FloatArray, FloatArray]:
    """ROC curve: one point per distinct score, flagging ``score >= threshold`` as positive.

        fpr(t) = #{y=0, s >= t} / n₀,    tpr(t) = #{y=1, s >= t} / n₁

    Thresholds run over the distinct scores in descending order, preceded by
    ``thresholds[0] = +inf`` for the point (0, 0) (flag nothing); the last point is (1, 1).
    A tie group moves along a straight segment, so the trapezoid area equals :func:`auroc`.

    Returns:
        ``(fpr, tpr, thresholds)``, each of shape (U + 1,) for U distinct scores.
    """
    s = _as_1d(scores, "scores")
    pos = _as_labels(labels)
    _check_lengths(s, pos, "scores and labels")
    uniq, inverse = np.unique(s, return_inverse=True)
    inverse = inverse.reshape(-1)
    n_pos = np.bincount(inverse, weights=pos.astype(np.float64), minlength=uniq.size)
    n_all = np.bincount(inverse, minlength=uniq.size).astype(np.float64)
    tp = np.cumsum(n_pos[::-1])  # (U,) positives with score >= each threshold
    fp = np.cumsum((n_all - n_pos)[::-1])
    tpr = np.concatenate(([0.0], tp / tp[-1]))
    fpr = np.concatenate(([0.0], fp / fp[-1]))
    thresholds = np.concatenate(([np.inf], uniq[::-1]))
    return fpr, tpr, thresholds


# --------------------------------------------------------------------------- rejection


def _tie_sorted(scores: FloatArray, values: FloatArray) -> FloatArray:
    """``values`` ordered by ascending score, each tie group replaced by its mean.

    Averaging a prefix mean over every ordering of a tie group equals using the group's mean
    value for each member (the prefix sum is linear and each member is equally likely at
    each position), so this is the exact average over tie orderings.
    """
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse.reshape(-1), weights=values, minlength=counts.size)
    return np.repeat(sums / counts, counts)


def _prefix_risk(sorted_errors: FloatArray) -> FloatArray:
    """Mean error of the n first (most confident) examples, for n = 1..N."""
    return np.cumsum(sorted_errors) / np.arange(1, sorted_errors.size + 1)


def _scores_errors(scores: ArrayLike, errors: ArrayLike) -> tuple[FloatArray, FloatArray]:
    s = _as_1d(scores, "scores")
    e = _as_unit(errors, "errors")
    _check_lengths(s, e, "scores and errors")
    return s, e


def risk_coverage_curve(scores: ArrayLike, errors: ArrayLike) -> tuple[FloatArray, FloatArray]:
    """Risk–coverage curve of selective prediction by ascending uncertainty.

    Keeping the n most confident examples (lowest scores), n = 1..N:

        coverage_n = n / N,    risk_n = (1/n) Σ_{i ≤ n} e_(i)

    where e_(i) are the errors sorted by ascending score, tied scores averaged over every
    ordering of their group (each tied example takes its group's mean error).

    Returns:
        ``(coverage, risk)``, each of shape (N,), coverage ascending from 1/N to 1.
    """
    s, e = _scores_errors(scores, errors)
    coverage = np.arange(1, s.size + 1) / s.size
    return coverage, _prefix_risk(_tie_sorted(s, e))


def area_under_risk_coverage(scores: ArrayLike, errors: ArrayLike) -> float:
    """AURC: the mean of the risk–coverage curve's risks (lower = better ranking).

        AURC = (1/N) Σ_{n=1..N} risk_n

    as lm-polygraph's ``RiskCoverageCurveAUC`` (Fadeeva et al. 2023), with ties averaged.
    """
    return float(np.mean(risk_coverage_curve(scores, errors)[1]))


def prediction_rejection_ratio(scores: ArrayLike, errors: ArrayLike) -> float:
    """Prediction–rejection ratio (PRR) of an uncertainty score; higher = better ranking.

        PRR = (AUC_random − AUC_unc) / (AUC_random − AUC_oracle)

    Each AUC is lm-polygraph's ``PredictionRejectionArea`` (Fadeeva et al. 2023) of a
    ranking: sort the examples most confident first, and for every kept count n = N..1
    (rejection rate (N − n)/N = 0 .. (N−1)/N) take the risk, the mean error of the n kept;
    the area is the mean of these N risks, ``(1/N) Σ_n (1/n) Σ_{i ≤ n} e_(i)``.

    * AUC_unc ranks by ascending ``scores``; tied scores are averaged over every ordering of
      their group (each takes its group's mean error), so the result is input-order free.
    * AUC_oracle ranks by ascending error (reject the wrong ones first).
    * AUC_random = mean(e): the expected risk at every n under a random order (lm-polygraph
      estimates it by shuffling; this is the exact expectation).

    1 = oracle, 0 = no better than random (e.g. a constant score), < 0 = worse than random.
    The ratio is invariant to affine rescaling of the errors, so it equals lm-polygraph's
    normalised PRR computed on the quality ``1 − e``.

    Returns:
        the PRR, or ``nan`` when every error is equal (oracle = random: nothing to rank).
    """
    s, e = _scores_errors(scores, errors)
    if e.max() == e.min():
        return float("nan")
    auc_unc = float(np.mean(_prefix_risk(_tie_sorted(s, e))))
    auc_oracle = float(np.mean(_prefix_risk(np.sort(e))))
    auc_random = float(np.mean(e))
    return (auc_random - auc_unc) / (auc_random - auc_oracle)


# --------------------------------------------------------------------------- calibration


def _binned(
    confidences: ArrayLike, correct: ArrayLike, n_bins: int
) -> tuple[FloatArray, NDArray[np.int64], FloatArray, FloatArray]:
    """Edges (n_bins + 1,), and per bin: count, Σ confidence, Σ correct."""
    if isinstance(n_bins, bool) or not isinstance(n_bins, int | np.integer) or n_bins < 1:
        raise ValueError(f"n_bins must be an integer >= 1, got {n_bins!r}")
    c = _as_unit(confidences, "confidences")
    y = _as_unit(correct, "correct")
    _check_lengths(c, y, "confidences and correct")
    edges = np.arange(n_bins + 1) / n_bins  # i / n_bins, correctly rounded (0.3 is 0.3)
    idx = np.minimum(np.searchsorted(edges, c, side="right") - 1, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins).astype(np.int64)
    conf_sum = np.bincount(idx, weights=c, minlength=n_bins).astype(np.float64)
    corr_sum = np.bincount(idx, weights=y, minlength=n_bins).astype(np.float64)
    return edges, count, conf_sum, corr_sum


def expected_calibration_error(
    confidences: ArrayLike, correct: ArrayLike, n_bins: int = 10
) -> float:
    """Expected calibration error with equal-width bins (Guo et al. 2017).

        ECE = Σ_b (n_b / N) · |acc_b − conf_b|

    over bins b = [i/B, (i+1)/B) for i < B − 1 and the last bin [(B−1)/B, 1] (so a
    confidence of exactly 1 falls in it); acc_b is the mean of ``correct`` (0/1, or a
    fractional correctness in [0, 1]) and conf_b the mean confidence in bin b. Empty bins
    contribute 0. Note the sign: confidence is the opposite of an uncertainty score.
    """
    _, count, conf_sum, corr_sum = _binned(confidences, correct, n_bins)
    return float(np.abs(corr_sum - conf_sum).sum() / count.sum())


def reliability_diagram(
    confidences: ArrayLike, correct: ArrayLike, n_bins: int = 10
) -> dict[str, NDArray[Any]]:
    """Per-bin statistics for a reliability diagram, with the bins of the ECE.

    Returns:
        a dict of (n_bins,) arrays: ``bin_lower``, ``bin_upper``, ``count`` (int),
        ``mean_confidence`` and ``accuracy`` (``nan`` for empty bins).
    """
    edges, count, conf_sum, corr_sum = _binned(confidences, correct, n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.where(count > 0, conf_sum / count, np.nan)
        accuracy = np.where(count > 0, corr_sum / count, np.nan)
    return {
        "bin_lower": edges[:-1],
        "bin_upper": edges[1:],
        "count": count,
        "mean_confidence": mean_conf,
        "accuracy": accuracy,
    }


# --------------------------------------------------------------------------- routing


def _codes(labels: Sequence[Hashable], name: str) -> tuple[NDArray[np.intp], int]:
    """Integer codes of discrete labels (in order of first appearance) and their count."""
    if isinstance(labels, str | bytes):
        raise ValueError(f"{name} must be a sequence of labels, not a single string")
    index: dict[Hashable, int] = {}
    try:
        codes = [index.setdefault(x, len(index)) for x in labels]
    except TypeError as exc:
        raise ValueError(f"{name} must hold hashable labels: {exc}") from exc
    if not codes:
        raise ValueError(f"{name} must hold at least one label")
    return np.asarray(codes, dtype=np.intp), len(index)


def _entropy(p: FloatArray) -> float:
    """Shannon entropy (nats) of a probability vector; 0·log 0 = 0."""
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def _joint(labels_a: Sequence[Hashable], labels_b: Sequence[Hashable]) -> FloatArray:
    """The empirical joint distribution (A, B) of two label sequences."""
    a, n_a = _codes(labels_a, "labels_a")
    b, n_b = _codes(labels_b, "labels_b")
    _check_lengths(a, b, "labels_a and labels_b")
    joint = np.zeros((n_a, n_b))
    np.add.at(joint, (a, b), 1.0)
    return joint / a.size


def mutual_information(labels_a: Sequence[Hashable], labels_b: Sequence[Hashable]) -> float:
    """Plug-in mutual information (nats) between two discrete label sequences.

        I(A; B) = Σ_{a,b} p(a,b) · log( p(a,b) / (p(a) p(b)) ) ≥ 0

    with p the empirical frequencies, e.g. task vs arg-max member: how much knowing the
    task tells about which member it is routed to. Rounding below 0 is clipped to 0.
    """
    p = _joint(labels_a, labels_b)
    outer = p.sum(axis=1, keepdims=True) * p.sum(axis=0, keepdims=True)
    nz = p > 0
    return max(float((p[nz] * np.log(p[nz] / outer[nz])).sum()), 0.0)


def normalized_mutual_information(
    labels_a: Sequence[Hashable], labels_b: Sequence[Hashable]
) -> float:
    """Mutual information normalised to [0, 1]: ``I(A; B) / min(H(A), H(B))``.

    1 = one labelling determines the other (up to the coarser one); 0 when either
    sequence is constant (its entropy is 0: there is nothing to share).
    """
    p = _joint(labels_a, labels_b)
    h = min(_entropy(p.sum(axis=1)), _entropy(p.sum(axis=0)))
    if h <= 0.0:
        return 0.0
    return min(mutual_information(labels_a, labels_b) / h, 1.0)


def routing_matrix(
    groups: Sequence[str], resp: ArrayLike, members: Sequence[str]
) -> tuple[list[str], FloatArray]:
    """Mean responsibility of each group (task, source) for each member.

        M[g, k] = mean_{i: group_i = g} r_{i,k}

    Args:
        groups: N group names, one per example.
        resp: (N, K) responsibilities, rows summing to 1.
        members: the K member names, the columns' order (checked against ``resp``).

    Returns:
        ``(group_names, matrix)``: the sorted unique group names and a (G, K) matrix whose
        rows sum to 1.
    """
    r = _as_resp(resp)
    if isinstance(groups, str) or not all(isinstance(g, str) for g in groups):
        raise ValueError("groups must be a sequence of strings, one per example")
    if len(groups) != r.shape[0]:
        raise ValueError(f"groups has {len(groups)} entries but resp has {r.shape[0]} rows")
    if isinstance(members, str) or len(members) != r.shape[1]:
        raise ValueError(f"members must name the {r.shape[1]} columns of resp, got {members!r}")
    names = sorted(set(groups))
    index = {g: i for i, g in enumerate(names)}
    codes = np.array([index[g] for g in groups], dtype=np.intp)
    sums = np.zeros((len(names), r.shape[1]))
    np.add.at(sums, codes, r)
    return names, sums / np.bincount(codes, minlength=len(names))[:, None]


def specialisation(resp: ArrayLike) -> dict[str, float]:
    """How sharply examples are routed to members, from (N, K) responsibilities.

        mean_max_responsibility = mean_i max_k r_{i,k}        (1/K uniform .. 1 one-hot)
        mean_routing_entropy    = mean_i −Σ_k r_{i,k} log r_{i,k}   (nats; log K .. 0)

    Higher max / lower entropy = more specialised members.
    """
    r = _as_resp(resp)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(r > 0, r * np.log(r), 0.0)
    return {
        "mean_max_responsibility": float(r.max(axis=1).mean()),
        "mean_routing_entropy": float(-terms.sum(axis=1).mean()),
    }


# --------------------------------------------------------------------------- accuracy

_PUNCT = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def _squad_normalize(text: str) -> str:
    """SQuAD-style normalisation: lowercase, drop punctuation, drop a/an/the, collapse spaces.

    Punctuation is ASCII ``string.punctuation`` plus every Unicode punctuation character
    (category P*), removed without a space (``"don't"`` → ``"dont"``), as in SQuAD.
    """
    text = text.lower()
    text = "".join(
        ch for ch in text if ch not in _PUNCT and not unicodedata.category(ch).startswith("P")
    )
    return " ".join(_ARTICLES.sub(" ", text).split())


def _token_f1(pred: list[str], ref: list[str]) -> float:
    """SQuAD token F1 between two token lists (bag of words)."""
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def answer_match(prediction: str, references: str | Sequence[str]) -> bool:
    """Whether a predicted answer counts as correct (the accuracy rule of ``softspec eval``).

    Both sides are normalised with :func:`_squad_normalize`; the prediction matches a
    reference r when any of these holds:

    1. ``norm(prediction) == norm(r)`` (exact match, SQuAD EM);
    2. ``norm(r)`` has at least one word and occurs in ``norm(prediction)`` as a whole-word
       substring (a verbose but right answer: "it is paris" contains "paris");
    3. the SQuAD token F1 of the two is >= 0.5.

    ``references`` is one string or a list of them; any match counts.
    """
    refs = [references] if isinstance(references, str) else list(references)
    if not isinstance(prediction, str) or not all(isinstance(r, str) for r in refs):
        raise ValueError("prediction and references must be strings")
    if not refs:
        raise ValueError("references must hold at least one reference answer")
    pred = _squad_normalize(prediction)
    for ref in map(_squad_normalize, refs):
        if pred == ref or (ref and f" {ref} " in f" {pred} "):
            return True
        if _token_f1(pred.split(), ref.split()) >= 0.5:
            return True
    return False
