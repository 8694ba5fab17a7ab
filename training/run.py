"""One training run end to end: validate → load → train (resumable) → routing → export.

Everything that can be wrong with the input is checked before the run directory is
created: flags (config ``__post_init__``), paths, every data row (tokenized up front),
target modules. The run directory ``<out>.run/`` holds checkpoints and the JSONL log
while training; the ensemble directory appears only when complete (atomic rename), and
the run directory is removed after a successful export unless ``--keep-checkpoints``.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import TrainingArguments
from transformers.trainer_callback import ProgressCallback, TrainerState

from ensemble.atomic import atomic_write_json, sha256_file
from ensemble.errors import ConfigError
from training.callbacks import (
    JsonlLogCallback,
    PostfixProgressCallback,
    TimeBudgetCallback,
    read_log,
)
from training.config import DPOConfig, PriorInit, TrainConfig
from training.data import load_dpo, load_sft
from training.datasets import ExampleDataset, PairDataset, collate
from training.export import LOG_FILE, export_ensemble
from training.memory import (
    GIB,
    activation_bytes,
    available_bytes,
    choose_member_memory,
    limit_allocator_caching,
)
from training.model import EnsembleLM, build_ensemble, load_model, load_tokenizer
from training.prior import calibration_batch, init_prior
from training.routing import routing_summary, score_examples
from training.trainer import EnsembleTrainer, last_complete_checkpoint

__all__ = ["TrainResult", "train_ensemble"]

CONFIG_FILE = "run_config.json"
MEMBER_MEMORY_FILE = "member_memory.json"  # the --member-memory of each (re)start of a run
PRIOR_BATCH = 8  # training examples the prior's KL from the base is measured on


@dataclass
class TrainResult:
    out: Path
    steps: int
    seconds: float
    routing: dict[str, Any]


def _datasets(
    cfg: TrainConfig, tokenizer: Any, held_out: frozenset[int] = frozenset()
) -> tuple[Any, Any, list[str]]:
    if isinstance(cfg, DPOConfig):
        train = load_dpo(cfg.data, tokenizer, cfg.max_length, cfg.drop_overlong, held_out)
        evals = (
            load_dpo(cfg.eval_data, tokenizer, cfg.max_length, cfg.drop_overlong)
            if cfg.eval_data
            else None
        )
        return PairDataset(train), PairDataset(evals) if evals else None, [p.group for p in train]
    train_sft = load_sft(cfg.data, tokenizer, cfg.max_length, cfg.drop_overlong, held_out)
    eval_sft = (
        load_sft(cfg.eval_data, tokenizer, cfg.max_length, cfg.drop_overlong)
        if cfg.eval_data
        else None
    )
    groups = [e.group for e in train_sft]
    return ExampleDataset(train_sft), ExampleDataset(eval_sft) if eval_sft else None, groups


# TrainingArguments field ← TrainConfig field. Every value passed through is validated in
# TrainConfig.__post_init__ (one-line errors before anything loads); a test holds a bad
# value for each, so a field added here without a check fails it.
MAPPED_FIELDS = {
    "per_device_train_batch_size": "batch_size",
    "per_device_eval_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum",
    "learning_rate": "learning_rate",
    "lr_scheduler_type": "lr_scheduler",
    "warmup_steps": "warmup_ratio",  # transformers 5 reads a float in [0, 1) as a ratio
    "max_steps": "max_steps",
    "num_train_epochs": "epochs",
    "max_grad_norm": "max_grad_norm",
    "seed": "seed",
    "logging_steps": "logging_steps",
    "save_steps": "save_steps",
    "eval_steps": "eval_steps",
}


def _training_args(cfg: TrainConfig, run_dir: Path, has_eval: bool) -> TrainingArguments:
    cpu = not torch.cuda.is_available()
    mapped = {name: getattr(cfg, field) for name, field in MAPPED_FIELDS.items()}
    mapped["eval_steps"] = cfg.eval_steps or None
    return TrainingArguments(
        output_dir=str(run_dir),
        **mapped,
        weight_decay=0.0,
        save_strategy="steps",
        save_total_limit=2,
        eval_strategy="steps" if has_eval and cfg.eval_steps else "no",
        report_to="none",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        use_cpu=cpu,
        ddp_backend="gloo" if cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        disable_tqdm=False,
        ddp_find_unused_parameters=False,
        train_sampling_strategy="group_by_length"
        if cfg.group_by_length and not isinstance(cfg, DPOConfig)
        else "random",  # every member adapter is used in every step
    )


def _check_resume(cfg: TrainConfig) -> None:
    """On --resume, the interrupted run must have been started with the same options."""
    saved = cfg.run_dir / CONFIG_FILE
    if not (cfg.resume and saved.exists()):
        return
    if (cfg.run_dir / LOG_FILE).is_file():
        read_log(cfg.run_dir / LOG_FILE)  # a corrupt log fails now, before the model loads
    before = json.loads(saved.read_text())
    now = json.loads(json.dumps(cfg.identity()))
    changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    if changed:
        flags = ", ".join("--" + c.replace("_", "-") for c in changed)
        raise ConfigError(
            f"--resume: {flags} differ from the interrupted run in {cfg.run_dir}; "
            "use the same options or --overwrite"
        )


def _prepare_run_dir(cfg: TrainConfig) -> None:
    """Create the run directory (main process), unless resuming into an existing one."""
    run_dir = cfg.run_dir
    if cfg.resume and (run_dir / CONFIG_FILE).exists():
        return
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    atomic_write_json(run_dir / CONFIG_FILE, cfg.identity())


def train_ensemble(cfg: TrainConfig) -> TrainResult:
    """Train and export an ensemble; see the module docstring for the order of checks."""
    t0 = time.monotonic()
    limit_allocator_caching()  # resident memory follows the live tensors (training/memory.py)
    args = _training_args(cfg, cfg.run_dir, bool(cfg.eval_data))
    state = args.distributed_state  # every process checks the same things, then waits
    cfg.check_paths()
    _check_resume(cfg)
    state.wait_for_everyone()
    if isinstance(cfg, DPOConfig):
        from training.dpo import init_from_sft

        init_from_sft(cfg)  # K and the LoRA shape come from the SFT ensemble
    tokenizer = load_tokenizer(cfg.base)
    calibration, held_out = _calibration_split(cfg)
    train_ds, eval_ds, groups = _datasets(cfg, tokenizer, held_out)  # all checked up front
    ens = build_ensemble(load_model(cfg.base), cfg)
    prior: dict[str, Any] = {"init": str(cfg.prior_init), "anchor": cfg.anchor}
    if cfg.prior_init == PriorInit.RANDOM:
        sft_examples = train_ds.pairs if isinstance(cfg, DPOConfig) else train_ds.examples
        batch = calibration_batch(
            [{"input_ids": getattr(e, "chosen", e).input_ids} for e in sft_examples[:PRIOR_BATCH]],
            PRIOR_BATCH,
            tokenizer.pad_token_id,
        )
        prior.update(init_prior(ens, batch, cfg.prior_kl, cfg.seed))
    if isinstance(cfg, DPOConfig):
        from training.dpo import prepare_dpo

        prepare_dpo(ens, cfg)
    if state.is_main_process:
        _prepare_run_dir(cfg)
    state.wait_for_everyone()
    checkpoint = last_complete_checkpoint(cfg.run_dir) if cfg.resume else None

    member_memory = _member_memory(cfg, ens, train_ds, args.device, state.is_main_process)
    if state.is_main_process:
        member_memory["segments"] = _record_segment(cfg.run_dir, checkpoint, member_memory)
    collate_fn = functools.partial(collate, pad_id=tokenizer.pad_token_id)
    trainer = EnsembleTrainer(
        model=ens,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=collate_fn,
        config=cfg,
        member_memory=member_memory["used"],
        callbacks=[JsonlLogCallback(cfg.run_dir / LOG_FILE), TimeBudgetCallback(cfg.time_budget)],
    )
    trainer.remove_callback(ProgressCallback)  # replaced by one that shows loss on the bar
    trainer.add_callback(PostfixProgressCallback(cfg.time_budget))
    if checkpoint is not None and _finished(checkpoint, cfg):
        # the run had reached its end and failed after (while exporting): take its final
        # state as it is (transformers' resume would train one step past the end)
        trainer._load_from_checkpoint(str(checkpoint))
        trainer.state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))
        result = None
    else:
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    trainer.save_model()  # final state in the run dir (resume after a crash during export)
    steps = int(trainer.state.global_step)
    eval_loss = None
    if eval_ds is not None and (not cfg.eval_steps or steps % cfg.eval_steps):
        eval_loss = trainer.evaluate()["eval_loss"]  # the end of training (logged too)
    elif eval_ds is not None:
        eval_loss = next(
            (r["eval_loss"] for r in reversed(trainer.state.log_history) if "eval_loss" in r),
            None,
        )

    training: dict[str, Any] = {}
    if trainer.is_world_process_zero():
        training = _summary(cfg, trainer, ens, train_ds, groups, collate_fn, result, t0)
        training["prior"] = prior
        training["member_memory"] = member_memory
        if eval_loss is not None:
            training["eval_loss"] = round(float(eval_loss), 6)

        def finish(ens_dir: Path) -> None:  # on the directory before it is renamed into place
            if cfg.reference_prompts:
                _fit_reference(cfg, held_out, ens_dir)
            if calibration:
                _calibrate(cfg, calibration, ens_dir)

        base = str(Path(cfg.base).resolve())
        try:
            export_ensemble(ens, cfg, base, cfg.run_dir, training, finish=finish)
        except BaseException:
            print(
                f"softspec train: nothing was written to {cfg.out}; the trained state is kept "
                f"in {cfg.run_dir}: rerun the same command with --resume to export it",
                file=sys.stderr,
            )
            raise
        if not cfg.keep_checkpoints:
            shutil.rmtree(cfg.run_dir, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    return TrainResult(Path(cfg.out), steps, time.monotonic() - t0, training.get("routing", {}))


def _member_memory(
    cfg: TrainConfig, ens: EnsembleLM, train_ds: Any, device: Any, main: bool
) -> dict[str, Any]:
    """Resolve ``--member-memory`` from the activation estimate; warn when it will not fit."""
    if isinstance(cfg, DPOConfig):
        longest = max(
            max(len(p.chosen.input_ids), len(p.rejected.input_ids)) for p in train_ds.pairs
        )
        sequences = 2 * cfg.batch_size  # chosen and rejected
    else:
        longest = max(len(e.input_ids) for e in train_ds.examples)
        sequences = cfg.batch_size
    dtype_bytes = next(ens.parameters()).element_size()
    per_member = activation_bytes(
        ens.causal_lm.config,
        sequences * longest,
        lora_dropout=cfg.lora_dropout,
        checkpointing=cfg.gradient_checkpointing,
        dtype_bytes=dtype_bytes,
    )
    available = available_bytes(device)
    used, warning = choose_member_memory(
        str(cfg.member_memory), cfg.members, per_member, available, cfg.gradient_checkpointing
    )
    if warning and main:
        print(f"softspec train: warning: {warning}", file=sys.stderr)
    return {
        "requested": str(cfg.member_memory),
        "used": used,
        "activation_estimate_gib": {
            "per_member": round(per_member / GIB, 3),
            "coupled": round(cfg.members * per_member / GIB, 3),
        },
        "available_gib": round(available / GIB, 2),
    }


def _finished(checkpoint: Path, cfg: TrainConfig) -> bool:
    """Whether ``checkpoint`` is the end of the run ``cfg`` asks for (its steps or epochs)."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    if cfg.max_steps > 0:
        return int(state["global_step"]) >= cfg.max_steps
    return float(state.get("epoch") or 0.0) >= cfg.epochs


