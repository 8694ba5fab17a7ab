"""``softspec serve``: the application's wiring of the gateway and its engine."""

from __future__ import annotations

from server.launch import run_serve

__all__ = ["run_serve"]
