"""The client on the real gateway app (fake vLLM behind httpx.MockTransport), via the openai SDK."""

from __future__ import annotations

import ast
import inspect
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
    ProtocolError,
    SoftSpecClient,
    TokenUncertainty,
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


def test_models_ensemble_id_and_member_ids(gateway: Factory) -> None:
    client, _, manifest = make_client(gateway, k=2)
    assert client.models() == ["ens", "ens:m0", "ens:m1"]
    assert client.ensemble_id() == "ens"
    assert [client.member(m) for m in manifest.member_names] == client.models()[1:]
    baseline = client.chat(QUESTION, model=client.member("m1"), max_tokens=4, temperature=0)
    assert baseline.responsibilities == {"m1": 1.0}
    assert baseline.uncertainty.epistemic == 0.0


def test_chat_fills_the_dataclasses_consistently(gateway: Factory) -> None:
    client, http, manifest = make_client(gateway, k=3, weights=[0.5, 0.3, 0.2])
    a = client.chat(QUESTION, max_tokens=6, temperature=0, return_candidates=True, per_token=True)
    assert isinstance(a, EnsembleAnswer) and isinstance(a.raw, ChatCompletion)
    assert a.text == a.raw.choices[0].message.content and a.finish_reason in ("stop", "length")
    u = a.uncertainty
    assert u.total == pytest.approx(u.epistemic + u.aleatoric)
    assert u.sequence_epistemic is not None and u.disagreement is not None
    assert u.per_token is not None and all(isinstance(t, TokenUncertainty) for t in u.per_token)
    assert len(u.per_token) == len(a.raw.choices[0].model_dump()["uncertainty"]["per_token"])
    assert "".join(t.token for t in u.per_token if t.token != "<eos>") == a.text
    assert u.epistemic == pytest.approx(sum(t.epistemic for t in u.per_token) / len(u.per_token))
    assert list(a.responsibilities) == manifest.member_names
    assert sum(a.responsibilities.values()) == pytest.approx(1.0)
    name, weight = a.top_member
    assert weight == max(a.responsibilities.values()) and a.responsibilities[name] == weight
    assert a.candidates is not None and all(isinstance(c, Candidate) for c in a.candidates)
    assert [c.member for c in a.candidates] == manifest.member_names
    assert all(list(c.scores) == manifest.member_names for c in a.candidates)
    assert a.text in {c.text for c in a.candidates}
    assert a.gate.score_name == DEFAULT_GATE_SCORE
    assert a.gate.score == pytest.approx(getattr(u, DEFAULT_GATE_SCORE))
    assert a.gate.passed != a.gate.flagged and not a.gate.abstained
    assert a.usage["total_tokens"] == a.usage["prompt_tokens"] + a.usage["completion_tokens"]
    # the same request without the SDK: the dataclasses hold exactly what the gateway sent
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
    assert a.text == choice["message"]["content"]
    assert a.uncertainty.epistemic == choice["uncertainty"]["epistemic"]
    assert a.responsibilities == choice["responsibilities"]
    assert [c.mixture_logprob for c in a.candidates] == [
        c["mixture_logprob"] for c in choice["candidates"]
    ]
    assert a.gate.decision == body["gate"]["decision"] and a.usage == body["usage"]


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


def test_complete(gateway: Factory) -> None:
    client, _, manifest = make_client(gateway, k=2)
    a = client.complete("The capital of France is", max_tokens=4, temperature=0, per_token=True)
    assert isinstance(a.raw, openai.types.Completion) and a.text == a.raw.choices[0].text
    assert a.uncertainty.per_token is not None and 1 <= len(a.uncertainty.per_token) <= 4
    assert set(a.responsibilities) == set(manifest.member_names)
    assert sum(a.responsibilities.values()) == pytest.approx(1.0)
    assert a.gate.decision in ("pass", "flag") and a.candidates is None


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
