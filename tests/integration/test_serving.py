"""The real stack through the official openai SDK: vLLM CPU + SmolLM2 + trained adapters."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from ensemble.manifest import load as load_manifest
from ensemble.math import disagreement, mixture_logprob, responsibilities, sequence_epistemic

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def sdk(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)


def log_weights(manifest, members: list[str]) -> np.ndarray:  # type: ignore[no-untyped-def]
    lw = np.array([np.log(manifest.member(m).weight) for m in members])
    return lw - np.logaddexp.reduce(lw)


def check_against_scores(choice: dict, manifest, members: list[str] | None = None) -> None:  # type: ignore[no-untyped-def]
    """What the served numbers imply, recomputed independently with ensemble.math: the
    mixture log-likelihood of every candidate from its per-member scores, the
    responsibilities of the answer from its column of cross-scores, and the answer-level
    token scores as the means of the per-token entries."""
    members = members or manifest.member_names
    lw = log_weights(manifest, members)
    u, r = choice["uncertainty"], choice["responsibilities"]
    assert list(r) == members
    if u.get("per_token"):
        for key in ("epistemic", "aleatoric", "total"):
            want = np.mean([t[key] for t in u["per_token"]])
            assert u[key] == pytest.approx(want, abs=1e-9), key
    cands = choice.get("candidates")
    if not cands:
        return
    L = np.array([[c["scores"][m] for c in cands] for m in members])  # (K, M)
    for i, c in enumerate(cands):
        assert c["mixture_logprob"] == pytest.approx(mixture_logprob(L[:, i], lw), abs=1e-6)
    text = choice["message"]["content"] if "message" in choice else choice["text"]
    answer = next(i for i, c in enumerate(cands) if c["text"] == text)
    want_r = responsibilities(L[:, answer], manifest.alpha, lw)
    assert list(r.values()) == pytest.approx(list(want_r), abs=1e-6)


def member_lengths(client: openai.OpenAI, members: list[str], **request: object) -> dict[str, tuple[str, int]]:  # fmt: skip
    """Each member alone (greedy) through the gateway: its answer and its token count."""
    out = {}
    for m in members:
        resp = client.chat.completions.create(model=f"smol:{m}", logprobs=True, **request)  # type: ignore[call-overload]
        choice = resp.choices[0]
        out[m] = (choice.message.content, len(choice.logprobs.content))
    return out


def test_models(smol_gateway: str) -> None:
    ids = [m.id for m in sdk(smol_gateway).models.list().data]
    assert ids == ["smol", "smol:m0", "smol:m1", "smol:m2"]


def test_chat_completion_with_uncertainty(smol_gateway: str, smol_ensemble: Path) -> None:
    manifest = load_manifest(smol_ensemble)
    client = sdk(smol_gateway)
    request = {"messages": QUESTION, "max_tokens": 24, "temperature": 0}
    raw = client.chat.completions.with_raw_response.create(
        model="smol", logprobs=True, top_logprobs=3,
        extra_body={"ensemble": {"return_candidates": True, "per_token": True}}, **request,
    )  # type: ignore[call-overload]  # fmt: skip
    resp = raw.parse()
    body = resp.model_dump()
    choice = body["choices"][0]
    assert choice["message"]["content"].strip()
    check_against_scores(choice, manifest)
    cands = choice["candidates"]
    members = manifest.member_names
    assert [c["member"] for c in cands] == members
    # the standard logprobs are the mixture's, one per answer token, consistent with the scores
    content = resp.choices[0].logprobs.content  # type: ignore[union-attr]
    assert len(content) == len(choice["uncertainty"]["per_token"]) > 0
    assert all(len(t.top_logprobs) <= 3 and t.logprob <= 0 for t in content)
    # the served answer is the one the selection rule picks: the highest mixture
    # log-likelihood per token (ties: the first); the token counts come from each member
    # answering alone (greedy: the same candidate)
    alone = member_lengths(client, members, **request)
    assert [c["text"] for c in cands] == [alone[m][0] for m in members]
    lengths = np.array([max(1, alone[m][1]) for m in members])
    mixture = np.array([c["mixture_logprob"] for c in cands])
    picked = int(np.argmax(mixture / lengths))
    assert choice["message"]["content"] == cands[picked]["text"]
    # the candidate-level scores, recomputed from the candidates
    u = choice["uncertainty"]
    L = np.array([[c["scores"][m] for c in cands] for m in members])
    lw = log_weights(manifest, members)
    assert u["sequence_epistemic"] == pytest.approx(
        sequence_epistemic(L, np.arange(len(members)), lengths, lw), abs=1e-9
    )
    assert u["disagreement"] == pytest.approx(disagreement([c["text"] for c in cands]))
    gate = body["gate"]
    assert gate["score"] == pytest.approx(u[gate["score_name"]])
    assert gate["decision"] == ("pass" if gate["score"] <= gate["threshold"] else "flag")
    assert raw.headers["x-gate-decision"] == gate["decision"]
    # the base-relative scores come back through the official SDK as extra fields
    assert isinstance(u["novelty"], float) and isinstance(u["prompt_novelty"], float)
    assert u["novelty"] != 0.0 and u["combined"] is None  # trained adapters; no calibration
    assert body["usage"]["completion_tokens"] == int(sum(alone[m][1] for m in members))


def test_completion_and_member_only(smol_gateway: str, smol_ensemble: Path) -> None:
    manifest = load_manifest(smol_ensemble)
    client = sdk(smol_gateway)
    resp = client.completions.create(
        model="smol", prompt="The capital of France is", max_tokens=8, temperature=0, logprobs=2
    )
    choice = resp.model_dump()["choices"][0]
    check_against_scores(choice, manifest)
    lp = resp.choices[0].logprobs  # type: ignore[union-attr]
    assert lp is not None and len(lp.token_logprobs) > 0  # type: ignore[arg-type]
    single = client.chat.completions.create(
        model="smol:m1", messages=QUESTION, max_tokens=12, temperature=0
    )
    c = single.model_dump()["choices"][0]
    assert c["responsibilities"] == {"m1": 1.0} and c["uncertainty"]["epistemic"] == 0.0


def test_streaming(smol_gateway: str) -> None:
    client = sdk(smol_gateway)
    plain = client.chat.completions.create(
        model="smol", messages=QUESTION, max_tokens=16, temperature=0
    )
    stream = client.chat.completions.create(
        model="smol", messages=QUESTION, max_tokens=16, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    final = [c.model_dump() for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(final) == 1
    assert final[0]["choices"][0]["uncertainty"]["epistemic"] == pytest.approx(
        plain.model_dump()["choices"][0]["uncertainty"]["epistemic"], abs=1e-9
    )
    gate = final[0]["gate"]
    assert gate["decision"] == ("pass" if gate["score"] <= gate["threshold"] else "flag")
    assert (
        chunks[-1].usage is not None and chunks[-1].usage.total_tokens == plain.usage.total_tokens
    )  # type: ignore[union-attr]


def test_errors_through_the_sdk(smol_gateway: str) -> None:
    client = sdk(smol_gateway)
    with pytest.raises(openai.NotFoundError) as nf:
        client.chat.completions.create(model="nope", messages=QUESTION)
    assert nf.value.body["param"] == "model"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="smol", messages=QUESTION, temperature=5)
    with pytest.raises(openai.BadRequestError) as br:
        client.chat.completions.create(
            model="smol", messages=QUESTION, extra_body={"ensemble": {"members": ["m9"]}}
        )
    assert "m9" in str(br.value)
    with pytest.raises(openai.BadRequestError) as ctx:
        client.chat.completions.create(model="smol", messages=QUESTION, max_tokens=100_000)
    assert "context length" in str(ctx.value)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="smol", messages=[])
    r = httpx.post(
        f"{smol_gateway}/v1/chat/completions",
        content=b"{",
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_same_adapter_three_times_has_no_epistemic(same_gateway: str, same_ensemble: Path) -> None:
    client = sdk(same_gateway)
    resp = client.chat.completions.create(
        model="same", messages=QUESTION, max_tokens=16, temperature=0,
        extra_body={"ensemble": {"return_candidates": True}},
    )  # fmt: skip
    choice = resp.model_dump()["choices"][0]
    check_against_scores(choice, load_manifest(same_ensemble))
    assert choice["uncertainty"]["epistemic"] < 1e-4
    assert choice["uncertainty"]["disagreement"] == 0.0
    assert abs(choice["uncertainty"]["sequence_epistemic"]) < 1e-4


def test_trained_adapters_match_peft_in_vllm(
    smol_ensemble: Path, vllm_server, smollm2_dir: Path
) -> None:  # type: ignore[no-untyped-def]
    """vLLM's per-token log-probs of a fixed text equal peft's in float32 (tolerance 1e-3)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    manifest = load_manifest(smol_ensemble)
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    ids = tok.apply_chat_template(
        [*QUESTION, {"role": "assistant", "content": "The capital of France is Paris."}],
        tokenize=True, return_dict=False,
    )  # fmt: skip
    ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    model = None
    for name in manifest.member_names:
        adir = str(manifest.adapter_dir(smol_ensemble, name))
        if model is None:
            model = PeftModel.from_pretrained(base, adir, adapter_name=name)
        else:
            model.load_adapter(adir, adapter_name=name)
        model.set_adapter(name)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
        ours = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)
        r = httpx.post(f"{vllm_server.url}/v1/completions", timeout=120, json={
            "model": manifest.served_name(name), "prompt": ids, "max_tokens": 1, "prompt_logprobs": 1,
        })  # fmt: skip
        entries = r.json()["choices"][0]["prompt_logprobs"][1:]
        theirs = torch.tensor([e[str(t)]["logprob"] for e, t in zip(entries, ids[1:], strict=True)])
        assert torch.allclose(ours, theirs, atol=1e-3), (name, (ours - theirs).abs().max())


