"""Benchmark: which scores and which training recipe detect what the ensemble does not know?

For every training recipe × α (same K, steps, seed and data as ``bench/alpha_sweep.py``:
``sft_topics_train`` + ``sft_conflict_train``), one ensemble is trained, served on the
local engine through the real gateway, and asked:

* calibration prompts (``sft_topics_val``, in distribution): fit the ``combined`` gate
  score exactly as ``softspec eval --calibrate-gate`` does, from in-distribution data only;
* evaluation prompts: ``eval_ood`` in-distribution rows (``sft_topics_test``) against its
  OOD rows — other languages, held-out English topics — and against prompts of kinds never
  in training that we wrote (``bench/data/novel_kinds.jsonl``: arithmetic, code, medical,
  legal, random characters);
* conflicting prompts (``sft_conflict_test``): member disagreement there vs on ordinary
  in-distribution prompts (the paper's claim).

Reported per recipe × α: OOD AUROC of every served score and of the single-member
baselines (``perplexity`` and ``mean_token_entropy`` of one member's greedy answer),
overall and per OOD category; the ``combined`` gate's flag rate on in-distribution and
OOD prompts at its calibrated 5 % threshold; in-distribution validation NLL (mixture,
nats per completion token, ``sft_topics_val``); specialisation on conflicting pairs
(routing mutual information) and disagreement conflicting / ordinary.

Resumable: every finished (recipe, α) row is kept in ``results.json`` and trained
ensembles are reused, so the benchmark can run recipe by recipe.

    python bench/ood_ablation.py [--recipes zero,random,anchored] [--alphas 0,1] [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ensemble.scores import EVAL_SCORES

NOVEL = Path(__file__).resolve().parent / "data" / "novel_kinds.jsonl"
# training options of each recipe (on top of the shared ones)
RECIPES: dict[str, list[str]] = {
    "zero": [],
    "random": ["--prior-init", "random", "--prior-kl", "0.1"],
    "anchored": ["--prior-init", "random", "--prior-kl", "0.1", "--anchor", "0.01"],
    "zero+prompt": ["--prompt-loss-weight", "0.5"],
    "random+prompt": ["--prompt-loss-weight", "0.5", "--prior-init", "random", "--prior-kl", "0.1"],
}
SCORES = EVAL_SCORES
GATE_RATE = 0.05


def category(row: dict[str, Any]) -> str:
    """in / other_language / novel_kind / heldout_topic, from ``ood`` and the task label
    (``task``, or ``group`` in ``softspec eval`` predictions)."""
    task = str(row.get("task") or row.get("group") or "")
    if not row.get("ood"):
        return "in"
    if task.startswith("lang:"):
        return "other_language"
    if task.startswith("novel:"):
        return "novel_kind"
    return "heldout_topic"


def unique_prompts(rows: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    seen, out = set(), []
    for r in rows:
        key = r["prompt"][-1]["content"]
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out[:n]


def validation_nll(ens_dir: Path, data: Path, limit: int) -> dict[str, float]:
    """Mixture and mean-member NLL per completion token on sft_topics_val (no prompt)."""
    import functools

    import torch

    from training.data import load_sft
    from training.datasets import ExampleDataset, collate
    from training.model import load_ensemble

    ens, tok = load_ensemble(ens_dir)
    ens.eval()
    ds = ExampleDataset(load_sft(data / "sft_topics_val.jsonl", tok, 128, True)[:limit])
    coll = functools.partial(collate, pad_id=tok.pad_token_id)
    lw = ens.log_weights.double()
    mix_sum = member_sum = n_tok = 0.0
    with torch.no_grad():
        for start in range(0, len(ds), 8):
            batch = coll([ds[i] for i in range(start, min(start + 8, len(ds)))])
            batch.pop("idx")
            s = ens(**batch)
            logp = s.logp.double()  # (K, B)
            mix_sum += float(torch.logsumexp(lw[:, None] + logp, 0).sum())
            member_sum += float((lw.exp()[:, None] * logp).sum())
            n_tok += float(s.n_tokens.sum())
    return {"mixture_nll": -mix_sum / n_tok, "mean_member_nll": -member_sum / n_tok}


def evaluate(
    ens_dir: Path, data: Path, args: argparse.Namespace, log: Path
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """(calibration, evaluation, conflict) predictions through a real gateway."""
    from clients import SoftSpecClient
    from ensemble.jsonl import read_jsonl
    from softspec.evaluate import evaluate_rows
    from softspec.serving import start_server, stop_server

    cal_rows = unique_prompts(read_jsonl(data / "sft_topics_val.jsonl"), args.calibration)
    rows = read_jsonl(data / "eval_ood.jsonl")
    ind = [r for r in rows if not r["ood"]][: args.in_prompts]
    ood = [r for r in rows if r["ood"]][: args.ood_prompts]
    novel = read_jsonl(NOVEL)[: args.novel_prompts or None]
    conflict = unique_prompts(read_jsonl(data / "sft_conflict_test.jsonl"), args.conflict)
    for r in conflict:
        r["ood"] = False
    proc, url = start_server(ens_dir, "local", log)
    try:
        client = SoftSpecClient(url)
        member = client.models()[1].split(":")[1]

        def run(rs: list[dict[str, Any]]) -> list[dict[str, Any]]:
            preds = evaluate_rows(client, rs, member, args.max_tokens)
            for p, r in zip(preds, rs, strict=True):
                p["category"] = category(r)
            return preds

        return run(cal_rows), run(ind + ood + novel), run(conflict)
    finally:
        stop_server(proc)


def score_table(
    cal: list[dict[str, Any]], preds: list[dict[str, Any]]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """OOD AUROC per score (overall and per category) and the combined gate's flag rates."""
    from ensemble import metrics as M
    from ensemble.calibration import combined_score, fit_calibration, threshold_for_rate
    from ensemble.scores import COMBINED_COMPONENTS, DISTANCE_COMPONENTS, Score

    # the served rule (softspec eval --calibrate-gate): prompt_distance when it was served
    served = all(p.get(Score.PROMPT_DISTANCE.value) is not None for p in cal)
    components = DISTANCE_COMPONENTS if served else COMBINED_COMPONENTS
    calib = fit_calibration(cal, components, source="sft_topics_val")
    for p in preds:
        p["combined"] = combined_score(calib, p)
    cats = sorted({p["category"] for p in preds} - {"in"})
    auroc: dict[str, Any] = {}
    for s in SCORES:
        usable = [p for p in preds if p.get(s) is not None and np.isfinite(p[s])]
        entry: dict[str, Any] = {}
        for name, keep in [("all", None), *[(c, c) for c in cats]]:
            sub = [p for p in usable if p["category"] in ("in", keep) or keep is None]
            labels = [p["category"] != "in" for p in sub]
            entry[name] = (
                round(M.auroc([p[s] for p in sub], labels), 3)
                if 0 < sum(labels) < len(sub)
                else None
            )
        auroc[s] = entry
    thr = threshold_for_rate(GATE_RATE)
    flags = {
        c: round(float(np.mean([p["combined"] > thr for p in preds if p["category"] == c])), 3)
        for c in ["in", *cats]
    }
    return auroc, {
        "components": list(components),
        "threshold": thr,
        "target_rate": GATE_RATE,
        "flag_rate": flags,
    }


