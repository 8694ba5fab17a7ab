"""The client, through the openai SDK, on canned responses and on the real gateway app.

The canned responses (``httpx.MockTransport``) hold values that no gateway would compute
together (``total`` is not ``epistemic + aleatoric``): the client must hand back exactly
what was sent, never recompute it. The gateway tests (a fake vLLM behind the real app)
compare every parsed field with the JSON of the same request sent without the SDK.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest
from fastapi.testclient import TestClient
from openai.types.chat import ChatCompletion

import clients
from clients import softspec_client
from clients.softspec_client import (
    Abstained,
    Candidate,
    EnsembleAnswer,
    Gate,
    GateOptions,
    ProtocolError,
    RequestOptions,
    SoftSpecClient,
    TokenUncertainty,
    Uncertainty,
)
from ensemble.manifest import EnsembleManifest, GateSpec
from ensemble.scores import DEFAULT_GATE_SCORE
from tests.server.conftest import Factory

QUESTION = "What is the capital of France?"
ABSTAIN_TEXT = "No comment."


def make_client(
    gateway: Factory, **settings: Any
) -> tuple[SoftSpecClient, TestClient, EnsembleManifest]:
    """A SoftSpecClient whose SDK talks to the in-process gateway through its TestClient."""
    http, _, manifest = gateway(**settings)
    return SoftSpecClient("http://testserver", http_client=http, max_retries=0), http, manifest


# --------------------------------------------------------------------------- canned responses

CANNED_UNCERTAINTY = {
    "epistemic": 0.125,
    "aleatoric": 0.5,
    "total": 0.875,  # not epistemic + aleatoric: the client must not recompute it
    "sequence_epistemic": 0.25,
    "disagreement": 1 / 3,
    "novelty": -0.5,
    "prompt_novelty": 0.75,
    "combined": 0.96875,
    "per_token": [
        {"token": " Par", "epistemic": 0.2, "aleatoric": 0.3, "total": 0.7},
        {"token": "is", "epistemic": 0.05, "aleatoric": 0.7, "total": 1.5},
    ],
}
CANNED_EXTRAS = {
    "uncertainty": CANNED_UNCERTAINTY,
    "responsibilities": {"m0": 0.2, "m1": 0.7, "m2": 0.1},
    "candidates": [
        {"member": "m1", "text": " Paris", "scores": {"m0": -1.5, "m1": -0.25, "m2": -3.0},
         "mixture_logprob": -0.5},
        {"member": "m2", "text": " London", "scores": {"m0": -4.0, "m1": -5.0, "m2": -0.75},
         "mixture_logprob": -2.5},
    ],
}  # fmt: skip
CANNED_GATE = {"decision": "flag", "score": 0.96875, "score_name": "combined", "threshold": 0.95}
CANNED_USAGE = {"prompt_tokens": 41, "completion_tokens": 7, "total_tokens": 48}
CANNED_MODELS = ["ens:m0", "ens", "ens:m1", "ens:m2"]  # the ensemble is not listed first

EXPECTED_UNCERTAINTY = Uncertainty(
    epistemic=0.125,
    aleatoric=0.5,
    total=0.875,
    sequence_epistemic=0.25,
    disagreement=1 / 3,
    novelty=-0.5,
    prompt_novelty=0.75,
    combined=0.96875,
    per_token=[TokenUncertainty(" Par", 0.2, 0.3, 0.7), TokenUncertainty("is", 0.05, 0.7, 1.5)],
)
EXPECTED_CANDIDATES = [
    Candidate("m1", " Paris", {"m0": -1.5, "m1": -0.25, "m2": -3.0}, -0.5),
    Candidate("m2", " London", {"m0": -4.0, "m1": -5.0, "m2": -0.75}, -2.5),
]
EXPECTED_GATE = Gate(decision="flag", score=0.96875, score_name="combined", threshold=0.95)


def sse(*events: dict[str, Any]) -> bytes:
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + (
        b"data: [DONE]\n\n"
    )


def canned_response(request: httpx.Request, gate: dict[str, Any]) -> httpx.Response:
    """What a gateway sends, fixed: the same extras for chat, completions and streaming."""
    head = {"id": "r1", "created": 0, "model": "ens"}
    if request.url.path == "/v1/models":
        data = [{"id": i, "object": "model", "created": 0, "owned_by": "x"} for i in CANNED_MODELS]
        return httpx.Response(200, json={"object": "list", "data": data})
    body = json.loads(request.content)
    if request.url.path == "/v1/completions":
        choice = {"index": 0, "text": " Paris", "finish_reason": "length", "logprobs": None}
        return httpx.Response(200, json={**head, "object": "text_completion", "gate": gate,
                                         "choices": [{**choice, **CANNED_EXTRAS}],
                                         "usage": CANNED_USAGE})  # fmt: skip
    chunk = {**head, "object": "chat.completion.chunk"}
    if body.get("stream"):
        return httpx.Response(
            200,
            headers={"content-type": "text/event-stream"},
            content=sse(
                {**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": " Par"},
                                       "finish_reason": None}]},
                {**chunk, "gate": gate, "choices": [{"index": 0, "delta": {"content": "is"},
                                                     "finish_reason": "stop", **CANNED_EXTRAS}]},
                {**chunk, "choices": [], "usage": CANNED_USAGE},
            ),
        )  # fmt: skip
    message = {"role": "assistant", "content": " Paris"}
    return httpx.Response(200, json={**head, "object": "chat.completion", "gate": gate,
                                     "choices": [{"index": 0, "message": message,
                                                  "finish_reason": "stop", **CANNED_EXTRAS}],
                                     "usage": CANNED_USAGE})  # fmt: skip


def canned(
    gate: dict[str, Any] = CANNED_GATE,
) -> tuple[SoftSpecClient, list[dict[str, Any]], Callable[[], None]]:
    """A client on canned responses, the JSON bodies it sent, and a closer."""
    sent: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.content:
            sent.append({"path": request.url.path, **json.loads(request.content)})
        return canned_response(request, gate)

    http = httpx.Client(transport=httpx.MockTransport(handler))
    return SoftSpecClient("http://canned", http_client=http, max_retries=0), sent, http.close


def test_chat_returns_exactly_what_the_server_sent() -> None:
    client, _, close = canned()
    a = client.chat("Capital of France?")
    assert a.text == " Paris" and a.finish_reason == "stop"
    assert a.uncertainty == EXPECTED_UNCERTAINTY
    assert a.responsibilities == {"m0": 0.2, "m1": 0.7, "m2": 0.1}
    assert a.top_member == ("m1", 0.7)
    assert a.candidates == EXPECTED_CANDIDATES
    assert a.gate == EXPECTED_GATE and a.gate.flagged and not a.gate.passed
    assert a.usage == CANNED_USAGE
    assert isinstance(a.raw, ChatCompletion) and a.raw.id == "r1"
    close()


def test_complete_and_stream_return_exactly_what_the_server_sent() -> None:
    client, sent, close = canned()
    c = client.complete("The capital of France is")
    assert c.text == " Paris" and c.finish_reason == "length"
    assert (c.uncertainty, c.candidates, c.gate) == (
        EXPECTED_UNCERTAINTY,
        EXPECTED_CANDIDATES,
        EXPECTED_GATE,
    )
    assert sent[-1]["path"] == "/v1/completions"
    assert sent[-1]["prompt"] == "The capital of France is"
    events = list(client.stream_chat("Capital of France?"))
    assert events[:2] == [" Par", "is"]
    final = events[2]
    assert len(events) == 3 and isinstance(final, EnsembleAnswer)
    assert final.text == " Paris" and final.finish_reason == "stop"
    assert final.uncertainty == EXPECTED_UNCERTAINTY and final.gate == EXPECTED_GATE
    assert final.usage == CANNED_USAGE  # from the last chunk, which has no choices
    assert sent[-1]["stream"] is True and sent[-1]["stream_options"] == {"include_usage": True}
    close()


def test_the_request_holds_the_options_and_only_those() -> None:
    client, sent, close = canned()
    client.chat("q")
    assert sent[-1] == {
        "path": "/v1/chat/completions",
        "model": "ens",  # the first listed id without ':'
        "messages": [{"role": "user", "content": "q"}],
    }
    client.chat(
        "q", max_tokens=8, temperature=0, members=["m2", "m0"], select="majority",
        samples_per_member=2, return_candidates=True, per_token=True, decode="token",
        seed=3, extra_body={"other": 1},
    )  # fmt: skip
    assert sent[-1] == {
        "path": "/v1/chat/completions",
        "model": "ens",
        "messages": [{"role": "user", "content": "q"}],
        "max_tokens": 8,
        "temperature": 0,
        "seed": 3,
        "other": 1,
        "ensemble": {
            "members": ["m2", "m0"],
            "select": "majority",
            "samples_per_member": 2,
            "return_candidates": True,
            "per_token": True,
            "decode": "token",
        },
    }
    close()


def test_an_options_object_is_shared_and_keywords_override_it() -> None:
    client, sent, close = canned()
    opts = RequestOptions(model="ens:m1", max_tokens=8, per_token=True, sdk_kwargs={"seed": 5})
    client.chat("q", opts)
    client.complete("p", opts, max_tokens=2, seed=6)
    list(client.stream_chat("q", opts, per_token=False))
    chat, complete, stream = sent[-3:]
    assert chat["model"] == "ens:m1" and chat["max_tokens"] == 8 and chat["seed"] == 5
    assert chat["ensemble"] == {"per_token": True}
    assert complete["max_tokens"] == 2 and complete["seed"] == 6
    assert complete["ensemble"] == {"per_token": True}
    assert "ensemble" not in stream and stream["max_tokens"] == 8
    assert opts.max_tokens == 8 and dict(opts.sdk_kwargs) == {"seed": 5}  # not mutated
    close()


def test_raise_on_abstain_carries_the_answer() -> None:
    gate = {**CANNED_GATE, "decision": "abstain"}
    client, _, close = canned(gate)
    assert client.chat("q").gate.abstained  # returned, not raised, by default
    with pytest.raises(Abstained, match=r"combined = 0\.9688 > threshold 0\.95") as info:
        client.chat("q", RequestOptions(raise_on_abstain=True))
    assert info.value.answer.uncertainty == EXPECTED_UNCERTAINTY
    stream = client.stream_chat("q", raise_on_abstain=True)
    assert [next(stream), next(stream)] == [" Par", "is"]
    with pytest.raises(Abstained):
        next(stream)
    close()


def test_an_unknown_gate_decision_is_a_protocol_error() -> None:
    client, _, close = canned({**CANNED_GATE, "decision": "escalate-maybe"})
    with pytest.raises(ProtocolError, match="escalate-maybe"):
        client.chat("q")
    close()


def test_a_prompt_stage_escalation_is_returned_as_sent() -> None:
    gate = {**CANNED_GATE, "decision": "escalate", "score_name": "prompt_novelty",
            "score": 0.9, "threshold": 0.5, "stage": "prompt", "routed_to": "big-model"}  # fmt: skip
    client, _, close = canned(gate)
    a = client.chat("q", raise_on_abstain=True)  # escalating is not abstaining
    assert a.gate == Gate("escalate", 0.9, "prompt_novelty", 0.5, "prompt", "big-model")
    assert a.gate.escalated and not (a.gate.passed or a.gate.flagged or a.gate.abstained)
    failed = {"outcome": "failed", "reason": "fallback timed out", "applied": "abstain"}
    client, _, close2 = canned({**gate, "decision": "abstain", "routed_to": None,
                                "escalation": failed})  # fmt: skip
    b = client.chat("q")
    assert b.gate.abstained and b.gate.escalation == failed and b.gate.routed_to is None
    close()
    close2()


def test_token_scores_may_be_absent_when_the_gate_decided_on_the_prompt() -> None:
    prompt_only = {"epistemic": None, "aleatoric": None, "total": None,
                   "prompt_novelty": 0.9, "combined": 0.99}  # fmt: skip
    u = Uncertainty.from_dict(prompt_only)
    assert (u.epistemic, u.aleatoric, u.total) == (None, None, None)
    assert (u.prompt_novelty, u.combined, u.novelty) == (0.9, 0.99, None)


def test_a_request_gate_is_sent_in_the_ensemble_extra() -> None:
    client, sent, close = canned()
    client.chat("q", gate=GateOptions(threshold=0.25, action="abstain"))
    assert sent[-1]["ensemble"] == {"gate": {"threshold": 0.25, "action": "abstain"}}
    opts = RequestOptions(per_token=True, gate=GateOptions(score="prompt_novelty", threshold=1))
    client.complete("p", opts)
    assert sent[-1]["ensemble"] == {
        "per_token": True,
        "gate": {"score": "prompt_novelty", "threshold": 1},
    }
    close()


# --------------------------------------------------------------------------- the real gateway


def test_models_ensemble_id_and_member_ids(gateway: Factory) -> None:
    client, _, manifest = make_client(gateway, k=2)
    assert client.models() == ["ens", "ens:m0", "ens:m1"]
    assert client.ensemble_id() == "ens"
    assert [client.member(m) for m in manifest.member_names] == client.models()[1:]
    baseline = client.chat(QUESTION, model=client.member("m1"), max_tokens=4, temperature=0)
    assert baseline.responsibilities == {"m1": 1.0}
    assert baseline.uncertainty.epistemic == 0.0


def as_sent(obj: Any) -> Any:
    """A parsed dataclass as the JSON it came from: absent optional fields are None."""
    return json.loads(json.dumps(dataclasses.asdict(obj)))


def with_nones(extra: dict[str, Any], cls: type) -> dict[str, Any]:
    """The JSON as its dataclass holds it: absent fields at their defaults (or None)."""
    defaults = {
        f.name: None if f.default is dataclasses.MISSING else f.default
        for f in dataclasses.fields(cls)
    }
    return {**defaults, **extra}


def test_chat_holds_exactly_what_the_gateway_sent(gateway: Factory) -> None:
    client, http, manifest = make_client(gateway, k=3, weights=[0.5, 0.3, 0.2])
    a = client.chat(QUESTION, max_tokens=6, temperature=0, return_candidates=True, per_token=True)
    assert isinstance(a, EnsembleAnswer) and isinstance(a.raw, ChatCompletion)
    # the same request without the SDK (the fake vLLM is deterministic)
    body = http.post(
        "/v1/chat/completions",
        json={
            "model": "ens",
            "messages": [{"role": "user", "content": QUESTION}],
            "max_tokens": 6,
            "temperature": 0,
            "ensemble": {"return_candidates": True, "per_token": True},
        },
    ).json()
    choice = body["choices"][0]
    assert a.text == choice["message"]["content"] and a.finish_reason == choice["finish_reason"]
    assert as_sent(a.uncertainty) == with_nones(choice["uncertainty"], Uncertainty)
    assert len(choice["uncertainty"]["per_token"]) >= 1
    assert a.responsibilities == choice["responsibilities"]
    assert list(a.responsibilities) == manifest.member_names
    assert a.candidates is not None
    assert [as_sent(c) for c in a.candidates] == choice["candidates"]
    assert as_sent(a.gate) == with_nones(body["gate"], Gate) and a.usage == body["usage"]
    # what the gateway promises about these fields, checked on what the client returned
    assert "".join(t.token for t in a.uncertainty.per_token or [] if t.token != "<eos>") == a.text
    assert a.text in {c.text for c in a.candidates}
    assert a.gate.score_name == DEFAULT_GATE_SCORE
    assert a.gate.score == getattr(a.uncertainty, DEFAULT_GATE_SCORE)


def test_chat_sends_the_ensemble_options(gateway: Factory) -> None:
    client, _, _ = make_client(gateway, k=3, personalities=[1, 1, 2])
    a = client.chat(
        [{"role": "user", "content": QUESTION}],
        max_tokens=4,
        temperature=1.0,
        members=["m2", "m0"],
        select="majority",
        samples_per_member=2,
        return_candidates=True,
        seed=0,  # a plain SDK argument passes through
    )
    assert set(a.responsibilities) == {"m2", "m0"}
    assert a.candidates is not None and sorted(c.member for c in a.candidates) == [
        "m0",
        "m0",
        "m2",
        "m2",
    ]
    plain = client.chat(QUESTION, max_tokens=4, temperature=0)
    assert plain.candidates is None and plain.uncertainty.per_token is None


def test_a_string_is_one_user_message(gateway: Factory) -> None:
    client, _, _ = make_client(gateway, k=2)
    as_str = client.chat(QUESTION, max_tokens=5, temperature=0)
    as_list = client.chat([{"role": "user", "content": QUESTION}], max_tokens=5, temperature=0)
    assert as_str.text == as_list.text and as_str.uncertainty == as_list.uncertainty


def test_complete_holds_exactly_what_the_gateway_sent(gateway: Factory) -> None:
    client, http, manifest = make_client(gateway, k=2)
    prompt = "The capital of France is"
    a = client.complete(prompt, max_tokens=4, temperature=0, per_token=True)
    assert isinstance(a.raw, openai.types.Completion)
    body = http.post(
        "/v1/completions",
        json={"model": "ens", "prompt": prompt, "max_tokens": 4, "temperature": 0,
              "ensemble": {"per_token": True}},
    ).json()  # fmt: skip
    choice = body["choices"][0]
    assert a.text == choice["text"] and a.finish_reason == choice["finish_reason"]
    assert as_sent(a.uncertainty) == with_nones(choice["uncertainty"], Uncertainty)
    assert a.responsibilities == choice["responsibilities"]
    assert set(a.responsibilities) == set(manifest.member_names)
    assert as_sent(a.gate) == with_nones(body["gate"], Gate) and a.usage == body["usage"]
    assert a.candidates is None and "candidates" not in choice


def test_stream_chat_matches_the_non_streamed_answer(gateway: Factory) -> None:
    client, _, _ = make_client(gateway, k=3)
    plain = client.chat(QUESTION, max_tokens=6, temperature=0)
    events = list(client.stream_chat(QUESTION, max_tokens=6, temperature=0))
    *deltas, final = events
    assert all(isinstance(d, str) for d in deltas) and isinstance(final, EnsembleAnswer)
    assert "".join(str(d) for d in deltas) == final.text == plain.text
    assert final.uncertainty == plain.uncertainty
    assert final.responsibilities == plain.responsibilities
    assert final.gate == plain.gate and final.finish_reason == plain.finish_reason
    assert final.usage == plain.usage  # include_usage is always requested


def abstaining(gateway: Factory) -> SoftSpecClient:
    client, _, _ = make_client(
        gateway,
        k=3,
        gate=GateSpec(score_name="total", threshold=0.0),
        gate_action="abstain",
        abstain_text=ABSTAIN_TEXT,
    )
    return client


def test_abstain_returns_the_abstention_or_raises_on_request(gateway: Factory) -> None:
    client = abstaining(gateway)
    a = client.chat(QUESTION, max_tokens=6, temperature=0)
    assert a.gate.abstained and a.text == ABSTAIN_TEXT and a.finish_reason == "content_filter"
    assert a.gate.score == pytest.approx(a.uncertainty.total) and a.gate.threshold == 0.0
    with pytest.raises(Abstained, match="total") as info:
        client.chat(QUESTION, max_tokens=6, temperature=0, raise_on_abstain=True)
    assert info.value.answer.gate == a.gate and info.value.answer.text == ABSTAIN_TEXT
    with pytest.raises(Abstained):
        client.complete("The capital of France is", max_tokens=4, raise_on_abstain=True)
    stream = client.stream_chat(QUESTION, max_tokens=6, temperature=0, raise_on_abstain=True)
    assert next(stream) == ABSTAIN_TEXT
    with pytest.raises(Abstained):
        next(stream)


def test_unknown_model_raises_not_found(gateway: Factory) -> None:
    client, _, _ = make_client(gateway, k=2)
    with pytest.raises(openai.NotFoundError):
        client.chat(QUESTION, model="nope", max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.chat(QUESTION, model=client.member("m9"), max_tokens=2)


def test_invalid_option_raises_bad_request(gateway: Factory) -> None:
    client, _, _ = make_client(gateway, k=2)
    with pytest.raises(openai.BadRequestError, match="samples_per_member"):
        client.chat(QUESTION, max_tokens=2, samples_per_member=0)


def test_api_key_comes_from_the_environment(
    gateway: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    http, _, _ = gateway(k=2, api_keys="k1")
    monkeypatch.delenv("SOFTSPEC_API_KEY", raising=False)
    with pytest.raises(openai.AuthenticationError):
        SoftSpecClient("http://testserver", http_client=http, max_retries=0).models()
    assert SoftSpecClient("http://testserver", "k1", http_client=http).ensemble_id() == "ens"
    monkeypatch.setenv("SOFTSPEC_API_KEY", "k1")
    assert SoftSpecClient("http://testserver", http_client=http).ensemble_id() == "ens"


def test_a_plain_openai_server_is_a_protocol_error() -> None:
    def plain(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": "gpt"}]})
        choice = {"index": 0, "message": {"role": "assistant", "content": "hi"}}
        return httpx.Response(
            200,
            json={"id": "x", "object": "chat.completion", "created": 0, "model": "gpt",
                  "choices": [{**choice, "finish_reason": "stop"}]},
        )  # fmt: skip

    http = httpx.Client(transport=httpx.MockTransport(plain))
    client = SoftSpecClient("http://plain", http_client=http, max_retries=0)
    with pytest.raises(ProtocolError, match="uncertainty"):
        client.chat("hello")
    http.close()


def test_all_is_complete() -> None:
    tree = ast.parse(inspect.getsource(softspec_client))
    defined: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.ClassDef | ast.FunctionDef):
            defined.add(node.name)
        elif isinstance(node, ast.Assign):
            defined |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            defined.add(node.target.id)
    public = {n for n in defined if not n.startswith("_")}
    assert public == set(softspec_client.__all__) == set(clients.__all__)
    assert all(getattr(clients, n) is getattr(softspec_client, n) for n in clients.__all__)
    assert sorted(clients.__all__) == clients.__all__