def _record_segment(run_dir: Path, checkpoint: Path | None, mode: dict[str, Any]) -> list[Any]:
    """Append this (re)start's mode to the run's history; a resume may change the mode."""
    path = run_dir / MEMBER_MEMORY_FILE
    segments = json.loads(path.read_text()) if checkpoint is not None and path.is_file() else []
    step = int(checkpoint.name.split("-")[-1]) if checkpoint is not None else 0
    segments = [s for s in segments if s["from_step"] < step]  # steps redone after a crash
    segments.append({"from_step": step, "used": mode["used"], "requested": mode["requested"]})
    atomic_write_json(path, segments)
    return segments


def _calibration_split(cfg: TrainConfig) -> tuple[list[list[dict[str, str]]], frozenset[int]]:
    """Prompts held out for the gate's calibration, and their rows' line numbers."""
    if not cfg.gate_calibration:
        return [], frozenset()
    from training.calibrate import held_out_prompts
    from training.data import read_rows

    rows = read_rows(cfg.data)
    n_prompts = len({repr(r.get("prompt", r.get("messages"))) for r in rows})
    if n_prompts < 5 * cfg.gate_calibration:  # keep at least 80 % of the prompts to train on
        print(
            f"softspec train: the gate is not calibrated: {cfg.data} has {n_prompts} distinct "
            f"prompts, fewer than 5 × --gate-calibration {cfg.gate_calibration}; calibrate "
            "later with `softspec eval --calibrate-gate`",
            file=sys.stderr,
        )
        return [], frozenset()
    return held_out_prompts(rows, cfg.gate_calibration, cfg.seed)


