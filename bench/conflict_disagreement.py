"""Benchmark: do members disagree more where their training data conflicts? (issue 11)

The paper's claim is that at α = 1 members become specialists for the conflicting modes of
the data, so they disagree more on conflicting prompts than on ordinary ones. The α sweep
(``bench/alpha_sweep.py``) compared ``sft_conflict_test`` with ``sft_topics_test`` prompts
and measured the served ``disagreement``; this benchmark asks the question with prompt
sets defined by what the training data says about each prompt, and with disagreement
measured along the axis the data conflicts on.

Training data (the α sweep's): ``sft_topics_train`` + ``sft_conflict_train``. In the
conflict set every prompt is answered twice, in UPPER CASE (source ``upper``) and in lower
case without trailing punctuation (``lower``); most of those prompts are also in
``sft_topics_train`` with their normal-case answer. Prompt sets (``prompt_sets``):

* ``conflict_trained``: prompts of ``sft_conflict_train``: trained with contradicting
  answers;
* ``ordinary_trained``: prompts of ``sft_topics_train`` none of whose user turns occurs in
  either conflict file: trained with one convention;
* ``conflict_heldout``: ``sft_conflict_test`` prompts that are in no training file;
* ``ordinary_heldout``: ``sft_topics_test`` prompts in no training file and no conflict file.

Per prompt, through the real gateway (local engine, sequence mode, greedy, every member's
candidate returned):

* ``disagreement``: the served score (pairs of members whose answers differ after
  stripping, **case-folding** and collapsing whitespace);
* ``disagreement_cased``: the same without case-folding;
* ``convention_disagreement``: pairs of members whose answers are written in different
  conventions (``convention``: upper / lower / mixed), the axis the data conflicts on;
  an answer without letters has no convention and leaves its pairs out;
* ``epistemic`` (token-level mutual information of the selected answer, nats per token).

Per α and set: the means, and each member's share of upper / lower / mixed answers (does a
member write its convention everywhere, or only where the data conflicted?).

    python bench/conflict_disagreement.py [--alphas 1,0] [--prompts 16] [--steps 60]

Resumable: ensembles and finished α rows under ``--out`` are reused.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

SETS = ("conflict_trained", "ordinary_trained", "conflict_heldout", "ordinary_heldout")
CONVENTIONS = ("upper", "lower", "mixed", "none")


def _key(text: str) -> str:
    return " ".join(text.split()).casefold()


def _user_turns(row: dict[str, Any]) -> list[str]:
    return [_key(m["content"]) for m in row["prompt"] if m["role"] == "user"]


def prompt_sets(
    topics_train: Sequence[dict[str, Any]],
    topics_test: Sequence[dict[str, Any]],
    conflict_train: Sequence[dict[str, Any]],
    conflict_test: Sequence[dict[str, Any]],
    n: int,
) -> dict[str, list[dict[str, Any]]]:
    """The four prompt sets (module docstring), each ≤ n distinct prompts in file order."""
    conflicted = {t for r in [*conflict_train, *conflict_test] for t in _user_turns(r)}
    trained = {tuple(_user_turns(r)) for r in [*topics_train, *conflict_train]}

    def distinct(rows: Sequence[dict[str, Any]], keep: Any) -> list[dict[str, Any]]:
        seen: set[tuple[str, ...]] = set()
        out = []
        for r in rows:
            k = tuple(_user_turns(r))
            if k not in seen and keep(r, k):
                seen.add(k)
                out.append(r)
        return out[:n]

    return {
        "conflict_trained": distinct(conflict_train, lambda r, k: True),
        "ordinary_trained": distinct(
            topics_train, lambda r, k: not any(t in conflicted for t in k)
        ),
        "conflict_heldout": distinct(conflict_test, lambda r, k: k not in trained),
        "ordinary_heldout": distinct(
            topics_test,
            lambda r, k: k not in trained and not any(t in conflicted for t in k),
        ),
    }


def convention(text: str) -> str:
    """upper (≥ 80 % of the letters upper-case), lower (no upper-case letter), mixed, or none."""
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return "none"
    upper = sum(c.isupper() for c in letters) / len(letters)
    if upper >= 0.8:
        return "upper"
    return "lower" if upper == 0 else "mixed"


def pair_disagreement(labels: Sequence[str]) -> float:
    """Fraction of pairs with different labels (0 for fewer than two)."""
    k = len(labels)
    if k < 2:
        return 0.0
    differ = sum(labels[i] != labels[j] for i in range(k) for j in range(i + 1, k))
    return differ / (k * (k - 1) / 2)


def convention_disagreement(conventions: dict[str, str]) -> float | None:
    """Pairs of members with different conventions, among answers that have one (or None)."""
    labels = [c for _, c in sorted(conventions.items()) if c != "none"]
    return pair_disagreement(labels) if len(labels) > 1 else None


def convention_values(preds: Sequence[dict[str, Any]]) -> list[float]:
    """Each prompt's convention disagreement, for the prompts where it is defined."""
    return [d for p in preds if (d := convention_disagreement(p["conventions"])) is not None]


