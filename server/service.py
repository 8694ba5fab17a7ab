"""One ensemble request end to end: render → fan out → cross-score → mix → gate.

The service is HTTP-agnostic: routes turn protocol models into a :class:`Job`, call
:meth:`EnsembleService.run` (or :meth:`EnsembleService.stream_tokens` in token mode) and
format the :class:`Outcome` as an OpenAI response. Fan-out uses ``asyncio.gather``, so a
client that disconnects cancels every upstream call.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ensemble.manifest import EnsembleManifest
from server.engine import Engine, Generation, MixtureStep, SamplingParams, TokenScores
from server.errors import InvalidRequestError, ModelNotFoundError
from server.gate import GateDecision, GatePolicy
from server.metrics import Metrics
from server.mixing import Candidate, MixOutcome, mix, renormalised
from server.protocol import DecodeMode, EnsembleOptions

__all__ = ["EnsembleService", "Job", "Outcome", "Usage"]

MEMBER_SEPARATOR = ":"


@dataclass
class Job:
    """A normalised request: what to run, on which members, with which options."""

    model: str
    members: list[str]
    prompt: list[dict[str, str]] | str | list[int]  # chat messages, text, or token ids
    params: SamplingParams
    options: EnsembleOptions
    want_logprobs: bool = False
    top_logprobs: int = 0
    max_tokens_auto: bool = False  # max_tokens not given: shrink to fit the context


@dataclass
class Usage:
    """Every token the ensemble processed: prefilled (prompt) and generated (completion)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


@dataclass
class Outcome:
    text: str
    finish_reason: str
    token_ids: list[int]
    uncertainty: dict[str, Any]
    responsibilities: dict[str, float]
    gate: GateDecision
    usage: Usage
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[int, float]] = field(default_factory=list)
    candidates: list[dict[str, Any]] | None = None
    token_texts: dict[int, str] = field(default_factory=dict)
    per_token: list[dict[str, float]] = field(default_factory=list)


