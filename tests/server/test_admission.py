"""Reliability of the gateway on a fake vLLM: admission control (bounded concurrency and
queue, fast 429), deadlines, the engine supervisor, strict types, limits and keys.

The fake vLLM answers through an async transport that can hold every generation until a
test opens its gate, so "the slots are full" is a state the test controls, not a race.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable, Iterator, MutableMapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from ensemble.errors import ConfigError
from ensemble.manifest import EnsembleManifest
from server.app import create_app
from server.launch import settings_from_args
from server.metrics import Metrics
from server.settings import Settings
from server.vllm_engine import VLLMEngine
from softspec.cli import main as cli_main
from tests.server.conftest import make_manifest
from tests.server.fake_vllm import FakeVLLM

CHAT = {"model": "ens", "messages": [{"role": "user", "content": "hi there"}], "max_tokens": 3}


class HeldVLLM:
    """The fake vLLM behind an async transport whose generations wait for ``gate``."""

    def __init__(self, fake: FakeVLLM) -> None:
        self.fake = fake
        self.gate: asyncio.Event | None = None  # None: answer at once
        self.held = 0
        self.entered = 0
        self.cancelled = 0
        self.down = False

    def hold(self) -> None:
        self.gate = asyncio.Event()

    def release(self) -> None:
        assert self.gate is not None
        self.gate.set()

    async def handler(self, request: httpx.Request) -> httpx.Response:
        if self.down:
            raise httpx.ConnectError("connection refused", request=request)
        if self.gate is not None and request.url.path == "/v1/completions":
            self.held += 1
            self.entered += 1
            try:
                await self.gate.wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
            finally:
                self.held -= 1
        return self.fake.handler(request)

    def paths(self, path: str) -> int:
        return sum(1 for p, _ in self.fake.calls if p == path)


def build(
    root: Path, manifest: EnsembleManifest | None = None, **settings: Any
) -> tuple[FastAPI, HeldVLLM]:
    """A gateway on a held fake vLLM; ``settings`` are Settings fields and create_app options."""
    options = {k: settings.pop(k) for k in ("supervise", "process", "on_give_up") if k in settings}
    manifest = manifest or make_manifest(root, 2)
    fake = FakeVLLM({manifest.served_name(m): i for i, m in enumerate(manifest.member_names)})
    held = HeldVLLM(fake)
    cfg = Settings(ensemble=root, max_model_len=256, **settings)

    def engine(man: EnsembleManifest, metrics: Metrics) -> VLLMEngine:
        transport = httpx.MockTransport(held.handler)
        return VLLMEngine("http://vllm", man, metrics=metrics, transport=transport)

    return create_app(cfg, engine, manifest, **options), held


@asynccontextmanager
async def serving(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            yield client


async def until(cond: Callable[[], bool], what: str, limit: float = 20.0) -> None:
    """Wait for a state (a liveness bound, not a speed assertion)."""
    for _ in range(int(limit / 0.01)):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never reached: {what}")


def envelope(r: Any, status: int, code: str | None = None) -> dict[str, Any]:
    """The error of a 4xx/5xx (httpx or TestClient response), checked to be the envelope."""
    assert r.status_code == status, r.text
    err: dict[str, Any] = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    if code is not None:
        assert err["code"] == code, err
    return err


def metric(text: str, name: str) -> float:
    """The value of one sample line of a Prometheus exposition."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


# ---------------------------------------------------------------------------- admission


def test_burst_beyond_the_queue_gets_429_at_once_while_admitted_requests_finish(
    tmp_path: Path,
) -> None:
    app, held = build(tmp_path, max_concurrency=2, max_queue=2)

    async def scenario() -> None:
        held.hold()
        async with serving(app) as client:
            admitted = [asyncio.ensure_future(client.post("/v1/chat/completions", json=CHAT))
                        for _ in range(4)]  # fmt: skip
            adm = app.state.admission
            await until(lambda: adm.active == 2 and adm.waiting == 2, "2 running, 2 waiting")
            # every slot and the queue are full, the engine answers nothing: refused now
            extra = await asyncio.gather(
                *(client.post("/v1/chat/completions", json=CHAT) for _ in range(4))
            )
            assert not any(t.done() for t in admitted)  # they are still being served
            for r in extra:
                envelope(r, 429, "queue_full")
                assert int(r.headers["retry-after"]) >= 1
                assert r.headers["server-timing"].startswith("gateway;dur=")
            held.release()
            done = await asyncio.gather(*admitted)
            assert [r.status_code for r in done] == [200] * 4
            text = (await client.get("/metrics")).text
            assert metric(text, 'softspec_admission_rejected_total{reason="queue_full"}') == 4
            assert metric(text, "softspec_admission_wait_seconds_count") == 4
            assert metric(text, "softspec_admission_active") == 0
            assert metric(text, "softspec_admission_waiting") == 0

    asyncio.run(scenario())


