"""``prompt_distance`` through the real gateway on the fake vLLM and its fake embedder."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from ensemble.density import REFERENCE_FILE, load_reference
from ensemble.errors import ConfigError
from ensemble.manifest import GateSpec
from tests.server.conftest import Factory
from tests.server.fake_vllm import FakeVLLM

MESSAGE = "what colour is the sky today"


def _chat(client, content: str = MESSAGE, **extra: object) -> dict:  # type: ignore[no-untyped-def]
    r = client.post(
        "/v1/chat/completions",
        json={"model": "ens", "messages": [{"role": "user", "content": content}],
              "max_tokens": 4, "temperature": 0, **extra},
    )  # fmt: skip
    assert r.status_code == 200, r.text
    return r.json()


def _pooled(fake: FakeVLLM) -> list[list[int]]:
    return [body["input"] for path, body in fake.calls if path == "/pooling"]


def test_served_distance_is_the_user_span_mean_against_the_reference(
    gateway: Factory, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    client, fake, _ = gateway(density=True, embed=True)
    got = _chat(client)["choices"][0]["uncertainty"]["prompt_distance"]
    (ids,) = _pooled(fake)
    # the fake tokenizer makes one token per word and the user's words come last
    words = len(MESSAGE.split())
    hidden = FakeVLLM.hidden(ids).astype(np.float64)
    ref = load_reference(tmp_path / "ens0" / REFERENCE_FILE)
    centred = hidden[-words:].mean(0) - ref.mean
    cov = np.linalg.inv(ref.whiten.T @ ref.whiten)  # Σ_s back from the whitening map
    expected = float(centred @ np.linalg.solve(cov, centred))
    assert got == pytest.approx(expected, rel=1e-9)


def test_a_prompt_far_from_the_reference_scores_higher(gateway: Factory) -> None:
    client, _, _ = gateway(density=True, embed=True)

    def distance(content: str) -> float:
        return float(_chat(client, content)["choices"][0]["uncertainty"]["prompt_distance"])

    # a 50-word prompt's mean hidden state sits near the reference mean (the fake's token
    # vectors are i.i.d. like the reference rows): far closer than one token's vector
    long = distance(" ".join(f"w{i}" for i in range(50)))
    short = [distance(f"single{i}") for i in range(20)]
    assert long < float(np.median(short)) / 4
    assert distance("single0") == short[0]  # deterministic


def test_without_an_embedder_the_score_is_absent_and_nothing_is_pooled(gateway: Factory) -> None:
    client, fake, _ = gateway(density=True, embed=False)
    u = _chat(client)["choices"][0]["uncertainty"]
    assert u["prompt_distance"] is None and u["prompt_novelty"] is not None
    assert _pooled(fake) == []


def test_without_a_reference_the_embedder_is_not_called(gateway: Factory) -> None:
    client, fake, _ = gateway(density=False, embed=True)
    assert _chat(client)["choices"][0]["uncertainty"]["prompt_distance"] is None
    assert _pooled(fake) == []


@pytest.mark.parametrize(("density", "embed", "fix"), [
    (True, False, "--embed-url"),
    (False, True, "softspec reference"),
])  # fmt: skip
def test_a_gate_on_the_distance_without_it_is_refused_at_start_up(
    gateway: Factory, density: bool, embed: bool, fix: str
) -> None:
    gate = GateSpec(score_name="prompt_distance", threshold=10.0)
    with pytest.raises(ConfigError, match=fix):
        gateway(gate=gate, density=density, embed=embed)


def test_a_withholding_gate_on_the_distance_decides_before_any_member_generates(
    gateway: Factory,
) -> None:
    gate = GateSpec(score_name="prompt_distance", threshold=0.0)  # every prompt is "far"
    client, fake, _ = gateway(gate=gate, density=True, embed=True, gate_action="abstain")
    body = _chat(client)
    g = body["gate"]
    assert (g["decision"], g["stage"], g["score_name"]) == ("abstain", "prompt", "prompt_distance")
    assert g["score"] == body["choices"][0]["uncertainty"]["prompt_distance"] > 0.0
    generated = [b for p, b in fake.calls if p == "/v1/completions" and "logprobs" in b]
    assert generated == []


def test_an_unreachable_embedder_makes_the_gateway_not_ready_and_requests_fail_cleanly(
    gateway: Factory,
) -> None:
    client, fake, _ = gateway(density=True, embed=True)
    assert client.get("/ready").status_code == 200

    def down(request: httpx.Request) -> httpx.Response | None:
        if request.url.host == "embedder":
            raise httpx.ConnectError("refused", request=request)
        return None

    fake.fail = down
    r = client.get("/ready")
    assert r.status_code == 503 and "embedder" in r.json()["error"]["message"]
    r = client.post(
        "/v1/chat/completions",
        json={"model": "ens", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    )
    assert r.status_code == 503
    assert r.json()["error"]["type"] == "upstream_unavailable"


@pytest.mark.parametrize("embed", [True, False])
def test_models_say_whether_the_distance_is_served(gateway: Factory, embed: bool) -> None:
    client, _, _ = gateway(density=True, embed=embed)
    entry = client.get("/v1/models").json()["data"][0]
    assert entry["prompt_distance"] == {
        "layer": "last", "pooling": "user", "shrinkage": 0.1, "n": 40, "served": embed
    }  # fmt: skip
    plain, _, _ = gateway()
    assert plain.get("/v1/models").json()["data"][0]["prompt_distance"] is None
