"""The supervisor's give-up path end to end: ``softspec serve`` exits 3 when vLLM will not come back.

The real CLI, uvicorn, :class:`server.vllm_process.VLLMProcess` and supervisor run in a
subprocess; only the vLLM module the child is started with is replaced by this file's
``__main__`` (a fake server: the first start answers ``/health`` for a moment and then
exits, every later start exits at once, as a vLLM whose GPU or model went away would).
"""

from __future__ import annotations

import argparse
import http.server
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.server.conftest import make_manifest

ROOT = Path(__file__).resolve().parents[2]
FAKE = "tests.server.test_supervisor_exit"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serve_exits_3_when_vllm_cannot_be_restarted(tmp_path: Path) -> None:
    make_manifest(tmp_path / "ens")
    starts = tmp_path / "starts"
    script = (
        "import sys, server.vllm_process as p; p.VLLM_MODULE = sys.argv[1]; "
        "from softspec.cli import main; sys.exit(main(sys.argv[2:]))"
    )
    env = {
        **os.environ,
        "FAKE_VLLM_STARTS": str(starts),
        "SOFTSPEC_VLLM_HEALTH_INTERVAL": "0.2",
        "SOFTSPEC_VLLM_MAX_RESTARTS": "2",
        "SOFTSPEC_VLLM_RESTART_BACKOFF": "0.1",
    }
    cmd = [sys.executable, "-c", script, FAKE, "serve", "--ensemble", str(tmp_path / "ens"),
           "--engine", "vllm", "--port", str(_free_port()), "--log-level", "warning"]  # fmt: skip
    t0 = time.monotonic()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    took = time.monotonic() - t0
    err = done.stderr
    assert done.returncode == 3, err  # EXIT_ENGINE_LOST: an outer supervisor takes over
    assert "softspec: serving ens" in err, err  # it did serve before the engine was lost
    assert "vLLM did not come back after 2 restarts" in err, err
    # one start that served, then exactly the two failed restarts the setting allows
    assert starts.read_text().count("\n") == 3, starts.read_text()
    assert "restart 2/2 failed" in err and "restart 3/" not in err, err
    assert took < 100, took


# ---------------------------------------------------------------------- the fake vLLM


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # the http.server API
        self.send_response(200 if self.path == "/health" else 404)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def _fake_vllm() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    args, _ = p.parse_known_args()
    starts = Path(os.environ["FAKE_VLLM_STARTS"])
    first = not starts.exists()
    with starts.open("a") as f:
        f.write(f"{os.getpid()}\n")
    if not first:
        print("fake vLLM: RuntimeError: no device", flush=True)
        return 1
    server = http.server.HTTPServer((args.host, args.port), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    time.sleep(3.0)  # long enough for the gateway to start serving
    return 1


if __name__ == "__main__":
    sys.exit(_fake_vllm())
