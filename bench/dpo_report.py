"""Benchmark: α-Rényi DPO on conflicting human preferences (chitchat witty vs upbeat).

Trains one DPO ensemble per α (same K, steps, seeds, pairs from ``dpo_chitchat_train``),
then on held-out pairs (``dpo_chitchat_test``) reports, per α:

* the routing matrix preference source (witty / upbeat) × member (mean responsibility)
  and the source ↔ arg-max-member mutual information (nats);
* member disagreement: the variance across members of the preference probability σ(h_k),
  averaged over conflicting pairs (the two ratings prefer opposite replies) and over
  non-conflicting ones;
* the served ensemble's epistemic score (through the real gateway) on the prompts of
  conflicting vs non-conflicting pairs. Caveat: chitchat has only 35 starter prompts, so
  both sets share most prompts; the pair-level σ(h_k) variance is the sharper measurement.

    python bench/dpo_report.py [--alphas 0,1] [--steps 60] [--pairs 480]
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def subset(src: Path, out: Path, n: int, seed: int) -> Path:
    rows = [json.loads(x) for x in src.read_text().splitlines() if x.strip()]
    random.Random(seed).shuffle(rows)
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows[:n]))
    return out


def pair_stats(ens_dir: Path, test: Path, alpha: float, beta: float, limit: int) -> dict[str, Any]:
    """σ(h_k) of held-out pairs under each member (reference: the base model)."""
    from types import SimpleNamespace

    import torch

    from ensemble import metrics as M
    from ensemble.math import responsibilities
    from training.data import load_dpo
    from training.datasets import PairDataset, collate
    from training.dpo import dpo_margins
    from training.model import load_ensemble

    ens, tok = load_ensemble(ens_dir)
    ens.eval()
    pairs = load_dpo(test, tok, 192, drop_overlong=True)[:limit]
    ds = PairDataset(pairs)
    coll = functools.partial(collate, pad_id=tok.pad_token_id)
    trainer = SimpleNamespace(
        accelerator=SimpleNamespace(unwrap_model=lambda m: m), config=SimpleNamespace(beta=beta)
    )
    hs = []
    with torch.no_grad():
        for start in range(0, len(ds), 8):
            batch = coll([ds[i] for i in range(start, min(start + 8, len(ds)))])
            batch.pop("idx")
            hs.append(dpo_margins(trainer, ens, batch).double().numpy())
    h = np.concatenate(hs, axis=1)  # (K, N)
    p = 1 / (1 + np.exp(-h))
    var = p.var(axis=0)
    conflict = np.array([x.conflict for x in pairs])
    sources = [x.group for x in pairs]
    logsig = -np.logaddexp(0, -h)
    resp = responsibilities(logsig, alpha if alpha > 0 else 1.0, ens.log_weights.double().numpy()).T
    names, matrix = M.routing_matrix(sources, resp, ens.members)
    argmax = [ens.members[i] for i in resp.argmax(axis=1)]
    return {
        "pairs": len(pairs),
        "var_sigma_conflict": float(var[conflict].mean()) if conflict.any() else None,
        "var_sigma_nonconflict": float(var[~conflict].mean()) if (~conflict).any() else None,
        "pref_accuracy": float((h > 0).mean()),
        "routing_groups": names,
        "routing_matrix": np.round(matrix, 3).tolist(),
        "source_member_mi": float(M.mutual_information(sources, argmax)),
        "mean_max_responsibility": float(resp.max(axis=1).mean()),
    }


def served_epistemic(
    ens_dir: Path, test: Path, engine: str, n: int, max_tokens: int
) -> dict[str, float]:
    from clients import SoftSpecClient
    from softspec.serving import start_server, stop_server

    rows = [json.loads(x) for x in test.read_text().splitlines() if x.strip()]
    proc, url = start_server(ens_dir, engine, ens_dir.parent / f"{ens_dir.name}.serve.log")
    try:
        client = SoftSpecClient(url)
        out = {}
        for kind, flag in (("conflict", True), ("nonconflict", False)):
            prompts = list(
                dict.fromkeys(r["prompt"][-1]["content"] for r in rows if r["conflict"] == flag)
            )[:n]
            eps = [
                client.chat(
                    p, max_tokens=max_tokens, temperature=0, decode="sequence"
                ).uncertainty.epistemic
                for p in prompts
            ]
            out[f"epistemic_{kind}"] = float(np.mean(eps))
            out[f"prompts_{kind}"] = len(prompts)
        return out
    finally:
        stop_server(proc)


def main() -> None:
    from softspec.cli import main as softspec
    from softspec.default_data import build_datasets
    from softspec.default_model import export_default_model
    from softspec.paths import default_data_dir, softspec_home

    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--alphas", default="0,1")
    ap.add_argument("--members", type=int, default=4)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--pairs", type=int, default=480)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--test-pairs", type=int, default=200)
    ap.add_argument("--prompts", type=int, default=12)
    ap.add_argument("--engine", choices=["vllm", "local"], default="vllm")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    base = export_default_model()
    build_datasets()
    data = default_data_dir()
    out = args.out or softspec_home() / "bench" / "dpo"
    out.mkdir(parents=True, exist_ok=True)
    train = subset(data / "dpo_chitchat_train.jsonl", out / "train.jsonl", args.pairs, 0)
    test = data / "dpo_chitchat_test.jsonl"
    results = []
    for alpha in [float(a) for a in args.alphas.split(",")]:
        ens = out / f"alpha{alpha:g}"
        if not (ens / "ensemble.json").exists():
            code = softspec([
                "train", "dpo", "--base", str(base), "--data", str(train), "--out", str(ens),
                "--members", str(args.members), "--alpha", str(alpha), "--beta", str(args.beta),
                "--max-steps", str(args.steps), "--batch-size", "4", "--learning-rate", str(args.lr),
                "--max-length", "192", "--drop-overlong", "--routing-examples", "128",
            ])  # fmt: skip
            assert code == 0
        row = {"alpha": alpha, **pair_stats(ens, test, alpha, args.beta, args.test_pairs)}
        row.update(served_epistemic(ens, test, args.engine, args.prompts, 24))
        results.append(row)
        (out / "results.json").write_text(json.dumps(results, indent=2))
        print(json.dumps(row), flush=True)
    lines = ["| α | Var σ(h_k) conflict / non-conflict | pref. acc. | source↔member MI | mean max resp. | served epistemic conflict / non-conflict |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        lines.append(
            f"| {r['alpha']:g} | {r['var_sigma_conflict']:.4f} / {r['var_sigma_nonconflict']:.4f} | {r['pref_accuracy']:.3f} | "
            f"{r['source_member_mi']:.3f} | {r['mean_max_responsibility']:.3f} | {r['epistemic_conflict']:.3f} / {r['epistemic_nonconflict']:.3f} |"
        )
    print("\n".join(lines))
    print(
        f"\n(K={args.members}, {args.steps} steps × batch 4 on {args.pairs} pairs, β={args.beta}; `python bench/dpo_report.py --alphas {args.alphas} --steps {args.steps}`)"
    )


if __name__ == "__main__":
    main()
