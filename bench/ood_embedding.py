"""Ablation: is "what the ensemble was not trained on" visible in the frozen base's representation?

The served ``prompt_novelty`` reads the members-vs-base log-likelihood ratio of the prompt.
This script asks a different question of the same base model, with no adapter at all: how
far is a prompt's pooled hidden state from the training prompts' (squared Mahalanobis
distance, ``ensemble/density.py``)? If that separates OOD prompts much better than the
ratio does, the information is in the base's representation and the short-trained adapters
simply do not carry it into their likelihoods.

Protocol (no choice is made on the test rows):

* reference: the training prompts (``sft_topics_train``; distinct user messages);
* validation, for choosing layer × pooling × shrinkage: in-distribution ``sft_topics_val``
  vs ``--val-ood`` rows of ``ood.jsonl`` whose prompt is not in ``eval_ood`` (other
  languages and held-out English topics; no never-trained kinds);
* test: ``eval_ood`` (its in-distribution rows are ``sft_topics_test``) plus the
  never-trained kinds of ``bench/data/novel_kinds.jsonl``, i.e. the rows on which
  ``bench/ood_diagnose.py`` measures the served ``prompt_novelty``.

Pooling: ``user`` = mean over the tokens of the user's message (the chat template's fixed
prefix and suffix left out), ``all`` = mean over the whole rendered prompt, ``last`` = the
last prompt token. The chosen configuration (best validation AUROC) is reported on the test
rows per OOD category, with its TPR at the threshold that flags 5 % of the *validation*
in-distribution prompts, next to the test-set best (what selection on the test would have
claimed) so the selection gap is visible.

    python bench/ood_embedding.py [--base DIR] [--val-ood 160] [--out F.json] [--cache F.npz]
        [--novelty-records TEST.records.json --novelty-val-records VAL.records.json]

With the per-prompt records that ``bench/ood_diagnose.py`` wrote for a trained ensemble on
the test rows and on ``sft_topics_val`` (same order as the data files), it also scores the
gate score ``combined`` (``ensemble/calibration.py``) over {``prompt_novelty``, distance}
and over ``prompt_novelty`` alone, calibrated on the ``sft_topics_val`` rows only.
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

from ood_ablation import NOVEL, category  # bench/, the script's own folder
from ood_diagnose import _template_span

from ensemble import metrics as M
from ensemble.calibration import combined_score, fit_calibration
from ensemble.density import fit_gaussian
from ensemble.jsonl import read_jsonl

LAYERS = (2, 4, 6, 8, 10, 12, 15, 18, 22, 26, 30)
POOLS = ("user", "all", "last")
SHRINKAGE = (0.01, 0.1, 0.5)
CATEGORIES = ("other_language", "novel_kind", "heldout_topic")


def _text(row: dict[str, Any]) -> str:
    return str(row["prompt"][-1]["content"])


def _distinct(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen: set[str] = set()
    out = []
    for r in rows:
        if _text(r) not in seen:
            seen.add(_text(r))
            out.append(r)
    return out


def embed(base: Path, rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """{f"{pool}{layer}": (n, d)} pooled hidden states of the rendered chat prompts."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)  # several jobs share this machine's cores; spinning threads hurt
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    pre, suf = _template_span(tok)
    out: dict[str, list[np.ndarray]] = {f"{p}{layer}": [] for p in POOLS for layer in LAYERS}
    t0 = time.monotonic()
    for i, row in enumerate(rows):
        msgs = [{"role": m["role"], "content": m["content"]} for m in row["prompt"]]
        ids: Any = tok.apply_chat_template(msgs, add_generation_prompt=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        with torch.no_grad():
            hs = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states
        user = slice(pre, max(pre + 1, len(ids) - suf))
        for layer in LAYERS:
            h = hs[layer][0].double()
            out[f"user{layer}"].append(h[user].mean(0).numpy())
            out[f"all{layer}"].append(h.mean(0).numpy())
            out[f"last{layer}"].append(h[-1].numpy())
        if (i + 1) % 200 == 0:
            print(f"embedded {i + 1}/{len(rows)} ({time.monotonic() - t0:.0f} s)", file=sys.stderr)
    return {k: np.stack(v) for k, v in out.items()}


def tpr_at(scores: np.ndarray, ood: np.ndarray, threshold: float) -> float:
    return float((scores[ood] > threshold).mean())


def evaluate(
    scores: np.ndarray, ood: np.ndarray, cats: np.ndarray, threshold: float | None = None
) -> dict[str, float]:
    res = {"auroc": M.auroc(scores, ood)}
    for c in CATEGORIES:
        keep = (cats == c) | ~ood
        if (cats == c).any():
            res[c] = M.auroc(scores[keep], ood[keep])
    res["tpr_at_5pct_fpr"] = tpr_at(scores, ood, float(np.quantile(scores[~ood], 0.95)))
    if threshold is not None:  # fixed on the validation in-distribution rows
        res["flagged_in"] = float((scores[~ood] > threshold).mean())
        res["flagged_ood"] = tpr_at(scores, ood, threshold)
    return {k: round(v, 3) for k, v in res.items()}


def combine(
    val_records: list[dict[str, Any]],
    d_val: np.ndarray,
    test_records: list[dict[str, Any]],
    d_test: np.ndarray,
    ood: np.ndarray,
    cats: np.ndarray,
) -> dict[str, Any]:
    """``combined`` over {prompt_novelty, distance} vs each alone, calibrated on val rows."""
    if len(test_records) != len(d_test) or len(val_records) != len(d_val):
        raise SystemExit("the records do not match the rows (same files, same order?)")

    def rows(records: list[dict[str, Any]], dist: np.ndarray) -> list[dict[str, float]]:
        # prompt_novelty = −(mean mixture LLR over the user's tokens), as served
        return [
            {"prompt_novelty": -float(r["llr_user"]), "distance": float(d)}
            for r, d in zip(records, dist, strict=True)
        ]

    cal_rows, test_rows = rows(val_records, d_val), rows(test_records, d_test)
    out: dict[str, Any] = {"calibration_rows": len(cal_rows)}
    for name, comps in [
        ("prompt_novelty", ["prompt_novelty"]),
        ("distance", ["distance"]),
        ("prompt_novelty + distance", ["prompt_novelty", "distance"]),
    ]:
        cal = fit_calibration(cal_rows, comps, "sft_topics_val")
        scores = np.array([combined_score(cal, r) for r in test_rows], dtype=float)
        # the gate at a 5 % rate: flag p ≤ L, L = m·⌊0.05(n+1)/m⌋/(n+1) (docs/uncertainty.md)
        m, n = len(comps), cal.n
        level = m * int(0.05 * (n + 1) / m) / (n + 1)
        res = evaluate(scores, ood, cats, 1.0 - level - 0.5 / (n + 1))
        out[f"combined over {name}"] = res  # AUROC and the 5 % gate on test
    return out


def main(argv: list[str] | None = None) -> int:
    from softspec.default_model import default_model_dir
    from softspec.paths import default_data_dir

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", type=Path, default=None, help="base model (default: SmolLM2)")
    p.add_argument("--data-dir", type=Path, default=None, help="default data directory")
    p.add_argument("--val-ood", type=int, default=160, help="OOD validation rows (seeded)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", type=Path, default=None, help="reuse/write embeddings here")
    p.add_argument("--out", type=Path, default=None, help="JSON report")
    p.add_argument("--novelty-records", type=Path, default=None, help="ood_diagnose records (test)")
    p.add_argument("--novelty-val-records", type=Path, default=None, help="same, sft_topics_val")
    args = p.parse_args(argv)
    data = args.data_dir or default_data_dir()
    base = args.base or default_model_dir()

    ref = _distinct(read_jsonl(data / "sft_topics_train.jsonl"))
    test = read_jsonl(data / "eval_ood.jsonl") + read_jsonl(NOVEL)
    in_test = {_text(r) for r in test}
    pool = [r for r in _distinct(read_jsonl(data / "ood.jsonl")) if _text(r) not in in_test]
    val_ood = random.Random(args.seed).sample(pool, min(args.val_ood, len(pool)))
    val = _distinct(read_jsonl(data / "sft_topics_val.jsonl")) + val_ood
    rows = ref + val + test

    if args.cache is not None and args.cache.exists():
        emb = dict(np.load(args.cache))
    else:
        emb = embed(base, rows)
        if args.cache is not None:
            np.savez(args.cache, **emb)  # type: ignore[arg-type]
    a, b = len(ref), len(ref) + len(val)
    ood_v = np.array([bool(r.get("ood")) for r in val])
    ood_t = np.array([bool(r.get("ood")) for r in test])
    cats_v = np.array([category(r) for r in val])
    cats_t = np.array([category(r) for r in test])

    table: list[dict[str, Any]] = []
    for key, x in emb.items():
        for s in SHRINKAGE:
            g = fit_gaussian(x[:a], s)
            dv, dt = g.distance(x[a:b]), g.distance(x[b:])
            thr = float(np.quantile(dv[~ood_v], 0.95))
            table.append({
                "config": f"{key} s={s}",
                "val": evaluate(dv, ood_v, cats_v),
                "test": evaluate(dt, ood_t, cats_t, thr),
            })  # fmt: skip
    table.sort(key=lambda t: (t["val"]["auroc"], t["val"]["tpr_at_5pct_fpr"]), reverse=True)
    chosen = table[0]
    test_best = max(table, key=lambda t: t["test"]["auroc"])
    report = {
        "rows": {"reference": len(ref), "val_in": int((~ood_v).sum()), "val_ood": len(val_ood),
                 "test_in": int((~ood_t).sum()), "test_ood": int(ood_t.sum())},
        "chosen_on_validation": chosen,
        "best_on_test (not a claim)": test_best,
        "top_by_validation": table[:10],
    }  # fmt: skip
    if args.novelty_records is not None and args.novelty_val_records is not None:
        key, s = chosen["config"].split(" s=")
        g = fit_gaussian(emb[key][:a], float(s))
        index = {_text(r): i for i, r in enumerate(val)}
        val_rows = read_jsonl(data / "sft_topics_val.jsonl")
        d_val = g.distance(emb[key][a:b])[[index[_text(r)] for r in val_rows]]
        d_test = g.distance(emb[key][b:])
        report["with_prompt_novelty"] = combine(
            json.loads(args.novelty_val_records.read_text()), d_val,
            json.loads(args.novelty_records.read_text()), d_test, ood_t, cats_t,
        )  # fmt: skip
    text = json.dumps(report, indent=1)
    if args.out is not None:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
