"""Benchmark: ensemble latency through the gateway vs one member straight to vLLM.

Targets (docs/benchmarks.md): a K=4 ensemble request (sequence mode, full cross-scoring) ≤ 1.6× the
p50 latency of one member's request on the same vLLM (CPU; ≤ 1.25× on a GPU), and the
gateway's own CPU time ≤ 5 ms per request (K=4, 64 tokens, top-20 log-probs).

    python bench/serve_latency.py [--requests 20] [--max-tokens 64] [--members 4]

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


def run(gateway: str, vllm: str, member: str, gw_proc, args: argparse.Namespace) -> None:  # type: ignore[no-untyped-def]
    client = httpx.Client(timeout=600)
    body = {"max_tokens": args.max_tokens, "temperature": 0.0}

    def ensemble(prompt: str) -> tuple[float, int]:
        t0 = time.perf_counter()
        r = client.post(
            f"{gateway}/v1/chat/completions",
            json={"model": "bench", "messages": [{"role": "user", "content": prompt}], **body},
        )
        r.raise_for_status()
        return time.perf_counter() - t0, len(r.json()["choices"][0]["message"]["content"])

    def single(prompt: str) -> tuple[float, int]:
        t0 = time.perf_counter()
        r = client.post(
            f"{vllm}/v1/chat/completions",
            json={"model": member, "messages": [{"role": "user", "content": prompt}], **body},
        )
        r.raise_for_status()
        return time.perf_counter() - t0, r.json()["usage"]["completion_tokens"]

    for prompt in PROMPTS[:2]:  # warm-up (prefix cache, adapters loaded)
        ensemble(prompt)
        single(prompt)
    ens_t, one_t, one_tokens, cpu = [], [], [], 0.0
    for i in range(args.requests):
        prompt = PROMPTS[i % len(PROMPTS)] + f" (request {i})"
        before = sum(gw_proc.cpu_times()[:2])
        t, _ = ensemble(prompt)
        cpu += sum(gw_proc.cpu_times()[:2]) - before
        ens_t.append(t)
        t, n = single(prompt)
        one_t.append(t)
        one_tokens.append(n)
    k, n = args.members, args.requests
    spread = f"min {min(ens_t):.3f}, max {max(ens_t):.3f}"
    print(f"K={k} ensemble via gateway: p50 {p50(ens_t):.3f}s ({spread})")
    tokens = statistics.mean(one_tokens)
    print(f"one member straight to vLLM: p50 {p50(one_t):.3f}s; mean {tokens:.1f} new tokens")
    print(
        f"{n} requests each, max_tokens={args.max_tokens}, temperature 0, top-20, {os.cpu_count()} CPUs"
    )
    print(
        f"latency ratio (ensemble / one member) = {p50(ens_t) / p50(one_t):.2f} (target ≤ 1.6 on CPU)"
    )
    print(f"gateway CPU per request = {1000 * cpu / n:.1f} ms (target ≤ 5 ms)")


if __name__ == "__main__":
    main()
