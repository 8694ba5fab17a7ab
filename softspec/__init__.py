"""Soft Specialists: the command line, default assets (base model, datasets) and the demo.

The math and the manifest live in :mod:`ensemble`, the trainer in :mod:`training`, the
gateway in :mod:`server` and the client in :mod:`clients`.
"""

__version__ = "0.1.0"
