"""The listener on `gateway.listen`: health endpoints for load balancers and monitoring, and
(through `proxy`) the authenticated API.

`/healthz` is 200 while the daemon's loop runs; `/readyz` is 200 only in READY, else 503 with
the state and the reason; `/status` is the supervisor's JSON; `/metrics` is Prometheus text.
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from sovereignd.config import Config, is_loopback
from sovereignd.errors import SovereigndError
from sovereignd.metrics import Metrics
from sovereignd.states import State
from sovereignd.supervisor import Supervisor

JSON = "application/json"
RETRY_AFTER = {State.STARTING: 10, State.WARMING: 5, State.BACKOFF: 5, State.STOPPED: 10,
               State.STOPPING: 30, State.FATAL: 60, State.QUARANTINED: 60}

AdminCheck = Callable[[web.Request], Awaitable[web.StreamResponse | None]]


def json_response(body: dict[str, Any], status: int = 200,
                  headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type=JSON,
                        headers=headers)


async def _server_header(_request: web.Request, response: web.StreamResponse) -> None:
    # Name the product, not the library versions behind it (nginx's server_tokens off).
    response.headers["Server"] = "sovereignd"


class Gateway:
    """Owns the HTTP listener; other parts add routes to `app` before `start`."""

    def __init__(self, cfg: Config, supervisor: Supervisor, metrics: Metrics) -> None:
        self.cfg = cfg
        self.supervisor = supervisor
        self.metrics = metrics
        host, port = cfg.listen
        self.host, self.port = host, port
        self.loopback = is_loopback(host)
        self.admin_check: AdminCheck | None = None
        self.app = web.Application(client_max_size=cfg.gateway.max_body)
        self.app.on_response_prepare.append(_server_header)
        self.app.router.add_get("/healthz", self.healthz)
        self.app.router.add_get("/readyz", self.readyz)
        self.app.router.add_get("/status", self.status)
        self.app.router.add_get("/metrics", self.metrics_text)
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        """Bind the listener; an address in use is an operator error, said plainly."""
        # handler_cancellation: a client that disconnects cancels its handler, and with it
        # the upstream request (vLLM then aborts the generation).
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False,
                                     keepalive_timeout=self.cfg.gateway.idle_timeout,
                                     shutdown_timeout=1.0, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, ssl_context=self._tls(),
                           reuse_address=True, backlog=1024)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            raise SovereigndError(
                f"cannot listen on {self.cfg.gateway.listen}: {exc.strerror or exc} — is "
                "another sovereignd (or another program) using it? Change gateway.listen or "
                "stop the other program.") from exc

    def _tls(self) -> ssl.SSLContext | None:
        g = self.cfg.gateway
        if g.tls_cert is None or g.tls_key is None:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(g.tls_cert, g.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise SovereigndError(f"cannot load the TLS certificate {g.tls_cert} or key "
                                  f"{g.tls_key}: {exc}") from exc
        return ctx

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # --- endpoints ------------------------------------------------------------------------------

    async def healthz(self, _request: web.Request) -> web.Response:
        return json_response({"status": "ok"})

    async def readyz(self, _request: web.Request) -> web.Response:
        sup = self.supervisor
        body: dict[str, Any] = {"state": sup.state.value, "reason": sup.reason}
        if sup.degraded:
            body["degraded"] = dict(sup.degraded)
        if sup.suspect is not None:
            body["suspect"] = sup.suspect
        if sup.serving():
            return json_response(body)
        return json_response(body, 503,
                             {"Retry-After": str(RETRY_AFTER.get(sup.state, 10))})

    async def _admin(self, request: web.Request) -> web.StreamResponse | None:
        # On a network listener, /status and /metrics describe the host: admin keys only.
        if self.loopback:
            return None
        if self.admin_check is None:
            return json_response({"error": {"message": "admin key required",
                                            "type": "permission_error"}}, 403)
        return await self.admin_check(request)

    async def status(self, request: web.Request) -> web.StreamResponse:
        denied = await self._admin(request)
        if denied is not None:
            return denied
        return json_response(self.supervisor.status())

    async def metrics_text(self, request: web.Request) -> web.StreamResponse:
        denied = await self._admin(request)
        if denied is not None:
            return denied
        return web.Response(body=self.metrics.render(),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})
