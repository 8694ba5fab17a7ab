"""Start and stop a vLLM OpenAI-compatible server as a child process (no torch import).

Used by ``softspec serve --engine vllm`` (without ``--vllm-url``), by the benchmarks and
by the integration tests. The child runs in its own process group and gets SIGTERM if
this process dies (Linux ``PR_SET_PDEATHSIG``), so no orphan survives us; :meth:`stop`
terminates the whole group and escalates to SIGKILL.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import httpx

from ensemble.errors import SoftspecError
from server.vllm_args import VLLM_MODULE, cuda_available, embedder_args, server_args

__all__ = ["EngineStartError", "VLLMProcess", "die_with_parent", "free_port"]


class EngineStartError(SoftspecError):
    """vLLM did not come up: the message carries the last meaningful line of its log."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def die_with_parent() -> None:  # pragma: no cover - runs in the child
    """preexec_fn: this child gets SIGTERM when its parent dies (Linux PR_SET_PDEATHSIG)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class VLLMProcess:
    """A vLLM OpenAI server on loopback serving ``model`` and LoRA ``adapters``.

    ``adapters`` maps served names to adapter directories (``--lora-modules name=path``).
    With ``embedder`` it is instead the base model as a pooling model that returns every
    prompt token's last hidden state (:func:`server.vllm_args.embedder_args`).
    """

    model: str
    adapters: Mapping[str, str] = field(default_factory=dict)
    max_lora_rank: int = 16
    max_logprobs: int = 20
    max_model_len: int = 2048
    dtype: str = "float32"
    host: str = "127.0.0.1"
    port: int = 0
    extra_args: Sequence[str] = ()
    startup_timeout: float = 600.0
    log_path: Path | None = None
    embedder: bool = False
    startup_seconds: float | None = field(default=None, init=False)  # of the last start
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _log: object | None = field(default=None, init=False, repr=False)
    _closed: bool = field(default=False, init=False, repr=False)
    _returncode: int | None = field(default=None, init=False, repr=False)
    _t0: float = field(default=0.0, init=False, repr=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        if self.embedder:
            args = embedder_args(
                model=self.model, host=self.host, port=self.port,
                max_model_len=self.max_model_len, dtype=self.dtype, eager=not cuda_available(),
                extra=self.extra_args,
            )  # fmt: skip
            return [sys.executable, "-m", VLLM_MODULE, *args]
        args = server_args(
            model=self.model, adapters=self.adapters, host=self.host, port=self.port,
            max_lora_rank=self.max_lora_rank, max_logprobs=self.max_logprobs,
            max_model_len=self.max_model_len, dtype=self.dtype, eager=not cuda_available(),
            extra=self.extra_args,
        )  # fmt: skip
        return [sys.executable, "-m", VLLM_MODULE, *args]

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        if not cuda_available():
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default share is too small
            if self.embedder:  # one unpinned thread: leave the cores to the generating server
                env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
                env.setdefault("OMP_NUM_THREADS", "1")
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        return env

    def start(self, wait: bool = True) -> VLLMProcess:
        """Spawn the server and (``wait``) block until it is healthy; without ``wait``
        call :meth:`wait_ready` later (to start several servers at once).

        The child gets SIGTERM when the *thread* that spawned it ends (``PR_SET_PDEATHSIG``
        follows the thread), so spawn from a thread that lives as long as the server."""
        if self.port == 0:
            self.port = free_port(self.host)
        elif not _port_free(self.host, self.port):
            raise EngineStartError(f"port {self.port} on {self.host} is in use: choose another")
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="softspec-vllm-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
        self._spawn("wb", wait)
        return self

    def restart(self, wait: bool = True) -> None:
        """Kill the server (whole group), start it again on the same port, wait until healthy.

        Blocking (the gateway's supervisor runs it in a thread). Appends to the same log.
        Raises :class:`EngineStartError` when it does not come up, or after :meth:`stop`.
        """
        if self._closed:
            raise EngineStartError("the vLLM process was stopped")
        self._kill()
        deadline = time.monotonic() + 30
        while not _port_free(self.host, self.port):  # the old group may take a moment to go
            if time.monotonic() > deadline:
                raise EngineStartError(f"port {self.port} on {self.host} stayed in use")
            time.sleep(0.2)
        self._spawn("ab", wait)

    def _spawn(self, mode: str, wait: bool = True) -> None:
        assert self.log_path is not None
        if self._closed:
            raise EngineStartError("the vLLM process was stopped")
        self._log = open(self.log_path, mode)  # noqa: SIM115 - closed in stop()
        self._t0 = time.monotonic()
        self._returncode = None
        self._proc = subprocess.Popen(
            self.command(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env(),
            start_new_session=True,
            preexec_fn=die_with_parent if sys.platform == "linux" else None,
        )
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Block until the spawned server is healthy; kill it and raise if it is not."""
        try:
            if self._closed:  # stop() ran in another thread while we were spawning
                raise EngineStartError("the vLLM process was stopped")
            self._wait_ready()
        except BaseException:
            self._kill()
            raise
        self.startup_seconds = time.monotonic() - self._t0

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            proc = self._proc
            if proc is None:
                raise EngineStartError("the vLLM process was stopped during start-up")
            if proc.poll() is not None:
                raise EngineStartError(
                    f"vLLM exited with code {proc.returncode} during start-up: "
                    f"{self.log_summary()} (full log: {self.log_path})"
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                    return
            time.sleep(0.5)
        raise EngineStartError(
            f"vLLM did not become healthy within {self.startup_timeout:.0f}s "
            f"(full log: {self.log_path})"
        )

    def log_summary(self) -> str:
        """The most telling line of the log: the last error, else the last line."""
        if self.log_path is None or not self.log_path.exists():
            return "no log"
        lines = [ln.strip() for ln in self.log_path.read_text(errors="replace").splitlines()]
        lines = [ln for ln in lines if ln]
        for ln in reversed(lines):
            if "Error" in ln and not ln.endswith("Error") and "Traceback" not in ln:
                return ln[-400:]
        return lines[-1][-400:] if lines else "empty log"

    def running(self) -> bool:
        proc = self._proc
        return proc is not None and proc.poll() is None

    def exit_code(self) -> int | None:
        """The exit code of the server that died (None while it runs)."""
        proc = self._proc
        return proc.poll() if proc is not None else self._returncode

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return None if proc is None else proc.pid

    def stop(self, timeout: float = 30.0) -> None:
        """Terminate the server's whole process group; SIGKILL what outlives ``timeout``.

        Final: a :meth:`restart` running in another thread gives up.
        """
        self._closed = True
        self._kill(timeout)

    def _kill(self, timeout: float = 30.0) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
            # workers may linger a moment after the leader exits
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            self._returncode = proc.returncode
        if self._log is not None:
            self._log.close()  # type: ignore[attr-defined]
            self._log = None

    def __enter__(self) -> VLLMProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _port_free(host: str, port: int) -> bool:
    """Whether a server could listen on ``port`` (connections in TIME_WAIT do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True
