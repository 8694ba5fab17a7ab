"""The torch α-Rényi objective against ensemble.math and its closed-form gradient."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ensemble.math import renyi_loss, responsibilities
from training.loss import preference_logprob, renyi_objective


@pytest.mark.parametrize("alpha", [0.0, 1e-8, 0.3, 1.0, 3.0])
def test_value_matches_numpy_and_gradient_is_minus_w(alpha: float) -> None:
    rng = np.random.default_rng(1)
    logp_np = rng.uniform(-80, -1, size=(4, 6))
    lw_np = np.log(rng.dirichlet(np.ones(4)))
    logp = torch.tensor(logp_np, dtype=torch.float64, requires_grad=True)
    out = renyi_objective(logp, alpha, torch.tensor(lw_np))
    expected = renyi_loss(logp_np, alpha, lw_np)
    assert out.per_example.numpy() == pytest.approx(expected, rel=1e-12, abs=1e-6)
    assert out.loss.item() == pytest.approx(expected.mean(), abs=1e-6)
    w = responsibilities(logp_np, alpha, lw_np)
    assert out.resp.numpy() == pytest.approx(w, abs=1e-12)
    out.loss.backward()
    # ∂(mean ℓ_α)/∂log p_k,i = −w_k,i / B: the exact gradient of the true loss
    assert logp.grad is not None
    assert logp.grad.numpy() == pytest.approx(-w / 6, abs=1e-12)


def test_gradient_equals_autograd_of_the_true_loss() -> None:
    logp = torch.tensor([[-3.0, -9.0], [-5.0, -1.0], [-4.0, -4.5]], dtype=torch.float64)
    lw = torch.log(torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64))
    direct = logp.clone().requires_grad_(True)
    true = (-torch.logsumexp(lw[:, None] + 0.7 * direct, dim=0) / 0.7).mean()
    true.backward()
    ours = logp.clone().requires_grad_(True)
    renyi_objective(ours, 0.7, lw).loss.backward()
    assert ours.grad is not None and direct.grad is not None
    assert torch.allclose(ours.grad, direct.grad, atol=1e-12)


def test_dpo_likelihood_is_log_sigmoid() -> None:
    h = torch.tensor([-40.0, -1.0, 0.0, 2.0, 50.0], dtype=torch.float64)
    assert preference_logprob(h).numpy() == pytest.approx(-np.logaddexp(0, -h.numpy()))
