"""Base-relative scores: does what the members learned bear on this input at all?

The ensemble's members are LoRA adapters on one frozen base model, and the base (adapters
off) is always loaded beside them. Fine-tuning raises the likelihood of text like the
training data and leaves other text where the base had it, so the log-likelihood ratio
between the members and the base says how much the adapters' knowledge applies to a
sequence (after Zhang et al., "Your Finetuned LLM is Already a Powerful OOD Detector",
AISTATS 2025). Definitions (nats per token, "higher = more uncertain"), for a token
sequence z_1..z_T scored teacher-forced, member log-probs ℓ_k,t = log q_k,t(z_t), base
log-probs b_t = log q_base,t(z_t) and mixture weights π:

    mixture token log-prob   m_t = log Σ_k π_k exp(ℓ_k,t)
    novelty(z)               = (1/T) Σ_t (b_t − m_t)

``novelty`` of the served answer uses the answer's tokens; ``prompt_novelty`` uses the
prompt's tokens (the rendered chat prompt after its first token). Both need only the
log-prob of the actual token, which both engines return exactly (no top-N truncation).
In distribution the adapters raise the likelihood (novelty < 0); far from the training
data they add nothing or lower it (novelty ≥ 0).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["mixture_token_logprobs", "novelty"]


def mixture_token_logprobs(member_logprobs: ArrayLike, log_weights: ArrayLike) -> np.ndarray:
    """(T,) m_t = logsumexp_k(log π_k + ℓ_k,t) from (K, T) member token log-probs."""
    lp = np.asarray(member_logprobs, dtype=np.float64)
    lw = np.asarray(log_weights, dtype=np.float64)
    if lp.ndim != 2 or lw.shape != (lp.shape[0],):
        raise ValueError(f"member log-probs must be (K, T) with K = {lw.shape}, got {lp.shape}")
    a = lw[:, None] + lp
    top = a.max(axis=0)
    top = np.where(np.isfinite(top), top, 0.0)
    return np.asarray(top + np.log(np.exp(a - top).sum(axis=0)))


def novelty(
    member_logprobs: ArrayLike, base_logprobs: Sequence[float] | ArrayLike, log_weights: ArrayLike
) -> float | None:
    """Mean over tokens of log q_base(z_t) − log q̄(z_t); ``None`` for an empty sequence."""
    base = np.asarray(base_logprobs, dtype=np.float64)
    if base.shape[0] == 0:
        return None
    lp = np.asarray(member_logprobs, dtype=np.float64)
    if lp.ndim != 2 or lp.shape[1] != base.shape[0]:
        raise ValueError(f"member log-probs must be (K, {base.shape[0]}), got {lp.shape}")
    mix = mixture_token_logprobs(lp, log_weights)
    return float(np.mean(base - mix))
