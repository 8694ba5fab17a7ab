"""Benchmark: time and peak memory of one α-Rényi training step, by member-memory mode.

For SFT and DPO and K members, each mode against single-adapter training (K = 1) of the
same batch on the real default model (SmolLM2-135M-Instruct, LoRA r=8 all-linear):

* ``coupled``: all K members in one graph (``--member-memory coupled``);
* ``sequential``: a no-grad pass for the responsibilities, then one member's forward +
  backward at a time (``--member-memory sequential``);
* ``checkpointed``: sequential with ``--gradient-checkpointing`` (a coupled graph cannot
  be checkpointed correctly for K > 1: training refuses it).

    OMP_NUM_THREADS=1 python bench/train_step.py [--objectives sft dpo] [--members 2 4 8]
        [--modes coupled sequential checkpointed] [--steps 2]

Every configuration runs in its own child process, so peaks do not mix. Each child builds
the ensemble, runs one warm-up step under :class:`training.memory.TensorMemory` (the peak
of live tensor bytes beyond the weights and the batch: activations, logits, gradients,
optimizer state), then times ``--steps`` steps (median). Peak RSS (VmHWM, the whole child
process: Python, torch, the weights, allocator caching) is reported too; on CUDA the
allocator's peak replaces it. A configuration whose estimated activations exceed the
memory available is skipped (``training.memory.activation_bytes``), not run into swap.

Targets (issue 18): sequential K = 4 peak ≤ 1.3× single-adapter and step ≤ 1.4× four
single-adapter steps; K = 8 peak ≤ 1.3×; DPO K = 4, 4 pairs, max length 192: peak ≤ 1.5×
single-member DPO.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODES = ("coupled", "sequential", "checkpointed")


def make_batch(tokenizer: Any, objective: str, batch_size: int, max_length: int) -> Any:
    """The ``batch_size`` longest examples (pairs for DPO) of the default data: a full batch."""
    from softspec.default_data import build_datasets
    from softspec.paths import default_data_dir
    from training.data import load_dpo, load_sft
    from training.datasets import ExampleDataset, PairDataset, collate

    build_datasets()
    data = default_data_dir()
    ds: Any
    if objective == "dpo":
        pairs = load_dpo(data / "dpo_chitchat_train.jsonl", tokenizer, max_length, True)
        pairs = sorted(pairs, key=lambda p: -len(p.chosen.input_ids) - len(p.rejected.input_ids))
        ds = PairDataset(pairs[:batch_size])
    else:
        examples = load_sft(data / "sft_topics_train.jsonl", tokenizer, max_length, True)
        ds = ExampleDataset(sorted(examples, key=lambda e: -len(e.input_ids))[:batch_size])
    return collate([ds[i] for i in range(len(ds))], tokenizer.pad_token_id)


def _rss_peak_mib() -> float:
    """Peak RSS of this process image (VmHWM; reset by exec, so a child starts clean)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One configuration in this fresh process: build, warm-up (metered), timed steps."""
    import torch

    from softspec.default_model import export_default_model
    from training.config import DPOConfig, SFTConfig
    from training.memory import TensorMemory, limit_allocator_caching
    from training.model import build_ensemble, load_base
    from training.objective import EnsembleObjective, sequential_step

    limit_allocator_caching()  # as training does
    members, mode, objective = spec["members"], spec["mode"], spec["objective"]
    model, tok = load_base(export_default_model())
    config_cls = DPOConfig if objective == "dpo" else SFTConfig
    cfg = config_cls(
        data="unused", out="unused", members=members, alpha=1.0, lora_dropout=0.05,
        gradient_checkpointing=mode == "checkpointed",
        member_memory="coupled" if mode == "coupled" else "sequential",
    )  # fmt: skip
    ens = build_ensemble(model, cfg)
    ens.train()
    batch = make_batch(tok, objective, spec["batch_size"], spec["max_length"])
    cuda = torch.cuda.is_available()
    if cuda:
        ens.cuda()
        batch = {k: v.cuda() for k, v in batch.items()}
    obj = EnsembleObjective(cfg, ens)
    opt = torch.optim.AdamW([p for p in ens.parameters() if p.requires_grad], lr=1e-4)
    loaded = _rss_peak_mib()

    def step() -> None:
        if mode == "coupled":
            obj.coupled(ens, ens, batch)[0].loss.backward()
        else:
            sequential_step(obj, ens, batch)
        opt.step()
        opt.zero_grad(set_to_none=True)

    with torch.no_grad():  # DPO: the reference log-likelihoods, cached as in training
        obj.member_logp(ens, ens, batch)
    meter = TensorMemory().ignore(ens, batch)
    with meter:
        step()  # warm-up, metered: the optimizer state is created in it
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(spec["steps"]):
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {
        **spec,
        "step_s": statistics.median(times),
        "tensor_peak_mib": meter.peak / 2**20,
        "rss_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else _rss_peak_mib(),
        "loaded_mib": loaded,
        "tokens": int(batch["input_ids"].numel()),
    }


def profile(spec: dict[str, Any]) -> dict[str, Any]:
    """Live tensor bytes of one step, per phase (after a warm-up step), in this process."""
    import torch

    from softspec.default_model import export_default_model
    from training.config import SFTConfig
    from training.memory import TensorMemory, activation_bytes, limit_allocator_caching
    from training.model import build_ensemble, load_base
    from training.objective import EnsembleObjective

    limit_allocator_caching()
    model, tok = load_base(export_default_model())
    ckpt = spec["mode"] == "checkpointed"
    cfg = SFTConfig(data="unused", out="unused", members=spec["members"], alpha=1.0,
                    lora_dropout=spec["dropout"], gradient_checkpointing=ckpt,
                    member_memory="coupled" if spec["mode"] == "coupled" else "sequential")  # fmt: skip
    ens = build_ensemble(model, cfg)
    ens.train()
    batch = make_batch(tok, "sft", spec["batch_size"], spec["max_length"])
    obj = EnsembleObjective(cfg, ens)
    opt = torch.optim.AdamW([p for p in ens.parameters() if p.requires_grad], lr=1e-4)
    for _ in range(2):  # a warm-up step, then the measured one
        meter = TensorMemory().ignore(ens, batch, list(opt.state.values()))
        with meter:
            if spec["mode"] == "coupled":
                with meter.phase("forward"):
                    scores = obj.member_logp(ens, ens, batch)[0]
                with meter.phase("loss"):
                    from training.loss import renyi_objective

                    loss = renyi_objective(scores, 1.0, ens.log_weights).loss
                with meter.phase("backward"):
                    loss.backward()
                    del scores, loss
            else:
                with meter.phase("no-grad pass (w)"):
                    resp = obj.responsibilities(ens, batch)
                with meter.phase("member forward+backward"):
                    obj.member_backward(ens, batch, resp, torch.Tensor.backward)
                    del resp
            with meter.phase("optimizer"):
                opt.step()
                opt.zero_grad(set_to_none=True)
    est = activation_bytes(model.config, int(batch["input_ids"].numel()),
                           lora_dropout=spec["dropout"], checkpointing=ckpt)  # fmt: skip
    return {**spec, "peak_mib": meter.peak / 2**20, "phases": meter.phases,
            "estimate_per_member_mib": est / 2**20}  # fmt: skip


def estimate_fits(spec: dict[str, Any]) -> tuple[bool, str]:
    """Whether the configuration's estimated activations fit in the memory available."""
    from transformers import AutoConfig

    from softspec.default_model import export_default_model
    from training.memory import FIT_FRACTION, GIB, activation_bytes, available_bytes

    cfg = AutoConfig.from_pretrained(export_default_model())
    seqs = spec["batch_size"] * (2 if spec["objective"] == "dpo" else 1)
    per = activation_bytes(cfg, seqs * spec["max_length"], lora_dropout=0.05,
                           checkpointing=spec["mode"] == "checkpointed")  # fmt: skip
    need = per * (spec["members"] if spec["mode"] == "coupled" else 1)
    have = available_bytes("cuda" if _cuda() else "cpu")
    return (
        need <= FIT_FRACTION * have,
        f"≈{need / GIB:.1f} GiB activations, {have / GIB:.1f} available",
    )


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def run_child(spec: dict[str, Any]) -> dict[str, Any] | None:
    ok, why = estimate_fits(spec)
    if not ok:
        print(f"skipped {spec}: {why}", flush=True)
        return None
    out = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True
    )
    if out.returncode != 0:
        print(f"failed {spec}: {out.stderr[-2000:]}", flush=True)
        return None
    row: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--objectives", nargs="+", default=["sft", "dpo"], choices=["sft", "dpo"])
    p.add_argument("--members", nargs="+", type=int, default=[2, 4, 8])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--batch-size", type=int, default=4, help="examples (DPO: pairs) per step")
    p.add_argument("--max-length", type=int, default=128, help="SFT tokens per example")
    p.add_argument("--dpo-max-length", type=int, default=192)
    p.add_argument("--steps", type=int, default=2, help="timed steps after the warm-up")
    p.add_argument("--json", type=Path, help="also write the rows here")
    p.add_argument(
        "--profile", action="store_true",
        help="instead: live tensor memory per phase of one SFT step (K=1 and sequential K=4)",
    )  # fmt: skip
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(profile(spec) if spec.get("profile") else child(spec)))
        return
    if args.profile:
        common = {"profile": True, "batch_size": args.batch_size, "max_length": args.max_length}
        for members, mode, dropout in [(1, "coupled", 0.05), (1, "coupled", 0.0),
                                       (1, "checkpointed", 0.05), (4, "sequential", 0.05)]:  # fmt: skip
            spec = {**common, "members": members, "mode": mode, "dropout": dropout}
            out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)],
                                 capture_output=True, text=True, check=True)  # fmt: skip
            row = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"K={members} {mode} lora_dropout={dropout}: peak {row['peak_mib']:.0f} MiB "
                  f"(estimate of one member's activations {row['estimate_per_member_mib']:.0f})")  # fmt: skip
            for name, ph in row["phases"].items():
                print(f"  {name:24s} start {ph['start_mib']:7.0f}  peak +{ph['peak_above_start_mib']:6.0f}"
                      f"  held after {ph['held_after_mib']:+7.0f} MiB")  # fmt: skip
        return
    rows: list[dict[str, Any]] = []
    for objective in args.objectives:
        length = args.dpo_max_length if objective == "dpo" else args.max_length
        common = {"objective": objective, "batch_size": args.batch_size, "max_length": length,
                  "steps": args.steps}  # fmt: skip
        base = [{**common, "members": 1, "mode": "coupled"}]
        if "checkpointed" in args.modes:
            base.append({**common, "members": 1, "mode": "checkpointed"})
        todo = base + [
            {**common, "members": k, "mode": m} for k in args.members for m in args.modes
        ]
        rows += [r for r in (run_child(s) for s in todo) if r is not None]
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))
    print_table(rows)


