"""The production engine: a vLLM OpenAI-compatible server with one LoRA adapter per member.

One shared :class:`httpx.AsyncClient` (explicit timeouts) talks to vLLM:

* ``POST /tokenize`` renders a chat prompt (vLLM applies the model's chat template) or
  encodes a text prompt, once per request;
* ``POST /v1/completions`` with the prompt as token ids generates a member's candidates
  (``logprobs: N``, tokens as ids), and scores candidates under a member by sending
  prompt + candidate ids with ``max_tokens: 1`` and ``prompt_logprobs: N`` — all of a
  member's candidates in one batched request;
* ``GET /v1/models`` answers readiness (every versioned adapter name present) and names
  the base model (the entry without a ``parent``), which scores the base-relative
  ``novelty`` scores with every adapter off — no extra model is loaded for them.

With ``embed_url``, a second vLLM server runs the base model as a pooling model
(``--runner pooling``, :func:`server.vllm_args.embedder_args`): ``POST /pooling`` with the
prompt's token ids and ``task: token_embed`` returns the base's last-layer hidden state of
every prompt token (float32, base64), from which the service computes ``prompt_distance``
(:mod:`ensemble.density`). Readiness then needs both servers.

Connection failures become 503, timeouts 504, vLLM 5xx 502 and vLLM 4xx a 400 carrying
vLLM's own message; each is counted per member in the metrics.

Base-model requests never share a vLLM batch with adapter requests: on vLLM 0.32's CPU
backend a request without a LoRA that is batched with LoRA requests is run with the last
loaded adapter (the "no adapter" index −1 selects the last slot), which turned the base's
log-probs into one member's (measured: member m3 and the "base" agreed to every digit).
:class:`_BaseExclusive` lets adapter calls run together and gives a base call the engine
to itself; the cost is that base scoring waits for this gateway's adapter calls in flight.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import math
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import httpx
import numpy as np
import orjson

from ensemble.manifest import EnsembleManifest
from ensemble.math import align_top_logprobs, token_uncertainty_many
from server.engine import (
    BASE,
    Engine,
    Generation,
    MixtureStep,
    ReadyState,
    SamplingParams,
    TokenDecodeBroken,
    TokenScores,
)
from server.errors import (
    APIError,
    InvalidRequestError,
    UpstreamError,
    UpstreamTimeoutError,
    UpstreamUnavailableError,
)
from server.http import UpstreamClient
from server.lockstep import xargs
from server.metrics import Metrics

__all__ = ["VLLMEngine"]

_ID_PREFIX = "token_id:"
EMBEDDER = "@embed"  # the pooling server, as a member label in the metrics


@dataclass
class _Row:
    """One member's token at one answer position, from its stream."""

    token: int
    logprob: float
    top: dict[int, float]
    text: str
    finish_reason: str | None = None
    stop_reason: Any = None


def _token_id(key: str) -> int:
    return int(key[len(_ID_PREFIX) :]) if key.startswith(_ID_PREFIX) else int(key)


class _BaseExclusive:
    """A readers–writer lock: adapter calls share, base calls are exclusive (writer first)."""

    def __init__(self) -> None:
        self._cond = asyncio.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting = 0

    @contextlib.asynccontextmanager
    async def hold(self, exclusive: bool) -> AsyncIterator[None]:
        async with self._cond:
            if exclusive:
                self._waiting += 1
                try:
                    await self._cond.wait_for(lambda: not self._exclusive and self._shared == 0)
                finally:
                    self._waiting -= 1
                self._exclusive = True
            else:
                await self._cond.wait_for(lambda: not self._exclusive and self._waiting == 0)
                self._shared += 1
        try:
            yield
        finally:
            async with self._cond:
                if exclusive:
                    self._exclusive = False
                else:
                    self._shared -= 1
                self._cond.notify_all()


