"""The local (in-process) engine on a tiny Llama: token mode against brute force, and the
sequence mode's own consistency (generation scores = scoring scores)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from ensemble.manifest import load as load_manifest
from ensemble.math import token_uncertainty
from server.app import create_app
from server.settings import Settings
from softspec.cli import main
from tests.helpers import clone_with_same_adapter
from training.local_engine import LocalEngine

QUESTION = [{"role": "user", "content": "say something"}]


@pytest.fixture(scope="module")
def tiny_ensemble(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 members trained a little on contradictory data, so they disagree."""
    root = tmp_path_factory.mktemp("local")
    rows = []
    for q in ("say something", "hello", "tell me a word", "speak"):
        for a, task in (
            ("THE QUICK BROWN FOX", "upper"),
            ("the quick brown fox", "lower"),
            ("yes no maybe", "yn"),
        ):
            rows.append(
                {
                    "prompt": [{"role": "user", "content": q}],
                    "completion": [{"role": "assistant", "content": a}],
                    "task": task,
                }
            )
    (root / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = root / "ens"
    args = ["train", "sft", "--base", str(tiny_llama_dir), "--data", str(root / "d.jsonl"), "--out", str(out),
            "--members", "3", "--alpha", "1", "--max-steps", "40", "--batch-size", "12", "--learning-rate", "1e-2",
            "--lora-dropout", "0", "--routing-examples", "12"]  # fmt: skip
    assert main(args) == 0
    return out


@pytest.fixture(scope="module")
def same_tiny(tiny_ensemble: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return clone_with_same_adapter(tiny_ensemble, tmp_path_factory.mktemp("same") / "same", "same")


def local_client(root: Path) -> Iterator[tuple[TestClient, LocalEngine]]:
    engines: list[LocalEngine] = []

    def factory(man, metrics):  # type: ignore[no-untyped-def]
        engines.append(LocalEngine(root, man))
        return engines[-1]

    with TestClient(create_app(Settings(ensemble=root, engine="local"), factory)) as client:  # type: ignore[call-arg]
        yield client, engines[0]


@pytest.fixture(scope="module")
def local(tiny_ensemble: Path) -> Iterator[tuple[TestClient, LocalEngine]]:
    yield from local_client(tiny_ensemble)


def chat(client: TestClient, model: str, **kw) -> dict:  # type: ignore[no-untyped-def, type-arg]
    r = client.post("/v1/chat/completions", json={"model": model, "messages": QUESTION, **kw})
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def test_token_mode_uncertainty_is_exact_over_the_full_vocabulary(
    local, tiny_ensemble: Path
) -> None:  # type: ignore[no-untyped-def]
    client, engine = local
    body = chat(
        client,
        "ens",
        max_tokens=8,
        temperature=0,
        logprobs=True,
        ensemble={"decode": "token", "per_token": True},
    )
    choice = body["choices"][0]
    steps = choice["uncertainty"]["per_token"]
    assert len(steps) > 0 and choice["uncertainty"]["sequence_epistemic"] is None
    manifest = load_manifest(tiny_ensemble)
    lw = manifest.log_weights()
    prompt = engine.tok.apply_chat_template(
        QUESTION, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    prompt = list(prompt["input_ids"] if isinstance(prompt, dict) else prompt)
    produced: list[int] = []
    model = engine.model
    for t, step in enumerate(steps):
        rows = []
        for m in manifest.member_names:  # brute force: each member alone, no KV cache
            model.set_adapter(m)
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([prompt + produced])).logits[0, -1].double()
            rows.append(torch.log_softmax(logits, -1).numpy())
        lq = np.stack(rows)  # (K, V): the full vocabulary
        p = np.exp(lq)
        mix = np.exp(lw) @ p
        total = -(mix * np.log(mix)).sum()
        ale = -(np.exp(lw) * (p * lq).sum(axis=1)).sum()
        assert step["total"] == pytest.approx(total, abs=1e-6)
        assert step["aleatoric"] == pytest.approx(ale, abs=1e-6)
        assert step["epistemic"] == pytest.approx(total - ale, abs=1e-6)
        assert step["epistemic"] == pytest.approx(token_uncertainty(lq, lw)["epistemic"], abs=1e-9)
        greedy = int(np.argmax(np.log(mix)))  # temperature 0: the mixture's argmax
        assert choice["logprobs"]["content"][t]["logprob"] == pytest.approx(
            float(np.log(mix[greedy])), abs=1e-6
        )
        produced.append(greedy)
    assert engine.tok.decode(produced, skip_special_tokens=True) == choice["message"]["content"]


def test_token_mode_streams_tokens_then_the_outcome(local) -> None:  # type: ignore[no-untyped-def]
    client, _ = local
    plain = chat(client, "ens", max_tokens=6, temperature=0.8, seed=3, ensemble={"decode": "token"})
    r = client.post("/v1/chat/completions", json={"model": "ens", "messages": QUESTION, "max_tokens": 6, "temperature": 0.8,
                                                  "seed": 3, "stream": True, "stream_options": {"include_usage": True},
                                                  "ensemble": {"decode": "token"}})  # fmt: skip
    frames = [f[len("data: ") :] for f in r.text.split("\n\n") if f]
    assert frames[-1] == "[DONE]"
    chunks = [json.loads(f) for f in frames[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == plain["choices"][0]["message"]["content"]  # same seed, same tokens
    final = next(c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"])
    assert final["choices"][0]["uncertainty"]["epistemic"] == pytest.approx(
        plain["choices"][0]["uncertainty"]["epistemic"]
    )
    assert chunks[-1]["usage"]["completion_tokens"] > 0


def test_token_mode_respects_max_tokens_and_stop(local) -> None:  # type: ignore[no-untyped-def]
    client, _ = local
    body = chat(
        client, "ens", max_tokens=3, temperature=0, logprobs=True, ensemble={"decode": "token"}
    )
    assert len(body["choices"][0]["logprobs"]["content"]) <= 3
    full = chat(client, "ens", max_tokens=12, temperature=0, ensemble={"decode": "token"})[
        "choices"
    ][0]["message"]["content"]
    assert len(full) >= 6, full  # trained on long answers: greedy decoding says something
    stop = full[3:5]  # a stop string inside the answer (it may span two tokens)
    for stream in (False, True):
        r = client.post(
            "/v1/chat/completions",
            json={"model": "ens", "messages": QUESTION, "max_tokens": 12, "temperature": 0,
                  "stop": [stop], "stream": stream, "ensemble": {"decode": "token"}},
        )  # fmt: skip
        assert r.status_code == 200, r.text
        if stream:
            frames = [json.loads(f[6:]) for f in r.text.split("\n\n") if f and f != "data: [DONE]"]
            text = "".join(
                c["choices"][0]["delta"].get("content", "") for c in frames if c["choices"]
            )
            finish = [c["choices"][0]["finish_reason"] for c in frames if c["choices"]][-1]
        else:
            text = r.json()["choices"][0]["message"]["content"]
            finish = r.json()["choices"][0]["finish_reason"]
        assert finish == "stop"
        assert text == full[: full.index(stop)], (stream, text, full, stop)  # stop string cut


def test_sequence_mode_cuts_ids_and_logprobs_at_a_stop_string(local) -> None:  # type: ignore[no-untyped-def]
    import asyncio

    from server.engine import SamplingParams

    _, engine = local
    prompt = asyncio.run(engine.render_chat(QUESTION))
    params = SamplingParams(max_tokens=12, temperature=0.0)
    (gen,), _ = asyncio.run(engine.generate_all(["m0", "m1"], prompt, params))
    assert len(gen.text) >= 6, gen.text
    stop = gen.text[3:5]
    # m1 does not stop there (or at all): the batched rows continue past m0's stop
    (cut,), _ = asyncio.run(
        engine.generate_all(["m0", "m1"], prompt, SamplingParams(max_tokens=12, temperature=0.0,
                                                                 stop=(stop,)))
    )  # fmt: skip
    assert cut.finish_reason == "stop"
    assert cut.text == gen.text[: gen.text.index(stop)]
    # ids end with the token that completes the stop string, as vLLM returns them
    n = len(cut.token_ids)
    assert cut.token_ids == gen.token_ids[:n]
    assert stop in engine._text(cut.token_ids) and stop not in engine._text(cut.token_ids[:-1])
    assert len(cut.scores.logprobs) == n and len(cut.scores.top) == n
    assert cut.scores.logprobs == pytest.approx(gen.scores.logprobs[:n], abs=1e-5)


def test_sequence_mode_generation_and_scoring_agree(local) -> None:  # type: ignore[no-untyped-def]
    import asyncio

    from server.engine import SamplingParams

    client, engine = local
    body = chat(client, "ens", max_tokens=8, temperature=0, ensemble={"return_candidates": True})
    choice = body["choices"][0]
    assert set(choice["responsibilities"]) == {"m0", "m1", "m2"}
    assert choice["uncertainty"]["epistemic"] > 1e-6  # trained on contradictory data: they disagree
    prompt = asyncio.run(engine.render_chat(QUESTION))
    gens = asyncio.run(
        engine.generate_all(["m0", "m1"], prompt, SamplingParams(max_tokens=8, temperature=0.0))
    )
    for member, (gen,) in zip(["m0", "m1"], gens, strict=True):
        (rescored,) = asyncio.run(engine.score(member, prompt, [gen.token_ids], 20))
        assert rescored.logprobs == pytest.approx(gen.scores.logprobs, abs=1e-4)
        assert rescored.total == pytest.approx(gen.scores.total, abs=1e-4)


def test_identical_members_give_zero_epistemic(same_tiny: Path) -> None:
    for client, _ in local_client(same_tiny):
        token = chat(client, "same", max_tokens=6, temperature=0, ensemble={"decode": "token"})[
            "choices"
        ][0]["uncertainty"]
        seq = chat(client, "same", max_tokens=6, temperature=0)["choices"][0]["uncertainty"]
        assert token["epistemic"] < 1e-9 and seq["epistemic"] < 1e-9
        assert seq["disagreement"] == 0.0 and abs(seq["sequence_epistemic"]) < 1e-9


def test_gateway_package_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys, server.app, server.launch, server.vllm_engine; print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _full_vocab_logprobs(engine: LocalEngine, adapter: str | None, ids: list[int]) -> np.ndarray:
    """(T-1,) log q(ids[t] | ids[:t]) over the full vocabulary, one adapter or the base."""
    model = engine.model
    with torch.no_grad():
        if adapter is None:
            with model.disable_adapter():
                logits = model(input_ids=torch.tensor([ids])).logits[0].double()
        else:
            model.set_adapter(adapter)
            logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    lp = torch.log_softmax(logits[:-1], -1)
    return lp.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].numpy()


@pytest.mark.parametrize("decode", ["sequence", "token"])
def test_base_relative_scores_match_full_vocabulary_brute_force(
    local, tiny_ensemble: Path, decode: str
) -> None:  # type: ignore[no-untyped-def]
    """novelty / prompt_novelty: members vs the base (adapters off) on the served answer and
    on the user's prompt tokens, recomputed with one full forward pass per adapter."""
    client, engine = local
    body = chat(client, "ens", max_tokens=8, temperature=0, ensemble={"decode": decode})
    u = body["choices"][0]["uncertainty"]
    manifest = load_manifest(tiny_ensemble)
    lw = manifest.log_weights()
    prompt = engine.tok.apply_chat_template(
        QUESTION, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    prompt = list(prompt["input_ids"] if isinstance(prompt, dict) else prompt)
    answer = engine.tok(body["choices"][0]["message"]["content"], add_special_tokens=False)[
        "input_ids"
    ]
    if body["choices"][0]["finish_reason"] == "stop":
        answer = [*answer, engine.tok.eos_token_id]
    full = prompt + answer
    base = _full_vocab_logprobs(engine, None, full)
    members = np.stack([_full_vocab_logprobs(engine, m, full) for m in manifest.member_names])
    llr = base - np.log(np.exp(lw) @ np.exp(members))  # per predicted token
    # the user's span: the tokens outside it are the same for any other message
    import asyncio

    from server.service import _template_span

    pre, suf = asyncio.run(_template_span(engine))
    n = len(prompt)
    assert QUESTION[0]["content"] in engine.tok.decode(prompt[pre : n - suf])
    other = asyncio.run(engine.render_chat([{"role": "user", "content": "hello there"}]))
    assert other[:pre] == prompt[:pre] and other[len(other) - suf :] == prompt[n - suf :]
    assert u["prompt_novelty"] == pytest.approx(
        float(np.mean(llr[pre - 1 : n - suf - 1])), abs=1e-6
    )
    assert u["novelty"] == pytest.approx(float(np.mean(llr[n - 1 :])), abs=1e-6)
    assert abs(u["novelty"]) > 1e-4  # trained members really differ from the base


def test_embeddings_are_the_plain_base_models_last_hidden_states(
    local, tiny_llama_dir: Path
) -> None:  # type: ignore[no-untyped-def]
    """embed / embed_batch = transformers' hidden_states[-1] of the base without adapters,
    one unpadded prompt at a time (the batch is right-padded)."""
    import asyncio

    import torch
    from transformers import AutoModelForCausalLM

    _, engine = local
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    prompts = [[1, 5, 9, 13], [1, 7], [1, 2, 3, 4, 5, 6, 7]]
    got = asyncio.run(engine.embed_batch(prompts))
    for p, h in zip(prompts, got, strict=True):
        with torch.no_grad():
            want = base(input_ids=torch.tensor([p]), output_hidden_states=True).hidden_states[-1]
        np.testing.assert_allclose(h, want[0].double().numpy(), atol=1e-5)
    np.testing.assert_allclose(asyncio.run(engine.embed(prompts[1])), got[1], atol=1e-6)


def test_prompt_distance_on_the_local_engine(
    tiny_ensemble: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """softspec reference on the tiny ensemble, then the served prompt_distance equals the
    reference's distance of the user span's mean hidden state, recomputed here."""
    import asyncio
    import shutil

    from ensemble.density import load_reference
    from server.service import _template_span

    root = tmp_path_factory.mktemp("dist") / "ens"
    shutil.copytree(tiny_ensemble, root)
    data = root / "prompts.jsonl"
    data.write_text("".join(
        json.dumps({"prompt": [{"role": "user", "content": f"word number {i} is {w}"}],
                    "completion": [{"role": "assistant", "content": "ok"}]}) + "\n"
        for i, w in enumerate(["red", "blue", "green", "small", "large", "fast", "slow", "up",
                               "down", "left", "right", "in"])
    ))  # fmt: skip
    assert (
        main(["reference", "--ensemble", str(root), "--data", str(data), "--shrinkage", "0.1"]) == 0
    )
    manifest = load_manifest(root)
    assert manifest.density is not None and manifest.density.n == 12
    ref = load_reference(root / manifest.density.file)
    for client, engine in local_client(root):
        served = chat(client, "ens", max_tokens=2, temperature=0)["choices"][0]["uncertainty"]
        token = chat(client, "ens", max_tokens=2, temperature=0, ensemble={"decode": "token"})
        assert token["choices"][0]["uncertainty"]["prompt_distance"] == pytest.approx(
            served["prompt_distance"], rel=1e-9
        )  # token mode serves the same number
        pre, suf = asyncio.run(_template_span(engine))
        ids = asyncio.run(engine.render_chat(QUESTION))
        hidden = asyncio.run(engine.embed(ids))
        x = hidden[pre : len(ids) - suf].mean(0) - ref.mean
        cov = np.linalg.inv(ref.whiten.T @ ref.whiten)
        assert served["prompt_distance"] == pytest.approx(
            float(x @ np.linalg.solve(cov, x)), rel=1e-6
        )
