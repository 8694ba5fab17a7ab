"""PNG plots of an evaluation: ROC curves, risk–coverage, reliability diagram, routing map."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ensemble import metrics as M
from ensemble.scores import EVAL_SCORES

__all__ = ["write_plots"]


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plots(preds: Sequence[dict[str, Any]], metrics: dict[str, Any], out: Path) -> list[Path]:
    """Write every plot the data allows into ``out``; returns the files written."""

    plt = _plt()
    written = []
    # scores this server did not serve (e.g. `combined` without a gate calibration) are None
    scores = [s for s in EVAL_SCORES if all(p.get(s) is not None for p in preds)]
    ood = [p for p in preds if p["ood"] is not None]
    if ood and len({p["ood"] for p in ood}) == 2:
        fig, ax = plt.subplots(figsize=(5.5, 5))
        for s in scores:
            fpr, tpr, _ = M.roc_curve([p[s] for p in ood], [p["ood"] for p in ood])
            auc = metrics["scores"][s].get("ood_auroc")
            ax.plot(fpr, tpr, label=f"{s} ({auc:.3f})" if auc is not None else s)
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set(
            xlabel="false positive rate (in-distribution flagged)",
            ylabel="true positive rate (OOD flagged)",
            title="OOD detection",
        )
        ax.legend(fontsize=7)
        written.append(_save(fig, out / "roc.png", plt))
    graded = [p for p in preds if p["correct"] is not None]
    if graded:
        err = [0.0 if p["correct"] else 1.0 for p in graded]
        fig, ax = plt.subplots(figsize=(5.5, 4.5))
        for s in scores:
            cov, risk = M.risk_coverage_curve([p[s] for p in graded], err)
            ax.plot(cov, risk, label=s)
        ax.set(xlabel="coverage", ylabel="risk (error rate of kept answers)", title="risk–coverage")
        ax.legend(fontsize=7)
        written.append(_save(fig, out / "risk_coverage.png", plt))
        diag = M.reliability_diagram(
            [p["confidence"] for p in graded], [float(p["correct"]) for p in graded]
        )
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        centers = [
            (lo + hi) / 2 for lo, hi in zip(diag["bin_lower"], diag["bin_upper"], strict=True)
        ]
        ax.bar(centers, diag["accuracy"], width=0.09, alpha=0.7, label="accuracy")
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set(
            xlabel="mixture answer probability",
            ylabel="accuracy",
            title=f"reliability (ECE {metrics.get('ece', 0):.3f})",
        )
        written.append(_save(fig, out / "reliability.png", plt))
    routing = metrics.get("routing")
    if routing:
        fig, ax = plt.subplots(
            figsize=(1.5 + 0.8 * len(routing["members"]), 1 + 0.3 * len(routing["groups"]))
        )
        im = ax.imshow(routing["matrix"], vmin=0, vmax=1, aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(routing["members"])), routing["members"])
        ax.set_yticks(range(len(routing["groups"])), routing["groups"], fontsize=7)
        ax.set_title(f"responsibility by task (MI {routing['task_member_mi']:.3f})")
        fig.colorbar(im, ax=ax, fraction=0.05)
        written.append(_save(fig, out / "routing.png", plt))
    return written


def _save(fig: Any, path: Path, plt: Any) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
