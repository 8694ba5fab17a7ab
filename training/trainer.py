"""``EnsembleTrainer``: a :class:`transformers.Trainer` that optimises the α-Rényi objective.

It overrides only what it must:

* ``compute_loss`` — K member log-likelihoods from :class:`~training.model.EnsembleLM`,
  the objective from :mod:`training.loss`, routing statistics, learned mixture weights;
* ``prediction_step`` — evaluation loss (ℓ_α on the validation data);
* ``log`` — adds routing entropy, per-member responsibility and π to every log line;
* ``_save`` / ``_load_from_checkpoint`` — checkpoints hold the K adapters and π only
  (one small safetensors file), never the frozen base.

Everything else — the loop, AdamW, the schedule, gradient accumulation, DDP through
``accelerate launch``, checkpoints with optimizer/scheduler/RNG state, resume — is the
Trainer's own.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import Trainer

from ensemble.math import update_mixture_weights
from training.config import TrainConfig, Weights
from training.datasets import ExampleDataset, PairDataset, collate  # re-exported for bench/
from training.dpo import ReferenceCache, dpo_margins
from training.loss import preference_logprob, renyi_objective
from training.prior import anchor_penalty, snapshot

__all__ = [
    "STATE_FILE",
    "DPOTrainerMixin",
    "EnsembleTrainer",
    "ExampleDataset",
    "PairDataset",
    "collate",
    "last_complete_checkpoint",
]

STATE_FILE = "ensemble_state.safetensors"
LR_EMA = 0.1  # weight of the newest batch in the running α=1 responsibilities (learned π)


# ----------------------------------------------------------------------- the trainer


def _all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        t = t.clone()
        torch.distributed.all_reduce(t)
        t /= torch.distributed.get_world_size()
    return t


class EnsembleTrainer(Trainer):
    """Trainer for the α-Rényi SFT objective; see the module docstring."""

    loss_is_scaled_for_ga = False  # compute_loss returns a per-batch mean

    def __init__(self, *args: Any, config: TrainConfig, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.config = config
        k = config.members
        self._resp_sum = torch.zeros(k, dtype=torch.float64)
        self._entropy_sum = torch.zeros((), dtype=torch.float64)
        self._seen = torch.zeros((), dtype=torch.float64)
        self._loss_sum = torch.zeros((), dtype=torch.float64)
        # anchored members: each member's LoRA tensors as drawn (re-drawn identically from
        # the seed on --resume, before the checkpoint is loaded)
        self.anchors = snapshot(self.model) if config.anchor else {}

    # -- the objective -------------------------------------------------------------

    def member_logp(
        self, model: Any, inputs: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(K, B) log-likelihoods the objective mixes, and those used for routing (or None)."""
        scores = model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            labels=inputs["labels"],
            prompt_weight=self.config.prompt_loss_weight,
        )
        if self.config.normalize_by_length:
            return scores.logp, scores.logp / scores.n_tokens.clamp(min=1).to(scores.logp.dtype)
        return scores.logp, None

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        ens = self.accelerator.unwrap_model(model)
        logp, routing = self.member_logp(model, inputs)
        out = renyi_objective(logp, self.config.alpha, ens.log_weights, routing)
        loss = out.loss
        if model.training:
            self._track(out.resp, out.per_example)
            if self.config.weights == Weights.LEARNED:
                self._update_weights(ens, (logp if routing is None else routing).detach())
            if self.anchors:
                loss = loss + self.config.anchor * anchor_penalty(ens, self.anchors)
        return (loss, out) if return_outputs else loss

    def _track(self, resp: torch.Tensor, per_example: torch.Tensor) -> None:
        r = resp.double().cpu()
        self._resp_sum += r.sum(dim=1)
        self._entropy_sum += -(r * r.clamp_min(1e-300).log()).sum()
        self._seen += r.shape[1]
        self._loss_sum += per_example.double().cpu().sum()

    def _update_weights(self, ens: Any, logp: torch.Tensor) -> None:
        """EM step for π: running mean of α=1 responsibilities, smoothed and floored."""
        r1 = torch.softmax(ens.log_weights[:, None].to(logp.dtype) + logp, dim=0).mean(dim=1)
        r1 = _all_reduce_mean(r1.float())
        ens.resp_ema.mul_(1 - LR_EMA).add_(LR_EMA * r1.to(ens.resp_ema.device))
        pi = update_mixture_weights(ens.resp_ema.double().cpu().numpy())
        ens.log_weights.copy_(torch.as_tensor(np.log(pi), dtype=ens.log_weights.dtype))

    def prediction_step(
        self,
        model: Any,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[torch.Tensor | None, None, None]:
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    # -- logging -------------------------------------------------------------------

    def routing_logs(self) -> dict[str, Any]:
        """Means since the last log (all processes), then reset."""
        totals = torch.cat(
            [self._resp_sum, self._entropy_sum[None], self._seen[None], self._loss_sum[None]]
        )
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            totals = totals.to(self.args.device)
            torch.distributed.all_reduce(totals)
            totals = totals.cpu()
        k = self.config.members
        seen = float(totals[k + 1])
        self._resp_sum.zero_()
        self._entropy_sum.zero_()
        self._seen.zero_()
        self._loss_sum.zero_()
        if seen == 0:
            return {}
        ens = self.accelerator.unwrap_model(self.model)
        return {
            "renyi_loss": float(totals[k + 2]) / seen,
            "routing_entropy": float(totals[k]) / seen,
            "responsibility": [round(float(x) / seen, 6) for x in totals[:k]],
            "pi": [round(float(x), 6) for x in ens.log_weights.exp().tolist()],
        }

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log line (not eval / final summary)
            logs = {**logs, **self.routing_logs()}
        super().log(logs, start_time)

    # -- checkpoints: the K adapters and π only ------------------------------------

    def _save(
        self, output_dir: str | None = None, state_dict: dict[str, Any] | None = None
    ) -> None:
        output_dir = str(output_dir or self.args.output_dir)
        os.makedirs(output_dir, exist_ok=True)
        ens = self.accelerator.unwrap_model(self.model)
        tmp = os.path.join(output_dir, f".{STATE_FILE}.tmp")
        save_file(ens.trainable_state_dict(), tmp)
        os.replace(tmp, os.path.join(output_dir, STATE_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        ens = self.accelerator.unwrap_model(model or self.model)
        ens.load_trainable_state_dict(load_file(os.path.join(resume_from_checkpoint, STATE_FILE)))


class DPOTrainerMixin:
    """Swaps the SFT log-likelihood for the DPO preference log-likelihood log σ(h_k).

        h_k = β[(log p_k(y_w) − log p_ref(y_w)) − (log p_k(y_l) − log p_ref(y_l))]

    The reference is the base with adapters disabled, or (``--init-from``) member k's own
    frozen SFT adapter; its log-likelihoods need no gradient and never change, so the
    trainer's :class:`~training.dpo.ReferenceCache` keeps them per example.
    """

    config: Any

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reference_cache = ReferenceCache()

    def member_logp(
        self, model: Any, inputs: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        margins = dpo_margins(self, model, inputs)
        return preference_logprob(margins), None


def last_complete_checkpoint(run_dir: Path) -> Path | None:
    """The newest ``checkpoint-N`` that finished writing (state file and trainer state)."""
    done = []
    for d in run_dir.glob("checkpoint-*"):
        suffix = d.name.split("-")[-1]
        if suffix.isdigit() and (d / STATE_FILE).is_file() and (d / "trainer_state.json").is_file():
            done.append((int(suffix), d))
    return max(done)[1] if done else None
