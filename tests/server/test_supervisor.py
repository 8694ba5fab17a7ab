"""EngineSupervisor's watch loop against a fake child process (no vLLM)."""

from __future__ import annotations

import asyncio
import time

import pytest

from server.errors import UpstreamUnavailableError
from server.metrics import Metrics
from server.supervisor import EngineSupervisor


class FakeChild:
    """A child process whose death and restarts the test controls."""

    def __init__(self, fail_restarts: int = 0) -> None:
        self.alive = True
        self.startup_seconds: float | None = 3.0
        self.restarted_at: list[float] = []
        self.fail_restarts = fail_restarts

    def running(self) -> bool:
        return self.alive

    def exit_code(self) -> int | None:
        return None if self.alive else -9

    def restart(self, wait: bool = True) -> None:
        self.restarted_at.append(time.monotonic())
        self.alive = True
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        if self.fail_restarts > 0:
            self.fail_restarts -= 1
            self.alive = False
            raise RuntimeError("did not come up")


async def _healthy() -> bool:
    return True


def _sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_a_dead_child_is_noticed_before_the_next_probe() -> None:
    """With a 30 s probe interval, the exit is still noticed and the child restarted at once."""

    async def scenario() -> tuple[float, EngineSupervisor, FakeChild, Metrics]:
        child, metrics = FakeChild(), Metrics()
        watch = EngineSupervisor(_healthy, metrics, process=child, interval=30.0)
        task = asyncio.create_task(watch.run())
        await asyncio.sleep(0.3)
        assert watch.up and not child.restarted_at
        child.alive = False
        died = time.monotonic()
        while not child.restarted_at:
            await asyncio.sleep(0.01)
            assert time.monotonic() - died < 5.0, "the exit was not noticed"
        await asyncio.sleep(0.05)
        task.cancel()
        return child.restarted_at[0] - died, watch, child, metrics

    took, watch, _, metrics = asyncio.run(scenario())
    assert took < 0.5  # EXIT_POLL = 0.2 s; the probe interval is 30 s
    assert watch.up and watch.restarts == 1
    assert _sample(metrics, "softspec_engine_restarts_total", result="ok") == 1
    assert _sample(metrics, "softspec_engine_up") == 1


def test_failed_restarts_back_off_then_give_up() -> None:
    gave_up: list[str] = []

    async def scenario() -> tuple[EngineSupervisor, FakeChild, Metrics]:
        child, metrics = FakeChild(fail_restarts=99), Metrics()
        watch = EngineSupervisor(
            _healthy, metrics, process=child, interval=0.05, max_restarts=3, backoff=0.1,
            on_give_up=gave_up.append,
        )  # fmt: skip
        child.alive = False
        await asyncio.wait_for(watch.run(), timeout=10)  # returns once failed
        return watch, child, metrics

    watch, child, metrics = asyncio.run(scenario())
    assert watch.state == "failed" and len(gave_up) == 1 and "3 restarts" in gave_up[0]
    gaps = [b - a for a, b in zip(child.restarted_at, child.restarted_at[1:], strict=False)]
    assert len(child.restarted_at) == 3
    assert gaps[0] == pytest.approx(0.1, abs=0.08) and gaps[1] == pytest.approx(0.2, abs=0.08)
    assert _sample(metrics, "softspec_engine_restarts_total", result="failed") == 3
    with pytest.raises(UpstreamUnavailableError) as err:
        watch.check()
    assert "failed" in str(err.value)


def test_external_engine_goes_down_and_comes_back_without_restarts() -> None:
    answers = [True, False, False, True]

    async def probe() -> bool:
        return answers.pop(0) if answers else True

    async def scenario() -> list[str]:
        watch = EngineSupervisor(probe, Metrics(), interval=0.02, failures=2)
        task = asyncio.create_task(watch.run())
        states: list[str] = []
        for _ in range(40):
            await asyncio.sleep(0.01)
            if not states or states[-1] != watch.state:
                states.append(watch.state)
        task.cancel()
        assert watch.restarts == 0
        return states

    assert asyncio.run(scenario()) == ["up", "down", "up"]


def test_a_child_group_restarts_only_the_child_that_died() -> None:
    from server.supervisor import ChildGroup

    vllm, embedder = FakeChild(), FakeChild()
    embedder.startup_seconds = 7.0
    group = ChildGroup(vllm, embedder)
    assert group.running() and group.exit_code() is None and group.startup_seconds == 7.0
    embedder.alive = False
    assert not group.running() and group.exit_code() == -9
    group.restart()
    assert (len(vllm.restarted_at), len(embedder.restarted_at)) == (0, 1) and group.running()
    group.restart()  # both alive but unhealthy: both start again
    assert (len(vllm.restarted_at), len(embedder.restarted_at)) == (1, 2)
    embedder.alive, embedder.fail_restarts = False, 1
    with pytest.raises(RuntimeError, match="did not come up"):
        group.restart()


def test_the_cpu_embedder_runs_one_unpinned_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """Beside the generating vLLM on the same cores, the embedder does not pin its threads
    (vLLM's default would bind both servers to the same cores: ×1.20 latency, measured)."""
    from server import vllm_process
    from server.vllm_process import VLLMProcess

    monkeypatch.setattr(vllm_process, "cuda_available", lambda: False)
    for name in ("VLLM_CPU_OMP_THREADS_BIND", "OMP_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    embedder = VLLMProcess("base", embedder=True)
    env = embedder.env()
    assert (env["VLLM_CPU_OMP_THREADS_BIND"], env["OMP_NUM_THREADS"]) == ("nobind", "1")
    assert "--runner" in embedder.command() and "--enable-lora" not in embedder.command()
    generator = VLLMProcess("base", adapters={"a": "/x"})
    assert "VLLM_CPU_OMP_THREADS_BIND" not in generator.env()


def test_a_cancel_that_meets_a_finishing_probe_still_stops_the_watch() -> None:
    """The app's shutdown cancels the watch loop; the cancel can land in the very step in
    which a health probe finishes. The loop must stop all the same (on Python 3.11,
    ``asyncio.wait_for`` returned the probe's result and swallowed such a cancel, so the
    loop ran on and the shutdown waited on it for ever)."""

    async def scenario() -> bool:
        probing = asyncio.Event()
        answer: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

        async def probe() -> bool:
            probing.set()
            return await answer

        watch = EngineSupervisor(probe, Metrics(), interval=0.001)
        task = asyncio.create_task(watch.run())
        await probing.wait()
        answer.set_result(True)  # the probe finishes in the next step ...
        task.cancel()  # ... and the cancel arrives in the same one
        done, _ = await asyncio.wait({task}, timeout=2.0)
        if not done:  # a probe that never finishes takes the next cancel (or asyncio.run's
            watch.probe = lambda: asyncio.sleep(3600, True)  # own cancel would hang too)
            await asyncio.sleep(0.05)
            task.cancel()
            await asyncio.wait({task}, timeout=2.0)
        return task in done and task.cancelled()

    assert asyncio.run(scenario()), "the watch loop outlived its cancellation"
