"""Probes of the model server: `/health`, and a real one-token completion (the canary).

`/health` can answer 200 while a deadlocked engine serves nothing (vllm issue 39863); only a
completion proves the server works.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp


@dataclass(frozen=True)
class ProbeResult:
    """One probe: did it pass, how long it took, and what went wrong if not."""

    kind: str
    ok: bool
    seconds: float
    detail: str = ""
    status: int | None = None
    impostor: dict[str, Any] | None = None  # another process holds the server's port


# Before each TCP probe: None when the port's listener is the server's, else why not (and who).
ListenerGuard = Callable[[], Awaitable[tuple[str, dict[str, Any] | None] | None]]


class Prober:
    """HTTP client for the server's own port (or Unix socket), used only by the supervisor."""

    def __init__(self, host: str, port: int, uds: str | None = None) -> None:
        self._host, self._port, self._uds = host, port, uds
        self._session: aiohttp.ClientSession | None = None
        # Set by the supervisor for TCP: the port is checked before every probe's connection
        # (force_close: each probe connects anew), so an impostor is never sent a request.
        self.guard: ListenerGuard | None = None

    @property
    def base_url(self) -> str:
        if self._uds:
            return "http://localhost"
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self._port}"

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector: aiohttp.BaseConnector
            if self._uds:
                connector = aiohttp.UnixConnector(path=self._uds, force_close=True)
            else:
                connector = aiohttp.TCPConnector(force_close=True)
            # force_close: a hung server must not hold a pooled connection between probes.
            self._session = aiohttp.ClientSession(connector=connector, trust_env=False)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def health(self, path: str, timeout: float) -> ProbeResult:
        return await self._request("health", "GET", path, None, None, timeout)

    async def text(self, path: str, timeout: float) -> str | None:
        """GET `path` (e.g. the server's Prometheus `/metrics`): its text, None on any failure."""
        try:
            async with asyncio.timeout(timeout):
                async with self._client().get(self.base_url + path) as resp:
                    if resp.status != 200:
                        return None
                    return (await resp.read()).decode("utf-8", "replace")
        except (TimeoutError, aiohttp.ClientError):
            return None

    async def canary(self, path: str, body: dict[str, Any], key: str,
                     timeout: float) -> ProbeResult:
        return await self._request("canary", "POST", path, body, key, timeout)

    async def _request(self, kind: str, method: str, path: str,  # noqa: PLR0917 - private
                       body: dict[str, Any] | None, key: str | None,
                       timeout: float) -> ProbeResult:
        t0 = time.monotonic()
        if self.guard is not None and not self._uds:
            refused = await self.guard()
            if refused is not None:
                detail, impostor = refused
                return ProbeResult(kind, False, time.monotonic() - t0, detail,
                                   impostor=impostor)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        try:
            async with asyncio.timeout(timeout):
                async with self._client().request(method, self.base_url + path, json=body,
                                                  headers=headers) as resp:
                    payload = await resp.read()
                    status = resp.status
        except TimeoutError:
            return ProbeResult(kind, False, time.monotonic() - t0,
                               f"no answer within {timeout:g}s")
        except aiohttp.ClientError as exc:
            return ProbeResult(kind, False, time.monotonic() - t0,
                               f"{type(exc).__name__}: {exc}"[:300])
        elapsed = time.monotonic() - t0
        if status != 200:
            text = payload[:200].decode("utf-8", "replace")
            return ProbeResult(kind, False, elapsed, f"HTTP {status}: {text}", status)
        # A generation answers `choices`; a pooling model's embedding or classification `data`.
        if kind == "canary" and b'"choices"' not in payload and b'"data"' not in payload:
            return ProbeResult(kind, False, elapsed, "answer has no choices (nor data)", status)
        return ProbeResult(kind, True, elapsed, "", status)
