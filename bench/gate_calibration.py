"""Benchmark: does the calibrated gate keep its stated promise on fresh in-distribution data?

Input: predictions of ``softspec eval`` (``predictions.jsonl``: one row per prompt with its
served scores and ``ood``), on data that holds more in-distribution prompts than one
calibration needs (e.g. ``sft_topics_val`` + ``eval_ood``). For each of ``--splits`` random
splits of the in-distribution rows into ``--calibration`` calibration rows and the rest,
the ``combined`` gate is fitted exactly as ``softspec eval --calibrate-gate`` fits it
(ensemble/calibration.py) and the flag rate is measured on the held-out in-distribution
rows and on the OOD rows (per category). Reported: the promised level and PAC bound, the
mean held-out in-distribution flag rate (should be ≤ the level: the conformal guarantee is
in expectation over the calibration draw), the share of splits whose held-out rate exceeds
the PAC bound (≈ ≤ δ, plus the held-out set's own sampling noise) and the OOD flag rates.
With ``--fixed CAL.jsonl`` it also reports one fixed split: every in-distribution row of
CAL (e.g. the predictions on ``sft_topics_val``) calibrates, the in-distribution rows of
``--predictions`` (e.g. on ``eval_ood``) are the other held-out prompts.

    python bench/gate_calibration.py --predictions P.jsonl [--fixed CAL.jsonl] [--rate 0.05]
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

from ensemble.calibration import combined_score, fit_conformal_gate
from ensemble.jsonl import read_jsonl
from ensemble.metrics import auroc
from ensemble.scores import COMBINED_COMPONENTS


def flag_rate(cal: Any, threshold: float, rows: list[dict[str, Any]]) -> float:
    flags = [(combined_score(cal, r) or 0.0) > threshold for r in rows]
    return float(np.mean(flags)) if flags else float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--predictions", type=Path, nargs="+", required=True)
    p.add_argument("--rate", type=float, default=0.05)
    p.add_argument("--delta", type=float, default=0.1)
    p.add_argument("--calibration", type=int, default=32, help="calibration rows per split")
    p.add_argument("--splits", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fixed", type=Path, default=None, metavar="CAL.jsonl")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    def usable(path: Path) -> list[dict[str, Any]]:
        return [
            r for r in read_jsonl(path) if all(r.get(c) is not None for c in COMBINED_COMPONENTS)
        ]

    rows = [r for f in args.predictions for r in usable(f)]
    fixed = usable(args.fixed) if args.fixed else []
    ind = [r for r in rows + fixed if not r.get("ood")]
    ood: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("ood"):
            ood.setdefault(category(r), []).append(r)
    if len(ind) <= args.calibration:
        raise SystemExit(f"{len(ind)} in-distribution rows: need more than --calibration")

    def ood_rates(cal: Any, thr: float) -> dict[str, float]:
        out = {k: flag_rate(cal, thr, v) for k, v in ood.items()}
        out["all"] = flag_rate(cal, thr, [r for v in ood.values() for r in v])
        return out

    rng = np.random.default_rng(args.seed)
    held, over, per_split = [], 0, []
    cal = None
    for _ in range(args.splits):
        idx = rng.permutation(len(ind))
        c_rows = [ind[i] for i in idx[: args.calibration]]
        t_rows = [ind[i] for i in idx[args.calibration :]]
        cal, thr = fit_conformal_gate(c_rows, COMBINED_COMPONENTS, args.rate, delta=args.delta)
        rate = flag_rate(cal, thr, t_rows)
        held.append(rate)
        over += rate > (cal.pac_bound or 1.0)
        per_split.append(ood_rates(cal, thr))
    assert cal is not None
    res: dict[str, Any] = {
        "rows": {"in": len(ind), **{k: len(v) for k, v in ood.items()}},
        "rate": args.rate,
        "random_splits": {
            "calibration": args.calibration,
            "splits": args.splits,
            "level": cal.level,
            "pac_bound": cal.pac_bound,
            "delta": args.delta,
            "held_out_in_flag_rate_mean": float(np.mean(held)),
            "held_out_in_flag_rate_p90": float(np.quantile(held, 0.9)),
            "share_of_splits_over_pac_bound": over / args.splits,
            "ood_flag_rate_mean": {
                k: float(np.mean([s[k] for s in per_split])) for k in per_split[0]
            },
        },
    }
    if fixed:
        c_rows = [r for r in fixed if not r.get("ood")]
        t_rows = [r for r in rows if not r.get("ood")]
        cal, thr = fit_conformal_gate(c_rows, COMBINED_COMPONENTS, args.rate, delta=args.delta)
        res["fixed_split"] = {
            "calibration": len(c_rows),
            "held_out": len(t_rows),
            "level": cal.level,
            "pac_bound": cal.pac_bound,
            "guarantee": cal.guarantee,
            "held_out_in_flag_rate": flag_rate(cal, thr, t_rows),
            "ood_flag_rate": ood_rates(cal, thr),
            "ood_auroc_combined": auroc(
                [combined_score(cal, r) or 0.0 for r in rows],
                [bool(r.get("ood")) for r in rows],
            ),
        }
    print(json.dumps(res, indent=1))
    if args.out:
        args.out.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
