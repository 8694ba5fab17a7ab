"""The α-Rényi trainer on a tiny random Llama: gradients, limits, specialisation, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ensemble.manifest import load as load_manifest
from softspec.cli import main
from tests.helpers import randomize_lora_b
from training.config import SFTConfig
from training.data import load_sft
from training.datasets import collate
from training.loss import renyi_objective
from training.model import _lora_config, build_ensemble, load_base

FAST = ["--lora-dropout", "0", "--logging-steps", "1", "--routing-examples", "64"]


def train(base: Path, data: Path, out: Path, *args: str) -> int:
    return main(
        ["train", "sft", "--base", str(base), "--data", str(data), "--out", str(out), *FAST, *args]
    )


def adapter_tensors(ens_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    m = load_manifest(ens_dir)
    return {
        mem.name: load_file(ens_dir / mem.adapter / "adapter_model.safetensors")
        for mem in m.members
    }


def lora_grads(ens, member: str) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    return {
        n: p.grad.detach().clone()
        for n, p in ens.peft.named_parameters()
        if f".{member}." in n and "lora_" in n and p.grad is not None
    }


def test_each_member_gradient_is_w_times_its_nll_gradient(
    tiny_llama_dir: Path, sft_data: Path
) -> None:
    model, tok = load_base(tiny_llama_dir, dtype=torch.float64)
    cfg = SFTConfig(data=str(sft_data), out="unused", members=3, alpha=0.8, lora_dropout=0.0)
    ens = build_ensemble(model, cfg).double()
    randomize_lora_b(ens)  # non-zero B so the members really differ
    examples = load_sft(sft_data, tok, 128)[:3]
    batch = collate(
        [{"input_ids": e.input_ids, "labels": e.labels, "idx": i} for i, e in enumerate(examples)],
        tok.pad_token_id,
    )
    batch.pop("idx")
    ens.train()
    scores = ens(**batch)
    out = renyi_objective(scores.logp, 0.8, ens.log_weights.double())
    out.loss.backward()
    w = out.resp  # (K, B)
    for k, member in enumerate(ens.members):
        got = lora_grads(ens, member)
        assert got and all(v.abs().sum() > 0 for v in got.values())
        ens.zero_grad(set_to_none=True)
        ens.activate(member)
        nll = -ens.sequence_logprob(**batch)  # (B,) single-model NLL per example
        (w[k] * nll).mean().backward()  # w_k,i times each example's NLL gradient
        want = lora_grads(ens, member)
        ens.zero_grad(set_to_none=True)
        for name, g_k in got.items():
            assert torch.allclose(g_k, want[name], atol=1e-10, rtol=1e-7), name
        scores = ens(**batch)  # rebuild the graph for the next member's comparison
        renyi_objective(scores.logp, 0.8, ens.log_weights.double()).loss.backward()


def test_alpha_zero_is_independent_training(
    tiny_llama_dir: Path, sft_data: Path, tmp_path: Path
) -> None:
    """α = 0: member k trains exactly as a lone adapter on π_k·NLL (same seed, same batches).

    Tolerance: 1e-5 absolute on every LoRA weight (float32; the two runs differ only in
    summation order).
    """
    from peft import get_peft_model
    from transformers import get_scheduler

    import training.trainer as tr

    order: list[list[int]] = []
    original = tr.EnsembleTrainer.compute_loss

    def recording(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[no-untyped-def]
        if model.training:
            order.append(inputs["idx"].tolist())
        return original(self, model, inputs, return_outputs, num_items_in_batch)

    tr.EnsembleTrainer.compute_loss = recording  # type: ignore[method-assign]
    try:
        args = [
            "--members",
            "2",
            "--alpha",
            "0",
            "--max-steps",
            "5",
            "--batch-size",
            "4",
            "--learning-rate",
            "1e-2",
        ]
        assert train(tiny_llama_dir, sft_data, tmp_path / "ens", *args) == 0
    finally:
        tr.EnsembleTrainer.compute_loss = original  # type: ignore[method-assign]
    trained = adapter_tensors(tmp_path / "ens")
    assert len(order) == 5

    cfg = SFTConfig(data=str(sft_data), out="x", members=2, alpha=0.0, lora_dropout=0.0)
    for k in range(2):
        model, tok = load_base(tiny_llama_dir)
        ens = build_ensemble(model, cfg)  # seeds as in training
        torch.manual_seed(cfg.member_seed(k))
        lone_model, _ = load_base(tiny_llama_dir)
        lone = get_peft_model(lone_model, _lora_config(cfg, lone_model), adapter_name=f"m{k}")
        ens_a = {n: p for n, p in ens.peft.named_parameters() if f".m{k}." in n and "lora_A" in n}
        lone_a = {n: p for n, p in lone.named_parameters() if "lora_A" in n}
        assert all(torch.equal(ens_a[n], lone_a[n]) for n in lone_a)  # same initial A
        params = [p for p in lone.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
        sched = get_scheduler("linear", opt, num_warmup_steps=0, num_training_steps=5)
        examples = load_sft(sft_data, tok, 512)
        for idx in order:
            batch = collate(
                [
                    {"input_ids": examples[i].input_ids, "labels": examples[i].labels, "idx": i}
                    for i in idx
                ],
                tok.pad_token_id,
            )
            batch.pop("idx")
            lone.train()
            out = lone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            logits = out.logits[:, :-1]
            targets = batch["labels"][:, 1:]
            mask = targets != -100
            lp = (
                torch.log_softmax(logits.float(), -1)
                .gather(-1, targets.clamp(min=0)[..., None])
                .squeeze(-1)
            )
            nll = -(lp * mask).sum(1)
            (0.5 * nll.mean()).backward()  # π_k · NLL
            opt.step()
            sched.step()
            opt.zero_grad()
        lone_state = {
            n.replace(f".m{k}.", "."): p for n, p in lone.named_parameters() if "lora_" in n
        }
        got = trained[f"m{k}"]
        assert set(got) == set(lone_state)
        for name, value in got.items():
            assert torch.allclose(value, lone_state[name].detach(), atol=1e-5), name


def test_alpha_one_specialises_alpha_zero_stays_uniform(
    tiny_llama_dir: Path, two_cluster_data: Path, tmp_path: Path
) -> None:
    common = [
        "--members",
        "2",
        "--max-steps",
        "100",
        "--batch-size",
        "16",
        "--learning-rate",
        "1e-2",
        "--logging-steps",
        "20",
    ]
    assert train(tiny_llama_dir, two_cluster_data, tmp_path / "a1", "--alpha", "1", *common) == 0
    assert train(tiny_llama_dir, two_cluster_data, tmp_path / "a0", "--alpha", "0", *common) == 0
    r1 = load_manifest(tmp_path / "a1").training["routing"]
    r0 = load_manifest(tmp_path / "a0").training["routing"]
    assert r1["mean_max_responsibility"] > 0.9
    m = torch.tensor(r1["matrix"])  # rows: lower, upper; columns: members
    assert sorted(m.argmax(dim=1).tolist()) == [0, 1]  # each cluster has its own member
    assert (m.max(dim=1).values > 0.9).all()
    assert r0["mean_max_responsibility"] == pytest.approx(0.5, abs=1e-9)
    assert torch.allclose(torch.tensor(r0["matrix"]), torch.full((2, 2), 0.5))
    assert r1["group_member_mi"] > 0.6 > r0["group_member_mi"]


def test_resume_after_a_crash_matches_an_uninterrupted_run(
    tiny_llama_dir: Path, sft_data: Path, tmp_path: Path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    import training.callbacks as tr

    args = [
        "--members",
        "2",
        "--alpha",
        "1",
        "--max-steps",
        "8",
        "--save-steps",
        "4",
        "--batch-size",
        "4",
        "--learning-rate",
        "1e-2",
    ]
    assert train(tiny_llama_dir, sft_data, tmp_path / "full", *args) == 0

    def crash(self, args, state, control, **kw):  # type: ignore[no-untyped-def]
        if state.global_step == 6:
            raise KeyboardInterrupt

    monkeypatch.setattr(tr.TimeBudgetCallback, "on_step_end", crash)
    assert train(tiny_llama_dir, sft_data, tmp_path / "crash", *args) == 130
    assert not (tmp_path / "crash").exists()  # no half-written ensemble
    run = tmp_path / "crash.run"
    assert (run / "checkpoint-4").is_dir()
    monkeypatch.undo()
    assert train(tiny_llama_dir, sft_data, tmp_path / "crash", *args) == 2  # needs --resume
    with open(run / "train_log.jsonl", "a") as f:  # the crash tore the last line in half
        f.write('{"step": 7, "loss": 1.2')
    assert train(tiny_llama_dir, sft_data, tmp_path / "crash", *args, "--resume") == 0
    assert not run.exists()
    full, resumed = adapter_tensors(tmp_path / "full"), adapter_tensors(tmp_path / "crash")
    for member, tensors in full.items():
        for name, t in tensors.items():
            assert torch.allclose(t, resumed[member][name], atol=1e-6), (member, name)
    steps = [
        json.loads(x)["step"]
        for x in (tmp_path / "crash" / "train_log.jsonl").read_text().splitlines()
    ]
    train_steps = [s for s in steps if s <= 8]
    assert train_steps[:8] == list(range(1, 9))  # nothing lost, nothing logged twice


def test_a_corrupt_log_line_before_the_last_is_an_error(tmp_path: Path) -> None:
    from ensemble.errors import DataError
    from training.callbacks import read_log

    log = tmp_path / "train_log.jsonl"
    log.write_text('{"step": 1}\n\n{"step": 2}\n{"step": 3, "lo')
    assert read_log(log) == [{"step": 1}, {"step": 2}]  # the torn last line is dropped
    log.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(DataError, match=r"train_log.jsonl:2: corrupt"):
        read_log(log)


def test_resume_with_different_options_is_refused(
    tiny_llama_dir: Path, sft_data: Path, tmp_path: Path, monkeypatch, capsys
) -> None:  # type: ignore[no-untyped-def]
    import training.callbacks as tr

    def crash(self, args, state, control, **kw):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt

    monkeypatch.setattr(tr.TimeBudgetCallback, "on_step_end", crash)
    args = ["--members", "2", "--max-steps", "4", "--save-steps", "1"]
    assert train(tiny_llama_dir, sft_data, tmp_path / "e", "--alpha", "1", *args) == 130
    monkeypatch.undo()
    capsys.readouterr()
    assert train(tiny_llama_dir, sft_data, tmp_path / "e", "--alpha", "0.5", *args, "--resume") == 2
    assert "--alpha" in capsys.readouterr().err


def test_learned_weights_are_stored_and_sum_to_one(
    tiny_llama_dir: Path, two_cluster_data: Path, tmp_path: Path
) -> None:
    args = [
        "--members",
        "3",
        "--alpha",
        "1",
        "--max-steps",
        "30",
        "--batch-size",
        "16",
        "--learning-rate",
        "1e-2",
        "--weights",
        "learned",
    ]
    assert train(tiny_llama_dir, two_cluster_data, tmp_path / "lw", *args) == 0
    m = load_manifest(tmp_path / "lw")
    w = [x.weight for x in m.members]
    assert sum(w) == pytest.approx(1.0) and min(w) >= 0.05 / 1.15 - 1e-9
    assert max(w) - min(w) > 1e-3  # moved away from uniform
    log = [json.loads(x) for x in (tmp_path / "lw" / "train_log.jsonl").read_text().splitlines()]
    assert any(row.get("pi") and max(row["pi"]) > 0.34 for row in log)


def test_validation_loss_is_logged_every_eval_steps(
    tiny_llama_dir: Path, sft_data: Path, tmp_path: Path
) -> None:
    args = ["--members", "2", "--alpha", "1", "--max-steps", "4", "--batch-size", "4",
            "--eval-data", str(sft_data), "--eval-steps", "2"]  # fmt: skip
    assert train(tiny_llama_dir, sft_data, tmp_path / "ev", *args) == 0
    rows = [json.loads(x) for x in (tmp_path / "ev" / "train_log.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(r["eval_loss"] > 0 for r in evals)
    assert (tmp_path / "ev" / "plots" / "training_curves.png").exists()


def test_eval_data_without_eval_steps_is_evaluated_at_the_end(
    tiny_llama_dir: Path, sft_data: Path, tmp_path: Path
) -> None:
    args = ["--members", "2", "--max-steps", "3", "--batch-size", "4", "--eval-data", str(sft_data)]
    assert train(tiny_llama_dir, sft_data, tmp_path / "end", *args) == 0
    rows = [json.loads(x) for x in (tmp_path / "end" / "train_log.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [3]
    assert load_manifest(tmp_path / "end").training["eval_loss"] == pytest.approx(
        evals[0]["eval_loss"], abs=1e-5
    )


@pytest.mark.parametrize("ratio", ["1", "1.5", "-0.1", "nan"])
def test_warmup_ratio_outside_0_1_is_refused(
    tiny_llama_dir: Path, sft_data: Path, tmp_path: Path, capsys, ratio: str
) -> None:  # type: ignore[no-untyped-def]
    assert train(tiny_llama_dir, sft_data, tmp_path / "w", "--warmup-ratio", ratio) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--warmup-ratio" in err[0] and "[0, 1)" in err[0]


def test_warmup_ratio_is_a_fraction_of_the_steps(tmp_path: Path) -> None:
    from training.run import _training_args

    cfg = SFTConfig(data="d", out=str(tmp_path / "o"), warmup_ratio=0.25, max_steps=40)
    args = _training_args(cfg, tmp_path / "o.run", has_eval=False)
    assert args.get_warmup_steps(40) == 10  # a ratio, not 0 steps (int(0.25)) nor 1 step


def test_progress_under_a_time_budget_shows_the_budget_not_a_step_total() -> None:
    import io
    from types import SimpleNamespace

    from training.callbacks import PostfixProgressCallback

    out = io.StringIO()
    bar = PostfixProgressCallback(time_budget=60, file=out)
    state = SimpleNamespace(is_world_process_zero=True, global_step=0, max_steps=165)
    bar.on_train_begin(None, state, None)
    state.global_step = 7
    bar.on_step_end(None, state, None)
    bar.on_log(None, state, None, logs={"loss": 1.5})
    bar.on_train_end(None, state, None)
    shown = out.getvalue().replace("\r", "\n").splitlines()[-1]
    assert "/60s time budget" in shown and "step=7" in shown and "loss=1.5" in shown, shown
    assert "165" not in shown  # the step total that would never be reached


def test_time_budget_stops_training_and_exports(
    tiny_llama_dir: Path, sft_data: Path, tmp_path: Path, capsys
) -> None:  # type: ignore[no-untyped-def]
    args = ["--members", "2", "--max-steps", "100000", "--batch-size", "4", "--time-budget", "2"]
    assert train(tiny_llama_dir, sft_data, tmp_path / "tb", *args) == 0
    steps = load_manifest(tmp_path / "tb").training["steps"]
    assert 1 <= steps < 100000
    assert "/2s time budget" in capsys.readouterr().err
