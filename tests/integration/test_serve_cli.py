"""``softspec serve``: its own vLLM child (stopped on SIGTERM) and clear start-up failures."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import start_gateway, stop

pytestmark = pytest.mark.slow


def processes_with(marker: str) -> list[int]:
    """PIDs whose environment carries ``marker`` (children inherit it)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if marker.encode() in env:
            found.append(int(pid))
    return found


def serve(
    *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "softspec.cli", "serve", *args],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )  # fmt: skip


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("softspec: error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return errors[0]


def test_serve_starts_and_stops_its_own_vllm(same_ensemble: Path) -> None:
    marker = f"SOFTSPEC_TEST_MARKER={uuid.uuid4().hex}"
    key, value = marker.split("=")
    proc, url = start_gateway(same_ensemble, None, env={key: value})
    try:
        assert len(processes_with(marker)) >= 2  # the gateway and its vLLM child(ren)
        r = httpx.post(
            f"{url}/v1/completions",
            json={"model": "same", "prompt": "Hello", "max_tokens": 4},
            timeout=300,
        )
        assert r.status_code == 200, r.text
    finally:
        code = stop(proc)
    assert code == 0
    assert processes_with(marker) == []  # no orphan vLLM


def test_bad_manifest_and_missing_adapter(same_ensemble: Path, tmp_path: Path) -> None:
    err = one_line_error(serve("--ensemble", str(tmp_path)))
    assert "ensemble.json not found" in err
    broken = tmp_path / "broken"
    shutil.copytree(same_ensemble, broken)
    (broken / "adapters" / "m1" / "adapter_model.safetensors").unlink()
    assert "member m1" in one_line_error(serve("--ensemble", str(broken)))
    raw = json.loads((same_ensemble / "ensemble.json").read_text())
    raw["alpha"] = -1
    bad = tmp_path / "bad"
    shutil.copytree(same_ensemble, bad)
    (bad / "ensemble.json").write_text(json.dumps(raw))
    assert "alpha" in one_line_error(serve("--ensemble", str(bad)))
    assert "--ensemble is required" in one_line_error(serve())
    assert "gate" in one_line_error(
        serve("--ensemble", str(same_ensemble), "--gate-score", "vibes")
    )


def test_port_in_use(same_ensemble: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        err = one_line_error(serve("--ensemble", str(same_ensemble), "--port", str(port)))
    assert f"port {port}" in err and "in use" in err


def test_vllm_failing_to_start_leaves_nothing(same_ensemble: Path, tmp_path: Path) -> None:
    marker = uuid.uuid4().hex
    fake_base = tmp_path / "not-a-model"
    fake_base.mkdir()
    (fake_base / "config.json").write_text("{}")
    proc = serve(
        "--ensemble",
        str(same_ensemble),
        "--base-model",
        str(fake_base),
        env={"SOFTSPEC_TEST_MARKER": marker},
    )
    err = one_line_error(proc)
    assert "vLLM exited" in err and "log" in err
    assert processes_with(f"SOFTSPEC_TEST_MARKER={marker}") == []
