"""vLLM's side of lock-step mixture decoding (:mod:`server.lockstep` has the contract).

Loaded inside vLLM by its flags (:func:`server.lockstep.vllm_flags`)::

    --logits-processors server.lockstep_vllm:LockstepProcessor
    --scheduler-cls server.lockstep_vllm:GroupScheduler

Both were written against vLLM 0.32's V1 engine (the CPU backend runs the V1 model
runner). What they rely on, checked there:

* The sampler computes the returned log-probs from the **raw** logits before any logits
  processor runs (``logprobs_mode`` ``raw_logprobs``), so forcing a token leaves each row's
  returned log-probs those of its own member; a non-argmax-invariant processor also runs
  for greedy rows.
* ``BatchUpdate.added`` hands over each request's live list of output token ids, so the
  length of that list is the answer position the row's logits are for.
* The engine core hands every new request to ``Scheduler.add_request`` and aborts through
  ``Scheduler.finish_requests``.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from server.lockstep import GroupArgs, LockstepArgsError, parse_args
from server.mixture_torch import mixture_logprobs, nucleus

__all__ = ["Book", "GroupScheduler", "LockstepProcessor"]


@dataclass
class _Row:
    args: GroupArgs
    output: list[int]  # the request's live output token ids (vLLM appends to it)


@dataclass
class _Group:
    decided: dict[int, int] = field(default_factory=dict)  # answer position -> token
    generator: torch.Generator | None = None
    aborted: bool = False


class Book:
    """The processor's state: which batch row belongs to which group, and each group's
    decided tokens. :meth:`apply` is the whole algorithm (see :mod:`server.lockstep`)."""

    def __init__(self, max_groups: int = 4096) -> None:
        self.rows: dict[int, _Row] = {}
        self.groups: OrderedDict[str, _Group] = OrderedDict()
        self.max_groups = max_groups

    def add(self, index: int, args: GroupArgs | None, output: list[int]) -> None:
        if args is None:
            self.rows.pop(index, None)
            return
        self.rows[index] = _Row(args, output)
        if args.group not in self.groups:
            self.groups[args.group] = _Group()
            while len(self.groups) > self.max_groups:  # finished groups age out
                self.groups.popitem(last=False)

    def remove(self, index: int) -> None:
        self.rows.pop(index, None)

    def move(self, a: int, b: int, swap: bool) -> None:
        ra, rb = self.rows.pop(a, None), self.rows.pop(b, None)
        if ra is not None:
            self.rows[b] = ra
        if swap and rb is not None:
            self.rows[a] = rb

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return logits
        by_group: dict[str, list[tuple[int, _Row]]] = {}
        for i, row in self.rows.items():
            if i < logits.shape[0]:
                by_group.setdefault(row.args.group, []).append((i, row))
        forced: dict[int, int] = {}
        for name, rows in by_group.items():
            group = self.groups.setdefault(name, _Group())
            pending: list[tuple[int, _Row]] = []
            for i, row in rows:
                pos = len(row.output)
                if pos in group.decided:  # a late row: the group's token at its position
                    forced[i] = group.decided[pos]
                else:
                    pending.append((i, row))
            if pending:
                for i, tok in self._decide(group, pending, logits).items():
                    forced[i] = tok
        if forced:
            rows_t = torch.tensor(list(forced), device=logits.device)
            toks_t = torch.tensor(list(forced.values()), device=logits.device)
            logits[rows_t] = float("-inf")
            logits[rows_t, toks_t] = 0.0
        return logits

    @staticmethod
    def _decide(
        group: _Group, rows: list[tuple[int, _Row]], logits: torch.Tensor
    ) -> dict[int, int]:
        """One token for rows that have none at their position: the mixture's when the
        whole group is here at one position, else the abort token (recorded, so the rows
        that arrive there later stop too)."""
        first = rows[0][1].args
        positions = {len(r.output) for _, r in rows}
        members = sorted(r.args.index for _, r in rows)
        if group.aborted or len(positions) != 1 or members != list(range(first.size)):
            group.aborted = True
            for _, r in rows:
                group.decided[len(r.output)] = r.args.abort
            return {i: r.args.abort for i, r in rows}
        rows = sorted(rows, key=lambda ir: ir[1].args.index)
        mix = mixture_logprobs(logits[[i for i, _ in rows]], [r.args.weight for _, r in rows])
        if first.temperature > 0:
            if group.generator is None:
                group.generator = torch.Generator(device=logits.device)
                if first.seed >= 0:
                    group.generator.manual_seed(first.seed)
                else:
                    group.generator.seed()
            probs = nucleus(mix, first.temperature, first.top_p)
            tok = int(torch.multinomial(probs, 1, generator=group.generator))
        else:
            tok = int(torch.argmax(mix))
        group.decided[positions.pop()] = tok
        return {i: tok for i, _ in rows}


class LockstepProcessor(LogitsProcessor):
    """Chooses one token per complete group from the mixture and forces it in every row."""

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        try:
            parse_args(getattr(sampling_params, "extra_args", None))
        except LockstepArgsError as exc:
            raise ValueError(str(exc)) from exc

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        self.book = Book()

    def is_argmax_invariant(self) -> bool:
        return False  # it changes the argmax: greedy rows must run it too

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.book.remove(index)
        for index, params, _prompt, output in batch_update.added:
            self.book.add(index, parse_args(getattr(params, "extra_args", None)), output)
        for a, b, direction in batch_update.moved:
            self.book.move(a, b, swap=direction == MoveDirectionality.SWAP)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return self.book.apply(logits)


class GroupScheduler(Scheduler):
    """vLLM's scheduler, except that the requests of a lock-step group are held back until
    the whole group has arrived (or ``HOLD_S`` passed) and then queued together, so that
    they prefill in one step and decode side by side."""

    HOLD_S = 2.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._held: dict[str, tuple[float, int, list[Any]]] = {}

    def add_request(self, request: Any) -> None:
        params = getattr(request, "sampling_params", None)
        try:
            args = parse_args(getattr(params, "extra_args", None))
        except LockstepArgsError:
            args = None  # validated at the API server; not ours to refuse here
        if args is None or args.size == 1 or request.request_id in self.requests:
            super().add_request(request)
            return
        since, size, reqs = self._held.get(args.group, (time.monotonic(), args.size, []))
        reqs.append(request)
        if len(reqs) >= size:
            self._held.pop(args.group, None)
            for r in sorted(reqs, key=_index):
                super().add_request(r)
        else:
            self._held[args.group] = (since, size, reqs)

    def _release_overdue(self) -> None:
        now = time.monotonic()
        for name in [g for g, (since, _, _) in self._held.items() if now - since > self.HOLD_S]:
            for r in sorted(self._held.pop(name)[2], key=_index):
                super().add_request(r)  # incomplete: the processor aborts it

    def schedule(self, *args: Any, **kwargs: Any) -> Any:
        self._release_overdue()
        return super().schedule(*args, **kwargs)

    def get_num_unfinished_requests(self) -> int:
        held = sum(len(reqs) for _, _, reqs in self._held.values())
        return int(super().get_num_unfinished_requests()) + held

    def finish_requests(self, request_ids: Any, finished_status: Any) -> list[Any]:
        if isinstance(request_ids, str):
            request_ids = {request_ids}
        elif request_ids is not None:
            request_ids = set(request_ids)
        ids = request_ids
        if self._held:
            for name, (since, size, reqs) in list(self._held.items()):
                kept = [r for r in reqs if ids is not None and r.request_id not in ids]
                if len(kept) != len(reqs):
                    if kept:
                        self._held[name] = (since, size, kept)
                    else:
                        del self._held[name]
        return list(super().finish_requests(request_ids, finished_status))


def _index(request: Any) -> int:
    args = parse_args(request.sampling_params.extra_args)
    return args.index if args is not None else 0
