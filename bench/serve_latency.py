"""Benchmark: ensemble latency through the gateway vs one member straight to vLLM.

Targets (docs/benchmarks.md): a K=4 ensemble request ≤ 1.5× the p50 latency of one
member's request on the same vLLM (CPU; ≤ 1.25× on a GPU), and the gateway's own CPU time
≤ 10 ms per request (K=4, 64 tokens, top-20 log-probs). Both decode modes are measured in
the same run: ``sequence`` (every member generates, candidates cross-scored) and ``token``
(lock-step mixture decoding inside vLLM, server/lockstep.py).

    python bench/serve_latency.py [--requests 20] [--max-tokens 64] [--members 4]
                                  [--modes sequence,token] [--concurrency 8]

Starts a real vLLM server (SmolLM2-135M-Instruct, K LoRA adapters r=8 on all linear
layers, random non-zero B so members differ) and a real gateway process
(``softspec serve --vllm-url``). Requests run one at a time, ensemble and baseline
alternating on the same prompts. The gateway's CPU time is read from its process
(psutil) around the ensemble requests only. Ratios are printed last.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPTS = [
    "Write a long story about a dragon who learns to paint.",
    "Explain in detail how a steam engine works.",
    "Describe your ideal city, street by street.",
    "Tell me everything you know about the history of Rome.",
    "Write a detailed recipe for a chocolate cake.",
    "Explain photosynthesis to a ten-year-old, step by step.",
    "Write a letter to a friend about a long journey by train.",
    "Describe the planets of the solar system one by one.",
]


def random_ensemble(base: Path, out: Path, k: int) -> Path:
    """K peft adapters with random non-zero B (seeded), written as an ensemble directory."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from ensemble.atomic import sha256_file
    from ensemble.manifest import EnsembleManifest, LoraSpec, MemberSpec

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
    members = []
    torch.manual_seed(0)
    peft_model = get_peft_model(model, cfg, adapter_name="m0")
    for i in range(k):
        if i:
            torch.manual_seed(i)
            peft_model.add_adapter(f"m{i}", cfg)
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if f"lora_B.m{i}." in n:
                    p.normal_(0.0, 0.01)
        peft_model.save_pretrained(out / "adapters", selected_adapters=[f"m{i}"])
        adir = out / "adapters" / f"m{i}"
        members.append(
            MemberSpec(
                name=f"m{i}",
                adapter=f"adapters/m{i}",
                weight=1 / k,
                sha256=sha256_file(adir / "adapter_model.safetensors"),
            )
        )
    EnsembleManifest(
        name="bench", base_model=str(base), objective="sft", alpha=1.0, members=members,
        lora=LoraSpec(r=8, alpha=16, target_modules=["all-linear"]),
    ).save(out)  # fmt: skip
    return out


def p50(xs: list[float]) -> float:
    return statistics.median(xs)


def main() -> None:
    import psutil

    from ensemble.manifest import load
    from server.launch import vllm_process
    from server.settings import Settings
    from server.vllm_process import free_port
    from softspec.default_model import export_default_model

    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--members", type=int, default=4)
    ap.add_argument("--modes", default="sequence,token", help="decode modes, comma-separated")
    ap.add_argument("--idle-seconds", type=float, default=30.0,
                    help="how long the gateway's idle CPU is measured")  # fmt: skip
    ap.add_argument("--concurrency", type=int, default=1,
                    help="also run 2×N token-mode requests N at a time (fallback rate)")  # fmt: skip
    args = ap.parse_args()

    base = export_default_model()
    work = Path(tempfile.mkdtemp(prefix="softspec-bench-"))
    ens_dir = random_ensemble(base, work / "ensemble", args.members)
    manifest = load(ens_dir)
    settings = Settings(ensemble=ens_dir)  # type: ignore[call-arg]
    with vllm_process(settings, manifest) as vllm:
        port = free_port()
        log = open(work / "gateway.log", "wb")  # noqa: SIM115
        cmd = [sys.executable, "-m", "softspec.cli", "serve", "--ensemble", str(ens_dir)]
        cmd += ["--vllm-url", vllm.url, "--port", str(port), "--log-level", "warning"]
        gw = subprocess.Popen(cmd,
                              stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(600):
                try:
                    if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.5)
            run(url, vllm.url, manifest.served_name("m0"), psutil.Process(gw.pid), args)
        finally:
            gw.send_signal(signal.SIGTERM)
            gw.wait(60)
            log.close()


