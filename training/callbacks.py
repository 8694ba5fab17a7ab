"""Trainer callbacks: the JSONL log (resumable), the time budget, the progress bar."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from ensemble.errors import DataError

__all__ = ["JsonlLogCallback", "PostfixProgressCallback", "TimeBudgetCallback", "read_log"]


def read_log(path: Path) -> list[dict[str, Any]]:
    """The rows of a run's JSONL log. A torn last line (a crash while it was written, the
    case --resume exists for) is dropped; a corrupt line before it is an error."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    last = max((n for n, line in enumerate(lines) if line.strip()), default=-1)
    rows = []
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict):
            if n == last:
                break  # torn by the crash: the step it logged is re-run from the checkpoint
            raise DataError(
                f"{path}:{n + 1}: corrupt training log line (not a JSON object); "
                "delete that line to --resume, or start again with --overwrite"
            )
        rows.append(row)
    return rows


class JsonlLogCallback(TrainerCallback):
    """Appends every log line to ``train_log.jsonl``; on resume drops lines past the checkpoint."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if not state.is_world_process_zero or not self.path.exists():
            return
        keep = [row for row in read_log(self.path) if row.get("step", 0) <= state.global_step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(row) + "\n" for row in keep))
        os.replace(tmp, self.path)

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any
    ) -> None:
        if not state.is_world_process_zero or not logs:
            return
        row = {"step": state.global_step, "time": round(time.time(), 3), **logs}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()


class TimeBudgetCallback(TrainerCallback):
    """Stops training (with a final checkpoint) once ``seconds`` of training have passed."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.start = 0.0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.start = time.monotonic()

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self.seconds and time.monotonic() - self.start > self.seconds:
            control.should_training_stop = True


class PostfixProgressCallback(ProgressCallback):
    """The usual step bar, with loss and routing entropy shown on it instead of printed.

    Under ``--time-budget`` the bar counts seconds against the budget (``elapsed/budget``)
    instead of steps: the step total and its ETA would never be reached.
    """

    def __init__(self, time_budget: float = 0.0, file: Any = None) -> None:
        super().__init__()
        self.time_budget = time_budget
        self.file = file
        self.start = 0.0
        self.shown: dict[str, str] = {}

    def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if not self.time_budget:
            super().on_train_begin(args, state, control, **kw)
            return
        self.start = time.monotonic()
        self.current_step = 0
        if state.is_world_process_zero:
            from tqdm.auto import tqdm

            self.training_bar = tqdm(
                total=round(self.time_budget),
                unit="s",
                dynamic_ncols=True,
                file=self.file,
                bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f}s time budget{postfix}",
            )

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if not self.time_budget:
            super().on_step_end(args, state, control, **kw)
            return
        if state.is_world_process_zero and self.training_bar is not None:
            elapsed = min(time.monotonic() - self.start, float(self.training_bar.total))
            self.training_bar.n = round(elapsed)
            self.current_step = state.global_step
            self.shown["step"] = str(state.global_step)
            self.training_bar.set_postfix(self.shown, refresh=True)

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any
    ) -> None:
        if state.is_world_process_zero and self.training_bar is not None and logs:
            for k in ("loss", "routing_entropy", "eval_loss"):
                if k in logs:
                    self.shown[k] = f"{logs[k]:.4g}"
            self.training_bar.set_postfix(self.shown, refresh=False)
