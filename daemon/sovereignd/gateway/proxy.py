"""The authenticated door: forward allow-listed API routes to the model server, record each.

vLLM's `--api-key` guards only part of its routes (`/invocations`, `/tokenize`, `/pause`...
answer anyone), takes one key for everyone, and records nothing an auditor could use. Here:
only the backend's allow-listed routes pass (everything else is 404), each client has its own
key, the client's key is replaced by the server's internal one, server-sent events stream
through event by event, a client that goes away cancels the upstream request, and every
request -- refused ones included -- becomes one sealed record in the request log.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import HttpVersion11, web

from sovereignd.backends import tasks
from sovereignd.backends.base import Backend
from sovereignd.config import Config
from sovereignd.gateway import anthropic, promptcap, responses, scopes, tokencount
from sovereignd.gateway.auththrottle import AuthFailures
from sovereignd.gateway.drain import Drain
from sovereignd.gateway.endpoints import RETRY_AFTER
from sovereignd.gateway.keys import Client, KeyStore
from sovereignd.gateway.metrics import Metrics, ServerWait
from sovereignd.gateway.quotas import QuotaBook, QuotaCollector
from sovereignd.gateway.routing import NotServed, Router
from sovereignd.http.upstream import Response as UpstreamResponse
from sovereignd.http.upstream import (
    Target,
    UpstreamClient,
    UpstreamConnectError,
    UpstreamDisconnected,
    UpstreamError,
    UpstreamProtocolError,
)
from sovereignd.logs.eventlog import EventLog
from sovereignd.logs.requestlog import RequestLog, RequestLogError
from sovereignd.logs.summary import Summarised
from sovereignd.supervision.supervisor import Supervisor, Upstream

# Not passed to the server: hop-by-hop fields (and those the client's Connection field names),
# framing (the upstream client writes its own), the client's credentials, and Accept-Encoding
# (the gateway asks for identity: usage is read from the bodies, and loopback needs no
# compression). Nor what a client may claim about where it is (the server would log a spoofed
# address; X-Forwarded-For is set from the real peer instead) or its cookies (the API uses keys).
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
                        "proxy-connection", "te", "trailer", "trailers", "transfer-encoding",
                        "upgrade", "host", "content-length", "expect", "authorization",
                        "api-key", "x-api-key", "x-request-id", "accept-encoding",
                        "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto",
                        "x-forwarded-port", "forwarded", "x-real-ip", "cookie"})
# Content-Encoding is kept: should a server compress anyway, the client must know. Fields the
# server's Connection header names are hop-by-hop too (RFC 9110 7.6.1); the server sets no
# cookies and asks no proxy credentials of the gateway's clients.
RESPONSE_DROP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length",
                           "server", "date", "x-request-id", "trailer", "upgrade",
                           "proxy-connection", "set-cookie", "set-cookie2",
                           "proxy-authenticate"})
# Making a connection to a loopback server takes microseconds; seconds mean it is stuck.
CONNECT_TIMEOUT = 5.0
MAX_RECORDED_PATH = 512
# A streamed chunk that carries generated text: `"content": "x...`, `"text": "x...` (also
# Anthropic's text_delta) or the Responses API's `"delta": "x...`.
_TOKEN = re.compile(rb'"(?:content|text|delta)":\s*"[^"]')
# OpenAI's streaming options exist only on these paths: other APIs' bodies are passed as sent.
_STREAM_OPTIONS_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
# Refusals that the same request will meet again: the SDKs (openai, anthropic) read
# `x-should-retry: false` and do not retry them.
_FINAL_STATUSES = frozenset({400, 401, 403, 404, 405, 413, 417})
# What is kept of a client's X-Request-ID (its own correlation id; the gateway's is `id`).
_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:+/=-]{1,128}")
# Events after which a client holds the answer as complete: OpenAI-style `[DONE]`, Anthropic's
# message_stop, the Responses API's terminal events. They are held back until the request's
# record is written; a stream without one ends for the client only with the body's end.
_FINAL_EVENTS = (b"data: [DONE]", b"event: message_stop", b"event: response.completed",
                 b"event: response.failed", b"event: response.incomplete")


def _refuse_too_long(message: str | None) -> None:
    """Raise the prompt cap's 400 with `message` (None: the request fits)."""
    if message is not None:
        raise _Refused(400, message, "invalid_request_error", "context_length_exceeded",
                       error="prompt_too_long")


def error_body(message: str, type_: str, code: str | None = None) -> bytes:
    """An OpenAI-style error object."""
    return orjson.dumps({"error": {"message": message, "type": type_, "param": None,
                                   "code": code}})


class _Refused(Exception):
    """End a request early with an error response."""

    def __init__(self, status: int, message: str, type_: str, code: str | None = None, *,
                 headers: dict[str, str] | None = None, error: str | None = None,
                 final: bool = False) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type_, code
        self.headers = headers or {}
        self.error = error or code or type_
        if final or status in _FINAL_STATUSES:
            self.headers["x-should-retry"] = "false"


