"""`softspec train` calibrates the served `combined` gate on prompts it held out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from ensemble.errors import ConfigError
from ensemble.manifest import load as load_manifest
from server.app import create_app
from server.settings import Settings
from softspec.cli import main
from tests.training.test_trainer import FAST
from training.local_engine import LocalEngine

WORDS = ["red", "green", "blue", "one", "two", "three", "yes", "no", "maybe", "fox", "dog"]


@pytest.fixture(scope="module")
def calibrated(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cal")
    rows = []
    for i in range(110):  # 110 distinct prompts: 22 of them can be held out (≤ 20 %)
        q = f"say {WORDS[i % 11]} {WORDS[(i // 11) % 11]} {i}"
        rows.append({"prompt": [{"role": "user", "content": q}],
                     "completion": [{"role": "assistant", "content": WORDS[i % 11]}]})  # fmt: skip
    (root / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = root / "ens"
    code = main(["train", "sft", "--base", str(tiny_llama_dir), "--data", str(root / "d.jsonl"),
                 "--out", str(out), "--members", "2", "--max-steps", "2", "--batch-size", "8",
                 "--gate-calibration", "20", "--gate-rate", "0.1", *FAST])  # fmt: skip
    assert code == 0
    return out


def test_train_writes_a_calibrated_combined_gate_from_held_out_prompts(calibrated: Path) -> None:
    manifest = load_manifest(calibrated)
    gate = manifest.gate
    # 20 calibration prompts: 10 % snaps to the level 2/21; the threshold sits half a step up
    assert gate.score_name == "combined" and gate.threshold == pytest.approx(1 - 2.5 / 21)
    assert gate.calibration is not None and gate.calibration.n == 20
    assert gate.calibration.level == pytest.approx(2 / 21) and gate.calibration.target_rate == 0.1
    assert "the gate flags at most 9.52% in expectation" in gate.calibration.guarantee
    # the ensemble has a prompt_distance reference (fitted to the 90 trained-on prompts,
    # none of the 20 held out), so the gate is calibrated on the distance
    assert manifest.density is not None and manifest.density.n == 110 - 20
    assert gate.calibration.components == ["prompt_distance"]
    assert manifest.training["examples"] == 110 - 20  # the held-out prompts were not trained on


def test_the_gateway_serves_the_calibrated_gate(calibrated: Path) -> None:
    manifest = load_manifest(calibrated)

    def factory(man, metrics):  # type: ignore[no-untyped-def]
        return LocalEngine(calibrated, man)

    settings = Settings(ensemble=calibrated, engine="local")  # type: ignore[call-arg]
    with TestClient(create_app(settings, factory)) as client:
        body = client.post(
            "/v1/chat/completions",
            json={"model": manifest.name, "messages": [{"role": "user", "content": "say red"}],
                  "max_tokens": 4, "temperature": 0},
        ).json()  # fmt: skip
    u, gate = body["choices"][0]["uncertainty"], body["gate"]
    from ensemble.calibration import combined_score

    assert u["combined"] == pytest.approx(combined_score(manifest.gate.calibration, u))  # type: ignore[arg-type]
    assert gate["score_name"] == "combined" and gate["score"] == pytest.approx(u["combined"])
    assert gate["decision"] == ("pass" if u["combined"] <= manifest.gate.threshold else "flag")


def test_a_combined_gate_without_calibration_refuses_to_start(
    calibrated: Path, tmp_path: Path
) -> None:
    import shutil

    copy = tmp_path / "ens"
    shutil.copytree(calibrated, copy)
    manifest = load_manifest(copy)
    gate = manifest.gate.model_copy(update={"calibration": None})
    manifest.model_copy(update={"gate": gate}).save(copy)
    settings = Settings(ensemble=copy, engine="local")  # type: ignore[call-arg]
    with (
        pytest.raises(ConfigError, match="softspec eval .*--calibrate-gate"),
        TestClient(create_app(settings, lambda man, metrics: LocalEngine(copy, man))),
    ):
        pass


def test_without_a_reference_the_gate_is_calibrated_on_prompt_novelty(
    calibrated: Path, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "ens"
    code = main(["train", "sft", "--base", str(tiny_llama_dir), "--data",
                 str(calibrated.parent / "d.jsonl"), "--out", str(out), "--members", "2",
                 "--max-steps", "1", "--batch-size", "8", "--gate-calibration", "20",
                 "--gate-rate", "0.1", "--reference-prompts", "0", *FAST])  # fmt: skip
    assert code == 0
    manifest = load_manifest(out)
    assert manifest.density is None and not (out / "reference.npz").exists()
    assert manifest.gate.calibration is not None
    assert manifest.gate.calibration.components == ["prompt_novelty"]


def test_the_ensemble_appears_only_when_complete_and_a_failed_finish_loses_nothing(
    calibrated: Path, tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """The reference and the gate are fitted before the directory is renamed into place, so
    whoever waits for ``ensemble.json`` (compose's gateway) never loads an ensemble without
    them; when that last step fails nothing is written and ``--resume`` finishes it."""
    import training.calibrate

    out = tmp_path / "ens"
    fit_gate, seen = training.calibrate.fit_gate, []

    def failing(ens_dir: Path, *args: object, **kw: object) -> object:
        seen.append((out.exists(), (ens_dir / "reference.npz").exists()))
        raise ConfigError("calibration broke")

    monkeypatch.setattr(training.calibrate, "fit_gate", failing)
    cmd = ["train", "sft", "--base", str(tiny_llama_dir), "--data",
           str(calibrated.parent / "d.jsonl"), "--out", str(out), "--members", "2",
           "--max-steps", "1", "--batch-size", "8", "--gate-calibration", "20",
           "--gate-rate", "0.1", *FAST]  # fmt: skip
    assert main(cmd) == 2
    assert seen == [(False, True)]  # calibrating a complete, not yet visible directory
    assert not out.exists() and not list(tmp_path.glob(".*ens*.*")), list(tmp_path.iterdir())
    assert "rerun the same command with --resume" in capsys.readouterr().err
    monkeypatch.setattr(training.calibrate, "fit_gate", fit_gate)
    assert main([*cmd, "--resume"]) == 0
    manifest = load_manifest(out)
    assert manifest.gate.calibration is not None and manifest.density is not None
    assert manifest.training["steps"] == 1  # not trained past the end
    # the very weights an uninterrupted run exports (the finished state, not a fresh init)
    from tests.training.test_trainer import adapter_tensors

    plain = tmp_path / "plain"
    assert main([*cmd[: cmd.index("--out") + 1], str(plain), *cmd[cmd.index("--out") + 2 :]]) == 0
    want, got = adapter_tensors(plain), adapter_tensors(out)
    for member, tensors in want.items():
        for name, t in tensors.items():
            assert torch.allclose(t, got[member][name], atol=1e-6), (member, name)
