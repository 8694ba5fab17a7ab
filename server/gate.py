"""The gate: threshold one uncertainty score and decide pass / flag / escalate / abstain.

Safety pipelines route on ``gate.decision``: "pass" when the score (higher = more
uncertain) is at most the threshold, otherwise the action — "flag" (the answer is
returned, marked), "escalate" (the request goes to the configured fallback model and its
answer is returned, :mod:`server.fallback`) or "abstain" (the answer is replaced by the
abstention text, finish_reason "content_filter"). docs/routing.md has the whole contract.

A request may bring its own gate (``ensemble.gate``): :func:`request_gate` checks it
against the server's (a locked server gate can only be tightened) and returns the
:class:`RequestGate` the request is decided with.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from ensemble.calibration import GateCalibration
from ensemble.scores import GATE_SCORES, PROMPT_SCORES, Score
from server.errors import InvalidRequestError
from server.protocol import GateOptions

__all__ = [
    "GateAction",
    "GateDecision",
    "GatePolicy",
    "RequestGate",
    "prompt_only",
    "request_gate",
]


class GateAction(StrEnum):
    FLAG = "flag"
    ESCALATE = "escalate"
    ABSTAIN = "abstain"

    @property
    def severity(self) -> int:
        """flag < escalate < abstain: how much of the ensemble's answer is withheld."""
        return _SEVERITY[self]

    @property
    def withholds(self) -> bool:
        """The ensemble's answer does not reach the client (so it must not be streamed)."""
        return self is not GateAction.FLAG


_SEVERITY = {GateAction.FLAG: 0, GateAction.ESCALATE: 1, GateAction.ABSTAIN: 2}


@dataclass(frozen=True)
class GateDecision:
    decision: str  # "pass" | "flag" | "escalate" | "abstain"
    score: float
    score_name: str
    threshold: float
    stage: str = "answer"  # "prompt": decided before any member generated
    routed_to: str | None = None  # the fallback model that answered (escalate)
    escalation: dict[str, Any] | None = None  # the escalation's outcome, when it failed

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "decision": self.decision,
            "score": self.score,
            "score_name": self.score_name,
            "threshold": self.threshold,
            "stage": self.stage,
        }
        if self.routed_to is not None or self.decision == "escalate":
            out["routed_to"] = self.routed_to
        if self.escalation is not None:
            out["escalation"] = self.escalation
        return out

    def routed(self, model: str) -> GateDecision:
        return replace(self, decision=GateAction.ESCALATE.value, routed_to=model)

    def escalation_failed(self, applied: GateAction, reason: str) -> GateDecision:
        """The fallback did not answer: the failure policy's decision, saying why."""
        failure = {"outcome": "failed", "reason": reason, "applied": applied.value}
        return replace(self, decision=applied.value, routed_to=None, escalation=failure)


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

    def decide(self, uncertainty: dict[str, Any], stage: str = "answer") -> GateDecision:
        """Threshold the configured score; token mode has no sequence-level scores, so it
        falls back to ``epistemic`` (the decision names the score it used)."""
        name = self.score_name if uncertainty.get(self.score_name) is not None else "epistemic"
        score = float(uncertainty[name])
        decision = "pass" if score <= self.threshold else str(self.action)
        return GateDecision(decision, score, name, self.threshold, stage)


def prompt_only(score_name: str, calibration: GateCalibration | None) -> bool:
    """Whether ``score_name`` is known before generation: a prompt score, or ``combined``
    calibrated on prompt scores only."""
    if score_name in PROMPT_SCORES:
        return True
    if score_name == Score.COMBINED.value and calibration is not None:
        return set(calibration.components) <= PROMPT_SCORES
    return False


@dataclass(frozen=True)
class RequestGate:
    """The gates one request is decided by: the server's, or the client's, or both (a
    client gate on another score is added to a locked server gate; the strictest fired
    action wins). ``prompt_only``: every gate can decide before generation."""

    policies: tuple[GatePolicy, ...]
    prompt_only: bool = False
    abstain_text: str = field(default="I'm not confident enough to answer that.")

    @property
    def withholds(self) -> bool:
        """Some gate would withhold the ensemble's answer (abstain or escalate)."""
        return any(p.action.withholds for p in self.policies)

    @property
    def can_decide_early(self) -> bool:
        """Decide before generating: the scores are the prompt's and every action withholds
        the answer (a flag needs the answer it flags)."""
        return self.prompt_only and all(p.action.withholds for p in self.policies)

    def decide(self, uncertainty: dict[str, Any], stage: str = "answer") -> GateDecision:
        decisions = [p.decide(uncertainty, stage) for p in self.policies]
        fired = [
            (p, d) for p, d in zip(self.policies, decisions, strict=True) if d.decision != "pass"
        ]
        if not fired:
            return decisions[-1]  # the client's gate when it brought one
        return max(fired, key=lambda pd: pd[0].action.severity)[1]


def request_gate(
    server: GatePolicy,
    override: GateOptions | None,
    *,
    allow_loosen: bool,
    escalate_ok: bool,
    calibration: GateCalibration | None,
) -> RequestGate:
    """The gate of one request: the server's, tightened (or, when ``allow_loosen``,
    replaced) by the client's ``ensemble.gate``. Errors are 400s naming the field."""

    def gate(*policies: GatePolicy) -> RequestGate:
        early = all(prompt_only(p.score_name, calibration) for p in policies)
        return RequestGate(policies, early, server.abstain_text)

    if override is None:
        return gate(server)
    action = GateAction(override.action) if override.action else server.action
    if action is GateAction.ESCALATE and not escalate_ok:
        raise InvalidRequestError(
            "ensemble.gate.action 'escalate' needs a fallback model, and this server has none "
            "(SOFTSPEC_FALLBACK_URL)",
            param="ensemble.gate.action",
        )
    score = override.score or server.score_name
    if score == Score.COMBINED.value and calibration is None:
        raise InvalidRequestError(
            "the gate score 'combined' needs a calibrated ensemble; this one has none",
            param="ensemble.gate.score",
        )
    same = score == server.score_name
    if override.threshold is None and not same:
        raise InvalidRequestError(
            f"ensemble.gate.threshold is required with a score other than the server's "
            f"({server.score_name}): thresholds of different scores are not comparable",
            param="ensemble.gate.threshold",
        )
    threshold = server.threshold if override.threshold is None else override.threshold
    client = GatePolicy(score, threshold, action, server.abstain_text)
    if allow_loosen:
        return gate(client)
    if action.severity < server.action.severity:
        raise InvalidRequestError(
            f"ensemble.gate.action {action.value!r} is looser than the server's "
            f"{server.action.value!r}, and the gate is locked (SOFTSPEC_GATE_ALLOW_LOOSEN)",
            param="ensemble.gate.action",
        )
    if same and threshold > server.threshold:
        raise InvalidRequestError(
            f"ensemble.gate.threshold {threshold:g} is looser than the server's "
            f"{server.threshold:g}, and the gate is locked (SOFTSPEC_GATE_ALLOW_LOOSEN)",
            param="ensemble.gate.threshold",
        )
    if same:
        return gate(client)  # fires whenever the server's does, at least as strictly
    # another score: the client's gate is added to the server's, which still applies
    return gate(server, client)
