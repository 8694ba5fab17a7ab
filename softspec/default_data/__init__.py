"""The default datasets: small, real, permissively licensed (BSD, MIT) data for every feature.

``softspec data build`` (:func:`build_datasets`) turns two pinned PyPI data wheels into TRL
conversational JSONL files in :func:`~softspec.paths.default_data_dir`. One module per job:

* :mod:`~softspec.default_data.sources`: reading the ``chatterbot-corpus`` and
  ``chitchat-dataset`` wheels;
* :mod:`~softspec.default_data.splits`: seeded sampling, grouped and stratified splits;
* :mod:`~softspec.default_data.datasets`: how each dataset is made (its docstring is the
  specification, copied into the data directory's README);
* :mod:`~softspec.default_data.build`: the directory, its summary, atomic (re)building;
* :mod:`~softspec.default_data.report`: the command's table and the README.

:func:`read_jsonl` is the project's one JSONL reader (:func:`ensemble.jsonl.read_jsonl`),
re-exported for the callers that read these files.
"""

from __future__ import annotations

from ensemble.jsonl import read_jsonl
from softspec.default_data.build import FORMAT_VERSION, build_datasets
from softspec.default_data.datasets import CONFLICT_SOURCES, DPO_SOURCES, HELD_OUT_TOPICS
from softspec.default_data.report import format_summary

__all__ = [
    "CONFLICT_SOURCES",
    "DPO_SOURCES",
    "FORMAT_VERSION",
    "HELD_OUT_TOPICS",
    "build_datasets",
    "format_summary",
    "read_jsonl",
]
