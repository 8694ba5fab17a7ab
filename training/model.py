"""K LoRA members on ONE frozen base model (peft), and their sequence log-likelihoods.

:class:`EnsembleLM` holds a single :class:`peft.PeftModel` with adapters ``m0..m{K-1}``;
its ``forward`` runs each member over the batch in turn (switching the active adapter,
never copying the base) and returns the (K, B) matrix of sequence log-likelihoods
``log p_k(y|x)`` over the completion tokens. Running all members inside one ``forward``
call keeps it a single step for DDP (``accelerate launch``): every LoRA parameter is used
exactly once per step.

Logits are computed only at completion positions (``labels != -100``): with a 49k
vocabulary the (tokens × vocab) logits are the largest activation, and prompt positions
never need them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ensemble.errors import ConfigError
from training.config import ALL_LINEAR, TrainConfig
from training.data import IGNORE

__all__ = [
    "EnsembleLM",
    "SequenceScores",
    "build_ensemble",
    "linear_module_names",
    "load_base",
    "load_ensemble",
    "load_model",
    "load_tokenizer",
]


@dataclass
class SequenceScores:
    logp: torch.Tensor  # (K, B) summed completion log-likelihoods, nats
    n_tokens: torch.Tensor  # (B,) completion tokens per example


def load_tokenizer(path: str | Path) -> Any:
    """The base model's tokenizer, with a pad token (EOS when it has none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: str | Path, dtype: torch.dtype = torch.float32) -> Any:
    """A Hugging Face causal LM in ``dtype``, frozen."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.requires_grad_(False)
    return model


def load_base(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """(model, tokenizer) of a Hugging Face causal LM directory, frozen, in ``dtype``."""
    return load_model(path, dtype), load_tokenizer(path)


def linear_module_names(model: nn.Module) -> set[str]:
    """Short names of the model's linear layers (candidates for --target-modules)."""
    return {
        name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)
    }


def _lora_config(cfg: TrainConfig, model: nn.Module) -> Any:
    from peft import LoraConfig

    targets: str | list[str] = ALL_LINEAR
    if cfg.target_modules != ALL_LINEAR:
        targets = cfg.target_module_list()
        known = linear_module_names(model)
        unknown = sorted(set(targets) - known)
        if unknown:
            raise ConfigError(
                f"--target-modules: {', '.join(unknown)} not in the model; "
                f"its linear layers are {', '.join(sorted(known))} (or use 'all-linear')"
            )
    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )


def build_ensemble(model: nn.Module, cfg: TrainConfig) -> EnsembleLM:
    """Wrap ``model`` with K LoRA adapters, member k's A matrices drawn with its own seed.

    B = 0 makes every member equal to the base at step 0; different A's make their B
    gradients differ, so members diverge (docs/math.md).
    """
    from peft import get_peft_model

    lora = _lora_config(cfg, model)
    names = cfg.member_names()
    torch.manual_seed(cfg.member_seed(0))
    peft_model = get_peft_model(model, lora, adapter_name=names[0])
    for k, name in enumerate(names[1:], start=1):
        torch.manual_seed(cfg.member_seed(k))
        peft_model.add_adapter(name, lora)
    if cfg.gradient_checkpointing:
        peft_model.get_base_model().gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    k = len(names)
    return EnsembleLM(peft_model, names, torch.full((k,), -float(torch.log(torch.tensor(k)))))


# positions per lm_head chunk: bounds the (chunk, vocab) float32 buffers of the backward
# pass (logits, log-softmax, its gradient: 3 × 256 × 49k × 4 B ≈ 150 MB for SmolLM2)
LOGIT_CHUNK = 256


def _chunk_logprobs(h: torch.Tensor, targets: torch.Tensor, head: nn.Module) -> torch.Tensor:
    logits = head(h)  # (n, V)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 → fp32
    return torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)


def _target_logprobs(h: torch.Tensor, targets: torch.Tensor, head: nn.Module) -> torch.Tensor:
    """log p(target) at each of N positions, in chunks; with grad, each chunk is
    recomputed in the backward pass, so only h (N, H) is kept, never the (N, V) logits."""
    from torch.utils.checkpoint import checkpoint

    parts = []
    for start in range(0, h.shape[0], LOGIT_CHUNK):
        hc, tc = h[start : start + LOGIT_CHUNK], targets[start : start + LOGIT_CHUNK]
        if torch.is_grad_enabled() and hc.requires_grad:
            parts.append(checkpoint(_chunk_logprobs, hc, tc, head, use_reentrant=False))
        else:
            parts.append(_chunk_logprobs(hc, tc, head))
    return torch.cat(parts) if parts else h.new_zeros(0)


def load_ensemble(
    root: str | Path, base: str | None = None, trainable: bool = False
) -> tuple[EnsembleLM, Any]:
    """An ensemble directory as an :class:`EnsembleLM` (one base, K named adapters) + tokenizer."""
    from peft import PeftModel

    from ensemble.manifest import load as load_manifest

    root = Path(root)
    manifest = load_manifest(root)
    base_path = base or manifest.resolve_base_model(root)
    model, tok = load_base(base_path)
    names = manifest.member_names
    peft_model = PeftModel.from_pretrained(
        model,
        str(manifest.adapter_dir(root, names[0])),
        adapter_name=names[0],
        is_trainable=trainable,
    )
    for name in names[1:]:
        peft_model.load_adapter(
            str(manifest.adapter_dir(root, name)), adapter_name=name, is_trainable=trainable
        )
    lw = torch.tensor(manifest.log_weights(), dtype=torch.float32)
    return EnsembleLM(peft_model, names, lw, trainable=trainable), tok