def safe_path(raw: str) -> bool:
    """Reject paths a router might read differently from how they were checked: encoded
    characters, dot segments, empty segments. OpenAI API paths need none of them."""
    if not raw.startswith("/") or "%" in raw or "\\" in raw or "//" in raw:
        return False
    return all(seg not in (".", "..") for seg in raw.split("/"))


class ClientLimits:
    """Per-client concurrency and request rate (token bucket refilled per second)."""

    def __init__(self, concurrency: int, per_minute: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.concurrency = concurrency
        self.per_minute = per_minute
        # A burst of up to ten seconds' worth, at least one request.
        self.capacity = max(1.0, per_minute / 6)
        self.clock = clock
        self.in_flight: dict[str, int] = {}
        self._buckets: dict[str, tuple[float, float]] = {}

    def acquire(self, name: str) -> tuple[str, float] | None:
        """None if the request may go ahead (then call release); else (why, retry-after s)."""
        if self.in_flight.get(name, 0) >= self.concurrency:
            return "concurrency", 1.0
        if self.per_minute:
            now = self.clock()
            tokens, last = self._buckets.get(name, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - last) * self.per_minute / 60)
            if tokens < 1:
                self._buckets[name] = (tokens, now)
                return "rate", (1 - tokens) * 60 / self.per_minute
            self._buckets[name] = (tokens - 1, now)
        self.in_flight[name] = self.in_flight.get(name, 0) + 1
        return None

    def release(self, name: str) -> None:
        left = self.in_flight.get(name, 1) - 1
        if left:
            self.in_flight[name] = left
        else:
            self.in_flight.pop(name, None)


@dataclass
class _Stream:
    """What the proxy learns from a server-sent-events stream while passing it through."""

    strip_usage: bool
    buffer: bytes = b""
    ttft: float | None = None
    usage: dict[str, Any] | None = None
    response_id: str | None = None  # a Responses stream's id, from response.created

    def feed(self, chunk: bytes, now: float) -> bytes:
        """Take upstream bytes; return the complete events to pass on, in order."""
        self.buffer += chunk
        if b"\n\n" not in self.buffer:
            return b""
        complete, _, self.buffer = self.buffer.rpartition(b"\n\n")
        if self.ttft is not None and b'"usage"' not in complete:
            return complete + b"\n\n"  # the common case: nothing to look at
        out = []
        for event in complete.split(b"\n\n"):
            if self._inspect(event, now):
                out.append(event + b"\n\n")
        return b"".join(out)

    def _inspect(self, event: bytes, now: float) -> bool:
        """Note usage and first token; False if the event is to be withheld. Events are
        OpenAI's (`data: {...}`) or named, as Anthropic's and the Responses API's
        (`event: NAME` then `data: {...}`)."""
        at = 0 if event.startswith(b"data: {") else event.find(b"\ndata: {") + 1
        if at == 0 and not event.startswith(b"data: {"):
            return True
        if self.response_id is None:
            self.response_id = responses.created_id(event)
        if self.ttft is None and _TOKEN.search(event):
            self.ttft = now
        if b'"usage"' not in event:
            return True
        end = event.find(b"\n", at)
        try:
            data = orjson.loads(event[at + 6:end if end >= 0 else None])
        except orjson.JSONDecodeError:
            return True
        usage = anthropic.usage_of(data) if isinstance(data, dict) else None
        if isinstance(usage, dict):
            # Anthropic's stream gives input tokens in message_start and output tokens in
            # message_delta: later counts add to, and override, earlier ones.
            self.usage = {**(self.usage or {}), **usage}
            # The usage-only chunk exists because we asked for it: the client did not.
            if self.strip_usage and not data.get("choices"):
                return False
        return True

    def rest(self) -> bytes:
        left, self.buffer = self.buffer, b""
        return left


