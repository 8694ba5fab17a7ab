"""Escalation on the real stack: the fallback is the base model served by the same vLLM
(an OpenAI-compatible server under its own model id), reached over the network."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server.vllm_process import VLLMProcess, free_port
from tests.integration.conftest import start_gateway, stop

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
REQUEST = {"model": "smol", "messages": QUESTION, "max_tokens": 12, "temperature": 0}


def gateway(ensemble: Path, vllm: VLLMProcess, base: Path, *flags: str, fallback: str | None = None) -> tuple[object, str]:  # fmt: skip
    env = {
        "SOFTSPEC_GATE_ACTION": "escalate",  # the contract names, from the environment
        "SOFTSPEC_FALLBACK_URL": fallback or f"{vllm.url}/v1",
        "SOFTSPEC_FALLBACK_MODEL": str(base),
        "SOFTSPEC_FALLBACK_API_KEY": "unused-by-vllm",
    }
    return start_gateway(ensemble, vllm.url, *flags, env=env)


@pytest.fixture(scope="module")
def always(smol_ensemble: Path, vllm_server: VLLMProcess, smollm2_dir: Path) -> Iterator[str]:
    """The gate always fires on the answer (total ≥ 0 > −1)."""
    proc, url = gateway(smol_ensemble, vllm_server, smollm2_dir, "--gate-score", "total",
                        "--gate-threshold", "-1")  # fmt: skip
    yield url
    stop(proc)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def early(smol_ensemble: Path, vllm_server: VLLMProcess, smollm2_dir: Path) -> Iterator[str]:
    """A prompt-level gate that always fires: decided before any member generates."""
    proc, url = gateway(smol_ensemble, vllm_server, smollm2_dir, "--gate-score",
                        "prompt_novelty", "--gate-threshold", "-1000")  # fmt: skip
    yield url
    stop(proc)  # type: ignore[arg-type]


def post(url: str, body: dict) -> tuple[httpx.Response, float]:  # type: ignore[type-arg]
    t0 = time.perf_counter()
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=600)
    return r, time.perf_counter() - t0


def test_escalation_answers_with_the_base_model(
    always: str, vllm_server: VLLMProcess, smollm2_dir: Path
) -> None:
    r, _ = post(always, REQUEST)
    assert r.status_code == 200, r.text
    body = r.json()
    gate = body["gate"]
    assert gate["decision"] == "escalate" and gate["routed_to"] == str(smollm2_dir)
    assert gate["escalation"]["outcome"] == "ok"
    # the same request straight to the base model, through vLLM's own API
    direct = httpx.post(
        f"{vllm_server.url}/v1/chat/completions",
        json={**REQUEST, "model": str(smollm2_dir)},
        timeout=600,
    ).json()
    want = direct["choices"][0]["message"]["content"]
    assert body["choices"][0]["message"]["content"] == want
    assert gate["escalation"]["usage"] == direct["usage"]
    u = body["choices"][0]["uncertainty"]  # the ensemble's own scores are kept
    assert u["epistemic"] is not None and u["novelty"] is not None
    assert set(body["choices"][0]["responsibilities"]) == {"m0", "m1", "m2"}
    # streamed: the decision first, then the fallback's stream relayed
    with httpx.stream(
        "POST", f"{always}/v1/chat/completions", json={**REQUEST, "stream": True}, timeout=600
    ) as s:
        frames = [ln[6:] for ln in s.iter_lines() if ln.startswith("data: ")]
    assert frames[-1] == "[DONE]"
    chunks = [json.loads(f) for f in frames[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == want
    assert chunks[-1]["gate"]["routed_to"] == str(smollm2_dir)
    metrics = httpx.get(f"{always}/metrics").text
    assert 'softspec_escalations_total{outcome="ok"} 2.0' in metrics
    assert "softspec_fallback_seconds_count 2.0" in metrics


def test_deciding_on_the_prompt_skips_the_ensemble(
    early: str, always: str, vllm_server: VLLMProcess, smollm2_dir: Path, capsys
) -> None:  # type: ignore[no-untyped-def]
    post(early, REQUEST), post(always, REQUEST)  # warm the prefix cache
    fast, slow, direct = [], [], []
    for _ in range(3):
        r, t = post(early, REQUEST)
        assert r.json()["gate"]["stage"] == "prompt" and r.json()["gate"]["decision"] == "escalate"
        fast.append(t)
        r, t = post(always, REQUEST)
        assert r.json()["gate"]["stage"] == "answer"
        slow.append(t)
        t0 = time.perf_counter()
        httpx.post(
            f"{vllm_server.url}/v1/chat/completions",
            json={**REQUEST, "model": str(smollm2_dir)},
            timeout=600,
        )
        direct.append(time.perf_counter() - t0)
    e, a, d = (statistics.median(x) for x in (fast, slow, direct))
    with capsys.disabled():
        print(
            f"\nreal vLLM (CPU), escalation to the base: decided on the prompt {e:.2f} s, "
            f"on the answer {a:.2f} s, the fallback alone {d:.2f} s (medians of 3)"
        )
    assert e < a


def test_an_unreachable_fallback(
    smol_ensemble: Path, vllm_server: VLLMProcess, smollm2_dir: Path
) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}/v1"
    proc, url = gateway(smol_ensemble, vllm_server, smollm2_dir, "--gate-score", "total",
                        "--gate-threshold", "-1", fallback=nowhere)  # fmt: skip
    try:
        ready = httpx.get(f"{url}/ready", timeout=30)
        assert ready.status_code == 200 and ready.json()["fallback"]["reachable"] is False
        r, _ = post(url, REQUEST)
        body = r.json()
        assert body["gate"]["decision"] == "abstain"  # SOFTSPEC_FALLBACK_ON_ERROR's default
        assert body["gate"]["escalation"]["outcome"] == "failed"
        assert body["choices"][0]["finish_reason"] == "content_filter"
        assert 'softspec_escalations_total{outcome="error"} 1.0' in httpx.get(f"{url}/metrics").text
    finally:
        stop(proc)


def test_the_example_pipeline_against_the_real_gateway(always: str, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is AI?\nWhat is 37 times 48?\n")
    out = subprocess.run(
        [sys.executable, str(Path(__file__).parents[2] / "clients" / "example_pipeline.py"),
         "--base-url", f"{always}/v1",
         "--prompts", str(prompts), "--max-tokens", "8"],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[-1] == "counts: pass 0  flag 0  escalate 2  abstain 0"
    assert all("escalate →" in ln for ln in lines[:2])
