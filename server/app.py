"""The FastAPI application: wiring only (settings, engine, service, routers, middleware)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ensemble import manifest as manifest_io
from ensemble.density import GaussianReference, load_reference
from ensemble.errors import ConfigError
from ensemble.scores import Score
from server.admission import Admission
from server.engine import Engine
from server.errors import PayloadTooLargeError, error_response, install_error_handlers
from server.fallback import Fallback
from server.gate import GateAction, GatePolicy
from server.metrics import Metrics
from server.routes import open_router, router
from server.service import EnsembleService
from server.settings import Settings
from server.supervisor import EngineSupervisor, Restartable

__all__ = ["BodyLimit", "Observe", "create_app", "gate_policy"]

log = logging.getLogger("softspec.server")


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes gets 413 in the envelope.

    A declared ``Content-Length`` over the limit is refused before any of the body is read;
    a body without one (chunked) is read here, counted as it arrives, and refused once it
    passes the limit.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    def _error(self) -> PayloadTooLargeError:
        return PayloadTooLargeError(
            f"the request body is larger than {self.limit} bytes (SOFTSPEC_MAX_BODY_BYTES)"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            await error_response(self._error())(scope, receive, send)
            return
        if length:
            await self.app(scope, receive, send)  # the server stops at Content-Length
            return
        # no length (chunked): read the body here, counting, and replay it to the app
        chunks: list[bytes] = []
        seen, more = 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away mid-body
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > self.limit:
                await error_response(self._error())(scope, receive, send)
                return
            more = message.get("more_body", False)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class Observe:
    """ASGI middleware: request count, latency and in-flight gauge per route, and the
    gateway's own time in a ``Server-Timing: gateway;dur=<ms>`` response header.

    Plain ASGI (not ``@app.middleware``, whose wrapper adds a task group and memory streams
    to every request): an answer that needs no engine work, a 429 above all, costs no
    extra trips through a busy event loop. The header is the time from the request
    reaching the app to its response headers, so a client can tell the gateway's share of
    a latency from the network's and its own (bench/soak.py reports both).
    """

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500

        async def timed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                dur = f"gateway;dur={(time.perf_counter() - t0) * 1e3:.1f}".encode()
                message = {**message, "headers": [*message.get("headers", ()),
                                                  (b"server-timing", dur)]}  # fmt: skip
            await send(message)

        self.metrics.inflight.inc()
        try:
            await self.app(scope, receive, timed)
        finally:
            route = scope.get("route")
            endpoint = getattr(route, "path", "other")
            self.metrics.inflight.dec()
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)


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


def _reference(
    settings: Settings, manifest: manifest_io.EnsembleManifest, engine: Engine, gate: GatePolicy
) -> GaussianReference | None:
    """The ``prompt_distance`` reference when the ensemble has one and the engine can embed;
    a gate that needs the score on an engine that cannot embed is refused at start-up."""
    needed = gate.score_name == Score.PROMPT_DISTANCE.value or (
        gate.score_name == Score.COMBINED.value
        and manifest.gate.calibration is not None
        and manifest.gate.calibration.components == [Score.PROMPT_DISTANCE.value]
    )
    if manifest.density is None or not engine.supports_embed:
        if needed:
            raise ConfigError(
                f"the gate score {gate.score_name} needs prompt_distance, which needs "
                + (
                    "an embedder: pass --embed-url (a vLLM pooling server of the base model) "
                    "or omit --vllm-url so that serve starts one"
                    if manifest.density is not None
                    else "a reference in the ensemble: run `softspec reference`"
                )
            )
        return None
    try:
        return load_reference(Path(settings.ensemble) / manifest.density.file)
    except ValueError as exc:
        raise ConfigError(f"{exc}; refit it with `softspec reference`") from exc


def create_app(
    settings: Settings,
    engine_factory: Callable[[manifest_io.EnsembleManifest, Metrics], Engine],
    manifest: manifest_io.EnsembleManifest | None = None,
    *,
    supervise: bool = False,
    process: Restartable | None = None,
    on_give_up: Callable[[str], None] | None = None,
    fallback_transport: httpx.AsyncBaseTransport | None = None,
) -> FastAPI:
    """Build the gateway for ``settings.ensemble`` on the engine the factory makes.

    The manifest is loaded (and its adapters' hashes verified) here, at start-up, so a
    broken ensemble directory fails before the server accepts a request.

    With ``supervise`` (or a ``process``), a watch task probes the engine, answers 503 at
    once while it is down, and restarts ``process`` (the vLLM child) when it dies; after
    too many failed restarts it calls ``on_give_up`` (server/supervisor.py).

    With ``settings.fallback_url`` the gate can escalate (server/fallback.py;
    ``fallback_transport`` replaces its network in tests).
    """
    manifest = manifest or manifest_io.load(settings.ensemble)
    try:
        gate = gate_policy(settings, manifest)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    metrics = Metrics()
    engine = engine_factory(manifest, metrics)
    reference = _reference(settings, manifest, engine, gate)
    fallback = None
    if settings.fallback_url is not None:
        fallback = Fallback(
            settings.fallback_url, model=settings.fallback_model,
            api_key=settings.fallback_api_key, timeout=settings.fallback_timeout,
            metrics=metrics, transport=fallback_transport,
        )  # fmt: skip
    watch: EngineSupervisor | None = None
    if supervise or process is not None:

        async def probe() -> bool:
            return (await engine.ready()).ready

        watch = EngineSupervisor(
            probe, metrics, process=process, interval=settings.vllm_health_interval,
            timeout=settings.vllm_health_timeout, failures=settings.vllm_health_failures,
            max_restarts=settings.vllm_max_restarts, backoff=settings.vllm_restart_backoff,
            on_give_up=on_give_up,
        )  # fmt: skip

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        if fallback is not None:
            await fallback.start()
            if not await fallback.probe():  # a warning, not a failure: /ready says so
                log.warning("the fallback is not reachable at start-up: %s", fallback.detail)
        task = asyncio.create_task(watch.run()) if watch is not None else None
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await engine.close()
            if fallback is not None:
                await fallback.close()

    app = FastAPI(title="Soft Specialists", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.gate = gate
    app.state.started = time.time()
    app.state.admission = Admission(settings.max_concurrency, settings.max_queue, metrics)
    app.state.supervisor = watch
    app.state.service = EnsembleService(
        manifest, engine, gate, metrics, top_n=settings.top_logprobs, fallback=fallback,
        fallback_on_error=GateAction(settings.fallback_on_error),
        allow_loosen=settings.gate_allow_loosen, reference=reference,
    )  # fmt: skip
    install_error_handlers(app)
    app.include_router(open_router)
    app.include_router(router)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)

    app.add_middleware(Observe, metrics=metrics)

    return app
