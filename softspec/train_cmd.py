"""``softspec train sft|dpo``: the application's wiring of the training library."""

from __future__ import annotations

from training.cli import run_train

__all__ = ["run_train"]
