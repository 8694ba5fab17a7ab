"""Typed configuration of ``softspec train sft|dpo``: one dataclass per command (TRL style).

Every field carries its help text; :class:`transformers.HfArgumentParser` turns the
dataclass into the command line (``--max-steps`` or ``--max_steps``). Values are validated
in ``__post_init__`` and paths by :meth:`TrainConfig.check_paths`, both before anything is
loaded or written; problems raise :class:`~ensemble.errors.ConfigError` with the fix.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from ensemble.errors import ConfigError
from ensemble.manifest import MANIFEST_FILE
from ensemble.scores import COMBINED_COMPONENTS, MIN_CALIBRATION

__all__ = [
    "ALL_LINEAR",
    "DPOConfig",
    "MemberMemory",
    "PriorInit",
    "SFTConfig",
    "TrainConfig",
    "Weights",
    "run_dir_for",
]

ALL_LINEAR = "all-linear"
# transformers schedules that need no extra arguments (--lr-scheduler)
SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
)
MAX_SEED = 2**32 - 1  # numpy's seed range (transformers seeds numpy too)


class PriorInit(StrEnum):
    """Where each member's LoRA B matrices start (training/prior.py)."""

    ZERO = "zero"  # peft's default: every member equals the base at step 0
    RANDOM = "random"  # B ~ N(0, σ²) per member, σ set by --prior-kl


class MemberMemory(StrEnum):
    """How the K members' backward pass holds memory (training/objective.py)."""

    COUPLED = "coupled"  # one graph over all K members: K members' activations at once
    SEQUENTIAL = "sequential"  # no-grad pass for w, then one member's graph at a time
    AUTO = "auto"  # coupled when the estimate fits in the memory available, else sequential


class Weights(StrEnum):
    """How the mixture weights π are set."""

    UNIFORM = "uniform"  # π_k = 1/K throughout
    LEARNED = "learned"  # EM-style: π ← smoothed mean of α=1 responsibilities, floored


def _help(text: str, **kw: Any) -> Any:
    return field(metadata={"help": text}, **kw)


