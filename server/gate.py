"""The gate: threshold one uncertainty score and decide pass / flag / abstain.

Safety pipelines route on ``gate.decision``: "pass" when the score (higher = more
uncertain) is at most the threshold, otherwise the configured action — "flag" (answer
returned, marked) or "abstain" (answer replaced by the abstention text, finish_reason
"content_filter").
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from ensemble.scores import GATE_SCORES

__all__ = ["GateAction", "GateDecision", "GatePolicy"]


class GateAction(StrEnum):
    FLAG = "flag"
    ABSTAIN = "abstain"


@dataclass(frozen=True)
class GateDecision:
    decision: str  # "pass" | "flag" | "abstain"
    score: float
    score_name: str
    threshold: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "decision": self.decision,
            "score": self.score,
            "score_name": self.score_name,
            "threshold": self.threshold,
        }


@dataclass(frozen=True)
class GatePolicy:
    score_name: str
    threshold: float
    action: GateAction = GateAction.FLAG
    abstain_text: str = "I'm not confident enough to answer that."

    def __post_init__(self) -> None:
        if self.score_name not in GATE_SCORES:
            raise ValueError(
                f"gate score {self.score_name!r} is not one of {', '.join(GATE_SCORES)}"
            )

    def decide(self, uncertainty: dict[str, float | None]) -> GateDecision:
        """Threshold the configured score; token mode has no sequence-level scores, so it
        falls back to ``epistemic`` (the decision names the score it used)."""
        name = self.score_name if uncertainty.get(self.score_name) is not None else "epistemic"
        score = float(uncertainty[name])  # type: ignore[arg-type]
        decision = "pass" if score <= self.threshold else str(self.action)
        return GateDecision(decision, score, name, self.threshold)
