"""Uncertainty-gated routing: escalate to a fallback, per-request gates, no leaked token,
deciding before generation (docs/routing.md).

The ensemble is the fake vLLM of tests/server; the fallback is a fake OpenAI-compatible
server behind ``httpx.MockTransport`` that records what it was sent.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

from ensemble.calibration import GateCalibration
from ensemble.errors import ConfigError
from ensemble.manifest import GateSpec
from server.engine import MixtureStep, SamplingParams
from server.launch import settings_from_args
from server.vllm_engine import VLLMEngine
from tests.server.fake_vllm import VOCAB

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
FALLBACK_URL = "http://fallback.test/v1"
FALLBACK_MODEL = "big-model"
FALLBACK_TEXT = "It is the city of lights, says the big model."
ALWAYS = GateSpec(score_name="total", threshold=-1.0)  # total ≥ 0: the gate always fires
NEVER = GateSpec(score_name="total", threshold=1e9)


class FakeFallback:
    """An OpenAI-compatible server: records requests; ``mode`` picks its behaviour."""

    def __init__(self, mode: str = "ok", delay: float = 0.0) -> None:
        self.mode = mode
        self.delay = delay
        self.requests: list[tuple[str, dict[str, Any], httpx.Headers]] = []

    async def handler(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else {}
        self.requests.append((request.url.path, body, request.headers))
        if self.mode == "down":
            raise httpx.ConnectError("connection refused", request=request)
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json={"object": "list", "data": [{"id": FALLBACK_MODEL}]})
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.mode == "timeout":
            raise httpx.ReadTimeout("read timed out", request=request)
        if self.mode == "error":
            return httpx.Response(500, json={"error": {"message": "the big model is on fire"}})
        chat = request.url.path.endswith("/chat/completions")
        if body.get("stream"):
            return httpx.Response(
                200, content=self._stream(chat), headers={"content-type": "text/event-stream"}
            )
        choice: dict[str, Any] = {"index": 0, "finish_reason": "stop"}
        if chat:
            choice["message"] = {"role": "assistant", "content": FALLBACK_TEXT}
        else:
            choice["text"] = FALLBACK_TEXT
        usage = {"prompt_tokens": 9, "completion_tokens": 11, "total_tokens": 20}
        return httpx.Response(
            200, json={"id": "x", "model": FALLBACK_MODEL, "choices": [choice], "usage": usage}
        )

    async def _stream(self, chat: bool) -> AsyncIterator[bytes]:
        words = FALLBACK_TEXT.split(" ")
        for i, w in enumerate(words):
            piece = w if i == 0 else " " + w
            if self.mode == "midstream" and i == 3:
                raise httpx.ReadError("connection reset")
            choice = {"index": 0, "finish_reason": None}
            choice.update({"delta": {"content": piece}} if chat else {"text": piece})
            yield f"data: {json.dumps({'model': FALLBACK_MODEL, 'choices': [choice]})}\n\n".encode()
        end = {"index": 0, "finish_reason": "stop"}
        end.update({"delta": {}} if chat else {"text": ""})
        yield f"data: {json.dumps({'model': FALLBACK_MODEL, 'choices': [end]})}\n\n".encode()
        yield b"data: [DONE]\n\n"

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handler)

    def answers(self) -> list[dict[str, Any]]:
        return [b for p, b, _ in self.requests if not p.endswith("/models")]


def escalating(
    gateway,
    fb: FakeFallback,
    gate: GateSpec = ALWAYS,
    gate_action: str = "escalate",
    **settings: Any,
):  # type: ignore[no-untyped-def]
    return gateway(
        k=3, gate=gate, gate_action=gate_action, fallback_url=FALLBACK_URL,
        fallback_api_key="sk-fallback", fallback=fb.transport(), **settings,
    )  # fmt: skip


def chat(client, **kw):  # type: ignore[no-untyped-def]
    body = {"model": "ens", "messages": MESSAGES, "temperature": 0, "max_tokens": 6, **kw}
    return client.post("/v1/chat/completions", json=body)


def sse(text: str) -> list[dict[str, Any]]:
    frames = [f[len("data: ") :] for f in text.split("\n\n") if f]
    assert frames[-1] == "[DONE]", frames[-1]
    return [json.loads(f) for f in frames[:-1]]


def streamed_text(chunks: list[dict[str, Any]]) -> str:
    out = []
    for c in chunks:
        for ch in c.get("choices") or []:
            out.append((ch.get("delta") or {}).get("content") or ch.get("text") or "")
    return "".join(out)


def metric(client, name: str, **labels: str) -> float:  # type: ignore[no-untyped-def]
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(f"{name}{{{want}}}" if labels else f"{name} "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def generations(fake) -> int:  # type: ignore[no-untyped-def]
    """Generation calls the ensemble made (scoring calls send a list of sequences)."""
    return sum(
        1
        for path, body in fake.calls
        if path == "/v1/completions" and not isinstance(body["prompt"][0], list)
    )


# ---------------------------------------------------------------------------- escalate


def test_escalate_returns_the_fallback_answer_with_the_ensemble_scores(gateway) -> None:  # type: ignore[no-untyped-def]
    fb = FakeFallback()
    client, _, manifest = escalating(gateway, fb)
    flagged, _, _ = gateway(k=3, gate=ALWAYS, gate_action="flag")
    own = chat(flagged, ensemble={"return_candidates": True}).json()
    r = chat(client, ensemble={"return_candidates": True}, stop=["\n"], seed=3, logprobs=True)
    assert r.status_code == 200, r.text
    body = r.json()
    choice = body["choices"][0]
    assert choice["message"]["content"] == FALLBACK_TEXT
    assert choice["finish_reason"] == "stop" and choice["logprobs"] is None
    gate = body["gate"]
    assert gate["decision"] == "escalate" and gate["routed_to"] == FALLBACK_MODEL
    assert gate["stage"] == "answer" and gate["escalation"]["outcome"] == "ok"
    assert gate["escalation"]["usage"]["completion_tokens"] == 11
    # the ensemble's own scores and responsibilities are kept (same as its flagged answer)
    assert choice["uncertainty"] == own["choices"][0]["uncertainty"]
    assert choice["responsibilities"] == own["choices"][0]["responsibilities"]
    assert choice["candidates"] == own["choices"][0]["candidates"]
    assert gate["score"] == pytest.approx(own["gate"]["score"])
    assert r.headers["x-gate-decision"] == "escalate"
    # the original request, forwarded: messages and sampling options, not our extras
    (sent,) = fb.answers()
    assert sent == {
        "model": FALLBACK_MODEL, "messages": MESSAGES, "temperature": 0.0, "max_tokens": 6,
        "stop": ["\n"], "seed": 3,
    }  # fmt: skip
    assert all(h["authorization"] == "Bearer sk-fallback" for _, _, h in fb.requests)
    assert metric(client, "softspec_escalations_total", outcome="ok") == 1
    assert metric(client, "softspec_fallback_seconds_count") == 1
    assert metric(client, "softspec_gate_decisions_total", decision="escalate", stage="answer") == 1
    assert manifest.member_names == list(choice["responsibilities"])


def test_escalate_on_completions(gateway) -> None:  # type: ignore[no-untyped-def]
    fb = FakeFallback()
    client, _, _ = escalating(gateway, fb)
    r = client.post("/v1/completions", json={"model": "ens", "prompt": "Paris is", "max_tokens": 3})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == FALLBACK_TEXT
    assert r.json()["gate"]["routed_to"] == FALLBACK_MODEL
    assert fb.requests[-1][0] == "/v1/completions"
    assert fb.answers() == [{"model": FALLBACK_MODEL, "prompt": "Paris is", "max_tokens": 3}]


def test_a_passing_gate_never_calls_the_fallback(gateway) -> None:  # type: ignore[no-untyped-def]
    fb = FakeFallback()
    client, _, _ = escalating(gateway, fb, gate=NEVER)
    body = chat(client).json()
    assert body["gate"]["decision"] == "pass" and "routed_to" not in body["gate"]
    assert fb.answers() == []


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_streamed_escalation_relays_the_fallback_after_the_decision(gateway, kind: str) -> None:  # type: ignore[no-untyped-def]
    fb = FakeFallback()
    client, _, _ = escalating(gateway, fb)
    own = chat(client, stream=False).json()  # escalated too: the ensemble's scores
    if kind == "chat":
        r = chat(client, stream=True, stream_options={"include_usage": True})
    else:
        r = client.post(
            "/v1/completions",
            json={"model": "ens", "prompt": "hi", "max_tokens": 3, "stream": True},
        )
    assert r.status_code == 200 and r.headers["x-gate-decision"] == "escalate"
    chunks = sse(r.text)
    assert streamed_text(chunks) == FALLBACK_TEXT
    final = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(final) == 1 and final[0]["gate"]["routed_to"] == FALLBACK_MODEL
    assert final[0]["gate"]["decision"] == "escalate"
    assert metric(client, "softspec_fallback_seconds_count") == 2  # each call observed once
    assert metric(client, "softspec_escalations_total", outcome="ok") == 2
    if kind == "chat":
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        assert final[0]["choices"][0]["uncertainty"] == own["choices"][0]["uncertainty"]
        assert chunks[-1]["choices"] == [] and "usage" in chunks[-1]
        assert fb.answers()[-1]["stream"] is True
        assert fb.answers()[-1]["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize(
    "mode,outcome", [("error", "error"), ("timeout", "timeout"), ("down", "error")]
)
@pytest.mark.parametrize("policy", ["abstain", "flag"])
def test_a_failed_escalation_applies_the_policy_and_says_so(
    gateway, mode: str, outcome: str, policy: str
) -> None:  # type: ignore[no-untyped-def]
    fb = FakeFallback(mode)
    client, _, _ = escalating(gateway, fb, fallback_on_error=policy, abstain_text="No comment.")
    flagged, _, _ = gateway(k=3, gate=ALWAYS, gate_action="flag")
    own = chat(flagged).json()["choices"][0]["message"]["content"]
    for stream in (False, True):
        r = chat(client, stream=stream)
        assert r.status_code == 200, r.text
        if stream:
            chunks = sse(r.text)
            text, gate = streamed_text(chunks), chunks[-1]["gate"]
        else:
            text, gate = r.json()["choices"][0]["message"]["content"], r.json()["gate"]
        assert gate["decision"] == policy and gate.get("routed_to") is None
        assert gate["escalation"]["outcome"] == "failed"
        assert gate["escalation"]["applied"] == policy and gate["escalation"]["reason"]
        assert text == ("No comment." if policy == "abstain" else own)
    assert metric(client, "softspec_escalations_total", outcome=outcome) == 2
    assert metric(client, "softspec_escalations_total", outcome="ok") == 0


def test_a_fallback_that_breaks_mid_stream_ends_with_an_error_event(gateway) -> None:  # type: ignore[no-untyped-def]
    fb = FakeFallback("midstream")
    client, _, _ = escalating(gateway, fb)
    r = chat(client, stream=True)
    frames = [f[len("data: ") :] for f in r.text.split("\n\n") if f]
    assert frames[-1] == "[DONE]"
    last = json.loads(frames[-2])
    assert last["error"]["code"] == "fallback_failed"
    assert metric(client, "softspec_escalations_total", outcome="error") == 1


def test_escalation_pays_the_fallback_latency_once(gateway) -> None:  # type: ignore[no-untyped-def]
    """An escalated request costs one fallback call, and its latency once: against the same
    request with a flag gate (no fallback call), fallback latency 0.2 s. A second call or a
    retry would add another 0.2 s; the margin (half of it) leaves room for a loaded machine,
    the gateway's own overhead is not timed here."""
    delay = 0.2
    fb = FakeFallback(delay=delay)
    client, _, _ = escalating(gateway, fb)
    flagged, _, _ = gateway(k=3, gate=ALWAYS, gate_action="flag")
    chat(client), chat(flagged)  # warm up
    calls = len([r for r in fb.requests if r[0].endswith("/chat/completions")])
    extra = []
    for _ in range(7):
        t0 = time.perf_counter()
        assert chat(flagged).json()["gate"]["decision"] == "flag"
        t1 = time.perf_counter()
        assert chat(client).json()["gate"]["decision"] == "escalate"
        t2 = time.perf_counter()
        extra.append((t2 - t1) - (t1 - t0) - delay)
    assert len([r for r in fb.requests if r[0].endswith("/chat/completions")]) == calls + 7
    assert statistics.median(extra) < delay / 2


