"""Lock-step mixture decoding on vLLM: the contract between the gateway and vLLM's side.

In token mode on the vLLM engine the gateway sends the K member requests of one ensemble
request as one **group**. Inside vLLM, :class:`server.lockstep_vllm.LockstepProcessor` (a
batch-level logits processor) sees the K rows of a group in the same step, computes the
mixture q̄_t = Σ_k π_k q_k,t from their raw logits, chooses the next token once (greedy or
sampled from q̄_t with the request's temperature, top-p and seed) and forces it in every
row; :class:`server.lockstep_vllm.GroupScheduler` admits the K requests of a group
together so that they prefill in one step and then decode side by side. Each row keeps its
own member's KV cache and returns its own member's raw log-probs on the shared path, so
the gateway gets the token-level decomposition without re-scoring anything.

When a group is not complete in a step (a member was preempted or admitted later), the
processor cannot wait for it: it forces the group's **abort token**, which the requests
carry as a stop token, so every row stops there with ``stop_reason`` = that token. The
gateway sees the abort, keeps the tokens decided before it (they were exact) and resumes
from them as a new group, or answers in sequence mode (:mod:`server.vllm_engine`).

This module is the shared vocabulary: the per-request arguments (``vllm_xargs``, which
vLLM passes on as ``SamplingParams.extra_args``), their validation, and vLLM's flags. It
imports neither torch nor vLLM, so the gateway image (no torch) can use it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "PROCESSOR",
    "SCHEDULER",
    "GroupArgs",
    "LockstepArgsError",
    "parse_args",
    "vllm_flags",
    "xargs",
]

PROCESSOR = "server.lockstep_vllm:LockstepProcessor"
SCHEDULER = "server.lockstep_vllm.GroupScheduler"  # vLLM resolves it by qualified name

# vllm_xargs keys (flat: vLLM accepts str / int / float values there)
GROUP = "softspec_group"  # group id (str), unique per ensemble request and attempt
INDEX = "softspec_index"  # this row's member index in the group, 0..size-1
SIZE = "softspec_size"  # rows in the group (K)
WEIGHT = "softspec_weight"  # π_k, the member's mixture weight (> 0)
TEMPERATURE = "softspec_temperature"  # the group's temperature (0 = greedy)
TOP_P = "softspec_top_p"  # the group's nucleus mass
SEED = "softspec_seed"  # the group's seed (-1: none)
ABORT = "softspec_abort"  # the token forced when the group is incomplete (a stop token)
KEYS = (GROUP, INDEX, SIZE, WEIGHT, TEMPERATURE, TOP_P, SEED, ABORT)
MAX_GROUP = 64


class LockstepArgsError(ValueError):
    """Malformed lock-step arguments (vLLM turns a ValueError into an HTTP 400)."""


@dataclass(frozen=True)
class GroupArgs:
    """One row's lock-step arguments."""

    group: str
    index: int
    size: int
    weight: float
    temperature: float
    top_p: float
    seed: int
    abort: int


def xargs(
    group: str,
    index: int,
    size: int,
    weight: float,
    *,
    temperature: float,
    top_p: float,
    seed: int | None,
    abort: int,
) -> dict[str, Any]:
    """The ``vllm_xargs`` of one member request of a group."""
    return {
        GROUP: group,
        INDEX: index,
        SIZE: size,
        WEIGHT: float(weight),
        TEMPERATURE: float(temperature),
        TOP_P: float(top_p),
        SEED: -1 if seed is None else int(seed),
        ABORT: int(abort),
    }


def _number(extra: Mapping[str, Any], key: str, kind: type) -> Any:
    v = extra.get(key)
    if not isinstance(v, int | float) or isinstance(v, bool):
        raise LockstepArgsError(f"vllm_xargs.{key} must be a finite {kind.__name__}, got {v!r}")
    if not math.isfinite(v) or (kind is int and not float(v).is_integer()):
        raise LockstepArgsError(f"vllm_xargs.{key} must be a finite {kind.__name__}, got {v!r}")
    return kind(v)


def parse_args(extra: Mapping[str, Any] | None) -> GroupArgs | None:
    """A row's :class:`GroupArgs`; ``None`` for a request that is not in a group.

    Raises :class:`LockstepArgsError` with the field and the rule for anything malformed."""
    if not extra or not any(k in extra for k in KEYS):
        return None
    missing = [k for k in KEYS if k not in extra]
    if missing:
        raise LockstepArgsError(
            f"lock-step vllm_xargs miss {missing}; all of {list(KEYS)} go together"
        )
    group = extra[GROUP]
    if not isinstance(group, str) or not group or len(group) > 128:
        raise LockstepArgsError(f"vllm_xargs.{GROUP} must be a non-empty string (≤ 128 chars)")
    size = _number(extra, SIZE, int)
    index = _number(extra, INDEX, int)
    weight = _number(extra, WEIGHT, float)
    temperature = _number(extra, TEMPERATURE, float)
    top_p = _number(extra, TOP_P, float)
    seed = _number(extra, SEED, int)
    abort = _number(extra, ABORT, int)
    if not 1 <= size <= MAX_GROUP:
        raise LockstepArgsError(f"vllm_xargs.{SIZE} must be in [1, {MAX_GROUP}], got {size}")
    if not 0 <= index < size:
        raise LockstepArgsError(f"vllm_xargs.{INDEX} must be in [0, {size}), got {index}")
    if not weight > 0:
        raise LockstepArgsError(f"vllm_xargs.{WEIGHT} must be > 0, got {weight}")
    if temperature < 0:
        raise LockstepArgsError(f"vllm_xargs.{TEMPERATURE} must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise LockstepArgsError(f"vllm_xargs.{TOP_P} must be in (0, 1], got {top_p}")
    if seed < -1:
        raise LockstepArgsError(f"vllm_xargs.{SEED} must be >= 0 (or -1 for none), got {seed}")
    if abort < 0:
        raise LockstepArgsError(f"vllm_xargs.{ABORT} must be a token id >= 0, got {abort}")
    return GroupArgs(group, index, size, weight, temperature, top_p, seed, abort)


def vllm_flags(members: int, max_model_len: int) -> list[str]:
    """vLLM's flags for lock-step decoding with groups of up to ``members`` rows.

    Chunked prefill is off, so a row in a step's batch is either fully prefilled (its
    logits are real) or not scheduled at all, and the token budget holds a whole group's
    prompts (up to 16,384 tokens; a group with longer prompts splits and is answered in
    sequence mode), so the scheduler can admit a group in one step."""
    budget = max(max_model_len, min(max_model_len * max(members, 1), 16384))
    return [
        "--logits-processors", PROCESSOR,
        "--scheduler-cls", SCHEDULER,
        "--no-enable-chunked-prefill",
        "--max-num-batched-tokens", str(budget),
    ]  # fmt: skip
