"""The uncertainty scores a response carries, and which of them can drive the gate.

One source of truth: the gateway's response fields, the gate's ``score_name`` choices, the
CLI choices and the test parametrisation are all derived from :data:`GATE_SCORES`.
All scores are "higher = more uncertain"; token-level ones are nats per token.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = [
    "BASELINES",
    "COMBINED_COMPONENTS",
    "DEFAULT_GATE_SCORE",
    "DEFAULT_GATE_THRESHOLD",
    "DISTANCE_COMPONENTS",
    "EVAL_SCORES",
    "GATE_SCORES",
    "MIN_CALIBRATION",
    "PROMPT_SCORES",
    "Score",
]


class Score(StrEnum):
    """Uncertainty scores of one answer (definitions: docs/uncertainty.md)."""

    EPISTEMIC = "epistemic"  # mean over tokens of Σπ KL(q_k ‖ q̄): members disagree
    ALEATORIC = "aleatoric"  # mean over tokens of Σπ H(q_k): each member unsure
    TOTAL = "total"  # mean over tokens of H(q̄)
    SEQUENCE_EPISTEMIC = "sequence_epistemic"  # cross-scored candidates, nats per token
    DISAGREEMENT = "disagreement"  # fraction of member pairs with different answers
    NOVELTY = "novelty"  # answer: mean log q_base − log q̄ per token (ensemble/novelty.py)
    PROMPT_NOVELTY = "prompt_novelty"  # the same on the prompt's tokens
    # squared Mahalanobis distance of the prompt's pooled base hidden state from the training
    # prompts' (ensemble/density.py); served when the manifest has a `density` reference
    PROMPT_DISTANCE = "prompt_distance"
    COMBINED = "combined"  # 1 − Bonferroni min p-value vs in-distribution calibration


GATE_SCORES: tuple[str, ...] = tuple(s.value for s in Score)
# Single-member baselines the evaluation compares the served scores with (lm-polygraph's
# names): `perplexity` = −mean token log-prob of one member's answer, `mean_token_entropy`
# = mean entropy of that member's next-token distributions. Not served, so not gate scores.
BASELINES: tuple[str, ...] = ("perplexity", "mean_token_entropy")
# Everything `softspec eval` and the benchmarks report, in table order.
EVAL_SCORES: tuple[str, ...] = (*GATE_SCORES, *BASELINES)
# The gate of a manifest that carries no calibration (written before calibration existed,
# or trained with --gate-calibration 0): a fixed threshold on member disagreement, which
# does NOT detect out-of-distribution prompts (OOD AUROC 0.35 for disagreement and 0.37 for
# epistemic in bench/ood_ablation.py: below chance). `softspec train` replaces it with the
# calibrated `combined` score; `softspec eval --calibrate-gate` does the same for an
# existing ensemble.
DEFAULT_GATE_SCORE = Score.DISAGREEMENT.value
DEFAULT_GATE_THRESHOLD = 0.5
# The scores the `combined` gate score turns into in-distribution p-values
# (ensemble/calibration.py), and the fewest in-distribution rows it is fitted from.
# bench/ood_ablation.py chose prompt_novelty alone: adding `novelty` (answer-level, OOD
# AUROC 0.65 vs 0.89) did not raise the AUROC and, through the Bonferroni factor, doubles
# the calibration prompts a 5 % gate needs (m / (n + 1) ≤ rate).
COMBINED_COMPONENTS: tuple[str, ...] = (Score.PROMPT_NOVELTY.value,)
# With a `density` reference the components are prompt_distance alone: on the 187 test
# prompts of bench/ood_embedding.py the last-layer distance scored OOD AUROC 0.965, against
# 0.941 for `combined` over {prompt_novelty, distance} and 0.787 for prompt_novelty.
DISTANCE_COMPONENTS: tuple[str, ...] = (Score.PROMPT_DISTANCE.value,)
# The scores known from the prompt alone, before any member generates: a gate on them (or
# on `combined` built only from them) can abstain or escalate without generating.
PROMPT_SCORES: frozenset[str] = frozenset({Score.PROMPT_NOVELTY.value, Score.PROMPT_DISTANCE.value})
MIN_CALIBRATION = 20
