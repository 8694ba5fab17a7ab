"""``EnsembleTrainer``: a :class:`transformers.Trainer` that optimises the α-Rényi objective.

It overrides only what it must:

* ``compute_loss`` — the coupled step: K member log-likelihoods (SFT or DPO) and ℓ_α from
  :class:`~training.objective.EnsembleObjective`, routing statistics, learned π;
* ``training_step`` — with ``--member-memory sequential``: a no-grad pass for the
  responsibilities, then one member's forward + backward at a time (same gradient);
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
from training.config import MemberMemory, TrainConfig, Weights
from training.datasets import ExampleDataset, PairDataset, collate  # re-exported for bench/
from training.loss import RenyiOutput
from training.objective import EnsembleObjective

__all__ = [
    "STATE_FILE",
    "EnsembleTrainer",
    "ExampleDataset",
    "PairDataset",
    "collate",
    "last_complete_checkpoint",
]

STATE_FILE = "ensemble_state.safetensors"
LR_EMA = 0.1  # weight of the newest batch in the running α=1 responsibilities (learned π)


# ----------------------------------------------------------------------- the trainer


def _all_reduce_grads(ens: Any) -> None:
    """Average the trainable gradients over processes (member-sequential DDP steps)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    world = torch.distributed.get_world_size()
    for p in ens.parameters():
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            torch.distributed.all_reduce(p.grad)
            p.grad /= world


def _all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        t = t.clone()
        torch.distributed.all_reduce(t)
        t /= torch.distributed.get_world_size()
    return t


class EnsembleTrainer(Trainer):
    """Trainer for the α-Rényi objective (SFT or DPO); see the module docstring."""

    loss_is_scaled_for_ga = False  # compute_loss returns a per-batch mean
    objective: EnsembleObjective

    def __init__(
        self, *args: Any, config: TrainConfig, member_memory: str = "coupled", **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.config = config
        self.member_memory = MemberMemory(member_memory)  # resolved: coupled or sequential
        if self.member_memory == MemberMemory.AUTO:
            raise ValueError("resolve --member-memory auto before building the trainer")
        k = config.members
        self._resp_sum = torch.zeros(k, dtype=torch.float64)
        self._entropy_sum = torch.zeros((), dtype=torch.float64)
        self._seen = torch.zeros((), dtype=torch.float64)
        self._loss_sum = torch.zeros((), dtype=torch.float64)
        self.objective = EnsembleObjective(config, self.model)

    @property
    def reference_cache(self) -> Any:
        return self.objective.reference_cache

    # -- the objective -------------------------------------------------------------

    def member_logp(
        self, model: Any, inputs: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(K, B) log-likelihoods the objective mixes, and those used for routing (or None)."""
        return self.objective.member_logp(model, self.accelerator.unwrap_model(model), inputs)

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        """The coupled step (and evaluation): all K members in one graph."""
        ens = self.accelerator.unwrap_model(model)
        out, logp, routing = self.objective.coupled(model, ens, inputs)
        loss = out.loss
        if model.training:
            self._after_responsibilities(ens, out, logp, routing)
            anchor = self.objective.anchor_term(ens)
            if anchor is not None:
                loss = loss + anchor
        return (loss, out) if return_outputs else loss

    def training_step(
        self,
        model: Any,
        inputs: dict[str, torch.Tensor | Any],
        num_items_in_batch: Any = None,
    ) -> torch.Tensor:
        if self.member_memory != MemberMemory.SEQUENTIAL:
            return super().training_step(model, inputs, num_items_in_batch)
        # member-sequential: a no-grad pass for w, then one member's graph at a time
        model.train()
        inputs = self._prepare_inputs(inputs)
        ens = self.accelerator.unwrap_model(model)
        scale = 1.0 / self.current_gradient_accumulation_steps
        with self.compute_loss_context_manager():
            resp = self.objective.responsibilities(ens, inputs)
            self._after_responsibilities(ens, resp.out, resp.logp, resp.routing)
            penalty = self.objective.member_backward(
                ens, inputs, resp, lambda loss: self.accelerator.backward(loss * scale)
            )
        if self.accelerator.sync_gradients:
            _all_reduce_grads(ens)  # the wrapper's forward was not used: sync here
        value = resp.out.per_example.mean() + penalty.to(resp.out.loss.dtype)
        return (value * scale).detach()

    def _after_responsibilities(
        self, ens: Any, out: RenyiOutput, logp: torch.Tensor, routing: torch.Tensor | None
    ) -> None:
        """Routing statistics; the EM step of learned π (after w was computed with the old π)."""
        self._track(out.resp, out.per_example)
        if self.config.weights == Weights.LEARNED:
            self._update_weights(ens, (logp if routing is None else routing).detach())

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


def last_complete_checkpoint(run_dir: Path) -> Path | None:
    """The newest ``checkpoint-N`` that finished writing (state file and trainer state)."""
    done = []
    for d in run_dir.glob("checkpoint-*"):
        suffix = d.name.split("-")[-1]
        if suffix.isdigit() and (d / STATE_FILE).is_file() and (d / "trainer_state.json").is_file():
            done.append((int(suffix), d))
    return max(done)[1] if done else None
