"""A vLLM general plugin (entry point ``vllm.general_plugins``) loaded in every vLLM process.

It works around a vLLM 0.32 CPU bug that the gateway's cross-scoring hits: with LoRA
enabled, ``prompt_logprobs`` computes logits for a request's prompt positions while the
LoRA logits wrapper still holds one adapter index per *sampled* row of the batch, and the
CPU kernel (``torch.einsum`` in ``bgmv_shrink``) fails when the two counts differ
("subscript b has size 5 ... previously seen size 4"), killing the engine.

Soft Specialists' adapters never adapt ``lm_head`` (peft's ``all-linear`` excludes it), so
the LoRA contribution to the logits is exactly zero: when the counts differ and the
stacked ``lm_head`` LoRA weights are all zero, the patch returns the base logits, which
is the exact answer. Anything else is left to vLLM unchanged. Idempotent (vLLM may load
plugins several times per process). This module must not import torch at import time.
"""

from __future__ import annotations

from typing import Any

__all__ = ["register"]

_PATCHED = "_softspec_patched"


def register() -> None:
    try:
        from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU
    except Exception:  # another vLLM build (e.g. CUDA): nothing to patch
        return
    original = PunicaWrapperCPU.add_lora_logits
    if getattr(original, _PATCHED, False):
        return

    def add_lora_logits(self: Any, y: Any, x: Any, a: Any, b: Any, *args: Any, **kw: Any) -> Any:
        rows = x.reshape(-1, x.shape[-1]).shape[0]
        if rows != self.sampler_indices.shape[0] and not bool(b.any()):
            return y  # lm_head has no LoRA: the logits are the base logits
        return original(self, y, x, a, b, *args, **kw)

    setattr(add_lora_logits, _PATCHED, True)
    PunicaWrapperCPU.add_lora_logits = add_lora_logits  # type: ignore[method-assign, assignment]
