"""The listener on `gateway.listen`: health endpoints for load balancers and monitoring, and
(through `proxy`) the authenticated API.

`/healthz` is 200 while the daemon's loop runs; `/readyz` is 200 only in READY, else 503 with
the state and the reason; `/status` is the supervisor's JSON; `/metrics` is Prometheus text.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from sovereignd.config import Config, is_loopback
from sovereignd.errors import SovereigndError
from sovereignd.gateway.drain import Drain
from sovereignd.gateway.listener import Listener
from sovereignd.gateway.metrics import Metrics
from sovereignd.logs.eventlog import EventLog
from sovereignd.logs.summary import Summarised
from sovereignd.service.fdlimit import connection_budget
from sovereignd.supervision.models import Models, NotServed
from sovereignd.supervision.states import State
from sovereignd.supervision.supervisor import Supervisor

JSON = "application/json"
RETRY_AFTER = {State.STARTING: 10, State.WARMING: 5, State.BACKOFF: 5, State.STOPPED: 10,
               State.STOPPING: 30, State.FATAL: 60, State.QUARANTINED: 60}

AdminCheck = Callable[[web.Request], Awaitable[web.StreamResponse | None]]
# Told of every request the HTTP layer refuses before any handler runs:
# (remote address, status, error class).
RefusalHook = Callable[[str | None, int, str], None]


class _Handler(RequestHandler):
    """aiohttp's connection handler, minus the one habit that leaks: for a request its parser
    refuses (bare LF, smuggling attempts, over-long lines...) aiohttp logs "Error handling
    request" with an exception whose text quotes the raw request bytes -- the client's
    Authorization header and body -- and answers with that text (aiohttp web_protocol.py
    `handle_error`). Here the refusal is recorded by its error class only and answered with
    an OpenAI-style error that quotes nothing."""

    refused: RefusalHook | None = None

    def handle_error(self, request: BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        kind = type(exc).__name__ if exc is not None else "error"
        # (A handler's own exception, status 500, was logged by aiohttp before this call.)
        if request.writer.output_size > 0:
            raise ConnectionError("the response had begun; the connection is cut instead")
        if self.refused is not None and status < 500:  # (a handler's 500: it recorded it)
            self.refused(request.remote, status, kind)
        text = ("the request is not valid HTTP/1.1" if status < 500
                else "internal error in the gateway")
        resp = json_response({"error": {"message": text, "type": "invalid_request_error"
                                        if status < 500 else "server_error",
                                        "param": None, "code": "bad_request"
                                        if status < 500 else "internal_error"}}, status)
        resp.headers["Server"] = "sovereignd"  # no app here to run _server_header
        resp.force_close()
        return resp


def _no_emit(_event: str, **_fields: Any) -> None:
    return None


def json_response(body: dict[str, Any], status: int = 200,
                  headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type=JSON,
                        headers=headers)


async def _server_header(_request: web.Request, response: web.StreamResponse) -> None:
    # Name the product, not the library versions behind it (nginx's server_tokens off).
    response.headers["Server"] = "sovereignd"


class Gateway:
    """Owns the HTTP listener; other parts add routes to `app` before `start`."""

    def __init__(self, cfg: Config, supervisor: Supervisor, metrics: Metrics,
                 events: EventLog | None = None, nofile: int = 1024) -> None:
        self.cfg = cfg
        self.events = events
        g = cfg.gateway
        # Connections the gateway may hold: within the descriptor limit, less the reserve.
        self.max_connections = connection_budget(nofile, cfg.daemon.reserved_fds,
                                                 g.max_connections)
        self.max_per_address = min(g.max_connections_per_address, self.max_connections)
        self._listener: Listener | None = None
        self.supervisor = supervisor
        self.metrics = metrics
        host, port = cfg.listen
        self.host, self.port = host, port
        self.loopback = is_loopback(host)
        self.admin_check: AdminCheck | None = None
        self.drain: Drain | None = None  # set by the daemon: `sovereignd drain` turns /readyz 503
        # Parts of /status kept outside the supervisor (drain, keys), by their key.
        self.status_parts: dict[str, Callable[[], Any]] = {}
        self.on_refused: RefusalHook | None = None
        self.models: Models | None = None  # several models: /readyz and /status cover each
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
        tls = self._tls()
        await self._runner.setup()
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        try:
            sock = socket.create_server((self.host, self.port), family=family, backlog=1024)
        except OSError as exc:
            await self._runner.cleanup()
            raise SovereigndError(
                f"cannot listen on {self.cfg.gateway.listen}: {exc.strerror or exc} — is "
                "another sovereignd (or another program) using it? Change gateway.listen or "
                "stop the other program.") from exc
        emit = self.events.emit if self.events is not None else _no_emit
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        # The handler's settings as aiohttp's own Server would pass them (Server.__call__).
        settings = dict(getattr(server, "_kwargs", {}))

        def handler() -> RequestHandler:
            h = _Handler(server, loop=loop, **settings)
            h.refused = self.on_refused
            return h

        self._listener = Listener(
            sock, handler, max_total=self.max_connections,
            max_per_address=self.max_per_address, ssl_context=tls,
            refused=Summarised(emit, "connections_refused", 10.0),
            exhausted=Summarised(emit, "descriptors_exhausted", 10.0, level="error"))
        self._listener.start()

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
        if self._listener is not None:
            self._listener.close()
            self._listener.refused.flush(everything=True)
            self._listener.exhausted.flush(everything=True)
            self._listener = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # --- endpoints ------------------------------------------------------------------------------

    async def healthz(self, _request: web.Request) -> web.Response:
        return json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        if self.models is not None:
            # Every `start: always` model READY, or ?model=NAME for one.
            try:
                ready, answer, state = self.models.readiness(request.query.get("model"))
            except NotServed as exc:
                return json_response({"error": {"message": exc.message, "type":
                                                "invalid_request_error", "param": "model",
                                                "code": exc.code}}, exc.status)
            if self.drain is not None and self.drain.active:
                return self._draining(answer)
            if ready:
                return json_response(answer)
            return json_response(answer, 503, {"Retry-After": str(RETRY_AFTER.get(state, 10))})
        sup = self.supervisor
        body: dict[str, Any] = {"state": sup.state.value, "reason": sup.reason}
        if sup.degraded:
            body["degraded"] = dict(sup.degraded)
        if sup.suspect is not None:
            body["suspect"] = sup.suspect
        if self.drain is not None and self.drain.active:
            return self._draining(body)
        if sup.serving():
            return json_response(body)
        return json_response(body, 503,
                             {"Retry-After": str(RETRY_AFTER.get(sup.state, 10))})

    def _draining(self, body: dict[str, Any]) -> web.Response:
        """Maintenance: the balancer moves traffic away while requests are still served."""
        assert self.drain is not None
        body = {**body, "reason": "draining", "drain": self.drain.status()}
        return json_response(body, 503, {
            "Retry-After": str(max(1, round(self.drain.grace_left())))})

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
        status = self.models.status() if self.models is not None else self.supervisor.status()
        for name, part in self.status_parts.items():
            status[name] = part()
        return json_response(status)

    async def metrics_text(self, request: web.Request) -> web.StreamResponse:
        denied = await self._admin(request)
        if denied is not None:
            return denied
        return web.Response(body=self.metrics.render(),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})
