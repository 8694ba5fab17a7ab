"""The ``combined`` gate, fitted at the end of training on a held-out in-distribution split.

``softspec train`` holds out ``--gate-calibration`` prompts of its own data (every row of a
held-out prompt, so a prompt answered twice in conflicting ways is not half trained on),
trains on the rest, and after the export serves each held-out prompt through the gateway's
own request path (:class:`server.service.EnsembleService` on the in-process engine, greedy
answers) to collect the component scores: ``prompt_distance`` when the ensemble has a
reference (:data:`ensemble.scores.DISTANCE_COMPONENTS`), else ``prompt_novelty``
(:data:`ensemble.scores.COMBINED_COMPONENTS`).
Their sorted values go into the manifest's ``gate.calibration`` with the threshold that
flags at most ``--gate-rate`` of in-distribution prompts (``ensemble/calibration.py``), so a
freshly trained ensemble serves with a calibrated gate and no extra step.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ensemble.calibration import fit_conformal_gate
from ensemble.density import load_reference
from ensemble.errors import ConfigError
from ensemble.manifest import GateSpec
from ensemble.manifest import load as load_manifest
from ensemble.scores import COMBINED_COMPONENTS, DISTANCE_COMPONENTS, Score

__all__ = ["fit_gate", "held_out_prompts", "prompt_of"]


def prompt_of(row: dict[str, Any]) -> list[dict[str, str]] | None:
    """The chat messages a row's answer follows (TRL prompt/completion, DPO or messages)."""
    prompt = row.get("prompt")
    if isinstance(prompt, str) and prompt.strip():
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
        return [{"role": str(m["role"]), "content": str(m["content"])} for m in prompt]
    msgs = row.get("messages")
    if isinstance(msgs, list) and len(msgs) > 1 and msgs[-1].get("role") == "assistant":
        return [{"role": str(m["role"]), "content": str(m["content"])} for m in msgs[:-1]]
    return None


def held_out_prompts(
    rows: Sequence[dict[str, Any]], n: int, seed: int
) -> tuple[list[list[dict[str, str]]], frozenset[int]]:
    """``n`` distinct prompts drawn with ``seed`` and the line numbers of all their rows."""
    by_prompt: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        messages = prompt_of(row)
        if messages is not None:
            by_prompt.setdefault(repr(messages), []).append(row)
    keys = sorted(by_prompt)
    random.Random(seed).shuffle(keys)
    chosen = keys[:n]
    lines = frozenset(int(r["_line"]) for k in chosen for r in by_prompt[k])
    return [prompt_of(by_prompt[k][0]) for k in chosen], lines  # type: ignore[misc]


def fit_gate(
    ens_dir: Path, prompts: Sequence[list[dict[str, str]]], rate: float, max_tokens: int = 24
) -> GateSpec:
    """Serve ``prompts`` on the in-process engine and fit the ``combined`` gate."""
    from server.engine import SamplingParams
    from server.gate import GatePolicy
    from server.metrics import Metrics
    from server.protocol import EnsembleOptions
    from server.service import EnsembleService, Job
    from training.local_engine import LocalEngine

    manifest = load_manifest(ens_dir)
    engine = LocalEngine(ens_dir, manifest)
    policy = GatePolicy(score_name=Score.EPISTEMIC.value, threshold=float("inf"))
    reference = None
    components = COMBINED_COMPONENTS
    if manifest.density is not None:  # the numbers chose the distance alone (ensemble/scores.py)
        reference = load_reference(ens_dir / manifest.density.file)
        components = DISTANCE_COMPONENTS
    service = EnsembleService(manifest, engine, policy, Metrics(), reference=reference)

    async def collect() -> list[dict[str, Any]]:
        await engine.start()
        try:
            rows = []
            for messages in prompts:
                job = Job(
                    model=manifest.name,
                    members=manifest.member_names,
                    prompt=list(messages),
                    params=SamplingParams(max_tokens=max_tokens, temperature=0.0),
                    options=EnsembleOptions(),
                )
                rows.append((await service.run(job)).uncertainty)
            return rows
        finally:
            await engine.close()

    scores = asyncio.run(collect())
    source = f"{len(prompts)} prompts held out of the training data"
    try:
        calibration, threshold = fit_conformal_gate(scores, components, rate, source=source)
    except ValueError as exc:
        raise ConfigError(
            f"--gate-rate {rate}: {exc}; raise --gate-calibration or --gate-rate"
        ) from exc
    return GateSpec(score_name=Score.COMBINED.value, threshold=threshold, calibration=calibration)