class EnsembleLM(nn.Module):
    """K LoRA members sharing one frozen base; ``forward`` gives (K, B) log-likelihoods."""

    log_weights: torch.Tensor  # (K,) log π (buffer: saved, broadcast by DDP)
    resp_ema: torch.Tensor  # (K,) running mean of α=1 responsibilities (learned π)

    def __init__(
        self,
        peft_model: Any,
        members: Sequence[str],
        log_weights: torch.Tensor,
        trainable: bool = True,
    ) -> None:
        super().__init__()
        self.peft = peft_model
        self.members = list(members)
        self.register_buffer("log_weights", log_weights.to(torch.float32).clone())
        # running mean of α=1 responsibilities, for learned mixture weights (--weights learned)
        self.register_buffer("resp_ema", log_weights.to(torch.float32).exp())
        self._adapter_params = {
            name: [p for n, p in peft_model.named_parameters() if f".{name}." in n and "lora_" in n]
            for name in self.members
        }
        self.trainable = trainable
        for params in self._adapter_params.values():
            for p in params:
                p.requires_grad_(trainable)

    # ------------------------------------------------------------------ members

    def activate(self, member: str) -> None:
        """Make ``member`` the active adapter, keeping every member trainable.

        peft's ``set_adapter`` freezes the inactive adapters; all K are optimised
        together, so their ``requires_grad`` is restored right away.
        """
        self.peft.base_model.set_adapter(member)
        self._restore_trainable()

    def _restore_trainable(self) -> None:
        """peft freezes inactive adapters whenever the active one changes; undo that."""
        for params in self._adapter_params.values():
            for p in params:
                p.requires_grad_(self.trainable)

    @property
    def causal_lm(self) -> Any:
        return self.peft.get_base_model()

    def member_state_dict(self, member: str) -> dict[str, torch.Tensor]:
        """LoRA tensors of one member (names as in this model)."""
        return {
            n: p.detach().clone()
            for n, p in self.peft.named_parameters()
            if f".{member}." in n and "lora_" in n
        }

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything training changes: all members' LoRA tensors and log π."""
        sd = {n: p.detach().contiguous() for n, p in self.named_parameters() if p.requires_grad}
        sd["log_weights"] = self.log_weights.detach().clone()
        sd["resp_ema"] = self.resp_ema.detach().clone()
        return sd

    def load_trainable_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        params = dict(self.named_parameters())
        missing = [n for n, p in params.items() if p.requires_grad and n not in sd]
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[0]}")
        with torch.no_grad():
            for n, t in sd.items():
                if n in ("log_weights", "resp_ema"):
                    getattr(self, n).copy_(t)
                else:
                    params[n].copy_(t)

    # ------------------------------------------------------------------ scoring

    def sequence_logprob(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """(B,) Σ log p(label tokens) under the currently active adapter (or none)."""
        token_lp, mask = self.token_logprobs(input_ids, attention_mask, labels)
        return (token_lp * mask).sum(dim=1)

    def token_logprobs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-position log p(label) (B, T-1) and its mask, computed at label positions only."""
        lm = self.causal_lm
        hidden = lm.get_decoder()(
            input_ids=input_ids, attention_mask=attention_mask
        ).last_hidden_state
        targets = labels[:, 1:]  # (B, T-1): token t+1 is predicted at position t
        mask = targets != IGNORE
        h = hidden[:, :-1][mask]  # (N, H) only where a label exists
        picked = _target_logprobs(h, targets[mask], lm.get_output_embeddings())  # (N,)
        out = torch.zeros(targets.shape, dtype=picked.dtype, device=picked.device)
        out[mask] = picked
        return out, mask.to(picked.dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        members: Sequence[str] | None = None,
        prompt_weight: float = 0.0,
        **_: Any,
    ) -> SequenceScores:
        """(K, B) log p_k: completion tokens, plus ``prompt_weight`` × the prompt tokens'
        log-likelihood when it is > 0 (``--prompt-loss-weight``)."""
        weights = None
        if prompt_weight:
            targets = labels[:, 1:]
            weights = torch.where(targets != IGNORE, 1.0, prompt_weight)
            labels = torch.where(attention_mask.bool(), input_ids, IGNORE)
        rows = []
        for name in members or self.members:
            self.activate(name)
            if weights is None:
                rows.append(self.sequence_logprob(input_ids, attention_mask, labels))
            else:
                token_lp, mask = self.token_logprobs(input_ids, attention_mask, labels)
                rows.append((token_lp * mask * weights.to(token_lp.dtype)).sum(dim=1))
        n_tokens = (labels[:, 1:] != IGNORE).sum(dim=1)
        return SequenceScores(logp=torch.stack(rows), n_tokens=n_tokens)

    def reference_logprob(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """(B,) log-likelihood under the base model with all adapters disabled (no grad)."""
        with torch.no_grad(), self.peft.disable_adapter():
            out = self.sequence_logprob(input_ids, attention_mask, labels)
        self._restore_trainable()  # leaving disable_adapter() re-freezes inactive adapters
        return out