def main() -> None:
    from alpha_sweep import mixed_training_file, specialisation

    from ensemble.atomic import atomic_write_text
    from softspec.cli import main as softspec
    from softspec.default_data import build_datasets
    from softspec.default_model import export_default_model
    from softspec.paths import default_data_dir, softspec_home

    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--recipes", default="zero,random,anchored")
    ap.add_argument("--alphas", default="0,1")
    ap.add_argument("--members", type=int, default=4)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=96)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--calibration", type=int, default=30, help="sft_topics_val prompts")
    ap.add_argument("--in-prompts", type=int, default=30, help="in-distribution eval_ood rows")
    ap.add_argument("--ood-prompts", type=int, default=30, help="OOD eval_ood rows")
    ap.add_argument("--conflict", type=int, default=10, help="sft_conflict_test prompts")
    ap.add_argument("--novel-prompts", type=int, default=0, help="novel-kind prompts (0 = all)")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument(
        "--pairs", type=int, default=80, help="held-out examples for routing MI and val NLL"
    )
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument(
        "--rescore",
        action="store_true",
        help="recompute every finished row's AUROCs and gate from its saved predictions "
        "with the current code (no training, no serving), then print the table",
    )
    args = ap.parse_args()
    unknown = set(args.recipes.split(",")) - set(RECIPES)
    if unknown:
        ap.error(f"unknown recipe(s) {sorted(unknown)}; known: {', '.join(RECIPES)}")

    base = export_default_model()
    build_datasets()
    data = default_data_dir()
    out = args.out or softspec_home() / "bench" / "ood_ablation"
    out.mkdir(parents=True, exist_ok=True)
    train_file = mixed_training_file(data, out / "train.jsonl", args.seed)
    results_path = out / "results.json"
    results: list[dict[str, Any]] = (
        json.loads(results_path.read_text()) if results_path.exists() else []
    )
    if args.rescore:
        for row in results:
            name = f"{row['recipe'].replace('+', '_')}_a{row['alpha']:g}"
            saved = json.loads((out / f"{name}.predictions.json").read_text())
            row["ood_auroc"], row["gate"] = score_table(saved["calibration"], saved["eval"])
        atomic_write_text(results_path, json.dumps(results, indent=2))
        print(table(results))
        return
    for recipe in args.recipes.split(","):
        for alpha in [float(a) for a in args.alphas.split(",")]:
            if any(r["recipe"] == recipe and r["alpha"] == alpha for r in results):
                continue
            name = f"{recipe.replace('+', '_')}_a{alpha:g}"
            ens = out / name
            t0 = time.monotonic()
            if not (ens / "ensemble.json").exists():
                code = softspec([
                    "train", "sft", "--base", str(base), "--data", str(train_file), "--out", str(ens),
                    "--members", str(args.members), "--alpha", str(alpha), "--max-steps", str(args.steps),
                    "--batch-size", str(args.batch_size), "--learning-rate", str(args.lr),
                    "--seed", str(args.seed), "--max-length", str(args.max_length), "--drop-overlong",
                    "--routing-examples", "32", "--gate-calibration", "0",
                    "--resume" if ens.with_name(ens.name + ".run").exists() else "--overwrite",
                    *RECIPES[recipe],
                ])  # fmt: skip
                assert code == 0, f"training {name} failed"
            row: dict[str, Any] = {
                "recipe": recipe, "alpha": alpha, "train_seconds": round(time.monotonic() - t0),
                "options": RECIPES[recipe],
            }  # fmt: skip
            manifest = json.loads((ens / "ensemble.json").read_text())
            row["prior"] = manifest["training"].get("prior")
            row["specialisation"] = specialisation(ens, data, alpha, limit=args.pairs)
            row["validation"] = validation_nll(ens, data, limit=args.pairs)
            cal, preds, conflict = evaluate(ens, data, args, out / f"{name}.serve.log")
            row["ood_auroc"], row["gate"] = score_table(cal, preds)
            row["disagreement"] = {
                "conflict": round(float(np.mean([p["disagreement"] for p in conflict])), 3),
                "ordinary": round(
                    float(np.mean([p["disagreement"] for p in preds if p["category"] == "in"])), 3
                ),
            }
            (out / f"{name}.predictions.json").write_text(
                json.dumps({"calibration": cal, "eval": preds, "conflict": conflict})
            )
            results = [r for r in results if not (r["recipe"] == recipe and r["alpha"] == alpha)]
            results.append(row)
            atomic_write_text(results_path, json.dumps(results, indent=2))
            print(json.dumps(row), flush=True)
    print(table(results))


def table(results: list[dict[str, Any]]) -> str:
    head = ["recipe", "α", *SCORES, "in-dist NLL", "MI", "disagr. conflict / ordinary"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [r["recipe"], f"{r['alpha']:g}"]
        cells += [
            "–" if r["ood_auroc"][s]["all"] is None else f"{r['ood_auroc'][s]['all']:.3f}"
            for s in SCORES
        ]
        cells += [
            f"{r['validation']['mixture_nll']:.3f}",
            f"{r['specialisation']['source_member_mi']:.3f}",
            f"{r['disagreement']['conflict']:.2f} / {r['disagreement']['ordinary']:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Per OOD category (AUROC vs in-distribution):", ""]
    for r in results:
        per = {
            s: r["ood_auroc"][s]
            for s in ("prompt_distance", "prompt_novelty", "combined", "epistemic")
        }
        lines.append(
            f"- {r['recipe']} α={r['alpha']:g}: {json.dumps(per)}; gate {r['gate']['flag_rate']}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
