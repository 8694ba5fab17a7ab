"""The gateway on a fake vLLM: every number recomputed by brute force from the fake model."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from ensemble.manifest import GateSpec
from ensemble.math import (
    align_top_logprobs,
    disagreement,
    mixture_logprob,
    responsibilities,
    sequence_epistemic,
    token_uncertainty,
)
from ensemble.scores import DEFAULT_GATE_SCORE
from tests.server.fake_vllm import BASE_ID, EOS, VOCAB, FakeVLLM

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def prompt_ids(fake: FakeVLLM, messages: list[dict[str, str]]) -> list[int]:
    req = httpx.Request("POST", "http://vllm/tokenize", json={"messages": messages})
    ids: list[int] = fake.handler(req).json()["tokens"]
    fake.calls.pop()
    return ids


def greedy(fake: FakeVLLM, served: str, prompt: list[int], max_tokens: int) -> list[int]:
    seq: list[int] = []
    for _ in range(max_tokens):
        tok = int(np.argmax(fake.logdist(served, prompt + seq)))
        seq.append(tok)
        if tok == EOS:
            break
    return seq


def seq_logp(fake: FakeVLLM, served: str, prompt: list[int], seq: list[int]) -> float:
    return sum(float(fake.logdist(served, prompt + seq[:t])[tok]) for t, tok in enumerate(seq))


def expected(fake: FakeVLLM, manifest, max_tokens: int, top_n: int = 20) -> dict:  # type: ignore[no-untyped-def]
    members = manifest.member_names
    served = [manifest.served_name(m) for m in members]
    lw = manifest.log_weights()
    prompt = prompt_ids(fake, MESSAGES)
    cands = [greedy(fake, s, prompt, max_tokens) for s in served]
    L = np.array([[seq_logp(fake, s, prompt, c) for c in cands] for s in served])
    mix = mixture_logprob(L, lw)
    lengths = np.array([len(c) for c in cands])
    a = int(np.argmax(mix / lengths))
    steps, token_lp = [], []
    for t, tok in enumerate(cands[a]):
        full = np.stack([fake.logdist(s, prompt + cands[a][:t]) for s in served])
        if top_n >= len(VOCAB):
            steps.append(token_uncertainty(full, lw))
        else:
            tops = [
                {int(i): float(row[i]) for i in np.argsort(-row, kind="stable")[:top_n]}
                | {tok: float(row[tok])}
                for row in full
            ]
            steps.append(token_uncertainty(align_top_logprobs(tops), lw))
        token_lp.append(float(mixture_logprob(full[:, tok], lw)))

    # base-relative scores, brute force: per-token log q_base − log Σ_k π_k q_k
    def llr(context: list[int], seq: list[int]) -> list[float]:
        out = []
        for t, tok in enumerate(seq):
            member = [float(fake.logdist(s, context + seq[:t])[tok]) for s in served]
            mixture = float(np.log(np.sum(np.exp(lw) * np.exp(member))))
            out.append(float(fake.logdist(BASE_ID, context + seq[:t])[tok]) - mixture)
        return out

    return {
        "novelty": float(np.mean(llr(prompt, cands[a]))) if cands[a] else None,
        # the user's tokens: the fake renders json.dumps(messages) word by word, so the chat
        # template's fixed prefix is BOS + '[{"role":' '"user",' '"content":' (4 tokens)
        "prompt_novelty": float(np.mean(llr(prompt[:4], prompt[4:]))),
        "answer": a,
        "cands": cands,
        "L": L,
        "mixture": mix,
        "text": "".join(VOCAB[t] for t in cands[a] if t != EOS),
        "epistemic": np.mean([s["epistemic"] for s in steps]),
        "aleatoric": np.mean([s["aleatoric"] for s in steps]),
        "total": np.mean([s["total"] for s in steps]),
        "steps": steps,
        "token_lp": token_lp,
        "seq_epi": sequence_epistemic(L, np.arange(len(members)), lengths, lw),
        "disagreement": disagreement(["".join(VOCAB[t] for t in c if t != EOS) for c in cands]),
        "resp": responsibilities(L[:, a], manifest.alpha, lw),
        "prompt": prompt,
    }


def chat(client, **kw):  # type: ignore[no-untyped-def]
    body = {"model": "ens", "messages": MESSAGES, "temperature": 0, "max_tokens": 6, **kw}
    return client.post("/v1/chat/completions", json=body)


@pytest.mark.parametrize("top_n", [20, 3])
def test_chat_mixing_matches_brute_force(gateway, top_n: int) -> None:  # type: ignore[no-untyped-def]
    client, fake, manifest = gateway(k=3, weights=[0.5, 0.3, 0.2], top_logprobs=top_n)
    r = chat(
        client,
        logprobs=True,
        top_logprobs=2,
        ensemble={"return_candidates": True, "per_token": True},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    want = expected(fake, manifest, 6, top_n)
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": want["text"]}
    u = choice["uncertainty"]
    assert u["epistemic"] == pytest.approx(want["epistemic"], abs=1e-9)
    assert u["aleatoric"] == pytest.approx(want["aleatoric"], abs=1e-9)
    assert u["total"] == pytest.approx(want["total"], abs=1e-9)
    assert u["sequence_epistemic"] == pytest.approx(want["seq_epi"], abs=1e-9)
    assert u["disagreement"] == pytest.approx(want["disagreement"])
    assert u["novelty"] == pytest.approx(want["novelty"], abs=1e-9)
    assert u["prompt_novelty"] == pytest.approx(want["prompt_novelty"], abs=1e-9)
    assert u["combined"] is None  # this manifest has no gate calibration
    assert [p["epistemic"] for p in u["per_token"]] == pytest.approx(
        [s["epistemic"] for s in want["steps"]], abs=1e-9
    )
    assert [p["token"] for p in u["per_token"]] == [VOCAB[t] for t in want["cands"][want["answer"]]]
    resp = choice["responsibilities"]
    assert list(resp) == manifest.member_names
    assert list(resp.values()) == pytest.approx(list(want["resp"]), abs=1e-9)
    assert sum(resp.values()) == pytest.approx(1.0)
    cands = choice["candidates"]
    assert [c["member"] for c in cands] == manifest.member_names
    for m, c in enumerate(cands):
        assert list(c["scores"].values()) == pytest.approx(list(want["L"][:, m]), abs=1e-9)
        assert c["mixture_logprob"] == pytest.approx(want["mixture"][m], abs=1e-9)
    # the standard logprobs are the MIXTURE's token log-probs, recomputable from the scores
    content = choice["logprobs"]["content"]
    assert [c["logprob"] for c in content] == pytest.approx(want["token_lp"], abs=1e-9)
    lw = manifest.log_weights()
    for c in cands:  # each candidate's mixture log-prob follows from its per-member scores
        assert c["mixture_logprob"] == pytest.approx(
            mixture_logprob(np.array(list(c["scores"].values())), lw)
        )
    assert all(len(c["top_logprobs"]) <= 2 for c in content)
    assert body["gate"]["score_name"] == DEFAULT_GATE_SCORE
    assert body["gate"]["score"] == pytest.approx(u[DEFAULT_GATE_SCORE])
    threshold = body["gate"]["threshold"]
    assert body["gate"]["decision"] == ("pass" if u[DEFAULT_GATE_SCORE] <= threshold else "flag")
    assert r.headers["x-gate-decision"] == body["gate"]["decision"]
    assert float(r.headers["x-uncertainty-epistemic"]) == pytest.approx(u["epistemic"], rel=1e-5)


def test_usage_counts_every_generated_and_scored_token(gateway) -> None:  # type: ignore[no-untyped-def]
    client, fake, manifest = gateway(k=3)
    body = chat(client).json()
    want = expected(fake, manifest, 6)
    p, cands = len(want["prompt"]), want["cands"]
    unique = {tuple(c) for c in cands}
    scored = sum(p + len(c) for c in unique for k in range(3) if tuple(cands[k]) != c)
    base = sum(p + len(c) for c in unique)  # every distinct candidate under the base
    prompt_scoring = 4 * p  # the prompt under the 3 members and the base (context included)
    assert body["usage"]["completion_tokens"] == sum(len(c) for c in cands)
    assert body["usage"]["prompt_tokens"] == 3 * p + scored + base + prompt_scoring
    assert (
        body["usage"]["total_tokens"]
        == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    )


def test_one_render_and_one_request_per_member_and_stage(gateway) -> None:  # type: ignore[no-untyped-def]
    client, fake, manifest = gateway(k=4)
    chat(client)  # the first chat request also learns the template's span (two renders)
    assert [p for p, _ in fake.calls].count("/tokenize") == 3
    fake.calls.clear()
    chat(client)
    paths = [p for p, _ in fake.calls]
    assert paths.count("/tokenize") == 1
    gens = [
        b for p, b in fake.calls if p == "/v1/completions" and not isinstance(b["prompt"][0], list)
    ]
    scores = [
        b for p, b in fake.calls if p == "/v1/completions" and isinstance(b["prompt"][0], list)
    ]
    assert sorted(b["model"] for b in gens) == sorted(
        manifest.served_name(m) for m in manifest.member_names
    )
    cross = [b for b in scores if b["prompt_logprobs"] == 20]
    assert len(cross) <= 4 and all(b["max_tokens"] == 1 for b in cross)
    # the base-relative scores: the prompt under each member and the base, and the
    # candidates under the base, asking for the actual tokens' log-probs only
    actual_only = [b for b in scores if b["prompt_logprobs"] == 0]
    assert len(actual_only) == len(scores) - len(cross) == 4 + 1 + 1
    assert sorted(b["model"] for b in actual_only if len(b["prompt"][0]) > 1) == sorted(
        [manifest.served_name(m) for m in manifest.member_names] + [BASE_ID] * 2
    )
    assert all(b["prompt"] == gens[0]["prompt"] for b in gens)  # token ids end to end


def test_identical_members_have_no_epistemic_uncertainty(gateway) -> None:  # type: ignore[no-untyped-def]
    client, _, _ = gateway(k=3, personalities=[7, 7, 7])
    body = chat(client, temperature=1.0, ensemble={"samples_per_member": 2}).json()
    u = body["choices"][0]["uncertainty"]
    assert u["epistemic"] < 1e-12 and u["aleatoric"] > 0
    assert abs(u["sequence_epistemic"]) < 1e-12
    body = chat(client).json()
    assert body["choices"][0]["uncertainty"]["disagreement"] == 0.0


def test_single_member_model_is_the_baseline(gateway) -> None:  # type: ignore[no-untyped-def]
    client, fake, manifest = gateway(k=3)
    body = chat(client, model="ens:m1").json()
    want = expected(fake, manifest, 6)
    assert body["choices"][0]["message"]["content"] == "".join(
        VOCAB[t] for t in want["cands"][1] if t != EOS
    )
    assert body["choices"][0]["responsibilities"] == {"m1": 1.0}
    assert body["choices"][0]["uncertainty"]["epistemic"] == 0.0
    generating = [
        b["model"]
        for p, b in fake.calls
        if p == "/v1/completions" and not isinstance(b["prompt"][0], list)
    ]
    assert generating == [manifest.served_name("m1")]  # one member generates, no mixing


def test_member_subset_and_majority_select(gateway) -> None:  # type: ignore[no-untyped-def]
    client, _, _ = gateway(k=3, personalities=[1, 1, 2])
    body = chat(
        client,
        ensemble={"members": ["m0", "m1", "m2"], "select": "majority", "return_candidates": True},
    ).json()
    cands = body["choices"][0]["candidates"]
    assert body["choices"][0]["message"]["content"] == cands[0]["text"] == cands[1]["text"]
    body = chat(client, ensemble={"members": ["m2", "m0"]}).json()
    assert set(body["choices"][0]["responsibilities"]) == {"m2", "m0"}


def test_completions_endpoint_and_its_logprobs(gateway) -> None:  # type: ignore[no-untyped-def]
    client, _, _ = gateway(k=2)
    r = client.post(
        "/v1/completions",
        json={
            "model": "ens",
            "prompt": "The capital of France is",
            "max_tokens": 4,
            "temperature": 0,
            "logprobs": 2,
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    choice = body["choices"][0]
    assert body["object"] == "text_completion" and isinstance(choice["text"], str)
    lp = choice["logprobs"]
    assert (
        len(lp["tokens"])
        == len(lp["token_logprobs"])
        == len(lp["top_logprobs"])
        == len(lp["text_offset"])
    )
    assert set(choice["uncertainty"]) >= {
        "epistemic",
        "aleatoric",
        "total",
        "sequence_epistemic",
        "disagreement",
    }
    r = client.post("/v1/completions", json={"model": "ens", "prompt": [99, 3, 4], "max_tokens": 3})
    assert r.status_code == 200, r.text


def test_gate_abstains_above_threshold(gateway) -> None:  # type: ignore[no-untyped-def]
    client, _, _ = gateway(
        k=3,
        gate=GateSpec(score_name="total", threshold=0.0),
        gate_action="abstain",
        abstain_text="No comment.",
    )
    r = chat(client, logprobs=True)
    body = r.json()
    assert body["gate"] == {
        "decision": "abstain",
        "score": pytest.approx(body["choices"][0]["uncertainty"]["total"]),
        "score_name": "total",
        "threshold": 0.0,
        "stage": "answer",
    }
    assert body["choices"][0]["message"]["content"] == "No comment."
    assert body["choices"][0]["finish_reason"] == "content_filter"
    assert body["choices"][0]["logprobs"] is None
    assert r.headers["x-gate-decision"] == "abstain"
    client, _, _ = gateway(k=3, gate_score="disagreement", gate_threshold=1.0)
    assert chat(client).json()["gate"]["decision"] == "pass"


def sse_events(text: str) -> list:  # type: ignore[type-arg]
    frames = [f for f in text.split("\n\n") if f]
    assert all(f.startswith("data: ") for f in frames)
    return [f[len("data: ") :] for f in frames]


def test_streaming_chat_framing(gateway) -> None:  # type: ignore[no-untyped-def]
    client, _, _ = gateway(k=3)
    plain = chat(client).json()
    r = chat(client, stream=True, stream_options={"include_usage": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == plain["choices"][0]["message"]["content"]
    final = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(final) == 1
    assert final[0]["choices"][0]["uncertainty"] == plain["choices"][0]["uncertainty"]
    assert final[0]["choices"][0]["responsibilities"] == plain["choices"][0]["responsibilities"]
    assert final[0]["gate"] == plain["gate"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == plain["usage"]
    assert r.headers["x-gate-decision"] == plain["gate"]["decision"]


def test_streaming_completions_without_usage(gateway) -> None:  # type: ignore[no-untyped-def]
    client, _, _ = gateway(k=2)
    request = {"model": "ens", "prompt": "hi there", "max_tokens": 3, "temperature": 0}
    plain = client.post("/v1/completions", json=request).json()["choices"][0]
    r = client.post("/v1/completions", json={**request, "stream": True})
    events = sse_events(r.text)
    chunks = [json.loads(e) for e in events[:-1]]
    assert events[-1] == "[DONE]" and all("usage" not in c for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == plain["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == plain["finish_reason"]


def test_models_lists_ensemble_and_members(gateway) -> None:  # type: ignore[no-untyped-def]
    client, _, _ = gateway(k=2)
    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert ids == ["ens", "ens:m0", "ens:m1"]


def test_health_ready_metrics(gateway) -> None:  # type: ignore[no-untyped-def]
    client, fake, _ = gateway(k=2)
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").json()["status"] == "ready"
    chat(client)
    text = client.get("/metrics").text
    for name in ("softspec_requests_total", "softspec_request_seconds", "softspec_epistemic_nats",
                 "softspec_gate_decisions_total", "softspec_upstream_seconds", "softspec_inflight_requests"):  # fmt: skip
        assert name in text
    assert 'endpoint="/v1/chat/completions",status="200"' in text
    fake.personalities.popitem()  # an adapter is gone
    r = client.get("/ready")
    assert r.status_code == 503 and "not loaded" in r.json()["error"]["message"]


def test_base_requests_never_overlap_adapter_requests() -> None:
    """vLLM CPU runs a base request batched with LoRA requests with the last adapter: the
    engine's lock keeps base calls apart from adapter calls (and lets adapter calls share)."""
    import asyncio

    from server.vllm_engine import _BaseExclusive

    lock = _BaseExclusive()
    active: list[str] = []
    seen: list[tuple[str, ...]] = []

    async def call(kind: str, delay: float) -> None:
        async with lock.hold(exclusive=kind == "base"):
            active.append(kind)
            seen.append(tuple(active))
            await asyncio.sleep(delay)
            active.remove(kind)

    async def main() -> None:
        tasks = [call("lora", 0.02) for _ in range(4)] + [call("base", 0.01)]
        tasks += [call("lora", 0.01) for _ in range(3)] + [call("base", 0.01)]
        await asyncio.gather(*tasks)

    asyncio.run(main())
    assert all(s == ("base",) for s in seen if "base" in s)  # alone whenever it runs
    assert max(len(s) for s in seen) >= 2  # adapter calls did run together
    assert sum(s == ("base",) for s in seen) == 2