def test_a_refusal_is_answered_without_yielding_to_the_event_loop(tmp_path: Path) -> None:
    """The whole 429 (middleware, validation, admission, error envelope) runs in one step of
    the event loop: on a loop busy with other requests' work, each yield would be a wait."""
    app, held = build(tmp_path, max_concurrency=1, max_queue=1)

    async def scenario() -> None:
        held.hold()
        async with serving(app) as client:
            admitted = [asyncio.ensure_future(client.post("/v1/chat/completions", json=CHAT))
                        for _ in range(2)]  # fmt: skip
            adm = app.state.admission
            await until(lambda: adm.active == 1 and adm.waiting == 1, "1 running, 1 waiting")
            sent: list[Any] = []
            step = _raw_post(app, CHAT, asyncio.Event(), sent)
            with pytest.raises(StopIteration):  # finished at the first step: no suspension
                step.send(None)
            assert sent[0]["status"] == 429
            assert json.loads(sent[1]["body"])["error"]["code"] == "queue_full"
            held.release()
            assert [r.status_code for r in await asyncio.gather(*admitted)] == [200, 200]

    asyncio.run(scenario())


async def _raw_post(
    app: FastAPI, body: dict[str, Any], gone: asyncio.Event, messages: list[Any] | None = None
) -> list[Any]:
    """POST through the ASGI interface with a client that disconnects when ``gone`` is set."""
    data = json.dumps(body).encode()
    sent = False
    messages = [] if messages is None else messages

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": data, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        messages.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
        "query_string": b"", "root_path": "", "server": ("gw", 80), "client": ("c", 1),
        "headers": [(b"content-type", b"application/json"),
                    (b"content-length", str(len(data)).encode())],
    }  # fmt: skip
    await app(scope, receive, send)
    return messages


def test_a_client_that_goes_away_leaves_the_queue_without_reaching_vllm(tmp_path: Path) -> None:
    app, held = build(tmp_path, max_concurrency=1, max_queue=1)

    async def scenario() -> None:
        held.hold()
        async with serving(app) as client:
            first = asyncio.ensure_future(client.post("/v1/chat/completions", json=CHAT))
            adm = app.state.admission
            await until(lambda: adm.active == 1 and held.held > 0, "the first request runs")
            gone = asyncio.Event()
            waiter = asyncio.ensure_future(_raw_post(app, CHAT, gone))
            await until(lambda: adm.waiting == 1, "the second request waits")
            tokenized = held.paths("/tokenize")
            gone.set()
            sent = await waiter
            assert sent[0]["status"] == 499  # answered to no one, counted as client-closed
            assert adm.waiting == 0
            held.release()
            assert (await first).status_code == 200
            assert held.paths("/tokenize") == tokenized  # the second never reached vLLM
            text = (await client.get("/metrics")).text
            assert metric(text, 'softspec_admission_rejected_total{reason="cancelled_in_queue"}')
            # the queue is usable again: the slot and the place were given back
            assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200

    asyncio.run(scenario())


# ---------------------------------------------------------------------------- deadlines


def test_the_deadline_header_cancels_upstream_work(tmp_path: Path) -> None:
    app, held = build(tmp_path)

    async def scenario() -> None:
        held.hold()
        async with serving(app) as client:
            r = await client.post(
                "/v1/chat/completions", json=CHAT, headers={"x-request-timeout": "1"}
            )
            err = envelope(r, 504, "deadline_exceeded")
            assert "1 s" in err["message"]
            await until(lambda: held.held == 0, "the held generations were cancelled")
            assert held.entered > 0 and held.cancelled == held.entered  # none went on
            text = (await client.get("/metrics")).text
            assert metric(text, "softspec_deadline_exceeded_total") == 1
            assert metric(text, "softspec_admission_active") == 0

    asyncio.run(scenario())


