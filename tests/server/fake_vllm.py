"""A deterministic stand-in for vLLM's HTTP API, served through ``httpx.MockTransport``.

Each member is a fixed next-token distribution over a tiny vocabulary that depends on
(member, previous token, position), so generation and prompt-log-prob scoring agree
exactly, as they do in vLLM, and tests can recompute every number by brute force.
Response shapes copy vLLM 0.32's (``token_id:N`` keys with
``return_tokens_as_token_ids``; ``prompt_logprobs`` entries with rank and decoded_token).
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np

VOCAB = [
    "<eos>",
    " yes",
    " no",
    " maybe",
    " Paris",
    " London",
    " blue",
    " red",
    " one",
    " two",
    " three",
    ".",
]
EOS = 0
BOS = 99  # a prompt-only token id (like <|im_start|>), never generated
BASE_ID = "base"  # the base model's id (adapters off), listed without a parent
BASE_PERSONALITY = -7
HIDDEN = 4  # width of the fake base's hidden states (the /pooling endpoint)


def _seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little")


class FakeVLLM:
    """Members map served adapter names to a "personality" seed; same seed = same model."""

    def __init__(
        self, personalities: dict[str, int], max_model_len: int = 256, sharp: float = 3.0
    ) -> None:
        self.personalities = personalities
        self.max_model_len = max_model_len
        self.sharp = sharp
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.fail: Callable[[httpx.Request], httpx.Response | None] | None = None

    # ------------------------------------------------------------------ the "model"

    def logdist(self, served: str, prefix: list[int]) -> np.ndarray:
        """log q(· | prefix) over VOCAB for one member."""
        p = BASE_PERSONALITY if served == BASE_ID else self.personalities[served]
        rng = np.random.default_rng(_seed(p, prefix[-1] if prefix else -1, len(prefix)))
        logits = rng.normal(size=len(VOCAB)) * self.sharp
        logits[EOS] += 0.4 * len(prefix) - 2.0  # answers end after a few tokens
        return logits - np.logaddexp.reduce(logits)

    @staticmethod
    def hidden(ids: list[int]) -> np.ndarray:
        """(T, HIDDEN) float32 "last hidden states" of the base: one fixed vector per token."""
        return np.stack(
            [np.random.default_rng(_seed("h", t)).normal(size=HIDDEN) for t in ids]
        ).astype(np.float32)

    def top(self, lq: np.ndarray, n: int) -> list[int]:
        return [int(i) for i in np.argsort(-lq, kind="stable")[:n]]

    # ------------------------------------------------------------------ endpoints

    def handler(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else {}
        self.calls.append((request.url.path, body))
        if self.fail is not None:
            failed = self.fail(request)  # raise, or return a response, to simulate a fault
            if failed is not None:
                return failed
        path = request.url.path
        if path == "/v1/models":
            data = [{"id": BASE_ID, "max_model_len": self.max_model_len, "parent": None}]
            data += [
                {"id": name, "max_model_len": None, "parent": BASE_ID}
                for name in self.personalities
            ]
            return httpx.Response(200, json={"object": "list", "data": data})
        if path == "/tokenize":
            text = json.dumps(body.get("messages")) if "messages" in body else body["prompt"]
            ids = [BOS] + [1 + (_seed(w) % (len(VOCAB) - 1)) for w in text.split()]
            return httpx.Response(
                200, json={"tokens": ids, "count": len(ids), "max_model_len": self.max_model_len}
            )
        if path == "/pooling":  # the embedder (vLLM's pooling runner, task token_embed)
            if body.get("task") != "token_embed" or body.get("encoding_format") != "base64":
                return httpx.Response(400, json={"error": {"message": "unsupported pooling"}})
            raw = base64.b64encode(self.hidden(list(body["input"])).astype("<f4").tobytes())
            return httpx.Response(
                200, json={"object": "list", "data": [{"index": 0, "data": raw.decode()}]}
            )
        if path == "/detokenize":
            return httpx.Response(200, json={"prompt": "".join(VOCAB[t] for t in body["tokens"])})
        if path == "/v1/completions":
            if body["model"] not in self.personalities and body["model"] != BASE_ID:
                return httpx.Response(
                    404, json={"error": {"message": f"model {body['model']} not found"}}
                )
            prompt = body["prompt"]
            if isinstance(prompt[0], list):
                return httpx.Response(200, json=self._score(body))
            return httpx.Response(200, json=self._generate(body))
        return httpx.Response(404, json={"error": {"message": f"no route {path}"}})

    def _generate(self, body: dict[str, Any]) -> dict[str, Any]:
        served, prompt, n_top = body["model"], list(body["prompt"]), body.get("logprobs") or 0
        choices = []
        for i in range(body.get("n", 1)):
            rng = np.random.default_rng(_seed(body.get("seed"), i, served))
            seq, lps, tops = [], [], []
            finish = "length"
            for _ in range(body["max_tokens"]):
                lq = self.logdist(served, prompt + seq)
                if body.get("temperature", 1.0) == 0:
                    tok = int(np.argmax(lq))
                else:
                    p = np.exp(lq / body["temperature"])
                    tok = int(rng.choice(len(VOCAB), p=p / p.sum()))
                seq.append(tok)
                lps.append(float(lq[tok]))
                tops.append({f"token_id:{t}": float(lq[t]) for t in self.top(lq, n_top)})
                if tok == EOS:
                    finish = "stop"
                    break
            text = "".join(VOCAB[t] for t in seq if t != EOS)
            logprobs = {
                "tokens": [f"token_id:{t}" for t in seq],
                "token_logprobs": lps,
                "top_logprobs": tops,
                "text_offset": [0] * len(seq),
            }
            choices.append(
                {"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish}
            )
        return {"id": "cmpl-fake", "object": "text_completion", "model": served, "choices": choices}

    def _score(self, body: dict[str, Any]) -> dict[str, Any]:
        served, n_top = body["model"], body["prompt_logprobs"]
        choices = []
        for i, seq in enumerate(body["prompt"]):
            entries: list[dict[str, Any] | None] = [None]
            for t in range(1, len(seq)):
                lq = self.logdist(served, list(seq[:t]))
                ranks = {tok: r + 1 for r, tok in enumerate(np.argsort(-lq, kind="stable"))}
                keep = (
                    [*self.top(lq, n_top), seq[t]] if seq[t] < len(VOCAB) else self.top(lq, n_top)
                )
                entries.append(
                    {
                        str(k): {
                            "logprob": float(lq[k]),
                            "rank": ranks[k],
                            "decoded_token": VOCAB[k],
                        }
                        for k in keep
                    }
                )
            choices.append(
                {"index": i, "text": " x", "prompt_logprobs": entries, "finish_reason": "length"}
            )
        return {"id": "cmpl-fake", "object": "text_completion", "model": served, "choices": choices}

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handler)
