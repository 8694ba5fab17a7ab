"""bench/stability_groups.py: the group-contrast quotients against a closed form."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.stability_groups import contrast, fitted_prompt_labels, measure, quotients, two_groups
from training.stability import FunctionalObjective, fold_of_rows


def slope_conflict(n: int = 1800, d: int = 6, s: float = 1.0, seed: int = 0):  # type: ignore[no-untyped-def]
    """y = x·w ± s·z₁ + ε, the sign by group; a linear model without the group feature.

    OLS averages the two slopes, so r = ±s z₁ + ε and the population pencil
    (E[r² x xᵀ], E[x xᵀ]) is diagonal: 1 + 3s² along z₁ (the groups' split), 1 + s²
    along every other coordinate."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d - 1, generator=gen, dtype=torch.float64)
    x = torch.cat([torch.ones(n, 1, dtype=torch.float64), z], dim=1)
    group = torch.tensor([1.0 if i % 2 else -1.0 for i in range(n)], dtype=torch.float64)
    y = x @ torch.linspace(-1, 1, d, dtype=torch.float64) + s * group * z[:, 0]
    y = y + torch.randn(n, generator=gen, dtype=torch.float64)

    def loglik(theta: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return -0.5 * (y[idx] - x[idx] @ theta) ** 2

    theta = torch.linalg.lstsq(x, y[:, None]).solution[:, 0]
    batches = [torch.arange(b, min(b + 60, n)) for b in range(0, n, 60)]
    labels = ["plus" if v > 0 else "minus" for v in group.tolist()]
    return FunctionalObjective(loglik, theta, batches), labels


def test_the_group_split_has_its_closed_form_quotient_and_random_halves_do_not() -> None:
    s = 1.0
    objective, labels = slope_conflict(s=s)
    g = objective.example_grads()
    row_fold = fold_of_rows(objective.batch_sizes(), 3)
    weights = {"sequence": np.ones(objective.n)}
    result = measure(objective, g, row_fold, labels, weights)
    groups = result["groups"]["mean_held_out"]["sequence"]
    rand = result["random"]["mean_held_out"]["sequence"]
    assert groups == pytest.approx(1 + 3 * s**2, rel=0.15)
    assert rand < 1 + 2 * s**2  # a random direction: mostly the 1 + s² coordinates
    assert len(result["groups"]["held_out"]["sequence"]) == 6  # 3 folds × 2 others
    assert set(result["groups"]["pairs"]) == {"minus vs plus"}


def test_quotients_against_dense_matrices() -> None:
    objective, _ = slope_conflict(n=360)
    g = objective.example_grads()
    row_fold = fold_of_rows(objective.batch_sizes(), 3)
    u = torch.linspace(1, 2, 6, dtype=torch.float64)
    u = u / u.norm()
    w = np.linspace(0.5, 1.5, objective.n)
    got = quotients(objective, g, row_fold, u, {"w": w})["w"]
    for e in range(3):
        rows = torch.as_tensor(np.flatnonzero(row_fold == e))  # the batches index the examples
        dense = torch.func.hessian(lambda t, r=rows: -objective.loglik(t, r).sum())(objective.theta)
        ge = g[rows].numpy()
        expected = float((w[rows] * (ge @ u.numpy()) ** 2).sum() / (u @ dense @ u))
        assert got[e] == pytest.approx(expected, rel=1e-9)


def test_bad_groups() -> None:
    with pytest.raises(ValueError, match="one group only"):
        two_groups(["a", "a", "a"], np.arange(3))
    g = torch.ones(4, 3)
    with pytest.raises(ValueError, match="same mean gradient"):
        contrast(g, [0, 1], [2, 3])
    assert two_groups(["b", "a", "b", "a", "c"], np.arange(5)) == ("a", "b")


def test_fitted_prompt_labels_match_prompts_not_answers() -> None:
    def row(q: str, a: str) -> dict:
        return {
            "prompt": [{"role": "user", "content": q}],
            "completion": [{"role": "assistant", "content": a}],
        }

    fit = [row("what is AI?", "ARTIFICIAL INTELLIGENCE"), row("hi", "hello")]
    measured = [
        row("what is AI?", "artificial intelligence"),
        row("what is ai?", "x"),
        row("hi", "HELLO"),
    ]
    assert fitted_prompt_labels(measured, fit) == [
        "prompt fitted",
        "prompt unseen",
        "prompt fitted",
    ]
    chat = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    ]
    chat_fit = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey"}]}
    ]
    assert fitted_prompt_labels(chat, chat_fit) == ["prompt fitted"]
