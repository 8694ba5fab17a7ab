"""Benchmark: one K=4 α-Rényi training step vs four single-adapter LoRA steps (same batch).

Targets (docs/benchmarks.md): time ratio ≤ 1.15, peak-memory ratio ≤ 1.3 (one base model, never
K copies). Run on the real default model (SmolLM2-135M-Instruct) with a real batch of the
default SFT data:

    python bench/train_step.py [--batch-size 8] [--max-length 128] [--repeats 5]

Time: both configurations run in this process, alternating, median of ``--repeats`` after
a warm-up; the baseline is a K=1 ensemble (the same code path: one peft adapter, AdamW)
stepped four times. Memory: CPU peak RSS cannot be reset inside a process, so each
configuration is measured in a fresh child process (``--child``) as peak RSS; on CUDA the
allocator's peak is used instead. Both are reported with and without gradient
checkpointing; the ratios are printed last.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_batch(tokenizer: Any, batch_size: int, max_length: int) -> dict[str, Any]:
    from softspec.default_data import build_datasets
    from softspec.paths import default_data_dir
    from training.data import load_sft
    from training.trainer import collate

    build_datasets()
    examples = load_sft(
        default_data_dir() / "sft_topics_train.jsonl", tokenizer, max_length, drop_overlong=True
    )
    examples = sorted(examples, key=lambda e: -len(e.input_ids))[:batch_size]  # a full batch
    rows = [
        {"input_ids": e.input_ids, "labels": e.labels, "idx": i} for i, e in enumerate(examples)
    ]
    batch = collate(rows, tokenizer.pad_token_id)
    batch.pop("idx")
    return batch


def setup(
    members: int, checkpointing: bool, batch_size: int, max_length: int
) -> tuple[Any, Any, Any]:
    import torch

    from softspec.default_model import export_default_model
    from training.config import SFTConfig
    from training.model import build_ensemble, load_base

    base = export_default_model()
    model, tok = load_base(base)
    cfg = SFTConfig(
        data="unused", out="unused", members=members, alpha=1.0, lora_dropout=0.0,
        gradient_checkpointing=checkpointing,
    )  # fmt: skip
    ens = build_ensemble(model, cfg)
    ens.train()
    opt = torch.optim.AdamW([p for p in ens.parameters() if p.requires_grad], lr=1e-4)
    return ens, opt, make_batch(tok, batch_size, max_length)


def step(ens: Any, opt: Any, batch: dict[str, Any]) -> None:
    from training.loss import renyi_objective

    scores = ens(**batch)
    renyi_objective(scores.logp, 1.0, ens.log_weights).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _hwm_mib() -> float:
    """Peak RSS of this process image (VmHWM; unlike ru_maxrss it is reset by exec, so the
    parent's memory at fork time does not leak into the child's number)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(members: int, checkpointing: bool, batch_size: int, max_length: int, steps: int) -> None:
    """Measure one configuration's peak memory in this fresh process; print JSON."""
    import torch

    ens, opt, batch = setup(members, checkpointing, batch_size, max_length)
    rss_loaded = _hwm_mib() * 1024
    cuda = torch.cuda.is_available()
    if cuda:
        ens.cuda()
        batch = {k: v.cuda() for k, v in batch.items()}
        torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        step(ens, opt, batch)
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if cuda
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    print(json.dumps({"members": members, "peak_mib": peak, "loaded_mib": rss_loaded / 1024}))


def memory(members: int, checkpointing: bool, args: argparse.Namespace) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", str(members)]
    cmd += ["--batch-size", str(args.batch_size), "--max-length", str(args.max_length)]
    cmd += ["--checkpointing"] if checkpointing else []
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


def timing(checkpointing: bool, args: argparse.Namespace) -> tuple[float, float]:
    """Median seconds of (one K=4 step, four K=1 steps), alternating, after a warm-up."""
    ens4, opt4, batch = setup(4, checkpointing, args.batch_size, args.max_length)
    ens1, opt1, _ = setup(1, checkpointing, args.batch_size, args.max_length)
    step(ens4, opt4, batch)
    step(ens1, opt1, batch)
    t4, t1 = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step(ens4, opt4, batch)
        t4.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(4):
            step(ens1, opt1, batch)
        t1.append(time.perf_counter() - t0)
    return statistics.median(t4), statistics.median(t1)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, args.checkpointing, args.batch_size, args.max_length, steps=2)
        return
    rows = []
    for ckpt in (False, True):
        m4, m1 = memory(4, ckpt, args), memory(1, ckpt, args)  # children first: a small parent
        t4, t1 = timing(ckpt, args)
        rows.append((ckpt, t4, t1, m4["peak_mib"], m1["peak_mib"], m1["loaded_mib"]))
        print(
            f"gradient checkpointing={'on ' if ckpt else 'off'}: "
            f"K=4 step {t4:.3f}s, 4×K=1 steps {t1:.3f}s; "
            f"peak memory K=4 {m4['peak_mib']:.0f} MiB, K=1 {m1['peak_mib']:.0f} MiB "
            f"(model loaded: {m1['loaded_mib']:.0f} MiB)",
            flush=True,
        )
    print(f"batch {args.batch_size} × ≤{args.max_length} tokens, SmolLM2-135M, LoRA r=8 all-linear")
    for ckpt, t4, t1, p4, p1, _ in rows:
        tag = "with checkpointing" if ckpt else "no checkpointing  "
        print(f"{tag}: time ratio (K=4 step / 4 single steps) = {t4 / t1:.2f} (target ≤ 1.15); "
              f"peak memory ratio (K=4 / K=1) = {p4 / p1:.2f} (target ≤ 1.3)")  # fmt: skip


if __name__ == "__main__":
    main()