def _fit_reference(cfg: TrainConfig, held_out: frozenset[int], ens_dir: Path) -> None:
    """The prompt_distance reference, fitted to the trained-on prompts (not the held-out)."""
    from training.data import read_rows
    from training.reference import MIN_REFERENCE, fit_reference, reference_prompts

    prompts = reference_prompts(read_rows(cfg.data), cfg.reference_prompts, cfg.seed, held_out)
    if len(prompts) < MIN_REFERENCE:
        print(
            f"softspec train: prompt_distance is not served: {cfg.data} has {len(prompts)} "
            f"distinct training prompts, fewer than {MIN_REFERENCE}",
            file=sys.stderr,
        )
        return
    t0 = time.monotonic()
    fit_reference(ens_dir, prompts, source=f"{len(prompts)} distinct training prompts")
    print(
        f"softspec train: prompt_distance reference fitted to {len(prompts)} training prompts "
        f"in {time.monotonic() - t0:.0f}s",
        file=sys.stderr,
    )


def _calibrate(cfg: TrainConfig, prompts: list[list[dict[str, str]]], ens_dir: Path) -> None:
    """Fit the ``combined`` gate on the held-out prompts and write it into the manifest."""
    from ensemble.manifest import load as load_manifest
    from training.calibrate import fit_gate

    gate = fit_gate(ens_dir, prompts, cfg.gate_rate)
    load_manifest(ens_dir).model_copy(update={"gate": gate}).save(ens_dir)


