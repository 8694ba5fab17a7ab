"""The exception hierarchy shared by every part of Soft Specialists.

Errors are raised where they are detected, with a message that says what was wrong and
what to do; the CLI turns them into one line and exit code 2, the gateway into the OpenAI
error envelope (in one place, ``server/errors.py``).

    SoftspecError
    ├── ConfigError      bad settings, flags or arguments (before any work starts)
    ├── DataError        a dataset file that is missing, empty or malformed
    ├── ManifestError    an ensemble directory that is missing, corrupt or inconsistent
    └── AssetError       a default asset (wheel, model file) missing or with a wrong hash
"""

from __future__ import annotations

__all__ = ["AssetError", "ConfigError", "DataError", "ManifestError", "SoftspecError"]


class SoftspecError(Exception):
    """Base class: a problem the user can fix; the message says how."""


class ConfigError(SoftspecError, ValueError):
    """Invalid configuration, flags or arguments."""


class DataError(SoftspecError, ValueError):
    """A dataset that is missing, empty or malformed."""


class ManifestError(SoftspecError):
    """An ensemble directory that is missing, corrupt or inconsistent."""


class AssetError(SoftspecError):
    """A default asset (model wheel, data wheel, file hash) that is missing or wrong."""
