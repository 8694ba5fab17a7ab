"""The ``combined`` gate score: component scores as in-distribution p-values.

A user can calibrate on their own in-distribution traffic only; labelled out-of-distribution
data is never available. So each component score s_j of an answer (e.g. ``prompt_novelty``,
``novelty``) is compared with the same score on n held-out in-distribution prompts
c_j,1..c_j,n (stored, sorted, in the manifest's ``gate.calibration``):

    p_j      = (1 + #{i : c_j,i ≥ s_j}) / (n + 1)          conformal p-value, upper tail
    p        = min(1, m · min_j p_j)                        Bonferroni over m components
    combined = 1 − p                                        higher = more uncertain

For a new in-distribution prompt exchangeable with the calibration prompts, P(p_j ≤ a) ≤ a
for every a, hence P(p ≤ a) ≤ a: a gate that flags when ``combined > 1 − a`` flags at most a
fraction a of in-distribution prompts (in expectation over the calibration draw), whatever
the components' scales. That is the threshold's stated meaning; :func:`threshold_for_rate`
gives it; the smallest rate a calibration can promise is m / (n + 1)
(:func:`smallest_rate`). A missing component (``None``) is left out of the minimum and of m.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "METHOD",
    "GateCalibration",
    "combined_score",
    "fit_calibration",
    "p_value",
    "smallest_rate",
    "threshold_for_rate",
]

METHOD = "conformal-pvalue-bonferroni"


class GateCalibration(BaseModel):
    """In-distribution reference scores of the ``combined`` gate score (manifest)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: str = METHOD
    components: list[str] = Field(min_length=1)
    scores: dict[str, list[float]] = Field(description="sorted in-distribution scores")
    n: int = Field(ge=1, description="calibration prompts")
    source: str = Field(default="", description="where the calibration prompts came from")

    @model_validator(mode="after")
    def _consistent(self) -> GateCalibration:
        for c in self.components:
            vals = self.scores.get(c)
            if not vals:
                raise ValueError(f"calibration has no scores for component {c!r}")
            if any(not math.isfinite(v) for v in vals) or vals != sorted(vals):
                raise ValueError(f"calibration scores of {c!r} must be finite and sorted")
        return self


def p_value(sorted_scores: Sequence[float], s: float) -> float:
    """(1 + #{c ≥ s}) / (n + 1): the upper-tail conformal p-value of ``s``."""
    n = len(sorted_scores)
    at_least = n - bisect.bisect_left(sorted_scores, s)
    return (1 + at_least) / (n + 1)


def combined_score(cal: GateCalibration, uncertainty: Mapping[str, Any]) -> float | None:
    """1 − min(1, m · min_j p_j) over the components present; ``None`` if none is."""
    ps = [
        p_value(cal.scores[c], float(uncertainty[c]))
        for c in cal.components
        if uncertainty.get(c) is not None and math.isfinite(float(uncertainty[c]))
    ]
    if not ps:
        return None
    return 1.0 - min(1.0, len(ps) * min(ps))


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


def threshold_for_rate(rate: float) -> float:
    """The ``combined`` threshold that flags at most ``rate`` of in-distribution prompts."""
    if not 0.0 < rate < 1.0:
        raise ValueError(f"the target flag rate must be in (0, 1), got {rate}")
    return 1.0 - rate
