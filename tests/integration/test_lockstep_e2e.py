"""Lock-step mixture decoding inside the real vLLM (CPU): token mode on the vLLM engine."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from fastapi.testclient import TestClient

from ensemble.manifest import load as load_manifest
from server.lockstep import xargs
from server.vllm_engine import VLLMEngine
from server.vllm_process import VLLMProcess

pytestmark = pytest.mark.slow

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about rain."}],
    [{"role": "user", "content": "Explain recursion to a child."}],
    [{"role": "user", "content": "Name three prime numbers."}],
]
TOKEN = {"decode": "token", "per_token": True}


def sdk(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)


def ask(client: Any, messages: Any, **kw: Any) -> dict[str, Any]:
    body = {"model": "smol", "messages": messages, "max_tokens": 24, "temperature": 0}
    body.update(kw)
    if isinstance(client, str):
        r = httpx.post(f"{client}/v1/chat/completions", json=body, timeout=300)
    else:
        r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return dict(r.json()["choices"][0])


@pytest.fixture(scope="module")
def local_client(smol_ensemble: Path) -> Any:
    from server.app import create_app
    from server.settings import Settings
    from training.local_engine import LocalEngine

    settings = Settings(ensemble=smol_ensemble, engine="local")  # type: ignore[call-arg]
    with TestClient(
        create_app(settings, lambda man, met: LocalEngine(smol_ensemble, man))
    ) as client:
        yield client


def test_greedy_lockstep_on_vllm_equals_the_local_engines_token_mode(
    smol_gateway: str, local_client: Any
) -> None:
    """Same tokens as the local engine's exact full-vocabulary lock-step decoding; the
    per-token epistemic (top-20 log-probs in vLLM, full vocabulary locally) within 2e-3.
    (Aleatoric and total are not compared: from the top-20 with the rest lumped into one
    bucket they are lower bounds of the full-vocabulary entropies, far off on flat
    positions; the members' shared rest cancels in the epistemic term.)"""
    worst = 0.0
    for messages in PROMPTS:
        a = ask(smol_gateway, messages, ensemble=TOKEN)
        b = ask(local_client, messages, ensemble=TOKEN)
        assert a["decode"] == {"mode": "token", "fallback": None}
        assert a["message"]["content"] == b["message"]["content"]
        pa, pb = a["uncertainty"]["per_token"], b["uncertainty"]["per_token"]
        assert [t["token"] for t in pa] == [t["token"] for t in pb]
        for ta, tb in zip(pa, pb, strict=True):
            worst = max(worst, abs(ta["epistemic"] - tb["epistemic"]))
            assert ta["epistemic"] == pytest.approx(tb["epistemic"], abs=2e-3)
        for key in ("novelty", "prompt_novelty"):
            assert a["uncertainty"][key] == pytest.approx(b["uncertainty"][key], abs=2e-3)
        for m, r in a["responsibilities"].items():
            assert r == pytest.approx(b["responsibilities"][m], abs=1e-2)
    print(f"lock-step vs local token mode: max |Δ epistemic| per token {worst:.2e} nats")


def test_streamed_lockstep_sends_the_same_tokens_as_they_are_decided(smol_gateway: str) -> None:
    client = sdk(smol_gateway)
    plain = ask(smol_gateway, PROMPTS[1], ensemble={"decode": "token"})
    stream = client.chat.completions.create(
        model="smol", messages=PROMPTS[1], max_tokens=24, temperature=0, stream=True,
        extra_body={"ensemble": {"decode": "token"}},
    )  # fmt: skip
    chunks = list(stream)
    deltas = [
        c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content
    ]
    assert len(deltas) > 3  # token by token, not one piece at the end
    assert "".join(deltas) == plain["message"]["content"]
    final = chunks[-1].choices[0].model_dump()
    assert final["decode"]["mode"] == "token"
    assert final["uncertainty"]["epistemic"] == pytest.approx(plain["uncertainty"]["epistemic"])


def _group(url: str, names: list[str], prompt: list[int], **kw: Any) -> list[list[str]]:
    """One group straight to vLLM; each row's token ids."""
    group = uuid.uuid4().hex
    k = len(names)

    async def row(c: httpx.AsyncClient, i: int) -> list[str]:
        body = {
            "model": names[i], "prompt": prompt, "max_tokens": 20, "temperature": 0.0,
            "logprobs": 1, "return_tokens_as_token_ids": True, "stop_token_ids": [1],
            "vllm_xargs": xargs(group, i, k, 1 / k, abort=1, **kw),
        }  # fmt: skip
        r = await c.post(f"{url}/v1/completions", json=body)
        assert r.status_code == 200, r.text
        return list(r.json()["choices"][0]["logprobs"]["tokens"])

    async def main() -> list[list[str]]:
        async with httpx.AsyncClient(timeout=300) as c:
            return list(await asyncio.gather(*(row(c, i) for i in range(k))))

    return asyncio.run(main())


def test_sampled_rows_share_one_path_and_follow_the_seed(
    vllm_server: VLLMProcess, smol_ensemble: Path
) -> None:
    man = load_manifest(smol_ensemble)
    names = [man.served_name(m) for m in man.member_names]
    prompt = httpx.post(f"{vllm_server.url}/tokenize", json={"model": names[0],
                        "prompt": "Once upon a time"}, timeout=60).json()["tokens"]  # fmt: skip
    paths = {}
    for seed in (11, 11, 12):
        rows = _group(vllm_server.url, names, prompt, temperature=1.0, top_p=0.95, seed=seed)
        assert all(r == rows[0] for r in rows), "the rows of a sampled group left the shared path"
        paths.setdefault(seed, []).append(rows[0])
    assert paths[11][0] == paths[11][1]
    assert paths[11][0] != paths[12][0]


def test_concurrent_groups_do_not_mix(smol_gateway: str) -> None:
    solo = [ask(smol_gateway, p, ensemble={"decode": "token"}) for p in PROMPTS]

    async def together() -> list[dict[str, Any]]:
        async with httpx.AsyncClient(timeout=300) as c:
            body = {"model": "smol", "max_tokens": 24, "temperature": 0,
                    "ensemble": {"decode": "token"}}  # fmt: skip
            rs = await asyncio.gather(*(c.post(f"{smol_gateway}/v1/chat/completions",
                                               json={**body, "messages": p}) for p in PROMPTS))  # fmt: skip
            return [r.json()["choices"][0] for r in rs]

    for a, b in zip(asyncio.run(together()), solo, strict=True):
        assert a["decode"]["mode"] == "token"
        assert a["message"]["content"] == b["message"]["content"]
        assert a["uncertainty"]["epistemic"] == pytest.approx(b["uncertainty"]["epistemic"])


class _LateMember(VLLMEngine):
    """Sends the last member's request ``delay`` s after the others in the first ``late``
    groups, so vLLM's group scheduler releases the group incomplete and it splits."""

    delay = 3.0  # > GroupScheduler.HOLD_S
    late = 99
    groups = 0

    async def _member_rows(self, member: str, index: int, size: int, *a: Any, **kw: Any) -> AsyncGenerator[Any, None]:  # type: ignore[override]  # fmt: skip
        if index == 0:
            type(self).groups += 1
        if index == size - 1 and type(self).groups <= self.late:
            await asyncio.sleep(self.delay)
        async for row in super()._member_rows(member, index, size, *a, **kw):
            yield row


@pytest.mark.parametrize(("late", "mode", "outcome"), [(1, "token", "resumed"),
                                                       (99, "sequence", "fallback")])  # fmt: skip
def test_a_split_group_is_resumed_or_answered_in_sequence_mode(
    smol_ensemble: Path, vllm_server: VLLMProcess, smol_gateway: str, late: int, mode: str,
    outcome: str,
) -> None:  # fmt: skip
    from server.app import create_app
    from server.settings import Settings

    engine_cls = type("Late", (_LateMember,), {"late": late, "groups": 0})
    settings = Settings(ensemble=smol_ensemble, engine="vllm", vllm_url=vllm_server.url)  # type: ignore[call-arg]
    app = create_app(settings, lambda man, met: engine_cls(vllm_server.url, man, metrics=met))
    with TestClient(app) as client:
        got = ask(client, PROMPTS[0], ensemble={"decode": "token"})
        metrics = client.get("/metrics").text
    assert got["decode"]["mode"] == mode
    assert f'softspec_lockstep_requests_total{{outcome="{outcome}"}} 1.0' in metrics
    assert 'softspec_lockstep_splits_total{reason="incomplete"}' in metrics
    want = ask(smol_gateway, PROMPTS[0], ensemble={"decode": mode})
    assert got["message"]["content"] == want["message"]["content"]
    if mode == "sequence":
        assert "split 3 times (last: incomplete)" in got["decode"]["fallback"]
    assert np.isfinite(got["uncertainty"]["epistemic"])


def test_a_malformed_group_is_a_400_from_vllm_and_the_engine_keeps_serving(
    vllm_server: VLLMProcess, smol_ensemble: Path
) -> None:
    man = load_manifest(smol_ensemble)
    name = man.served_name(man.member_names[0])
    bad = xargs("g", 5, 3, 1.0, temperature=0.0, top_p=1.0, seed=None, abort=1)
    body = {"model": name, "prompt": "Hello", "max_tokens": 2, "vllm_xargs": bad}
    r = httpx.post(f"{vllm_server.url}/v1/completions", json=body, timeout=120)
    assert r.status_code == 400, r.text
    assert "softspec_index must be in [0, 3)" in r.json()["error"]["message"]
    del body["vllm_xargs"]
    assert (
        httpx.post(f"{vllm_server.url}/v1/completions", json=body, timeout=120).status_code == 200
    )
