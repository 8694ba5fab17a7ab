"""`softspec demo` end to end on a tiny budget: trains, serves with vLLM, asks every prompt."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ensemble.manifest import load as load_manifest
from softspec.cli import main
from softspec.demo import PROMPTS

pytestmark = pytest.mark.slow


def test_tiny_demo(smollm2_dir: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    ens, out = tmp_path / "ens", tmp_path / "report"
    args = ["demo", "--ensemble", str(ens), "--out", str(out), "--engine", "vllm",
            "--members", "2", "--max-steps", "1", "--max-tokens", "6"]  # fmt: skip
    assert main(args) == 0
    manifest = load_manifest(ens)
    assert len(manifest.members) == 2 and manifest.alpha == pytest.approx(0.8)
    report = json.loads((out / "report.json").read_text())
    assert [r["prompt"] for r in report["rows"]] == [p for _, p in PROMPTS]
    for row in report["rows"]:
        assert row["epistemic"] >= 0 and row["gate"] in {"pass", "flag", "abstain"}
        assert sum(row["responsibilities"].values()) == pytest.approx(1.0, abs=1e-9)
    printed = capsys.readouterr().out
    assert "mean epistemic: in-distribution" in printed and "report.md" in printed
    assert (out / "report.md").exists() and list(out.glob("*.png"))
    # a second run reuses the ensemble instead of training again
    assert main([*args, "--out", str(tmp_path / "again")]) == 0
    assert "reusing" in capsys.readouterr().err
