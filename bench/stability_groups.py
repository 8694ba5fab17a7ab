"""Benchmark: does the stability criterion see a split between groups of the data? (issue 17)

``softspec diagnose`` searches the adapter's parameter space for the direction of largest
λ = uᵀJu / uᵀVu. In-sample that search finds one poorly fitted example; cross-fitted
(``--cross-fit``) it finds directions that hold on unseen examples. Neither says whether a
*named* split of the data, such as the conflict set's UPPER vs lower case convention, is
unstable. This benchmark measures that directly: it builds the direction that separates
two groups and measures its quotient on examples that did not build it.

Preparation is ``softspec diagnose``'s (``softspec.diagnose.prepare`` with ``--cross-fit``:
the same seeded sample, shuffle, folds by batch, fitted θ*, cut decoder). For each fold f
and each kind of direction, built from fold f's per-example gradients only:

* ``groups``: u = mean g over group A − mean g over group B (the two largest values of
  ``--group-key`` in fold f), the direction along which the groups pull apart;
* ``random``: the same contrast for a seeded random split of fold f into two halves, the
  control: a split that carries no information about the data.

Each direction costs one HVP pass (every fold's curvature at once). Its quotient
uᵀJ_e u / uᵀV_e u is measured on every other fold e, for the sequence criterion (J = Σ g gᵀ)
and the per-token one (J = Σ g gᵀ / T_i); V is the same for both. The in-fold quotient
(e = f) is reported too; it is biased upward, because u was built from those gradients.

    python bench/stability_groups.py --data FILE [--group-key source] [--fit-examples N]
        [--out F.json]
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
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

KINDS = ("groups", "random")


def contrast(g: torch.Tensor, a: Sequence[int], b: Sequence[int]) -> torch.Tensor:
    """Unit vector along mean(g[a]) − mean(g[b])."""
    if not len(a) or not len(b):
        raise ValueError("both groups need at least one example in the fold")
    u = g[list(a)].mean(0) - g[list(b)].mean(0)
    norm = float(u.norm())
    if norm == 0.0:
        raise ValueError("the two groups have the same mean gradient")
    return u / norm


def quotients(
    objective: Any,
    g: torch.Tensor,
    row_fold: np.ndarray,
    u: torch.Tensor,
    weights: dict[str, np.ndarray],
) -> dict[str, list[float]]:
    """Per criterion, the quotient Σ_{i∈e} w_i (g_iᵀu)² / uᵀV_e u for every fold e."""
    sizes = objective.batch_sizes()
    folds = int(row_fold.max()) + 1
    batch_fold = np.arange(len(sizes)) % folds
    per_batch = objective.hvp_batches(u)  # (batches, P)
    curvature = [
        float(u @ per_batch[torch.as_tensor(batch_fold == e)].sum(0)) for e in range(folds)
    ]
    proj = (g @ u).double().numpy()
    out: dict[str, list[float]] = {}
    for name, w in weights.items():
        out[name] = [
            float((w[row_fold == e] * proj[row_fold == e] ** 2).sum() / curvature[e])
            if curvature[e] > 0
            else float("nan")
            for e in range(folds)
        ]
    return out


def two_groups(labels: Sequence[str], rows: np.ndarray) -> tuple[str, str]:
    """The two most frequent labels among ``rows`` (ties: alphabetical)."""
    counts: dict[str, int] = {}
    for i in rows:
        counts[labels[i]] = counts.get(labels[i], 0) + 1
    ranked = sorted(counts, key=lambda k: (-counts[k], k))
    if len(ranked) < 2:
        raise ValueError(f"the fold has one group only ({ranked}); choose another --group-key")
    return ranked[0], ranked[1]


FITTED_PROMPT = "fitted-prompt"  # --group-key: is the row's prompt among θ*'s fit rows?


def fitted_prompt_labels(
    rows: Sequence[dict[str, Any]], fit_rows: Sequence[dict[str, Any]]
) -> list[str]:
    """ "prompt fitted" for a measured row whose prompt θ* was fitted on (with
    ``--fit-examples``; on ``sft_conflict`` that row is the twin in the other case),
    else "prompt unseen"."""

    def key(row: dict[str, Any]) -> str:
        return json.dumps(row.get("prompt", row.get("messages", [])[:-1]), sort_keys=True)

    seen = {key(r) for r in fit_rows}
    return ["prompt fitted" if key(r) in seen else "prompt unseen" for r in rows]


def measure(
    objective: Any,
    g: torch.Tensor,
    row_fold: np.ndarray,
    labels: Sequence[str],
    weights: dict[str, np.ndarray],
    seed: int = 0,
) -> dict[str, Any]:
    """Held-out and in-fold quotients of the group and random contrasts, fold by fold."""
    rng = np.random.default_rng(seed)
    folds = int(row_fold.max()) + 1
    result: dict[str, Any] = {
        kind: {
            "held_out": {k: [] for k in weights},
            "in_fold": {k: [] for k in weights},
            "pairs": [],
        }
        for kind in KINDS
    }
    for f in range(folds):
        rows = np.flatnonzero(row_fold == f)
        a_label, b_label = two_groups(labels, rows)
        a = [int(i) for i in rows if labels[i] == a_label]
        b = [int(i) for i in rows if labels[i] == b_label]
        shuffled = rng.permutation(rows)
        half = len(shuffled) // 2
        directions = {
            "groups": (contrast(g, a, b), f"{a_label} vs {b_label}"),
            "random": (
                contrast(g, shuffled[:half].tolist(), shuffled[half:].tolist()),
                "random halves",
            ),
        }
        for kind, (u, pair) in directions.items():
            q = quotients(objective, g, row_fold, u, weights)
            result[kind]["pairs"].append(pair)
            for name, values in q.items():
                result[kind]["in_fold"][name].append(values[f])
                result[kind]["held_out"][name] += [v for e, v in enumerate(values) if e != f]
    for kind in KINDS:
        result[kind]["mean_held_out"] = {
            name: float(np.mean(v)) for name, v in result[kind]["held_out"].items()
        }
    return result


def main(argv: Sequence[str] | None = None) -> int:
    from softspec.diagnose import DiagnoseOptions, _group, prepare
    from training.stability import fold_of_rows, per_token_weights

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument(
        "--group-key",
        default="source",
        help=f"row field naming the groups; {FITTED_PROMPT}: whether the prompt is among "
        "the --fit-examples rows",
    )
    p.add_argument("--examples", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--fit-examples",
        type=int,
        default=0,
        help="fit θ* on N further rows that are never measured (softspec diagnose's flag)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    t0 = time.monotonic()
    opts = DiagnoseOptions(
        data=args.data,
        examples=args.examples,
        batch_size=args.batch_size,
        fit_examples=args.fit_examples,
        seed=args.seed,
        drop_overlong=True,
        cross_fit=True,
    )
    say = lambda m: print(f"stability_groups: {m}", file=sys.stderr)  # noqa: E731
    prep = prepare(opts, say)
    objective = prep.objective
    g = objective.example_grads()
    row_fold = fold_of_rows(objective.batch_sizes(), opts.folds)
    if args.group_key == FITTED_PROMPT:
        if not prep.fit_rows:
            p.error(f"--group-key {FITTED_PROMPT} needs --fit-examples N")
        labels = fitted_prompt_labels(prep.rows, prep.fit_rows)
    else:
        labels = [str(r.get(args.group_key, _group(r))) for r in prep.rows]
    weights = {
        "sequence": np.ones(objective.n),
        "per-token": per_token_weights(objective.token_counts()),
    }
    report = {
        "data": args.data,
        "group_key": args.group_key,
        "n_examples": objective.n,
        "fit": prep.fit,
        **measure(objective, g, row_fold, labels, weights, seed=args.seed),
        "seconds": round(time.monotonic() - t0, 1),
    }
    text = json.dumps(report, indent=1)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