# ---------------------------------------------------------------------------- start-up


def test_escalate_without_a_fallback_is_refused_at_start_up(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="SOFTSPEC_FALLBACK_URL"):
        settings_from_args(["--ensemble", str(tmp_path), "--gate-action", "escalate"])
    out = subprocess.run(
        [sys.executable, "-m", "softspec.cli", "serve", "--ensemble", str(tmp_path),
         "--gate-action", "escalate"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "--fallback-url" in out.stderr


def test_an_unreachable_fallback_is_a_warning_and_ready_says_so(gateway, caplog) -> None:  # type: ignore[no-untyped-def]
    fb = FakeFallback("down")
    with caplog.at_level("WARNING", logger="softspec.server"):
        client, _, _ = escalating(gateway, fb)
    assert any("fallback is not reachable" in r.message for r in caplog.records)
    r = client.get("/ready")
    assert r.status_code == 200
    assert r.json()["fallback"]["reachable"] is False
    assert "ConnectError" in r.json()["fallback"]["detail"]
    fb.mode = "ok"  # it comes up: the next check sees it
    assert client.get("/ready").json()["fallback"] == {
        "reachable": True, "detail": f"{FALLBACK_MODEL} at {FALLBACK_URL}",
    }  # fmt: skip


def test_models_shows_the_gate_and_its_calibration(gateway) -> None:  # type: ignore[no-untyped-def]
    scores = sorted(float(i) / 10 for i in range(40))
    cal = GateCalibration(
        components=["prompt_novelty"], scores={"prompt_novelty": scores}, n=40, source="held-out"
    )
    spec = GateSpec(score_name="combined", threshold=0.95, calibration=cal)
    fb = FakeFallback()
    client, _, _ = escalating(gateway, fb, gate=spec)
    gate = client.get("/v1/models").json()["data"][0]["gate"]
    assert gate["score_name"] == "combined" and gate["threshold"] == 0.95
    assert gate["action"] == "escalate" and gate["allow_loosen"] is False
    assert gate["decides_before_generation"] is True
    assert gate["fallback"] == {"model": FALLBACK_MODEL, "reachable": True, "on_error": "abstain"}
    shown = gate["calibration"]
    assert "scores" not in shown  # the raw calibration scores stay out
    assert {k: v for k, v in cal.model_dump(mode="json").items() if k != "scores"} == shown
    assert len(json.dumps(gate)) < 1000


# ---------------------------------------------------------------------------- per request


@pytest.mark.parametrize(
    "override,decision",
    [
        ({"threshold": -1.0}, "flag"),  # a lower threshold: fires (the server's action)
        ({"action": "abstain"}, "pass"),  # stricter action, the gate does not fire
        ({"score": "epistemic", "threshold": -1.0, "action": "abstain"}, "abstain"),
    ],
)
def test_a_client_may_tighten_the_gate(gateway, override: dict[str, Any], decision: str) -> None:  # type: ignore[no-untyped-def]
    client, _, _ = gateway(k=3, gate=NEVER, gate_action="flag")
    body = chat(client, ensemble={"gate": override}).json()
    assert body["gate"]["decision"] == decision
    plain = chat(client).json()
    assert plain["gate"]["decision"] == "pass"  # the server's gate is unchanged


def test_the_server_gate_still_applies_beside_a_client_gate_on_another_score(gateway) -> None:  # type: ignore[no-untyped-def]
    client, _, _ = gateway(k=3, gate=ALWAYS, gate_action="flag")
    body = chat(client, ensemble={"gate": {"score": "epistemic", "threshold": 1e9}}).json()
    assert body["gate"]["decision"] == "flag" and body["gate"]["score_name"] == "total"


@pytest.mark.parametrize(
    "override,param",
    [
        ({"threshold": 1e12}, "ensemble.gate.threshold"),
        ({"action": "flag"}, "ensemble.gate.action"),
    ],
)
def test_loosening_a_locked_gate_is_a_400_naming_the_setting(
    gateway, override: dict[str, Any], param: str
) -> None:  # type: ignore[no-untyped-def]
    client, fake, _ = gateway(k=3, gate=NEVER, gate_action="abstain")
    calls = len(fake.calls)
    r = chat(client, ensemble={"gate": override})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == param and "SOFTSPEC_GATE_ALLOW_LOOSEN" in err["message"]
    assert len(fake.calls) == calls  # refused before any engine work


def test_an_unlocked_gate_may_be_loosened(gateway) -> None:  # type: ignore[no-untyped-def]
    client, _, _ = gateway(k=3, gate=ALWAYS, gate_action="abstain", gate_allow_loosen=True)
    assert chat(client).json()["gate"]["decision"] == "abstain"
    body = chat(client, ensemble={"gate": {"threshold": 1e9, "action": "flag"}}).json()
    assert body["gate"]["decision"] == "pass" and body["gate"]["threshold"] == 1e9


@pytest.mark.parametrize(
    "override,param,needle",
    [
        ({"action": "escalate"}, "ensemble.gate.action", "SOFTSPEC_FALLBACK_URL"),
        ({"score": "epistemic"}, "ensemble.gate.threshold", "required"),
        ({"score": "combined", "threshold": 0.5}, "ensemble.gate.score", "calibrat"),
        ({"score": "nope"}, "ensemble.gate.score", "must be one of"),
        ({"action": "maybe"}, "ensemble.gate.action", "flag"),
        ({"threshold": "high"}, "ensemble.gate.threshold", "number"),
    ],
)
def test_bad_per_request_gates(gateway, override: dict[str, Any], param: str, needle: str) -> None:  # type: ignore[no-untyped-def]
    client, _, _ = gateway(k=3)
    r = chat(client, ensemble={"gate": override})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and needle in r.json()["error"]["message"]


# ---------------------------------------------------------------------------- early decision


PROMPT_GATE = GateSpec(score_name="prompt_novelty", threshold=-1e9)  # fires on any prompt


@pytest.mark.parametrize("action", ["abstain", "escalate"])
def test_a_prompt_level_gate_decides_before_any_member_generates(gateway, action: str) -> None:  # type: ignore[no-untyped-def]
    fb = FakeFallback()
    client, fake, _ = escalating(gateway, fb, gate=PROMPT_GATE, gate_action=action)
    r = chat(client)
    body = r.json()
    assert body["gate"]["decision"] == action and body["gate"]["stage"] == "prompt"
    assert generations(fake) == 0  # no member generated, nothing was cross-scored
    u = body["choices"][0]["uncertainty"]
    assert u["epistemic"] is None and isinstance(u["prompt_novelty"], float)
    assert body["gate"]["score"] == u["prompt_novelty"]
    assert "x-uncertainty-epistemic" not in r.headers
    want = FALLBACK_TEXT if action == "escalate" else "I'm not confident enough to answer that."
    assert body["choices"][0]["message"]["content"] == want
    assert metric(client, "softspec_gate_decisions_total", decision=action, stage="prompt") == 1
    # the same prompt score as the full path computes
    full, _, _ = gateway(k=3, gate=GateSpec(score_name="prompt_novelty", threshold=1e9))
    assert chat(full).json()["choices"][0]["uncertainty"]["prompt_novelty"] == pytest.approx(
        u["prompt_novelty"], abs=1e-12
    )


def test_a_prompt_level_gate_that_passes_generates_as_usual(gateway) -> None:  # type: ignore[no-untyped-def]
    fb = FakeFallback()
    gate = GateSpec(score_name="prompt_novelty", threshold=1e9)
    client, fake, _ = escalating(gateway, fb, gate=gate)
    plain, _, _ = gateway(k=3, gate=gate, gate_action="flag")
    seq = {"decode": "sequence"}  # the fake vLLM has no lock-step; generations are counted
    a, b = chat(client, ensemble=seq).json(), chat(plain, ensemble=seq).json()
    assert a["choices"][0]["message"] == b["choices"][0]["message"]
    assert a["choices"][0]["uncertainty"] == b["choices"][0]["uncertainty"]
    assert a["gate"]["stage"] == "answer" and generations(fake) == 3


def test_an_early_escalation_that_fails_with_the_flag_policy_generates_then(gateway) -> None:  # type: ignore[no-untyped-def]
    fb = FakeFallback("error")
    client, fake, _ = escalating(gateway, fb, gate=PROMPT_GATE, fallback_on_error="flag")
    body = chat(client, ensemble={"decode": "sequence"}).json()
    assert body["gate"]["decision"] == "flag" and body["gate"]["escalation"]["outcome"] == "failed"
    assert body["choices"][0]["message"]["content"]  # the ensemble's answer, flagged
    assert body["choices"][0]["uncertainty"]["epistemic"] is not None
    assert generations(fake) == 3


def test_an_early_escalation_that_fails_with_the_flag_policy_decodes_then_in_token_mode(gateway) -> None:  # type: ignore[no-untyped-def]  # fmt: skip
    fb = FakeFallback("error")
    client, _, _ = escalating(gateway, fb, gate=PROMPT_GATE, fallback_on_error="flag",
                              engine_class=TokenEngine)  # fmt: skip
    body = chat(client).json()  # no ensemble.decode: token mode (the gate allows it)
    assert body["gate"]["decision"] == "flag" and body["gate"]["escalation"]["outcome"] == "failed"
    assert body["gate"]["stage"] == "prompt"
    choice = body["choices"][0]
    assert choice["decode"] == {"mode": "token", "fallback": None}
    assert choice["message"]["content"] == "".join(VOCAB[t] for t in SECRET)
    assert choice["uncertainty"]["epistemic"] is not None


def test_a_flag_gate_on_a_prompt_score_still_generates(gateway) -> None:  # type: ignore[no-untyped-def]
    client, fake, _ = gateway(k=3, gate=PROMPT_GATE, gate_action="flag")
    body = chat(client, ensemble={"decode": "sequence"}).json()
    assert body["gate"]["decision"] == "flag" and body["gate"]["stage"] == "answer"
    assert generations(fake) == 3


# ---------------------------------------------------------------------------- token mode


SECRET = [4, 5, 6]  # " Paris", " London", " blue": the answer the gate must withhold
SECRET_WORDS = [VOCAB[t].strip() for t in SECRET]


class TokenEngine(VLLMEngine):
    """The fake vLLM with lock-step decoding: always answers the SECRET tokens."""

    supports_token_decode = True

    async def decode_mixture(  # type: ignore[override]
        self, members: Sequence[str], log_weights: Any, prompt_ids: Sequence[int],
        params: SamplingParams, live: bool = True,
    ) -> AsyncIterator[MixtureStep]:  # fmt: skip
        for i, tok in enumerate(SECRET):
            await asyncio.sleep(0)
            yield MixtureStep(
                token_id=tok, text=VOCAB[tok], logprob=-0.5, top={tok: -0.5},
                uncertainty={"epistemic": 0.3, "aleatoric": 0.2, "total": 0.5},
                member_logprobs={m: -0.5 - 0.1 * k for k, m in enumerate(members)},
                finish_reason="length" if i == len(SECRET) - 1 else None,
            )  # fmt: skip


def token_chat(client, **kw):  # type: ignore[no-untyped-def]
    return chat(client, stream=True, ensemble={"decode": "token"}, **kw)


@pytest.mark.parametrize("action", ["abstain", "escalate"])
def test_no_token_of_a_withheld_answer_reaches_the_client(gateway, action: str) -> None:  # type: ignore[no-untyped-def]
    fb = FakeFallback()
    client, _, _ = escalating(
        gateway, fb, gate_action=action, engine_class=TokenEngine, abstain_text="No comment."
    )
    r = token_chat(client)
    assert r.status_code == 200, r.text
    assert not any(w in r.text for w in SECRET_WORDS), r.text  # not one byte of it
    chunks = sse(r.text)
    assert streamed_text(chunks) == (FALLBACK_TEXT if action == "escalate" else "No comment.")
    final = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert final[-1]["gate"]["decision"] == action
    finish = final[-1]["choices"][0]["finish_reason"]
    assert finish == ("stop" if action == "escalate" else "content_filter")


def test_held_tokens_are_released_when_the_gate_passes(gateway) -> None:  # type: ignore[no-untyped-def]
    client, _, _ = gateway(k=3, gate=NEVER, gate_action="abstain", engine_class=TokenEngine)
    chunks = sse(token_chat(client).text)
    assert streamed_text(chunks) == "".join(VOCAB[t] for t in SECRET)
    assert chunks[-1]["gate"]["decision"] == "pass"
    pieces = [c["choices"][0]["delta"].get("content") for c in chunks[:-1]]
    assert pieces == [VOCAB[t] for t in SECRET]  # still one chunk per token


def test_a_flag_gate_streams_tokens_as_they_are_decided(gateway) -> None:  # type: ignore[no-untyped-def]
    client, _, _ = gateway(k=3, gate=ALWAYS, gate_action="flag", engine_class=TokenEngine)
    chunks = sse(token_chat(client).text)
    assert streamed_text(chunks) == "".join(VOCAB[t] for t in SECRET)
    assert chunks[-1]["gate"]["decision"] == "flag"


def test_token_mode_decides_on_the_prompt_before_decoding(gateway) -> None:  # type: ignore[no-untyped-def]
    fb = FakeFallback()
    client, _, _ = escalating(gateway, fb, gate=PROMPT_GATE, engine_class=TokenEngine)
    r = token_chat(client)
    assert not any(w in r.text for w in SECRET_WORDS)
    chunks = sse(r.text)
    assert streamed_text(chunks) == FALLBACK_TEXT
    assert chunks[-1]["gate"]["stage"] == "prompt"


# ---------------------------------------------------------------------------- example


def test_the_example_pipeline_counts_each_route(gateway) -> None:  # type: ignore[no-untyped-def]
    import io

    import openai

    from clients.example_pipeline import PROMPTS, run

    fb = FakeFallback()
    client, _, _ = escalating(gateway, fb, gate=NEVER)
    sdk = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=client)
    prompts = PROMPTS[:3]
    out = io.StringIO()
    assert run(sdk, "ens", prompts, max_tokens=4, out=out) == {"pass": 3}
    assert run(sdk, "ens", prompts, {"threshold": -1.0}, 4, out) == {"escalate": 3}
    strict = {"threshold": -1.0, "action": "abstain"}
    assert run(sdk, "ens", prompts, strict, 4, out) == {"abstain": 3}
    lines = out.getvalue().splitlines()
    assert lines[3] == "counts: pass 3  flag 0  escalate 0  abstain 0"
    assert sum(f"→ {FALLBACK_MODEL}" in ln and FALLBACK_TEXT[:20] in ln for ln in lines) == 3
