"""The mixture and its sampling distribution in torch: one rule for both token modes.

Used by the local engine's lock-step decoding (``training/local_engine.py``) and by the
lock-step processor inside vLLM (``server/lockstep_vllm.py``), so that both engines decide
tokens the same way. Like ``lockstep_vllm``, it imports torch, so the gateway never
imports it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["mixture_logprobs", "nucleus"]


def mixture_logprobs(logits: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """log q̄ = log Σ_k π_k softmax(logits_k), float64, from (n, V) raw logits."""
    lq = torch.log_softmax(logits.double(), dim=-1)
    w = torch.tensor(weights, dtype=torch.float64, device=logits.device)
    lw = torch.log(w / w.sum())
    return torch.logsumexp(lw[:, None] + lq, dim=0)


def nucleus(logq: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Sampling distribution from log-probs with temperature and top-p (nucleus): the
    smallest set of most likely tokens whose mass reaches ``top_p``, renormalised."""
    probs = torch.softmax(logq / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < top_p  # always keeps the top token
        mask = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, keep)
        probs = torch.where(mask, probs, torch.zeros_like(probs))
        probs = probs / probs.sum()
    return probs
