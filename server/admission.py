"""Admission control: a bound on running ensemble requests and on the queue waiting for them.

Up to ``max_concurrency`` requests hold a slot; up to ``max_queue`` more wait for one, in
arrival order (``asyncio.Semaphore`` is FIFO). A request that finds every slot busy and
the queue full is refused at once (:class:`~server.errors.OverloadedError`, 429 with
``Retry-After``) instead of queueing behind work it would time out waiting for. A waiter
that is cancelled (its client went away, its deadline passed) leaves the queue and never
reaches the engine.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from server.errors import OverloadedError
from server.metrics import Metrics

__all__ = ["Admission"]

_SMOOTHING = 0.2  # EWMA weight of the newest slot-hold time (for Retry-After)


class Admission:
    """See the module docstring; one per app."""

    def __init__(self, max_concurrency: int, max_queue: int, metrics: Metrics) -> None:
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.metrics = metrics
        self.active = 0
        self.waiting = 0
        self._sem = asyncio.Semaphore(max_concurrency)  # binds to the loop on first wait
        self._hold = 1.0  # smoothed seconds a request holds its slot

    def retry_after(self) -> float:
        """Seconds until a slot is likely free: the queue ahead, drained at the observed rate."""
        return min(60.0, max(1.0, self._hold * (self.waiting + 1) / self.max_concurrency))

    def refuse_if_full(self) -> None:
        """Raise the 429 now if every slot is busy and the queue is full.

        Synchronous, so a route can refuse before it creates any task or awaits anything:
        on a busy event loop every await is a wait behind other requests' work.
        """
        if self._sem.locked() and self.waiting >= self.max_queue:
            self.metrics.rejected.labels("queue_full").inc()
            raise OverloadedError(
                f"the server is at capacity ({self.active} requests running, {self.waiting} "
                f"waiting); retry after the Retry-After interval",
                retry_after=self.retry_after(),
            )

    async def acquire(self) -> None:
        """Take a slot, waiting in the queue if needed; 429 at once when the queue is full."""
        self.refuse_if_full()
        self.waiting += 1
        self.metrics.waiting.inc()
        t0 = time.perf_counter()
        try:
            await self._sem.acquire()
        except asyncio.CancelledError:
            self.metrics.rejected.labels("cancelled_in_queue").inc()
            raise
        finally:
            self.waiting -= 1
            self.metrics.waiting.dec()
            self.metrics.queue_wait.observe(time.perf_counter() - t0)
        self.active += 1
        self.metrics.active.inc()

    def release(self, held: float) -> None:
        """Give the slot back after holding it for ``held`` seconds."""
        self.active -= 1
        self.metrics.active.dec()
        self._hold += _SMOOTHING * (held - self._hold)
        self._sem.release()

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        await self.acquire()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.release(time.perf_counter() - t0)
