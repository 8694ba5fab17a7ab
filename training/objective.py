"""The α-Rényi objective of one batch, with a coupled or a member-sequential backward pass.

For K members the gradient of ℓ_α with respect to member k's LoRA tensors is

    ∂ℓ_α/∂θ_k = −(1/B) Σ_i w_k,i ∂log p_k,i/∂θ_k    (+ member k's anchor term)

with responsibilities w = softmax_k(log π_k + α log p_k) that carry no gradient (docs/math.md).
Two ways to compute it (``--member-memory``):

* **coupled**: one forward pass over all K members, then one backward pass through the
  surrogate −Σ_k w_k log p_k. All K members' activations are alive at once.
* **sequential**: a no-grad pass gives every member's log p_k (for DPO, log σ(h_k)), hence w;
  then member k alone runs forward + backward of −w_k log p_k (plus its anchor term), and its
  activations are freed before member k+1 starts. Peak activation memory is one member's;
  the cost is K − 1 extra forward passes without gradient (the last member's pass keeps its
  graph and is back-propagated first).
  The random state (LoRA dropout) before each member's no-grad forward is restored for its
  gradient forward, so both modes see the same dropout masks and give the same gradient.

Everything per member in the objective is separable: prompt-loss weighting changes log p_k
only, the anchor penalty λ‖θ_k − θ_k⁰‖² involves θ_k only, learned mixture weights π are
updated from the detached log-likelihoods after w is computed — in both modes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from training.config import DPOConfig, TrainConfig
from training.dpo import ReferenceCache, margins_from, reference_for
from training.loss import RenyiOutput, preference_logprob, renyi_objective
from training.prior import anchor_penalty, snapshot

__all__ = ["EnsembleObjective", "Responsibilities"]


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


@dataclass
class Responsibilities:
    """The no-grad pass of a sequential step: the objective's value and w, per member."""

    out: RenyiOutput  # loss value (no gradient), per-example ℓ_α, w (K, B)
    logp: torch.Tensor  # (K, B) detached log-likelihoods the objective mixes
    routing: torch.Tensor | None  # (K, B) those used for w when they differ (per token)
    rng: list[tuple[torch.Tensor, torch.Tensor | None]]  # random state before each member
    rng_after: tuple[torch.Tensor, torch.Tensor | None]
    last: torch.Tensor | None  # (1, B) the last member's log p, with its graph (see below)


