"""Start and stop a ``softspec serve`` process for the jobs that need one (demo, eval)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

import httpx

from ensemble.errors import SoftspecError
from server.vllm_process import die_with_parent, free_port

__all__ = ["sigterm_as_interrupt", "start_server", "stop_server"]


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Inside: SIGTERM (``kill``, ``docker stop``) unwinds like Ctrl-C, so the ``finally``
    blocks that stop servers and the atomic writes' clean-up run before the process exits."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def start_server(
    ensemble: Path,
    engine: str,
    log: Path,
    extra: Sequence[str] = (),
    timeout: float = 900,
    env: Mapping[str, str] | None = None,
) -> tuple[subprocess.Popen[bytes], str]:
    """``softspec serve`` on a free loopback port; returns once ``/ready`` answers 200."""
    port = free_port()
    cmd = [sys.executable, "-m", "softspec.cli", "serve", "--ensemble", str(ensemble)]
    cmd += ["--engine", engine, "--port", str(port), "--log-level", "warning", *extra]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            cmd,
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches us only; we stop the server in order
            preexec_fn=die_with_parent if sys.platform == "linux" else None,  # we died hard
            env={**os.environ, **(env or {})},
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-1500:]
            raise SoftspecError(f"the server exited with code {proc.returncode}; see {log}: {tail}")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_server(proc)
    raise SoftspecError(f"the server did not become ready within {timeout:.0f}s; see {log}")


def stop_server(proc: subprocess.Popen[bytes] | None) -> int | None:
    """SIGTERM (the server stops its vLLM child), then SIGKILL the group if it lingers."""
    if proc is None or proc.poll() is not None:
        return None if proc is None else proc.returncode
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    return proc.returncode