class Proxy:
    """Forwards the allow-listed API to the server and records every request."""

    def __init__(self, cfg: Config, supervisor: Supervisor, backend: Backend, *, keys: KeyStore,
                 log: RequestLog, metrics: Metrics, events: EventLog) -> None:
        self.cfg = cfg
        self.supervisor = supervisor
        self.backend = backend
        self.keys = keys
        self.log = log
        self.metrics = metrics
        self.events = events
        g = cfg.gateway
        self.limits = ClientLimits(g.client_concurrency, g.client_rate)
        self._auth_failures = AuthFailures(g.auth_failures_per_minute)
        self._auth_events = Summarised(events.emit, "auth_failed", g.auth_event_interval)
        # A tokenizer that cannot count (the request goes on, judged by its estimate).
        self._count_failures = Summarised(events.emit, "token_count_failed",
                                          g.auth_event_interval)
        self._upstream = UpstreamClient(connect_timeout=CONNECT_TIMEOUT,
                                        before_connect=self._verify_listener)
        self._targets: dict[str, Target] = {}  # by model: each server's pool stays its own
        self._owners: dict[Target, Supervisor] = {}  # whose listener to check per target
        self.router: Router | None = None  # routing by `model` (set by the daemon)
        self._log_broken: str | None = None
        self.drain: Drain | None = None  # set by the daemon; refuses new requests after grace
        self._backends: tuple[Backend, ...] = (backend,)
        self._known_paths = {r.path for r in backend.routes if not r.prefix}
        self._known_prefixes = tuple(r.path for r in backend.routes if r.prefix)
        self.quotas = QuotaBook()  # counted again from the records at start (daemon.py)
        self.owners = responses.Owners()
        metrics.registry.register(QuotaCollector(self.quotas, keys.clients))
        self._caps: dict[int, promptcap.Cap | None] = {}  # by the model's config view

    def serve_backends(self, backends: list[Backend]) -> None:
        """Several models: the routes of every model's backend pass the allow-list (each
        request is checked again against its own model's backend once routed)."""
        self._backends = tuple(backends)
        routes = [r for b in backends for r in b.routes]
        self._known_paths = {r.path for r in routes if not r.prefix}
        self._known_prefixes = tuple(dict.fromkeys(r.path for r in routes if r.prefix))

    def _allowed(self, method: str, path: str) -> bool:
        return any(b.allowed(method, path) for b in self._backends)

    # --- lifecycle ------------------------------------------------------------------------------

    def install(self, app: web.Application) -> None:
        """Route everything not otherwise routed (the health endpoints) through the proxy."""
        app.router.add_route("*", "/{tail:.*}", self.handle, expect_handler=self._expect)

    async def close(self) -> None:
        self._auth_events.flush(everything=True)
        self._count_failures.flush(everything=True)
        await self._upstream.close()

    async def _expect(self, request: web.Request) -> None:
        """`Expect: 100-continue` (RFC 9110 10.1.1): invite the body only once route, method,
        key and announced size are known good; otherwise say nothing, and the handler's
        refusal (404, 405, 401, 413) is the final answer, recorded as usual, before the
        client sends its body."""
        if request.version != HttpVersion11:
            return
        raw = request.rel_url.raw_path
        if request.headers.get("Expect", "").lower() != "100-continue":
            # Answered here, before any handler: recorded by its error class like the parser's
            # refusals (the unknown value itself is the client's text and is not kept).
            self._record_early(request.remote, 417, "expect_unsupported", request.method,
                               raw[:MAX_RECORDED_PATH])
            raise web.HTTPExpectationFailed(text="only Expect: 100-continue is understood")
        if not (safe_path(raw) and self._allowed(request.method, raw)):
            return
        outcome = self.keys.check(_presented_key(request))
        request["auth_outcome"] = outcome  # checked once: the handler reuses it
        if outcome.client is None:
            return
        if request.content_length is not None and \
                request.content_length > self.cfg.gateway.max_body:
            return  # the handler's 413 is the answer: never invite a body it will refuse
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # as aiohttp's own handler: the response has not begun

    async def _verify_listener(self, target: Target) -> None:
        """Before every new TCP connection to the server: the port's listener must be the
        server the daemon started; an impostor is never sent a request (nor the key)."""
        check = await self._owners.get(target, self.supervisor).verify_listener()
        if check.owned:
            return
        if check.impostor is not None:
            self.events.emit("port_impostor", level="critical", port=target.port,
                             holder=check.impostor, detail=check.detail)
        raise UpstreamConnectError(check.detail)

    def _upstream_failed(self, exc: TimeoutError | UpstreamError,
                         rec: dict[str, Any]) -> _Refused:
        """The refusal for a failed exchange; a response the server framed wrongly is also an
        event naming what was wrong (the parser's reason: no byte of the answer is quoted)."""
        if isinstance(exc, UpstreamProtocolError):
            self.events.emit("upstream_bad_response", level="error", detail=str(exc),
                             request_id=rec["id"], path=rec.get("path"))
        return _upstream_refusal(exc)

    # --- admin check for /status and /metrics on a network listener ---------------------------

    async def admin_check(self, request: web.Request) -> web.StreamResponse | None:
        outcome = self.keys.check(_presented_key(request))
        if outcome.client is None:
            self.metrics.auth_failures.labels(reason=outcome.reason).inc()
            return _error(401, "a valid admin key is required", "invalid_request_error",
                          "invalid_api_key")
        if not outcome.client.is_admin:
            return _error(403, "this endpoint needs an admin key", "permission_error",
                          "admin_required")
        return None

    def record_refusal(self, remote: str | None, status: int, kind: str) -> None:
        """A request the HTTP parser refused before any handler ran: recorded like every
        other request, by its error class (never by its bytes, which may hold a key)."""
        self._record_early(remote, status, f"http_parser_{kind}")

    def _record_early(self, remote: str | None, status: int, error: str,
                      method: str | None = None, path: str = "-") -> None:
        """The record of a request refused before the handler ran (no client, no body read)."""
        self._finish({
            "id": secrets.token_hex(12), "client": None, "method": method, "path": path,
            "model": None, "status": status, "stream": False, "latency_ms": 0.0,
            "ttfb_ms": None, "ttft_ms": None, "prompt_tokens": None, "completion_tokens": None,
            "bytes_in": 0, "bytes_out": 0, "remote": remote, "error": error})

    # --- the request path -----------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        t0 = time.perf_counter()
        rid = secrets.token_hex(12)
        raw = request.rel_url.raw_path
        rec: dict[str, Any] = {
            "id": rid, "client": None, "method": request.method,
            "path": raw[:MAX_RECORDED_PATH], "model": None, "status": 500, "stream": False,
            "latency_ms": None, "ttfb_ms": None, "ttft_ms": None, "prompt_tokens": None,
            "completion_tokens": None, "bytes_in": 0, "bytes_out": 0,
            "remote": request.remote, "error": None,
            **_client_ids(request)}
        client: Client | None = None
        recorded = False

        async def commit() -> bool:
            """Record the request now, before the end of its answer goes out; False if the
            record could not be written or made durable (the answer must then not end)."""
            nonlocal recorded
            recorded = True
            rec["latency_ms"] = round((time.perf_counter() - t0) * 1000, 3)
            return await self._commit(rec)

        self.metrics.requests_in_flight += 1
        try:
            try:
                client = self._authorise(request, rec)
                resp = await self._forward(request, rec, t0, rid, commit, client=client)
            except _Refused as refusal:
                rec["status"], rec["error"] = refusal.status, refusal.error
                resp = _error(refusal.status, refusal.message, refusal.type, refusal.code,
                              {**refusal.headers, "X-Request-ID": rid},
                              anthropic_shape=anthropic.is_messages(request.rel_url.raw_path))
            if not resp.prepared:
                # Sent here, not by aiohttp after the return: the record is written (and made
                # durable per requests.sync) before any of the answer is released, so no
                # client holds an answer that a crash could leave unrecorded.
                if not await commit():
                    resp = _error(503, "the request's record cannot be written; the answer is "
                                  "withheld", "server_error", "records_unavailable",
                                  {"Retry-After": "30", "X-Request-ID": rid})
                with contextlib.suppress(ConnectionError):  # recorded already: it went out
                    await resp.prepare(request)
                    await resp.write_eof()
        except asyncio.CancelledError:
            rec["error"] = "client_disconnect"
            rec["status"] = 499  # nginx's "client closed request": nothing more was sent
            raise
        finally:
            if client is not None:  # only set once the limits admitted the request
                self.limits.release(client.name)
            self._release_model(request)
            self.metrics.requests_in_flight -= 1
            if not recorded:  # the answer did not end (cancelled, cut): record what happened
                rec["latency_ms"] = round((time.perf_counter() - t0) * 1000, 3)
                self._finish(rec)
        return resp

    def _authorise(self, request: web.Request, rec: dict[str, Any]) -> Client:
        raw = rec["path"]
        known = safe_path(request.rel_url.raw_path) and (
            request.rel_url.raw_path in self._known_paths
            or request.rel_url.raw_path.startswith(self._known_prefixes or ("\0",)))
        if not known:
            raise _Refused(404, f"Unknown route {raw}", "invalid_request_error",
                           "unknown_route", error="not_found")
        if not self._allowed(request.method, request.rel_url.raw_path):
            raise _Refused(405, f"Method {request.method} not allowed on {raw}",
                           "invalid_request_error", "method_not_allowed")
        outcome = request.get("auth_outcome") or self.keys.check(_presented_key(request))
        if outcome.client is None:
            self.metrics.auth_failures.labels(reason=outcome.reason).inc()
            remote = request.remote or "-"
            self._auth_events.note(f"{remote} {outcome.reason}", path=raw, remote=remote,
                                   **outcome.log_fields())
            retry = self._auth_failures.fail(remote)
            if retry is not None:
                raise _Refused(429, "too many failed authentications from this address",
                               "rate_limit_error", "auth_throttled",
                               headers={"Retry-After": str(max(1, round(retry)))},
                               error="auth_throttled")
            message = ("Missing API key: send Authorization: Bearer <key> (or x-api-key: <key>)"
                       if outcome.reason == "missing" else "Invalid API key")
            raise _Refused(401, message, "invalid_request_error", "invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"},
                           error=f"auth_{outcome.reason}")
        client = outcome.client
        rec["client"] = client.name
        refused = self.limits.acquire(client.name)
        if refused is not None:
            why, retry = refused
            what = ("too many requests in flight for this client" if why == "concurrency"
                    else "request rate limit exceeded for this client")
            raise _Refused(429, what, "rate_limit_error", why,
                           headers={"Retry-After": str(max(1, round(retry)))},
                           error="rate_limited" if why == "rate" else "concurrency")
        return client

    async def _forward(self, request: web.Request, rec: dict[str, Any], t0: float,
                       rid: str, commit: Callable[[], Awaitable[bool]], *,
                       client: Client) -> web.StreamResponse:
        if self._log_broken is not None:
            raise _Refused(503, f"request records cannot be written ({self._log_broken}); "
                           "refusing to serve unrecorded requests", "server_error",
                           "records_unavailable", headers={"Retry-After": "30"})
        if self.drain is not None and self.drain.refusing():
            raise _Refused(503, "this host is drained for maintenance; send the request to "
                           "another host", "server_unavailable", "draining",
                           headers={"Retry-After": "30"}, error="draining")
        body = await self._read_body(request)
        rec["bytes_in"] = len(body)
        strip_usage = False
        data: dict[str, Any] | None = None
        if body and request.method == "POST":
            body, strip_usage, data = self._inspect_body(body, rec)
        # Scope and quota before routing: a key may not start an on_demand model it may not use.
        self._admit(client, rec, data)
        if self.router is not None and self.router.lists_models and request.method == "GET" \
                and request.rel_url.raw_path == "/v1/models":
            payload = orjson.dumps(self.router.model_list(client.models))
            rec["status"], rec["bytes_out"] = 200, len(payload)
            return web.Response(body=payload, content_type="application/json")
        cap, seen = None, None
        if data is not None and not rec["path"].endswith("/count_tokens"):  # counts, no output
            # Judged by the named model's own length, before an on_demand model is started.
            target_model = (self.router.models.get(rec["model"]) if self.router is not None
                            else None)
            model_cfg = target_model.cfg if target_model is not None else self.cfg
            cap = self._cap_of(model_cfg)
            seen = promptcap.assess(cap, data)
            if cap is not None and seen.verdict == promptcap.REFUSE:
                _refuse_too_long(promptcap.judged(cap, seen.prompt, seen.budget, None))
        sup = await self._route(request, rec)
        upstream = sup.upstream()
        if upstream is None:
            raise _Refused(503, f"the model server is not ready ({sup.state}: {sup.reason})",
                           "server_unavailable", "not_ready",
                           headers={"Retry-After": str(RETRY_AFTER.get(sup.state, 10))},
                           error=f"not_ready_{sup.state.value.lower()}")
        self._owners[upstream.target] = sup
        if cap is not None and seen is not None and seen.verdict == promptcap.COUNT:
            assert data is not None
            await self._count_prompt(request, rec, upstream, cap=cap, seen=seen, data=data)
        try:
            # In the chain before the server sees the request: a crash from here on leaves
            # this start open, and the next start closes it as incomplete.
            rec["start_seq"] = self.log.start(rec)
            self.quotas.count_request(client.name)
        except RequestLogError as exc:
            self._log_failed(exc)
            raise _Refused(503, "request records cannot be written; refusing to serve "
                           "unrecorded requests", "server_error", "records_unavailable",
                           headers={"Retry-After": "30"}) from exc
        named = request.headers.get("Connection")
        drop = HOP_BY_HOP if named is None else HOP_BY_HOP | {
            t.strip().lower() for t in named.split(",")}
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in drop]
        headers.append(("Authorization", f"Bearer {upstream.key}"))
        headers.append(("X-Request-ID", rid))
        if request.remote:
            headers.append(("X-Forwarded-For", request.remote))
        target = upstream.target
        old = self._targets.get(rec["model"] or "")
        if target != old:
            if old is not None:
                self._upstream.drop(old)  # the server moved: its old pool goes
                self._owners.pop(old, None)
            self._targets[rec["model"] or ""] = target
        # Work at the server from here until its answer is read in full (the stall watch of
        # the request's model counts it; not the record's fsync nor the client's reading).
        wait = ServerWait(request.get("model_metrics") or self.metrics)
        wait.begin()
        try:
            try:
                up = await self._upstream.request(
                    target, request.method, request.rel_url.raw_path_qs, headers, body,
                    timeout=self.cfg.gateway.upstream_timeout)
            except UpstreamDisconnected as exc:
                if not self.supervisor.serving():
                    # The daemon is stopping the server (quarantine, restart): a server that
                    # drains on SIGTERM finishes what it began and closes connections whose
                    # request it had not begun; nothing of the answer was sent: 503, so a load
                    # balancer sends it to another host (ops/fleet/haproxy.cfg retries 503,
                    # never 502).
                    raise _Refused(503, "the model server stopped before it answered; send "
                                   "the request again", "server_unavailable",
                                   "server_stopping", headers={"Retry-After": "1"},
                                   error="server_stopping") from exc
                raise _upstream_refusal(exc) from exc
            except (TimeoutError, UpstreamError) as exc:
                raise self._upstream_failed(exc, rec) from exc
            except ValueError as exc:  # a character that cannot be forwarded (CR, LF, NUL)
                raise _Refused(400, "the request cannot be forwarded",
                               "invalid_request_error", "bad_request") from exc
            try:
                rec["ttfb_ms"] = round((time.perf_counter() - t0) * 1000, 3)
                self.metrics.upstream_progress = time.monotonic()  # the stall watch's evidence
                _model_progress(request)
                rec["status"] = up.status
                named_up = {t.strip().lower() for k, v in up.headers
                            if k.lower() == "connection" for t in v.split(",")}
                out_headers = [(k, v) for k, v in up.headers
                               if k.lower() not in RESPONSE_DROP and k.lower() not in named_up]
                out_headers.append(("X-Request-ID", rid))
                if up.content_type == "text/event-stream":
                    return await self._stream(request, up, out_headers, rec, t0=t0,
                                              strip_usage=strip_usage, commit=commit,
                                              client=client, wait=wait)
                payload = await up.read()
            except (TimeoutError, UpstreamError) as exc:
                raise self._upstream_failed(exc, rec) from exc
            finally:
                up.close()  # a no-op once the answer is complete; else the server sees us go
        finally:
            wait.end()
        if client.models is not None and request.rel_url.raw_path == "/v1/models" and \
                up.status == 200:
            payload = scopes.filter_listing(payload, client.models)
        if rec["path"] == responses.PATH and up.status == 200:
            self.owners.bind_from_json(client.name, payload, rec["model"])
        rec["bytes_out"] = len(payload)
        self._usage_from_json(payload, rec)
        self._body_fields(rec, body, payload)
        return web.Response(body=payload, status=up.status, headers=out_headers)

    async def _route(self, request: web.Request, rec: dict[str, Any]) -> Supervisor:
        """The supervisor of the model the request names (on_demand: started, waited for);
        404 for an unknown model, 400 for none when several are served."""
        if self.router is None:
            return self.supervisor
        named = self.router.models.get(rec["model"])
        raw = request.rel_url.raw_path
        if named is not None and not (named.backend.allowed(request.method, raw)
                                      and tasks.serves(named.serves_as, raw)):
            # Before anything starts: an on_demand model is not started for a request its
            # server would refuse (a chat completion to an embedding model).
            what = named.backend.name if named.serves_as == tasks.GENERATE else \
                f"{named.backend.name}, serving {named.serves_as}"
            raise _Refused(404, f"Unknown route {rec['path']} for the model {named.name} "
                           f"({what})", "invalid_request_error", "unknown_route",
                           error="not_found")
        try:
            model = await self.router.acquire(rec["model"])
        except NotServed as exc:
            headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else {}
            raise _Refused(exc.status, exc.message, "invalid_request_error" if exc.status < 500
                           else "server_unavailable", exc.code, headers=headers) from exc
        if self.router.lists_models:
            rec["model"] = model.name
        request["model_slot"] = model
        own = self.router.metrics_of(model, self.metrics)
        if own is not None:
            own.requests_in_flight += 1
            request["model_metrics"] = own
        assert model.supervisor is not None  # acquire() starts an on_demand model
        return model.supervisor

    def _release_model(self, request: web.Request) -> None:
        model = request.get("model_slot")
        if model is None or self.router is None:
            return
        self.router.release(model)
        own = request.get("model_metrics")
        if own is not None:
            own.requests_in_flight -= 1

    async def _read_body(self, request: web.Request) -> bytes:
        limit = self.cfg.gateway.max_body
        if request.content_length is not None and request.content_length > limit:
            raise _Refused(413, f"request body larger than {limit} bytes",
                           "invalid_request_error", "body_too_large")
        try:
            if request.content.is_eof():
                # The whole body arrived with the headers (the usual case): nothing to wait
                # for, so no timer to arm and cancel.
                return await request.read()
            async with asyncio.timeout(self.cfg.gateway.body_timeout):
                return await request.read()
        except web.HTTPRequestEntityTooLarge as exc:
            raise _Refused(413, f"request body larger than {limit} bytes",
                           "invalid_request_error", "body_too_large") from exc
        except TimeoutError as exc:
            raise _Refused(408, "the request body did not arrive in time",
                           "invalid_request_error", "body_timeout") from exc

    def _inspect_body(self, body: bytes, rec: dict[str, Any]
                      ) -> tuple[bytes, bool, dict[str, Any] | None]:
        """Note model and stream flag; ask for usage in OpenAI streams so tokens can be
        recorded, remembering to withhold the extra chunk from a client that did not ask for
        it. Returns (body to send, withhold the usage chunk, the parsed body)."""
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            return body, False, None  # the server answers 400 in its own words
        if not isinstance(data, dict):
            return body, False, None
        model = data.get("model")
        rec["model"] = model if isinstance(model, str) else None
        if data.get("stream") is not True or rec["path"] not in _STREAM_OPTIONS_PATHS:
            return body, False, data
        opts = data.get("stream_options")
        if isinstance(opts, dict) and opts.get("include_usage"):
            return body, False, data
        data["stream_options"] = {**(opts if isinstance(opts, dict) else {}),
                                  "include_usage": True}
        return orjson.dumps(data), True, data

    def _admit(self, client: Client, rec: dict[str, Any], data: dict[str, Any] | None) -> None:
        """The key's scope and its quotas (and a stored response's owner), checked before the
        request is routed; _Refused (403, 429, 404) otherwise."""
        if client.models is not None and data is not None:
            if rec["model"] is None and self.router is not None and self.router.lists_models:
                # Several models and none named: say which ones this key may name (not all).
                raise _Refused(400, "the request names no model; this key may use "
                               f"{', '.join(sorted(client.models))}", "invalid_request_error",
                               "model_required")
            model = rec["model"] if rec["model"] is not None else self.cfg.model_name
            if not scopes.allows(client.models, model):
                raise _Refused(403, f"this key may not use the model {model!r}; it may use "
                               f"{', '.join(sorted(client.models))}", "permission_error",
                               "model_not_allowed", error="model_not_allowed")
        spent = self.quotas.spent(client.name, client.quota)
        if spent is not None:
            retry = max(1, int(spent.resets - time.time()) + 1)
            raise _Refused(429, f"this key's quota {spent.limit} ({spent.allowed}) is spent; "
                           f"it resets at {_utc(spent.resets)}", "rate_limit_error",
                           "quota_exceeded", error=f"quota_{spent.limit}", final=True,
                           headers={"Retry-After": str(retry)})
        if rec["path"].startswith(responses.PATH):
            not_found = self.owners.refusal(client.name, rec["method"], rec["path"], data)
            if not_found is not None:
                raise _Refused(404, not_found, "invalid_request_error", "not_found",
                               error="response_not_found")
            if rec["model"] is None:  # a read or cancel names no model: the one that made it
                rec["model"] = self.owners.model_of(rec["path"])

    def _cap_of(self, model_cfg: Config) -> promptcap.Cap | None:
        """The prompt cap of the routed model (its own args and files), worked out once."""
        key = id(model_cfg)
        if key not in self._caps:
            self._caps[key] = promptcap.cap_for(model_cfg)
        return self._caps[key]

    async def _count_prompt(self, request: web.Request, rec: dict[str, Any],
                            upstream: Upstream, *, cap: promptcap.Cap,
                            seen: promptcap.Assessment, data: dict[str, Any]) -> None:
        """A prompt too near the cap for its estimate: judged by the server's own count of
        its tokens where the backend offers one, else (or if the count fails) by the
        estimate; _Refused (400) if it cannot fit."""
        slot = request.get("model_slot")
        backend = slot.backend if slot is not None else self.backend
        route = dict(backend.count_routes).get(rec["path"])
        body = tokencount.counting_body(route, rec["path"], data) if route is not None else None
        prompt, counted_by = seen.prompt, None
        if route is not None and body is not None:
            try:
                prompt = await tokencount.count(self._upstream, upstream.target, upstream.key,
                                                route, body)
                counted_by = f"the model server's tokenizer ({backend.name} {route})"
            except tokencount.OverContext as exc:
                prompt = exc.tokens
                counted_by = (f"the model server's tokenizer ({backend.name} {route}), at "
                              "least: it stops counting past the context")
            except tokencount.CountFailed as exc:
                self._count_failures.note(backend.name, server=backend.name, detail=str(exc),
                                          fallback="the 4-bytes-per-token estimate")
        _refuse_too_long(promptcap.judged(cap, prompt, seen.budget, counted_by))

    async def _stream(self, request: web.Request, up: UpstreamResponse,
                      headers: list[tuple[str, str]], rec: dict[str, Any], *, t0: float,
                      strip_usage: bool, commit: Callable[[], Awaitable[bool]],
                      client: Client, wait: ServerWait) -> web.StreamResponse:
        rec["stream"] = True
        resp = web.StreamResponse(status=up.status, headers=headers)
        resp.headers["Cache-Control"] = "no-cache"
        resp.headers["X-Accel-Buffering"] = "no"
        await resp.prepare(request)
        sse = _Stream(strip_usage)
        sent = 0
        final = b""  # the final event, held back until the record is written
        try:
            async for chunk in up:
                self.metrics.upstream_progress = time.monotonic()  # the stall watch's evidence
                _model_progress(request)
                data = final + sse.feed(chunk, time.perf_counter())
                if sse.response_id is not None:  # bound before the client can learn the id
                    self.owners.bind(client.name, sse.response_id, rec["model"])
                data, final = _split_final(data)
                if data:
                    with wait.paused():  # the client's turn, not the server's
                        await resp.write(data)
                    sent += len(data)
            wait.end()  # the server's answer is whole: the rest is the record and the client
            final += sse.rest()
            _stream_fields(rec, sse, sent + len(final), t0)
            if not await commit():
                # No record, no end: cut the connection so the client cannot take the
                # answer as complete.
                if request.transport is not None:
                    request.transport.close()
                return resp
            if final:
                await resp.write(final)
                sent += len(final)
            await resp.write_eof()
        except ConnectionError:
            rec["error"] = "client_disconnect"
            up.close()  # the server sees the connection go and aborts the generation
        except (TimeoutError, UpstreamError) as exc:
            rec["error"] = self._upstream_failed(exc, rec).error
            # The status line went out long ago: cut the client's connection instead of
            # ending the body, which would tell the client that the stream was whole.
            if request.transport is not None:
                request.transport.close()
        finally:
            _stream_fields(rec, sse, sent, t0)
        return resp

    @staticmethod
    def _usage_from_json(payload: bytes, rec: dict[str, Any]) -> None:
        if b'"usage"' not in payload:
            return
        try:
            data = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return
        usage = anthropic.usage_of(data) if isinstance(data, dict) else None
        if isinstance(usage, dict):
            # Rerank answers carry total_tokens only (vLLM 0.32 /v1/rerank): all of it input.
            rec["prompt_tokens"], rec["completion_tokens"] = anthropic.token_counts(usage)
            if rec["prompt_tokens"] is None:
                rec["prompt_tokens"] = usage.get("total_tokens")
        if rec["model"] is None and isinstance(data, dict) and isinstance(data.get("model"), str):
            rec["model"] = data["model"]

    def _body_fields(self, rec: dict[str, Any], body: bytes, payload: bytes) -> None:
        mode = self.log.record_bodies
        if mode == "hash":
            rec["req_sha256"] = hashlib.sha256(body).hexdigest()
            rec["resp_sha256"] = hashlib.sha256(payload).hexdigest()
        elif mode == "full":
            rec["req_body"] = body.decode("utf-8", "replace")
            rec["resp_body"] = payload.decode("utf-8", "replace")

    async def _commit(self, rec: dict[str, Any]) -> bool:
        """Record the request and wait until the record is durable per requests.sync."""
        seq = self._finish(rec)
        if seq is None:
            return False
        try:
            await self.log.durable(seq)
        except RequestLogError as exc:
            self._log_failed(exc)
            return False
        self._log_recovered()
        return True

    def _log_failed(self, exc: RequestLogError) -> None:
        if self._log_broken is None:
            self.events.emit("requests_unrecordable", level="critical", error=str(exc),
                             action="refusing requests until records can be written")
        self._log_broken = str(exc)

    def _finish(self, rec: dict[str, Any]) -> int | None:
        """Record the request (fail closed if that is impossible) and count it; the record's
        seq, or None if it could not be written."""
        status = rec["status"]
        self.metrics.count_request(
            rec["path"] if status != 404 else "other", status, rec["client"] or "-",
            latency_ms=rec["latency_ms"], ttft_ms=rec["ttft_ms"],
            prompt_tokens=rec["prompt_tokens"], completion_tokens=rec["completion_tokens"],
            model=rec["model"] if status != 404 and rec["model"] else "-")
        if rec["client"] is not None and rec.get("start_seq") is not None:
            self.quotas.count_tokens(rec["client"], rec)
        try:
            seq = self.log.record(rec)
        except RequestLogError as exc:
            self._log_failed(exc)
            return None
        if self.log.sync_mode != "always":  # else only once the record is durable too
            self._log_recovered()
        return seq

    def _log_recovered(self) -> None:
        if self._log_broken is not None:
            self.events.emit("requests_recordable", level="warning",
                             reason="request records can be written again")
            self._log_broken = None


