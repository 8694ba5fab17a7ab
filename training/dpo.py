"""α-Rényi DPO: the per-member preference likelihood σ(h_k) and its reference model.

For a preference (x, y_w, y_l) and member k (docs/math.md, DPO form):

    h_k = β [ (log p_k(y_w|x) − log p_ref(y_w|x)) − (log p_k(y_l|x) − log p_ref(y_l|x)) ]
    ℓ_α^DPO = −(1/α) log Σ_k π_k σ(h_k)^α,    w_k = softmax_k(log π_k + α log σ(h_k))

so the SFT machinery applies unchanged with log p_k replaced by log σ(h_k). The reference is
the base model with adapters disabled, or (``--init-from``) member k's own SFT adapter, kept
frozen as ``ref_<member>``; reference log-likelihoods never change, so they are computed
without gradient once per example and cached.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ensemble.errors import ConfigError
from ensemble.manifest import ADAPTER_FILE
from ensemble.manifest import load as load_manifest
from training.config import DPOConfig

__all__ = [
    "REF_PREFIX",
    "ReferenceCache",
    "dpo_margins",
    "init_from_sft",
    "margins_from",
    "prepare_dpo",
    "reference_for",
    "split_pairs",
]

REF_PREFIX = "ref_"


def init_from_sft(cfg: DPOConfig) -> None:
    """Take K and the LoRA shape from the SFT ensemble the DPO run starts from."""
    if not cfg.init_from:
        return
    sft = load_manifest(cfg.init_from)
    if sft.objective != "sft":
        raise ConfigError(
            f"--init-from {cfg.init_from}: a {sft.objective} ensemble, not an SFT one"
        )
    sft_base = sft.resolve_base_model(Path(cfg.init_from))
    if cfg.base and Path(sft_base).resolve() != Path(cfg.base).resolve():
        raise ConfigError(
            f"--init-from {cfg.init_from} was trained on base {sft_base}, not {cfg.base}; "
            f"pass --base {sft_base}"
        )
    if len(sft.members) != cfg.members:
        raise ConfigError(
            f"--init-from {cfg.init_from} has {len(sft.members)} members; pass --members {len(sft.members)}"
        )
    cfg.lora_r = sft.lora.r
    cfg.lora_alpha = int(sft.lora.alpha)
    cfg.target_modules = ",".join(sft.lora.target_modules)


def prepare_dpo(ens: Any, cfg: DPOConfig) -> None:
    """With ``--init-from``: start every member from its SFT adapter and load that adapter
    again, frozen, as the member's reference ``ref_<member>``."""
    if not cfg.init_from:
        return
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    root = Path(cfg.init_from)
    sft = load_manifest(root)
    for name, member in zip(ens.members, sft.members, strict=True):
        adir = root / member.adapter
        set_peft_model_state_dict(ens.peft, load_file(adir / ADAPTER_FILE), adapter_name=name)
        ens.peft.load_adapter(str(adir), adapter_name=REF_PREFIX + name, is_trainable=False)
    ens.reference_members = {name: REF_PREFIX + name for name in ens.members}
    ens.activate(ens.members[0])


def split_pairs(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A (…, 2B) tensor of [chosen | rejected] columns as (chosen, rejected)."""
    b = t.shape[-1] // 2
    return t[..., :b], t[..., b:]


def _reference(ens: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """(K, 2B) reference log-likelihoods (no gradient): base, or each member's SFT adapter."""
    batch = {k: inputs[k] for k in ("input_ids", "attention_mask", "labels")}
    refs = getattr(ens, "reference_members", None)
    with torch.no_grad():
        if not refs:
            base = ens.reference_logprob(**batch)  # (2B,)
            return base.expand(len(ens.members), -1)
        rows = []
        for name in ens.members:
            ens.activate(refs[name])
            rows.append(ens.sequence_logprob(**batch))
        ens.activate(ens.members[0])
        return torch.stack(rows)


class ReferenceCache:
    """Reference log-likelihoods per example (the ``idx`` the collator passes), one store
    for training and one for evaluation: computed once without gradient, then reused."""

    def __init__(self) -> None:
        self._stores: dict[bool, dict[int, torch.Tensor]] = {True: {}, False: {}}

    def __len__(self) -> int:
        return sum(len(s) for s in self._stores.values())

    def reference(self, ens: Any, inputs: dict[str, torch.Tensor], training: bool) -> torch.Tensor:
        """(K, 2B) reference log-likelihoods of the batch, from the store when all are in it."""
        idx = inputs.get("idx")
        if idx is None:
            return _reference(ens, inputs)
        store = self._stores[training]
        keys = [int(i) for i in idx.tolist()]
        if all(k in store for k in keys):
            ref = torch.stack([store[k] for k in keys], dim=1)  # (K, B, 2)
            return torch.cat([ref[..., 0], ref[..., 1]], dim=1)
        ref = _reference(ens, inputs)
        chosen, rejected = split_pairs(ref.detach().cpu())
        for j, k in enumerate(keys):
            store[k] = torch.stack([chosen[:, j], rejected[:, j]], dim=-1)  # (K, 2)
        return ref


def reference_for(
    ens: Any,
    inputs: dict[str, torch.Tensor],
    cache: ReferenceCache | None,
    members: Sequence[str] | None = None,
) -> torch.Tensor:
    """(k, 2B) reference log-likelihoods of ``members`` (all by default), through ``cache``."""
    ref = (
        cache.reference(ens, inputs, ens.training) if cache is not None else _reference(ens, inputs)
    )
    if members is not None:
        ref = ref[[ens.members.index(m) for m in members]]
    return ref


def margins_from(policy: torch.Tensor, ref: torch.Tensor, beta: float) -> torch.Tensor:
    """(k, B) margins h from (k, 2B) policy and reference log-likelihoods."""
    (pw, pl), (rw, rl) = split_pairs(policy), split_pairs(ref.to(policy))
    return beta * ((pw - rw) - (pl - rl))


def dpo_margins(trainer: Any, model: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """(K, B) DPO margins h_k of a batch of B pairs (``inputs`` holds 2B sequences); the
    reference goes through ``trainer.reference_cache`` when it has one."""
    ens = trainer.accelerator.unwrap_model(model)
    batch = {k: inputs[k] for k in ("input_ids", "attention_mask", "labels")}
    policy = model(**batch).logp  # (K, 2B), with gradient
    ref = reference_for(ens, inputs, getattr(trainer, "reference_cache", None))
    return margins_from(policy, ref, trainer.config.beta)