def test_local_engine_agrees_with_vllm(smol_ensemble: Path, smol_gateway: str) -> None:
    """Greedy sequence mode: the local engine and vLLM give the same answer, and the same
    uncertainty within 2e-3 nats per token (float32 in both; summation orders differ)."""
    from fastapi.testclient import TestClient

    from server.app import create_app
    from server.settings import Settings
    from training.local_engine import LocalEngine

    body = {
        "model": "smol",
        "messages": QUESTION,
        "max_tokens": 16,
        "temperature": 0,
        "ensemble": {"return_candidates": True},
    }
    remote = httpx.post(f"{smol_gateway}/v1/chat/completions", json=body, timeout=300).json()
    settings = Settings(ensemble=smol_ensemble, engine="local")  # type: ignore[call-arg]
    with TestClient(
        create_app(settings, lambda man, met: LocalEngine(smol_ensemble, man))
    ) as client:
        local = client.post("/v1/chat/completions", json=body).json()
    a, b = remote["choices"][0], local["choices"][0]
    assert a["message"]["content"] == b["message"]["content"]
    assert [c["text"] for c in a["candidates"]] == [c["text"] for c in b["candidates"]]
    # novelty / prompt_novelty: the base model (adapters off) in vLLM vs peft's disabled
    # adapters; the local engine's values are tested against full-vocabulary brute force
    for key in (
        "epistemic",
        "aleatoric",
        "total",
        "sequence_epistemic",
        "novelty",
        "prompt_novelty",
    ):
        assert a["uncertainty"][key] == pytest.approx(b["uncertainty"][key], abs=2e-3), key
    assert a["uncertainty"]["disagreement"] == b["uncertainty"]["disagreement"]
    for m in a["responsibilities"]:
        assert a["responsibilities"][m] == pytest.approx(b["responsibilities"][m], abs=1e-2)
    for ca, cb in zip(a["candidates"], b["candidates"], strict=True):
        for m in ca["scores"]:
            assert ca["scores"][m] == pytest.approx(cb["scores"][m], abs=1e-2)