def print_table(rows: list[dict[str, Any]]) -> None:
    """Ratios against the single adapter (K = 1, no checkpointing) of the same objective."""
    print()
    print("| objective | K | mode | step s | time ratio (K-step / K single steps) "
          "| tensor peak MiB | ratio | peak RSS MiB | ratio |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for objective in ("sft", "dpo"):
        single = next(
            (r for r in rows if r["objective"] == objective and r["members"] == 1
             and r["mode"] == "coupled"), None,
        )  # fmt: skip
        if single is None:
            continue
        for r in (r for r in rows if r["objective"] == objective):
            k = r["members"]
            mode = "single adapter" if k == 1 and r["mode"] == "coupled" else r["mode"]
            print(
                f"| {objective} | {k} | {mode} | {r['step_s']:.2f} "
                f"| {r['step_s'] / (k * single['step_s']):.2f} "
                f"| {r['tensor_peak_mib']:.0f} | {r['tensor_peak_mib'] / single['tensor_peak_mib']:.2f} "
                f"| {r['rss_peak_mib']:.0f} | {r['rss_peak_mib'] / single['rss_peak_mib']:.2f} |"
            )
    print("\ntokens per step: " + ", ".join(
        sorted({f"{r['objective']} {r['tokens']}" for r in rows})))  # fmt: skip


if __name__ == "__main__":
    main()
