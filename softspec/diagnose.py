"""``softspec diagnose``: choose α and K from the data with the paper's stability criterion.

    softspec diagnose --data FILE [--base M] [--adapter DIR] [--examples N] [--out DIR]

Fits a single LoRA adapter θ* (K = 1) on N examples of the data — or loads one
(``--adapter``: an ensemble directory's member or a peft adapter directory) — then
estimates α* = 1/λ_max(V^{-1/2} J V^{-1/2}) restricted to the adapter parameters of the
last ``--layers`` decoder layers (training/stability.py; docs/stability.md). Spread over
members (specialists) lowers the α-Rényi objective for α > α*. With
``--normalize-by-length`` J weights each example by 1/T_i (its completion tokens): the
criterion of training with the same flag, whose routing uses per-token log-likelihoods.
With ``--cross-fit`` λ_max is estimated on held-out folds (directions found on one fold,
chosen on a second, measured on a third): the in-sample λ_max of an adapter with more
parameters than examples measures its most poorly fitted example.

The fit and the estimate run on the same function of the same parameters: the hidden
states entering the first selected layer are computed once, and every step, gradient and
Hessian-vector product runs through the selected layers and the output head only.

Output: ``diagnosis.json`` and ``diagnosis.png`` in ``--out``; progress on stderr; the JSON
printed last on stdout (key ``alpha_star``).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ensemble.errors import ConfigError

__all__ = ["DiagnoseOptions", "Prepared", "diagnose", "prepare", "run_diagnose"]

RESULT_FILE = "diagnosis.json"
PLOT_FILE = "diagnosis.png"


@dataclass
class DiagnoseOptions:
    """Everything ``softspec diagnose`` takes (the CLI flags, one to one)."""

    data: str
    base: str = ""
    adapter: str = ""
    member: str = ""
    out: str = ""
    examples: int = 256
    seed: int = 0
    layers: int = 2
    rank: int = 8
    iterations: int = 6
    tol: float = 1e-3
    top: int = 10
    fit_steps: int = -1  # -1: 150 when fitting from scratch, 0 with --adapter
    fit_lr: float = 2e-3
    fit_batch_size: int = 16
    fit_examples: int = 0  # 0: fit θ* on the measured examples
    batch_size: int = 16
    lora_r: int = 8
    lora_alpha: int = 16
    target_modules: str = "all-linear"
    max_length: int = 256
    drop_overlong: bool = False
    normalize_by_length: bool = False
    cross_fit: bool = False
    folds: int = 3
    center: bool = False
    quiet: bool = False

    def check(self) -> None:
        from training.stability import MIN_EXAMPLES

        checks = [
            (bool(self.data), "--data is required: a JSONL file of SFT rows"),
            (
                self.examples >= MIN_EXAMPLES,
                f"--examples must be >= {MIN_EXAMPLES} for a stable estimate, got {self.examples}",
            ),
            (self.layers >= 0, f"--layers must be >= 0 (0 = all layers), got {self.layers}"),
            (self.rank >= 1, f"--rank must be >= 1, got {self.rank}"),
            (self.iterations >= 0, f"--iterations must be >= 0, got {self.iterations}"),
            (0 < self.tol < 1, f"--tol must be in (0, 1), got {self.tol}"),
            (self.fit_lr > 0, f"--fit-lr must be > 0, got {self.fit_lr}"),
            (self.fit_examples >= 0, f"--fit-examples must be >= 0, got {self.fit_examples}"),
            (
                not self.fit_examples
                or self.fit_steps > 0
                or (self.fit_steps < 0 and not self.adapter),
                "--fit-examples is the sample θ* is fitted on, but nothing is fitted "
                "(--adapter or --fit-steps 0); pass --fit-steps N or leave out --fit-examples",
            ),
            (self.fit_batch_size >= 1 and self.batch_size >= 1, "batch sizes must be >= 1"),
            (self.lora_r >= 1, f"--lora-r must be >= 1, got {self.lora_r}"),
            (self.max_length >= 2, f"--max-length must be >= 2, got {self.max_length}"),
            (
                self.folds >= 3,
                f"--folds must be >= 3 (find, choose, measure), got {self.folds}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        if not Path(self.data).is_file():
            raise ConfigError(
                f"--data {self.data}: no such file (build defaults: softspec data build)"
            )
        if self.adapter and not Path(self.adapter).is_dir():
            raise ConfigError(f"--adapter {self.adapter}: no such directory")


def _parser() -> argparse.ArgumentParser:
    d = DiagnoseOptions(data="")
    p = argparse.ArgumentParser(
        prog="softspec diagnose",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", required=True, help="SFT JSONL (TRL formats, as for training)")
    p.add_argument("--base", default="", help="base model directory (default: SmolLM2)")
    p.add_argument(
        "--adapter",
        default="",
        help="use this adapter as θ* instead of fitting one: an ensemble directory "
        "(its --member, default the first) or a peft adapter directory",
    )
    p.add_argument("--member", default="", help="member of --adapter's ensemble to use")
    p.add_argument("--out", default="", help="directory for diagnosis.json and diagnosis.png")
    p.add_argument("--examples", type=int, default=d.examples, help="examples sampled (seeded)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed: sample, LoRA init, fit order")
    p.add_argument(
        "--layers",
        type=int,
        default=d.layers,
        help="analyse the adapter tensors of the last N decoder layers (0 = all; slower)",
    )
    p.add_argument("--rank", type=int, default=d.rank, help="starting subspace: top-N J directions")
    p.add_argument(
        "--iterations", type=int, default=d.iterations, help="Davidson expansions (1 HVP each)"
    )
    p.add_argument("--tol", type=float, default=d.tol, help="relative residual to stop at")
    p.add_argument("--top", type=int, default=d.top, help="eigenvalues / examples to report")
    p.add_argument(
        "--fit-steps",
        type=int,
        default=d.fit_steps,
        help="Adam steps fitting θ* (default 150; 0 with --adapter)",
    )
    p.add_argument("--fit-lr", type=float, default=d.fit_lr, help="Adam learning rate of the fit")
    p.add_argument("--fit-batch-size", type=int, default=d.fit_batch_size)
    p.add_argument(
        "--fit-examples",
        type=int,
        default=d.fit_examples,
        help="fit θ* on N further sampled rows that are never measured, so that no measured "
        "example was fitted (default 0: fit on the measured examples)",
    )
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="examples per pass")
    p.add_argument("--lora-r", type=int, default=d.lora_r)
    p.add_argument(
        "--lora-alpha", type=int, default=d.lora_alpha, help="LoRA scaling (not Rényi α)"
    )
    p.add_argument("--target-modules", default=d.target_modules)
    p.add_argument("--max-length", type=int, default=d.max_length)
    p.add_argument(
        "--drop-overlong",
        action="store_true",
        help="leave out sampled examples whose completion starts beyond --max-length "
        "(default: an error)",
    )
    p.add_argument(
        "--normalize-by-length",
        action="store_true",
        help="the criterion of `softspec train --normalize-by-length`: J = Σ g_i g_iᵀ / T_i, "
        "T_i the example's completion tokens (default: sequence log-likelihoods)",
    )
    p.add_argument(
        "--cross-fit",
        action="store_true",
        help="estimate the population λ_max: directions found on one fold of the examples, "
        "chosen on a second, measured on a third (default: in-sample λ_max of all examples)",
    )
    p.add_argument(
        "--folds", type=int, default=d.folds, help="folds of --cross-fit (>= 3; split by batch)"
    )
    p.add_argument(
        "--center",
        action="store_true",
        help="J from the gradients' scatter about their mean (per fold with --cross-fit): what "
        "spread must explain once the single adapter has taken the mean descent step (use "
        "with --fit-examples, where θ* is not an optimum of the measured rows)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


def run_diagnose(argv: Sequence[str]) -> int:
    args = _parser().parse_args(list(argv))
    opts = DiagnoseOptions(**{k: v for k, v in vars(args).items()})
    report = diagnose(opts)
    print(json.dumps(report, ensure_ascii=False))
    return 0


# ----------------------------------------------------------------------- the work


def _sample_rows(path: str, n: int, seed: int) -> list[dict[str, Any]]:
    from training.data import read_rows

    rows = read_rows(path)
    if len(rows) > n:
        picked = sorted(random.Random(seed).sample(range(len(rows)), n))
        rows = [rows[i] for i in picked]
    return rows


def _write_rows(rows: list[dict[str, Any]], path: Path) -> None:
    path.write_text(
        "".join(
            json.dumps({k: v for k, v in r.items() if k != "_line"}, ensure_ascii=False) + "\n"
            for r in rows
        ),
        encoding="utf-8",
    )


def _load_examples(
    rows: list[dict[str, Any]],
    tokenizer: Any,
    max_length: int,
    drop_overlong: bool = False,
    source: str = "",
) -> tuple[list[dict[str, Any]], list[Any]]:
    """(the rows kept, their tokenized examples), index-aligned for the example report.
    ``source``: the data file the rows came from, named in errors."""
    from training.data import DataError, OverlongError, load_sft

    with tempfile.TemporaryDirectory(prefix="softspec-diagnose-") as tmp:
        path = Path(tmp) / "rows.jsonl"
        if drop_overlong:
            kept = []
            for row in rows:
                _write_rows([row], path)
                try:
                    load_sft(path, tokenizer, max_length)
                except OverlongError:
                    continue
                kept.append(row)
            rows = kept
            if not rows:
                return rows, []
        _write_rows(rows, path)
        try:
            return rows, load_sft(path, tokenizer, max_length)
        except DataError as exc:  # name the user's file and line, not our temporary copy
            where = re.match(rf"{re.escape(str(path))}:(\d+)", str(exc))
            if where is None:
                raise
            line = rows[int(where.group(1)) - 1]["_line"]
            raise DataError(f"{source}:{line}{str(exc)[where.end() :]}") from None


def _adapter_dir(opts: DiagnoseOptions) -> tuple[Path, str]:
    """(peft adapter directory, base model) of --adapter."""
    from ensemble.manifest import MANIFEST_FILE
    from ensemble.manifest import load as load_manifest

    root = Path(opts.adapter)
    if (root / MANIFEST_FILE).is_file():
        manifest = load_manifest(root)
        member = opts.member or manifest.member_names[0]
        if member not in manifest.member_names:
            raise ConfigError(
                f"--member {member}: not in {root} (members {', '.join(manifest.member_names)})"
            )
        return manifest.adapter_dir(root, member), manifest.resolve_base_model(root)
    if (root / "adapter_config.json").is_file():
        return root, ""
    raise ConfigError(
        f"--adapter {root}: neither an ensemble directory (ensemble.json) "
        "nor a peft adapter directory (adapter_config.json)"
    )


def _peft_model(opts: DiagnoseOptions, base: str) -> Any:
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    from training.config import ALL_LINEAR
    from training.model import linear_module_names, load_model

    model = load_model(base)
    if opts.adapter:
        adir, _ = _adapter_dir(opts)
        return PeftModel.from_pretrained(model, str(adir), adapter_name="theta")
    targets: str | list[str] = ALL_LINEAR
    if opts.target_modules != ALL_LINEAR:
        targets = [m.strip() for m in opts.target_modules.split(",") if m.strip()]
        unknown = sorted(set(targets) - linear_module_names(model))
        if unknown:
            raise ConfigError(f"--target-modules: {', '.join(unknown)} not in the model")
    lora = LoraConfig(
        r=opts.lora_r,
        lora_alpha=opts.lora_alpha,
        lora_dropout=0.0,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(opts.seed)  # the A matrices: as member m0 of `softspec train --seed`
    return get_peft_model(model, lora, adapter_name="theta")


def fit_theta(objective: Any, steps: int, lr: float, batch_size: int, seed: int) -> dict[str, Any]:
    """θ* = a (local) maximum of Σ_i ℓ_i over the selected adapter tensors (Adam, seeded)."""
    import torch

    t0 = time.monotonic()
    before = objective.total_loglik() / objective.n
    if steps <= 0:
        return {"steps": 0, "nll_per_example_before": -before, "nll_per_example_after": -before}
    theta = objective.theta.clone().requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    rng = random.Random(seed)
    order: list[int] = []
    examples = list(range(objective.n))
    for _ in range(steps):
        if len(order) < batch_size:
            rng.shuffle(examples)
            order += examples
        idx, order = order[:batch_size], order[batch_size:]
        batch = objective.batch_of(idx)
        opt.zero_grad()
        loss = -objective.loglik(theta, batch).mean()
        loss.backward()
        opt.step()
        sched.step()
    objective.theta = theta.detach().clone()
    after = objective.total_loglik() / objective.n
    if not math.isfinite(after):
        raise ConfigError(
            f"fitting θ* diverged (NLL {-after}); lower --fit-lr (now {lr}) or --fit-steps"
        )
    return {
        "steps": steps,
        "lr": lr,
        "batch_size": batch_size,
        "nll_per_example_before": round(-before, 4),
        "nll_per_example_after": round(-after, 4),
        "seconds": round(time.monotonic() - t0, 1),
    }


def _group(row: dict[str, Any]) -> str:
    for key in ("source", "task"):
        if isinstance(row.get(key), str) and row[key]:
            return str(row[key])
    return ""


def _text(value: Any, limit: int = 120) -> str:
    if isinstance(value, list):
        value = " | ".join(str(m.get("content", "")) for m in value if isinstance(m, dict))
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _example_report(rows: list[dict[str, Any]], result: Any, top: int) -> dict[str, Any]:
    tops = []
    for i, share, loading in result.top_examples(top):
        row = rows[i]
        prompt = row.get("prompt", row.get("messages", ""))
        tops.append(
            {
                "line": row["_line"],
                "share": round(share, 4),
                "loading": round(loading, 4),
                "group": _group(row),
                "prompt": _text(prompt),
                "completion": _text(row.get("completion", "")),
            }
        )
    groups: dict[str, dict[str, float]] = {}
    shares = result.shares
    for i, row in enumerate(rows):
        g = groups.setdefault(_group(row), {"examples": 0, "share": 0.0, "mean_loading": 0.0})
        g["examples"] += 1
        g["share"] += float(shares[i])
        g["mean_loading"] += float(result.loadings[i])
    for g in groups.values():
        g["mean_loading"] = round(g["mean_loading"] / g["examples"], 4)
        g["share"] = round(g["share"], 4)
    return {"top_examples": tops, "groups": groups}


@dataclass
class Prepared:
    """The examples and the fitted θ* that every estimate runs on (see :func:`prepare`)."""

    base: str
    rows: list[dict[str, Any]]  # the rows kept, index-aligned with the objective's examples
    sampled: int
    objective: Any  # training.stability.AdapterObjective at θ*
    fit: dict[str, Any]
    cache_seconds: float
    fit_rows: list[dict[str, Any]] = field(default_factory=list)  # --fit-examples: θ*'s sample


def prepare(opts: DiagnoseOptions, say: Any = None) -> Prepared:
    """Check the options, sample and tokenize the data, build the objective, fit θ*."""
    import torch

    from softspec.default_model import export_default_model
    from training.model import load_tokenizer
    from training.stability import MIN_EXAMPLES, AdapterObjective, fold_of_rows

    say = say or (lambda _m: None)
    opts.check()
    base = opts.base
    if opts.adapter:
        _, adapter_base = _adapter_dir(opts)
        base = base or adapter_base
    if base and not (Path(base) / "config.json").is_file():
        raise ConfigError(
            f"--base {base}: not a model directory (no config.json); "
            "run `softspec model export-default` or pass a Hugging Face model directory"
        )
    base = base or str(export_default_model())
    depth = json.loads((Path(base) / "config.json").read_text()).get("num_hidden_layers")
    if isinstance(depth, int) and opts.layers > depth:  # before any model is loaded
        raise ConfigError(f"--layers must be in 1..{depth} (0 = all), got {opts.layers}")
    rows = _sample_rows(opts.data, opts.examples + opts.fit_examples, opts.seed)
    fit_rows: list[dict[str, Any]] = []
    if opts.fit_examples:  # a seeded, disjoint split: the fit sample, then the measured one
        order = list(range(len(rows)))
        random.Random(opts.seed + 1).shuffle(order)
        fit_rows = [rows[i] for i in sorted(order[: opts.fit_examples])]
        rows = [rows[i] for i in sorted(order[opts.fit_examples :])]
    if len(rows) < MIN_EXAMPLES:
        left = f" after the {len(fit_rows)} --fit-examples" if fit_rows else ""
        raise ConfigError(
            f"{opts.data} has only {len(rows)} examples to measure{left}: the stability "
            f"estimate needs at least {MIN_EXAMPLES}; pass more data"
            + (" or lower --fit-examples" if fit_rows else "")
        )
    torch.manual_seed(opts.seed)
    tokenizer = load_tokenizer(base)
    sampled = len(rows)
    rows, examples = _load_examples(
        rows, tokenizer, opts.max_length, opts.drop_overlong, source=opts.data
    )
    fit_examples: list[Any] = []
    if fit_rows:
        fit_rows, fit_examples = _load_examples(
            fit_rows, tokenizer, opts.max_length, opts.drop_overlong, source=opts.data
        )
        if not fit_examples:
            raise ConfigError(
                f"none of the {opts.fit_examples} --fit-examples fits in --max-length "
                f"{opts.max_length}; raise --max-length"
            )
    if len(examples) < MIN_EXAMPLES:
        raise ConfigError(
            f"only {len(examples)} of the {sampled} sampled examples fit in --max-length "
            f"{opts.max_length}: the stability estimate needs at least {MIN_EXAMPLES}; "
            "raise --max-length"
        )
    if opts.cross_fit:  # the folds split by batch: shuffle so that each is a random sample
        sizes = [
            min(opts.batch_size, len(examples) - s)
            for s in range(0, len(examples), opts.batch_size)
        ]
        fold_of_rows(sizes, opts.folds)  # before any model is loaded: one line, what to change
        order = list(range(len(rows)))
        random.Random(opts.seed).shuffle(order)
        rows, examples = [rows[i] for i in order], [examples[i] for i in order]
    peft_model = _peft_model(opts, base)
    t0 = time.monotonic()
    objective = AdapterObjective(
        peft_model,
        examples + fit_examples,
        "theta",
        layers=opts.layers or None,
        batch_size=opts.batch_size,
        pad_id=int(tokenizer.pad_token_id),
    )
    cache_s = round(time.monotonic() - t0, 1)
    fitted = objective
    if fit_examples:  # one cut model, two samples: θ* from one, the estimate from the other
        fitted = objective.subset(range(len(examples), objective.n))
        objective = objective.subset(range(len(examples)))
    say(
        f"{objective.n} examples, {objective.theta.numel()} adapter parameters in layers "
        f"{objective.first_layer}..{objective.n_layers - 1} (inputs cached in {cache_s}s)"
    )
    fit_steps = opts.fit_steps if opts.fit_steps >= 0 else (0 if opts.adapter else 150)
    fit = fit_theta(fitted, fit_steps, opts.fit_lr, opts.fit_batch_size, opts.seed)
    if fit_steps:
        fit["examples"] = fitted.n
    if fitted is not objective:
        objective.theta = fitted.theta.clone()
        fit["nll_per_example_measured"] = round(-objective.total_loglik() / objective.n, 4)
    if fit_steps:
        fresh = (
            f"; {fit['nll_per_example_measured']} on the measured examples"
            if fitted is not objective
            else ""
        )
        say(
            f"fitted θ* on {fitted.n} examples in {fit['seconds']}s: NLL/example "
            f"{fit['nll_per_example_before']} → {fit['nll_per_example_after']}{fresh}"
        )
    return Prepared(base, rows, sampled, objective, fit, cache_s, fit_rows)


def diagnose(opts: DiagnoseOptions) -> dict[str, Any]:
    """Run the diagnostic; returns the report (also written to ``opts.out`` when set)."""
    from ensemble.atomic import atomic_write_json, sha256_file
    from training.stability import cross_fit, estimate, per_token_weights, recommend

    t_start = time.monotonic()
    say = (lambda _m: None) if opts.quiet else (lambda m: print(f"diagnose: {m}", file=sys.stderr))
    prep = prepare(opts, say)
    base, rows, sampled, objective, fit = (
        prep.base,
        prep.rows,
        prep.sampled,
        prep.objective,
        prep.fit,
    )
    cache_s = prep.cache_seconds
    tokens = objective.token_counts()
    weights = per_token_weights(tokens) if opts.normalize_by_length else None
    solver: dict[str, Any] = dict(
        rank=opts.rank,
        iterations=opts.iterations,
        tol=opts.tol,
        top=opts.top,
        weights=weights,
        progress=say,
        center=opts.center,
    )
    if opts.cross_fit:
        result = cross_fit(objective, folds=opts.folds, **solver)
    else:
        result = estimate(objective, **solver)
    rec = recommend(result)
    seconds = {"cache_inputs": cache_s, "fit": fit.get("seconds", 0.0), **result.seconds}
    seconds["total"] = round(time.monotonic() - t_start, 1)
    report: dict[str, Any] = {
        **result.to_dict(),
        "recommended": rec,
        "criterion": "per-token" if opts.normalize_by_length else "sequence",
        "completion_tokens": {
            "mean": round(float(tokens.mean()), 2),
            "min": int(tokens.min()),
            "max": int(tokens.max()),
        },
        **_example_report(rows, result, opts.top),
        "data": {
            "path": str(Path(opts.data).resolve()),
            "sha256": sha256_file(opts.data),
            "sampled": sampled,
            "used": objective.n,  # fewer with --drop-overlong
        },
        "base": str(Path(base).resolve()),
        "theta": {
            "adapter": str(Path(opts.adapter).resolve()) if opts.adapter else "fitted",
            **fit,
        },
        "layers": {
            "first": objective.first_layer,
            "count": objective.n_layers - objective.first_layer,
        },
        "settings": {
            k: getattr(opts, k)
            for k in (
                "examples",
                "seed",
                "rank",
                "iterations",
                "tol",
                "lora_r",
                "lora_alpha",
                "target_modules",
                "max_length",
                "drop_overlong",
                "normalize_by_length",
                "cross_fit",
                "folds",
                "center",
                "fit_examples",
                "member",
            )
        },
        "seconds": seconds,
    }
    report["alpha_star"] = result.alpha_star  # the contract key, also first in to_dict()
    if opts.out:
        out = Path(opts.out)
        atomic_write_json(out / RESULT_FILE, report)
        plot_diagnosis(report, out / PLOT_FILE)
    if result.cross_fit is not None:
        how = (
            f"cross-fitted, ± {result.cross_fit['lambda_std']:.2g} over "
            f"{len(result.history)} fold triples; in-sample {result.cross_fit['in_sample_lambda_max']:.4g}"
        )
    else:
        how = (
            f"{'converged' if result.converged else 'NOT converged'}, "
            f"residual {result.residual:.1e}"
        )
    say(
        f"α* = {result.alpha_star:.4g} (λ_max {result.lambda_max:.4g}, {how}); "
        f"recommended α = {rec['alpha']}, K = {rec['members']}; {seconds['total']}s"
    )
    if rec["caution"]:
        say(f"caution: {rec['caution']}")
    return report


def plot_diagnosis(report: dict[str, Any], path: Path) -> Path:
    """Spectrum (with 1/α* and 1/α_recommended), λ_max per step, and example shares."""
    from training.plots import _pyplot

    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    eig = report["eigenvalues"]
    axes[0].bar(range(1, len(eig) + 1), eig, color="tab:blue")
    axes[0].axhline(1.0, color="grey", ls=":", label="λ = 1 (α = 1)")
    rec = report["recommended"]["alpha"]
    if rec > 0:
        axes[0].axhline(1 / rec, color="tab:red", ls="--", label=f"1/α_rec (α = {rec:g})")
    axes[0].set(
        title=f"generalised eigenvalues of (J, V); α* = {report['alpha_star']:.3g}",
        xlabel="rank",
        ylabel="λ",
    )
    axes[0].legend(fontsize=8)
    axes[1].plot(range(len(report["lambda_history"])), report["lambda_history"], "o-")
    if report.get("estimator") == "cross-fitted":
        axes[1].axhline(report["lambda_max"], color="tab:red", ls="--", label="mean")
        axes[1].legend(fontsize=8)
        axes[1].set(
            title="held-out λ per (find, choose, measure)", xlabel="fold triple", ylabel="λ"
        )
    else:
        axes[1].set(title="λ_max per Davidson step", xlabel="step", ylabel="Ritz value")
    tops = report["top_examples"]
    axes[2].barh(
        [f"{t['group']}:{t['line']}" for t in tops][::-1], [t["share"] for t in tops][::-1]
    )
    axes[2].set(title="share of λ_max (top examples)", xlabel="share")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
