"""A lean HTTP/1.1 client for the gateway's one upstream: the model server, on loopback.

aiohttp's ClientSession cost about 120 µs of the gateway's ~370 µs per request; this client
does only what the proxy and the supervisor's probes need, on asyncio Protocols: a keep-alive
pool per target (TCP host:port, or a Unix socket), the request sent in one write, the
response framed by llhttp (sovereignd.http.parser: Content-Length, chunked transfer-coding or
the connection's close; malformed and ambiguous answers refused at once), and body bytes
handed to the caller as they arrive (server-sent events pass event by event).

Reuse. A connection goes back to the pool only when its response was received completely
(framing done, no byte beyond it), the response was HTTP/1.1 without `Connection: close`,
was not delimited by the close, and our request was written completely. Idle connections are
closed after `keepalive_timeout` (below uvicorn's 5 s, so that the server never closes one
under us while idle) and beyond `max_idle` per target.

Retry (RFC 9110 §9.2.2: a request must not be repeated unless it is idempotent or known not to
have been applied). A pooled connection the loop has seen closed is never written to; one idle
for `peek_after` (1 s) or more is also peeked at (a non-blocking recv with MSG_PEEK) just
before the write, for a close, a reset or unasked bytes that arrived since the loop last
looked. A connection that fails either check is dropped and the next one (or a new one) is
used: nothing was written, so this holds for every method. (Connections used within the last
second skip the peek's system call: no idle timeout can have closed them, and a server that
closes a connection it has just served is going away, where a new connection fails too.)
After the write, a reused connection that closes before any byte of a response is retried
once on a new connection only for idempotent methods (GET, HEAD, OPTIONS, PUT, DELETE,
TRACE); a POST -- a completion -- is never sent twice, since the server may have started it:
the caller gets `UpstreamDisconnected`.

Timeouts raise `TimeoutError`: `connect_timeout` for making a connection, and the `timeout`
given per request for the whole exchange (connect, request, the complete response). A caller
that is cancelled, or that closes a response before its end, closes the connection, so the
server sees the client go and stops the work (vLLM aborts the generation).
"""

from __future__ import annotations

import asyncio
import collections
import os
import re
import socket
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Final, cast

from sovereignd.http.errors import (
    UpstreamConnectError,
    UpstreamDisconnected,
    UpstreamError,
    UpstreamProtocolError,
)
from sovereignd.http.parser import HEAD, MAX_HEADERS, UNTIL_CLOSE, ResponseHead, ResponseParser

__all__ = ["IDEMPOTENT", "MAX_HEADERS", "MAX_HEADER_BYTES", "RESERVED", "Response", "Target",
           "UpstreamClient", "UpstreamConnectError", "UpstreamDisconnected", "UpstreamError",
           "UpstreamProtocolError", "encode_request"]

IDEMPOTENT: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
# Framing and negotiation are this client's business: never taken from the caller.
RESERVED: Final = frozenset({"host", "content-length", "transfer-encoding", "connection",
                             "keep-alive", "accept-encoding", "te", "trailer", "upgrade",
                             "expect", "proxy-connection"})
MAX_HEADER_BYTES: Final = 64 * 1024
# A consumer that falls this far behind a response pauses reading from the server.
_HIGH_WATER = 1 << 20
# A deadline timer may fire this much before its time (the loop's clock resolution).
_EARLY = 0.001
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_REQUEST_TARGET = re.compile(r"[^\x00-\x20\x7f]+")


class _Unanswered(UpstreamDisconnected):
    """Closed after our request was written, before any byte of a response."""


@dataclass(frozen=True, slots=True)
class Target:
    """Where a server listens: TCP `host:port`, or a Unix socket `uds` (vLLM's --uds)."""

    host: str = "127.0.0.1"
    port: int = 0
    uds: str | None = None

    @property
    def authority(self) -> str:
        """The Host header's value."""
        if self.uds:
            return "localhost"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def __str__(self) -> str:
        return f"unix:{self.uds}" if self.uds else self.authority


