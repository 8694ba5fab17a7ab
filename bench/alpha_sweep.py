"""Benchmark: the α sweep. Does specialisation and member disagreement rise with α?

Trains one ensemble per α (same K, steps, seeds and data: ``sft_topics_train`` plus
``sft_conflict_train``, the same prompts answered in UPPER and lower case by two sources),
then, per α:

* specialisation on the held-out conflicting pairs: responsibilities of each
  (prompt, completion) under the trained members → mean max responsibility, the
  source (upper/lower) × member routing matrix and the source ↔ arg-max-member mutual
  information (nats; the maximum is log 2 ≈ 0.693);
* member disagreement (fraction of member pairs whose greedy answers differ) and epistemic
  score through the real gateway, on ``sft_conflict_test`` prompts vs ordinary
  ``sft_topics_test`` prompts;
* OOD AUROC of every score on a balanced ``eval_ood`` sample (``softspec eval`` metrics).

    python bench/alpha_sweep.py [--alphas 0,0.5,1] [--steps 80] [--members 4]

The table is printed last (Markdown) and saved with the raw numbers under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def mixed_training_file(data: Path, out: Path, seed: int) -> Path:
    from ensemble.jsonl import read_jsonl

    rows = read_jsonl(data / "sft_topics_train.jsonl") + read_jsonl(
        data / "sft_conflict_train.jsonl"
    )
    random.Random(seed).shuffle(rows)
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return out


def train_ensemble(
    base: Path, train_file: Path, ens: Path, alpha: float, args: argparse.Namespace
) -> None:
    """``softspec train sft`` with the sweep's settings (K, steps, batch, lr, seed from args)."""
    from softspec.cli import main as softspec

    code = softspec([
        "train", "sft", "--base", str(base), "--data", str(train_file), "--out", str(ens),
        "--members", str(args.members), "--alpha", str(alpha), "--max-steps", str(args.steps),
        "--batch-size", str(args.batch_size), "--learning-rate", str(args.lr), "--seed", str(args.seed),
        "--max-length", "128", "--drop-overlong", "--group-by-length", "--routing-examples", "256",
    ])  # fmt: skip
    assert code == 0, f"training α={alpha} failed"


def specialisation(ens_dir: Path, data: Path, alpha: float, limit: int) -> dict[str, Any]:
    """Responsibilities of held-out conflicting (prompt, completion) pairs by source."""
    import functools

    import torch

    from ensemble import metrics as M
    from ensemble.math import responsibilities
    from training.data import load_sft
    from training.datasets import ExampleDataset, collate
    from training.model import load_ensemble

    ens, tok = load_ensemble(ens_dir)
    ens.eval()
    path = data / "sft_conflict_test.jsonl"
    examples = load_sft(path, tok, 128, drop_overlong=True)[:limit]
    sources = [json.loads(x)["source"] for x in path.read_text().splitlines()][: len(examples)]
    ds = ExampleDataset(examples)
    coll = functools.partial(collate, pad_id=tok.pad_token_id)
    cols = []
    with torch.no_grad():
        for start in range(0, len(ds), 8):
            batch = coll([ds[i] for i in range(start, min(start + 8, len(ds)))])
            batch.pop("idx")
            cols.append(ens(**batch).logp.double().numpy())
    logp = np.concatenate(cols, axis=1)
    resp = responsibilities(logp, alpha if alpha > 0 else 1.0, ens.log_weights.double().numpy()).T
    names, matrix = M.routing_matrix(sources, resp, ens.members)
    argmax = [ens.members[i] for i in resp.argmax(axis=1)]
    return {
        "note": "responsibilities with the ensemble's α (α=1 for the α=0 ensemble, whose own w is π)",
        "mean_max_responsibility": float(resp.max(axis=1).mean()),
        "source_member_mi": float(M.mutual_information(sources, argmax)),
        "groups": names,
        "matrix": np.round(matrix, 3).tolist(),
    }


def disagreement(client: Any, data: Path, n: int, max_tokens: int) -> dict[str, float]:
    from ensemble.jsonl import read_jsonl

    def prompts(name: str) -> list[str]:
        seen = []
        for row in read_jsonl(data / name):
            p = row["prompt"][-1]["content"]
            if p not in seen:
                seen.append(p)
        return seen[:n]

    out = {}
    for kind, name in (
        ("conflict", "sft_conflict_test.jsonl"),
        ("ordinary", "sft_topics_test.jsonl"),
    ):
        d, e = [], []
        for p in prompts(name):
            ans = client.chat(p, max_tokens=max_tokens, temperature=0, decode="sequence")
            d.append(ans.uncertainty.disagreement)
            e.append(ans.uncertainty.epistemic)
        out[f"{kind}_disagreement"] = float(np.mean(d))
        out[f"{kind}_epistemic"] = float(np.mean(e))
    return out


