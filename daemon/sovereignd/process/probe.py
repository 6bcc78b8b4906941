"""Probes of the model server: `/health`, and a real one-token completion (the canary).

`/health` can answer 200 while a deadlocked engine serves nothing (vllm issue 39863); only a
completion proves the server works.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson

from sovereignd.http.upstream import Target, UpstreamClient, UpstreamConnectError, UpstreamError


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


class _Impostor(UpstreamConnectError):
    """The port's listener is not the server: no connection was made."""

    def __init__(self, detail: str, holder: dict[str, Any] | None) -> None:
        super().__init__(detail)
        self.holder = holder


class Prober:
    """The supervisor's requests to the server's own port (or Unix socket), on the same
    HTTP client as the gateway's traffic (sovereignd.http.upstream)."""

    def __init__(self, host: str, port: int, uds: str | None = None) -> None:
        self._target = Target(host, port, uds)
        # max_idle 0: every probe connects anew, so a hung server holds no pooled connection
        # between probes, and (for TCP) the port's listener is checked before each one.
        self._client: UpstreamClient | None = None
        # Set by the supervisor for TCP: an impostor is never sent a request.
        self.guard: ListenerGuard | None = None

    def _upstream(self) -> UpstreamClient:
        if self._client is None or self._client.closed:
            self._client = UpstreamClient(max_idle=0, before_connect=self._check_listener)
        return self._client

    async def _check_listener(self, _target: Target) -> None:
        if self.guard is not None:
            refused = await self.guard()
            if refused is not None:
                raise _Impostor(*refused)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def health(self, path: str, timeout: float) -> ProbeResult:
        return await self._request("health", "GET", path, None, None, timeout)

    async def text(self, path: str, timeout: float) -> str | None:
        """GET `path` (e.g. the server's Prometheus `/metrics`): its text, None on any failure."""
        try:
            async with await self._upstream().request(self._target, "GET", path,
                                                      timeout=timeout) as resp:
                if resp.status != 200:
                    return None
                return (await resp.read()).decode("utf-8", "replace")
        except (TimeoutError, UpstreamError):
            return None

    async def canary(self, path: str, body: dict[str, Any], key: str,
                     timeout: float) -> ProbeResult:
        return await self._request("canary", "POST", path, body, key, timeout)

    async def _request(self, kind: str, method: str, path: str,  # noqa: PLR0917 - private
                       body: dict[str, Any] | None, key: str | None,
                       timeout: float) -> ProbeResult:
        t0 = time.monotonic()
        headers = [("Authorization", f"Bearer {key}")] if key else []
        data = b""
        if body is not None:
            data = orjson.dumps(body)
            headers.append(("Content-Type", "application/json"))
        try:
            async with await self._upstream().request(self._target, method, path, headers,
                                                      data, timeout=timeout) as resp:
                payload = await resp.read()
                status = resp.status
        except _Impostor as exc:
            return ProbeResult(kind, False, time.monotonic() - t0, str(exc),
                               impostor=exc.holder)
        except TimeoutError:
            return ProbeResult(kind, False, time.monotonic() - t0,
                               f"no answer within {timeout:g}s")
        except UpstreamError as exc:
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
