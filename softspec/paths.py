"""Where Soft Specialists keeps its caches: ``$SOFTSPEC_HOME`` (default ``~/.cache/softspec``)."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"


def softspec_home() -> Path:
    """The cache root: ``$SOFTSPEC_HOME`` or ``~/.cache/softspec``."""
    env = os.environ.get("SOFTSPEC_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "softspec"


def default_model_dir() -> Path:
    """Where ``softspec model export-default`` writes the base model."""
    return softspec_home() / "models" / DEFAULT_MODEL_NAME


def default_data_dir() -> Path:
    """Where ``softspec data build`` writes the default datasets."""
    return softspec_home() / "data"