def test_the_deadline_covers_the_queue(tmp_path: Path) -> None:
    app, held = build(tmp_path, max_concurrency=1, max_queue=1)

    async def scenario() -> None:
        held.hold()
        async with serving(app) as client:
            first = asyncio.ensure_future(client.post("/v1/chat/completions", json=CHAT))
            await until(lambda: held.held > 0, "the first request runs")
            r = await client.post(
                "/v1/chat/completions", json=CHAT, headers={"x-request-timeout": "1"}
            )
            envelope(r, 504, "deadline_exceeded")
            assert app.state.admission.waiting == 0
            held.release()
            assert (await first).status_code == 200

    asyncio.run(scenario())


@pytest.mark.parametrize("value", ["0", "0.5", "-3", "soon"])
def test_a_deadline_header_below_a_minimal_generation_is_400(tmp_path: Path, value: str) -> None:
    app, _ = build(tmp_path)
    with TestClient(app) as client:
        r = client.post("/v1/chat/completions", json=CHAT, headers={"x-request-timeout": value})
        assert envelope(r, 400)["param"] == "x-request-timeout"
        ok = client.post("/v1/chat/completions", json=CHAT, headers={"x-request-timeout": "2"})
        assert ok.status_code == 200, ok.text


# ---------------------------------------------------------------------------- supervisor


def test_an_external_engine_that_goes_away_gets_fast_503s_and_is_used_again(
    tmp_path: Path,
) -> None:
    app, held = build(tmp_path, supervise=True, vllm_health_interval=0.02, vllm_health_failures=2)

    async def scenario() -> None:
        async with serving(app) as client:
            sup = app.state.supervisor
            assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200
            held.down = True
            await until(lambda: sup.state == "down", "the engine is seen down")
            calls = len(held.fake.calls)
            r = await client.post("/v1/chat/completions", json=CHAT)
            envelope(r, 503, "engine_unavailable")
            assert int(r.headers["retry-after"]) >= 1
            ready = await client.get("/ready")
            envelope(ready, 503, "engine_unavailable")
            assert "retry-after" in ready.headers
            health = await client.get("/health")
            assert health.status_code == 200
            assert health.json()["status"] == "degraded"
            assert health.json()["engine"]["state"] == "down"
            assert len(held.fake.calls) == calls  # refused without touching the engine
            held.down = False
            await until(lambda: sup.state == "up", "the engine is seen up again")
            assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200
            assert (await client.get("/health")).json()["status"] == "ok"
            text = (await client.get("/metrics")).text
            assert metric(text, "softspec_engine_up") == 1
            assert metric(text, 'softspec_admission_rejected_total{reason="engine_down"}') == 1

    asyncio.run(scenario())


class FakeChild:
    """A stand-in for the vLLM child: ``fail_starts`` restarts fail before one succeeds."""

    def __init__(self, held: HeldVLLM, fail_starts: int = 0) -> None:
        self.held = held
        self.fail_starts = fail_starts
        self.alive = True
        self.attempts = 0
        self.startup_seconds: float | None = 30.0

    def running(self) -> bool:
        return self.alive

    def exit_code(self) -> int | None:
        return None if self.alive else -9

    def kill(self) -> None:  # SIGKILL
        self.alive = False
        self.held.down = True

    def restart(self) -> None:
        self.attempts += 1
        if self.attempts <= self.fail_starts:
            raise RuntimeError(f"start {self.attempts} failed")
        self.alive = True
        self.held.down = False


