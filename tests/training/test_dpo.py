"""α-Rényi DPO: loss and gradient against brute force, limits, reference models, CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from ensemble.manifest import load as load_manifest
from softspec.cli import main
from training.config import DPOConfig
from training.data import load_dpo
from training.datasets import PairDataset, collate
from training.dpo import ReferenceCache, dpo_margins, prepare_dpo
from training.loss import preference_logprob, renyi_objective
from training.model import build_ensemble, load_base

PAIRS = [
    (
        "tell me a joke",
        "Why did the chicken cross the road? To get to the other side!",
        "no",
        "witty",
        True,
    ),
    ("hello", "hello how are you today", "THE QUICK BROWN FOX", "upbeat", True),
    ("say something", "yes yes yes", "no no no", "witty", False),
    ("speak", "one two three", "red green blue", "upbeat", False),
]


def pair_rows() -> list[dict]:
    return [
        {"prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": c}],
         "rejected": [{"role": "assistant", "content": r}], "source": s, "conflict": k, "task": "chitchat"}
        for p, c, r, s, k in PAIRS
    ]  # fmt: skip


@pytest.fixture
def dpo_data(tmp_path: Path) -> Path:
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in pair_rows() * 2))
    return path


def fake_trainer(ens, beta: float):  # type: ignore[no-untyped-def]
    return SimpleNamespace(
        accelerator=SimpleNamespace(unwrap_model=lambda m: m), config=SimpleNamespace(beta=beta)
    )


def setup(tiny_llama_dir: Path, dpo_data: Path, k: int, scale: float = 0.3):  # type: ignore[no-untyped-def]
    model, tok = load_base(tiny_llama_dir, dtype=torch.float64)
    cfg = DPOConfig(
        data=str(dpo_data), out="unused", members=k, alpha=0.7, lora_dropout=0.0, beta=0.5
    )
    ens = build_ensemble(model, cfg).double()
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for n, p in ens.peft.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    pairs = load_dpo(dpo_data, tok, 128)[:3]
    batch = collate([PairDataset(pairs)[i] for i in range(3)], tok.pad_token_id)
    return ens, tok, batch, cfg


def grads(ens, member: str) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    return {
        n: p.grad.clone()
        for n, p in ens.peft.named_parameters()
        if f".{member}." in n and p.grad is not None
    }


def test_member_gradient_is_w_times_single_model_dpo_gradient(
    tiny_llama_dir: Path, dpo_data: Path
) -> None:
    ens, _, batch, cfg = setup(tiny_llama_dir, dpo_data, k=3)
    ens.train()
    trainer = fake_trainer(ens, cfg.beta)
    h = dpo_margins(trainer, ens, batch)  # (K, B)
    out = renyi_objective(preference_logprob(h), cfg.alpha, ens.log_weights.double())
    out.loss.backward()
    w = out.resp
    for k, member in enumerate(ens.members):
        got = grads(ens, member)
        assert got
        ens.zero_grad(set_to_none=True)
        h = dpo_margins(trainer, ens, batch)
        single = -F.logsigmoid(h[k])  # the ordinary DPO loss of member k, per pair
        (w[k] * single).mean().backward()
        want = grads(ens, member)
        ens.zero_grad(set_to_none=True)
        for name, g in got.items():
            assert torch.allclose(g, want[name], atol=1e-10, rtol=1e-7), name
        h = dpo_margins(trainer, ens, batch)
        renyi_objective(preference_logprob(h), cfg.alpha, ens.log_weights.double()).loss.backward()


def test_alpha_zero_is_the_mean_of_k_dpo_losses_and_k1_is_dpo(
    tiny_llama_dir: Path, dpo_data: Path
) -> None:
    ens, _, batch, cfg = setup(tiny_llama_dir, dpo_data, k=3)
    ens.eval()
    trainer = fake_trainer(ens, cfg.beta)
    with torch.no_grad():
        h = dpo_margins(trainer, ens, batch)
        loss0 = renyi_objective(preference_logprob(h), 0.0, ens.log_weights.double()).per_example
        assert torch.allclose(loss0, (-F.logsigmoid(h)).mean(dim=0), atol=1e-12)
    ens1, _tok, batch1, _ = setup(tiny_llama_dir, dpo_data, k=1)
    ens1.eval()
    with torch.no_grad():
        h1 = dpo_margins(fake_trainer(ens1, 0.5), ens1, batch1)

        # the plain DPO formula, from full-model log-likelihoods computed independently
        def seq_lp(adapters: bool) -> torch.Tensor:
            ctx = ens1.peft.disable_adapter() if not adapters else torch.enable_grad()
            with ctx:
                logits = ens1.peft(
                    input_ids=batch1["input_ids"], attention_mask=batch1["attention_mask"]
                ).logits
            lp = (
                torch.log_softmax(logits[:, :-1].double(), -1)
                .gather(-1, batch1["labels"][:, 1:].clamp(min=0)[..., None])
                .squeeze(-1)
            )
            return (lp * (batch1["labels"][:, 1:] != -100)).sum(1)

        pol, ref = seq_lp(True), seq_lp(False)
        b = pol.shape[0] // 2
        plain = -F.logsigmoid(0.5 * ((pol[:b] - ref[:b]) - (pol[b:] - ref[b:])))
        for alpha in (0.0, 0.5, 1.0):
            ours = renyi_objective(
                preference_logprob(h1), alpha, ens1.log_weights.double()
            ).per_example
            assert torch.allclose(ours.double(), plain.double(), atol=1e-9)


def test_reference_is_cached_per_example(tiny_llama_dir: Path, dpo_data: Path) -> None:
    ens, _, batch, cfg = setup(tiny_llama_dir, dpo_data, k=2)
    ens.eval()
    trainer = fake_trainer(ens, cfg.beta)
    trainer.reference_cache = ReferenceCache()  # the trainer's owner of the cache
    calls = {"n": 0}
    original = ens.reference_logprob

    def counting(*a, **kw):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        return original(*a, **kw)

    ens.reference_logprob = counting  # type: ignore[method-assign]
    with torch.no_grad():
        h1 = dpo_margins(trainer, ens, batch)
        h2 = dpo_margins(trainer, ens, batch)
    assert calls["n"] == 1 and torch.allclose(h1, h2)
    assert len(trainer.reference_cache) == batch["idx"].numel()
    ens.train()  # training and evaluation keep separate stores
    with torch.no_grad():
        dpo_margins(trainer, ens, batch)
    assert calls["n"] == 2


def test_dpo_end_to_end_and_init_from_sft(
    tiny_llama_dir: Path, dpo_data: Path, sft_data: Path, tmp_path: Path, capsys
) -> None:  # type: ignore[no-untyped-def]
    common = ["--base", str(tiny_llama_dir), "--members", "2", "--alpha", "1", "--lora-dropout", "0",
              "--batch-size", "4", "--learning-rate", "1e-2", "--routing-examples", "8"]  # fmt: skip
    assert (
        main(
            [
                "train",
                "sft",
                *common,
                "--data",
                str(sft_data),
                "--out",
                str(tmp_path / "sft"),
                "--max-steps",
                "6",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "train",
                "dpo",
                *common,
                "--data",
                str(dpo_data),
                "--out",
                str(tmp_path / "dpo"),
                "--max-steps",
                "4",
                "--beta",
                "0.2",
            ]
        )
        == 0
    )
    m = load_manifest(tmp_path / "dpo")
    assert m.objective == "dpo"
    routing = m.training["routing"]
    assert routing["groups"] == ["upbeat", "witty"]  # routing by preference source
    no_base = [a for a in common if a != str(tiny_llama_dir) and a != "--base"]
    assert main(["train", "dpo", *no_base, "--data", str(dpo_data), "--out", str(tmp_path / "dpo2"),
                 "--max-steps", "2", "--init-from", str(tmp_path / "sft")]) == 0  # fmt: skip
    dpo2 = load_manifest(tmp_path / "dpo2")  # the base came from the SFT ensemble
    assert dpo2.objective == "dpo" and Path(dpo2.base_model) == tiny_llama_dir.resolve()
    other_base = shutil.copytree(tiny_llama_dir, tmp_path / "other_base")
    for bad_init, err in [(tmp_path / "dpo", "not an SFT one"), (tmp_path / "sft", "pass --base")]:
        argv = ["train", "dpo", *common, "--data", str(dpo_data), "--out", str(tmp_path / "no"),
                "--init-from", str(bad_init), "--base", str(other_base)]  # fmt: skip
        assert main(argv) == 2
        assert err in capsys.readouterr().err and not (tmp_path / "no").exists()
    # with --init-from, members start AT their SFT adapters, which are also the references: h = 0
    model, tok = load_base(tiny_llama_dir)
    cfg = DPOConfig(
        data=str(dpo_data),
        out="x",
        members=2,
        init_from=str(tmp_path / "sft"),
        lora_dropout=0.0,
        base=str(tiny_llama_dir),
    )
    from training.dpo import init_from_sft

    init_from_sft(cfg)
    ens = build_ensemble(model, cfg)
    prepare_dpo(ens, cfg)
    ens.eval()
    pairs = load_dpo(dpo_data, tok, 128)[:2]
    batch = collate([PairDataset(pairs)[i] for i in range(2)], tok.pad_token_id)
    with torch.no_grad():
        h = dpo_margins(fake_trainer(ens, 0.5), ens, batch)
        policy = ens(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}).logp
        base = ens.reference_logprob(batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert torch.allclose(h, torch.zeros_like(h), atol=1e-5)
    # not trivially: the members really are the trained SFT adapters, not the base
    assert (policy - base).abs().min() > 1e-3


def test_dpo_bad_input_is_one_line(
    tiny_llama_dir: Path, tmp_path: Path, sft_data: Path, capsys
) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "q", "chosen": "same", "rejected": "same"}) + "\n")
    assert (
        main(
            [
                "train",
                "dpo",
                "--base",
                str(tiny_llama_dir),
                "--data",
                str(bad),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "identical" in capsys.readouterr().err
    assert (
        main(
            [
                "train",
                "dpo",
                "--base",
                str(tiny_llama_dir),
                "--data",
                str(bad),
                "--out",
                str(tmp_path / "o"),
                "--beta",
                "0",
            ]
        )
        == 2
    )
    assert "--beta" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