def measure(client: Any, rows: Sequence[dict[str, Any]], max_tokens: int) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        ans = client.chat(
            r["prompt"],
            max_tokens=max_tokens,
            temperature=0,
            decode="sequence",
            return_candidates=True,
        )
        cands = sorted(ans.candidates or [], key=lambda c: c.member)
        texts = [c.text for c in cands]
        out.append(
            {
                "prompt": r["prompt"][-1]["content"],
                "turns": len(r["prompt"]),
                "answers": {c.member: c.text for c in cands},
                "disagreement": ans.uncertainty.disagreement,
                "disagreement_cased": pair_disagreement([" ".join(t.split()) for t in texts]),
                "conventions": {c.member: convention(c.text) for c in cands},
                "epistemic": ans.uncertainty.epistemic,
            }
        )
    return out


def summarise(preds: list[dict[str, Any]]) -> dict[str, Any]:
    members = sorted({m for p in preds for m in p["conventions"]})
    cased = convention_values(preds)
    return {
        "n": len(preds),
        "multi_turn": sum(p["turns"] > 1 for p in preds),
        **{
            s: round(float(np.mean([p[s] for p in preds])), 3)
            for s in ("disagreement", "disagreement_cased", "epistemic")
        },
        "convention_disagreement": round(float(np.mean(cased)), 3) if cased else None,
        "convention_n": len(cased),
        "member_conventions": {
            m: {
                c: round(float(np.mean([p["conventions"].get(m) == c for p in preds])), 2)
                for c in CONVENTIONS
            }
            for m in members
        },
    }


def compare(a: Sequence[float], b: Sequence[float], draws: int = 20000) -> dict[str, float]:
    """Is ``a`` (conflicting prompts) above ``b`` (ordinary)? The mean difference, the
    probability that a random ``a`` exceeds a random ``b`` (ties count ½), and the one-sided
    permutation p-value of the mean difference (seeded)."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    diff = float(x.mean() - y.mean())
    above = float(((x[:, None] > y[None]) + 0.5 * (x[:, None] == y[None])).mean())
    pooled = np.concatenate([x, y])
    rng = np.random.default_rng(0)
    hits = 0
    for _ in range(draws):
        rng.shuffle(pooled)
        hits += pooled[: len(x)].mean() - pooled[len(x) :].mean() >= diff - 1e-12
    return {"difference": round(diff, 4), "p_above": round(above, 3), "p_value": hits / draws}


def comparisons(preds: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Conflicting vs ordinary prompts, trained and held out, on epistemic and conventions."""
    out: dict[str, Any] = {}
    for kind in ("trained", "heldout"):
        a, b = preds[f"conflict_{kind}"], preds[f"ordinary_{kind}"]
        out[kind] = {
            "epistemic": compare([p["epistemic"] for p in a], [p["epistemic"] for p in b]),
            "convention_disagreement": compare(convention_values(a), convention_values(b)),
        }
    return out


