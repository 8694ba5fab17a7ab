"""The FastAPI application: wiring only (settings, engine, service, routers, middleware)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response

from ensemble import manifest as manifest_io
from ensemble.errors import ConfigError
from server.engine import Engine
from server.errors import install_error_handlers
from server.gate import GatePolicy
from server.metrics import Metrics
from server.routes import open_router, router
from server.service import EnsembleService
from server.settings import Settings

__all__ = ["create_app", "gate_policy"]


def gate_policy(settings: Settings, manifest: manifest_io.EnsembleManifest) -> GatePolicy:
    """Settings override the manifest's gate; the manifest is the default."""
    return GatePolicy(
        score_name=settings.gate_score or manifest.gate.score_name,
        threshold=settings.gate_threshold
        if settings.gate_threshold is not None
        else manifest.gate.threshold,
        action=settings.gate_action,
        abstain_text=settings.abstain_text,
    )


def create_app(
    settings: Settings,
    engine_factory: Callable[[manifest_io.EnsembleManifest, Metrics], Engine],
    manifest: manifest_io.EnsembleManifest | None = None,
) -> FastAPI:
    """Build the gateway for ``settings.ensemble`` on the engine the factory makes.

    The manifest is loaded (and its adapters' hashes verified) here, at start-up, so a
    broken ensemble directory fails before the server accepts a request.
    """
    manifest = manifest or manifest_io.load(settings.ensemble)
    try:
        gate = gate_policy(settings, manifest)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    metrics = Metrics()
    engine = engine_factory(manifest, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        try:
            yield
        finally:
            await engine.close()

    app = FastAPI(title="Soft Specialists", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.gate = gate
    app.state.started = time.time()
    app.state.service = EnsembleService(
        manifest, engine, gate, metrics, top_n=settings.top_logprobs
    )
    install_error_handlers(app)
    app.include_router(open_router)
    app.include_router(router)

    @app.middleware("http")
    async def observe(request: Request, call_next: Callable[[Request], Any]) -> Response:
        metrics.inflight.inc()
        t0 = time.perf_counter()
        status = 500
        try:
            response: Response = await call_next(request)
            status = response.status_code
            return response
        finally:
            route = request.scope.get("route")
            endpoint = getattr(route, "path", "other")
            metrics.inflight.dec()
            metrics.requests.labels(endpoint, str(status)).inc()
            metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)

    return app