class Response:
    """One response: status, headers, then the body as chunks (`async for`) or whole (`read`).

    Use it as an async context manager, or call `close()`: leaving before the body's end
    closes the connection (the server then stops the work)."""

    __slots__ = ("_chunks", "_conn", "_done", "_exc", "_head", "_paused", "_size", "_waiter",
                 "content_length", "headers", "method", "reason", "status", "version")

    def __init__(self, conn: _Connection, method: str, head: asyncio.Future[None]) -> None:
        self._conn: _Connection | None = conn
        self.method = method
        self._head = head
        self.status = 0
        self.reason = ""
        self.version = 11
        self.headers: list[tuple[str, str]] = []
        self.content_length: int | None = None
        self._chunks: collections.deque[bytes] = collections.deque()
        self._size = 0
        self._done = False
        self._exc: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False

    # --- for the caller -------------------------------------------------------------------------

    def header(self, name: str) -> str | None:
        """A header's value by case-insensitive name (repeated fields joined with ", ")."""
        low = name.lower()
        values = [v for k, v in self.headers if k.lower() == low]
        return ", ".join(values) if values else None

    @property
    def content_type(self) -> str:
        """The media type without parameters, lower-cased ("" if none was sent)."""
        value = self.header("content-type")
        return value.partition(";")[0].strip().lower() if value else ""

    async def read(self) -> bytes:
        """The whole body. Raises what ended the exchange early (TimeoutError,
        UpstreamDisconnected, UpstreamProtocolError)."""
        if self._done and self._exc is None and len(self._chunks) <= 1:
            self._size = 0
            return self._chunks.pop() if self._chunks else b""  # the usual case: all here
        parts: list[bytes] = []
        while True:
            if self._chunks:
                parts.extend(self._chunks)
                self._take()
            if self._done:
                break
            await self._wait()
        if self._exc is not None:
            raise self._exc
        return b"".join(parts)

    def __aiter__(self) -> Response:
        return self

    async def __anext__(self) -> bytes:
        """What arrived since the last call, as soon as it arrived."""
        while not self._chunks:
            if self._done:
                if self._exc is not None:
                    raise self._exc
                raise StopAsyncIteration
            await self._wait()
        data = self._chunks.popleft() if len(self._chunks) == 1 else b"".join(self._chunks)
        self._take()
        return data

    def close(self) -> None:
        """Stop: if the response has not fully arrived, its connection is closed."""
        self._chunks.clear()
        self._size = 0
        if self._done:
            return
        conn = self._conn
        self._end(UpstreamDisconnected("the response was closed before its end"))
        if conn is not None:
            conn.abort()

    async def __aenter__(self) -> Response:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # --- internals ------------------------------------------------------------------------------

    def _take(self) -> None:
        self._chunks.clear()
        self._size = 0
        if self._paused and self._conn is not None:
            self._paused = False
            self._conn.resume()

    async def _wait(self) -> None:
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        try:
            await waiter
        except asyncio.CancelledError:
            self.close()  # the caller was cancelled: the server must see us go
            raise
        finally:
            self._waiter = None

    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if self._size > _HIGH_WATER and not self._paused and self._conn is not None:
            self._paused = True
            self._conn.pause()

    def _end(self, exc: BaseException | None) -> None:
        """The response is complete (exc None) or failed; wake whoever waits."""
        if self._done:
            return
        self._done = True
        self._exc = exc
        if self._paused and self._conn is not None:
            # The rest arrived while the consumer lagged: the connection goes back to the
            # pool, and must be reading again there.
            self._paused = False
            self._conn.resume()
        self._conn = None
        head = self._head
        if not head.done():
            if exc is None:
                head.set_result(None)
            else:
                head.set_exception(exc)  # raised by request(); the body has nothing more
                self._exc = UpstreamDisconnected("no response")
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class _Connection(asyncio.Protocol):
    """One connection to the server; its responses are framed by a `ResponseParser`."""

    def __init__(self, pool: _Pool, sock: socket.socket,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.pool = pool
        self.sock = sock
        self.loop = loop
        # The exchange's deadline, and a timer that fires at or before it. The timer outlives
        # exchanges and is moved only when a deadline comes earlier: no timer per request.
        self.deadline = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self.resp: Response | None = None
        self.parser = ResponseParser(self, pool.max_header_bytes)
        self.keep_alive = True
        self.finished = False  # the response ended inside the current data_received

    # --- use ------------------------------------------------------------------------------------

    def alive(self, peek: bool) -> bool:
        """Whether an idle connection can take a request: not closed, and (by a peek at the
        socket) no EOF, error or unasked bytes waiting that the loop has not seen yet."""
        if self.closed or self.transport is None or self.transport.is_closing():
            return False
        if not peek:
            return True
        try:
            self.sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return True
        except OSError:
            return False
        return False

    def send(self, data: bytes, method: str, deadline: float) -> Response:
        assert self.transport is not None
        head = self.loop.create_future()
        resp = self.resp = Response(self, method, head)
        self.deadline = deadline
        timer = self.timer
        if timer is None or timer.when() > deadline:
            if timer is not None:
                timer.cancel()
            self.timer = self.loop.call_at(deadline, self._check_deadline)
        self.parser.expect(head_only=method == "HEAD")
        self.keep_alive = True
        self.transport.write(data)
        return resp

    def pause(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def abort(self) -> None:
        self.closed = True
        self.keep_alive = False
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.transport is not None:
            self.transport.abort()

    def _check_deadline(self) -> None:
        self.timer = None
        if self.resp is None or self.closed:
            return  # idle (or gone): the next exchange arms it again
        if self.loop.time() + _EARLY >= self.deadline:
            self._fail(TimeoutError("the server did not answer completely in time"))
        else:
            self.timer = self.loop.call_at(self.deadline, self._check_deadline)

    # --- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports implement asyncio.Transport without subclassing it.)
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed(data)
        except UpstreamProtocolError as exc:
            self._fail(exc)  # (after a complete response: bytes beyond it; just closes)
            return
        if self.finished:
            # Only now, with every byte of this read parsed: none was left over.
            self.finished = False
            self._release()

    def eof_received(self) -> bool:
        self._lost(None)
        return False  # let the transport close

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost(exc)
        if self.timer is not None:
            self.timer.cancel()  # and with it the timer's reference to this connection
            self.timer = None
        self.pool.forget(self)

    # --- ResponseSink: what the parser found ------------------------------------------------------

    def head_received(self, head: ResponseHead) -> None:
        resp = self.resp
        assert resp is not None
        resp.status, resp.reason, resp.version = head.status, head.reason, head.version
        resp.headers = head.headers
        resp.content_length = head.content_length
        self.keep_alive = head.keep_alive
        if not resp._head.done():
            resp._head.set_result(None)

    def body_received(self, data: bytes) -> None:
        if self.resp is not None:
            self.resp._feed(data)

    def message_complete(self) -> None:
        resp, self.resp = self.resp, None
        if resp is not None:
            resp._end(None)
        self.finished = True

    # --- ends -----------------------------------------------------------------------------------

    def _release(self) -> None:
        """The response has fully arrived: hand the connection back, or close it."""
        transport = self.transport
        if (self.keep_alive and not self.closed and transport is not None
                and not transport.get_write_buffer_size()):
            self.pool.release(self)
        else:
            self.abort()

    def _fail(self, exc: BaseException) -> None:
        resp, self.resp = self.resp, None
        self.finished = False
        if resp is not None:
            resp._end(exc)
        self.abort()

    def _lost(self, exc: Exception | None) -> None:
        """The server closed (exc None) or reset the connection."""
        was_closed, self.closed = self.closed, True
        resp = self.resp
        if resp is None:
            return
        state = self.parser.state
        if state == UNTIL_CLOSE and exc is None:
            self.message_complete()  # the close delimits this body
            self.finished = False
            self.abort()
        elif was_closed:
            self._fail(UpstreamDisconnected("the connection was closed"))
        elif state == HEAD and not self.parser.received:
            self._fail(_Unanswered("the server closed the connection without answering"
                                   + (f" ({exc})" if exc else "")))
        elif state == HEAD:
            self._fail(UpstreamDisconnected("the server closed the connection in the middle "
                                            "of the response head"))
        else:
            missing = self.parser.remaining
            detail = (f" ({missing} of {resp.content_length} bytes missing)"
                      if resp.content_length is not None else "")
            self._fail(UpstreamDisconnected(f"the server closed the connection in the middle "
                                            f"of the response body{detail}"
                                            + (f": {exc}" if exc else "")))


class _Pool:
    """Idle connections to one target, most recently used last."""

    def __init__(self, client: UpstreamClient, target: Target) -> None:
        self.client = client
        self.target = target
        self.max_header_bytes = client.max_header_bytes
        self.idle: list[_Connection] = []
        self.all: set[_Connection] = set()
        self.dropped = False

    def take(self, now: float) -> _Connection | None:
        idle = self.idle
        client = self.client
        oldest = now - client.keepalive_timeout
        recent = now - client.peek_after
        while idle:
            conn = idle.pop()
            if conn.idle_since > oldest and conn.alive(peek=conn.idle_since <= recent):
                return conn
            conn.abort()
        return None

    def release(self, conn: _Connection) -> None:
        client = self.client
        if client.closed or self.dropped or len(self.idle) >= client.max_idle:
            conn.abort()
            return
        conn.idle_since = client.loop_time()
        self.idle.append(conn)
        client.schedule_sweep()

    def forget(self, conn: _Connection) -> None:
        self.all.discard(conn)
        if conn in self.idle:
            self.idle.remove(conn)

    def sweep(self, now: float) -> float | None:
        """Close connections idle too long; when the next one expires (None: none idle)."""
        oldest = now - self.client.keepalive_timeout
        idle = self.idle
        while idle and idle[0].idle_since <= oldest:
            idle.pop(0).abort()
        return idle[0].idle_since + self.client.keepalive_timeout if idle else None


class UpstreamClient:
    """Keep-alive HTTP/1.1 to one or more targets; `request()` returns a `Response`."""

    def __init__(self, *, connect_timeout: float = 5.0, keepalive_timeout: float = 4.0,
                 max_idle: int = 64, max_header_bytes: int = MAX_HEADER_BYTES,
                 peek_after: float = 1.0,
                 before_connect: Callable[[Target], Awaitable[None]] | None = None) -> None:
        # before_connect: awaited before every new TCP connection; it raises
        # UpstreamConnectError to forbid it (the port is not held by the expected server).
        self.before_connect = before_connect
        self.connect_timeout = connect_timeout
        self.keepalive_timeout = keepalive_timeout
        self.peek_after = peek_after
        self.max_idle = max_idle
        self.max_header_bytes = max_header_bytes
        self.closed = False
        self._pools: dict[Target, _Pool] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweeper: asyncio.TimerHandle | None = None

    async def request(self, target: Target, method: str, path: str,
                      headers: Iterable[tuple[str, str]] = (), body: bytes = b"", *,
                      timeout: float) -> Response:
        """Send `method path` (exactly as given) with `headers` and `body`; return once the
        response head has arrived. Host, Content-Length and `Accept-Encoding: identity` are
        added here (the body is never compressed); framing headers from the caller are
        dropped. Raises TimeoutError, UpstreamConnectError, UpstreamDisconnected,
        UpstreamProtocolError."""
        if self.closed:
            raise UpstreamError("the upstream client is closed")
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        data = encode_request(target, method, path, headers, body)
        deadline = loop.time() + timeout
        pool = self._pools.get(target)
        if pool is None:
            pool = self._pools[target] = _Pool(self, target)
        retried = False
        while True:
            # After a retry: a new connection, never another pooled one.
            conn = pool.take(loop.time()) if pool.idle and not retried else None
            reused = conn is not None
            if conn is None:
                conn = await self._connect(pool, deadline, loop)
            resp = conn.send(data, method, deadline)
            try:
                await resp._head
            except _Unanswered:
                if reused and not retried and method in IDEMPOTENT:
                    retried = True
                    continue
                raise
            except BaseException:
                resp.close()
                raise
            return resp

    async def _connect(self, pool: _Pool, deadline: float,
                       loop: asyncio.AbstractEventLoop) -> _Connection:
        target = pool.target
        if self.before_connect is not None and not target.uds:
            await self.before_connect(target)
        limit = min(self.connect_timeout, deadline - loop.time())
        address: str | tuple[str, int]
        if target.uds:
            family, address = socket.AF_UNIX, target.uds
        else:
            family = socket.AF_INET6 if ":" in target.host else socket.AF_INET
            address = (target.host, target.port)
        sock: socket.socket | None = None
        try:
            async with asyncio.timeout(limit):
                # Our own socket, so that `alive()` can peek at it.
                sock = bound = socket.socket(family, socket.SOCK_STREAM)
                sock.setblocking(False)
                await loop.sock_connect(sock, address)
                if target.uds:
                    _, conn = await loop.create_unix_connection(
                        lambda: _Connection(pool, bound, loop), sock=sock)
                else:
                    _, conn = await loop.create_connection(
                        lambda: _Connection(pool, bound, loop), sock=sock)
        except BaseException as exc:
            if sock is not None:
                sock.close()
            if isinstance(exc, TimeoutError):  # (before OSError: it is one)
                raise TimeoutError(f"no connection to {target} within {limit:.3g} s") from None
            if isinstance(exc, OSError):
                # (asyncio's message is "Connect call failed": the errno says why.)
                why = os.strerror(exc.errno) if exc.errno else str(exc)
                raise UpstreamConnectError(f"cannot connect to {target}: {why}") from exc
            raise
        if self.closed:
            conn.abort()
            raise UpstreamError("the upstream client is closed")
        pool.all.add(conn)
        return conn

    # --- housekeeping ---------------------------------------------------------------------------

    def loop_time(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    def schedule_sweep(self) -> None:
        if self._sweeper is None and self._loop is not None:
            self._sweeper = self._loop.call_later(self.keepalive_timeout, self._sweep)

    def _sweep(self) -> None:
        self._sweeper = None
        assert self._loop is not None
        now = self._loop.time()
        due = [t for t in (p.sweep(now) for p in self._pools.values()) if t is not None]
        if due:
            self._sweeper = self._loop.call_at(min(due), self._sweep)

    def idle_connections(self, target: Target) -> int:
        pool = self._pools.get(target)
        return len(pool.idle) if pool else 0

    def drop(self, target: Target) -> None:
        """Close the idle connections to `target` (it moved or went away); busy ones are
        closed when their responses end."""
        pool = self._pools.pop(target, None)
        if pool is not None:
            pool.dropped = True
            for conn in list(pool.idle):
                conn.abort()

    async def close(self) -> None:
        """Close every connection, busy ones included; later requests raise UpstreamError."""
        self.closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for pool in self._pools.values():
            for conn in list(pool.all):
                conn.abort()
        self._pools.clear()
        await asyncio.sleep(0)  # let the transports finish closing


def encode_request(target: Target, method: str, path: str,
                   headers: Iterable[tuple[str, str]], body: bytes) -> bytes:
    """The request's bytes. Refuses anything that could split it into two (CR, LF, NUL in a
    field, a space in the target): the proxy passes client-controlled values through."""
    parts = [method, " ", path, " HTTP/1.1\r\nHost: ", target.authority, "\r\n"]
    lines = 2
    for name, value in headers:
        if name.lower() in RESERVED:
            continue
        parts += (name, ": ", value, "\r\n")
        lines += 1
    if body or method in _BODY_METHODS:
        parts += ("Content-Length: ", str(len(body)), "\r\n")
        lines += 1
    parts.append("Accept-Encoding: identity\r\n\r\n")
    head = "".join(parts)
    if (head.count("\n") != lines + 2 or head.count("\r") != lines + 2 or "\0" in head
            or not _REQUEST_TARGET.fullmatch(path) or not method.isalpha()):
        raise ValueError("request line or header field with a forbidden character")
    data = head.encode("utf-8", "surrogateescape")
    return data + body if body else data
