"""``softspec serve``: the application's wiring of the gateway and its engine.

The gateway (``server/``) never imports torch and does not know the in-process engine
exists; the application chooses it here: ``--engine local`` serves from
``training.local_engine.LocalEngine`` (transformers + peft in this process), anything
else from vLLM (``server.launch.vllm_engine``).
"""

from __future__ import annotations

from collections.abc import Sequence

from ensemble.manifest import EnsembleManifest
from server import launch
from server.engine import Engine
from server.launch import EngineFactory
from server.metrics import Metrics
from server.settings import Settings

__all__ = ["choose_engine", "run_serve"]


def choose_engine(settings: Settings, url: str | None) -> EngineFactory:
    """The engine ``settings.engine`` names: the local engine here, vLLM in the gateway."""
    if settings.engine != "local":
        return launch.vllm_engine(settings, url)

    def local(manifest: EnsembleManifest, metrics: Metrics) -> Engine:
        from training.local_engine import LocalEngine  # torch: imported only when chosen

        return LocalEngine(settings.ensemble, manifest, base_model=settings.base_model)

    return local


def run_serve(argv: Sequence[str]) -> int:
    return launch.run_serve(argv, choose_engine)
