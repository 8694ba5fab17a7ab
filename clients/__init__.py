"""The Python client of the Soft Specialists gateway (built on the official ``openai`` SDK)."""

from clients.softspec_client import (
    Abstained,
    Candidate,
    DecodeMode,
    EnsembleAnswer,
    Gate,
    GateAction,
    GateDecision,
    GateOptions,
    ProtocolError,
    RequestOptions,
    SelectMode,
    SoftSpecClient,
    TokenUncertainty,
    Uncertainty,
)

__all__ = [
    "Abstained",
    "Candidate",
    "DecodeMode",
    "EnsembleAnswer",
    "Gate",
    "GateAction",
    "GateDecision",
    "GateOptions",
    "ProtocolError",
    "RequestOptions",
    "SelectMode",
    "SoftSpecClient",
    "TokenUncertainty",
    "Uncertainty",
]
