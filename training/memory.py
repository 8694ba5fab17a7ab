"""Training memory: a meter of live tensor bytes, and the member-memory mode's estimate.

:class:`TensorMemory` is a :class:`~torch.utils._python_dispatch.TorchDispatchMode` that
counts the bytes of every tensor storage created inside it until the storage is freed,
so it reports what the tensors of a training step really hold (activations saved for
backward, logits, gradients, optimizer state), per phase, on CPU as on CUDA, without the
allocator's caching that peak RSS includes. It is a profiling tool (Python overhead on
every operation), not something a training run uses.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

__all__ = [
    "TensorMemory",
    "activation_bytes",
    "available_bytes",
    "choose_member_memory",
    "limit_allocator_caching",
]

MIB = 2**20


class TensorMemory(TorchDispatchMode):
    """Live and peak bytes of the tensor storages created inside the mode.

    ``with meter.phase("backward"): ...`` records that phase's peak above the bytes live
    when it began in ``meter.phases`` (MiB); ``meter.peak`` is the peak of everything.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: Any = WeakIdKeyDictionary()
        self.phases: dict[str, dict[str, float]] = {}

    def ignore(self, *objs: Any) -> TensorMemory:
        """Do not count tensors that exist already (model weights, the batch): an operation
        that returns one of them, or a view of it, allocates nothing."""
        for obj in objs:
            if isinstance(obj, torch.nn.Module):
                tensors = [*obj.parameters(), *obj.buffers()]
            elif isinstance(obj, torch.Tensor):
                tensors = [obj]
            else:
                tensors = [t for t in tree_flatten(obj)[0] if isinstance(t, torch.Tensor)]
            for t in tensors:
                self._sizes[t.untyped_storage()] = 0
        return self

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def _track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        if st in self._sizes:
            return
        n = st.nbytes()
        self._sizes[st] = n
        weakref.finalize(st, self._free, n)
        self.live += n
        self.peak = max(self.peak, self.live)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and not t.is_meta:
                self._track(t)
        return out

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start, outer_peak = self.live, self.peak
        self.peak = self.live
        try:
            yield
        finally:
            self.phases[name] = {
                "start_mib": start / MIB,
                "peak_above_start_mib": (self.peak - start) / MIB,
                "held_after_mib": (self.live - start) / MIB,
            }
            self.peak = max(self.peak, outer_peak)


# ----------------------------------------------------------------------- the allocator

M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
MMAP_THRESHOLD = 128 * 1024  # glibc's initial value, kept fixed


def limit_allocator_caching() -> bool:
    """Give freed activation buffers back to the OS (glibc): True when applied.

    glibc raises its mmap threshold each time a large block is freed (up to 32 MiB), after
    which blocks of that size come from the heap, and the heap keeps what is freed in it.
    A training step allocates and frees hundreds of such buffers (activations, logits), so
    the process's resident memory grows far past its live tensors (docs/memory.md: 322 MiB
    kept after freeing 4–12 MiB tensors; +0.5 GiB peak RSS for one adapter, more with K
    sequential passes). A fixed threshold keeps large blocks mmapped, returned on free.
    """
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False


# ----------------------------------------------------------------------- the estimate

GIB = 2**30
FIT_FRACTION = 0.5  # activations may take this share of the memory available (the rest:
# allocator caching, the backward pass's transients, other processes)


def activation_bytes(
    model_config: Any,
    tokens: int,
    *,
    lora_dropout: float,
    checkpointing: bool,
    dtype_bytes: int = 4,
) -> int:
    """Estimated bytes one member's forward pass keeps for its backward pass.

    Per token and decoder layer a LoRA-adapted Llama-style layer saves about 7·H + 4·I
    values (norms, attention inputs/outputs, the MLP's gate/up/act/product); LoRA dropout
    adds a dropped-out copy of each adapted input with its mask (≈ 6·H + I values and as
    many bytes). With gradient checkpointing only each layer's input (H) is kept, plus one
    layer's full set while it is recomputed. Calibrated on SmolLM2-135M (docs/memory.md:
    the estimate against the measured live tensors).
    """
    h = int(model_config.hidden_size)
    i = int(getattr(model_config, "intermediate_size", 4 * h))
    layers = int(model_config.num_hidden_layers)
    per_layer = (7 * h + 4 * i) * dtype_bytes
    if lora_dropout > 0:
        per_layer += (6 * h + i) * (dtype_bytes + 1)
    if checkpointing:
        return tokens * (layers * h * dtype_bytes + per_layer)
    return tokens * layers * per_layer


def available_bytes(device: Any) -> int:
    """Memory free for this process now: the CUDA device's free memory, else MemAvailable."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        return int(torch.cuda.mem_get_info(dev)[0])
    import os
    from pathlib import Path

    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text(encoding="ascii").splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024

    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def choose_member_memory(
    requested: str, members: int, per_member: int, available: int, checkpointing: bool = False
) -> tuple[str, str | None]:
    """(mode to use, warning or None) for ``--member-memory``, from the estimate.

    ``auto``: coupled when all K members' activations fit in FIT_FRACTION of the memory
    available (it is a little faster), else sequential; always sequential with gradient
    checkpointing and K > 1 (a coupled graph's recomputation would run every member's layers
    with the adapter active at backward time, the last one). An explicit mode is kept; when
    the estimate says it will not fit, the warning names the one that would.
    """
    if requested == "auto" and checkpointing and members > 1:
        return "sequential", None
    budget = FIT_FRACTION * available
    coupled, sequential = members * per_member, per_member
    need = (
        f"≈{coupled / GIB:.2f} GiB of activations coupled, ≈{sequential / GIB:.2f} GiB sequential"
    )
    have = f"{available / GIB:.1f} GiB available"
    if requested == "auto":
        return ("coupled" if coupled <= budget else "sequential"), None
    if requested == "coupled" and coupled > budget:
        if sequential <= budget:
            return requested, (
                f"--member-memory coupled may not fit ({need}, {have}): "
                "--member-memory sequential would (the same gradient)"
            )
        return requested, (
            f"--member-memory coupled may not fit ({need}, {have}), nor would sequential: "
            "add --gradient-checkpointing or lower --batch-size / --max-length"
        )
    if requested == "sequential" and sequential > budget:
        return requested, (
            f"--member-memory sequential may not fit ({need}, {have}): "
            "add --gradient-checkpointing or lower --batch-size / --max-length"
        )
    return requested, None
