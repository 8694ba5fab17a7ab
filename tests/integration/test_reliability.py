"""Reliability on the real stack: ``softspec serve`` with its own vLLM child (CPU, SmolLM2).

One gateway for the module (one vLLM start, plus the one restart the fault test causes):

* a burst of 4x the admitted concurrency gets 200s for the admitted requests and 429s
  with ``Retry-After`` in the envelope for the rest, never a 5xx, each 429 in under 50 ms
  of the gateway's own time (its ``Server-Timing``);
* SIGKILL of the vLLM child: requests get 503 with ``Retry-After`` while it is down,
  ``/health`` says degraded, the gateway restarts vLLM itself and answers again within
  the restart budget, without a gateway restart.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bench.soak import vllm_children
from tests.integration.conftest import start_gateway, stop

pytestmark = pytest.mark.slow

CONCURRENCY, QUEUE = 2, 2
RESTART_BUDGET = 600.0  # the vLLM start-up timeout: recovery must come within one start
CHAT = {
    "model": "rel",
    "messages": [{"role": "user", "content": "What is AI?"}],
    "max_tokens": 8,
    "temperature": 0,
}


@pytest.fixture(scope="module")
def rel_ensemble(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two random LoRA members on SmolLM2 (no training: these tests are about serving)."""
    import json

    from bench.serve_latency import random_ensemble

    out = random_ensemble(smollm2_dir, tmp_path_factory.mktemp("rel") / "rel", k=2)
    raw = json.loads((out / "ensemble.json").read_text())
    (out / "ensemble.json").write_text(json.dumps({**raw, "name": "rel"}, indent=2))
    return out


@pytest.fixture(scope="module")
def supervised(rel_ensemble: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    proc, url = start_gateway(
        rel_ensemble, None,
        "--max-concurrency", str(CONCURRENCY), "--max-queue", str(QUEUE),
        env={"SOFTSPEC_VLLM_HEALTH_INTERVAL": "1"},
    )  # fmt: skip
    yield proc, url
    assert stop(proc) == 0


def envelope(r: httpx.Response, status: int) -> dict[str, object]:
    assert r.status_code == status, r.text
    err: dict[str, object] = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    return err


def test_a_burst_beyond_the_queue_gets_429s_while_admitted_requests_finish(
    supervised: tuple[subprocess.Popen[bytes], str],
) -> None:
    _, url = supervised
    n = 4 * CONCURRENCY

    async def burst() -> list[tuple[httpx.Response, float]]:
        async with httpx.AsyncClient(base_url=url, timeout=600) as client:

            async def timed() -> tuple[httpx.Response, float]:
                t0 = time.perf_counter()
                r = await client.post("/v1/chat/completions", json=CHAT)
                return r, time.perf_counter() - t0

            return list(await asyncio.gather(*(timed() for _ in range(n))))

    results = asyncio.run(burst())
    answers = [r for r, _ in results]
    statuses = sorted(r.status_code for r in answers)
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(200) >= CONCURRENCY + QUEUE, statuses  # every admitted one finished
    assert statuses.count(429) >= 1, statuses  # the rest were refused, not queued
    for r in answers:
        if r.status_code == 429:
            assert envelope(r, 429)["code"] == "queue_full"
            assert int(r.headers["retry-after"]) >= 1
        else:
            assert r.json()["choices"][0]["message"]["content"]
    refused = [(dt, r.headers["server-timing"]) for r, dt in results if r.status_code == 429]
    gateway_ms = [float(st.partition("gateway;dur=")[2]) for _, st in refused]
    print(f"\n429s at the client: {sorted(round(dt * 1e3, 1) for dt, _ in refused)} ms; "
          f"in the gateway (Server-Timing): {sorted(gateway_ms)} ms")  # fmt: skip
    # the target, on the gateway's own time (the client's adds its loop and the network)
    assert max(gateway_ms) < 50, gateway_ms
    metrics = httpx.get(f"{url}/metrics").text
    assert f'softspec_admission_rejected_total{{reason="queue_full"}} {statuses.count(429)}.0' in (
        metrics
    )


def test_a_killed_vllm_child_is_restarted_and_answers_again(
    supervised: tuple[subprocess.Popen[bytes], str],
) -> None:
    proc, url = supervised
    assert httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=600).status_code == 200
    children = list(vllm_children(proc.pid))
    assert len(children) == 1, children
    os.kill(children[0], signal.SIGKILL)
    killed = time.monotonic()

    seen_503 = seen_degraded = False
    first_ok: float | None = None
    while time.monotonic() - killed < RESTART_BUDGET:
        assert proc.poll() is None, "the gateway itself died"
        health = httpx.get(f"{url}/health", timeout=30)
        assert health.status_code == 200, health.text
        seen_degraded |= health.json()["status"] == "degraded"
        sent = time.monotonic()
        r = httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=600)
        if r.status_code == 200:
            first_ok = time.monotonic()
            break
        err = envelope(r, 503)
        assert err["type"] == "upstream_unavailable" and int(r.headers["retry-after"]) >= 1
        seen_503 = True
        time.sleep(1)
    assert first_ok is not None, f"no answer within {RESTART_BUDGET:.0f} s of the kill"
    engine = httpx.get(f"{url}/health", timeout=30).json()["engine"]
    print(f"\nvLLM SIGKILL → first 200 after {first_ok - killed:.1f} s "
          f"(the restart's vLLM start-up took {engine['last_start_s']} s; "
          f"the answering request itself {first_ok - sent:.1f} s)")  # fmt: skip
    assert seen_503 and seen_degraded
    assert httpx.get(f"{url}/ready", timeout=30).status_code == 200
    assert len(vllm_children(proc.pid)) == 1  # one new child, the old one gone
    metrics = httpx.get(f"{url}/metrics").text
    assert 'softspec_engine_restarts_total{result="ok"} 1.0' in metrics
    assert "softspec_engine_up 1.0" in metrics
