"""Every failure is an OpenAI error envelope; faults upstream map to 503/504; auth; cancel."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import httpx
import pytest

from server.routes import until_disconnected

MESSAGES = [{"role": "user", "content": "hi"}]


def envelope(r: httpx.Response, status: int, param: str | None = None) -> dict:  # type: ignore[type-arg]
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    return err  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    "body,param,needle",
    [
        ({"model": "ens", "messages": []}, "messages", "at least 1"),
        ({"model": "ens"}, "messages", "missing"),
        (
            {"model": "ens", "messages": MESSAGES, "temperature": 3},
            "temperature",
            "less than or equal to 2",
        ),
        ({"model": "ens", "messages": MESSAGES, "temperature": "hot"}, "temperature", "number"),
        ({"model": "ens", "messages": MESSAGES, "top_p": 0}, "top_p", "greater than 0"),
        (
            {"model": "ens", "messages": MESSAGES, "max_tokens": 0},
            "max_tokens",
            "greater than or equal to 1",
        ),
        ({"model": "ens", "messages": MESSAGES, "n": 2}, "n", "samples_per_member"),
        ({"model": "ens", "messages": MESSAGES, "frobnicate": 1}, "frobnicate", "unrecognized"),
        (
            {"model": "ens", "messages": MESSAGES, "ensemble": {"decode": "beam"}},
            "ensemble.decode",
            "sequence",
        ),
        (
            {"model": "ens", "messages": MESSAGES, "presence_penalty": 0.5},
            "presence_penalty",
            "not supported",
        ),
        (
            {"model": "ens", "messages": [{"role": "wizard", "content": "x"}]},
            "messages.0.role",
            "user",
        ),
    ],
)
def test_bad_fields_are_400_with_param(gateway, body, param, needle) -> None:  # type: ignore[no-untyped-def]
    client, _, _ = gateway(k=2)
    err = envelope(client.post("/v1/chat/completions", json=body), 400, param)
    assert err["type"] == "invalid_request_error" and needle in err["message"], err


def test_malformed_json(gateway) -> None:  # type: ignore[no-untyped-def]
    client, _, _ = gateway(k=2)
    r = client.post(
        "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert "not valid JSON" in envelope(r, 400)["message"]


def test_unknown_model_and_member(gateway) -> None:  # type: ignore[no-untyped-def]
    client, _, _ = gateway(k=2)
    err = envelope(
        client.post("/v1/chat/completions", json={"model": "gpt-9", "messages": MESSAGES}),
        404,
        "model",
    )
    assert err["code"] == "model_not_found" and "ens:m0" in err["message"]
    envelope(
        client.post("/v1/chat/completions", json={"model": "ens:m7", "messages": MESSAGES}),
        404,
        "model",
    )
    body = {"model": "ens", "messages": MESSAGES, "ensemble": {"members": ["m0", "m9"]}}
    err = envelope(client.post("/v1/chat/completions", json=body), 400, "ensemble.members")
    assert "m9" in err["message"]


def test_max_tokens_beyond_context(gateway) -> None:  # type: ignore[no-untyped-def]
    client, _, _ = gateway(k=2, max_model_len=32)
    body = {"model": "ens", "messages": MESSAGES, "max_tokens": 40}
    err = envelope(client.post("/v1/chat/completions", json=body), 400, "max_tokens")
    assert "context length of 32" in err["message"]
    body = {"model": "ens", "messages": MESSAGES}  # no max_tokens: fitted to the context
    assert client.post("/v1/chat/completions", json=body).status_code == 200


def test_token_decode_on_a_vllm_without_lockstep_is_answered_in_sequence_mode(gateway) -> None:  # type: ignore[no-untyped-def]  # fmt: skip
    """The fake vLLM does not force groups (no lock-step processor), so every group
    'splits'; the gateway tries its groups, then answers in sequence mode and says so."""
    client, _, _ = gateway(k=2)
    for stream in (False, True):
        body = {
            "model": "ens",
            "messages": MESSAGES,
            "stream": stream,
            "ensemble": {"decode": "token"},
        }
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        if stream:
            chunks = [json.loads(x[6:]) for x in r.text.splitlines() if x.startswith("data: {")]
            text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
            choice = chunks[-1]["choices"][0]
        else:
            choice = r.json()["choices"][0]
            text = choice["message"]["content"]
        assert text
        assert choice["decode"]["mode"] == "sequence"
        assert "split 3 times" in choice["decode"]["fallback"]
    metrics = client.get("/metrics").text
    assert 'softspec_lockstep_requests_total{outcome="fallback"} 2.0' in metrics


def test_unknown_route_is_an_envelope(gateway) -> None:  # type: ignore[no-untyped-def]
    client, _, _ = gateway(k=2)
    envelope(client.get("/v1/nope"), 404)


def test_upstream_down_then_back(gateway) -> None:  # type: ignore[no-untyped-def]
    client, fake, _ = gateway(k=2)

    def down(request: httpx.Request) -> None:
        raise httpx.ConnectError("connection refused", request=request)

    fake.fail = down
    err = envelope(
        client.post("/v1/chat/completions", json={"model": "ens", "messages": MESSAGES}), 503
    )
    assert "unreachable" in err["message"]
    envelope(client.get("/ready"), 503)
    assert client.get("/health").status_code == 200  # the gateway itself stays up
    fake.fail = None
    assert (
        client.post("/v1/chat/completions", json={"model": "ens", "messages": MESSAGES}).status_code
        == 200
    )
    assert 'kind="unavailable"' in client.get("/metrics").text


def test_upstream_timeout_is_504(gateway) -> None:  # type: ignore[no-untyped-def]
    client, fake, _ = gateway(k=2)

    def slow(request: httpx.Request) -> None:
        if request.url.path == "/v1/completions":
            raise httpx.ReadTimeout("timed out", request=request)

    fake.fail = slow
    err = envelope(
        client.post("/v1/chat/completions", json={"model": "ens", "messages": MESSAGES}), 504
    )
    assert err["type"] == "upstream_timeout"


def test_upstream_500_is_502(gateway) -> None:  # type: ignore[no-untyped-def]
    client, fake, _ = gateway(k=2)

    def boom(request: httpx.Request) -> httpx.Response | None:
        if request.url.path == "/v1/completions":
            return httpx.Response(500, json={"error": {"message": "CUDA exploded"}})
        return None

    fake.fail = boom
    err = envelope(
        client.post("/v1/chat/completions", json={"model": "ens", "messages": MESSAGES}), 502
    )
    assert "CUDA exploded" in err["message"]


def test_api_keys(gateway) -> None:  # type: ignore[no-untyped-def]
    client, _, _ = gateway(k=2, api_keys="k1,k2")
    body = {"model": "ens", "messages": MESSAGES}
    err = envelope(client.post("/v1/chat/completions", json=body), 401)
    assert err["type"] == "authentication_error"
    envelope(
        client.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer nope"}),
        401,
    )
    ok = client.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer k2"})
    assert ok.status_code == 200
    envelope(client.get("/v1/models"), 401)
    assert client.get("/health").status_code == 200


def test_client_disconnect_cancels_upstream_work() -> None:
    cancelled = asyncio.Event()

    async def upstream() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def scenario() -> None:
        async def receive() -> dict:  # type: ignore[type-arg]
            await asyncio.sleep(0.05)  # the client goes away while upstream work runs
            return {"type": "http.disconnect"}

        request = SimpleNamespace(receive=receive)
        with pytest.raises(asyncio.CancelledError):
            await until_disconnected(request, asyncio.gather(upstream(), upstream()))  # type: ignore[arg-type]

    asyncio.run(scenario())
    assert cancelled.is_set()


def test_cancelled_handler_cancels_upstream_work() -> None:
    cancelled = asyncio.Event()

    async def upstream() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def scenario() -> None:
        async def receive() -> dict:  # type: ignore[type-arg]
            await asyncio.sleep(30)  # the client stays
            return {"type": "http.disconnect"}

        request = SimpleNamespace(receive=receive)
        handler = asyncio.ensure_future(until_disconnected(request, upstream()))  # type: ignore[arg-type]
        await asyncio.sleep(0.05)
        handler.cancel()  # e.g. the server shuts down
        with pytest.raises(asyncio.CancelledError):
            await handler
        await asyncio.wait_for(cancelled.wait(), 1.0)  # before asyncio.run cancels leftovers

    asyncio.run(scenario())


def test_decode_defaults_to_token_mode_unless_the_request_or_gate_needs_sequence_mode(gateway) -> None:  # type: ignore[no-untyped-def]  # fmt: skip
    """Without ``ensemble.decode`` the gateway picks token mode, except for what only
    sequence mode produces; the fake vLLM cannot decode in lock-step, so a request that
    went to token mode is recognisable by its fallback note."""

    def mode(client, **ensemble) -> tuple[str, str | None]:  # type: ignore[no-untyped-def]
        body = {"model": "ens", "messages": MESSAGES, "max_tokens": 4}
        if ensemble:
            body["ensemble"] = ensemble
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        d = r.json()["choices"][0]["decode"]
        return d["mode"], d["fallback"]

    # the default gate thresholds disagreement, a sequence-mode score: sequence mode
    client, _, _ = gateway(k=2)
    assert mode(client) == ("sequence", None)
    # a gate on epistemic: token mode, unless the request needs sequence mode
    client, _, _ = gateway(k=2, gate_score="epistemic")
    got, note = mode(client)
    assert got == "sequence" and note is not None and "split" in note  # token mode was tried
    for ensemble in ({"return_candidates": True}, {"samples_per_member": 2},
                     {"select": "majority"}, {"decode": "sequence"},
                     {"gate": {"score": "disagreement", "threshold": 0.5}}):  # fmt: skip
        assert mode(client, **ensemble) == ("sequence", None), ensemble