class EnsembleObjective:
    """Member log-likelihoods (SFT or DPO) and the two ways to back-propagate ℓ_α."""

    def __init__(self, config: TrainConfig, ens: Any) -> None:
        self.config = config
        self.dpo = isinstance(config, DPOConfig)
        # DPO reference log-likelihoods never change: computed once per example, then reused
        self.reference_cache = ReferenceCache() if self.dpo else None
        # anchored members: each member's LoRA tensors as drawn (re-drawn identically from
        # the seed on --resume, before the checkpoint is loaded)
        self.anchors = snapshot(ens) if config.anchor else {}

    # -- log-likelihoods -----------------------------------------------------------

    def member_logp(
        self,
        model: Any,
        ens: Any,
        inputs: dict[str, torch.Tensor],
        members: Sequence[str] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(k, B) log-likelihoods the objective mixes, and those used for w (or None).

        ``model`` is what runs the forward pass (the DDP wrapper in a coupled step), ``ens``
        the :class:`~training.model.EnsembleLM` itself; ``members`` a subset, in order.
        """
        batch = {k: inputs[k] for k in ("input_ids", "attention_mask", "labels")}
        if self.dpo:
            policy = model(**batch, members=members).logp  # (k, 2B)
            ref = reference_for(ens, inputs, self.reference_cache, members)
            beta = self.config.beta  # type: ignore[attr-defined]
            return preference_logprob(margins_from(policy, ref, beta)), None
        scores = model(**batch, members=members, prompt_weight=self.config.prompt_loss_weight)
        if self.config.normalize_by_length:
            return scores.logp, scores.logp / scores.n_tokens.clamp(min=1).to(scores.logp.dtype)
        return scores.logp, None

    def anchor_term(self, ens: Any, members: Sequence[str] | None = None) -> torch.Tensor | None:
        """λ Σ ‖θ − θ⁰‖² over ``members`` (all by default), or None without --anchor."""
        if not self.anchors:
            return None
        return self.config.anchor * anchor_penalty(ens, self.anchors, members)

    # -- coupled ---------------------------------------------------------------------

    def coupled(
        self, model: Any, ens: Any, inputs: dict[str, torch.Tensor]
    ) -> tuple[RenyiOutput, torch.Tensor, torch.Tensor | None]:
        """All members in one graph: (ℓ_α output with gradient, logp, routing)."""
        logp, routing = self.member_logp(model, ens, inputs)
        return renyi_objective(logp, self.config.alpha, ens.log_weights, routing), logp, routing

    # -- member-sequential -----------------------------------------------------------

    def responsibilities(self, ens: Any, inputs: dict[str, torch.Tensor]) -> Responsibilities:
        """Every member's log p_k, one member at a time, hence w.

        Members 0..K−2 run without gradient; the last member runs with it and keeps its
        graph (the only graph alive), so :meth:`member_backward` starts with it and runs
        K − 1 more forward passes, not K: the no-grad pass costs K − 1 forwards.
        """
        device = inputs["input_ids"].device
        rng, rows, routes = [], [], []
        last = None
        for k, name in enumerate(ens.members):
            rng.append(_rng_state(device))
            with torch.set_grad_enabled(k == len(ens.members) - 1 and torch.is_grad_enabled()):
                logp, routing = self.member_logp(ens, ens, inputs, [name])
            if logp.requires_grad:
                last = logp
            rows.append(logp.detach())
            routes.append(None if routing is None else routing.detach())
        rng_after = _rng_state(device)
        logp = torch.cat(rows)
        routing = None if routes[0] is None else torch.cat(routes)  # type: ignore[arg-type]
        with torch.no_grad():
            out = renyi_objective(logp, self.config.alpha, ens.log_weights, routing)
        return Responsibilities(out, logp, routing, rng, rng_after, last)

    def member_backward(
        self,
        ens: Any,
        inputs: dict[str, torch.Tensor],
        resp: Responsibilities,
        backward: Callable[[torch.Tensor], None],
    ) -> torch.Tensor:
        """Member by member: forward with gradient, ``backward(−mean_i w_k,i log p_k,i [+ anchor
        term])``, free. Returns the anchor penalty's value (0 without --anchor)."""
        device = inputs["input_ids"].device
        penalty = torch.zeros((), dtype=torch.float64)
        w = resp.out.resp
        k_last = len(ens.members) - 1
        order = [k_last, *range(k_last)] if resp.last is not None else range(k_last + 1)
        for k in order:
            name = ens.members[k]
            if k == k_last and resp.last is not None:
                logp, resp.last = resp.last, None  # its graph is already there
            else:
                _set_rng_state(resp.rng[k], device)  # the same dropout masks as before
                logp, _ = self.member_logp(ens, ens, inputs, [name])  # (1, B), with gradient
            loss = -(w[k : k + 1].to(logp.dtype) * logp).sum(dim=0).mean()
            anchor = self.anchor_term(ens, [name])
            if anchor is not None:
                loss = loss + anchor.to(loss.device, loss.dtype)
                penalty += float(anchor.detach())
            backward(loss)
            del logp, loss, anchor  # this member's activations go before the next one's
        _set_rng_state(resp.rng_after, device)
        return penalty


def sequential_step(
    objective: EnsembleObjective,
    ens: Any,
    inputs: dict[str, torch.Tensor],
    backward: Callable[[torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, Responsibilities]:
    """One member-sequential step without a Trainer (tests, bench): (loss value, pass)."""
    resp = objective.responsibilities(ens, inputs)
    penalty = objective.member_backward(ens, inputs, resp, backward or torch.Tensor.backward)
    return resp.out.per_example.mean() + penalty.to(resp.out.loss.dtype), resp