class VLLMEngine(Engine):
    """See the module docstring."""

    kind = "vllm"
    supports_token_decode = True
    LOCKSTEP_ATTEMPTS = 3  # groups per token-mode request before falling back

    def __init__(
        self,
        base_url: str,
        manifest: EnsembleManifest,
        *,
        timeout: float = 120.0,
        metrics: Metrics | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        max_model_len: int = 2048,
        embed_url: str | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.embed_url = embed_url.rstrip("/") if embed_url else None
        self.supports_embed = self.embed_url is not None
        self._embedder = UpstreamClient(
            transport, RuntimeError("VLLMEngine.start() was not called")
        )
        self._embed_model: str | None = None
        self.manifest = manifest
        self.timeout = timeout
        self.metrics = metrics
        self._upstream = UpstreamClient(
            transport, RuntimeError("VLLMEngine.start() was not called")
        )
        self._texts: dict[int, str] = {}
        self._base_id: str | None = None  # vLLM's id of the base model (adapters off)
        self._batching = _BaseExclusive()  # base requests never batch with adapter requests
        self._abort_token: int | None = None  # lock-step: the token a split group stops on
        self.max_model_len = max_model_len

    # ------------------------------------------------------------------ plumbing

    async def start(self) -> None:
        self._upstream.open(httpx.Timeout(self.timeout, connect=5.0), base_url=self.base_url)
        if self.embed_url is not None:
            self._embedder.open(httpx.Timeout(self.timeout, connect=5.0), base_url=self.embed_url)

    async def close(self) -> None:
        await self._upstream.aclose()
        await self._embedder.aclose()

    @property
    def client(self) -> httpx.AsyncClient:
        return self._upstream.http

    def served(self, member: str) -> str:
        return self.manifest.served_name(member)

    async def _call(
        self,
        method: str,
        path: str,
        member: str,
        op: str,
        body: dict[str, Any] | None = None,
        client: httpx.AsyncClient | None = None,
    ) -> Any:
        where = self.embed_url if client is not None else self.base_url
        with self._upstream_call(member, op, where):
            resp = await (client or self.client).request(method, path, json=body)
        self._check(resp, member, op)
        return orjson.loads(resp.content)

    @contextlib.contextmanager
    def _upstream_call(self, member: str, op: str, where: str | None) -> Iterator[None]:
        """One call to vLLM: transport failures become 503 / 504 errors (counted per
        member), and its latency is observed."""
        t0 = time.perf_counter()
        try:
            yield
        except httpx.TimeoutException as exc:
            self._count(member, "timeout")
            raise UpstreamTimeoutError(
                f"the engine did not answer {op} for member {member} within {self.timeout:.0f}s"
            ) from exc
        except httpx.TransportError as exc:
            self._count(member, "unavailable")
            raise UpstreamUnavailableError(
                f"the engine at {where} is unreachable ({type(exc).__name__}); retry later"
            ) from exc
        finally:
            if self.metrics is not None:
                self.metrics.upstream_latency.labels(member, op).observe(time.perf_counter() - t0)

    def _count(self, member: str, kind: str) -> None:
        if self.metrics is not None:
            self.metrics.upstream_errors.labels(member, kind).inc()

    # ------------------------------------------------------------------ interface

    async def ready(self) -> ReadyState:
        try:
            data = await self._call("GET", "/v1/models", "-", "models")
        except APIError as exc:
            return ReadyState(False, exc.message)
        self._learn_models(data)
        ids = {m.get("id") for m in data.get("data", [])}
        members = {name: self.served(name) in ids for name in self.manifest.member_names}
        missing = [n for n, ok in members.items() if not ok]
        detail = "all members loaded" if not missing else f"adapters not loaded: {missing}"
        if not missing and self.embed_url is not None:
            try:
                await self._embedder_model()
            except APIError as exc:
                return ReadyState(False, f"the prompt-distance embedder: {exc.message}", members)
        return ReadyState(not missing, detail, members)

    async def _embedder_model(self) -> str:
        """The pooling server's model id (asked once it answers; checked at every probe)."""
        data = await self._call("GET", "/v1/models", EMBEDDER, "models", client=self._embedder.http)
        entries = data.get("data") or []
        if not entries:
            raise UpstreamError("the embedder lists no model")
        self._embed_model = str(entries[0]["id"])
        return self._embed_model

    async def embed(self, prompt_ids: Sequence[int]) -> np.ndarray:
        """(T, d) last-layer hidden states of the base on the prompt (the pooling server)."""
        if self.embed_url is None:
            raise NotImplementedError("this engine has no embedder (embed_url)")
        model = self._embed_model or await self._embedder_model()
        body = {
            "model": model,
            "input": list(prompt_ids),
            "task": "token_embed",
            "encoding_format": "base64",
            "embed_dtype": "float32",
            "endianness": "little",
        }
        data = await self._call(
            "POST", "/pooling", EMBEDDER, "embed", body, client=self._embedder.http
        )
        try:
            raw = np.frombuffer(base64.b64decode(data["data"][0]["data"]), dtype="<f4")
            return raw.reshape(len(prompt_ids), -1).astype(np.float64)
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise UpstreamError(
                f"the embedder returned no hidden states for {len(prompt_ids)} tokens ({exc})"
            ) from exc

    def _learn_models(self, data: dict[str, Any]) -> None:
        """Context length and the base model's id (the entry that is not an adapter)."""
        adapters = {self.served(m) for m in self.manifest.member_names}
        for m in data.get("data", []):
            if m.get("max_model_len"):
                self.max_model_len = int(m["max_model_len"])
            if self._base_id is None and not m.get("parent") and m.get("id") not in adapters:
                self._base_id = str(m["id"])

    async def _model(self, member: str) -> str:
        """The vLLM model id that runs ``member``; :data:`BASE` is the base model."""
        if member != BASE:
            return self.served(member)
        if self._base_id is None:
            self._learn_models(await self._call("GET", "/v1/models", BASE, "models"))
        if self._base_id is None:
            raise UpstreamError("the engine lists no base model (an entry without a parent)")
        return self._base_id

    async def render_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        first = self.manifest.member_names[0]
        body = {
            "model": self.served(first),
            "messages": list(messages),
            "add_generation_prompt": True,
        }
        return list((await self._call("POST", "/tokenize", first, "tokenize", body))["tokens"])

    async def encode(self, text: str) -> list[int]:
        first = self.manifest.member_names[0]
        body = {"model": self.served(first), "prompt": text}
        return list((await self._call("POST", "/tokenize", first, "tokenize", body))["tokens"])

    async def token_texts(self, ids: Sequence[int]) -> dict[int, str]:
        missing = sorted({i for i in ids if i not in self._texts})
        first = self.manifest.member_names[0]

        async def one(i: int) -> None:
            body = {"model": self.served(first), "tokens": [i]}
            self._texts[i] = (await self._call("POST", "/detokenize", first, "detokenize", body))[
                "prompt"
            ]

        await asyncio.gather(*(one(i) for i in missing))
        return {i: self._texts[i] for i in ids}

    async def generate(
        self, member: str, prompt_ids: Sequence[int], params: SamplingParams
    ) -> list[Generation]:
        body: dict[str, Any] = {
            "model": self.served(member),
            "prompt": list(prompt_ids),
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "n": params.n,
            "logprobs": params.top_n,
            "return_tokens_as_token_ids": True,
        }
        if params.stop:
            body["stop"] = list(params.stop)
        if params.seed is not None:
            body["seed"] = params.seed
        async with self._batching.hold(exclusive=False):
            data = await self._call("POST", "/v1/completions", member, "generate", body)
        return [
            self._generation(member, c) for c in sorted(data["choices"], key=lambda c: c["index"])
        ]

    def _generation(self, member: str, choice: dict[str, Any]) -> Generation:
        lp = choice.get("logprobs") or {}
        ids = [_token_id(t) for t in lp.get("tokens") or []]
        skip = len(_ID_PREFIX)  # keys are "token_id:<id>" (return_tokens_as_token_ids)
        scores = TokenScores(
            token_ids=ids,
            logprobs=[float(x) for x in lp.get("token_logprobs") or []],
            top=[
                {int(k[skip:]): v for k, v in (d or {}).items()}
                for d in lp.get("top_logprobs") or []
            ],
        )
        return Generation(
            member, choice.get("text", ""), ids, choice.get("finish_reason") or "stop", scores
        )

    async def score(
        self,
        member: str,
        prompt_ids: Sequence[int],
        candidates: Sequence[Sequence[int]],
        top_n: int,
    ) -> list[TokenScores]:
        if not candidates:
            return []
        body = {
            "model": await self._model(member),
            "prompt": [list(prompt_ids) + list(c) for c in candidates],
            "max_tokens": 1,
            "temperature": 0.0,
            "prompt_logprobs": top_n,
        }
        async with self._batching.hold(exclusive=member == BASE):
            data = await self._call("POST", "/v1/completions", member, "score", body)
        choices = sorted(data["choices"], key=lambda c: c["index"])
        return [
            self._scored(len(prompt_ids), c, ch, top_n)
            for c, ch in zip(candidates, choices, strict=True)
        ]

    def _scored(
        self, n_prompt: int, cand: Sequence[int], choice: dict[str, Any], top_n: int
    ) -> TokenScores:
        """The candidate's positions of a prompt_logprobs answer (hot path: plain loops).

        Every returned entry is kept: the top-N plus, when it ranks lower, the actual token.
        Display strings are cached for the actual tokens; others are fetched on demand.
        """
        positions = (choice.get("prompt_logprobs") or [])[n_prompt : n_prompt + len(cand)]
        logprobs, tops = [], []
        for tok, entry in zip(cand, positions, strict=True):
            actual = (entry or {}).get(str(tok))
            if actual is None:
                raise UpstreamError(f"the engine returned no log-prob for scored token {tok}")
            logprobs.append(float(actual["logprob"]))
            if tok not in self._texts and actual.get("decoded_token") is not None:
                self._texts[tok] = actual["decoded_token"]
            tops.append({int(k): v["logprob"] for k, v in entry.items()} if top_n else {})
        return TokenScores(list(cand), logprobs, tops)

    # ------------------------------------------------------------------ token mode

    def decode_mixture(
        self,
        members: Sequence[str],
        log_weights: Any,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        live: bool = True,
    ) -> AsyncIterator[MixtureStep]:
        """Lock-step mixture decoding inside vLLM (:mod:`server.lockstep`): the K member
        requests go out as one group; each position's token is the group's, and each row's
        raw top-N log-probs give the token-level decomposition (top-N, aligned by
        :func:`ensemble.math.align_top_logprobs`).

        A group that splits (a member missed a step: ``stop_reason`` is the abort token; or
        the rows' tokens differ: vLLM runs without the lock-step processor) is resumed as a
        new group from the tokens decided before the split, up to
        :attr:`LOCKSTEP_ATTEMPTS` groups; then :class:`TokenDecodeBroken`.

        ``live=False`` asks vLLM for whole answers instead of token-by-token streams (three
        JSON bodies instead of hundreds of SSE events: the gateway's CPU per request)."""
        return self._lockstep(
            list(members), np.asarray(log_weights, dtype=np.float64), list(prompt_ids), params,
            live,
        )  # fmt: skip

    async def _abort(self) -> int:
        """The abort token: the chat template's first token (BOS or a turn marker), which
        a model does not emit inside an answer. Were the mixture to choose it, the group
        would look split and be resumed or answered in sequence mode: slower, still right."""
        if self._abort_token is None:
            self._abort_token = (await self.render_chat([{"role": "user", "content": "x"}]))[0]
        return self._abort_token

    async def _lockstep(
        self,
        members: list[str],
        lw: np.ndarray,
        prompt: list[int],
        params: SamplingParams,
        live: bool,
    ) -> AsyncIterator[MixtureStep]:
        abort = await self._abort()
        steps: list[MixtureStep] = []
        seen: list[list[_Row]] = []  # every decided position's K rows
        reason = ""
        for attempt in range(self.LOCKSTEP_ATTEMPTS):
            seed = None if params.seed is None else params.seed + attempt
            group = uuid.uuid4().hex
            left = replace(params, max_tokens=params.max_tokens - len(steps))
            prefix = prompt + [s.token_id for s in steps]
            async with contextlib.AsyncExitStack() as stack:
                rows = []
                for i, m in enumerate(members):
                    it = self._member_rows(
                        m, i, len(members), float(math.exp(lw[i])), group, seed, prefix, left,
                        abort, live,
                    )  # fmt: skip
                    rows.append(await stack.enter_async_context(contextlib.aclosing(it)))
                first = True
                while True:
                    try:
                        if first:  # opens the K requests together (one group)
                            at = list(await asyncio.gather(*(anext(r) for r in rows)))
                            first = False
                        else:  # in lock-step the rows arrive together: no tasks needed
                            at = [await anext(r) for r in rows]
                    except StopAsyncIteration:
                        reason = "diverged"  # one row ended before the others
                        break
                    tok = at[0].token
                    if any(r.token != tok for r in at):
                        reason = "diverged"
                        break
                    if tok == abort and any(r.stop_reason == abort for r in at):
                        reason = "incomplete"
                        break
                    step = MixtureStep(
                        token_id=tok,
                        text=at[0].text,
                        logprob=_logsumexp([w + r.logprob for w, r in zip(lw, at, strict=True)]),
                        top={},  # filled for every step at the end (_fill_steps)
                        uncertainty={},
                        member_logprobs={m: r.logprob for m, r in zip(members, at, strict=True)},
                        finish_reason=at[0].finish_reason,
                    )
                    steps.append(step)
                    seen.append(at)
                    yield step
                    if step.finish_reason is not None:
                        _fill_steps(steps, seen, lw, params.top_n)
                        if self.metrics is not None:
                            self.metrics.lockstep.labels("resumed" if attempt else "exact").inc()
                        return
            if self.metrics is not None:
                self.metrics.lockstep_splits.labels(reason).inc()
        raise TokenDecodeBroken(f"the member group split {self.LOCKSTEP_ATTEMPTS} times "
                                f"(last: {reason})", len(steps))  # fmt: skip

    async def _member_rows(
        self,
        member: str,
        index: int,
        size: int,
        weight: float,
        group: str,
        seed: int | None,
        prompt: list[int],
        params: SamplingParams,
        abort: int,
        live: bool,
    ) -> AsyncGenerator[_Row, None]:
        """One member's answer, one :class:`_Row` per token. Streamed (``live``), a chunk's
        text goes with its last token and a finish reason that comes alone with the last
        token; else the whole text goes with the last token."""
        body: dict[str, Any] = {
            "model": self.served(member),
            "prompt": prompt,
            "max_tokens": params.max_tokens,
            "temperature": 0.0,  # the processor decides; the forced row has one choice
            "logprobs": params.top_n,
            "return_tokens_as_token_ids": True,
            "stop_token_ids": [abort],
            "stream": live,
            "vllm_xargs": xargs(
                group,
                index,
                size,
                weight,
                temperature=params.temperature,
                top_p=params.top_p,
                seed=seed,
                abort=abort,
            ),
        }
        if params.stop:
            body["stop"] = list(params.stop)
        pending: _Row | None = None
        with self._upstream_call(member, "decode", self.base_url):
            async with (
                self._batching.hold(exclusive=False),
                self.client.stream("POST", "/v1/completions", json=body) as resp,
            ):
                if resp.status_code >= 400 or not live:
                    await resp.aread()
                    self._check(resp, member, "decode")
                lines = resp.aiter_lines() if live else _one_event(resp.content)
                async for line in lines:
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    choice = orjson.loads(line[6:])["choices"][0]
                    lp = choice.get("logprobs") or {}
                    ids = lp.get("tokens") or []
                    for j, key in enumerate(ids):
                        if pending is not None:
                            yield pending
                        pending = _Row(
                            _token_id(key),
                            float(lp["token_logprobs"][j]),
                            {_token_id(k): v for k, v in (lp["top_logprobs"][j] or {}).items()},
                            choice.get("text", "") if j == len(ids) - 1 else "",
                        )
                    if choice.get("finish_reason") and pending is not None:
                        pending.finish_reason = choice["finish_reason"]
                        pending.stop_reason = choice.get("stop_reason")
        if pending is not None:
            yield pending

    def _check(self, resp: httpx.Response, member: str, op: str) -> None:
        if resp.status_code >= 500:
            self._count(member, "server_error")
            raise UpstreamError(f"the engine failed on {op} ({resp.status_code}): {_message(resp)}")
        if resp.status_code >= 400:
            self._count(member, "rejected")
            raise InvalidRequestError(f"the engine rejected the request: {_message(resp)}")


async def _one_event(body: bytes) -> AsyncIterator[str]:
    """A whole (non-streamed) completion as the one SSE event it would have been."""
    yield "data: " + body.decode()


def _logsumexp(xs: Sequence[float]) -> float:
    top = max(xs)
    return top + math.log(sum(math.exp(x - top) for x in xs))


def _fill_steps(
    steps: Sequence[MixtureStep], seen: Sequence[Sequence[_Row]], lw: np.ndarray, top_n: int
) -> None:
    """The token-level decomposition and the mixture's top-N of every lock-step position,
    in one vectorised pass: each position's K top-N lists on a common support
    (:func:`ensemble.math.align_top_logprobs`), padded with zero-probability columns."""
    dists = [[{**r.top, r.token: r.logprob} for r in at] for at in seen]
    aligned = [align_top_logprobs(d) for d in dists]
    width = max(a.shape[1] for a in aligned)
    stack = np.full((len(aligned), len(lw), width), -np.inf)
    for t, a in enumerate(aligned):
        stack[t, :, : a.shape[1]] = a  # the rest bucket sits at column a.shape[1] - 1
    parts = token_uncertainty_many(stack, lw)
    mix = np.logaddexp.reduce(lw[None, :, None] + stack, axis=1)  # (T, width)
    for t, (step, d) in enumerate(zip(steps, dists, strict=True)):
        union = list(dict.fromkeys(tok for member in d for tok in member))
        order = np.argsort(-mix[t, : len(union)], kind="stable")[:top_n]
        step.top = {union[j]: float(mix[t, j]) for j in order}
        step.uncertainty = {k: float(v[t]) for k, v in parts.items()}


def _message(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:300]
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            return str(err.get("message", err))[:500]
        return str(err)[:500]
    return str(body)[:300]