def main() -> None:
    from alpha_sweep import mixed_training_file, train_ensemble

    from clients import SoftSpecClient
    from ensemble.atomic import atomic_write_text
    from ensemble.jsonl import read_jsonl
    from softspec.default_data import build_datasets
    from softspec.default_model import export_default_model
    from softspec.paths import default_data_dir, softspec_home
    from softspec.serving import start_server, stop_server

    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--alphas", default="1,0")
    ap.add_argument("--members", type=int, default=4)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompts", type=int, default=16, help="prompts per set")
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument(
        "--rescore",
        action="store_true",
        help="recompute every finished row from its saved answers (no serving)",
    )
    args = ap.parse_args()

    base = export_default_model()
    build_datasets()
    data = default_data_dir()
    out = args.out or softspec_home() / "bench" / "conflict"
    out.mkdir(parents=True, exist_ok=True)
    train_file = out / "train.jsonl"
    if not train_file.exists():
        mixed_training_file(data, train_file, args.seed)
    files = ("sft_topics_train", "sft_topics_test", "sft_conflict_train", "sft_conflict_test")
    topics_train, topics_test, conflict_train, conflict_test = (
        read_jsonl(data / f"{name}.jsonl") for name in files
    )
    sets = prompt_sets(topics_train, topics_test, conflict_train, conflict_test, args.prompts)
    path = out / "results.json"
    results: list[dict[str, Any]] = json.loads(path.read_text()) if path.exists() else []
    if args.rescore:
        for row in results:
            saved = json.loads((out / f"preds-alpha{row['alpha']:g}.json").read_text())
            row["sets"] = {s: summarise(p) for s, p in saved.items()}
            row["compare"] = comparisons(saved)
        atomic_write_text(path, json.dumps(results, indent=2))
        print(table(results))
        return
    for alpha in [float(a) for a in args.alphas.split(",")]:
        if any(r["alpha"] == alpha for r in results):
            continue
        ens = out / f"alpha{alpha:g}"
        if not (ens / "ensemble.json").exists():
            train_ensemble(base, train_file, ens, alpha, args)
        t0 = time.monotonic()
        proc, url = start_server(ens, "local", out / f"serve-alpha{alpha:g}.log")
        try:
            client = SoftSpecClient(url)
            preds = {s: measure(client, rows, args.max_tokens) for s, rows in sets.items()}
        finally:
            stop_server(proc)
        row = {
            "alpha": alpha,
            "seconds": round(time.monotonic() - t0),
            "sets": {s: summarise(p) for s, p in preds.items()},
            "compare": comparisons(preds),
        }
        atomic_write_text(out / f"preds-alpha{alpha:g}.json", json.dumps(preds, indent=1))
        results = sorted([*results, row], key=lambda r: r["alpha"])
        atomic_write_text(path, json.dumps(results, indent=2))
        print(json.dumps(row), flush=True)
    print(table(results))


def table(results: list[dict[str, Any]]) -> str:
    head = [
        "α",
        "set",
        "n (multi-turn)",
        "disagreement (served)",
        "cased",
        "convention",
        "epistemic",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        for s in SETS:
            m = r["sets"][s]
            cells = [
                f"{r['alpha']:g}",
                s,
                f"{m['n']} ({m['multi_turn']})",
                f"{m['disagreement']:.2f}",
                f"{m['disagreement_cased']:.2f}",
                "–"
                if m["convention_disagreement"] is None
                else f"{m['convention_disagreement']:.2f}",
                f"{m['epistemic']:.3f}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Conflicting above ordinary? (difference of means, P(conflict > ordinary), p):",
        "",
    ]
    for r in results:
        for kind, scores in r.get("compare", {}).items():
            parts = [
                f"{name} {c['difference']:+.3f}, {c['p_above']:.2f}, p = {c['p_value']:.3f}"
                for name, c in scores.items()
            ]
            lines.append(f"- α = {r['alpha']:g}, {kind}: " + "; ".join(parts))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
