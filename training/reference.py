"""The reference of the ``prompt_distance`` score: fitted to the training prompts.

``softspec train`` ends (before the gate's calibration) by embedding up to
``--reference-prompts`` distinct training prompts with the base model (adapters off) and
fitting the Gaussian of :mod:`ensemble.density` to their pooled last-layer hidden states;
``softspec reference`` does the same for an existing ensemble. Prompts held out for the
gate's calibration are never in the reference (their distances must be those of fresh
in-distribution prompts).

The hidden states come from :meth:`server.engine.Engine.embed` on the in-process engine,
and the user span from the gateway's own template probe, so the reference is pooled
exactly as the gateway pools a request: the mean of the base's last hidden states over
the tokens of the user's text (the chat template's fixed prefix and suffix left out).

The layer is the last because that is what vLLM's pooling runner returns. The shrinkage
s = 0.01 was chosen for it on validation rows only (``bench/ood_embedding.py``: 76
in-distribution ``sft_topics_val`` prompts vs 160 OOD rows that are not test rows; AUROC
0.974 at s = 0.01, 0.971 at s = 0.1), then measured once on the 187 test rows: 0.965.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ensemble.atomic import atomic_write_bytes, sha256_file
from ensemble.density import REFERENCE_FILE, fit_gaussian, pool_user_span, reference_bytes
from ensemble.errors import ConfigError, DataError
from ensemble.manifest import DensitySpec, EnsembleManifest
from ensemble.manifest import load as load_manifest

__all__ = [
    "DEFAULT_SHRINKAGE",
    "MIN_REFERENCE",
    "fit_reference",
    "reference_prompts",
    "run_reference",
]

DEFAULT_SHRINKAGE = 0.01
BATCH = 16  # prompts per forward pass while embedding
MIN_REFERENCE = 10  # fewer distinct prompts than this: no reference (a Gaussian of nothing)


def reference_prompts(
    rows: Sequence[dict[str, Any]],
    limit: int,
    seed: int,
    exclude_lines: frozenset[int] = frozenset(),
) -> list[list[dict[str, str]]]:
    """Up to ``limit`` distinct prompts of ``rows`` (seeded sample), held-out lines left out."""
    from training.calibrate import prompt_of

    seen: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        if row.get("_line") in exclude_lines:
            continue
        messages = prompt_of(row)
        if messages is not None:
            seen.setdefault(repr(messages), messages)
    keys = sorted(seen)
    if len(keys) > limit:
        random.Random(seed).shuffle(keys)
        keys = sorted(keys[:limit])
    return [seen[k] for k in keys]


def fit_reference(
    ens_dir: Path,
    prompts: Sequence[list[dict[str, str]]],
    shrinkage: float = DEFAULT_SHRINKAGE,
    source: str = "",
) -> EnsembleManifest:
    """Embed ``prompts`` on the in-process engine, write the reference next to the manifest
    (atomically) and record it in the manifest; returns the updated manifest."""
    from server.service import _template_span
    from training.local_engine import LocalEngine

    if len(prompts) < MIN_REFERENCE:
        raise DataError(
            f"the prompt-distance reference needs at least {MIN_REFERENCE} distinct prompts, "
            f"got {len(prompts)}; give more training data"
        )
    manifest = load_manifest(ens_dir)
    engine = LocalEngine(ens_dir, manifest)

    async def embed_all() -> np.ndarray:
        await engine.start()
        try:
            pre, suf = await _template_span(engine)
            rendered = [await engine.render_chat(m) for m in prompts]
            order = sorted(range(len(rendered)), key=lambda i: len(rendered[i]))  # less padding
            pooled: list[np.ndarray] = [np.empty(0)] * len(rendered)
            for b in range(0, len(order), BATCH):
                chunk = order[b : b + BATCH]
                hidden = await engine.embed_batch([rendered[i] for i in chunk])
                for i, h in zip(chunk, hidden, strict=True):
                    n = len(rendered[i])
                    span = (max(1, pre), n - suf) if pre + suf < n else (1, n)
                    pooled[i] = pool_user_span(h, span)
            return np.stack(pooled)
        finally:
            await engine.close()

    vectors = asyncio.run(embed_all())
    ref = fit_gaussian(vectors, shrinkage)
    path = Path(ens_dir) / REFERENCE_FILE
    atomic_write_bytes(path, reference_bytes(ref))
    spec = DensitySpec(
        file=REFERENCE_FILE,
        sha256=sha256_file(path),
        shrinkage=shrinkage,
        n=ref.n,
        dim=int(ref.mean.shape[0]),
        source=source,
    )
    updated = load_manifest(ens_dir).model_copy(update={"density": spec})
    updated.save(ens_dir)
    return updated


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="softspec reference",
        description="Fit the prompt_distance reference of an existing ensemble to its "
        "training prompts (softspec train does this itself).",
    )
    p.add_argument("--ensemble", type=Path, required=True, help="ensemble directory")
    p.add_argument("--data", type=Path, required=True, help="the training data (JSONL)")
    p.add_argument(
        "--max-prompts", type=int, default=2048, help="distinct prompts to fit to (seeded sample)"
    )
    p.add_argument(
        "--shrinkage", type=float, default=DEFAULT_SHRINKAGE, help="covariance shrinkage in (0, 1]"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the sample")
    return p


def run_reference(argv: Sequence[str]) -> int:
    from training.data import read_rows

    args = _parser().parse_args(list(argv))
    if not 0.0 < args.shrinkage <= 1.0:
        raise ConfigError(f"--shrinkage {args.shrinkage}: must be in (0, 1]")
    if args.max_prompts < MIN_REFERENCE:
        raise ConfigError(f"--max-prompts {args.max_prompts}: give at least {MIN_REFERENCE}")
    if not args.data.is_file():
        raise ConfigError(f"--data {args.data}: no such file")
    load_manifest(args.ensemble)  # a broken ensemble fails before the model loads
    prompts = reference_prompts(read_rows(args.data), args.max_prompts, args.seed)
    source = f"{len(prompts)} distinct prompts of {args.data.name}"
    m = fit_reference(args.ensemble, prompts, args.shrinkage, source)
    assert m.density is not None
    print(f"softspec: prompt_distance reference of {m.density.n} prompts ({m.density.dim}-d) "
          f"written to {args.ensemble / m.density.file}", file=sys.stderr)  # fmt: skip
    return 0
