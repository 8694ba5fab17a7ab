"""Routing statistics of a trained ensemble: who explains which data (numpy side in ensemble/).

After training we score (a sample of) the training examples under every member and
compute the responsibilities with the ensemble's α and π. The summary goes into the
manifest's ``training.routing`` and the routing-matrix plot.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from ensemble.math import responsibilities
from ensemble.metrics import mutual_information, routing_matrix, specialisation

__all__ = ["routing_summary", "score_examples"]


@torch.no_grad()
def score_examples(
    batch_logp: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    dataset: Any,
    collate_fn: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]],
    batch_size: int,
    limit: int,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """(K, N) log-likelihoods of up to ``limit`` examples (a seeded sample) and their indices."""
    n = len(dataset)
    idx = np.arange(n)
    if limit and n > limit:
        idx = np.sort(np.random.default_rng(seed).choice(n, size=limit, replace=False))
    cols = []
    for start in range(0, len(idx), batch_size):
        rows = [dataset[int(i)] for i in idx[start : start + batch_size]]
        cols.append(batch_logp(collate_fn(rows)).double().cpu().numpy())
    return np.concatenate(cols, axis=1), idx


def routing_summary(
    logp: np.ndarray,
    alpha: float,
    log_weights: np.ndarray,
    groups: Sequence[str],
    members: Sequence[str],
) -> dict[str, Any]:
    """Responsibilities of scored examples summarised per member and per task/source group."""
    resp = responsibilities(logp, alpha, log_weights).T  # (N, K)
    spec = specialisation(resp)
    out: dict[str, Any] = {
        "examples": int(resp.shape[0]),
        "alpha": alpha,
        "mean_responsibility": dict(
            zip(members, np.round(resp.mean(axis=0), 6).tolist(), strict=True)
        ),
        "mean_routing_entropy": round(float(spec["mean_routing_entropy"]), 6),
        "mean_max_responsibility": round(float(spec["mean_max_responsibility"]), 6),
        "mean_logp": dict(zip(members, np.round(logp.mean(axis=1), 4).tolist(), strict=True)),
    }
    if any(groups):
        names, matrix = routing_matrix(list(groups), resp, list(members))
        out["groups"] = names
        out["matrix"] = np.round(matrix, 6).tolist()
        argmax = [members[i] for i in resp.argmax(axis=1)]
        out["group_member_mi"] = round(float(mutual_information(list(groups), argmax)), 6)
    return out