def test_a_dead_child_is_restarted_and_counted(tmp_path: Path) -> None:
    box: list[FakeChild] = []
    app, held = build(
        tmp_path, vllm_health_interval=0.02, vllm_restart_backoff=0.01,
        process=_LateChild(box),
    )  # fmt: skip
    child = FakeChild(held, fail_starts=1)
    box.append(child)

    async def scenario() -> None:
        async with serving(app) as client:
            sup = app.state.supervisor
            child.kill()
            await until(lambda: sup.state != "up", "the death is seen")
            r = await client.post("/v1/chat/completions", json=CHAT)
            err = envelope(r, 503, "engine_unavailable")
            assert "retry-after" in r.headers and err["type"] == "upstream_unavailable"
            await until(lambda: sup.state == "up", "the child is back")
            assert child.attempts == 2  # one failed start, then one that worked (backoff)
            assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200
            health = (await client.get("/health")).json()
            assert health == {"status": "ok", "engine": health["engine"]}
            assert health["engine"]["restarts"] == 1
            text = (await client.get("/metrics")).text
            assert metric(text, 'softspec_engine_restarts_total{result="ok"}') == 1
            assert metric(text, 'softspec_engine_restarts_total{result="failed"}') == 1

    asyncio.run(scenario())


class _LateChild:
    """Forwards to the FakeChild appended to ``box`` (built after the app)."""

    def __init__(self, box: list[FakeChild]) -> None:
        self.box = box

    @property
    def startup_seconds(self) -> float | None:
        return self.box[0].startup_seconds

    def running(self) -> bool:
        return self.box[0].running()

    def exit_code(self) -> int | None:
        return self.box[0].exit_code()

    def restart(self) -> None:
        self.box[0].restart()


def test_a_child_that_cannot_be_restarted_makes_the_gateway_give_up(tmp_path: Path) -> None:
    box: list[FakeChild] = []
    reasons: list[str] = []
    app, held = build(
        tmp_path, vllm_health_interval=0.02, vllm_restart_backoff=0.01, vllm_max_restarts=3,
        process=_LateChild(box), on_give_up=reasons.append,
    )  # fmt: skip
    child = FakeChild(held, fail_starts=99)
    box.append(child)

    async def scenario() -> None:
        async with serving(app) as client:
            child.kill()
            await until(lambda: bool(reasons), "the supervisor gives up")
            assert child.attempts == 3
            assert "3 restarts" in reasons[0]
            health = await client.get("/health")
            assert health.status_code == 503 and health.json()["status"] == "failed"
            envelope(await client.post("/v1/chat/completions", json=CHAT), 503)

    asyncio.run(scenario())


