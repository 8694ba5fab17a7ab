"""The members' prior (random B init at a target KL, anchored penalty) and the prompt loss
weight, on a tiny random Llama."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from softspec.cli import main
from tests.training.test_trainer import FAST, adapter_tensors
from training.config import SFTConfig
from training.data import IGNORE, load_sft
from training.datasets import collate
from training.model import build_ensemble, load_base
from training.prior import (
    anchor_penalty,
    calibration_batch,
    init_prior,
    mean_kl_from_base,
    snapshot,
)


def _ensemble(tiny_llama_dir: Path, data: Path, seed: int = 0):  # type: ignore[no-untyped-def]
    model, tok = load_base(tiny_llama_dir, dtype=torch.float64)
    cfg = SFTConfig(data=str(data), out="unused", members=3, alpha=1.0, lora_dropout=0.0, seed=seed)
    ens = build_ensemble(model, cfg).double()
    rows = [{"input_ids": e.input_ids} for e in load_sft(data, tok, 128)[:4]]
    return ens, calibration_batch(rows, 4, tok.pad_token_id), tok


def b_tensors(ens, member: str) -> list[torch.Tensor]:  # type: ignore[no-untyped-def]
    return [p.detach().clone() for n, p in ens.peft.named_parameters() if f"lora_B.{member}." in n]


def test_random_prior_reaches_the_target_kl_differs_per_member_and_repeats(
    tiny_llama_dir: Path, sft_data: Path
) -> None:
    ens, batch, _ = _ensemble(tiny_llama_dir, sft_data)
    assert mean_kl_from_base(ens, batch) == pytest.approx([0.0] * 3, abs=1e-12)  # B = 0
    info = init_prior(ens, batch, target_kl=0.005, seed=0)
    kl = mean_kl_from_base(ens, batch)
    assert sum(kl) / 3 == pytest.approx(0.005, rel=0.1)
    assert info["kl_per_member"] == pytest.approx(kl, abs=1e-5)
    b0, b1 = b_tensors(ens, "m0"), b_tensors(ens, "m1")
    assert all(not torch.allclose(x, y) for x, y in zip(b0, b1, strict=True))  # own draws
    again, batch2, _ = _ensemble(tiny_llama_dir, sft_data)
    init_prior(again, batch2, target_kl=0.005, seed=0)
    assert all(torch.equal(x, y) for x, y in zip(b0, b_tensors(again, "m0"), strict=True))
    other, batch3, _ = _ensemble(tiny_llama_dir, sft_data, seed=1)
    init_prior(other, batch3, target_kl=0.005, seed=1)
    assert not all(torch.allclose(x, y) for x, y in zip(b0, b_tensors(other, "m0"), strict=True))
    with pytest.raises(ValueError, match="> 0"):
        init_prior(ens, batch, target_kl=0.0, seed=0)
    # this tiny random model's outputs saturate near 0.013 nats: an honest error, not a miss
    with pytest.raises(ValueError, match="choose a smaller --prior-kl"):
        init_prior(ens, batch, target_kl=0.5, seed=0)


def test_anchor_penalty_and_its_gradient(tiny_llama_dir: Path, sft_data: Path) -> None:
    ens, batch, _ = _ensemble(tiny_llama_dir, sft_data)
    init_prior(ens, batch, target_kl=0.005, seed=0)
    anchors = snapshot(ens)
    assert anchor_penalty(ens, anchors).item() == 0.0
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        moved = {}
        for n, p in ens.peft.named_parameters():
            if n in anchors:
                moved[n] = torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.01
                p.add_(moved[n])
    pen = anchor_penalty(ens, anchors)
    assert pen.item() == pytest.approx(sum(float((d**2).sum()) for d in moved.values()), rel=1e-6)
    pen.backward()
    for n, p in ens.peft.named_parameters():
        if n in anchors:
            assert torch.allclose(p.grad, 2 * moved[n].to(p.grad.dtype), atol=1e-9), n


def test_prompt_loss_weight_adds_the_weighted_prompt_log_likelihood(
    tiny_llama_dir: Path, sft_data: Path
) -> None:
    ens, _, tok = _ensemble(tiny_llama_dir, sft_data)
    init_prior(ens, calibration_batch([{"input_ids": [1, 2, 3]}], 1, tok.pad_token_id), 0.005, 0)
    examples = load_sft(sft_data, tok, 128)[:3]
    batch = collate(
        [{"input_ids": e.input_ids, "labels": e.labels, "idx": i} for i, e in enumerate(examples)],
        tok.pad_token_id,
    )
    batch.pop("idx")
    completion = ens(**batch).logp
    weighted = ens(**batch, prompt_weight=0.3).logp
    everything = torch.where(batch["attention_mask"].bool(), batch["input_ids"], IGNORE)
    for k, m in enumerate(ens.members):  # brute force: log p of every real token, by part
        ens.activate(m)
        total = ens.sequence_logprob(batch["input_ids"], batch["attention_mask"], everything)
        prompt_part = total - completion[k]
        assert torch.allclose(weighted[k], completion[k] + 0.3 * prompt_part, atol=1e-9)
        assert (prompt_part < 0).all()  # the prompt really contributes


def test_prior_options_are_recorded_and_served_adapters_stay_plain_peft(
    tiny_llama_dir: Path, sft_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "ens"
    code = main(["train", "sft", "--base", str(tiny_llama_dir), "--data", str(sft_data), "--out",
                 str(out), "--members", "2", "--max-steps", "2", "--batch-size", "4", *FAST,
                 "--prior-init", "random", "--prior-kl", "0.005", "--anchor", "0.1",
                 "--prompt-loss-weight", "0.5"])  # fmt: skip
    assert code == 0
    import json

    manifest = json.loads((out / "ensemble.json").read_text())
    prior = manifest["training"]["prior"]
    assert prior["init"] == "random" and prior["anchor"] == 0.1 and prior["sigma"] > 0
    assert manifest["training"]["config"]["prompt_loss_weight"] == 0.5
    tensors = adapter_tensors(out)
    assert all(
        any("lora_B" in n and t.abs().sum() > 0 for n, t in ts.items()) for ts in tensors.values()
    )
    from peft import PeftModel

    model, _ = load_base(tiny_llama_dir)
    PeftModel.from_pretrained(model, str(out / "adapters" / "m0"))  # loads as it is


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--prompt-loss-weight", "1.5"], "--prompt-loss-weight must be in [0, 1]"),
        (["--prompt-loss-weight", "-0.1"], "--prompt-loss-weight must be in [0, 1]"),
        (["--prior-kl", "-1"], "--prior-kl must be > 0"),
        (["--anchor", "-0.5"], "--anchor must be >= 0"),
        (["--gate-calibration", "5"], "--gate-calibration must be 0 (off) or >= 20"),
        (["--reference-prompts", "-1"], "--reference-prompts must be >= 0"),
        (["--gate-calibration", "20", "--gate-rate", "0.01"], "cannot promise so low a flag rate"),
    ],
)
def test_bad_prior_options_are_one_line_errors(
    flags: list[str],
    message: str,
    sft_data: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(["train", "sft", "--data", str(sft_data), "--out", str(tmp_path / "x"), *flags])
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and not (tmp_path / "x").exists()