@dataclass
class TrainConfig:
    """Options shared by SFT and DPO training of an α-Rényi LoRA ensemble."""

    data: str = _help("training data, JSONL in a TRL format (see README)")
    out: str = _help("ensemble directory to write (must not exist, unless --overwrite)")
    base: str = _help(
        "frozen base model directory (Hugging Face format); default: the exported SmolLM2",
        default="",
    )
    members: int = _help("number of ensemble members K (LoRA adapters)", default=4)
    alpha: float = _help(
        "α >= 0: 0 = independent members, 1 = complementary specialists", default=1.0
    )
    max_steps: int = _help("optimizer steps; -1 = run --epochs epochs", default=-1)
    epochs: float = _help("passes over the data when --max-steps is -1", default=1.0)
    resume: bool = _help(
        "continue an interrupted run from its last complete checkpoint", default=False
    )
    overwrite: bool = _help("replace an existing ensemble directory at --out", default=False)
    learning_rate: float = _help("AdamW learning rate", default=2e-4)
    lr_scheduler: str = _help(f"learning-rate schedule: {', '.join(SCHEDULERS)}", default="linear")
    warmup_ratio: float = _help(
        "fraction in [0, 1) of the optimizer steps for linear warm-up", default=0.0
    )
    batch_size: int = _help("examples per device per step", default=8)
    grad_accum: int = _help("gradient accumulation steps", default=1)
    max_grad_norm: float = _help(
        "clip the global gradient norm (0 = off; clipping couples members)", default=0.0
    )
    max_length: int = _help("maximum tokens per example (prompt + completion)", default=512)
    drop_overlong: bool = _help(
        "drop examples whose completion starts beyond --max-length (default: an error)",
        default=False,
    )
    lora_r: int = _help("LoRA rank r", default=8)
    lora_alpha: int = _help("LoRA scaling α (not the Rényi α)", default=16)
    lora_dropout: float = _help("LoRA dropout", default=0.05)
    target_modules: str = _help(
        "comma-separated module names to adapt, or 'all-linear' (every linear projection)",
        default=ALL_LINEAR,
    )
    seed: int = _help("seed; member k's LoRA A matrices use seed + 1000·k", default=0)
    weights: Weights = _help("mixture weights π: uniform or learned", default=Weights.UNIFORM)
    normalize_by_length: bool = _help(
        "compute responsibilities from per-token log-likelihoods (α acts per token), "
        "not whole-sequence ones",
        default=False,
    )
    group_by_length: bool = _help(
        "batch examples of similar length together (less padding; SFT only)", default=False
    )
    prompt_loss_weight: float = _help(
        "weight in [0, 1] of the prompt tokens' log-likelihood in each member's log p "
        "(SFT; 0 = completion only). The members then also learn what in-distribution "
        "prompts look like, which the served prompt_novelty score reads",
        default=0.0,
    )
    prior_init: PriorInit = _help(
        "members' LoRA B init: 'zero' (peft default) or 'random' (scaled by --prior-kl)",
        default=PriorInit.ZERO,
    )
    prior_kl: float = _help(
        "with --prior-init random: target mean per-token KL(member ‖ base) at step 0, nats",
        default=0.1,
    )
    anchor: float = _help(
        "λ >= 0 of the anchored-ensemble penalty λ Σ_k ‖θ_k − θ_k⁰‖² toward each member's "
        "own initial draw (0 = off)",
        default=0.0,
    )
    gate_calibration: int = _help(
        "distinct prompts held out of --data to calibrate the served 'combined' gate score "
        "at the end of training (0 = off; skipped when the data has too few prompts)",
        default=32,
    )
    reference_prompts: int = _help(
        "distinct training prompts the served 'prompt_distance' score's reference is fitted "
        "to at the end of training (seeded sample; 0 = off)",
        default=2048,
    )
    gate_rate: float = _help(
        "the calibrated gate flags at most this fraction of in-distribution prompts",
        default=0.05,
    )
    member_memory: MemberMemory = _help(
        "members' backward pass: 'coupled' (all K graphs at once, fastest), 'sequential' "
        "(one member's activations at a time, the same gradient) or 'auto' (coupled when "
        "the activation estimate fits the memory available)",
        default=MemberMemory.AUTO,
    )
    gradient_checkpointing: bool = _help(
        "recompute each layer's activations in the backward pass (less activation memory, "
        "about a third more time)",
        default=False,
    )
    eval_data: str = _help(
        "validation JSONL (same format); evaluated every --eval-steps and at the end",
        default="",
    )
    eval_steps: int = _help(
        "with --eval-data: evaluate every N steps (0 = only at the end)", default=0
    )
    save_steps: int = _help("checkpoint every N steps (for --resume)", default=50)
    logging_steps: int = _help("log every N steps to train_log.jsonl", default=5)
    time_budget: float = _help(
        "stop after this many seconds and export (0 = no limit)", default=0.0
    )
    routing_examples: int = _help(
        "training examples scored at the end for the routing statistics", default=512
    )
    name: str = _help("ensemble name (default: the --out directory's name)", default="")
    keep_checkpoints: bool = _help(
        "keep the run directory after a successful export", default=False
    )

    objective = "sft"

    def __post_init__(self) -> None:
        self.weights = Weights(self.weights)
        self.prior_init = PriorInit(self.prior_init)
        self.member_memory = MemberMemory(self.member_memory)
        checks: list[tuple[bool, str]] = [
            (
                0.0 <= self.prompt_loss_weight <= 1.0,
                f"--prompt-loss-weight must be in [0, 1], got {self.prompt_loss_weight}",
            ),
            (
                math.isfinite(self.prior_kl) and self.prior_kl > 0,
                f"--prior-kl must be > 0 nats, got {self.prior_kl}",
            ),
            (
                math.isfinite(self.anchor) and self.anchor >= 0,
                f"--anchor must be >= 0, got {self.anchor}",
            ),
            (
                self.reference_prompts >= 0,
                f"--reference-prompts must be >= 0 (0 = off), got {self.reference_prompts}",
            ),
            (
                self.gate_calibration == 0 or self.gate_calibration >= MIN_CALIBRATION,
                f"--gate-calibration must be 0 (off) or >= {MIN_CALIBRATION} prompts, "
                f"got {self.gate_calibration}",
            ),
            (
                0.0 < self.gate_rate < 1.0,
                f"--gate-rate must be in (0, 1), got {self.gate_rate}",
            ),
            (
                not self.gate_calibration
                or len(COMBINED_COMPONENTS) / (self.gate_calibration + 1) <= self.gate_rate,
                f"--gate-rate {self.gate_rate}: {self.gate_calibration} calibration prompts "
                "cannot promise so low a flag rate; raise --gate-calibration or --gate-rate",
            ),
            (bool(self.data), "--data is required: a JSONL file"),
            (bool(self.out), "--out is required: the ensemble directory to write"),
            (
                math.isfinite(self.alpha) and self.alpha >= 0,
                f"--alpha must be >= 0, got {self.alpha}",
            ),
            (self.members >= 1, f"--members must be >= 1, got {self.members}"),
            (
                math.isfinite(self.learning_rate) and self.learning_rate > 0,
                f"--learning-rate must be > 0, got {self.learning_rate}",
            ),
            (
                self.lr_scheduler in SCHEDULERS,
                f"--lr-scheduler {self.lr_scheduler!r}: choose one of {', '.join(SCHEDULERS)}",
            ),
            (
                self.seed >= 0 and self.member_seed(max(self.members, 1)) <= MAX_SEED,
                f"--seed must be in [0, {MAX_SEED} - 1000·K], got {self.seed}",
            ),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (self.grad_accum >= 1, f"--grad-accum must be >= 1, got {self.grad_accum}"),
            (self.max_length >= 2, f"--max-length must be >= 2, got {self.max_length}"),
            (self.lora_r >= 1, f"--lora-r must be >= 1, got {self.lora_r}"),
            (
                0.0 <= self.lora_dropout < 1.0,
                f"--lora-dropout must be in [0, 1), got {self.lora_dropout}",
            ),
            (self.max_steps == -1 or self.max_steps >= 1, "--max-steps must be -1 or >= 1"),
            (
                math.isfinite(self.epochs) and self.epochs > 0,
                f"--epochs must be > 0, got {self.epochs}",
            ),
            (self.save_steps >= 1, f"--save-steps must be >= 1, got {self.save_steps}"),
            (self.logging_steps >= 1, f"--logging-steps must be >= 1, got {self.logging_steps}"),
            (self.time_budget >= 0, "--time-budget must be >= 0 seconds"),
            (
                math.isfinite(self.warmup_ratio) and 0.0 <= self.warmup_ratio < 1.0,
                f"--warmup-ratio is a fraction of the steps in [0, 1), got {self.warmup_ratio}",
            ),
            (self.eval_steps >= 0, f"--eval-steps must be >= 0, got {self.eval_steps}"),
            (
                math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0,
                f"--max-grad-norm must be >= 0, got {self.max_grad_norm}",
            ),
            (not (self.resume and self.overwrite), "--resume and --overwrite exclude each other"),
            (
                not (
                    self.gradient_checkpointing
                    and self.members > 1
                    and self.member_memory == MemberMemory.COUPLED
                ),
                "--gradient-checkpointing with --member-memory coupled would recompute every "
                "member's layers with the last member's adapter; use --member-memory sequential",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        if not self.name:
            self.name = Path(self.out).name
        if not self.target_module_list():
            raise ConfigError("--target-modules is empty: give module names or 'all-linear'")

    # ------------------------------------------------------------------ derived

    def target_module_list(self) -> list[str]:
        return [m.strip() for m in self.target_modules.split(",") if m.strip()]

    def member_names(self) -> list[str]:
        return [f"m{k}" for k in range(self.members)]

    def member_seed(self, k: int) -> int:
        return self.seed + 1000 * k

    @property
    def run_dir(self) -> Path:
        return run_dir_for(Path(self.out))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["weights"] = str(self.weights)
        d["prior_init"] = str(self.prior_init)
        d["member_memory"] = str(self.member_memory)
        d["objective"] = self.objective
        return d

    def identity(self) -> dict[str, Any]:
        """The fields a resumed run must share with the interrupted one."""
        skip = {"resume", "overwrite", "time_budget", "keep_checkpoints", "max_steps", "epochs"}
        skip.add("member_memory")  # the same gradient either way: a resume may change it
        return {k: v for k, v in self.to_dict().items() if k not in skip}

    def check_paths(self) -> None:
        """Validate files and directories (before anything is loaded or written)."""
        for flag, value in (("--data", self.data), ("--eval-data", self.eval_data)):
            if value and not Path(value).is_file():
                raise ConfigError(
                    f"{flag} {value}: no such file (build defaults: softspec data build)"
                )
        base = Path(self.base)
        if not (base / "config.json").is_file():
            raise ConfigError(
                f"--base {self.base}: not a model directory (no config.json); "
                "run `softspec model export-default` or pass a Hugging Face model directory"
            )
        out = Path(self.out)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            if not (out / MANIFEST_FILE).is_file():
                raise ConfigError(
                    f"--out {out} holds something that is not an ensemble: choose another --out"
                )
            if not self.overwrite:
                raise ConfigError(
                    f"--out {out} already holds an ensemble: "
                    "choose another --out or pass --overwrite"
                )
        if self.run_dir.exists() and not self.resume and not self.overwrite:
            raise ConfigError(
                f"an interrupted run left {self.run_dir}: pass --resume to continue it, "
                "or --overwrite to start again"
            )


@dataclass
class SFTConfig(TrainConfig):
    """``softspec train sft``: supervised fine-tuning on prompt/completion or messages data."""

    objective = "sft"


@dataclass
class DPOConfig(TrainConfig):
    """``softspec train dpo``: α-Rényi DPO on {prompt, chosen, rejected} pairs."""

    beta: float = _help("DPO temperature β", default=0.1)
    init_from: str = _help(
        "SFT ensemble directory: each member starts from (and is referenced to) its SFT "
        "adapter; --base defaults to that ensemble's base",
        default="",
    )

    objective = "dpo"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise ConfigError(f"--beta must be > 0, got {self.beta}")
        if self.prompt_loss_weight:
            raise ConfigError(
                "--prompt-loss-weight applies to SFT only (DPO margins cancel the prompt)"
            )

    def check_paths(self) -> None:
        super().check_paths()
        if self.init_from and not (Path(self.init_from) / MANIFEST_FILE).is_file():
            raise ConfigError(f"--init-from {self.init_from}: not an ensemble directory")


def run_dir_for(out: Path) -> Path:
    """Checkpoints and logs of a run in progress live next to ``out`` until the export."""
    return out.with_name(out.name + ".run")
