"""Diagnosis: why do answer-level scores miss out-of-distribution prompts?

For a trained ensemble and ``eval_ood`` rows (in-distribution test prompts + OOD prompts),
teacher-forced on the rendered chat prompt, per member k:

* ``kl_base``: mean per-token KL(q_k ‖ q_base) over the prompt positions (full vocabulary;
  the base is the same model with the adapters disabled);
* ``llr``: mean per-token log q_k(x_t) − log q_base(x_t) over the prompt positions;
* ``update_ratio``: ‖B_k A_k h‖ / ‖W h‖ (LoRA scaling included) at the first, middle and last
  decoder layer's ``q_proj`` and ``down_proj`` inputs, averaged over positions;

each averaged separately over in-distribution and OOD rows. "user" variants use only the
tokens of the user's message (the chat template's fixed prefix and suffix left out).
It then prints the OOD AUROC of the prompt-level scores this suggests (mixture LLR, mean
member KL from the base, member disagreement on the prompt tokens) and, in
``prompt_scores``, candidate aggregations of the per-token LLR (mean = the served
``prompt_novelty``, sum, ratio to the base's NLL, quantiles) with their AUROC per OOD kind
and their TPR at 5 % FPR (what a 5 % gate catches). JSON is written to ``--out``, the
per-prompt records beside it; ``--rescore OUT.json`` recomputes the table from them.

    python bench/ood_diagnose.py --ensemble DIR [--data eval_ood.jsonl] [--limit N] [--out F]
    python bench/ood_diagnose.py --rescore F
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ood_ablation import category  # bench/, the script's own folder

from ensemble import metrics as M


def _template_span(tok: Any) -> tuple[int, int]:
    """(prefix, suffix) token counts the chat template puts around a user message."""
    a = tok.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True)
    b = tok.apply_chat_template([{"role": "user", "content": "y z w"}], add_generation_prompt=True)
    a, b = (
        list(a["input_ids"] if hasattr(a, "keys") else a),
        list(b["input_ids"] if hasattr(b, "keys") else b),
    )
    pre = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
    suf = next(i for i, (x, y) in enumerate(zip(a[::-1], b[::-1], strict=False)) if x != y)
    return pre, suf


def _mix(tokens: Any, lw: Any) -> Any:
    """Mixture per-token log-likelihood ratio from (K, T) member ratios (same base)."""
    a = lw[:, None] + tokens
    return np.log(np.exp(a - a.max(0)).sum(0)) + a.max(0)


def prompt_score_table(records: list[dict[str, Any]], lw: Any) -> dict[str, Any]:
    """OOD AUROC (overall and per OOD kind) and TPR at 5 % FPR of candidate prompt-level
    aggregations of the per-token members-vs-base log-likelihood ratio on the user's tokens.
    TPR at 5 % FPR is what a 5 % gate sees; AUROC weighs the whole ranking."""

    def ratio(r: dict[str, Any]) -> float:  # −Σ LLR / Σ base NLL: a log-perplexity ratio
        return -float(np.sum(_mix(np.array(r["user_llr_tokens"]), lw))) / max(
            1e-9, -float(np.sum(r["user_base_lp"]))
        )

    aggregations = {
        "mean_mixture (served prompt_novelty)": lambda r: (
            -float(np.mean(_mix(np.array(r["user_llr_tokens"]), lw)))
        ),
        "sum_mixture": lambda r: -float(np.sum(_mix(np.array(r["user_llr_tokens"]), lw))),
        "ratio_to_base_nll": ratio,
        "max_member_mean": lambda r: -float(np.max(np.mean(r["user_llr_tokens"], axis=1))),
        "q10_mixture": lambda r: -float(np.quantile(_mix(np.array(r["user_llr_tokens"]), lw), 0.1)),
        "min_mixture": lambda r: -float(np.min(_mix(np.array(r["user_llr_tokens"]), lw))),
        "frac_negative": lambda r: float(np.mean(_mix(np.array(r["user_llr_tokens"]), lw) < 0)),
    }
    ood = [bool(r["ood"]) for r in records]
    kinds = sorted({category(r) for r in records} - {"in"})
    table: dict[str, Any] = {}
    for name, fn in aggregations.items():
        vals = np.array([fn(r) for r in records])
        entry = {"all": M.auroc(vals.tolist(), ood)}
        for kind in kinds:
            sub = [i for i, r in enumerate(records) if category(r) in ("in", kind)]
            entry[kind] = M.auroc(vals[sub].tolist(), [ood[i] for i in sub])
        ind = np.sort(vals[~np.array(ood)])
        thr = ind[int(np.ceil(0.95 * len(ind))) - 1]  # flags ≤ 5 % of in-distribution
        entry["tpr_at_5pct_fpr"] = float(np.mean(vals[np.array(ood)] > thr))
        table[name] = {k: round(v, 3) for k, v in entry.items()}
    return table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ensemble", type=Path, default=None)
    p.add_argument("--data", type=Path, default=None)
    p.add_argument("--limit", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument(
        "--rescore",
        type=Path,
        default=None,
        metavar="OUT.json",
        help="recompute the prompt-score table from a finished run's OUT.json and "
        "OUT.records.json, without loading any model",
    )
    args = p.parse_args(argv)
    if args.rescore is not None:
        done = json.loads(args.rescore.read_text())
        records = json.loads(args.rescore.with_suffix(".records.json").read_text())
        k = len(records[0]["user_llr_tokens"])  # runs before log_weights was saved: uniform
        lw = np.array(done.get("log_weights", [-np.log(k)] * k))
        table = prompt_score_table(records, lw)
        print(json.dumps(table, indent=1))
        return 0
    if args.ensemble is None:
        p.error("--ensemble is required (or --rescore OUT.json)")

    import torch

    from ensemble.jsonl import read_jsonl
    from softspec.paths import default_data_dir
    from training.model import load_ensemble

    rows = read_jsonl(args.data or default_data_dir() / "eval_ood.jsonl")
    if args.limit:
        rows = rows[: args.limit]
    ens, tok = load_ensemble(args.ensemble)
    ens.eval()
    model, members = ens.peft, ens.members
    lw = ens.log_weights.double().numpy()
    pre, suf = _template_span(tok)
    layers = model.get_base_model().model.layers
    probe = {
        f"L{i}.{name}": getattr(getattr(layers[i], part), name)
        for i in (0, len(layers) // 2, len(layers) - 1)
        for part, name in (("self_attn", "q_proj"), ("mlp", "down_proj"))
    }
    ratios: dict[str, list[float]] = {}

    def hook(key: str, member: str) -> Any:
        def fn(mod: Any, inputs: Any, output: Any) -> None:
            h = inputs[0]
            base = mod.base_layer(h)
            delta = mod.lora_B[member](mod.lora_A[member](h)) * mod.scaling[member]
            r = (delta.norm(dim=-1) / base.norm(dim=-1).clamp_min(1e-12)).mean()
            ratios.setdefault(f"{member}.{key}", []).append(float(r))

        return fn

    records = []
    for row in rows:
        msgs = [{"role": m["role"], "content": m["content"]} for m in row["prompt"]]
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        x = torch.tensor([ids])
        with torch.no_grad():
            with model.disable_adapter():
                base = torch.log_softmax(model(input_ids=x).logits[0, :-1].float(), -1)
            per = []
            for m in members:
                model.base_model.set_adapter(m)
                handles = [mod.register_forward_hook(hook(k, m)) for k, mod in probe.items()]
                per.append(torch.log_softmax(model(input_ids=x).logits[0, :-1].float(), -1))
                for h in handles:
                    h.remove()
        tgt = x[0, 1:]
        lp = torch.stack(per)  # (K, T, V)
        tok_lp = lp.gather(-1, tgt[None, :, None].expand(len(members), -1, 1))[..., 0]  # (K, T)
        base_lp = base.gather(-1, tgt[:, None])[:, 0]  # (T,)
        kl = (lp.exp() * (lp - base[None])).sum(-1)  # (K, T)
        mix = torch.logsumexp(torch.tensor(lw, dtype=lp.dtype)[:, None, None] + lp, 0)  # (T, V)
        mi = (lp.exp() * (lp - mix[None])).sum(-1)  # (K, T): KL(q_k ‖ q̄)
        w = torch.tensor(np.exp(lw), dtype=lp.dtype)
        mix_tok = torch.logsumexp(torch.tensor(lw, dtype=lp.dtype)[:, None] + tok_lp, 0)
        n = len(ids)
        user = slice(max(pre - 1, 0), max(n - 1 - suf, pre))  # predicted positions of user text
        rec: dict[str, Any] = {"ood": bool(row["ood"]), "task": row.get("task", "")}
        rec["user_llr_tokens"] = (tok_lp[:, user] - base_lp[user]).tolist()  # (K, T_user)
        rec["user_base_lp"] = base_lp[user].tolist()
        for name, sl in (("all", slice(None)), ("user", user)):
            rec[f"llr_{name}"] = float((mix_tok[sl] - base_lp[sl]).mean())
            rec[f"llr_members_{name}"] = (tok_lp[:, sl] - base_lp[sl]).mean(1).tolist()
            rec[f"kl_base_{name}"] = kl[:, sl].mean(1).tolist()
            rec[f"mi_{name}"] = float((w[:, None] * mi[:, sl]).sum(0).mean())
        records.append(rec)
        print(".", end="", flush=True, file=sys.stderr)
    print(file=sys.stderr)
    if args.out:  # first: the records are the expensive part
        args.out.with_suffix(".records.json").write_text(json.dumps(records))
    ood = [r["ood"] for r in records]
    res: dict[str, Any] = {"n": len(records), "n_ood": sum(ood), "per_member": {}, "auroc": {}}
    res["log_weights"] = np.asarray(lw).tolist()
    if not 0 < sum(ood) < len(ood):  # one class only (e.g. calibration prompts): no AUROC
        if args.out:
            args.out.write_text(json.dumps(res, indent=1))
        print(json.dumps(res, indent=1))
        return 0
    for name in ("all", "user"):
        for key in (f"kl_base_{name}", f"llr_members_{name}"):
            arr = np.array([r[key] for r in records])  # (N, K)
            res["per_member"][key] = {
                "in": arr[~np.array(ood)].mean(0).round(4).tolist(),
                "ood": arr[np.array(ood)].mean(0).round(4).tolist(),
            }
        res["auroc"][f"neg_llr_{name}"] = M.auroc([-r[f"llr_{name}"] for r in records], ood)
        res["auroc"][f"kl_base_{name}"] = M.auroc(
            [float(np.mean(r[f"kl_base_{name}"])) for r in records], ood
        )
        res["auroc"][f"neg_kl_base_{name}"] = M.auroc(
            [-float(np.mean(r[f"kl_base_{name}"])) for r in records], ood
        )
        res["auroc"][f"mi_{name}"] = M.auroc([r[f"mi_{name}"] for r in records], ood)
    res["update_ratio"] = {}
    for key, vals in sorted(ratios.items()):
        res["update_ratio"][key] = round(float(np.mean(vals)), 5)
    # in vs OOD split of the update ratio (rows interleave: one entry per row per probe)
    oodv = np.array(ood)
    for key, vals in ratios.items():
        v = np.array(vals)
        if len(v) == len(oodv):
            res["update_ratio"][key] = {
                "in": round(float(v[~oodv].mean()), 5),
                "ood": round(float(v[oodv].mean()), 5),
            }
    by_task: dict[str, list[float]] = {}
    for r in records:
        by_task.setdefault(category(r), []).append(-r["llr_all"])
    res["neg_llr_all_by_kind"] = {k: round(float(np.mean(v)), 4) for k, v in by_task.items()}
    res["prompt_scores"] = prompt_score_table(records, lw)
    text = json.dumps(res, indent=1)
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
