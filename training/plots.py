"""PNG plots of a training run: loss, routing entropy, responsibilities, routing matrix."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["plot_routing_matrix", "plot_training_curves", "read_log"]


def read_log(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training_curves(rows: list[dict[str, Any]], out: Path, members: list[str]) -> Path | None:
    """loss / routing entropy / per-member responsibility against the step."""
    train = [r for r in rows if "loss" in r and "responsibility" in r]
    if not train:
        return None
    plt = _pyplot()
    steps = [r["step"] for r in train]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(steps, [r["loss"] for r in train], label="train ℓ_α")
    evals = [r for r in rows if "eval_loss" in r]
    if evals:
        axes[0].plot(
            [r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="val ℓ_α"
        )
    axes[0].set(title="α-Rényi loss (nats)", xlabel="step")
    axes[0].legend()
    axes[1].plot(steps, [r["routing_entropy"] for r in train])
    axes[1].set(title="routing entropy (nats)", xlabel="step")
    for k, name in enumerate(members):
        axes[2].plot(steps, [r["responsibility"][k] for r in train], label=name)
    axes[2].set(title="mean responsibility", xlabel="step", ylim=(0, 1))
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_routing_matrix(routing: dict[str, Any], out: Path) -> Path | None:
    """Heat map of mean responsibility per task/source (rows) and member (columns)."""
    if "matrix" not in routing:
        return None
    plt = _pyplot()
    groups, matrix = routing["groups"], routing["matrix"]
    members = list(routing["mean_responsibility"])
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(members), 0.8 + 0.32 * len(groups)))
    im = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(members)), members)
    ax.set_yticks(range(len(groups)), groups, fontsize=8)
    ax.set_title(f"routing (α={routing['alpha']}), MI={routing.get('group_member_mi', 0):.3f}")
    fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