# ---------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    "flags,needle",
    [
        (["--max-concurrency", "0"], "--max-concurrency: Input should be greater than 0"),
        (["--max-queue", "-1"], "--max-queue: Input should be greater than 0"),
        (["--max-concurrency", "8", "--max-queue", "4"], "max_queue (4) is smaller"),
        (["--request-deadline", "0.5"], "shorter than a minimal generation"),
        (["--request-deadline", "0"], "--request-deadline: Input should be greater than 0"),
        (["--max-body-bytes", "0"], "--max-body-bytes"),
        (["--vllm-max-restarts", "0"], "--vllm-max-restarts"),
    ],
)
def test_bad_reliability_settings_are_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], needle: str
) -> None:
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        settings_from_args(["--ensemble", str(tmp_path), *flags])
    assert cli_main(["serve", "--ensemble", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err, err


def test_reliability_settings_come_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SOFTSPEC_MAX_CONCURRENCY", "3")
    monkeypatch.setenv("SOFTSPEC_MAX_QUEUE", "9")
    monkeypatch.setenv("SOFTSPEC_REQUEST_DEADLINE", "42")
    s = settings_from_args(["--ensemble", str(tmp_path), "--max-queue", "12"])
    assert (s.max_concurrency, s.max_queue, s.request_deadline) == (3, 12, 42.0)


# ---------------------------------------------------------------------------- strict input


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    app, _ = build(tmp_path, api_keys="k-one,second-key", max_body_bytes=4096,
                   max_prompt_chars=200)  # fmt: skip
    with TestClient(app, headers={"Authorization": "Bearer second-key"}) as c:
        yield c


@pytest.mark.parametrize(
    "path,extra,param",
    [
        ("/v1/chat/completions", {"max_tokens": True}, "max_tokens"),
        ("/v1/chat/completions", {"max_completion_tokens": False}, "max_completion_tokens"),
        ("/v1/chat/completions", {"temperature": True}, "temperature"),
        ("/v1/chat/completions", {"top_p": True}, "top_p"),
        ("/v1/chat/completions", {"seed": True}, "seed"),
        ("/v1/chat/completions", {"max_tokens": 2.0}, "max_tokens"),
        ("/v1/chat/completions", {"top_logprobs": True, "logprobs": True}, "top_logprobs"),
        ("/v1/chat/completions", {"stream": 1}, "stream"),
        ("/v1/chat/completions", {"logprobs": "true"}, "logprobs"),
        ("/v1/chat/completions", {"ensemble": {"samples_per_member": True}},
         "ensemble.samples_per_member"),
        ("/v1/completions", {"prompt": [True, 5]}, "prompt"),
        ("/v1/completions", {"prompt": "hi", "logprobs": True}, "logprobs"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": True}, "max_tokens"),
    ],
)  # fmt: skip
def test_booleans_are_not_numbers(
    client: TestClient, path: str, extra: dict[str, Any], param: str
) -> None:
    body = {**CHAT, **extra} if "chat" in path else {"model": "ens", **extra}
    r = client.post(path, json=body)
    err = envelope(r, 400)
    assert err["param"] is not None and err["param"].startswith(param), err


def test_numbers_stay_numbers(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", json={**CHAT, "temperature": 1, "top_p": 1})
    assert r.status_code == 200, r.text
    r = client.post("/v1/completions", json={"model": "ens", "prompt": [99, 3], "max_tokens": 2})
    assert r.status_code == 200, r.text


def test_models_show_no_server_paths(tmp_path: Path) -> None:
    base = make_manifest(tmp_path, 2)
    manifest = base.model_copy(update={"base_model": "/srv/secret/models/SmolLM2-135M"})
    app, _ = build(tmp_path, manifest=manifest)
    with TestClient(app) as c:
        text = c.get("/v1/models").text
        assert "/srv" not in text and "secret" not in text
        assert c.get("/v1/models").json()["data"][0]["base_model"] == "SmolLM2-135M"
    hub = base.model_copy(update={"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct"})
    app, _ = build(tmp_path / "hub", manifest=hub)
    with TestClient(app) as c:
        assert c.get("/v1/models").json()["data"][0]["base_model"] == hub.base_model


# ---------------------------------------------------------------------------- limits and keys


def test_a_body_over_the_limit_is_413(client: TestClient) -> None:
    big = {**CHAT, "user": "x" * 5000}
    err = envelope(client.post("/v1/chat/completions", json=big), 413, "request_too_large")
    assert "4096 bytes" in err["message"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'{"model": "ens", "user": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}'

    r = client.post(
        "/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"}
    )
    envelope(r, 413, "request_too_large")
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 200


def test_a_prompt_over_the_limit_is_400_before_tokenising(client: TestClient) -> None:
    long = {**CHAT, "messages": [{"role": "user", "content": "word " * 30}] * 2}
    err = envelope(client.post("/v1/chat/completions", json=long), 400, "prompt_too_long")
    assert err["param"] == "messages" and "300 characters" in err["message"]
    ids = {"model": "ens", "prompt": [5] * 201}
    err = envelope(client.post("/v1/completions", json=ids), 400, "prompt_too_long")
    assert err["param"] == "prompt" and "201 token ids" in err["message"]


def test_api_keys_match_exactly_and_are_never_logged(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for bad in ["second-ke", "second-key-", "k-on", "", "SECOND-KEY"]:
        r = client.post("/v1/chat/completions", json=CHAT,
                        headers={"Authorization": f"Bearer {bad}"})  # fmt: skip
        envelope(r, 401, "invalid_api_key")
        assert r.headers["www-authenticate"] == "Bearer"
    r = client.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer k-one"})
    assert r.status_code == 200
    settings = client.app.state.settings  # type: ignore[attr-defined]
    assert "second-key" not in repr(settings) and "k-one" not in str(settings)
    assert "second-key" not in caplog.text and "k-one" not in caplog.text


def test_a_vanishing_temperature_is_greedy(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", json={**CHAT, "temperature": 1e-300})
    assert r.status_code == 200, r.text
    greedy = client.post("/v1/chat/completions", json={**CHAT, "temperature": 0})
    assert r.json()["choices"][0]["message"] == greedy.json()["choices"][0]["message"]
