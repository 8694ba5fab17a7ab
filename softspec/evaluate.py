"""``softspec eval``: does the uncertainty work? Every prompt goes through the real gateway.

    softspec eval --ensemble DIR --data FILE [--out DIR] [--engine vllm|local] [--url URL]

Per prompt it records the answer, every uncertainty score of docs/uncertainty.md, the
responsibilities, and single-model baselines computed in the same run from one member
(``<ensemble>:<member>`` requests, no mixing):

* ``perplexity``: −(mean token log-prob of the member's greedy answer), the log of the
  answer's perplexity (lm-polygraph's ``Perplexity`` estimator);
* ``mean_token_entropy``: mean over the answer of the member's token entropy;

plus the ensemble's ``total`` entropy. Every score is "higher = more uncertain".

Metrics for every score: AUROC of out-of-distribution detection (rows with an ``ood``
label); where rows carry a gold answer (the ``completion``): accuracy with the match rule of
:func:`ensemble.metrics.answer_match`, AUROC of error detection, PRR (lm-polygraph's
normalisation) and the risk–coverage curve; the ECE of the mixture's answer probability
(the geometric mean of the mixture's token probabilities); routing by ``task``/``source``
and the mutual information between task and arg-max member. Output: ``report.md``,
``metrics.json``, ``predictions.jsonl`` and PNG plots.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ensemble import metrics as M
from ensemble.atomic import atomic_dir
from ensemble.calibration import DEFAULT_DELTA, fit_conformal_gate, fit_risk_control
from ensemble.errors import ConfigError, DataError
from ensemble.manifest import GateSpec
from ensemble.manifest import load as load_manifest
from ensemble.scores import (
    BASELINES,
    COMBINED_COMPONENTS,
    DISTANCE_COMPONENTS,
    EVAL_SCORES,
    GATE_SCORES,
    MIN_CALIBRATION,
    Score,
)
from softspec.serving import sigterm_as_interrupt, start_server, stop_server

__all__ = ["calibrate_gate", "compute_metrics", "evaluate_rows", "risk_gate", "run_eval"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="softspec eval",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--ensemble", type=Path, required=True)
    p.add_argument(
        "--data", type=Path, required=True, help="JSONL rows with prompt, ood label, completion"
    )
    p.add_argument(
        "--out", type=Path, default=None, help="report directory (default: <ensemble>/eval)"
    )
    p.add_argument("--engine", choices=["vllm", "local"], default="vllm")
    p.add_argument(
        "--url", default=None, help="a running gateway for this ensemble (else one is started)"
    )
    p.add_argument("--vllm-url", default=None, help="a running vLLM for the started gateway")
    p.add_argument(
        "--embed-url", default=None, help="a running embedder (vLLM pooling server of the base)"
    )
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--limit", type=int, default=0, help="evaluate only the first N rows")
    p.add_argument(
        "--baseline-member",
        default=None,
        help="member for the single-model baselines (default: first)",
    )
    p.add_argument(
        "--calibrate-gate",
        type=float,
        default=None,
        metavar="FPR",
        help="fit the 'combined' gate score from the in-distribution rows only (ood false or "
        "absent) and write it into the manifest, with the threshold that flags at most this "
        "fraction of in-distribution prompts (conformal p-values; no OOD data needed)",
    )
    p.add_argument(
        "--gate-risk",
        type=float,
        default=None,
        metavar="ERROR",
        help="instead: fit the gate threshold on --gate-risk-score so that the error rate "
        "among passed answers is at most ERROR with probability >= 1 - --gate-delta "
        "(Learn then Test on the rows with a gold answer) and write it into the manifest",
    )
    p.add_argument(
        "--gate-risk-score",
        default=Score.PROMPT_NOVELTY.value,
        choices=[s for s in GATE_SCORES if s != Score.COMBINED.value],
        help="score the --gate-risk threshold is fitted on (default: %(default)s)",
    )
    p.add_argument(
        "--gate-delta",
        type=float,
        default=DEFAULT_DELTA,
        metavar="DELTA",
        help="failure probability of the stated guarantees (default: %(default)s)",
    )
    return p


def _prompt(row: dict[str, Any], where: str) -> list[dict[str, str]]:
    prompt = row.get("prompt")
    if isinstance(prompt, str) and prompt.strip():
        return [{"role": "user", "content": prompt}]
    if (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(m, dict) and "content" in m for m in prompt)
    ):
        return [{"role": m.get("role", "user"), "content": m["content"]} for m in prompt]
    raise DataError(f"{where}: 'prompt' must be a string or a list of messages")


def _gold(row: dict[str, Any]) -> str | None:
    c = row.get("completion")
    if isinstance(c, str):
        return c
    if isinstance(c, list) and c and isinstance(c[-1], dict):
        return str(c[-1].get("content", ""))
    return None


def evaluate_rows(
    client: Any, rows: Sequence[dict[str, Any]], baseline: str, max_tokens: int
) -> list[dict[str, Any]]:
    """Query the gateway for every row; one ensemble request and one baseline request each."""
    from tqdm import tqdm

    model = client.ensemble_id()
    out = []
    for i, row in enumerate(tqdm(rows, desc="eval", unit="prompt", file=sys.stderr)):
        messages = _prompt(row, f"row {i + 1}")
        ens = client.chat(  # sequence mode: every score, sequence-level ones included
            messages, model=model, max_tokens=max_tokens, temperature=0, logprobs=True,
            decode="sequence",
        )  # fmt: skip
        single = client.chat(
            messages,
            model=client.member(baseline),
            max_tokens=max_tokens,
            temperature=0,
            logprobs=True,
            per_token=True,
        )
        u = ens.uncertainty
        mix_lp = (
            [t.logprob for t in ens.raw.choices[0].logprobs.content]
            if ens.raw.choices[0].logprobs
            else []
        )
        one_lp = (
            [t.logprob for t in single.raw.choices[0].logprobs.content]
            if single.raw.choices[0].logprobs
            else []
        )
        one_h = [t.total for t in single.uncertainty.per_token or []]
        gold = _gold(row)
        out.append({
            "prompt": messages[-1]["content"], "answer": ens.text, "gold": gold,
            "correct": M.answer_match(ens.text, gold) if gold else None,
            "ood": bool(row["ood"]) if "ood" in row else None,
            "group": row.get("task") or row.get("source") or "",
            "epistemic": u.epistemic, "aleatoric": u.aleatoric, "total": u.total,
            "sequence_epistemic": u.sequence_epistemic, "disagreement": u.disagreement,
            "novelty": u.novelty, "prompt_novelty": u.prompt_novelty,
            "prompt_distance": u.prompt_distance, "combined": u.combined,
            "perplexity": -float(np.mean(one_lp)) if one_lp else math.inf,
            "mean_token_entropy": float(np.mean(one_h)) if one_h else math.inf,
            "confidence": float(math.exp(np.mean(mix_lp))) if mix_lp else 0.0,
            "responsibilities": ens.responsibilities, "gate": ens.gate.decision,
            "baseline_answer": single.text,
        })  # fmt: skip
    return out


def _safe(fn: Any, *args: Any) -> float | None:
    try:
        v = float(fn(*args))
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def compute_metrics(preds: Sequence[dict[str, Any]], members: Sequence[str]) -> dict[str, Any]:
    """Every metric of the module docstring from the per-prompt records."""
    res: dict[str, Any] = {"n": len(preds), "scores": {}}
    ood = [p for p in preds if p["ood"] is not None]
    graded = [p for p in preds if p["correct"] is not None]
    for s in EVAL_SCORES:
        entry: dict[str, Any] = {}
        if any(p.get(s) is None for p in preds):  # not served (e.g. no gate calibration)
            res["scores"][s] = entry
            continue
        if ood:
            entry["ood_auroc"] = _safe(M.auroc, [p[s] for p in ood], [p["ood"] for p in ood])
        if graded:
            sc, err = [p[s] for p in graded], [0.0 if p["correct"] else 1.0 for p in graded]
            entry["error_auroc"] = _safe(M.auroc, sc, err)
            entry["prr"] = _safe(M.prediction_rejection_ratio, sc, err)
            entry["aurc"] = _safe(M.area_under_risk_coverage, sc, err)
        res["scores"][s] = entry
    if graded:
        res["accuracy"] = float(np.mean([p["correct"] for p in graded]))
        conf, corr = [p["confidence"] for p in graded], [float(p["correct"]) for p in graded]
        res["ece"] = M.expected_calibration_error(conf, corr)
    resp = np.array([[p["responsibilities"][m] for m in members] for p in preds])
    groups = [p["group"] for p in preds]
    if any(groups):
        names, matrix = M.routing_matrix(groups, resp, list(members))
        argmax = [members[i] for i in resp.argmax(axis=1)]
        res["routing"] = {"groups": names, "members": list(members), "matrix": matrix.tolist(),
                          "task_member_mi": M.mutual_information(groups, argmax)}  # fmt: skip
    best = max((s for s in EVAL_SCORES if res["scores"][s].get("ood_auroc") is not None),
               key=lambda s: res["scores"][s]["ood_auroc"], default=None)  # fmt: skip
    res["best_ood_score"] = best
    base = [
        res["scores"][b].get("ood_auroc")
        for b in BASELINES
        if res["scores"][b].get("ood_auroc") is not None
    ]
    for score in ("epistemic", Score.COMBINED.value):  # the member score and the gate score
        if base and res["scores"][score].get("ood_auroc") is not None:
            res[f"{score}_minus_best_baseline"] = res["scores"][score]["ood_auroc"] - max(base)
    decided = [p for p in ood if p.get("gate") is not None]
    if decided:  # what the served gate did, in and out of distribution
        res["gate_flag_rate"] = {
            kind: float(np.mean([p["gate"] != "pass" for p in rows]))
            for kind, rows in (
                ("in_distribution", [p for p in decided if not p["ood"]]),
                ("ood", [p for p in decided if p["ood"]]),
            )
            if rows
        }
    return res


def calibrate_gate(
    preds: Sequence[dict[str, Any]], rate: float, source: str = "", delta: float = DEFAULT_DELTA
) -> GateSpec:
    """The ``combined`` gate fitted on the in-distribution predictions only (``ood`` false or
    absent), with the threshold that flags at most ``rate`` of in-distribution prompts and
    its guarantee (ensemble/calibration.py)."""
    if not 0.0 < rate < 1.0:
        raise ConfigError(f"--calibrate-gate {rate}: the false-positive rate must be in (0, 1)")
    ind = [p for p in preds if not p.get("ood")]
    if len(ind) < MIN_CALIBRATION:
        raise DataError(
            f"--calibrate-gate needs at least {MIN_CALIBRATION} in-distribution rows "
            f"(ood false or absent), got {len(ind)}"
        )
    # prompt_distance when the gateway served it for every row (the ensemble has a reference)
    served = all(p.get(Score.PROMPT_DISTANCE.value) is not None for p in ind)
    components = DISTANCE_COMPONENTS if served else COMBINED_COMPONENTS
    try:
        cal, threshold = fit_conformal_gate(ind, components, rate, source=source, delta=delta)
    except ValueError as exc:
        raise DataError(f"--calibrate-gate {rate}: {exc}; give more rows or a larger rate") from exc
    return GateSpec(score_name=Score.COMBINED.value, threshold=threshold, calibration=cal)


def risk_gate(
    preds: Sequence[dict[str, Any]], target: float, score: str, delta: float = DEFAULT_DELTA
) -> GateSpec:
    """The gate whose threshold on ``score`` keeps the error among passed answers ≤ ``target``
    with probability ≥ 1 − ``delta``, fitted on the rows with a gold answer."""
    graded = [p for p in preds if p.get("correct") is not None and p.get(score) is not None]
    if not graded:
        raise DataError("--gate-risk needs rows with a gold answer (a 'completion'); none had one")
    try:
        rc = fit_risk_control(
            [float(p[score]) for p in graded],
            [not p["correct"] for p in graded],
            target,
            score_name=score,
            delta=delta,
        )
    except ValueError as exc:
        raise DataError(f"--gate-risk {target}: {exc}") from exc
    return GateSpec(score_name=score, threshold=rc.threshold, risk_control=rc)


def _report_md(metrics: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [
        "# Uncertainty evaluation",
        "",
        f"Ensemble `{meta['ensemble']}` on `{meta['data']}` ({metrics['n']} prompts).",
        "",
    ]
    lines += ["| score | OOD AUROC | error AUROC | PRR | AURC |", "|---|---|---|---|---|"]

    def f(v: float | None) -> str:
        return "–" if v is None else f"{v:.3f}"

    for s, e in metrics["scores"].items():
        lines.append(
            f"| {s} | {f(e.get('ood_auroc'))} | {f(e.get('error_auroc'))} | {f(e.get('prr'))} | {f(e.get('aurc'))} |"
        )
    lines.append("")
    if "accuracy" in metrics:
        lines.append(
            f"Accuracy {metrics['accuracy']:.3f} (answer_match rule); ECE of the mixture's answer probability {metrics['ece']:.3f}."
        )
    if metrics.get("best_ood_score"):
        lines.append(f"Best OOD score: **{metrics['best_ood_score']}**.")
    if "epistemic_minus_best_baseline" in metrics:
        lines.append(
            f"Epistemic OOD AUROC minus the best single-model baseline: {metrics['epistemic_minus_best_baseline']:+.3f}."
        )
    if "combined_minus_best_baseline" in metrics:
        lines.append(
            "Gate score (combined) OOD AUROC minus the best single-model baseline: "
            f"{metrics['combined_minus_best_baseline']:+.3f}."
        )
    if "gate_flag_rate" in metrics:
        rates = metrics["gate_flag_rate"]
        lines.append(
            "The served gate flagged "
            + ", ".join(f"{v:.1%} of {k.replace('_', '-')} prompts" for k, v in rates.items())
            + "."
        )
    if "routing" in metrics:
        lines.append(
            f"Task ↔ arg-max member mutual information: {metrics['routing']['task_member_mi']:.3f} nats."
        )
    lines += [
        "",
        "![ROC](roc.png) ![risk–coverage](risk_coverage.png)",
        "![reliability](reliability.png) ![routing](routing.png)",
        "",
    ]
    return "\n".join(lines)


def run_eval(argv: Sequence[str]) -> int:
    args = _parser().parse_args(list(argv))
    with sigterm_as_interrupt():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from clients import SoftSpecClient
    from ensemble.jsonl import read_jsonl
    from softspec.eval_plots import write_plots

    if args.calibrate_gate is not None and not 0.0 < args.calibrate_gate < 1.0:
        raise ConfigError(
            f"--calibrate-gate {args.calibrate_gate}: the false-positive rate must be in (0, 1)"
        )
    if args.gate_risk is not None and not 0.0 < args.gate_risk < 1.0:
        raise ConfigError(f"--gate-risk {args.gate_risk}: the target error must be in (0, 1)")
    if args.calibrate_gate is not None and args.gate_risk is not None:
        raise ConfigError("--calibrate-gate and --gate-risk fit the same threshold: give one")
    if not 0.0 < args.gate_delta < 1.0:
        raise ConfigError(f"--gate-delta {args.gate_delta}: must be in (0, 1)")
    manifest = load_manifest(args.ensemble)
    baseline = args.baseline_member or manifest.member_names[0]
    if baseline not in manifest.member_names:
        raise ConfigError(f"--baseline-member {baseline}: not a member ({manifest.member_names})")
    rows = read_jsonl(args.data)[: args.limit or None]
    if not rows:
        raise DataError(f"{args.data}: no rows to evaluate")
    for i, row in enumerate(rows):
        _prompt(row, f"{args.data}:{i + 1}")
    n_ind = sum(1 for r in rows if not r.get("ood"))
    if args.calibrate_gate is not None and n_ind < MIN_CALIBRATION:
        raise DataError(
            f"--calibrate-gate needs at least {MIN_CALIBRATION} in-distribution rows "
            f"(ood false or absent) in {args.data}, got {n_ind}"
        )
    proc = None
    url = args.url
    try:
        if url is None:
            extra = ["--vllm-url", args.vllm_url] if args.vllm_url else []
            extra += ["--embed-url", args.embed_url] if args.embed_url else []
            log = Path(args.ensemble).parent / f"{Path(args.ensemble).name}.eval-serve.log"
            proc, url = start_server(args.ensemble, args.engine, log, extra)
        preds = evaluate_rows(SoftSpecClient(url), rows, baseline, args.max_tokens)
    finally:
        stop_server(proc)
    metrics = compute_metrics(preds, manifest.member_names)
    out = args.out or args.ensemble / "eval"
    meta = {
        "ensemble": str(args.ensemble),
        "data": str(args.data),
        "baseline_member": baseline,
        "max_tokens": args.max_tokens,
    }
    with atomic_dir(out, replace=True) as tmp:
        (tmp / "metrics.json").write_text(json.dumps({"meta": meta, **metrics}, indent=2))
        (tmp / "predictions.jsonl").write_text(
            "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in preds)
        )
        write_plots(preds, metrics, tmp)
        (tmp / "report.md").write_text(_report_md(metrics, meta))
    print(_report_md(metrics, meta).split("\n\n![")[0])
    gate = None
    if args.calibrate_gate is not None:
        gate = calibrate_gate(preds, args.calibrate_gate, str(args.data), args.gate_delta)
        guarantee = gate.calibration.guarantee if gate.calibration else ""
    elif args.gate_risk is not None:
        gate = risk_gate(preds, args.gate_risk, args.gate_risk_score, args.gate_delta)
        guarantee = gate.risk_control.guarantee if gate.risk_control else ""
    if gate is not None:
        manifest.model_copy(update={"gate": gate}).save(args.ensemble)
        print(
            f"gate written to {args.ensemble / 'ensemble.json'}: {gate.score_name} > "
            f"{gate.threshold:.4g} is flagged; {guarantee}"
        )
    print(out)
    return 0
