"""One ensemble request end to end: render → fan out → cross-score → mix → gate.

Beside the members, the base model (adapters off, :data:`server.engine.BASE`) scores the
prompt and the candidates, for the base-relative scores ``prompt_novelty`` and ``novelty``
(:mod:`ensemble.novelty`); the prompt is scored together with the cross-scoring. With a
``density`` reference in the manifest and an engine that can embed prompts, the base's
hidden states of the prompt give ``prompt_distance`` (:mod:`ensemble.density`), fetched
while the members generate.

The service is HTTP-agnostic: routes turn protocol models into a :class:`Job`, call
:meth:`EnsembleService.run` (or :meth:`EnsembleService.stream_tokens` in token mode) and
format the :class:`Outcome` as an OpenAI response. Fan-out uses ``asyncio.gather``, so a
client that disconnects cancels every upstream call.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ensemble.calibration import combined_score
from ensemble.density import GaussianReference, pool_user_span
from ensemble.errors import ConfigError
from ensemble.manifest import EnsembleManifest
from ensemble.math import responsibilities
from ensemble.novelty import novelty
from ensemble.scores import Score
from server.engine import (
    BASE,
    Engine,
    Generation,
    MixtureStep,
    SamplingParams,
    TokenDecodeBroken,
    TokenScores,
)
from server.errors import InvalidRequestError, ModelNotFoundError, UpstreamError
from server.fallback import Fallback, FallbackError, FallbackStream
from server.gate import GateAction, GateDecision, GatePolicy, RequestGate, request_gate
from server.metrics import Metrics
from server.mixing import Candidate, MixOutcome, mean_over_tokens, mix, renormalised
from server.protocol import DecodeMode, EnsembleOptions, SelectMode

__all__ = ["CandidateTable", "EnsembleService", "Job", "Outcome", "Usage"]

MEMBER_SEPARATOR = ":"
# the scores an answer carries that need the answer (None when the gate decided before it)
ANSWER_SCORES = (
    "epistemic",
    "aleatoric",
    "total",
    Score.SEQUENCE_EPISTEMIC.value,
    Score.DISAGREEMENT.value,
    Score.NOVELTY.value,
)


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
    gate: RequestGate | None = None  # None: the server's gate
    kind: str = "chat"  # "chat" | "completion": the endpoint (for the fallback)
    forward: dict[str, Any] = field(default_factory=dict)  # the request as the fallback gets it


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
class CandidateTable:
    """The candidates as the mixing saw them (``return_candidates``; responses.py shapes it)."""

    members: list[str]
    generations: list[Generation]
    L: np.ndarray  # (K, M) log p_k(y_m | x)
    mixture: np.ndarray  # (M,) log p̄(y_m | x)


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
    candidates: CandidateTable | None = None
    token_texts: dict[int, str] = field(default_factory=dict)
    per_token: list[dict[str, float]] = field(default_factory=list)  # scores per answer token
    decode: str = "sequence"  # the mode that produced the answer ("token" | "sequence")
    decode_fallback: str | None = None  # why token mode answered in sequence mode


class EnsembleService:
    """Answers requests for one ensemble on one engine."""

    def __init__(
        self,
        manifest: EnsembleManifest,
        engine: Engine,
        gate: GatePolicy,
        metrics: Metrics,
        top_n: int = 20,
        *,
        fallback: Fallback | None = None,
        fallback_on_error: GateAction = GateAction.ABSTAIN,
        allow_loosen: bool = False,
        reference: GaussianReference | None = None,
    ) -> None:
        self.manifest = manifest
        self.reference = reference if engine.supports_embed else None
        self.engine = engine
        self.gate = gate
        self.metrics = metrics
        self.top_n = top_n
        self.fallback = fallback
        self.fallback_on_error = fallback_on_error
        self.allow_loosen = allow_loosen
        if gate.action is GateAction.ESCALATE and fallback is None:
            raise ConfigError(
                "gate action 'escalate' needs a fallback model: set --fallback-url "
                "(SOFTSPEC_FALLBACK_URL), or choose --gate-action flag or abstain"
            )
        self.log_weights = dict(zip(manifest.member_names, manifest.log_weights(), strict=True))
        self._template: tuple[int, int] | None = None  # chat template (prefix, suffix) tokens
        if gate.score_name == Score.COMBINED and manifest.gate.calibration is None:
            raise ConfigError(
                "the gate score 'combined' needs in-distribution calibration scores in the "
                "manifest: run `softspec eval --ensemble DIR --data IN_DISTRIBUTION.jsonl "
                "--calibrate-gate 0.05` (or retrain), or choose another --gate-score"
            )

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

    def request_gate(self, options: EnsembleOptions) -> RequestGate:
        """The gate of one request: the server's, tightened by ``ensemble.gate`` (400s for
        an override the server does not allow)."""
        return request_gate(
            self.gate,
            options.gate,
            allow_loosen=self.allow_loosen,
            escalate_ok=self.fallback is not None,
            calibration=self.manifest.gate.calibration,
        )

    def resolve_decode(self, job: Job, stream: bool = False) -> DecodeMode:
        """The request's decode mode: as asked, else token mode wherever it works — unless
        the engine cannot decode tokens, or the request or its gate needs what only
        sequence mode produces (several samples per member, the candidates, majority
        selection, a gate on ``sequence_epistemic`` or ``disagreement``), or the request
        streams: a token-mode stream starts before the gate has decided, so it cannot
        carry the ``x-gate-decision`` header that a streamed sequence-mode answer has."""
        if job.options.decode is not None:
            return job.options.decode
        gate = self.gate_for(job)
        sequence_only = {Score.SEQUENCE_EPISTEMIC.value, Score.DISAGREEMENT.value}
        if (
            stream
            or not self.engine.supports_token_decode
            or job.params.n != 1
            or job.options.return_candidates
            or job.options.select == SelectMode.MAJORITY
            or any(p.score_name in sequence_only for p in gate.policies)
        ):
            return DecodeMode.SEQUENCE
        return DecodeMode.TOKEN

    def gate_for(self, job: Job) -> RequestGate:
        if job.gate is None:
            job.gate = self.request_gate(job.options)
        return job.gate

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

    async def run(self, job: Job, early: bool = True) -> Outcome:
        """Sequence mode: generate on every member, cross-score, select, mix, gate.

        When the gate's score is known from the prompt alone and its action withholds the
        answer (abstain, escalate), the prompt is scored first and a gate that fires
        stops the request before any member generates (``early=False`` skips that)."""
        if job.options.decode == DecodeMode.TOKEN:
            raise InvalidRequestError("use stream_tokens for token mode")  # routes guarantee this
        prompt = await self.prompt_ids(job)
        usage = Usage()
        span = await self._content_span(job, prompt)
        known: dict[str, TokenScores] | None = None
        distance: float | None = None
        if early and self.gate_for(job).can_decide_early:
            scored, distance = await asyncio.gather(
                self._score_prompt(job.members, prompt, span, usage),
                self._prompt_distance(prompt, span),
            )
            known = scored
            stopped = self._decide_early(job, scored, distance, usage)
            if stopped is not None:
                return stopped
            gens = await self.engine.generate_all(job.members, prompt, job.params)
        else:  # the embedder is another server: it runs while the members generate
            gens, distance = await asyncio.gather(
                self.engine.generate_all(job.members, prompt, job.params),
                self._prompt_distance(prompt, span),
            )
        generations = [g for per_member in gens for g in per_member]
        usage.prompt_tokens += len(prompt) * len(job.members)
        usage.completion_tokens += sum(len(g.token_ids) for g in generations)
        # the prompt's scores travel with the cross-scoring: the engine runs base requests
        # apart from adapter requests (server/vllm_engine.py), so during generation they
        # would only wait
        if known is None:
            (cands, base), prompt_scores = await asyncio.gather(
                self._cross_score(job.members, prompt, generations, usage),
                self._score_prompt(job.members, prompt, span, usage),
            )
        else:
            (cands, base), prompt_scores = (
                await self._cross_score(job.members, prompt, generations, usage),
                known,
            )
        lw = renormalised(self.log_weights, job.members)
        outcome = mix(cands, job.members, lw, self.manifest.alpha, job.options.select, self.top_n)
        answer = cands[outcome.answer]
        outcome.uncertainty[Score.NOVELTY.value] = novelty(
            [answer.scores[m].logprobs for m in job.members],
            base[tuple(answer.generation.token_ids)].logprobs,
            lw,
        )
        outcome.uncertainty[Score.PROMPT_NOVELTY.value] = self._prompt_novelty(
            job.members, prompt_scores, lw
        )
        outcome.uncertainty[Score.PROMPT_DISTANCE.value] = distance
        return await self._finish(job, cands, outcome, usage)

    def _decide_early(
        self,
        job: Job,
        prompt_scores: dict[str, TokenScores],
        distance: float | None,
        usage: Usage,
    ) -> Outcome | None:
        """The gate on the prompt's scores alone: an :class:`Outcome` without an answer
        when it fires (abstain / escalate), ``None`` to go on generating."""
        lw = renormalised(self.log_weights, job.members)
        pn = self._prompt_novelty(job.members, prompt_scores, lw)
        if pn is None:
            return None  # nothing to score (an empty user span): decide on the answer
        uncertainty: dict[str, Any] = dict.fromkeys(ANSWER_SCORES)
        uncertainty[Score.PROMPT_NOVELTY.value] = pn
        uncertainty[Score.PROMPT_DISTANCE.value] = distance
        self._with_combined(uncertainty)
        policy = self.gate_for(job)
        if any(uncertainty.get(p.score_name) is None for p in policy.policies):
            return None  # a score it needs is missing (not finite): decide on the answer
        gate = policy.decide(uncertainty, stage="prompt")
        if gate.decision == "pass":
            return None
        self._observe(uncertainty, gate)
        return Outcome(
            text="",
            finish_reason="stop",
            token_ids=[],
            uncertainty=uncertainty,
            responsibilities={m: float(w) for m, w in zip(job.members, np.exp(lw), strict=True)},
            gate=gate,
            usage=usage,
        )

    async def _content_span(self, job: Job, prompt: list[int]) -> tuple[int, int]:
        """[start, end) of the prompt tokens the user wrote: a chat prompt without the
        template's fixed prefix (system prompt, role header) and suffix (generation
        prompt), which are the same for every request; a text prompt after its first token.
        """
        start, end = 1, len(prompt)
        if job.prompt and isinstance(job.prompt, list) and isinstance(job.prompt[0], dict):
            if self._template is None:
                self._template = await _template_span(self.engine)
            pre, suf = self._template
            if pre + suf < len(prompt):
                start, end = max(1, pre), len(prompt) - suf
        return start, end

    async def _score_prompt(
        self, members: Sequence[str], prompt: list[int], span: tuple[int, int], usage: Usage
    ) -> dict[str, TokenScores]:
        """The user's prompt tokens under every member and under the base."""
        start, end = span
        if end <= start:
            return {}
        who = [*members, BASE]
        todo = {m: [prompt[start:end]] for m in who}
        res = await self.engine.score_all(prompt[:start], todo, top_n=0)
        usage.prompt_tokens += end * len(who)
        return {m: res[m][0] for m in who}

    async def _prompt_distance(self, prompt: list[int], span: tuple[int, int]) -> float | None:
        """Squared Mahalanobis distance of the user span's mean base hidden state from the
        training prompts' (``None`` without a reference or an engine that embeds)."""
        start, end = span
        if self.reference is None or end <= start:
            return None
        hidden = await self.engine.embed(prompt)
        return float(self.reference.distance(pool_user_span(hidden, span)))

    @staticmethod
    def _prompt_novelty(
        members: Sequence[str], scores: dict[str, TokenScores], lw: np.ndarray
    ) -> float | None:
        if not scores:
            return None
        return novelty([scores[m].logprobs for m in members], scores[BASE].logprobs, lw)

    async def _cross_score(
        self, members: Sequence[str], prompt: list[int], gens: list[Generation], usage: Usage
    ) -> tuple[list[Candidate], dict[tuple[int, ...], TokenScores]]:
        """Score every distinct candidate under every member that did not generate it, and
        under the base (actual tokens only); returns the candidates and the base's scores."""
        known: dict[tuple[str, tuple[int, ...]], TokenScores] = {}
        for g in gens:
            known.setdefault((g.member, tuple(g.token_ids)), g.scores)
        unique = list(dict.fromkeys(tuple(g.token_ids) for g in gens))
        todo = {m: [seq for seq in unique if (m, seq) not in known] for m in members}
        todo = {m: seqs for m, seqs in todo.items() if seqs}
        results, base = await asyncio.gather(
            self.engine.score_all(prompt, todo, self.top_n),
            self.engine.score_all(prompt, {BASE: unique}, top_n=0),
        )
        usage.prompt_tokens += sum(len(prompt) + len(s) for seqs in todo.values() for s in seqs)
        usage.prompt_tokens += sum(len(prompt) + len(s) for s in unique)
        for m, seqs in todo.items():
            for seq, s in zip(seqs, results[m], strict=True):
                known[(m, seq)] = s
        cands = [Candidate(g, {m: known[(m, tuple(g.token_ids))] for m in members}) for g in gens]
        return cands, dict(zip(unique, base[BASE], strict=True))

    async def _finish(
        self, job: Job, cands: list[Candidate], out: MixOutcome, usage: Usage
    ) -> Outcome:
        answer = cands[out.answer].generation
        uncertainty: dict[str, Any] = self._with_combined(dict(out.uncertainty))
        gate = self.gate_for(job).decide(uncertainty)
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
        candidates = None
        if job.options.return_candidates:
            gens = [c.generation for c in cands]
            candidates = CandidateTable(list(job.members), gens, out.L, out.mixture)
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

    def _with_combined(self, uncertainty: dict[str, Any]) -> dict[str, Any]:
        """Add the calibrated ``combined`` score (``None`` without calibration data)."""
        cal = self.manifest.gate.calibration
        uncertainty[Score.COMBINED.value] = combined_score(cal, uncertainty) if cal else None
        return uncertainty

    def _observe(self, uncertainty: dict[str, Any], gate: GateDecision) -> None:
        if uncertainty.get("epistemic") is not None:
            self.metrics.epistemic.observe(float(uncertainty["epistemic"]))
        self.metrics.gate.labels(gate.decision, gate.stage).inc()

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
        self, job: Job, prompt: list[int], live: bool = True, early: bool = True
    ) -> AsyncIterator[MixtureStep | Outcome]:
        """Token mode: yield each decided token, then the final :class:`Outcome` (only the
        outcome when the gate decides on the prompt alone, as in :meth:`run`;
        ``early=False`` skips that)."""
        lw = renormalised(self.log_weights, job.members)
        distance: float | None = None
        early = early and self.gate_for(job).can_decide_early
        span = await self._content_span(job, prompt)
        known: dict[str, TokenScores] | None = None
        if early:  # the prompt's scores (the distance among them) decide first
            usage = Usage()
            scored, distance = await asyncio.gather(
                self._score_prompt(job.members, prompt, span, usage),
                self._prompt_distance(prompt, span),
            )
            known = scored
            stopped = self._decide_early(job, scored, distance, usage)
            if stopped is not None:
                yield stopped
                return
        # what does not need the answer runs while the members decode: the members' scores
        # of the prompt (for prompt_novelty) and the embedder's distance
        side: list[asyncio.Task[Any]] = []
        if known is None:
            side.append(asyncio.create_task(self._members_on_prompt(job.members, prompt, span)))
            side.append(asyncio.create_task(self._prompt_distance(prompt, span)))
        steps: list[MixtureStep] = []
        try:
            try:
                async for step in self.engine.decode_mixture(
                    job.members, lw, prompt, job.params, live=live
                ):
                    steps.append(step)
                    yield step
            except TokenDecodeBroken as exc:
                if steps:  # tokens went out: the answer cannot be taken back
                    self.metrics.lockstep.labels("broken").inc()
                    raise UpstreamError(
                        f"{exc}; the answer stops here (retry, or use ensemble.decode='sequence')"
                    ) from exc
                self.metrics.lockstep.labels("fallback").inc()
                seq = replace(
                    job, options=job.options.model_copy(update={"decode": DecodeMode.SEQUENCE})
                )
                out = await self.run(seq, early=False)  # the prompt's gate, if any, has passed
                yield replace(out, decode_fallback=str(exc))
                return
            if known is not None:
                members_lp = [known[m].logprobs for m in job.members] if known else None
            else:
                members_lp, distance = await side[0], await side[1]
        finally:
            for task in side:
                task.cancel()
        yield await self._token_outcome(job, prompt, span, steps, lw, distance, members_lp)

    async def _members_on_prompt(
        self, members: Sequence[str], prompt: list[int], span: tuple[int, int]
    ) -> list[list[float]] | None:
        """Each member's log-probs of the user's prompt tokens (``None`` when there are none)."""
        start, end = span
        if end <= start:
            return None
        res = await self.engine.score_all(
            prompt[:start], {m: [prompt[start:end]] for m in members}, top_n=0
        )
        return [res[m][0].logprobs for m in members]

    async def _token_outcome(
        self,
        job: Job,
        prompt: list[int],
        span: tuple[int, int],
        steps: list[MixtureStep],
        lw: np.ndarray,
        distance: float | None,
        members_lp: list[list[float]] | None,
    ) -> Outcome:
        per = [s.uncertainty for s in steps]
        L = np.array([sum(s.member_logprobs[m] for s in steps) for m in job.members])
        resp = responsibilities(L, self.manifest.alpha, lw) if steps else np.exp(lw)
        uncertainty: dict[str, Any] = {
            **mean_over_tokens(per),
            "sequence_epistemic": None,
            "disagreement": None,
        }
        uncertainty.update(
            await self._token_novelty(job.members, prompt, span, steps, lw, members_lp)
        )
        uncertainty[Score.PROMPT_DISTANCE.value] = distance
        self._with_combined(uncertainty)
        gate = self.gate_for(job).decide(uncertainty)
        self._observe(uncertainty, gate)
        texts: dict[int, str] = {}
        if job.options.per_token or job.want_logprobs:
            ids = {s.token_id for s in steps}
            if job.want_logprobs:
                ids |= {t for s in steps for t in list(s.top)[: job.top_logprobs]}
            texts = await self.engine.token_texts(sorted(ids))
        usage = Usage(
            prompt_tokens=len(prompt) * (2 * len(job.members) + 1) + len(steps),
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
            token_texts=texts,
            per_token=per,
            decode="token",
        )

    async def _token_novelty(
        self,
        members: Sequence[str],
        prompt: list[int],
        span: tuple[int, int],
        steps: list[MixtureStep],
        lw: np.ndarray,
        members_lp: list[list[float]] | None,
    ) -> dict[str, float | None]:
        """Both base-relative scores of a token-mode answer: one teacher-forced pass of the
        prompt and the answer under the base; the members' log-probs of the user's prompt
        tokens are ``members_lp`` (scored while they decoded), of the answer the steps'."""
        answer = [s.token_id for s in steps]
        start, end = span
        res = await self.engine.score_all(prompt[:1], {BASE: [prompt[1:] + answer]}, top_n=0)
        base = res[BASE][0].logprobs
        user = slice(start - 1, end - 1)  # positions of the user's tokens after prompt[0]
        answer_lp = [[s.member_logprobs[m] for s in steps] for m in members]
        return {
            Score.PROMPT_NOVELTY.value: novelty(members_lp, base[user], lw)
            if members_lp is not None and end > start
            else None,
            Score.NOVELTY.value: novelty(answer_lp, base[len(prompt) - 1 :], lw) if steps else None,
        }

    # ------------------------------------------------------------------ escalation

    async def escalate(self, job: Job, out: Outcome) -> Outcome:
        """The fallback's answer in place of the ensemble's (non-streamed); on failure the
        failure policy's outcome (:meth:`escalation_failed`)."""
        assert self.fallback is not None  # a gate can escalate only with one (request_gate)
        try:
            answer = await self.fallback.complete(job.kind, job.forward)
        except FallbackError as exc:
            return await self.escalation_failed(job, out, exc)
        self.metrics.escalations.labels("ok").inc()
        gate = replace(
            out.gate.routed(answer.model), escalation={"outcome": "ok", "usage": answer.usage}
        )
        return replace(out, text=answer.text, finish_reason=answer.finish_reason, gate=gate)

    async def open_escalation(self, job: Job, out: Outcome) -> FallbackStream | Outcome:
        """A streamed escalation, opened (nothing relayed yet); the failure policy's
        outcome when the fallback does not answer."""
        assert self.fallback is not None
        try:
            return await self.fallback.open_stream(job.kind, job.forward)
        except FallbackError as exc:
            return await self.escalation_failed(job, out, exc)

    def relayed(self, out: Outcome, relay: FallbackStream, text: str) -> Outcome:
        """A streamed escalation that finished: the outcome the final chunk carries."""
        self.metrics.escalations.labels("ok").inc()
        gate = replace(
            out.gate.routed(relay.model), escalation={"outcome": "ok", "usage": relay.usage}
        )
        return replace(out, text=text, finish_reason=relay.finish_reason, gate=gate)

    def relay_broke(self, exc: FallbackError) -> None:
        """A streamed escalation that failed after its first piece went out."""
        self.metrics.escalations.labels(exc.outcome).inc()

    async def escalation_failed(self, job: Job, out: Outcome, exc: FallbackError) -> Outcome:
        """Apply SOFTSPEC_FALLBACK_ON_ERROR: abstain, or flag the ensemble's answer (which
        is generated now if the gate decided before generating)."""
        self.metrics.escalations.labels(exc.outcome).inc()
        action = self.fallback_on_error
        if action is GateAction.FLAG and out.gate.stage == "prompt":
            if job.options.decode == DecodeMode.TOKEN:
                answer: Any = None
                async for ev in self.stream_tokens(job, await self.prompt_ids(job), False, False):
                    answer = ev
                out = replace(answer, gate=out.gate)
            else:
                out = replace(await self.run(job, early=False), gate=out.gate)
        return replace(out, gate=out.gate.escalation_failed(action, str(exc)))


async def _template_span(engine: Engine) -> tuple[int, int]:
    """(prefix, suffix) token counts the chat template puts around the user's text, from
    two probe renderings that differ only in the message."""
    a = await engine.render_chat([{"role": "user", "content": "x"}])
    b = await engine.render_chat([{"role": "user", "content": "y z w"}])
    pre = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), 0)
    suf = next((i for i, (x, y) in enumerate(zip(a[::-1], b[::-1], strict=False)) if x != y), 0)
    return pre, suf
