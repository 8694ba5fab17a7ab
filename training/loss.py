"""The α-Rényi objective in torch: exact gradients through stop-gradient responsibilities.

For members k with sequence log-likelihoods ``logp`` (K, B) (docs/math.md):

    ℓ_α = −(1/α) logsumexp_k(log π_k + α log p_k)        (the value, per example)
    w_k = softmax_k(log π_k + α log p_k)                  (responsibilities, no gradient)
    ∂ℓ_α/∂θ_k = −w_k ∂log p_k/∂θ_k   ⇐   surrogate = −Σ_k stopgrad(w_k) log p_k

The returned ``loss`` has the *value* of ℓ_α (computed by :func:`ensemble.math.renyi_loss`,
the single definition, in float64) and the *gradient* of the surrogate, so the Trainer logs
the true loss while back-propagating the exact gradient.

For DPO the per-member likelihood is σ(h_k): pass ``logp = log σ(h_k)`` (see
:func:`preference_logprob`), and everything above holds unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ensemble.math import renyi_loss

__all__ = ["RenyiOutput", "preference_logprob", "renyi_objective"]


@dataclass
class RenyiOutput:
    loss: torch.Tensor  # scalar: value = mean ℓ_α, gradient = mean surrogate
    per_example: torch.Tensor  # (B,) ℓ_α values, detached
    resp: torch.Tensor  # (K, B) responsibilities w, detached


def renyi_objective(
    logp: torch.Tensor,
    alpha: float,
    log_weights: torch.Tensor,
    routing_logp: torch.Tensor | None = None,
) -> RenyiOutput:
    """α-Rényi loss over a batch.

    Args:
        logp: (K, B) member log-likelihoods, with gradient.
        alpha: α >= 0.
        log_weights: (K,) log π.
        routing_logp: (K, B) log-likelihoods used for the responsibilities and the logged
            value, when they differ from ``logp``: ``--normalize-by-length`` passes per-token
            means, so α acts per token; the gradient is then that of ℓ_α on per-token
            log-likelihoods scaled by each example's length. Default ``logp``.
    """
    k, b = logp.shape
    assert log_weights.shape == (k,), (log_weights.shape, k)
    lw = log_weights.detach().to(logp.dtype)[:, None]  # (K, 1)
    route = (logp if routing_logp is None else routing_logp).detach()
    # (K, B) responsibilities; exactly π at α = 0
    resp = lw.exp().expand(k, b) if alpha == 0.0 else torch.softmax(lw + alpha * route, dim=0)
    surrogate = -(resp * logp).sum(dim=0)  # (B,), gradient −w_k ∇log p_k
    values = renyi_loss(
        route.double().cpu().numpy(), alpha, log_weights.detach().double().cpu().numpy()
    )
    per_example = torch.as_tensor(values, dtype=logp.dtype, device=logp.device).reshape(b)
    mean_surrogate = surrogate.mean()
    loss = mean_surrogate + (per_example.mean() - mean_surrogate).detach()
    return RenyiOutput(loss=loss, per_example=per_example, resp=resp.detach())


def preference_logprob(margin: torch.Tensor) -> torch.Tensor:
    """log σ(h): the log-likelihood of a preference under DPO margin h (stable)."""
    return F.logsigmoid(margin)