class EnsembleService:
    """Answers requests for one ensemble on one engine."""

    def __init__(
        self,
        manifest: EnsembleManifest,
        engine: Engine,
        gate: GatePolicy,
        metrics: Metrics,
        top_n: int = 20,
    ) -> None:
        self.manifest = manifest
        self.engine = engine
        self.gate = gate
        self.metrics = metrics
        self.top_n = top_n
        self.log_weights = dict(zip(manifest.member_names, manifest.log_weights(), strict=True))

    # ------------------------------------------------------------------ models

    @property
    def model_id(self) -> str:
        return self.manifest.name

    def model_ids(self) -> list[str]:
        return [self.model_id] + [
            f"{self.model_id}{MEMBER_SEPARATOR}{m}" for m in self.manifest.member_names
        ]

    def resolve_members(self, model: str, options: EnsembleOptions) -> list[str]:
        """The members a request runs on: the ensemble (or its subset), or one member."""
        names = self.manifest.member_names
        if model == self.model_id:
            chosen = options.members or names
            unknown = [m for m in chosen if m not in names]
            if unknown:
                raise InvalidRequestError(
                    f"unknown member(s) {unknown} in ensemble.members; this ensemble has {names}",
                    param="ensemble.members",
                )
            return list(dict.fromkeys(chosen))
        prefix = self.model_id + MEMBER_SEPARATOR
        if model.startswith(prefix) and model[len(prefix) :] in names:
            if options.members:
                raise InvalidRequestError(
                    "ensemble.members cannot be used with a single-member model id",
                    param="ensemble.members",
                )
            return [model[len(prefix) :]]
        raise ModelNotFoundError(
            f"the model {model!r} does not exist; available: {', '.join(self.model_ids())}",
            param="model",
        )

    # ------------------------------------------------------------------ prompt

    async def prompt_ids(self, job: Job) -> list[int]:
        """Render the prompt to ids once; fit ``max_tokens`` (when not given) to the context."""
        if isinstance(job.prompt, str):
            ids = await self.engine.encode(job.prompt)
        elif job.prompt and isinstance(job.prompt[0], dict):
            ids = await self.engine.render_chat(job.prompt)
        else:
            ids = list(job.prompt)  # type: ignore[arg-type]
        limit = self.engine.max_model_len
        if job.max_tokens_auto:
            room = max(1, min(job.params.max_tokens, limit - len(ids)))
            job.params = replace(job.params, max_tokens=room)
        if len(ids) + job.params.max_tokens > limit:
            raise InvalidRequestError(
                f"the prompt ({len(ids)} tokens) plus max_tokens ({job.params.max_tokens}) exceeds "
                f"the context length of {limit} tokens; shorten the prompt or lower max_tokens",
                param="max_tokens",
            )
        return ids

    # ------------------------------------------------------------------ sequence mode

    async def run(self, job: Job) -> Outcome:
        """Sequence mode: generate on every member, cross-score, select, mix, gate."""
        if job.options.decode == DecodeMode.TOKEN:
            raise InvalidRequestError("use stream_tokens for token mode")  # routes guarantee this
        prompt = await self.prompt_ids(job)
        usage = Usage()
        gens = await self.engine.generate_all(job.members, prompt, job.params)
        generations = [g for per_member in gens for g in per_member]
        usage.prompt_tokens += len(prompt) * len(job.members)
        usage.completion_tokens += sum(len(g.token_ids) for g in generations)
        cands = await self._cross_score(job.members, prompt, generations, usage)
        lw = renormalised(self.log_weights, job.members)
        outcome = mix(cands, job.members, lw, self.manifest.alpha, job.options.select, self.top_n)
        return await self._finish(job, cands, outcome, usage)

    async def _cross_score(
        self, members: Sequence[str], prompt: list[int], gens: list[Generation], usage: Usage
    ) -> list[Candidate]:
        """Score every distinct candidate under every member that did not generate it."""
        known: dict[tuple[str, tuple[int, ...]], TokenScores] = {}
        for g in gens:
            known.setdefault((g.member, tuple(g.token_ids)), g.scores)
        unique = list(dict.fromkeys(tuple(g.token_ids) for g in gens))
        todo = {m: [seq for seq in unique if (m, seq) not in known] for m in members}
        todo = {m: seqs for m, seqs in todo.items() if seqs}
        results = await self.engine.score_all(prompt, todo, self.top_n)
        usage.prompt_tokens += sum(len(prompt) + len(s) for seqs in todo.values() for s in seqs)
        for m, seqs in todo.items():
            for seq, s in zip(seqs, results[m], strict=True):
                known[(m, seq)] = s
        return [Candidate(g, {m: known[(m, tuple(g.token_ids))] for m in members}) for g in gens]

    async def _finish(
        self, job: Job, cands: list[Candidate], out: MixOutcome, usage: Usage
    ) -> Outcome:
        answer = cands[out.answer].generation
        uncertainty: dict[str, Any] = dict(out.uncertainty)
        gate = self.gate.decide(uncertainty)
        self._observe(uncertainty, gate)
        texts: dict[int, str] = {}
        if job.options.per_token or job.want_logprobs:
            ids = set(answer.token_ids)
            if job.want_logprobs:
                ids |= {
                    t
                    for top in out.token_top[: len(answer.token_ids)]
                    for t in list(top)[: job.top_logprobs]
                }
            texts = await self.engine.token_texts(sorted(ids))
        if job.options.per_token:
            uncertainty["per_token"] = [
                {"token": texts.get(t, ""), **{k: float(v) for k, v in step.items()}}
                for t, step in zip(answer.token_ids, out.per_token, strict=True)
            ]
        candidates = None
        if job.options.return_candidates:
            candidates = [
                {
                    "member": c.member,
                    "text": c.generation.text,
                    "scores": {m: float(out.L[k, i]) for k, m in enumerate(job.members)},
                    "mixture_logprob": float(out.mixture[i]),
                }
                for i, c in enumerate(cands)
            ]
        return Outcome(
            text=answer.text,
            finish_reason=answer.finish_reason,
            token_ids=list(answer.token_ids),
            uncertainty=uncertainty,
            responsibilities=out.responsibilities,
            gate=gate,
            usage=usage,
            logprobs=out.token_logprobs,
            top_logprobs=[dict(list(t.items())[: job.top_logprobs]) for t in out.token_top],
            candidates=candidates,
            token_texts=texts,
            per_token=out.per_token,
        )

    def _observe(self, uncertainty: dict[str, Any], gate: GateDecision) -> None:
        self.metrics.epistemic.observe(float(uncertainty["epistemic"]))
        self.metrics.gate.labels(gate.decision).inc()

    # ------------------------------------------------------------------ token mode

    async def prepare_tokens(self, job: Job) -> list[int]:
        """Validate a token-mode job before anything is streamed; returns the prompt ids."""
        if not self.engine.supports_token_decode:
            raise InvalidRequestError(
                f"ensemble.decode='token' needs the local engine; this server runs "
                f"{self.engine.kind}: use decode='sequence' or `softspec serve --engine local`",
                param="ensemble.decode",
            )
        if job.params.n != 1:
            raise InvalidRequestError(
                "ensemble.samples_per_member applies to sequence mode only",
                param="ensemble.samples_per_member",
            )
        return await self.prompt_ids(job)

    async def stream_tokens(
        self, job: Job, prompt: list[int]
    ) -> AsyncIterator[MixtureStep | Outcome]:
        """Token mode: yield each decided token, then the final :class:`Outcome`."""
        lw = renormalised(self.log_weights, job.members)
        steps: list[MixtureStep] = []
        async for step in self.engine.decode_mixture(job.members, lw, prompt, job.params):
            steps.append(step)
            yield step
        yield self._token_outcome(job, prompt, steps, lw)

    def _token_outcome(
        self, job: Job, prompt: list[int], steps: list[MixtureStep], lw: np.ndarray
    ) -> Outcome:
        from ensemble.math import responsibilities

        per = [s.uncertainty for s in steps]
        mean = {
            k: float(np.mean([p[k] for p in per])) if per else 0.0
            for k in ("epistemic", "aleatoric", "total")
        }
        L = np.array([sum(s.member_logprobs[m] for s in steps) for m in job.members])
        resp = responsibilities(L, self.manifest.alpha, lw) if steps else np.exp(lw)
        uncertainty: dict[str, Any] = {**mean, "sequence_epistemic": None, "disagreement": None}
        if job.options.per_token:
            uncertainty["per_token"] = [{"token": s.text, **s.uncertainty} for s in steps]
        gate = self.gate.decide(uncertainty)
        self._observe(uncertainty, gate)
        usage = Usage(
            prompt_tokens=len(prompt) * len(job.members),
            completion_tokens=len(steps) * len(job.members),
        )
        return Outcome(
            text="".join(s.text for s in steps),
            finish_reason=steps[-1].finish_reason or "length" if steps else "length",
            token_ids=[s.token_id for s in steps],
            uncertainty=uncertainty,
            responsibilities={m: float(r) for m, r in zip(job.members, resp, strict=True)},
            gate=gate,
            usage=usage,
            logprobs=[s.logprob for s in steps],
            top_logprobs=[dict(list(s.top.items())[: job.top_logprobs]) for s in steps],
            token_texts={s.token_id: s.text for s in steps},
            per_token=per,
        )
