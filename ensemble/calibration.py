"""Gate calibration with stated guarantees, from in-distribution data only.

**The ``combined`` score.** A user can calibrate on their own in-distribution traffic only;
labelled out-of-distribution data is never available. So each component score s_j of an
answer (e.g. ``prompt_novelty``) is compared with the same score on n held-out
in-distribution prompts c_j,(1) ≤ … ≤ c_j,(n) (stored in the manifest's
``gate.calibration``):

    p_j      = (1 + #{i : c_j,i ≥ s_j}) / (n + 1)          conformal p-value, upper tail
    p        = min(1, m · min_j p_j)                        Bonferroni over m components
    combined = max(0, 1 − p + τ / (n + 1))                  higher = more uncertain

τ ∈ (−½, 0] is a tie-break that orders scores inside one p-value step: it grows from −½ to
0 as s_j moves from one calibration score to the next (above the largest it tends to 0 as
1 − exp(−distance / range)). Without it every prompt beyond the largest calibration score
would tie at 1 − 1/(n + 1), and an AUROC counts those ties as coin flips. Because τ ≤ 0,
``combined > 1 − a`` implies p < a: the tie-break never adds a flag.

**Flag-rate guarantee (conformal).** For a new in-distribution prompt exchangeable with the
calibration prompts, P(p_j ≤ a) ≤ a, hence P(p ≤ a) ≤ a. :func:`fit_conformal_gate` snaps a
requested rate r to the largest attainable level L = m·⌊r(n+1)/m⌋/(n+1) ≤ r and sets the
threshold 1 − L − ½/(n+1), so the gate flags exactly the prompts with p ≤ L:

* in expectation over the calibration draw, the in-distribution flag rate is ≤ L ≤ r;
* with probability ≥ 1 − δ over the calibration draw it is ≤ ``pac_bound``: for one
  component the flag rate of the j-th largest calibration score (j = L(n+1)) is
  Beta(j, n + 1 − j)-distributed, whose (1 − δ) quantile that is (Bonferroni over m
  components: m times the (1 − δ/m) quantile at j/m).

**Error-rate guarantee (risk control).** Where rows carry gold answers,
:func:`fit_risk_control` picks the loosest threshold λ on one score such that, with
probability ≥ 1 − δ, the error rate among passed answers (score ≤ λ) is ≤ the target:
"Learn then Test" (Angelopoulos et al., 2021) with an exact binomial p-value per candidate
λ and a Bonferroni correction over a fixed grid of candidates (the score quantiles at
coverage 10 %, 20 %, …, 100 %). It reports the coverage (share of answers passed) it buys.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "METHOD",
    "RISK_METHOD",
    "GateCalibration",
    "RiskControl",
    "beta_quantile",
    "binomial_cdf",
    "combined_score",
    "fit_calibration",
    "fit_conformal_gate",
    "fit_risk_control",
    "p_value",
    "smallest_rate",
    "threshold_for_rate",
]

METHOD = "conformal-pvalue-bonferroni"
RISK_METHOD = "learn-then-test-binomial-bonferroni"
DEFAULT_DELTA = 0.1
RISK_GRID = tuple(k / 10 for k in range(1, 11))  # candidate coverages of risk control


class GateCalibration(BaseModel):
    """In-distribution reference scores of the ``combined`` gate score (manifest), and the
    flag-rate guarantee of the threshold fitted with them (absent in older manifests)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: str = METHOD
    components: list[str] = Field(min_length=1)
    scores: dict[str, list[float]] = Field(description="sorted in-distribution scores")
    n: int = Field(ge=1, description="calibration prompts")
    source: str = Field(default="", description="where the calibration prompts came from")
    target_rate: float | None = Field(default=None, description="requested flag rate")
    level: float | None = Field(
        default=None, description="expected in-distribution flag rate ≤ level (≤ target_rate)"
    )
    pac_delta: float | None = Field(default=None, description="δ of pac_bound")
    pac_bound: float | None = Field(
        default=None, description="with probability ≥ 1 − δ, in-distribution flag rate ≤ this"
    )
    guarantee: str = Field(default="", description="the guarantee in one sentence")

    @model_validator(mode="after")
    def _consistent(self) -> GateCalibration:
        for c in self.components:
            vals = self.scores.get(c)
            if not vals:
                raise ValueError(f"calibration has no scores for component {c!r}")
            if any(not math.isfinite(v) for v in vals) or vals != sorted(vals):
                raise ValueError(f"calibration scores of {c!r} must be finite and sorted")
        return self


