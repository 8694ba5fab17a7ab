"""The members' prior: where each adapter starts, and what pulls it back.

peft's default LoRA init sets B = 0, so every member equals the base model at step 0 and
moves only where it is trained: far from the training data all members agree, and
member disagreement cannot tell "not learned" from "learned". Two options change that:

* ``--prior-init random``: every member's B matrices are drawn N(0, σ²) with the member's
  own seed, so the members differ from the base (and from each other) on every input. σ is
  not a raw number: it is solved for so that the mean per-token KL(member ‖ base) on a batch
  of training text equals ``--prior-kl`` nats (KL grows as σ² for small σ; two refinement
  steps reach the target within a few per cent). The draw is reproducible from the seed.
* ``--anchor``: λ Σ_k ‖θ_k − θ_k⁰‖² added to the loss, pulling each member's LoRA tensors
  toward its *own* initial draw θ_k⁰ (anchored ensembles, Pearce et al., AISTATS 2020)
  instead of toward zero (weight decay is off for the adapters).

Served adapters stay plain peft adapters: only the values of A and B differ.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ensemble.errors import ConfigError
from training.data import IGNORE

__all__ = ["anchor_penalty", "init_prior", "mean_kl_from_base", "snapshot"]

_PRIOR_SEED_OFFSET = 7919  # B draws use a stream apart from the A init (member_seed)


def _b_params(ens: Any, member: str) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in ens.peft.named_parameters() if f"lora_B.{member}." in n]


def mean_kl_from_base(ens: Any, batch: Mapping[str, torch.Tensor]) -> list[float]:
    """Per member: mean over real tokens of KL(q_member ‖ q_base), full vocabulary."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    real = mask.bool()
    out = []
    with torch.no_grad():
        with ens.peft.disable_adapter():
            base = torch.log_softmax(ens.peft(input_ids=ids, attention_mask=mask).logits, -1)
        ens._restore_trainable()
        for m in ens.members:
            ens.activate(m)
            lp = torch.log_softmax(ens.peft(input_ids=ids, attention_mask=mask).logits, -1)
            kl = (lp.exp() * (lp - base)).sum(-1)  # (B, T)
            out.append(float(kl[real].mean()))
    return out


def _draw(ens: Any, seed: int) -> dict[str, dict[str, torch.Tensor]]:
    """Unit-variance noise for every member's B tensors, from the member's own seed."""
    noise: dict[str, dict[str, torch.Tensor]] = {}
    for k, m in enumerate(ens.members):
        g = torch.Generator().manual_seed(seed + 1000 * k + _PRIOR_SEED_OFFSET)
        noise[m] = {
            n: torch.randn(p.shape, generator=g, dtype=torch.float32) for n, p in _b_params(ens, m)
        }
    return noise


def _set_scale(ens: Any, noise: dict[str, dict[str, torch.Tensor]], sigma: float) -> None:
    with torch.no_grad():
        for m, tensors in noise.items():
            for n, p in _b_params(ens, m):
                p.copy_((sigma * tensors[n]).to(p.dtype))


def init_prior(
    ens: Any, batch: Mapping[str, torch.Tensor], target_kl: float, seed: int, steps: int = 3
) -> dict[str, Any]:
    """Draw every member's B ~ N(0, σ²) with σ set for a mean KL from the base of
    ``target_kl`` nats per token on ``batch``; returns σ and the KL reached per member."""
    if target_kl <= 0:
        raise ConfigError(f"the prior's target KL must be > 0, got {target_kl}")
    noise = _draw(ens, seed)
    sigma = 1e-3
    kl = [0.0]
    for _ in range(steps):
        _set_scale(ens, noise, sigma)
        kl = mean_kl_from_base(ens, batch)
        mean = sum(kl) / len(kl)
        if mean <= 0 or not math.isfinite(mean):
            raise ConfigError(f"the prior's KL from the base is {mean} at σ = {sigma}")
        sigma *= min(10.0, math.sqrt(target_kl / mean))  # KL ∝ σ² for small σ
    _set_scale(ens, noise, sigma)
    kl = mean_kl_from_base(ens, batch)
    reached = sum(kl) / len(kl)
    if abs(reached - target_kl) > 0.25 * target_kl:
        raise ConfigError(
            f"--prior-kl {target_kl}: random B matrices reach a mean KL from the base of "
            f"{reached:.4g} nats at best (σ = {sigma:.3g}); choose a smaller --prior-kl"
        )
    return {"sigma": sigma, "target_kl": target_kl, "kl_per_member": [round(v, 5) for v in kl]}


def snapshot(ens: Any) -> dict[str, torch.Tensor]:
    """Every LoRA tensor now (the anchors θ⁰), detached copies."""
    return {n: p.detach().clone() for n, p in ens.peft.named_parameters() if "lora_" in n}


def anchor_penalty(
    ens: Any, anchors: Mapping[str, torch.Tensor], members: Sequence[str] | None = None
) -> torch.Tensor:
    """Σ over LoRA tensors of ‖θ − θ⁰‖² (all members, or ``members``), gradient 2(θ − θ⁰)."""
    total = torch.zeros((), dtype=torch.float32)
    marks = None if members is None else [f".{m}." for m in members]
    for n, p in ens.peft.named_parameters():
        if n in anchors and (marks is None or any(mark in n for mark in marks)):
            total = total + ((p - anchors[n].to(p.device)) ** 2).sum().to(total.device)
    return total


def calibration_batch(examples: Any, n: int, pad_id: int) -> dict[str, torch.Tensor]:
    """The first ``n`` training examples as a right-padded batch (prior KL target)."""
    rows = [examples[i] for i in range(min(n, len(examples)))]
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.tensor([r["input_ids"] + [pad_id] * (width - len(r["input_ids"])) for r in rows])
    mask = torch.tensor(
        [[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in rows]
    )
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.full_like(ids, IGNORE)}
