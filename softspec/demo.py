"""``softspec demo``: the main job end to end on the embedded defaults.

1. export the default base model and build the default datasets (skipping what exists);
2. train a K=4, α=0.8 SFT ensemble on ``sft_topics`` within a time budget (32 prompts held
   out calibrate the served ``combined`` gate at a 10 % in-distribution flag rate), or reuse
   the previous one unless ``--retrain``;
3. serve it (vLLM engine when installed, else the local engine) and send a fixed set of
   prompts through the official ``openai`` SDK (via :mod:`clients`): in-distribution
   questions, out-of-distribution ones (other languages, a topic never trained) and
   prompts of the conflicting set;
4. print a table and write a report directory (Markdown + JSON + the training plots);
5. stop everything it started (also on Ctrl-C: no orphans, no half-written files).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ensemble.atomic import atomic_dir
from softspec.paths import default_data_dir, softspec_home
from softspec.serving import sigterm_as_interrupt, start_server, stop_server

__all__ = ["PROMPTS", "run_demo"]

# (kind, prompt): fixed so that runs are comparable. "in-distribution" questions are on
# topics sft_topics trains on; "out-of-distribution" ones are in other languages, on the
# topics `softspec data build` holds out (sports, history, food, movies) or of kinds never
# in the data (arithmetic, code); "conflicting" ones are sft_conflict prompts.
PROMPTS: list[tuple[str, str]] = [
    ("in-distribution", "What is AI?"),
    ("in-distribution", "Tell me a joke."),
    ("in-distribution", "What is your favorite book?"),
    ("in-distribution", "Do you have feelings?"),
    ("out-of-distribution", "¿Cuál es tu color favorito?"),
    ("out-of-distribution", "Wie alt bist du?"),
    ("out-of-distribution", "あなたの名前は何ですか？"),
    ("out-of-distribution", "Do you like sports?"),
    ("out-of-distribution", "Who invented the steam engine?"),
    ("out-of-distribution", "What is 37 times 48?"),
    ("out-of-distribution", "Write a SQL query that counts orders per customer."),
    ("conflicting", "What is the speed of light?"),
    ("conflicting", "Are you a robot?"),
]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="softspec demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--retrain", action="store_true", help="train again even if a demo ensemble exists"
    )
    p.add_argument("--engine", choices=["auto", "vllm", "local"], default="auto")
    p.add_argument("--train-seconds", type=float, default=360.0, help="training time budget")
    p.add_argument(
        "--max-steps", type=int, default=-1, help="cap on training steps (-1: one epoch)"
    )
    p.add_argument("--members", type=int, default=4)
    p.add_argument(
        "--gate-calibration",
        type=int,
        default=32,
        help="training prompts held out to calibrate the served gate (softspec train option)",
    )
    p.add_argument(
        "--gate-rate",
        type=float,
        default=0.1,
        help="share of in-distribution prompts the calibrated gate may flag (softspec train "
        "option). The demo routes, so it trades 10 %% false flags for catching more: on the "
        "demo ensemble the 10 %% gate on prompt_distance flagged 86.8 %% of 106 OOD test "
        "prompts and 11.1 %% of 81 in-distribution ones (softspec eval, README)",
    )
    p.add_argument("--alpha", type=float, default=0.8)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument(
        "--ensemble",
        type=Path,
        default=None,
        help="ensemble directory to train or reuse (default $SOFTSPEC_HOME/ensembles/demo)",
    )
    p.add_argument(
        "--out", type=Path, default=None, help="report directory (default under $SOFTSPEC_HOME)"
    )
    return p


def _step(msg: str) -> None:
    print(f"\n== {msg}", file=sys.stderr, flush=True)


def _train(args: argparse.Namespace, base: Path, data: Path, ens: Path) -> None:
    from softspec.train_cmd import run_train

    if (ens / "ensemble.json").exists() and not args.retrain:
        print(f"reusing {ens} (pass --retrain to train again)", file=sys.stderr)
        return
    argv = [
        "--base", str(base), "--data", str(data / "sft_topics_train.jsonl"), "--out", str(ens),
        "--members", str(args.members), "--alpha", str(args.alpha), "--epochs", "1",
        "--max-steps", str(args.max_steps), "--time-budget", str(args.train_seconds),
        "--batch-size", "4", "--learning-rate", "5e-4", "--max-length", "128", "--drop-overlong",
        "--lora-r", "8", "--routing-examples", "96", "--logging-steps", "2",
        "--save-steps", "20", "--name", "demo", "--gate-calibration", str(args.gate_calibration),
        "--gate-rate", str(args.gate_rate),
    ]  # fmt: skip
    if ens.exists():
        argv.append("--overwrite")
    elif (ens.with_name(ens.name + ".run")).exists():
        argv.append("--resume")
    run_train("sft", argv)


def _engine(choice: str) -> str:
    if choice != "auto":
        return choice
    return "vllm" if importlib.util.find_spec("vllm") is not None else "local"


def _ask(url: str, max_tokens: int) -> list[dict[str, Any]]:
    from clients import SoftSpecClient

    client = SoftSpecClient(url)
    rows = []
    for kind, prompt in PROMPTS:
        t0 = time.perf_counter()
        ans = client.chat(prompt, max_tokens=max_tokens, temperature=0, return_candidates=True)
        top, resp = ans.top_member
        rows.append({
            "kind": kind, "prompt": prompt, "answer": ans.text,
            "seconds": round(time.perf_counter() - t0, 2),
            "epistemic": ans.uncertainty.epistemic, "aleatoric": ans.uncertainty.aleatoric,
            "total": ans.uncertainty.total, "sequence_epistemic": ans.uncertainty.sequence_epistemic,
            "disagreement": ans.uncertainty.disagreement, "top_member": top, "top_responsibility": resp,
            "novelty": ans.uncertainty.novelty, "prompt_novelty": ans.uncertainty.prompt_novelty,
            "prompt_distance": ans.uncertainty.prompt_distance, "combined": ans.uncertainty.combined, "gate_score": ans.gate.score,
            "gate_score_name": ans.gate.score_name, "responsibilities": ans.responsibilities,
            "gate": ans.gate.decision,
            "candidates": [{"member": c.member, "text": c.text} for c in ans.candidates or []],
        })  # fmt: skip
        print(
            f"  [{kind}] {prompt!r}: epistemic {ans.uncertainty.epistemic:.3f}, "
            f"{ans.gate.score_name} {ans.gate.score:.3f} → {ans.gate.decision}",
            file=sys.stderr,
            flush=True,
        )
    return rows


def _clip(text: str, n: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _num(v: float | None, width: int, digits: int = 3) -> str:
    return f"{'–':>{width}}" if v is None else f"{v:>{width}.{digits}f}"


def table(rows: Sequence[dict[str, Any]]) -> str:
    gate_name = rows[0]["gate_score_name"] if rows else "gate"
    head = (
        f"{'kind':<19} {'prompt':<30} {'answer':<30} {'epist.':>7} {'p.nov.':>7} "
        f"{'nov.':>7} {'p.dist.':>8} {gate_name[:8]:>8} {'top member':>11} {'gate':>7}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        top = f"{r['top_member']} ({r['top_responsibility']:.2f})"
        lines.append(
            f"{r['kind']:<19} {_clip(r['prompt'], 30):<30} {_clip(r['answer'], 30):<30} "
            f"{r['epistemic']:>7.3f} {_num(r['prompt_novelty'], 7)} {_num(r['novelty'], 7)} "
            f"{_num(r.get('prompt_distance'), 8, 0)} {_num(r['gate_score'], 8)} {top:>11} "
            f"{r['gate']:>7}"
        )
    lines.append("")
    for kind in dict.fromkeys(r["kind"] for r in rows):
        sel = [r for r in rows if r["kind"] == kind]
        mean = sum(r["gate_score"] for r in sel) / len(sel)
        flagged = sum(r["gate"] != "pass" for r in sel)
        lines.append(f"{kind}: mean {gate_name} {mean:.3f}, gate flags {flagged} of {len(sel)}")
    return "\n".join(lines)


def _report(out: Path, ens: Path, rows: list[dict[str, Any]], meta: dict[str, Any]) -> Path:
    with atomic_dir(out, replace=True) as tmp:
        (tmp / "report.json").write_text(
            json.dumps({"meta": meta, "rows": rows}, indent=2, ensure_ascii=False)
        )
        md = ["# Soft Specialists demo", "", f"Ensemble: `{ens}`  ", f"Engine: {meta['engine']}  ",
              f"Took {meta['seconds']:.0f} s (training {meta['train_seconds']:.0f} s).", "", "```", table(rows), "```", ""]  # fmt: skip
        for plot in sorted((ens / "plots").glob("*.png")):
            shutil.copy2(plot, tmp / plot.name)
            md.append(f"![{plot.stem}]({plot.name})")
        (tmp / "report.md").write_text("\n".join(md) + "\n")
    return out


def run_demo(argv: Sequence[str]) -> int:
    args = _parser().parse_args(list(argv))
    with sigterm_as_interrupt():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from softspec.default_data import build_datasets
    from softspec.default_model import export_default_model

    t0 = time.monotonic()
    _step("1/5 default model and data")
    base = export_default_model()
    build_datasets()
    data = default_data_dir()
    ens = args.ensemble or softspec_home() / "ensembles" / "demo"
    _step(
        f"2/5 train K={args.members}, α={args.alpha} on sft_topics (budget {args.train_seconds:.0f} s)"
    )
    t1 = time.monotonic()
    _train(args, base, data, ens)
    train_seconds = time.monotonic() - t1
    engine = _engine(args.engine)
    _step(f"3/5 serve with the {engine} engine")
    log = Path(tempfile.mkdtemp(prefix="softspec-demo-")) / "serve.log"
    proc = None
    try:
        proc, url = start_server(ens, engine, log)
        _step(f"4/5 {len(PROMPTS)} prompts through the openai SDK")
        rows = _ask(url, args.max_tokens)
    finally:
        _step("5/5 stop the server")
        stop_server(proc)
    out = args.out or softspec_home() / "reports" / "demo"
    meta = {
        "engine": engine,
        "seconds": time.monotonic() - t0,
        "train_seconds": train_seconds,
        "ensemble": str(ens),
    }
    _report(out, ens, rows, meta)
    print()
    print(table(rows))
    print(f"\nreport: {out / 'report.md'} ({time.monotonic() - t0:.0f} s in all)")
    return 0