class RiskControl(BaseModel):
    """The error-rate guarantee of a gate threshold fitted by :func:`fit_risk_control`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: str = RISK_METHOD
    score_name: str
    threshold: float = Field(description="answers with score ≤ threshold pass")
    target_error: float = Field(gt=0.0, lt=1.0)
    delta: float = Field(gt=0.0, lt=1.0)
    n: int = Field(ge=1, description="graded calibration answers")
    coverage: float = Field(description="share of the calibration answers passed")
    error_rate: float = Field(description="error rate among the passed calibration answers")
    guarantee: str = ""


# --------------------------------------------------------------------------- p-values


def p_value(sorted_scores: Sequence[float], s: float) -> float:
    """(1 + #{c ≥ s}) / (n + 1): the upper-tail conformal p-value of ``s``."""
    n = len(sorted_scores)
    at_least = n - bisect.bisect_left(sorted_scores, s)
    return (1 + at_least) / (n + 1)


def _tie_break(sorted_scores: Sequence[float], s: float) -> float:
    """τ ∈ [−½, 0]: where ``s`` lies inside its p-value step (0 at the step's top)."""
    c = sorted_scores
    i = bisect.bisect_left(c, s)  # #{c < s}: c[i-1] < s ≤ c[i]
    if i == 0:
        return -0.5
    if i == len(c):
        span = c[-1] - c[0]
        g = 1.0 - math.exp(-(s - c[-1]) / (span if span > 0 else 1.0))
    else:
        lo, hi = c[i - 1], c[i]
        g = (s - lo) / (hi - lo) if hi > lo else 1.0
    return -0.5 * (1.0 - g)


def combined_score(cal: GateCalibration, uncertainty: Mapping[str, Any]) -> float | None:
    """max(0, 1 − min(1, m · min_j p_j) + τ/(n+1)) over the components present; ``None``
    if none is. τ is the tie-break of the component with the smallest p-value."""
    present = [
        (p_value(cal.scores[c], float(uncertainty[c])), c)
        for c in cal.components
        if uncertainty.get(c) is not None and math.isfinite(float(uncertainty[c]))
    ]
    if not present:
        return None
    p, c = min(present)
    tau = max(_tie_break(cal.scores[k], float(uncertainty[k])) for q, k in present if q == p)
    return max(0.0, 1.0 - min(1.0, len(present) * p) + tau / (len(cal.scores[c]) + 1))


# --------------------------------------------------------------------------- fitting


def fit_calibration(
    rows: Sequence[Mapping[str, Any]], components: Sequence[str], source: str = ""
) -> GateCalibration:
    """Calibration from in-distribution rows (each a mapping of score name → value)."""
    if not components:
        raise ValueError("give at least one component score")
    scores = {}
    for c in components:
        vals = sorted(float(r[c]) for r in rows if r.get(c) is not None)
        vals = [v for v in vals if math.isfinite(v)]
        if not vals:
            raise ValueError(f"no in-distribution values of {c!r} to calibrate on")
        scores[c] = vals
    n = min(len(v) for v in scores.values())
    return GateCalibration(components=list(components), scores=scores, n=n, source=source)


def smallest_rate(cal: GateCalibration) -> float:
    """The smallest flag rate the gate can promise: m / (n + 1) (one p-value step × m)."""
    return len(cal.components) / (cal.n + 1)


def _level(cal: GateCalibration, rate: float) -> tuple[float, int]:
    """(L, j): the largest attainable level L = m·j/(n+1) ≤ rate."""
    m, n = len(cal.components), cal.n
    j = math.floor(rate * (n + 1) / m + 1e-9)
    return m * j / (n + 1), j


def threshold_for_rate(rate: float, cal: GateCalibration | None = None) -> float:
    """The ``combined`` threshold that flags at most ``rate`` of in-distribution prompts.

    With ``cal`` (all components calibrated on the same n prompts): 1 − L − ½/(n+1) at the
    snapped level L, which flags exactly p ≤ L. Without: 1 − rate, which flags p < rate.
    """
    if not 0.0 < rate < 1.0:
        raise ValueError(f"the target flag rate must be in (0, 1), got {rate}")
    if cal is None or len({len(v) for v in cal.scores.values()}) != 1:
        return 1.0 - rate
    level, j = _level(cal, rate)
    if j == 0:
        raise ValueError(
            f"{cal.n} calibration prompts can promise no flag rate below "
            f"{smallest_rate(cal):.3f}, and {rate} was asked"
        )
    return 1.0 - level - 0.5 / (cal.n + 1)


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(X ≤ k) for X ~ Binomial(n, p), summed exactly (terms in log space)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    if p <= 0.0 or p >= 1.0:
        return 1.0 if p <= 0.0 else 0.0
    lp, lq = math.log(p), math.log1p(-p)
    lc = math.lgamma(n + 1)
    terms = [
        lc - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq
        for i in range(k + 1)
    ]
    return min(1.0, sum(math.exp(x) for x in terms))


def beta_quantile(q: float, a: int, b: int) -> float:
    """The q-quantile of Beta(a, b) for integers a, b ≥ 1, by bisection on
    P(Beta(a, b) ≤ x) = P(Binomial(a + b − 1, x) ≥ a)."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if 1.0 - binomial_cdf(a - 1, a + b - 1, mid) < q:
            lo = mid
        else:
            hi = mid
    return hi


def fit_conformal_gate(
    rows: Sequence[Mapping[str, Any]],
    components: Sequence[str],
    rate: float,
    *,
    source: str = "",
    delta: float = DEFAULT_DELTA,
) -> tuple[GateCalibration, float]:
    """The ``combined`` calibration from in-distribution rows and the threshold that flags
    at most ``rate`` of in-distribution prompts, with its guarantee recorded.

    ``ValueError`` when the rows cannot promise ``rate`` (too few for one p-value step).
    """
    if not 0.0 < delta < 1.0:
        raise ValueError(f"δ must be in (0, 1), got {delta}")
    cal = fit_calibration(rows, components, source=source)
    if len({len(v) for v in cal.scores.values()}) != 1:  # equal n: every row has every score
        n_rows = {c: len(v) for c, v in cal.scores.items()}
        raise ValueError(f"every calibration row needs every component score, got {n_rows}")
    threshold = threshold_for_rate(rate, cal)
    level, j = _level(cal, rate)
    m, n = len(cal.components), cal.n
    # m·min_j p_j ≤ L = m·j/(n+1) flags each component above its j-th largest score
    pac = min(1.0, m * beta_quantile(1.0 - delta / m, j, n + 1 - j))
    guarantee = (
        f"on in-distribution prompts exchangeable with the {n} calibration prompts, the gate "
        f"flags at most {level:.2%} in expectation, and at most {pac:.2%} with probability "
        f"≥ {1 - delta:.0%} over the calibration draw"
    )
    cal = cal.model_copy(
        update={
            "target_rate": rate,
            "level": level,
            "pac_delta": delta,
            "pac_bound": pac,
            "guarantee": guarantee,
        }
    )
    return cal, threshold


def fit_risk_control(
    scores: Sequence[float],
    errors: Sequence[bool],
    target_error: float,
    *,
    score_name: str,
    delta: float = DEFAULT_DELTA,
) -> RiskControl:
    """The loosest threshold on ``scores`` whose error rate among passed answers
    (score ≤ threshold) is ≤ ``target_error`` with probability ≥ 1 − ``delta``.

    Learn then Test: for each candidate λ of the coverage grid, H0: "error among passed >
    target" has the exact binomial p-value P(Bin(n_pass, target) ≤ errors); the candidates
    with p ≤ δ / |grid| are certified (Bonferroni: all certified at once with probability
    ≥ 1 − δ), and the loosest certified one is chosen.
    ``ValueError`` when none is certified (too few graded answers, or a target below what
    the scores can reach).
    """
    if not 0.0 < target_error < 1.0 or not 0.0 < delta < 1.0:
        raise ValueError(f"target error and δ must be in (0, 1), got {target_error}, {delta}")
    if len(scores) != len(errors) or not scores:
        raise ValueError("give one error flag per score, and at least one")
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    n = len(order)
    best: tuple[float, int, int] | None = None
    for coverage in RISK_GRID:
        n_pass = max(1, math.floor(coverage * n + 1e-9))
        lam = float(scores[order[n_pass - 1]])
        passed = [i for i in range(n) if scores[i] <= lam]  # ties at λ pass too
        k = sum(bool(errors[i]) for i in passed)
        if binomial_cdf(k, len(passed), target_error) <= delta / len(RISK_GRID):
            best = (lam, len(passed), k)  # certified; the grid goes from strict to loose
    if best is None:
        raise ValueError(
            f"no threshold keeps the error among passed answers ≤ {target_error} with "
            f"probability ≥ {1 - delta:.0%} on {n} graded answers; give more graded rows "
            "or a larger target"
        )
    lam, n_pass, k = best
    return RiskControl(
        score_name=score_name,
        threshold=lam,
        target_error=target_error,
        delta=delta,
        n=n,
        coverage=n_pass / n,
        error_rate=k / n_pass,
        guarantee=(
            f"with probability ≥ {1 - delta:.0%} over the {n} graded calibration answers, "
            f"the error rate among passed answers is ≤ {target_error:.0%}; "
            f"{n_pass / n:.0%} of them passed"
        ),
    )
