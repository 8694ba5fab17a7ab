"""Thin routers: parse → normalise into a Job → service → OpenAI response."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import PurePath
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.types import Receive, Scope, Send

from server.admission import Admission
from server.engine import MixtureStep
from server.errors import (
    APIError,
    AuthenticationError,
    ClientClosedError,
    DeadlineExceededError,
    InvalidRequestError,
    error_body,
    error_headers,
)
from server.fallback import FallbackError, FallbackStream
from server.protocol import ChatCompletionRequest, CompletionRequest, DecodeMode, EnsembleOptions
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
from server.settings import MIN_DEADLINE
from server.supervisor import EngineSupervisor

__all__ = ["open_router", "router"]

T = TypeVar("T")


def service(request: Request) -> EnsembleService:
    svc: EnsembleService = request.app.state.service
    return svc


def supervisor(request: Request) -> EngineSupervisor | None:
    sup: EngineSupervisor | None = request.app.state.supervisor
    return sup


async def require_key(request: Request) -> None:
    """Bearer-key check when SOFTSPEC_API_KEYS is set (``/health`` stays open).

    ``async`` although it never awaits: FastAPI runs a plain ``def`` dependency in a worker
    thread, a hop through the thread pool and back on every request, 429s included
    (tests/server/test_admission.py checks that a refusal never yields to the event loop).

    Every configured key is compared in constant time (``hmac.compare_digest``), so the
    answer's timing says nothing about how much of a key was right; keys are never logged.
    """
    keys = request.app.state.settings.api_keys
    if not keys:
        return
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    given = token.strip().encode()
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given, key.encode())
    if scheme.lower() != "bearer" or not matched:
        raise AuthenticationError("missing or invalid API key: send `Authorization: Bearer <key>`")


open_router = APIRouter()
router = APIRouter(dependencies=[Depends(require_key)])


@open_router.get("/health")
async def health(request: Request) -> JSONResponse:
    """Liveness: 200 while the gateway can serve or is healing itself (the engine's state is
    in the body: ``degraded`` while it is down or restarting), 503 once it has given up."""
    sup = supervisor(request)
    if sup is None:
        return JSONResponse({"status": "ok"})
    status = "ok" if sup.up else "failed" if sup.state == "failed" else "degraded"
    body = {"status": status, "engine": sup.status()}
    return JSONResponse(body, status_code=503 if status == "failed" else 200)


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    sup = supervisor(request)
    if sup is not None and not sup.up:
        try:
            sup.check()
        except APIError as exc:
            down = error_body(f"not ready: {exc.message}", exc.type, code=exc.code)
            return JSONResponse(down, status_code=503, headers=error_headers(exc))
    svc = service(request)
    state = await svc.engine.ready()
    body: dict[str, Any] = {
        "status": "ready" if state.ready else "not ready",
        "detail": state.detail,
        "members": state.members,
    }
    if svc.fallback is not None:  # unreachable is reported, not fatal: escalations fail over
        if not svc.fallback.reachable:
            await svc.fallback.probe()
        body["fallback"] = {"reachable": svc.fallback.reachable, "detail": svc.fallback.detail}
    if state.ready:
        return JSONResponse(body)
    return JSONResponse(
        error_body(f"not ready: {state.detail}", "upstream_unavailable", code="engine_unavailable"),
        status_code=503,
        headers={"retry-after": "5"},
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
            "base_model": display_name(m.base_model),
            "gate": gate_summary(request),
            "prompt_distance": None
            if m.density is None
            else {
                **m.density.model_dump(mode="json", include={"layer", "pooling", "shrinkage", "n"}),
                "served": svc.reference is not None,
            },
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


def gate_summary(request: Request) -> dict[str, Any]:
    """The gate as served: the effective policy, who may change it per request, the
    fallback, and the manifest's calibration record (its method, sample size, guarantee
    …; the raw calibration scores left out)."""
    svc = service(request)
    settings = request.app.state.settings
    gate: dict[str, Any] = {
        "score_name": svc.gate.score_name,
        "threshold": svc.gate.threshold,
        "action": svc.gate.action.value,
        "allow_loosen": svc.allow_loosen,
        "decides_before_generation": svc.request_gate(EnsembleOptions()).can_decide_early,
    }
    fb = svc.fallback
    gate["fallback"] = (
        None
        if fb is None
        else {"model": fb.model, "reachable": fb.reachable, "on_error": settings.fallback_on_error}
    )
    record = svc.manifest.gate.model_dump(mode="json", exclude={"score_name", "threshold"})
    gate.update({k: _without_arrays(v) for k, v in record.items()})
    return gate


def _without_arrays(value: Any) -> Any:
    """``value`` without its long numeric arrays (calibration scores), at any depth."""
    if isinstance(value, dict):
        kept = {k: _without_arrays(v) for k, v in value.items() if not _is_array(v)}
        return kept
    return value


def _is_array(value: Any) -> bool:
    if isinstance(value, list):
        return len(value) > 8 and all(isinstance(x, int | float) for x in value)
    if isinstance(value, dict) and value:
        return all(_is_array(v) for v in value.values())
    return False


def display_name(base_model: str) -> str:
    """A base model as clients may see it: a hub id as is, a local path by its last part
    (the server's directory layout is not the client's business)."""
    p = PurePath(base_model)
    local = p.is_absolute() or base_model.startswith((".", "~")) or len(p.parts) > 2
    return p.name if local else base_model


def _job(
    svc: EnsembleService, req: ChatCompletionRequest | CompletionRequest, prompt: Any, kind: str
) -> Job:
    """The request as a :class:`Job`, its decode mode resolved (``resolve_decode``)."""
    job = Job(
        model=req.model,
        members=svc.resolve_members(req.model, req.ensemble),
        prompt=prompt,
        params=req.to_sampling_params(svc.top_n),
        options=req.ensemble,
        want_logprobs=req.logprobs_wanted,
        top_logprobs=req.logprobs_top,
        max_tokens_auto=req.token_limit is None,
        gate=svc.request_gate(req.ensemble),  # a bad ensemble.gate is a 400 before any work
        kind=kind,
        forward=req.fallback_body(),
    )
    decode = svc.resolve_decode(job, stream=bool(req.stream))
    if decode != req.ensemble.decode:
        job.options = job.options.model_copy(update={"decode": decode})
    return job


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
    except BaseException:  # we are cancelled (deadline, shutdown): the work goes with us
        task.cancel()
        # and has unwound (left the queue, given its slot back) before the answer is sent
        await asyncio.wait({task})
        raise
    finally:
        watch.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    raise asyncio.CancelledError("client disconnected")


def _budget(request: Request, header: float | None) -> float:
    """The request's deadline in seconds: the setting, or the client's header if shorter."""
    cap: float = request.app.state.settings.request_deadline
    return cap if header is None else min(header, cap)


def _check_prompt(request: Request, prompt: Any, param: str) -> None:
    """Refuse an oversized prompt before it costs a tokenisation (characters or token ids)."""
    limit: int = request.app.state.settings.max_prompt_chars
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], dict):
        size = sum(len(m["content"]) for m in prompt)
    else:
        size = len(prompt)
    if size > limit:
        unit = "token ids" if isinstance(prompt, list) and param == "prompt" else "characters"
        raise InvalidRequestError(
            f"the prompt is {size} {unit} long; the limit is {limit} (SOFTSPEC_MAX_PROMPT_CHARS)",
            param=param,
            code="prompt_too_long",
        )


def _engine_up(request: Request) -> None:
    sup = supervisor(request)
    if sup is not None and not sup.up:
        request.app.state.metrics.rejected.labels("engine_down").inc()
        sup.check()


async def _within_deadline(request: Request, work: Awaitable[T], deadline: float) -> T:
    """Await ``work``; past ``deadline`` seconds it is cancelled (its upstream calls with it)."""
    limit = asyncio.timeout(deadline)
    try:
        async with limit:
            return await work
    except TimeoutError as exc:
        if not limit.expired():
            raise
        request.app.state.metrics.deadline_exceeded.inc()
        raise DeadlineExceededError(
            f"the request did not finish within its deadline of {deadline:g} s; its engine work "
            "was cancelled (raise x-request-timeout or SOFTSPEC_REQUEST_DEADLINE, or ask for "
            "fewer tokens)"
        ) from exc


async def _admitted(
    request: Request,
    work: Callable[[], Awaitable[T]],
    deadline: float,
    hold: contextlib.AsyncExitStack | None = None,
) -> T:
    """Engine up → a slot (waiting in the queue, or 429 at once) → ``work``.

    All of it within ``deadline`` and cancelled if the client goes away, so a request that
    is given up on leaves the queue, or stops its upstream calls. With ``hold`` the slot is
    not given back on return but pushed onto ``hold`` (a streamed answer keeps it).
    """
    _engine_up(request)
    admission: Admission = request.app.state.admission
    admission.refuse_if_full()  # before any task or await: a refusal waits behind nothing

    async def run() -> T:
        async with contextlib.AsyncExitStack() as local:
            await local.enter_async_context(admission.slot())
            _engine_up(request)  # it may have gone down while we waited
            result = await work()
            if hold is not None:
                hold.push_async_exit(local.pop_all())
            return result

    try:
        return await _within_deadline(request, until_disconnected(request, run()), deadline)
    except asyncio.CancelledError as exc:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise  # we are cancelled ourselves (shutdown)
        # the client went away: its work is cancelled; answer (to no one) instead of
        # failing the middleware, so the request is counted as 499, not as a server error
        raise ClientClosedError("the client closed the connection; its work was cancelled") from exc


class _HeldStream(StreamingResponse):
    """A streamed answer that gives its admission slot back when the stream ends (or dies)."""

    def __init__(self, content: Any, hold: contextlib.AsyncExitStack, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.hold = hold

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.hold.aclose()


async def _respond(
    request: Request, job: Job, stream: bool, include_usage: bool, deadline: float
) -> Any:
    svc = service(request)
    abstain = request.app.state.gate.abstain_text
    if job.options.decode == DecodeMode.TOKEN:
        if stream:
            hold = contextlib.AsyncExitStack()
            ends = time.monotonic() + deadline
            try:  # errors (429, 503, bad prompt) before the first byte is sent
                prompt = await _admitted(request, lambda: svc.prepare_tokens(job), deadline, hold)
            except BaseException:
                await hold.aclose()
                raise
            events = svc.stream_tokens(job, prompt)
            return _HeldStream(
                _token_stream(svc, job, events, abstain, include_usage, ends),
                hold,
                media_type="text/event-stream",
            )

        async def tokens() -> Outcome:
            prompt = await svc.prepare_tokens(job)
            events = svc.stream_tokens(job, prompt, live=False)
            return await _escalated(svc, job, await _last(events))

        outcome = await _admitted(request, tokens, deadline)
    else:
        hold = contextlib.AsyncExitStack()

        async def sequence() -> Outcome | tuple[FallbackStream, Outcome]:
            out = await svc.run(job)
            if out.gate.decision != "escalate":
                return out
            if not stream:
                return await svc.escalate(job, out)
            opened = await svc.open_escalation(job, out)  # relayed below, slot held
            return opened if isinstance(opened, Outcome) else (opened, out)

        try:
            result = await _admitted(request, sequence, deadline, hold)
        except BaseException:
            await hold.aclose()
            raise
        if isinstance(result, tuple):
            relay, decided = result
            return _HeldStream(
                _relay(svc, job, relay, decided, include_usage, role=True),
                hold,
                media_type="text/event-stream",
                headers=gate_headers(decided),
            )
        await hold.aclose()
        outcome = result
    if stream:
        frames = (chat_chunks if job.kind == "chat" else completion_chunks)(
            job, outcome, abstain, include_usage
        )
        return StreamingResponse(
            iter(frames), media_type="text/event-stream", headers=gate_headers(outcome)
        )
    body = (chat_body if job.kind == "chat" else completion_body)(job, outcome, abstain)
    return JSONResponse(body, headers=gate_headers(outcome))


async def _escalated(svc: EnsembleService, job: Job, out: Outcome) -> Outcome:
    return await svc.escalate(job, out) if out.gate.decision == "escalate" else out


async def _relay(
    svc: EnsembleService,
    job: Job,
    relay: FallbackStream,
    decided: Outcome,
    include_usage: bool,
    role: bool,
) -> AsyncIterator[str]:
    """The fallback's answer as our chunks (after the ensemble decided to escalate), then
    the final chunk with the ensemble's uncertainty and ``gate.routed_to``. A failure
    after the first piece ends the stream with an error event (it cannot be taken back)."""
    frames = token_frames(job.kind, job)
    pieces: list[str] = []
    try:
        async for piece in relay.pieces():
            yield sse(frames.delta(piece, role=role and not pieces))
            pieces.append(piece)
    except FallbackError as exc:
        svc.relay_broke(exc)
        yield sse(error_body(f"the fallback failed mid-answer: {exc}", "upstream_error",
                             code="fallback_failed"))  # fmt: skip
        yield sse("[DONE]")
        return
    finally:
        await relay.aclose()
    if role and not pieces:
        yield sse(frames.delta("", role=True))
    out = svc.relayed(decided, relay, "".join(pieces))
    yield sse(frames.final(out, out.finish_reason))
    if include_usage:
        yield sse(frames.usage(out))
    yield sse("[DONE]")


async def _last(events: AsyncIterator[MixtureStep | Outcome]) -> Outcome:
    last: Any = None
    async for ev in events:
        last = ev
    assert isinstance(last, Outcome)
    return last


async def _token_stream(
    svc: EnsembleService,
    job: Job,
    events: AsyncIterator[MixtureStep | Outcome],
    abstain: str,
    include_usage: bool,
    ends: float,
) -> AsyncIterator[str]:
    """Token mode: each token is sent as soon as it is decided — unless the gate could
    withhold the answer (abstain, escalate): then the tokens are held back until the gate
    has decided, so no token of a withheld answer reaches the client (docs/routing.md).
    Errors (and the deadline, at ``ends`` on the monotonic clock) end the stream."""
    frames = token_frames(job.kind, job)
    held: list[str] | None = [] if svc.gate_for(job).withholds else None
    first = True
    try:
        while True:
            try:
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for swallows a
                # cancellation (client gone, shutdown) that meets a finished await
                async with asyncio.timeout(max(0.0, ends - time.monotonic())):
                    ev = await anext(events)
            except StopAsyncIteration:
                break
            except TimeoutError as exc:
                raise DeadlineExceededError(
                    "the stream did not finish within its deadline; generation was stopped"
                ) from exc
            if isinstance(ev, MixtureStep):
                if held is not None:
                    held.append(ev.text)
                    continue
                yield sse(frames.delta(ev.text, role=first))
                first = False
                continue
            if ev.gate.decision == "escalate":
                opened = await svc.open_escalation(job, ev)
                if not isinstance(opened, Outcome):
                    async for frame in _relay(svc, job, opened, ev, include_usage, role=first):
                        yield frame
                    return
                ev = opened  # the fallback failed: the failure policy's outcome
            if ev.gate.decision == "abstain":
                yield sse(frames.delta(abstain, role=first))
                first = False
            elif held:
                for piece in held:
                    yield sse(frames.delta(piece, role=first))
                    first = False
            elif ev.decode_fallback is not None and ev.text:  # answered in sequence mode
                yield sse(frames.delta(ev.text, role=first))
                first = False
            finish = "content_filter" if ev.gate.decision == "abstain" else ev.finish_reason
            if first:
                yield sse(frames.delta("", role=True))
            yield sse(frames.final(ev, finish))
            if include_usage:
                yield sse(frames.usage(ev))
    except APIError as exc:
        yield sse(error_body(exc.message, exc.type, param=exc.param, code=exc.code))
    finally:
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            await aclose()
    yield sse("[DONE]")


DeadlineHeader = Annotated[
    float | None,
    Header(
        alias="x-request-timeout",
        ge=MIN_DEADLINE,
        le=86_400,
        description="seconds this request may take in all (queue + engine); "
        "capped by SOFTSPEC_REQUEST_DEADLINE",
    ),
]


@router.post("/v1/chat/completions")
async def chat_completions(
    req: ChatCompletionRequest, request: Request, timeout: DeadlineHeader = None
) -> Any:
    svc = service(request)
    messages = [
        {"role": "system" if m.role == "developer" else m.role, "content": m.content}
        for m in req.messages
    ]
    _check_prompt(request, messages, "messages")
    job = _job(svc, req, messages, "chat")
    include = bool(req.stream_options and req.stream_options.include_usage)
    return await _respond(request, job, req.stream, include, _budget(request, timeout))


@router.post("/v1/completions")
async def completions(
    req: CompletionRequest, request: Request, timeout: DeadlineHeader = None
) -> Any:
    svc = service(request)
    _check_prompt(request, req.prompt, "prompt")
    job = _job(svc, req, req.prompt, "completion")
    include = bool(req.stream_options and req.stream_options.include_usage)
    return await _respond(request, job, req.stream, include, _budget(request, timeout))
