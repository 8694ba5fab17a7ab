"""Prometheus metrics of the gateway, in a registry per app (so tests can build several)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["Metrics"]

_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_QUEUE = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_EPISTEMIC = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4)


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter(
            "softspec_requests_total", "HTTP requests", ["endpoint", "status"], registry=r
        )
        self.latency = Histogram(
            "softspec_request_seconds",
            "request latency",
            ["endpoint"],
            buckets=_LATENCY,
            registry=r,
        )
        self.inflight = Gauge("softspec_inflight_requests", "requests in progress", registry=r)
        self.epistemic = Histogram(
            "softspec_epistemic_nats", "epistemic uncertainty of answers (nats/token)",
            buckets=_EPISTEMIC, registry=r,
        )  # fmt: skip
        # --- the gate and escalation (docs/routing.md) -----------------------------------
        self.gate = Counter(
            "softspec_gate_decisions_total",
            "gate decisions as the gate made them",
            ["decision", "stage"],  # pass | flag | escalate | abstain; prompt | answer
            registry=r,
        )
        self.escalations = Counter(
            "softspec_escalations_total",
            "escalations to the fallback model",
            ["outcome"],  # ok | error | timeout
            registry=r,
        )
        self.fallback_latency = Histogram(
            "softspec_fallback_seconds", "fallback call latency (to the last byte)",
            buckets=_LATENCY, registry=r,
        )  # fmt: skip
        self.upstream_errors = Counter(
            "softspec_upstream_errors_total", "engine errors", ["member", "kind"], registry=r
        )
        self.upstream_latency = Histogram(
            "softspec_upstream_seconds", "engine call latency", ["member", "op"],
            buckets=_LATENCY, registry=r,
        )  # fmt: skip
        # --- reliability: admission control, deadlines, the supervised engine ------------
        self.active = Gauge(
            "softspec_admission_active", "ensemble requests holding a slot", registry=r
        )
        self.waiting = Gauge(
            "softspec_admission_waiting", "ensemble requests waiting for a slot", registry=r
        )
        self.queue_wait = Histogram(
            "softspec_admission_wait_seconds", "time spent waiting for a slot",
            buckets=_QUEUE, registry=r,
        )  # fmt: skip
        self.rejected = Counter(
            "softspec_admission_rejected_total",
            "requests refused or dropped before running",
            ["reason"],  # queue_full | engine_down | client_gone | deadline
            registry=r,
        )
        self.deadline_exceeded = Counter(
            "softspec_deadline_exceeded_total", "requests cut off by their deadline", registry=r
        )
        # --- token mode on vLLM: lock-step groups (server/lockstep.py) ------------------
        self.lockstep = Counter(
            "softspec_lockstep_requests_total",
            "token-mode requests on an engine that decodes member groups in lock-step",
            # exact: one group decoded the answer | resumed: after a split group, from the
            # tokens decided before it | fallback: answered in sequence mode | broken: the
            # stream ended with an error after tokens had gone out
            ["outcome"],
            registry=r,
        )
        self.lockstep_splits = Counter(
            "softspec_lockstep_splits_total",
            "lock-step groups that split",
            ["reason"],  # incomplete (a member was not in the step) | diverged (rows differ)
            registry=r,
        )
        self.engine_up = Gauge(
            "softspec_engine_up", "1 while the engine answers its health check", registry=r
        )
        self.engine_restarts = Counter(
            "softspec_engine_restarts_total",
            "vLLM child restarts",
            ["result"],  # ok | failed
            registry=r,
        )
