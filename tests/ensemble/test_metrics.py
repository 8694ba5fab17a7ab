"""Evaluation metrics: against brute-force implementations, known values and invariants.

The brute-force versions below are written independently of ``ensemble.metrics``: AUROC by
enumerating pairs, the rejection curves by enumerating every tie ordering with
``itertools.permutations`` and following lm-polygraph's code, ECE by explicit loops.
"""

from __future__ import annotations

import inspect
import itertools
import math
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ensemble import metrics
from ensemble.metrics import (
    answer_match,
    area_under_risk_coverage,
    auroc,
    expected_calibration_error,
    mutual_information,
    normalized_mutual_information,
    prediction_rejection_ratio,
    reliability_diagram,
    risk_coverage_curve,
    roc_curve,
    routing_matrix,
    specialisation,
)

# --------------------------------------------------------------------------- brute force


def naive_auroc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """P(s+ > s-) + 0.5 P(s+ = s-) over every (positive, negative) pair."""
    pos = [s for s, y in zip(scores, labels, strict=True) if y == 1]
    neg = [s for s, y in zip(scores, labels, strict=True) if y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def polygraph_area(order_key: Sequence[float], errors: Sequence[float]) -> float:
    """lm-polygraph's PredictionRejectionArea on errors: mean kept-prefix risk, n = N..1."""
    e = np.asarray(errors, dtype=float)[np.argsort(order_key, kind="stable")]
    n = len(e)
    risks = [sum(e[:kept]) / kept for kept in range(n, 0, -1)]
    return sum(risks) / n


def orderings(scores: Sequence[float], errors: Sequence[float]) -> list[tuple[Any, Any]]:
    """Every input ordering: a stable sort then visits every ordering of each tie group."""
    idx = range(len(scores))
    return [([scores[i] for i in p], [errors[i] for i in p]) for p in itertools.permutations(idx)]


def naive_aurc(scores: Sequence[float], errors: Sequence[float]) -> float:
    return float(np.mean([polygraph_area(s, e) for s, e in orderings(scores, errors)]))


def naive_prr(scores: Sequence[float], errors: Sequence[float]) -> float:
    prrs = []
    for s, e in orderings(scores, errors):
        unc, oracle = polygraph_area(s, e), polygraph_area(e, e)
        random = sum(e) / len(e)
        prrs.append((random - unc) / (random - oracle))
    return float(np.mean(prrs))


def naive_risk_curve(scores: Sequence[float], errors: Sequence[float]) -> np.ndarray:
    curves = []
    for s, e in orderings(scores, errors):
        kept = np.asarray(e, dtype=float)[np.argsort(s, kind="stable")]
        curves.append([kept[:n].mean() for n in range(1, len(kept) + 1)])
    return np.mean(curves, axis=0)


def naive_ece(conf: Sequence[float], correct: Sequence[float], n_bins: int) -> float:
    total = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        members = [i for i, c in enumerate(conf) if lo <= c < hi or (b == n_bins - 1 and c == 1.0)]
        if members:
            acc = sum(correct[i] for i in members) / len(members)
            avg = sum(conf[i] for i in members) / len(members)
            total += len(members) / len(conf) * abs(acc - avg)
    return total


def naive_entropy(labels: Sequence[Hashable]) -> float:
    n = len(labels)
    return -sum(c / n * math.log(c / n) for c in Counter(labels).values())


def naive_mi(a: Sequence[Hashable], b: Sequence[Hashable]) -> float:
    n = len(a)
    pa, pb, pab = Counter(a), Counter(b), Counter(zip(a, b, strict=True))
    return sum(c / n * math.log((c / n) / (pa[x] / n * pb[y] / n)) for (x, y), c in pab.items())


# --------------------------------------------------------------------------- strategies


@st.composite
def scored_labels(draw: st.DrawFn, max_size: int = 30) -> tuple[list[int], list[int]]:
    """Integer scores from a small range (many ties) and labels with both classes."""
    n = draw(st.integers(2, max_size))
    scores = draw(st.lists(st.integers(-3, 3), min_size=n, max_size=n))
    labels = draw(
        st.lists(st.integers(0, 1), min_size=n, max_size=n).filter(lambda y: 0 < sum(y) < len(y))
    )
    return scores, labels


@st.composite
def scored_errors(draw: st.DrawFn, max_size: int = 5) -> tuple[list[int], list[float]]:
    n = draw(st.integers(1, max_size))
    scores = draw(st.lists(st.integers(0, 2), min_size=n, max_size=n))
    errors = draw(st.lists(st.sampled_from([0.0, 0.25, 0.5, 1.0]), min_size=n, max_size=n))
    return scores, errors


label_pairs = st.lists(st.tuples(st.integers(0, 3), st.sampled_from("xyz")), min_size=1)


# --------------------------------------------------------------------------- public surface


def test_all_lists_every_public_function() -> None:
    public = {
        name
        for name, obj in vars(metrics).items()
        if inspect.isfunction(obj) and obj.__module__ == metrics.__name__ and name[0] != "_"
    }
    assert set(metrics.__all__) == public
    assert metrics.__all__ == sorted(metrics.__all__)


# --------------------------------------------------------------------------- AUROC / ROC

TIED_SCORES = [0.1, 0.4, 0.4, 0.35, 0.8, 0.4, 0.1, 0.9]
TIED_LABELS = [0, 1, 0, 0, 1, 1, 1, 0]


def test_auroc_matches_pair_enumeration_with_ties() -> None:
    assert auroc(TIED_SCORES, TIED_LABELS) == pytest.approx(naive_auroc(TIED_SCORES, TIED_LABELS))


@pytest.mark.parametrize(
    ("scores", "labels", "expected"),
    [
        ([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1], 1.0),  # perfect separation
        ([0.1, 0.2, 0.8, 0.9], [1, 1, 0, 0], 0.0),  # reversed
        ([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1], 0.5),  # all tied
        ([0.1, 0.5, 0.5, 0.9], [0, 1, 0, 1], 0.875),  # 3.5 of 4 pairs
        ([-np.inf, 0.0, np.inf], [0, 1, 1], 1.0),  # infinities still rank
    ],
)
def test_auroc_known_values(scores: list[float], labels: list[int], expected: float) -> None:
    assert auroc(scores, labels) == pytest.approx(expected)


def test_auroc_accepts_bool_labels() -> None:
    assert auroc([0.2, 0.7], np.array([False, True])) == 1.0


@given(scored_labels())
def test_auroc_matches_pair_enumeration(data: tuple[list[int], list[int]]) -> None:
    scores, labels = data
    assert auroc(scores, labels) == pytest.approx(naive_auroc(scores, labels), abs=1e-12)


@given(scored_labels(), st.randoms(use_true_random=False))
def test_auroc_invariant_to_monotone_maps_and_permutations(
    data: tuple[list[int], list[int]], rng: Any
) -> None:
    scores, labels = data
    base = auroc(scores, labels)
    s = np.asarray(scores, dtype=float)
    assert auroc(np.exp(s), labels) == pytest.approx(base, abs=1e-12)
    assert auroc(2 * s**3 - 5, labels) == pytest.approx(base, abs=1e-12)
    perm = list(range(len(scores)))
    rng.shuffle(perm)
    assert auroc(s[perm], np.asarray(labels)[perm]) == pytest.approx(base, abs=1e-12)
    assert auroc(-s, labels) == pytest.approx(1.0 - base, abs=1e-12)


@given(scored_labels())
def test_roc_trapezoid_area_equals_auroc(data: tuple[list[int], list[int]]) -> None:
    scores, labels = data
    fpr, tpr, thresholds = roc_curve(scores, labels)
    area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    assert area == pytest.approx(auroc(scores, labels), abs=1e-12)
    assert (fpr[0], tpr[0]) == (0.0, 0.0)
    assert (fpr[-1], tpr[-1]) == (1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert thresholds[0] == np.inf
    assert np.all(np.diff(thresholds) < 0)
    assert len(thresholds) == len(set(scores)) + 1


def test_roc_curve_one_point_per_distinct_threshold() -> None:
    fpr, tpr, thresholds = roc_curve([0.1, 0.5, 0.5, 0.9], [0, 1, 0, 1])
    np.testing.assert_array_equal(thresholds, [np.inf, 0.9, 0.5, 0.1])
    np.testing.assert_allclose(tpr, [0.0, 0.5, 1.0, 1.0])
    np.testing.assert_allclose(fpr, [0.0, 0.0, 0.5, 1.0])


# --------------------------------------------------------------------------- rejection

TIE_SCORES = [0.3, 0.1, 0.3, 0.7, 0.3, 0.1]
TIE_ERRORS = [1.0, 0.0, 0.0, 1.0, 0.5, 1.0]


def test_prr_and_aurc_match_enumerated_tie_orderings() -> None:
    assert prediction_rejection_ratio(TIE_SCORES, TIE_ERRORS) == pytest.approx(
        naive_prr(TIE_SCORES, TIE_ERRORS)
    )
    assert area_under_risk_coverage(TIE_SCORES, TIE_ERRORS) == pytest.approx(
        naive_aurc(TIE_SCORES, TIE_ERRORS)
    )
    coverage, risk = risk_coverage_curve(TIE_SCORES, TIE_ERRORS)
    np.testing.assert_allclose(coverage, np.arange(1, 7) / 6)
    np.testing.assert_allclose(risk, naive_risk_curve(TIE_SCORES, TIE_ERRORS))


@settings(max_examples=60, deadline=None)
@given(scored_errors())
def test_rejection_metrics_match_enumeration(data: tuple[list[int], list[float]]) -> None:
    scores, errors = data
    _, risk = risk_coverage_curve(scores, errors)
    np.testing.assert_allclose(risk, naive_risk_curve(scores, errors), atol=1e-12)
    aurc = area_under_risk_coverage(scores, errors)
    assert aurc == pytest.approx(naive_aurc(scores, errors), abs=1e-12)
    prr = prediction_rejection_ratio(scores, errors)
    if len(set(errors)) == 1:
        assert math.isnan(prr)
    else:
        assert prr == pytest.approx(naive_prr(scores, errors), abs=1e-9)
        assert prr <= 1.0 + 1e-12


def test_prr_matches_lm_polygraph_normalised_score_without_ties() -> None:
    """lm-polygraph scores quality (1 − error), min–max normalised, then normalises by the
    oracle (estimator = −quality) and random areas; the ratio must equal ours."""
    rng = np.random.default_rng(0)
    scores, errors = rng.normal(size=40), rng.uniform(size=40)

    def area(estimator: np.ndarray, target: np.ndarray) -> float:  # their code, on quality
        target = (target - target.min()) / (target.max() - target.min())
        cumsum = np.cumsum(target[np.argsort(estimator)])
        return float(np.sum((cumsum / np.arange(1, len(target) + 1))[::-1]) / len(target))

    quality = 1.0 - errors
    ue, oracle = area(scores, quality), area(-quality, quality)
    random = float(np.mean((quality - quality.min()) / (quality.max() - quality.min())))
    expected = (ue - random) / (oracle - random)
    assert prediction_rejection_ratio(scores, errors) == pytest.approx(expected)


def test_prr_known_values() -> None:
    errors = [0.0, 0.2, 0.5, 1.0, 0.0, 1.0]
    assert prediction_rejection_ratio(errors, errors) == pytest.approx(1.0)  # oracle
    assert prediction_rejection_ratio([7.0] * 6, errors) == pytest.approx(0.0, abs=1e-12)
    assert prediction_rejection_ratio([-e for e in errors], errors) < 0.0  # reversed oracle
    # A monotone transform of the oracle is still the oracle.
    assert prediction_rejection_ratio(np.exp(errors), errors) == pytest.approx(1.0)


@pytest.mark.parametrize("errors", [[0.0, 0.0, 0.0], [1.0, 1.0], [0.4], [0.25] * 5])
def test_prr_is_nan_when_all_errors_equal(errors: list[float]) -> None:
    assert math.isnan(prediction_rejection_ratio(np.arange(len(errors)), errors))


@settings(max_examples=40)
@given(scored_errors(max_size=8), st.randoms(use_true_random=False))
def test_rejection_metrics_do_not_depend_on_input_order(
    data: tuple[list[int], list[float]], rng: Any
) -> None:
    scores, errors = data
    perm = list(range(len(scores)))
    rng.shuffle(perm)
    s, e = [scores[i] for i in perm], [errors[i] for i in perm]
    assert area_under_risk_coverage(s, e) == pytest.approx(
        area_under_risk_coverage(scores, errors), abs=1e-12
    )
    np.testing.assert_equal(
        np.round(prediction_rejection_ratio(s, e), 12),
        np.round(prediction_rejection_ratio(scores, errors), 12),
    )


def test_risk_coverage_ends_at_mean_error() -> None:
    coverage, risk = risk_coverage_curve([0.2, 0.1, 0.9], [0.0, 0.0, 1.0])
    np.testing.assert_allclose(coverage, [1 / 3, 2 / 3, 1.0])
    np.testing.assert_allclose(risk, [0.0, 0.0, 1 / 3])
    assert area_under_risk_coverage([0.2, 0.1, 0.9], [0.0, 0.0, 1.0]) == pytest.approx(1 / 9)


# --------------------------------------------------------------------------- calibration

CONF = [0.05, 0.3, 0.35, 0.3, 0.99, 1.0, 0.62, 0.1, 0.0, 0.75, 0.75]
CORRECT = [0, 1, 0, 1, 1, 1, 0, 0, 1, 1, 0.5]


@pytest.mark.parametrize("n_bins", [1, 3, 10, 15])
def test_ece_matches_loops(n_bins: int) -> None:
    assert expected_calibration_error(CONF, CORRECT, n_bins) == pytest.approx(
        naive_ece(CONF, CORRECT, n_bins)
    )


@given(
    st.lists(st.tuples(st.floats(0.0, 1.0), st.sampled_from([0.0, 1.0])), min_size=1, max_size=40),
    st.integers(1, 20),
)
def test_ece_matches_loops_property(pairs: list[tuple[float, float]], n_bins: int) -> None:
    conf, correct = [c for c, _ in pairs], [y for _, y in pairs]
    ece = expected_calibration_error(conf, correct, n_bins)
    assert ece == pytest.approx(naive_ece(conf, correct, n_bins), abs=1e-12)
    assert 0.0 <= ece <= 1.0


def test_ece_known_values() -> None:
    assert expected_calibration_error([0.8] * 5, [1, 1, 1, 1, 0]) == pytest.approx(0.0)
    assert expected_calibration_error([1.0] * 4, [0, 0, 0, 0]) == pytest.approx(1.0)
    assert expected_calibration_error([0.0, 1.0], [True, False]) == pytest.approx(1.0)


def test_reliability_diagram_bins() -> None:
    diagram = reliability_diagram(CONF, CORRECT, n_bins=10)
    np.testing.assert_allclose(diagram["bin_lower"], np.arange(10) / 10)
    np.testing.assert_allclose(diagram["bin_upper"], np.arange(1, 11) / 10)
    # 0.3 lies in [0.3, 0.4), 1.0 in the last bin.
    np.testing.assert_array_equal(diagram["count"], [2, 1, 0, 3, 0, 0, 1, 2, 0, 2])
    assert diagram["mean_confidence"][3] == pytest.approx((0.3 + 0.35 + 0.3) / 3)
    assert diagram["accuracy"][3] == pytest.approx(2 / 3)
    assert diagram["accuracy"][7] == pytest.approx(0.75)
    empty = diagram["count"] == 0
    assert np.isnan(diagram["accuracy"][empty]).all()
    assert np.isnan(diagram["mean_confidence"][empty]).all()
    filled = ~empty
    gaps = diagram["count"][filled] * np.abs(
        diagram["accuracy"][filled] - diagram["mean_confidence"][filled]
    )
    assert gaps.sum() / len(CONF) == pytest.approx(expected_calibration_error(CONF, CORRECT))


# --------------------------------------------------------------------------- information


def test_mutual_information_of_a_product_table_is_zero() -> None:
    a_counts, b_counts = {"x": 2, "y": 1}, {"u": 1, "v": 3}
    pairs = [
        (a, b) for a, na in a_counts.items() for b, nb in b_counts.items() for _ in range(na * nb)
    ]
    a, b = [p[0] for p in pairs], [p[1] for p in pairs]
    assert mutual_information(a, b) == pytest.approx(0.0, abs=1e-12)
    assert normalized_mutual_information(a, b) == pytest.approx(0.0, abs=1e-12)


def test_mutual_information_of_identical_labels_is_the_entropy() -> None:
    labels = ["qa", "qa", "chat", "math", "qa", "chat"]
    h = -(3 / 6 * math.log(3 / 6) + 2 / 6 * math.log(2 / 6) + 1 / 6 * math.log(1 / 6))
    assert mutual_information(labels, labels) == pytest.approx(h)
    assert normalized_mutual_information(labels, labels) == pytest.approx(1.0)
    # A relabelling is as informative: arg-max member ids for the same tasks.
    members = [2, 2, 0, 1, 2, 0]
    assert mutual_information(labels, members) == pytest.approx(h)


def test_normalized_mutual_information_is_zero_for_a_constant() -> None:
    assert normalized_mutual_information(["a", "a", "a"], [0, 1, 2]) == 0.0
    assert mutual_information(["a", "a", "a"], [0, 1, 2]) == 0.0


def test_normalized_mutual_information_uses_the_smaller_entropy() -> None:
    tasks, members = ["a", "a", "b", "b"], [0, 1, 2, 3]  # members refine tasks
    assert normalized_mutual_information(tasks, members) == pytest.approx(1.0)
    assert mutual_information(tasks, members) == pytest.approx(math.log(2))


@given(label_pairs)
def test_mutual_information_properties(pairs: list[tuple[int, str]]) -> None:
    a, b = [p[0] for p in pairs], [p[1] for p in pairs]
    mi = mutual_information(a, b)
    assert mi >= 0.0
    assert mi == pytest.approx(naive_mi(a, b), abs=1e-12)
    assert mi == pytest.approx(mutual_information(b, a), abs=1e-12)
    assert mi <= min(naive_entropy(a), naive_entropy(b)) + 1e-12
    assert 0.0 <= normalized_mutual_information(a, b) <= 1.0


# --------------------------------------------------------------------------- routing


def test_routing_matrix_matches_loops() -> None:
    groups = ["qa", "chat", "qa", "math", "chat"]
    resp = np.array(
        [[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0], [0.3, 0.3, 0.4]]
    )
    names, matrix = routing_matrix(groups, resp, ["m0", "m1", "m2"])
    assert names == ["chat", "math", "qa"]
    assert matrix.shape == (3, 3)
    for gi, g in enumerate(names):
        rows = [resp[i] for i in range(len(groups)) if groups[i] == g]
        np.testing.assert_allclose(matrix[gi], np.mean(rows, axis=0))
    np.testing.assert_allclose(matrix.sum(axis=1), 1.0)


def test_specialisation_known_values_and_loops() -> None:
    one_hot = np.eye(3)[[0, 2, 1, 1]]
    assert specialisation(one_hot) == {"mean_max_responsibility": 1.0, "mean_routing_entropy": 0.0}
    uniform = specialisation(np.full((5, 4), 0.25))
    assert uniform["mean_max_responsibility"] == pytest.approx(0.25)
    assert uniform["mean_routing_entropy"] == pytest.approx(math.log(4))
    resp = np.array([[0.7, 0.3, 0.0], [0.2, 0.2, 0.6]])
    entropies = [-sum(p * math.log(p) for p in row if p > 0) for row in resp]
    got = specialisation(resp)
    assert got["mean_max_responsibility"] == pytest.approx((0.7 + 0.6) / 2)
    assert got["mean_routing_entropy"] == pytest.approx(sum(entropies) / 2)


# --------------------------------------------------------------------------- answer match


@pytest.mark.parametrize(
    ("prediction", "references", "expected"),
    [
        ("Paris", "paris", True),  # case
        ("The Eiffel Tower!", "eiffel tower", True),  # article and punctuation
        ("an apple", ["banana", "Apple."], True),  # any reference
        ("It is Paris, France.", ["London", "Paris"], True),  # whole-word substring
        ("¿Paris?", "paris", True),  # Unicode punctuation
        ("I don't know", "dont know", True),  # apostrophe removed, not split
        ("Parisian food", "Paris", False),  # substring but not a whole word
        ("blue whale", "the blue whale shark", True),  # F1 = 0.8
        ("red green", "red blue", True),  # F1 = 0.5 exactly
        ("red green yellow", "red blue", False),  # F1 = 0.4
        ("red", "blue", False),
        ("", "Paris", False),
        ("...", "Paris", False),
        ("yes", ["no", "nope"], False),
    ],
)
def test_answer_match(prediction: str, references: str | list[str], expected: bool) -> None:
    assert answer_match(prediction, references) is expected


# --------------------------------------------------------------------------- bad input

BAD_INPUTS: list[tuple[Callable[..., Any], tuple[Any, ...], str]] = [
    (auroc, ([0.1, 0.2], [1, 1]), "both classes"),
    (auroc, ([0.1, 0.2], [0, 0]), "both classes"),
    (auroc, ([0.1, 0.2, 0.3], [0, 1]), "same length"),
    (auroc, ([0.1, np.nan], [0, 1]), "NaN"),
    (auroc, ([0.1, 0.2], [0, 2]), "0/1"),
    (auroc, ([], []), "non-empty"),
    (auroc, ([[0.1, 0.2]], [0, 1]), "1-D"),
    (roc_curve, ([0.1, 0.2], [1, 1]), "both classes"),
    (roc_curve, ([0.1, np.nan], [0, 1]), "NaN"),
    (prediction_rejection_ratio, ([0.1, 0.2], [0.0]), "same length"),
    (prediction_rejection_ratio, ([0.1, 0.2], [0.0, 1.5]), r"\[0, 1\]"),
    (prediction_rejection_ratio, ([np.nan, 0.2], [0.0, 1.0]), "NaN"),
    (risk_coverage_curve, ([0.1], [-0.1]), r"\[0, 1\]"),
    (area_under_risk_coverage, ([], []), "non-empty"),
    (expected_calibration_error, ([0.5, 1.2], [1, 0]), r"\[0, 1\]"),
    (expected_calibration_error, ([0.5], [1, 0]), "same length"),
    (expected_calibration_error, ([0.5], [1], 0), "n_bins"),
    (expected_calibration_error, ([0.5], [1], 2.5), "n_bins"),
    (reliability_diagram, ([0.5], [2]), r"\[0, 1\]"),
    (mutual_information, ([1, 2], [1]), "same length"),
    (mutual_information, ([], []), "at least one"),
    (mutual_information, ("ab", "cd"), "single string"),
    (mutual_information, ([[1], [2]], [0, 1]), "hashable"),
    (normalized_mutual_information, ([1, 2, 3], [1]), "same length"),
    (routing_matrix, (["a"], [[0.5, 0.4]], ["m0", "m1"]), "sum to 1"),
    (routing_matrix, (["a", "b"], [[0.5, 0.5]], ["m0", "m1"]), "rows"),
    (routing_matrix, (["a"], [[0.5, 0.5]], ["m0"]), "members"),
    (routing_matrix, ([1], [[0.5, 0.5]], ["m0", "m1"]), "strings"),
    (specialisation, ([0.5, 0.5],), r"\(N, K\)"),
    (specialisation, ([[1.5, -0.5]],), "non-negative"),
    (answer_match, ("paris", []), "at least one"),
    (answer_match, ("paris", [None]), "strings"),
]


@pytest.mark.parametrize(
    ("func", "args", "match"), BAD_INPUTS, ids=[f"{f.__name__}-{m}" for f, _, m in BAD_INPUTS]
)
def test_bad_input_raises_value_error(
    func: Callable[..., Any], args: tuple[Any, ...], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        func(*args)
