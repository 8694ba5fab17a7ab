"""``prompt_distance`` on the real stack: a reference fitted by ``softspec reference``, the
base as a real vLLM pooling server, the gateway queried with the official ``openai`` SDK,
and ``softspec serve`` starting, supervising and healing both of its vLLM children."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from bench.soak import vllm_children
from ensemble.density import load_reference, pool_user_span
from ensemble.manifest import load as load_manifest
from server.vllm_process import VLLMProcess
from tests.integration.conftest import start_gateway, stop

pytestmark = pytest.mark.slow

FOREIGN = "Wie spät ist es jetzt in Berlin, und wann fährt der nächste Zug nach Hamburg?"


@pytest.fixture(scope="module")
def dist_ensemble(
    smol_ensemble: Path, default_data: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The smol ensemble (same adapters, same served names) with a reference fitted to 64
    distinct prompts of the topics training data by the real CLI."""
    from softspec.cli import main

    out = tmp_path_factory.mktemp("dist") / "smol"
    shutil.copytree(smol_ensemble, out)
    data = default_data / "sft_topics_train.jsonl"
    args = ["reference", "--ensemble", str(out), "--data", str(data), "--max-prompts", "64"]
    assert main(args) == 0
    return out


@pytest.fixture(scope="module")
def dist_gateway(
    dist_ensemble: Path, vllm_server: VLLMProcess, embedder: VLLMProcess
) -> Iterator[str]:
    proc, url = start_gateway(dist_ensemble, vllm_server.url, "--embed-url", embedder.url)
    yield url
    stop(proc)


def _training_prompt(default_data: Path, i: int = 0) -> str:
    row = json.loads((default_data / "sft_topics_train.jsonl").read_text().splitlines()[i])
    return str(row["prompt"][-1]["content"])


def _distance(url: str, content: str) -> float:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    resp = client.chat.completions.create(
        model="smol", messages=[{"role": "user", "content": content}], max_tokens=4,
        temperature=0,
    )  # fmt: skip
    value = resp.choices[0].model_dump()["uncertainty"]["prompt_distance"]
    assert value is not None
    return float(value)


def test_the_reference_is_recorded_and_verified(dist_ensemble: Path) -> None:
    m = load_manifest(dist_ensemble)
    assert m.density is not None and (m.density.n, m.density.dim) == (64, 576)
    ref = load_reference(dist_ensemble / m.density.file)
    assert ref.mean.shape == (576,) and ref.shrinkage == m.density.shrinkage == 0.01


def test_served_distance_equals_the_local_engines(
    dist_gateway: str, dist_ensemble: Path, default_data: Path
) -> None:
    """vLLM's pooled hidden states against transformers' (the in-process engine)."""
    from server.service import _template_span
    from training.local_engine import LocalEngine

    prompts = [_training_prompt(default_data, 30), FOREIGN]
    served = [_distance(dist_gateway, p) for p in prompts]
    m = load_manifest(dist_ensemble)
    assert m.density is not None
    ref = load_reference(dist_ensemble / m.density.file)
    engine = LocalEngine(dist_ensemble, m)

    async def local() -> list[float]:
        await engine.start()
        pre, suf = await _template_span(engine)
        out = []
        for p in prompts:
            ids = await engine.render_chat([{"role": "user", "content": p}])
            pooled = pool_user_span(await engine.embed(ids), (pre, len(ids) - suf))
            out.append(float(ref.distance(pooled)))
        await engine.close()
        return out

    expected = asyncio.run(local())
    print(f"\nprompt_distance served {served} vs in-process {expected}")
    np.testing.assert_allclose(served, expected, rtol=2e-3)


def test_a_foreign_prompt_is_far_from_the_training_prompts(
    dist_gateway: str, default_data: Path
) -> None:
    trained = [_distance(dist_gateway, _training_prompt(default_data, i)) for i in (0, 5, 10)]
    foreign = _distance(dist_gateway, FOREIGN)
    print(f"\nprompt_distance: training prompts {trained}, foreign {foreign:.0f}")
    assert foreign > 2 * max(trained)
    # what the embedding costs, from the gateway's own histogram of engine calls
    metrics = httpx.get(f"{dist_gateway}/metrics", timeout=30).text
    labels = 'member="@embed",op="embed"'
    total = float(metrics.split(f"softspec_upstream_seconds_sum{{{labels}}} ")[1].split()[0])
    count = float(metrics.split(f"softspec_upstream_seconds_count{{{labels}}} ")[1].split()[0])
    assert count >= 4
    print(f"embedder calls: {count:.0f}, mean {1e3 * total / count:.0f} ms each")


def _children(gateway_pid: int) -> dict[str, int]:
    """{"vllm" | "embedder": pid} of the gateway's vLLM children."""
    return {
        ("embedder" if b"pooling" in cmd else "vllm"): pid
        for pid, cmd in vllm_children(gateway_pid).items()
    }


def test_serve_starts_both_children_and_heals_a_killed_embedder(
    dist_ensemble: Path, default_data: Path
) -> None:
    proc, url = start_gateway(dist_ensemble, None, env={"SOFTSPEC_VLLM_HEALTH_INTERVAL": "1"})
    try:
        children = _children(proc.pid)
        assert set(children) == {"vllm", "embedder"}, children
        before = _distance(url, FOREIGN)
        os.kill(children["embedder"], signal.SIGKILL)
        killed = time.monotonic()
        seen_503, first_ok = False, None
        while time.monotonic() - killed < 600:
            assert proc.poll() is None, "the gateway itself died"
            r = httpx.post(
                f"{url}/v1/chat/completions",
                json={"model": "smol", "messages": [{"role": "user", "content": FOREIGN}],
                      "max_tokens": 4, "temperature": 0},
                timeout=600,
            )  # fmt: skip
            if r.status_code == 200:
                first_ok = time.monotonic()
                after = r.json()["choices"][0]["uncertainty"]["prompt_distance"]
                break
            assert r.status_code == 503 and r.json()["error"]["type"] == "upstream_unavailable"
            seen_503 = True
            time.sleep(1)
        assert first_ok is not None, "no answer within 600 s of killing the embedder"
        print(f"\nembedder SIGKILL → first 200 after {first_ok - killed:.1f} s")
        assert seen_503
        now = _children(proc.pid)
        assert now["vllm"] == children["vllm"]  # the generation server was left alone
        assert now["embedder"] != children["embedder"]
        assert after == pytest.approx(before, rel=1e-6)
    finally:
        assert stop(proc) == 0