def ood_auroc(
    client: Any, data: Path, n: int, max_tokens: int, members: list[str]
) -> dict[str, Any]:
    from ensemble.jsonl import read_jsonl
    from softspec.evaluate import compute_metrics, evaluate_rows

    rows = read_jsonl(data / "eval_ood.jsonl")
    ind = [r for r in rows if not r["ood"]][: n // 2]
    ood = [r for r in rows if r["ood"]][: n // 2]
    preds = evaluate_rows(client, ind + ood, members[0], max_tokens)
    m = compute_metrics(preds, members)
    return {s: e.get("ood_auroc") for s, e in m["scores"].items()}


def main() -> None:
    from clients import SoftSpecClient
    from ensemble.atomic import atomic_write_text
    from softspec.default_data import build_datasets
    from softspec.default_model import export_default_model
    from softspec.paths import default_data_dir, softspec_home
    from softspec.serving import start_server, stop_server

    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--alphas", default="0,0.5,1")
    ap.add_argument("--members", type=int, default=4)
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompts", type=int, default=20, help="conflict / ordinary prompts each")
    ap.add_argument("--ood-prompts", type=int, default=60, help="eval_ood rows (half OOD)")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--engine", choices=["vllm", "local"], default="vllm")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    base = export_default_model()
    build_datasets()
    data = default_data_dir()
    out = args.out or softspec_home() / "bench" / "alpha_sweep"
    out.mkdir(parents=True, exist_ok=True)
    train_file = mixed_training_file(data, out / "train.jsonl", args.seed)
    # rows of earlier runs for other α are kept, so a sweep can be run (or resumed) α by α
    earlier = (
        json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else []
    )
    results: list[dict[str, Any]] = []
    merged = earlier
    for alpha in [float(a) for a in args.alphas.split(",")]:
        ens = out / f"alpha{alpha:g}"
        t0 = time.monotonic()
        trained_before = (ens / "ensemble.json").exists()
        if not trained_before:
            train_ensemble(base, train_file, ens, alpha, args)
        train_s: Any = round(time.monotonic() - t0)
        if trained_before:  # reused: the time of the run that trained it, if recorded
            train_s = next((r["train_seconds"] for r in earlier if r["alpha"] == alpha), None)
        row: dict[str, Any] = {"alpha": alpha, "train_seconds": train_s}
        row["specialisation"] = specialisation(ens, data, alpha, limit=120)
        proc, url = start_server(ens, args.engine, out / f"serve-alpha{alpha:g}.log")
        try:
            client = SoftSpecClient(url)
            members = [m for m in client.models() if ":" in m]
            row.update(disagreement(client, data, args.prompts, args.max_tokens))
            row["ood_auroc"] = ood_auroc(
                client, data, args.ood_prompts, args.max_tokens, [m.split(":")[1] for m in members]
            )
        finally:
            stop_server(proc)
        results.append(row)
        merged = [r for r in earlier if r["alpha"] not in {x["alpha"] for x in results}] + results
        merged.sort(key=lambda r: r["alpha"])
        atomic_write_text(out / "results.json", json.dumps(merged, indent=2))
        print(json.dumps(row), flush=True)
    print(table(merged, args))


def table(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    scores = list(results[0]["ood_auroc"])
    head = [
        "α",
        "mean max resp.",
        "source↔member MI",
        "disagreement conflict / ordinary",
        "epistemic conflict / ordinary",
    ]
    head += [f"OOD AUROC {s}" for s in scores]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        sp = r["specialisation"]
        cells = [f"{r['alpha']:g}", f"{sp['mean_max_responsibility']:.3f}", f"{sp['source_member_mi']:.3f}",
                 f"{r['conflict_disagreement']:.2f} / {r['ordinary_disagreement']:.2f}",
                 f"{r['conflict_epistemic']:.3f} / {r['ordinary_epistemic']:.3f}"]  # fmt: skip
        cells += ["–" if r["ood_auroc"][s] is None else f"{r['ood_auroc'][s]:.3f}" for s in scores]
        lines.append("| " + " | ".join(cells) + " |")
    cmd = f"python bench/alpha_sweep.py --alphas {args.alphas} --steps {args.steps} --members {args.members}"
    return (
        "\n".join(lines)
        + f"\n\n(K={args.members}, {args.steps} steps, batch {args.batch_size}, lr {args.lr}; `{cmd}`)"
    )


if __name__ == "__main__":
    main()
