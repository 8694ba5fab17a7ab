"""The embedded engine: all K members in-process (transformers + peft), no vLLM needed.

One copy of the base model holds every member as a named peft adapter; a forward pass
over a batch whose rows use different adapters (peft's mixed-adapter batches,
``adapter_names=[...]``) runs all K members at once. It implements the same
:class:`server.engine.Engine` interface as vLLM, plus token mode: lock-step mixture
decoding that samples each token from q̄_t = Σ_k π_k q_k,t and reports the exact
full-vocabulary uncertainty of every step.

Torch work runs in a worker thread under a lock (one batch at a time), so the event loop
keeps serving; token-mode steps are streamed through an asyncio queue as they are made.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ensemble.manifest import EnsembleManifest
from ensemble.math import token_uncertainty
from server.engine import (
    BASE,
    Engine,
    Generation,
    MixtureStep,
    ReadyState,
    SamplingParams,
    TokenScores,
)
from server.mixture_torch import nucleus

__all__ = ["LocalEngine"]

PEFT_BASE = "__base__"  # peft's adapter name for "no adapter" in mixed-adapter batches


def _top(lp: torch.Tensor, n: int) -> dict[int, float]:
    values, ids = torch.topk(lp, min(n, lp.shape[-1]))
    return {int(i): float(v) for i, v in zip(ids.tolist(), values.tolist(), strict=True)}


def stop_index(text: str, stops: Sequence[str]) -> int | None:
    """Where the earliest stop string starts in ``text``, or None (vLLM's rule: the output
    ends before the stop string, which is not returned)."""
    found = [text.find(s) for s in stops if s and s in text]
    return min(found) if found else None


class LocalEngine(Engine):
    """See the module docstring."""

    kind = "local"
    supports_token_decode = True
    supports_embed = True

    def __init__(
        self,
        root: str | Path,
        manifest: EnsembleManifest,
        *,
        base_model: str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.root = Path(root)
        self.manifest = manifest
        self.base_model = base_model or manifest.resolve_base_model(self.root)
        self.dtype = dtype
        self.model: Any = None
        self.tok: Any = None
        self._lock = threading.Lock()
        self.max_model_len = 2048

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        await asyncio.to_thread(self._load)

    def _load(self) -> None:
        from peft import PeftModel

        from training.model import load_base

        base, self.tok = load_base(self.base_model, self.dtype)
        names = self.manifest.member_names
        model = PeftModel.from_pretrained(
            base, str(self.manifest.adapter_dir(self.root, names[0])), adapter_name=names[0]
        )
        for name in names[1:]:
            model.load_adapter(str(self.manifest.adapter_dir(self.root, name)), adapter_name=name)
        model.eval()
        self.max_model_len = int(getattr(base.config, "max_position_embeddings", 2048))
        self.model = model

    async def close(self) -> None:
        self.model = None

    async def ready(self) -> ReadyState:
        loaded = self.model is not None
        members = {m: loaded for m in self.manifest.member_names}
        return ReadyState(loaded, "all members loaded" if loaded else "loading", members)

    async def _run(self, fn: Any, *args: Any) -> Any:
        def locked() -> Any:
            with self._lock, torch.no_grad():
                return fn(*args)

        return await asyncio.to_thread(locked)

    # ------------------------------------------------------------------ tokens

    async def render_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        ids = self.tok.apply_chat_template(
            list(messages), add_generation_prompt=True, tokenize=True, return_dict=False
        )
        return list(ids["input_ids"] if isinstance(ids, Mapping) else ids)

    async def encode(self, text: str) -> list[int]:
        return list(self.tok(text)["input_ids"])

    async def token_texts(self, ids: Sequence[int]) -> dict[int, str]:
        return {i: self.tok.decode([i]) for i in ids}

    def _text(self, ids: Sequence[int]) -> str:
        return str(self.tok.decode(list(ids), skip_special_tokens=True))

    # ------------------------------------------------------------------ sequence mode

    async def generate(
        self, member: str, prompt_ids: Sequence[int], params: SamplingParams
    ) -> list[Generation]:
        return (await self.generate_all([member], prompt_ids, params))[0]

    async def generate_all(
        self, members: Sequence[str], prompt_ids: Sequence[int], params: SamplingParams
    ) -> list[list[Generation]]:
        gens = await self._run(self._generate, list(members), list(prompt_ids), params)
        return [[g for g in gens if g.member == m] for m in members]

    def _generate(
        self, members: list[str], prompt: list[int], params: SamplingParams
    ) -> list[Generation]:
        """One batched generate: row r uses adapter ``rows[r]`` (n rows per member)."""
        rows = [m for m in members for _ in range(params.n)]
        if params.seed is not None:
            torch.manual_seed(params.seed)
        sample = params.temperature > 0
        out = self.model.generate(
            input_ids=torch.tensor([prompt] * len(rows)),
            attention_mask=torch.ones(len(rows), len(prompt), dtype=torch.long),
            adapter_names=rows,
            max_new_tokens=params.max_tokens,
            do_sample=sample,
            temperature=params.temperature if sample else None,
            top_p=params.top_p if sample else None,
            top_k=None,
            stop_strings=list(params.stop) or None,
            tokenizer=self.tok if params.stop else None,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=self.tok.pad_token_id,
        )
        new = out.sequences[:, len(prompt) :]  # (R, T)
        logps = torch.log_softmax(torch.stack(out.logits, dim=1).float(), dim=-1)  # (R, T, V) raw
        eos = self.tok.eos_token_id
        gens = []
        for r, member in enumerate(rows):
            ids = new[r].tolist()
            finish = "length"
            if eos in ids:
                ids = ids[: ids.index(eos) + 1]
                finish = "stop"
            text = self._text(ids)
            if params.stop and stop_index(text, params.stop) is not None:
                # cut ids and log-probs after the token that completes the stop string
                t = next(
                    t
                    for t in range(len(ids))
                    if stop_index(self._text(ids[: t + 1]), params.stop) is not None
                )
                ids = ids[: t + 1]
                text = self._text(ids)
                text = text[: stop_index(text, params.stop)]
                finish = "stop"
            lp = logps[r, : len(ids)]
            scores = TokenScores(
                ids,
                [float(lp[t, tok]) for t, tok in enumerate(ids)],
                [_top(lp[t], params.top_n) for t in range(len(ids))],
            )
            gens.append(Generation(member, text, ids, finish, scores))
        return gens

    async def score(
        self,
        member: str,
        prompt_ids: Sequence[int],
        candidates: Sequence[Sequence[int]],
        top_n: int,
    ) -> list[TokenScores]:
        return (await self.score_all(prompt_ids, {member: candidates}, top_n))[member]

    async def score_all(
        self, prompt_ids: Sequence[int], todo: Mapping[str, Sequence[Sequence[int]]], top_n: int
    ) -> dict[str, list[TokenScores]]:
        pairs = [(m, list(c)) for m, seqs in todo.items() for c in seqs]
        if not pairs:
            return {m: [] for m in todo}
        scored = await self._run(self._score, list(prompt_ids), pairs, top_n)
        out: dict[str, list[TokenScores]] = {m: [] for m in todo}
        for (m, _), s in zip(pairs, scored, strict=True):
            out[m].append(s)
        return out

    def _score(
        self, prompt: list[int], pairs: list[tuple[str, list[int]]], top_n: int
    ) -> list[TokenScores]:
        """One mixed-adapter forward over every (member, candidate) row."""
        seqs = [prompt + c for _, c in pairs]
        width = max(len(s) for s in seqs)
        pad = self.tok.pad_token_id
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        adapters = [PEFT_BASE if m == BASE else m for m, _ in pairs]
        logits = self.model(input_ids=ids, attention_mask=mask, adapter_names=adapters).logits
        out = []
        p = len(prompt)
        for r, (_, cand) in enumerate(pairs):
            lp = torch.log_softmax(logits[r, p - 1 : p - 1 + len(cand)].float(), dim=-1)  # (T, V)
            out.append(
                TokenScores(
                    list(cand),
                    [float(lp[t, tok]) for t, tok in enumerate(cand)],
                    [_top(lp[t], top_n) if top_n else {} for t in range(len(cand))],
                )
            )
        return out

    async def embed(self, prompt_ids: Sequence[int]) -> Any:
        return (await self.embed_batch([prompt_ids]))[0]

    async def embed_batch(self, prompts: Sequence[Sequence[int]]) -> list[Any]:
        """:meth:`embed` of several prompts in one right-padded forward pass."""
        return list(await self._run(self._embed, [list(p) for p in prompts]))

    def _embed(self, prompts: list[list[int]]) -> list[Any]:
        """The base's last hidden states (adapters off): what vLLM's pooling runner returns.
        Right padding with an attention mask leaves every real position's state unchanged."""
        width = max(len(p) for p in prompts)
        pad = self.tok.pad_token_id
        ids = torch.tensor([p + [pad] * (width - len(p)) for p in prompts])
        mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in prompts])
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            adapter_names=[PEFT_BASE] * len(prompts),
            output_hidden_states=True,
        )
        last = out.hidden_states[-1].double()
        return [last[i, : len(p)].numpy() for i, p in enumerate(prompts)]

    # ------------------------------------------------------------------ token mode

    def decode_mixture(
        self,
        members: Sequence[str],
        log_weights: Any,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        live: bool = True,
    ) -> AsyncIterator[MixtureStep]:
        return self._stream(
            list(members), np.asarray(log_weights, dtype=np.float64), list(prompt_ids), params
        )

    async def _stream(
        self, members: list[str], lw: np.ndarray, prompt: list[int], params: SamplingParams
    ) -> AsyncIterator[MixtureStep]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[MixtureStep | BaseException | None] = asyncio.Queue()
        stop = threading.Event()

        def produce() -> None:
            try:
                with self._lock, torch.no_grad():
                    for step in self._mixture_steps(members, lw, prompt, params, stop):
                        loop.call_soon_threadsafe(queue.put_nowait, step)
                loop.call_soon_threadsafe(queue.put_nowait, None)
            except BaseException as exc:
                loop.call_soon_threadsafe(queue.put_nowait, exc)

        worker = loop.run_in_executor(None, produce)
        try:
            while (item := await queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()  # a client that goes away stops the decoding loop
            await worker

    def _mixture_steps(
        self,
        members: list[str],
        lw: np.ndarray,
        prompt: list[int],
        params: SamplingParams,
        stop: threading.Event,
    ) -> Any:
        """Lock-step decoding: the K members read the same prefix; each token ~ q̄_t."""
        k = len(members)
        lw_t = torch.tensor(lw, dtype=torch.float64)
        gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        ids = torch.tensor([prompt] * k)
        past = None
        produced: list[int] = []
        text = ""  # the text streamed so far
        # a stop string may span tokens: hold back a possible stop prefix until it resolves
        hold = max((len(s) for s in params.stop), default=1) - 1
        for t in range(params.max_tokens):
            if stop.is_set():
                return
            out = self.model(
                input_ids=ids, past_key_values=past, use_cache=True, adapter_names=members
            )
            past = out.past_key_values
            lq = torch.log_softmax(out.logits[:, -1].double(), dim=-1)  # (K, V)
            mix = torch.logsumexp(lw_t[:, None] + lq, dim=0)  # (V,) log q̄_t
            if params.temperature > 0:
                probs = nucleus(mix, params.temperature, params.top_p)
                tok = int(torch.multinomial(probs, 1, generator=gen))
            else:
                tok = int(torch.argmax(mix))
            produced.append(tok)
            finish = None
            full = self._text(produced)
            cut = stop_index(full, params.stop)
            if cut is not None:
                full = full[:cut]  # the stop string and anything after it are not returned
            if tok == self.tok.eos_token_id or cut is not None:
                finish = "stop"
            elif t == params.max_tokens - 1:
                finish = "length"
            delta = ""
            if finish is not None:
                delta, text = full[len(text) :], full
            elif not full.endswith("\ufffd"):  # hold back split UTF-8
                ready = full[: len(full) - hold]
                if len(ready) > len(text):
                    delta, text = ready[len(text) :], ready
            yield MixtureStep(
                token_id=tok,
                text=delta,
                logprob=float(mix[tok]),
                top=_top(mix, params.top_n),
                uncertainty=token_uncertainty(lq.numpy(), lw),
                member_logprobs={m: float(lq[i, tok]) for i, m in enumerate(members)},
                finish_reason=finish,
            )
            if finish is not None:
                return
            ids = torch.tensor([[tok]] * k)
