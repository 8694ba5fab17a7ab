"""Watch the engine; restart a vLLM child that died or stopped answering.

One task per gateway (started in the app's lifespan) probes the engine every
``interval`` seconds. With a child process (``softspec serve`` without ``--vllm-url``):

* the child exited (noticed within ``EXIT_POLL`` seconds, not at the next probe), or ``failures`` health checks in a row failed → the engine is *down*;
  the child is killed (its whole process group) and started again on the same port: at
  once, then after ``backoff`` seconds, doubling per failed attempt (at most 30 s);
* ``max_restarts`` failed attempts in a row → *failed*: ``on_give_up`` is called (the
  CLI stops the gateway with a non-zero exit code, so an outer supervisor takes over).

With an external engine (``--vllm-url``) nothing is restarted: the engine is *down* after
``failures`` failed checks and *up* again at the first check that passes (the HTTP client
reconnects by itself).

While the engine is not up, :meth:`EngineSupervisor.check` raises a 503 with
``Retry-After`` (what is left of the last measured start-up time), so requests are
refused at once instead of waiting on a dead upstream.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal, Protocol

from server.errors import UpstreamUnavailableError
from server.metrics import Metrics

__all__ = ["ChildGroup", "EngineSupervisor", "Restartable", "Spawnable"]

log = logging.getLogger("softspec.server")

State = Literal["up", "down", "restarting", "failed"]
MAX_BACKOFF = 30.0
EXIT_POLL = 0.2  # seconds between checks that the child is still running (a cheap waitpid)


class Restartable(Protocol):
    """What the supervisor needs of a child process (:class:`server.vllm_process.VLLMProcess`)."""

    @property
    def startup_seconds(self) -> float | None: ...

    def running(self) -> bool: ...

    def exit_code(self) -> int | None: ...

    def restart(self) -> None:
        """Blocking: kill, start again on the same address, return once healthy (or raise)."""
        ...


class EngineSupervisor:
    """See the module docstring."""

    def __init__(
        self,
        probe: Callable[[], Awaitable[bool]],
        metrics: Metrics,
        *,
        process: Restartable | None = None,
        interval: float = 2.0,
        timeout: float = 10.0,
        failures: int = 3,
        max_restarts: int = 5,
        backoff: float = 1.0,
        on_give_up: Callable[[str], None] | None = None,
    ) -> None:
        self.probe = probe
        self.metrics = metrics
        self.process = process
        self.interval = interval
        self.timeout = timeout
        self.failures = failures
        self.max_restarts = max_restarts
        self.backoff = backoff
        self.on_give_up = on_give_up
        self.state: State = "up"
        self.detail = "healthy"
        self.down_since: float | None = None
        self.restarts = 0
        metrics.engine_up.set(1)

    # ------------------------------------------------------------------ for the routes

    @property
    def up(self) -> bool:
        return self.state == "up"

    def retry_after(self) -> float:
        """Seconds until the engine is likely back (the rest of a start-up), at least 1."""
        startup = getattr(self.process, "startup_seconds", None) or 5.0
        elapsed = 0.0 if self.down_since is None else time.monotonic() - self.down_since
        return max(1.0, startup - elapsed)

    def check(self) -> None:
        """Raise the 503 a request gets while the engine is not up."""
        if self.state != "up":
            raise UpstreamUnavailableError(
                f"the engine is {self.state} ({self.detail}); retry later",
                retry_after=self.retry_after(),
            )

    def status(self) -> dict[str, Any]:
        """The engine's part of ``/health``."""
        down_for = None if self.down_since is None else time.monotonic() - self.down_since
        startup = getattr(self.process, "startup_seconds", None)
        return {
            "state": self.state,
            "detail": self.detail,
            "restarts": self.restarts,
            "down_for_s": None if down_for is None else round(down_for, 1),
            "last_start_s": None if startup is None else round(startup, 1),
            "supervised": self.process is not None,
        }

    # ------------------------------------------------------------------ the watch loop

    async def run(self) -> None:
        failed = 0
        while self.state != "failed":
            await self._pause()
            if self.process is not None and not self.process.running():
                self._down(f"the vLLM process exited with code {self.process.exit_code()}")
                await self._restart()
                failed = 0
                continue
            if await self._healthy():
                failed = 0
                if self.state != "up":
                    self._up("the engine answers again")
                continue
            failed += 1
            if failed < self.failures:
                continue
            self._down(f"{failed} health checks in a row failed")
            if self.process is not None:
                await self._restart()
                failed = 0

    async def _pause(self) -> None:
        """Sleep one probe interval; wake early when the child process exits."""
        end = time.monotonic() + self.interval
        while (left := end - time.monotonic()) > 0:
            if self.process is not None and not self.process.running():
                return
            await asyncio.sleep(min(EXIT_POLL, left))

    async def _healthy(self) -> bool:
        try:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for returns the probe's
            # result when a cancellation arrives as the probe finishes, so the watch loop
            # outlived the app's shutdown (which then waited on it for ever)
            async with asyncio.timeout(self.timeout):
                return await self.probe()
        except Exception as exc:  # a probe that fails in any way is a failed check
            log.debug("engine health check failed: %r", exc)
            return False

    async def _restart(self) -> None:
        assert self.process is not None
        for attempt in range(1, self.max_restarts + 1):
            # the first attempt at once (a crash is usually a one-off), then backing off
            delay = 0.0 if attempt == 1 else min(self.backoff * 2 ** (attempt - 2), MAX_BACKOFF)
            self.detail = f"restart {attempt}/{self.max_restarts} in {delay:g} s"
            await asyncio.sleep(delay)
            self.state = "restarting"
            self.detail = f"restart {attempt}/{self.max_restarts} in progress"
            log.warning("restarting vLLM (attempt %d/%d)", attempt, self.max_restarts)
            try:
                await asyncio.to_thread(self.process.restart)
            except Exception as exc:  # any failed start counts as one attempt
                self.metrics.engine_restarts.labels("failed").inc()
                self.state = "down"
                self.detail = f"restart {attempt}/{self.max_restarts} failed: {exc}"
                log.error("vLLM restart %d/%d failed: %s", attempt, self.max_restarts, exc)
                continue
            self.metrics.engine_restarts.labels("ok").inc()
            self.restarts += 1
            self._up(f"restarted (restart {self.restarts})")
            return
        self.state = "failed"
        self.detail = f"vLLM did not come back after {self.max_restarts} restarts"
        log.error("giving up: %s", self.detail)
        if self.on_give_up is not None:
            self.on_give_up(self.detail)

    def _down(self, why: str) -> None:
        if self.state == "up":
            self.down_since = time.monotonic()
            log.error("engine down: %s", why)
        self.state = "down"
        self.detail = why
        self.metrics.engine_up.set(0)

    def _up(self, why: str) -> None:
        took = 0.0 if self.down_since is None else time.monotonic() - self.down_since
        log.warning("engine up: %s (down for %.1f s)", why, took)
        self.state = "up"
        self.detail = "healthy"
        self.down_since = None
        self.metrics.engine_up.set(1)


class Spawnable(Restartable, Protocol):
    """A child that can be spawned without waiting (:class:`server.vllm_process.VLLMProcess`)."""

    def restart(self, wait: bool = True) -> None: ...

    def wait_ready(self) -> None: ...


class ChildGroup:
    """Several children supervised as one engine (the vLLM server and the ``prompt_distance``
    embedder): down when any is down; a restart starts again the ones that exited (all of
    them when none did, i.e. when the health checks failed), spawning each from the calling
    thread (a child dies with the thread that spawned it) and then waiting for all."""

    def __init__(self, *children: Spawnable) -> None:
        if not children:
            raise ValueError("a child group needs at least one child")
        self.children = children

    @property
    def startup_seconds(self) -> float | None:
        known = [c.startup_seconds for c in self.children if c.startup_seconds is not None]
        return max(known) if known else None

    def running(self) -> bool:
        return all(c.running() for c in self.children)

    def exit_code(self) -> int | None:
        return next((c.exit_code() for c in self.children if not c.running()), None)

    def restart(self) -> None:
        todo = [c for c in self.children if not c.running()] or list(self.children)
        for c in todo:
            c.restart(wait=False)
        for c in todo:
            c.wait_ready()  # the first failure propagates (the supervisor retries)
