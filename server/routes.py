"""Thin routers: parse → normalise into a Job → service → OpenAI response."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.engine import MixtureStep, SamplingParams
from server.errors import APIError, AuthenticationError, error_body
from server.protocol import ChatCompletionRequest, CompletionRequest, DecodeMode
from server.responses import (
    chat_body,
    chat_chunks,
    completion_body,
    completion_chunks,
    gate_headers,
    sse,
    token_frames,
)
from server.service import EnsembleService, Job, Outcome

__all__ = ["open_router", "router"]

T = TypeVar("T")
DEFAULT_MAX_TOKENS = 256  # chat requests without max_tokens (shrunk to fit the context)


def service(request: Request) -> EnsembleService:
    svc: EnsembleService = request.app.state.service
    return svc


def require_key(request: Request) -> None:
    """Bearer-key check when SOFTSPEC_API_KEYS is set (``/health`` stays open)."""
    keys = request.app.state.settings.api_keys
    if not keys:
        return
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() != "bearer" or token.strip() not in keys:
        raise AuthenticationError("missing or invalid API key: send `Authorization: Bearer <key>`")


open_router = APIRouter()
router = APIRouter(dependencies=[Depends(require_key)])


@open_router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    state = await service(request).engine.ready()
    body = {
        "status": "ready" if state.ready else "not ready",
        "detail": state.detail,
        "members": state.members,
    }
    if state.ready:
        return JSONResponse(body)
    return JSONResponse(
        error_body(f"not ready: {state.detail}", "upstream_unavailable", code="engine_unavailable"),
        status_code=503,
    )


@router.get("/metrics")
async def metrics(request: Request) -> PlainTextResponse:
    data = generate_latest(request.app.state.metrics.registry)
    return PlainTextResponse(data, media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models")
async def models(request: Request) -> dict[str, Any]:
    svc = service(request)
    created = int(request.app.state.started)
    m = svc.manifest
    data = [
        {
            "id": svc.model_id,
            "object": "model",
            "created": created,
            "owned_by": "softspec",
            "members": m.member_names,
            "alpha": m.alpha,
            "base_model": m.base_model,
        }
    ]
    data += [
        {
            "id": mid,
            "object": "model",
            "created": created,
            "owned_by": "softspec",
            "parent": svc.model_id,
        }
        for mid in svc.model_ids()[1:]
    ]
    return {"object": "list", "data": data}


def _job(
    svc: EnsembleService,
    req: ChatCompletionRequest | CompletionRequest,
    prompt: Any,
    limit: int | None,
) -> Job:
    want = (
        bool(req.logprobs) if isinstance(req, ChatCompletionRequest) else req.logprobs is not None
    )
    top = (req.top_logprobs or 0) if isinstance(req, ChatCompletionRequest) else (req.logprobs or 0)
    temperature = 1.0 if req.temperature is None else req.temperature
    params = SamplingParams(
        max_tokens=limit or DEFAULT_MAX_TOKENS,
        temperature=temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        stop=tuple(req.stop_list),
        seed=req.seed,
        n=req.ensemble.samples_per_member,
        top_n=svc.top_n,
    )
    return Job(
        model=req.model,
        members=svc.resolve_members(req.model, req.ensemble),
        prompt=prompt,
        params=params,
        options=req.ensemble,
        want_logprobs=want,
        top_logprobs=top,
        max_tokens_auto=limit is None,
    )


async def _disconnected(request: Request) -> None:
    """Return when the client goes away (ASGI ``http.disconnect``; the body is already read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``; if the client goes away first, cancel it (and its upstream calls).

    Event-driven: one task waits for the disconnect message, so a long request costs no
    polling.
    """
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # we are cancelled ourselves (shutdown): the work goes with us
        task.cancel()
        raise
    finally:
        watch.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    raise asyncio.CancelledError("client disconnected")


async def _respond(request: Request, job: Job, kind: str, stream: bool, include_usage: bool) -> Any:
    svc = service(request)
    abstain = request.app.state.gate.abstain_text
    if job.options.decode == DecodeMode.TOKEN:
        prompt = await svc.prepare_tokens(job)  # errors before the first byte is sent
        events = svc.stream_tokens(job, prompt)
        if stream:
            return StreamingResponse(
                _token_stream(kind, job, events, abstain, include_usage),
                media_type="text/event-stream",
            )
        outcome = await until_disconnected(request, _last(events))
    else:
        outcome = await until_disconnected(request, svc.run(job))
    if stream:
        frames = (chat_chunks if kind == "chat" else completion_chunks)(
            job, outcome, abstain, include_usage
        )
        return StreamingResponse(
            iter(frames), media_type="text/event-stream", headers=gate_headers(outcome)
        )
    body = (chat_body if kind == "chat" else completion_body)(job, outcome, abstain)
    return JSONResponse(body, headers=gate_headers(outcome))


async def _last(events: AsyncIterator[MixtureStep | Outcome]) -> Outcome:
    last: Any = None
    async for ev in events:
        last = ev
    assert isinstance(last, Outcome)
    return last


async def _token_stream(
    kind: str,
    job: Job,
    events: AsyncIterator[MixtureStep | Outcome],
    abstain: str,
    include_usage: bool,
) -> AsyncIterator[str]:
    """Token mode: each token is sent as soon as it is decided; errors end the stream."""
    frames = token_frames(kind, job)
    first = True
    try:
        async for ev in events:
            if isinstance(ev, MixtureStep):
                yield sse(frames.delta(ev.text, role=first))
                first = False
                continue
            finish = "content_filter" if ev.gate.decision == "abstain" else ev.finish_reason
            if first:
                yield sse(frames.delta("", role=True))
            yield sse(frames.final(ev, finish))
            if include_usage:
                yield sse(frames.usage(ev))
    except APIError as exc:
        yield sse(error_body(exc.message, exc.type, param=exc.param, code=exc.code))
    yield sse("[DONE]")


@router.post("/v1/chat/completions")
async def chat_completions(req: ChatCompletionRequest, request: Request) -> Any:
    svc = service(request)
    messages = [
        {"role": "system" if m.role == "developer" else m.role, "content": m.content}
        for m in req.messages
    ]
    job = _job(svc, req, messages, req.token_limit)
    include = bool(req.stream_options and req.stream_options.include_usage)
    return await _respond(request, job, "chat", req.stream, include)


@router.post("/v1/completions")
async def completions(req: CompletionRequest, request: Request) -> Any:
    svc = service(request)
    job = _job(svc, req, req.prompt, req.token_limit)
    include = bool(req.stream_options and req.stream_options.include_usage)
    return await _respond(request, job, "completion", req.stream, include)