def _model_progress(request: web.Request) -> None:
    """A byte from the server: progress for the stall watch of the request's model."""
    own = request.get("model_metrics")
    if own is not None:
        own.upstream_progress = time.monotonic()


def _split_final(data: bytes) -> tuple[bytes, bytes]:
    """(events to pass on now, the final event to hold back) of complete events `data`."""
    if not data:
        return data, b""
    at = data.rfind(b"\n\n", 0, len(data) - 2) + 2 if len(data) > 2 else 0
    last = data[at:] if at >= 2 else data
    if last.startswith(_FINAL_EVENTS):
        return data[:len(data) - len(last)], last
    return data, b""


def _stream_fields(rec: dict[str, Any], sse: _Stream, sent: int, t0: float) -> None:
    rec["bytes_out"] = sent
    if sse.ttft is not None:
        rec["ttft_ms"] = round((sse.ttft - t0) * 1000, 3)
    if sse.usage is not None:
        rec["prompt_tokens"], rec["completion_tokens"] = anthropic.token_counts(sse.usage)


def _presented_key(request: web.Request) -> str | None:
    return anthropic.presented_key(request.headers.get("Authorization"),
                                   request.headers.get("x-api-key"))


def _client_ids(request: web.Request) -> dict[str, Any]:
    """The client's own X-Request-ID (when it is a plain token) and the SDK's retry count
    (`x-stainless-retry-count`, sent by the openai and anthropic SDKs), for the record."""
    given = request.headers.get("X-Request-ID")
    retries = request.headers.get("x-stainless-retry-count", "")
    return {"client_request_id": given if given and _CLIENT_REQUEST_ID.fullmatch(given)
            else None,
            "retries": int(retries) if retries.isdigit() and len(retries) < 6 else None}


def _utc(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def _upstream_refusal(exc: TimeoutError | UpstreamError) -> _Refused:
    """How a failed exchange with the server is answered; once a stream has begun, only
    its `error` is used, for the record."""
    if isinstance(exc, TimeoutError):
        return _Refused(504, "the model server did not answer in time", "server_error",
                        "upstream_timeout")
    if isinstance(exc, UpstreamConnectError):
        return _Refused(502, "the model server refused the connection", "server_error",
                        "upstream_unavailable")
    if isinstance(exc, UpstreamProtocolError):
        return _Refused(502, "the model server sent a malformed response", "server_error",
                        "upstream_bad_response")
    return _Refused(502, "the model server closed the connection", "server_error",
                    "upstream_disconnect")


def _error(status: int, message: str, type_: str, code: str | None,
           headers: dict[str, str] | None = None, *,
           anthropic_shape: bool = False) -> web.Response:
    body = (anthropic.error_body(status, message) if anthropic_shape
            else error_body(message, type_, code))
    return web.Response(body=body, status=status, content_type="application/json",
                        headers=headers)

