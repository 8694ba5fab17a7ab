"""`softspec demo` end to end on a tiny budget: trains, serves with vLLM, asks every prompt."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from ensemble.manifest import load as load_manifest
from softspec.cli import main
from softspec.demo import PROMPTS
from tests.integration.test_serve_cli import processes_with

pytestmark = pytest.mark.slow


def test_tiny_demo(smollm2_dir: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    ens, out = tmp_path / "ens", tmp_path / "report"
    args = ["demo", "--ensemble", str(ens), "--out", str(out), "--engine", "vllm",
            "--members", "2", "--max-steps", "1", "--max-tokens", "6",
            "--gate-calibration", "20"]  # fmt: skip
    assert main(args) == 0
    manifest = load_manifest(ens)
    assert len(manifest.members) == 2 and manifest.alpha == pytest.approx(0.8)
    # training calibrated the served gate on 20 prompts it held out
    assert manifest.gate.score_name == "combined" and manifest.gate.calibration is not None
    assert manifest.gate.calibration.n == 20
    report = json.loads((out / "report.json").read_text())
    assert [r["prompt"] for r in report["rows"]] == [p for _, p in PROMPTS]
    for row in report["rows"]:
        assert row["gate"] == ("pass" if row["combined"] <= manifest.gate.threshold else "flag")
        assert row["gate_score_name"] == "combined" and row["gate_score"] == row["combined"]
        assert sum(row["responsibilities"].values()) == pytest.approx(1.0, abs=1e-9)
    printed = capsys.readouterr().out
    assert "in-distribution: mean combined" in printed and "report.md" in printed
    assert (out / "report.md").exists() and list(out.glob("*.png"))
    # a second run reuses the ensemble instead of training again
    assert main([*args, "--out", str(tmp_path / "again")]) == 0
    assert "reusing" in capsys.readouterr().err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_demo_leaves_no_process_and_no_report(
    smol_ensemble: Path, tmp_path: Path, sig: signal.Signals
) -> None:
    """Ctrl-C (or ``kill``) while the prompts run: the server stops, nothing is half-written."""
    marker = f"SOFTSPEC_TEST_MARKER={uuid.uuid4().hex}"
    key, value = marker.split("=")
    ens, out = tmp_path / "ens", tmp_path / "report"
    shutil.copytree(smol_ensemble, ens)  # reused: no training
    with subprocess.Popen(
        [sys.executable, "-m", "softspec.cli", "demo", "--ensemble", str(ens), "--out", str(out),
         "--engine", "local", "--max-tokens", "8"],
        stderr=subprocess.PIPE, text=True, env={**os.environ, key: value},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as in a terminal
    ) as proc:  # fmt: skip
        assert proc.stderr is not None
        seen = []
        for line in proc.stderr:  # wait until the server answers the first prompt
            seen.append(line)
            if "epistemic" in line:
                break
        assert len(processes_with(marker)) >= 2, "".join(seen)  # the demo and its server
        proc.send_signal(sig)
        rest = proc.stderr.read()
        code = proc.wait(120)
    assert code == 130, "".join(seen) + rest
    assert "interrupted" in rest and "Traceback" not in rest
    assert processes_with(marker) == []
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["ens"]