def lockstep_counts(gateway: str) -> dict[str, float]:
    """The gateway's lock-step counters (outcome -> requests) from /metrics."""
    out: dict[str, float] = {}
    for line in httpx.get(f"{gateway}/metrics", timeout=10).text.splitlines():
        if line.startswith("softspec_lockstep_requests_total{"):
            label, value = line.split("} ")
            out[label.split('"')[1]] = float(value)
    return out


def run(gateway: str, vllm: str, member: str, gw_proc, args: argparse.Namespace) -> None:  # type: ignore[no-untyped-def]
    client = httpx.Client(timeout=600)
    body = {"max_tokens": args.max_tokens, "temperature": 0.0}

    def ensemble(prompt: str, mode: str) -> tuple[float, str]:
        t0 = time.perf_counter()
        r = client.post(
            f"{gateway}/v1/chat/completions",
            json={"model": "bench", "messages": [{"role": "user", "content": prompt}],
                  "ensemble": {"decode": mode}, **body},
        )  # fmt: skip
        r.raise_for_status()
        return time.perf_counter() - t0, r.json()["choices"][0]["decode"]["mode"]

    def single(prompt: str) -> tuple[float, int]:
        t0 = time.perf_counter()
        r = client.post(
            f"{vllm}/v1/chat/completions",
            json={"model": member, "messages": [{"role": "user", "content": prompt}], **body},
        )
        r.raise_for_status()
        return time.perf_counter() - t0, r.json()["usage"]["completion_tokens"]

    modes = args.modes.split(",")
    for prompt in PROMPTS[:2]:  # warm-up (prefix cache, adapters loaded, compiled kernels)
        for mode in modes:
            ensemble(prompt, mode)
        single(prompt)
    # the gateway's background CPU (health probes, the event loop) per second, so that the
    # per-request figure can be reported with it taken out too
    before, t0 = sum(gw_proc.cpu_times()[:2]), time.perf_counter()
    time.sleep(args.idle_seconds)
    idle_rate = (sum(gw_proc.cpu_times()[:2]) - before) / (time.perf_counter() - t0)
    ens_t: dict[str, list[float]] = {m: [] for m in modes}
    cpu = dict.fromkeys(modes, 0.0)
    one_t, one_tokens = [], []
    for i in range(args.requests):
        prompt = PROMPTS[i % len(PROMPTS)] + f" (request {i})"
        for mode in modes:
            before = sum(gw_proc.cpu_times()[:2])
            t, _ = ensemble(prompt, mode)
            cpu[mode] += sum(gw_proc.cpu_times()[:2]) - before
            ens_t[mode].append(t)
        t, n = single(prompt)
        one_t.append(t)
        one_tokens.append(n)
    k, n = args.members, args.requests
    tokens = statistics.mean(one_tokens)
    print(f"one member straight to vLLM: p50 {p50(one_t):.3f}s; mean {tokens:.1f} new tokens")
    for mode in modes:
        spread = f"min {min(ens_t[mode]):.3f}, max {max(ens_t[mode]):.3f}"
        print(f"K={k} ensemble via gateway, {mode} mode: p50 {p50(ens_t[mode]):.3f}s ({spread})")
    if args.concurrency > 1 and "token" in modes:
        before = lockstep_counts(gateway)
        with ThreadPoolExecutor(args.concurrency) as pool:
            t0 = time.perf_counter()
            answered = list(pool.map(lambda i: ensemble(PROMPTS[i % len(PROMPTS)]
                                                        + f" (c{i})", "token"),
                                     range(args.concurrency * 2)))  # fmt: skip
            wall = time.perf_counter() - t0
        after = lockstep_counts(gateway)
        delta = {o: after.get(o, 0.0) - before.get(o, 0.0) for o in after}
        fell = sum(1 for _, mode in answered if mode != "token")
        print(f"token mode at concurrency {args.concurrency}: {len(answered)} requests in "
              f"{wall:.1f}s; lock-step outcomes {delta}; fallback rate {fell}/{len(answered)}")  # fmt: skip
    print(
        f"{n} requests each, max_tokens={args.max_tokens}, temperature 0, top-20, {os.cpu_count()} CPUs"
    )
    print(f"gateway background CPU while idle: {1000 * idle_rate:.1f} ms/s")
    for mode in modes:
        ratio = p50(ens_t[mode]) / p50(one_t)
        raw = 1000 * cpu[mode] / n
        own = raw - 1000 * idle_rate * statistics.mean(ens_t[mode])
        print(f"{mode} mode: latency ratio (ensemble / one member) = {ratio:.2f} "
              f"(target ≤ 1.5 on CPU); gateway CPU per request = {raw:.1f} ms, "
              f"{own:.1f} ms without the idle background (target ≤ 10 ms)")  # fmt: skip


if __name__ == "__main__":
    main()
