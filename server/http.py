"""The one way this gateway owns an upstream ``httpx.AsyncClient``.

vLLM and the escalation fallback are each reached through one shared client with explicit
timeouts and connection limits, created on start-up and closed on shutdown; tests replace
the network with an ``httpx.MockTransport`` through ``transport``.
"""

from __future__ import annotations

from collections.abc import Mapping

import httpx

__all__ = ["UpstreamClient"]


class UpstreamClient:
    """Owns one ``httpx.AsyncClient``: :meth:`open` creates it, :meth:`aclose` closes it,
    :attr:`http` returns it (``error`` raised when it is not open)."""

    def __init__(self, transport: httpx.AsyncBaseTransport | None, error: Exception) -> None:
        self._transport = transport
        self._error = error
        self._client: httpx.AsyncClient | None = None

    def open(
        self,
        timeout: httpx.Timeout,
        *,
        base_url: str = "",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self._client = httpx.AsyncClient(
            base_url=base_url,
            timeout=timeout,
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
            headers=dict(headers or {}),
            transport=self._transport,
        )

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    @property
    def http(self) -> httpx.AsyncClient:
        if self._client is None:
            raise self._error
        return self._client
