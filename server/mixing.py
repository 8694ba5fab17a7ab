"""Mixing K members' candidates into one answer with uncertainty (pure functions).

Inputs are the candidates every member generated and every candidate's token scores under
every member; outputs are the selected answer, its uncertainty (docs/uncertainty.md), the
responsibilities and the mixture's log-probs. All arithmetic is :mod:`ensemble.math`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ensemble.math import (
    align_top_logprobs,
    disagreement,
    mixture_logprob,
    normalize_answer,
    responsibilities,
    sequence_epistemic,
    token_uncertainty_many,
)
from server.engine import Generation, TokenScores
from server.protocol import SelectMode

__all__ = [
    "TOKEN_SCORES",
    "Candidate",
    "MixOutcome",
    "mean_over_tokens",
    "mix",
    "per_token_uncertainty",
]

TOKEN_SCORES = ("epistemic", "aleatoric", "total")  # per position, exact decomposition


@dataclass
class Candidate:
    """A generated answer with its scores under every member (``scores[member]``)."""

    generation: Generation
    scores: dict[str, TokenScores]

    @property
    def member(self) -> str:
        return self.generation.member

    @property
    def length(self) -> int:
        return max(1, len(self.generation.token_ids))


@dataclass
class MixOutcome:
    answer: int  # index into the candidates
    L: np.ndarray  # (K, M) cross-scores log p_k(y_m|x)
    mixture: np.ndarray  # (M,) log p̄(y_m)
    uncertainty: dict[str, float | None]
    responsibilities: dict[str, float]
    per_token: list[dict[str, float]]  # one {total, aleatoric, epistemic} per answer token
    token_logprobs: list[float]  # log q̄_t(y_t) along the answer
    token_top: list[dict[int, float]]  # mixture top log-probs along the answer


def mean_over_tokens(steps: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """The answer-level token scores: each of :data:`TOKEN_SCORES` averaged over positions
    (0 for an empty answer)."""
    return {k: float(np.mean([s[k] for s in steps])) if steps else 0.0 for k in TOKEN_SCORES}


def cross_scores(cands: Sequence[Candidate], members: Sequence[str]) -> np.ndarray:
    """(K, M) matrix L[k, m] = log p_k(y_m | x)."""
    return np.array([[c.scores[k].total for c in cands] for k in members], dtype=np.float64)


def per_token_uncertainty(
    scores: Sequence[TokenScores], log_weights: np.ndarray, top_n: int
) -> tuple[list[dict[str, float]], list[float], list[dict[int, float]]]:
    """Token-level decomposition along one answer scored by every member.

    At each position the members' known log-probs (top-N plus the actual token) are put
    on a common support with a "rest" bucket (:func:`ensemble.math.align_top_logprobs`);
    the positions are then stacked (padded with probability-0 columns) and decomposed in
    one vectorised call.

    Returns (per-position uncertainty, mixture log-prob of each actual token, mixture
    top-N of each position).
    """
    n = len(scores[0].token_ids)
    if n == 0:
        return [], [], []
    aligned, unions = [], []
    for t in range(n):
        dists = [s.distribution(t) for s in scores]
        aligned.append(align_top_logprobs(dists))  # (K, U_t + 1)
        unions.append(list(dict.fromkeys(tok for d in dists for tok in d)))
    width = max(a.shape[1] for a in aligned)
    stack = np.full((n, len(scores), width), -np.inf)  # (T, K, U_max + 1)
    for t, a in enumerate(aligned):
        stack[t, :, : a.shape[1]] = a
    u = token_uncertainty_many(stack, log_weights)
    steps = [{key: float(u[key][t]) for key in TOKEN_SCORES} for t in range(n)]
    actual = np.array([s.logprobs for s in scores], dtype=np.float64)  # (K, T)
    token_lp = np.atleast_1d(mixture_logprob(actual, log_weights)).tolist()
    mix = np.logaddexp.reduce(log_weights[None, :, None] + stack, axis=1)  # (T, U_max + 1)
    tops = []
    for t, union in enumerate(unions):
        order = np.argsort(-mix[t, : len(union)], kind="stable")[:top_n]
        tops.append({int(union[i]): float(mix[t, i]) for i in order})
    return steps, [float(x) for x in token_lp], tops


def _select(cands: Sequence[Candidate], mixture: np.ndarray, mode: SelectMode) -> int:
    per_token = mixture / np.array([c.length for c in cands], dtype=np.float64)
    if mode == SelectMode.MAJORITY:
        counts = Counter(normalize_answer(c.generation.text) for c in cands)
        top = max(counts.values())
        winners = [
            i for i, c in enumerate(cands) if counts[normalize_answer(c.generation.text)] == top
        ]
        return max(winners, key=lambda i: (per_token[i], -i))
    return int(max(range(len(cands)), key=lambda i: (per_token[i], -i)))


def mix(
    cands: Sequence[Candidate],
    members: Sequence[str],
    log_weights: np.ndarray,
    alpha: float,
    select: SelectMode = SelectMode.MIXTURE,
    top_n: int = 20,
) -> MixOutcome:
    """Select the answer and compute every uncertainty score of docs/uncertainty.md.

    Args:
        cands: M candidates (member order, samples in order), each scored by all members.
        members: the K members taking part (order of ``log_weights``).
        log_weights: (K,) log π over those members (renormalised).
        alpha: the manifest's α, for the responsibilities of the answer.
    """
    L = cross_scores(cands, members)  # (K, M)
    mixture = np.atleast_1d(mixture_logprob(L, log_weights))  # (M,)
    answer = _select(cands, mixture, select)
    index = {m: k for k, m in enumerate(members)}
    generator = np.array([index[c.member] for c in cands])
    lengths = np.array([c.length for c in cands])
    firsts = [
        next(c for c in cands if c.member == m).generation.text
        for m in members
        if any(c.member == m for c in cands)
    ]
    steps, token_lp, tops = per_token_uncertainty(
        [cands[answer].scores[m] for m in members], log_weights, top_n
    )
    resp = responsibilities(L[:, answer], alpha, log_weights)
    return MixOutcome(
        answer=answer,
        L=L,
        mixture=mixture,
        uncertainty={
            **mean_over_tokens(steps),
            "sequence_epistemic": float(sequence_epistemic(L, generator, lengths, log_weights)),
            "disagreement": float(disagreement(firsts)),
        },
        responsibilities={m: float(r) for m, r in zip(members, resp, strict=True)},
        per_token=steps,
        token_logprobs=token_lp,
        token_top=tops,
    )


def renormalised(log_weights: Mapping[str, float], members: Sequence[str]) -> np.ndarray:
    """log π restricted to ``members`` and renormalised to sum to 1."""
    lw = np.array([log_weights[m] for m in members], dtype=np.float64)
    return lw - np.logaddexp.reduce(lw)
