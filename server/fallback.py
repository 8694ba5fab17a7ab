"""The fallback the gate escalates to: any OpenAI-compatible endpoint (docs/routing.md).

One shared :class:`httpx.AsyncClient` with explicit timeouts (opened in the app's
lifespan, as the vLLM engine's), bearer key from ``SOFTSPEC_FALLBACK_API_KEY``. The
request is forwarded as the client sent it (messages or prompt and the sampling options,
never the ``ensemble`` extra), with the fallback's model id. Every failure — connection,
timeout, an HTTP error, a body that is not a completion — is a :class:`FallbackError`,
which the caller turns into the configured failure policy; nothing passes silently.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx

from server.http import UpstreamClient
from server.metrics import Metrics

__all__ = ["Fallback", "FallbackAnswer", "FallbackError", "FallbackStream"]

PROBE_TIMEOUT = 5.0  # seconds: the start-up / readiness check of the fallback


class FallbackError(Exception):
    """The fallback did not answer; ``outcome`` is the metrics label (error | timeout)."""

    def __init__(self, message: str, outcome: str = "error") -> None:
        super().__init__(message)
        self.outcome = outcome


@dataclass
class FallbackAnswer:
    model: str
    text: str
    finish_reason: str
    usage: dict[str, Any] | None


class Fallback:
    """An OpenAI-compatible server at ``url`` (the base URL, as the openai SDK's)."""

    def __init__(
        self,
        url: str,
        *,
        model: str | None = None,
        api_key: str | None = None,
        timeout: float = 60.0,
        metrics: Metrics | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.model = model
        self.timeout = timeout
        self.metrics = metrics
        self._api_key = api_key
        self._upstream = UpstreamClient(
            transport, FallbackError("the fallback client is not started")
        )
        self.reachable: bool | None = None  # None: not probed yet
        self.detail = "not checked yet"

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        headers = {"authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        timeout = httpx.Timeout(self.timeout, connect=min(self.timeout, 10.0))
        self._upstream.open(timeout, headers=headers)

    async def close(self) -> None:
        await self._upstream.aclose()

    @property
    def client(self) -> httpx.AsyncClient:
        return self._upstream.http

    async def probe(self) -> bool:
        """``GET /models``: reachable, and (without ``SOFTSPEC_FALLBACK_MODEL``) learn the
        model id. Sets :attr:`reachable` and :attr:`detail`; never raises."""
        try:
            r = await self.client.get(f"{self.url}/models", timeout=PROBE_TIMEOUT)
            r.raise_for_status()
            ids = [str(m["id"]) for m in r.json().get("data", [])]
        except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError) as exc:
            self.reachable, self.detail = False, f"{self.url}/models: {_describe(exc)}"
            return False
        if self.model is None:
            if not ids:
                self.reachable, self.detail = False, f"{self.url}/models lists no model"
                return False
            self.model = ids[0]
        self.reachable, self.detail = True, f"{self.model} at {self.url}"
        return True

    async def model_id(self) -> str:
        if self.model is None and not await self.probe():
            raise FallbackError(f"no fallback model: {self.detail}")
        assert self.model is not None
        return self.model

    # ------------------------------------------------------------------ calls

    async def complete(self, kind: str, body: dict[str, Any]) -> FallbackAnswer:
        """One non-streamed answer for a ``chat`` or ``completion`` request body."""
        model = await self.model_id()
        t0 = time.perf_counter()
        try:
            payload = {k: v for k, v in body.items() if k != "stream_options"}
            r = await self.client.post(self._path(kind), json={**payload, "model": model})
            if r.status_code >= 400:
                raise FallbackError(f"HTTP {r.status_code}: {_snippet(r.text)}")
            choice = r.json()["choices"][0]
            text = choice["message"]["content"] if kind == "chat" else choice["text"]
            if not isinstance(text, str):
                raise FallbackError("the fallback's answer has no text content")
            answer = FallbackAnswer(
                model=str(r.json().get("model") or model),
                text=text,
                finish_reason=str(choice.get("finish_reason") or "stop"),
                usage=r.json().get("usage"),
            )
        except httpx.TimeoutException as exc:
            raise FallbackError(f"timed out after {self.timeout:g} s", "timeout") from exc
        except httpx.HTTPError as exc:
            raise FallbackError(_describe(exc)) from exc
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise FallbackError(f"not an OpenAI completion: {_describe(exc)}") from exc
        finally:
            self._observe(time.perf_counter() - t0)
        return answer

    async def open_stream(self, kind: str, body: dict[str, Any]) -> FallbackStream:
        """Start a streamed answer; fails (before anything is relayed) on a connection
        error, a timeout or an HTTP error status."""
        model = await self.model_id()
        t0 = time.perf_counter()
        payload = {**body, "model": model, "stream": True}
        request = self.client.build_request("POST", self._path(kind), json=payload)
        try:
            response = await self.client.send(request, stream=True)
        except httpx.TimeoutException as exc:
            self._observe(time.perf_counter() - t0)
            raise FallbackError(f"timed out after {self.timeout:g} s", "timeout") from exc
        except httpx.HTTPError as exc:
            self._observe(time.perf_counter() - t0)
            raise FallbackError(_describe(exc)) from exc
        if response.status_code >= 400:
            text = (await response.aread()).decode(errors="replace")
            await response.aclose()
            self._observe(time.perf_counter() - t0)
            raise FallbackError(f"HTTP {response.status_code}: {_snippet(text)}")
        return FallbackStream(self, response, kind, model, t0)

    def _path(self, kind: str) -> str:
        return f"{self.url}/chat/completions" if kind == "chat" else f"{self.url}/completions"

    def _observe(self, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.fallback_latency.observe(seconds)


class FallbackStream:
    """The fallback's SSE stream: :meth:`pieces` yields text deltas; afterwards
    ``finish_reason`` and ``usage`` hold what the fallback sent."""

    def __init__(
        self, owner: Fallback, response: httpx.Response, kind: str, model: str, t0: float
    ) -> None:
        self._owner = owner
        self._response = response
        self.kind = kind
        self.model = model
        self._t0 = t0
        self.finish_reason = "stop"
        self.usage: dict[str, Any] | None = None
        self._closed = False

    async def pieces(self) -> AsyncIterator[str]:
        try:
            async for line in self._response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[len("data:") :].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    raise FallbackError(f"the fallback's stream failed: {chunk['error']}")
                self.model = str(chunk.get("model") or self.model)
                if chunk.get("usage"):
                    self.usage = chunk["usage"]
                for choice in chunk.get("choices") or []:
                    piece = (
                        (choice.get("delta") or {}).get("content")
                        if self.kind == "chat"
                        else choice.get("text")
                    )
                    if choice.get("finish_reason"):
                        self.finish_reason = str(choice["finish_reason"])
                    if piece:
                        yield piece
        except httpx.TimeoutException as exc:
            raise FallbackError(f"timed out after {self._owner.timeout:g} s", "timeout") from exc
        except httpx.HTTPError as exc:
            raise FallbackError(_describe(exc)) from exc
        except ValueError as exc:
            raise FallbackError(f"not an OpenAI stream: {_describe(exc)}") from exc
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        if not self._closed:  # once: the latency is observed when the stream ends
            self._closed = True
            await self._response.aclose()
            self._owner._observe(time.perf_counter() - self._t0)


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text != type(exc).__name__ else text


def _snippet(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + "…"