def _summary(
    cfg: TrainConfig,
    trainer: EnsembleTrainer,
    ens: EnsembleLM,
    train_ds: Any,
    groups: list[str],
    collate_fn: Any,
    result: Any,
    t0: float,
) -> dict[str, Any]:
    """The manifest's free-form ``training`` section, with routing statistics."""
    ens.eval()
    device = trainer.args.device

    def batch_logp(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        batch = {k: v.to(device) for k, v in batch.items() if k != "idx"}  # no reference cache
        logp, routing = trainer.member_logp(ens, batch)
        return routing if routing is not None else logp

    logp, idx = score_examples(
        batch_logp, train_ds, collate_fn, cfg.batch_size, cfg.routing_examples, cfg.seed
    )
    lw = ens.log_weights.double().cpu().numpy()
    routing = routing_summary(logp, cfg.alpha, lw, [groups[i] for i in idx], ens.members)
    metrics = result.metrics if result is not None else {}
    return {
        "objective": cfg.objective,
        "data": {"path": str(Path(cfg.data).resolve()), "sha256": sha256_file(cfg.data)},
        "examples": len(train_ds),
        "steps": int(trainer.state.global_step),
        "epochs": round(float(trainer.state.epoch or 0.0), 4),
        "train_loss": metrics.get("train_loss"),
        "seconds": round(time.monotonic() - t0, 1),
        "config": cfg.to_dict(),
        "member_seeds": [cfg.member_seed(k) for k in range(cfg.members)],
        "routing": routing,
    }
