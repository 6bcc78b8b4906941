"""The gateway's upstream HTTP/1.1 client against real loopback servers, some misbehaving."""

from __future__ import annotations

import asyncio
import os
import select
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest
import uvloop
from aiohttp import web

from sovereignd.http.upstream import (
    Target,
    UpstreamClient,
    UpstreamConnectError,
    UpstreamDisconnected,
    UpstreamError,
    UpstreamProtocolError,
    encode_request,
)

T = TypeVar("T")
OK = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"


# Every test runs on the loop the daemon uses (uvloop) and on the standard one (its fallback).
LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
_loop_factory: list[Callable[[], asyncio.AbstractEventLoop]] = [asyncio.new_event_loop]


@pytest.fixture(autouse=True, params=sorted(LOOPS))
def event_loop_kind(request: pytest.FixtureRequest) -> str:
    _loop_factory[0] = LOOPS[request.param]
    return str(request.param)


def run(coro: Coroutine[Any, Any, T]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, 20)

    with asyncio.Runner(loop_factory=_loop_factory[0]) as runner:
        return runner.run(bounded())


async def until(condition: Callable[[], bool], timeout: float = 5,
                what: str = "condition") -> None:
    """tests.helpers.wait_for for the event loop: poll without blocking it."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.005)


# --- servers ------------------------------------------------------------------------------------


class Raw:
    """A loopback server that reads each request and lets `respond` write whatever it likes.

    `respond(server, conn, request, writer)` returns False to stop serving that connection.
    Counts connections and requests, and notes when a connection's client went away."""

    def __init__(self, respond: Callable[[Raw, int, bytes, asyncio.StreamWriter],
                                         Awaitable[bool]]) -> None:
        self.respond = respond
        self.connections = 0
        self.requests: list[bytes] = []
        self.client_gone = asyncio.Event()
        self.gone = 0  # connections the client closed
        self.request_seen = asyncio.Event()
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self, uds: Path | None = None) -> Raw:
        if uds is not None:
            self.server = await asyncio.start_unix_server(self._serve, str(uds))
        else:
            self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
            self.port = self.server.sockets[0].getsockname()[1]
        return self

    @property
    def target(self) -> Target:
        return Target("127.0.0.1", self.port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = self.connections
        self.connections += 1
        self.writers.append(writer)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    self.gone += 1
                    self.client_gone.set()
                    return
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                self.request_seen.set()
                if not await self.respond(self, conn, request, writer):
                    return
        finally:
            writer.close()

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in self.writers:
            w.close()
        await self.server.wait_closed()


@asynccontextmanager
async def raw(respond: Callable[[Raw, int, bytes, asyncio.StreamWriter], Awaitable[bool]],
              uds: Path | None = None) -> AsyncIterator[Raw]:
    server = await Raw(respond).start(uds)
    try:
        yield server
    finally:
        await server.close()


def answer(data: bytes, keep: bool = True) -> Callable[[Raw, int, bytes, asyncio.StreamWriter],
                                                       Awaitable[bool]]:
    async def respond(_s: Raw, _c: int, _r: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(data)
        await writer.drain()
        return keep

    return respond


@asynccontextmanager
async def app_server(app: web.Application) -> AsyncIterator[Target]:
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield Target("127.0.0.1", port)
    finally:
        await runner.cleanup()


@asynccontextmanager
async def client(**kwargs: Any) -> AsyncIterator[UpstreamClient]:
    c = UpstreamClient(**kwargs)
    try:
        yield c
    finally:
        await c.close()


async def get(c: UpstreamClient, target: Target, *, path: str = "/", method: str = "GET",
              body: bytes = b"", timeout: float = 5) -> tuple[int, bytes]:
    async with await c.request(target, method, path, [], body, timeout=timeout) as resp:
        return resp.status, await resp.read()


# --- framing ------------------------------------------------------------------------------------


def test_content_length_body_headers_and_what_is_sent() -> None:
    """Host, Content-Length and Accept-Encoding: identity are added; the path goes as given;
    the caller's framing headers are dropped."""
    seen: dict[str, Any] = {}

    async def echo(request: web.Request) -> web.Response:
        seen.update(headers=dict(request.headers), path=request.raw_path,
                    body=await request.read())
        return web.json_response({"ok": True}, headers={"X-Two": "a"})

    async def main() -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", echo)
        async with app_server(app) as target, client() as c:
            resp = await c.request(target, "POST", "/v1/x?b=%2F&a=1",
                                   [("X-Test", "1"), ("Content-Length", "999"),
                                    ("Transfer-Encoding", "chunked"),
                                    ("Accept-Encoding", "gzip")], b'{"q": 1}', timeout=5)
            async with resp:
                assert resp.status == 200 and resp.reason == "OK"
                assert resp.content_type == "application/json"
                assert resp.header("x-two") == "a" and ("X-Two", "a") in resp.headers
                assert await resp.read() == b'{"ok": true}'
        h = seen["headers"]
        assert seen["path"] == "/v1/x?b=%2F&a=1" and seen["body"] == b'{"q": 1}'
        assert h["Accept-Encoding"] == "identity" and h["Content-Length"] == "8"
        assert h["Host"] == f"127.0.0.1:{target.port}" and h["X-Test"] == "1"
        assert "Transfer-Encoding" not in h

    run(main())


def test_chunked_body_with_trailers_ignored_and_connection_reused() -> None:
    body = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nX-Trailer: yes\r\n\r\n")

    async def main() -> None:
        async with raw(answer(body)) as srv, client() as c:
            for _ in range(3):
                assert await get(c, srv.target) == (200, b"hello, world")
            assert srv.connections == 1 and c.idle_connections(srv.target) == 1

    run(main())


def test_chunked_body_split_at_every_byte() -> None:
    """The parser copes with any split of the bytes: here one byte per write."""
    body = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: b\r\n\r\n"
            b"3\r\nabc\r\n1\r\nd\r\n0\r\n\r\n")

    async def dribble(_s: Raw, _c: int, _r: bytes, writer: asyncio.StreamWriter) -> bool:
        for i in range(len(body)):
            writer.write(body[i:i + 1])
            await asyncio.sleep(0)  # let the client read each byte on its own
        return True

    async def main() -> None:
        async with raw(dribble) as srv, client() as c:
            assert await get(c, srv.target) == (200, b"abcd")
            assert await get(c, srv.target) == (200, b"abcd")
            assert srv.connections == 1

    run(main())


def test_close_delimited_body_is_read_to_the_end_and_not_reused() -> None:
    async def main() -> None:
        async with raw(answer(b"HTTP/1.1 200 OK\r\n\r\nuntil the end", keep=False)) as srv, \
                client() as c:
            assert await get(c, srv.target) == (200, b"until the end")
            assert c.idle_connections(srv.target) == 0
            assert await get(c, srv.target) == (200, b"until the end")
            assert srv.connections == 2

    run(main())


@pytest.mark.parametrize(("status", "method"), [(204, "GET"), (304, "GET"), (200, "HEAD")])
def test_no_body_for_head_204_304_and_the_connection_is_reused(status: int,
                                                               method: str) -> None:
    # Content-Length on a HEAD answer describes the GET's body: nothing follows.
    head = f"HTTP/1.1 {status} X\r\nContent-Length: 5\r\n\r\n".encode()
    head = head if status == 200 else head.replace(b"Content-Length: 5\r\n", b"")

    async def main() -> None:
        async with raw(answer(head)) as srv, client() as c:
            assert await get(c, srv.target, method=method) == (status, b"")
            assert await get(c, srv.target, method=method) == (status, b"")
            assert srv.connections == 1

    run(main())


def test_interim_100_continue_is_skipped_and_101_is_refused() -> None:
    async def main() -> None:
        async with raw(answer(b"HTTP/1.1 100 Continue\r\n\r\n" + OK)) as srv, client() as c:
            assert await get(c, srv.target, method="POST", body=b"x") == (200, b"ok")
        async with raw(answer(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n")) \
                as srv, client() as c:
            with pytest.raises(UpstreamProtocolError, match="101"):
                await get(c, srv.target)

    run(main())


def test_server_sent_events_arrive_one_by_one_as_they_are_sent() -> None:
    """The server sends the next event only after the client received the previous one:
    nothing is held back waiting for more."""
    received = [asyncio.Event() for _ in range(3)]

    async def sse(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(3):
            await resp.write(f"data: {i}\n\n".encode())
            await received[i].wait()
        await resp.write_eof()
        return resp

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/sse", sse)
        async with app_server(app) as target, client() as c:
            stamps: list[float] = []
            async with await c.request(target, "POST", "/sse", [], b"{}", timeout=5) as resp:
                assert resp.content_type == "text/event-stream"
                chunks = []
                async for chunk in resp:
                    stamps.append(time.monotonic())
                    chunks.append(chunk)
                    received[len(chunks) - 1].set()
            assert chunks == [b"data: 0\n\n", b"data: 1\n\n", b"data: 2\n\n"]
            assert stamps == sorted(stamps)
            assert c.idle_connections(target) == 1  # the chunked end arrived: reusable

    run(main())


def test_a_response_that_ends_while_reading_is_paused_leaves_a_reading_connection() -> None:
    """The last byte is the one that crosses the pause mark, and the consumer reads only after
    the end: the connection goes back to the pool reading again, and carries the next
    request (a paused one would leave that request waiting for its deadline)."""
    body = b"x" * ((1 << 20) + 1)

    async def main() -> None:
        header = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        async with raw(answer(header + body)) as srv, client() as c:
            for _ in range(2):
                async with await c.request(srv.target, "GET", "/", timeout=5) as resp:
                    await until(lambda r=resp: r._done, what="the whole response")
                    assert await resp.read() == body
            assert srv.connections == 1

    run(main())


def test_large_body_is_read_whole_and_streams_past_the_pause_mark() -> None:
    big = bytes(range(256)) * (5 * 4096)  # 5 MiB, beyond the point where reading pauses

    async def main() -> None:
        header = f"HTTP/1.1 200 OK\r\nContent-Length: {len(big)}\r\n\r\n".encode()
        async with raw(answer(header + big)) as srv, client() as c:
            assert await get(c, srv.target) == (200, big)
            async with await c.request(srv.target, "GET", "/", timeout=5) as resp:
                got = bytearray()
                async for chunk in resp:
                    got += chunk
                    await asyncio.sleep(0)  # a slow consumer: the client pauses the socket
            assert got == big and srv.connections == 1

    run(main())


# --- connection reuse ---------------------------------------------------------------------------


def test_keep_alive_reuses_one_connection_and_concurrency_opens_more() -> None:
    async def main() -> None:
        async with raw(answer(OK)) as srv, client() as c:
            for _ in range(10):
                assert await get(c, srv.target) == (200, b"ok")
            assert srv.connections == 1
            await asyncio.gather(*(get(c, srv.target) for _ in range(4)))
            assert 2 <= srv.connections <= 5 and len(srv.requests) == 14

    run(main())


def test_idle_connections_are_bounded() -> None:
    held = asyncio.Event()

    async def slow(s: Raw, _c: int, _r: bytes, writer: asyncio.StreamWriter) -> bool:
        if len(s.requests) >= 4:
            held.set()
        await held.wait()
        writer.write(OK)
        return True

    async def main() -> None:
        async with raw(slow) as srv, client(max_idle=2) as c:
            await asyncio.gather(*(get(c, srv.target) for _ in range(4)))
            assert srv.connections == 4 and c.idle_connections(srv.target) == 2

    run(main())


def test_dropping_a_target_closes_its_connections_busy_ones_when_they_end() -> None:
    go = asyncio.Event()

    async def waits(s: Raw, _c: int, _r: bytes, writer: asyncio.StreamWriter) -> bool:
        if len(s.requests) == 2:
            await go.wait()
        writer.write(OK)
        return True

    async def main() -> None:
        async with raw(waits) as srv, client() as c:
            assert await get(c, srv.target) == (200, b"ok")
            busy = asyncio.create_task(get(c, srv.target))  # on the same connection
            await asyncio.wait_for(_nth_request(srv, 2), 5)
            c.drop(srv.target)
            go.set()
            assert await busy == (200, b"ok")
            await until(lambda: srv.gone == 1, what="the connection to be closed")
            assert srv.connections == 1

    run(main())


async def _nth_request(srv: Raw, n: int) -> None:
    while len(srv.requests) < n:
        srv.request_seen.clear()
        await srv.request_seen.wait()


def test_idle_connection_is_closed_after_the_keep_alive_timeout() -> None:
    async def main() -> None:
        async with raw(answer(OK)) as srv, client(keepalive_timeout=0.2) as c:
            assert await get(c, srv.target) == (200, b"ok")
            await asyncio.wait_for(srv.client_gone.wait(), 5)
            assert c.idle_connections(srv.target) == 0
            assert await get(c, srv.target) == (200, b"ok")
            assert srv.connections == 2

    run(main())


@pytest.mark.parametrize("response", [
    b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nConnection: Keep-Alive, Close\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA",
], ids=["connection-close", "close-token", "http-1.0", "bytes-beyond-the-end"])
def test_no_reuse_when_the_server_says_close_or_framing_is_off(response: bytes) -> None:
    async def main() -> None:
        async with raw(answer(response)) as srv, client() as c:
            assert await get(c, srv.target) == (200, b"ok")
            assert await get(c, srv.target) == (200, b"ok")
            assert srv.connections == 2 and c.idle_connections(srv.target) == 0

    run(main())


def test_no_reuse_after_a_partial_read_and_the_server_sees_the_close() -> None:
    async def partial(_s: Raw, _c: int, _r: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
        return True

    async def main() -> None:
        async with raw(partial) as srv, client() as c:
            resp = await c.request(srv.target, "GET", "/", timeout=5)
            assert await resp.__anext__() == b"0123456789"
            resp.close()
            await asyncio.wait_for(srv.client_gone.wait(), 5)
            assert c.idle_connections(srv.target) == 0
            with pytest.raises(UpstreamDisconnected):
                await resp.read()

    run(main())


def test_an_answer_before_the_request_was_fully_sent_does_not_leave_it_pooled() -> None:
    """A server that answers (413) without reading a large body: the rest of the request is
    still queued on the connection, which therefore cannot carry another request."""
    transports: list[asyncio.Transport] = []

    class EarlyAnswer(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = cast(asyncio.Transport, transport)  # uvloop's do not subclass it
            transports.append(transport)

        def data_received(self, data: bytes) -> None:
            self.transport.write(b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\n\r\n")
            self.transport.pause_reading()  # and read nothing more

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(EarlyAnswer, "127.0.0.1", 0)
        target = Target("127.0.0.1", server.sockets[0].getsockname()[1])
        try:
            async with client() as c:
                status, _ = await get(c, target, method="POST", body=b"x" * (32 << 20))
                assert status == 413 and c.idle_connections(target) == 0
        finally:
            for t in transports:
                t.close()
            server.close()
            await server.wait_closed()

    run(main())


# --- stale connections and the retry rule -------------------------------------------------------


def test_a_pooled_connection_the_server_closed_is_not_used() -> None:
    """Closed while idle, EOF already seen by the loop: a new connection, for a POST too."""
    async def once(_s: Raw, _c: int, _r: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(OK)
        await writer.drain()
        return False  # then close, as a server's idle timeout would

    async def main() -> None:
        async with raw(once) as srv, client() as c:
            assert await get(c, srv.target, method="POST", body=b"1") == (200, b"ok")
            await until(lambda: c.idle_connections(srv.target) == 0, what="the client to see EOF")
            assert await get(c, srv.target, method="POST", body=b"2") == (200, b"ok")
            assert srv.connections == 2 and len(srv.requests) == 2

    run(main())


def test_a_close_the_loop_has_not_seen_yet_is_caught_by_the_peek_before_writing() -> None:
    """The server's FIN is in the socket but the loop has not run: the POST is not written
    to the dead connection (it would be lost), it goes on a new one. (The peek is for
    connections idle for `peek_after`: here at once.)"""
    async def main() -> None:
        async with raw(answer(OK)) as srv, client(peek_after=0) as c:
            assert await get(c, srv.target, method="POST", body=b"1") == (200, b"ok")
            pool = c._pools[srv.target]
            (conn,) = pool.idle
            # The server's FIN goes out now, and the loop does not run until it has arrived.
            # (through a duplicate: uvloop's transports lend a socket that cannot shut down)
            fd = srv.writers[0].get_extra_info("socket").fileno()
            with socket.socket(fileno=os.dup(fd)) as dup:
                dup.shutdown(socket.SHUT_RDWR)
            readable, _, _ = select.select([conn.sock], [], [], 5)
            assert readable and not conn.closed  # the client has not processed the EOF
            assert await get(c, srv.target, method="POST", body=b"2") == (200, b"ok")
            assert srv.connections == 2 and len(srv.requests) == 2

    run(main())


def _drop_second_request() -> Callable[[Raw, int, bytes, asyncio.StreamWriter],
                                       Awaitable[bool]]:
    """Answer the first request on connection 0, close on its second without answering."""
    async def respond(s: Raw, conn: int, _r: bytes, writer: asyncio.StreamWriter) -> bool:
        if conn == 0 and len(s.requests) == 2:
            return False
        writer.write(OK)
        return True

    return respond


def test_an_idempotent_request_on_a_reused_connection_closed_unanswered_is_retried_once() -> None:
    async def main() -> None:
        async with raw(_drop_second_request()) as srv, client() as c:
            assert await get(c, srv.target) == (200, b"ok")
            assert await get(c, srv.target) == (200, b"ok")  # retried on a new connection
            assert srv.connections == 2 and len(srv.requests) == 3

    run(main())


def test_a_post_closed_unanswered_after_it_was_written_is_never_sent_again() -> None:
    """The server may have started the completion: a 502 beats generating twice."""
    async def main() -> None:
        async with raw(_drop_second_request()) as srv, client() as c:
            assert await get(c, srv.target, method="POST", body=b"1") == (200, b"ok")
            with pytest.raises(UpstreamDisconnected, match="without answering"):
                await get(c, srv.target, method="POST", body=b"2")
            assert srv.connections == 1 and len(srv.requests) == 2

    run(main())


def test_a_new_connection_closed_unanswered_is_not_retried() -> None:
    async def main() -> None:
        async with raw(answer(b"", keep=False)) as srv, client() as c:
            with pytest.raises(UpstreamDisconnected):
                await get(c, srv.target)
            assert srv.connections == 1

    run(main())


# --- failures -----------------------------------------------------------------------------------


def test_connection_refused_is_a_connect_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there

    async def main() -> None:
        async with client() as c:
            with pytest.raises(UpstreamConnectError, match="refused"):
                await get(c, Target("127.0.0.1", port))
            with pytest.raises(UpstreamConnectError):
                await get(c, Target(uds="/nonexistent/sovereignd-test.sock"))

    run(main())


def test_connect_timeout_when_the_listener_backlog_is_full() -> None:
    """A listener that never accepts, its backlog full: the handshake gets no answer."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(2):
            f = socket.socket()
            f.setblocking(False)
            f.connect_ex(("127.0.0.1", port))
            fillers.append(f)

        async def main() -> None:
            async with client(connect_timeout=0.3) as c:
                t0 = time.monotonic()
                with pytest.raises(TimeoutError, match="no connection"):
                    await get(c, Target("127.0.0.1", port))
                assert 0.25 < time.monotonic() - t0 < 3

        run(main())
    finally:
        for f in fillers:
            f.close()
        listener.close()


@pytest.mark.parametrize("response", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Le",
], ids=["content-length", "chunked", "head"])
def test_server_closing_mid_response_is_a_disconnect(response: bytes) -> None:
    async def main() -> None:
        async with raw(answer(response, keep=False)) as srv, client() as c:
            with pytest.raises(UpstreamDisconnected, match="in the middle"):
                await get(c, srv.target)

    run(main())


@pytest.mark.parametrize("response", [
    b"SSH-2.0-OpenSSH_9.2\r\n",
    b"HTTP/1.1 2000 OK\r\n\r\n",
    b"HTTP/2 200\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nBad Header: x\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n folded: x\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX: a\x00b\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2, 3\r\n\r\nok",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nokXX",
], ids=["not-http", "status-code", "version", "space-in-name", "obs-fold", "nul",
        "negative-length", "conflicting-length", "unknown-coding", "chunk-size",
        "chunk-end"])
def test_malformed_responses_are_protocol_errors(response: bytes) -> None:
    async def main() -> None:
        async with raw(answer(response)) as srv, client() as c:
            with pytest.raises(UpstreamProtocolError):
                await get(c, srv.target)
            assert c.idle_connections(srv.target) == 0

    run(main())


def test_a_bare_lf_between_transfer_encoding_and_content_length_is_refused() -> None:
    """The hand parser skipped the LF-ended line, Transfer-Encoding with it, and framed the
    body by Content-Length: "5\r\nhe" passed on as the body of "hello"."""
    response = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\nContent-Length: 5\r\n\r\n"
                b"5\r\nhello\r\n0\r\n\r\n")

    async def main() -> None:
        async with raw(answer(response)) as srv, client() as c:
            with pytest.raises(UpstreamProtocolError, match="head: Missing expected CR"):
                await get(c, srv.target)
            assert c.idle_connections(srv.target) == 0

    run(main())


@pytest.mark.parametrize("response", [
    b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\n\nok",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\nok\n0\n\n",
], ids=["lf-only-head", "lf-ending-the-head", "lf-only-chunk-lines"])
def test_lf_only_line_ends_are_refused_at_once_not_waited_on(response: bytes) -> None:
    """The hand parser looked for CRLF only and waited for the request's deadline (the
    gateway's upstream_timeout, 600 s); the server here holds the connection open."""
    async def main() -> None:
        async with raw(answer(response)) as srv, client() as c:
            async with asyncio.timeout(10):  # far below the request's own 600 s
                with pytest.raises(UpstreamProtocolError, match="Missing expected CR"):
                    await get(c, srv.target, timeout=600)

    run(main())


@pytest.mark.parametrize(("response", "reason"), [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok",
     "Duplicate Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nok", "Invalid character in Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"2\r\nok\r\n0\r\n\r\n", "Transfer-Encoding can't be present with Content-Length"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 7\r\n\r\n"
     b"2\r\nok\r\n0\r\n\r\n", "Content-Length can't be present with Transfer-Encoding"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"2\r\nok\r\n0\r\n\r\n", "only chunked"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
     "only chunked"),
    (b"HTTP/1.1 200 OK\r\nX-A: a\r\n b\r\nContent-Length: 2\r\n\r\nok",
     "Unexpected whitespace after header value"),
    (b"HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\nok", "Invalid header field char"),
    (b"HTTP/1.1 200 OK\r\nX: a\rb\r\nContent-Length: 2\r\n\r\nok",
     "Missing expected LF after header value"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n",
     "Content-Length overflow"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\n",
     "Chunk size overflow"),
    (b"HTTP/2.0 200 OK\r\nContent-Length: 2\r\n\r\nok", "HTTP/2.0 is not HTTP/1.x"),
    (b"HTTP/1.1 200 O\x01K\r\nContent-Length: 2\r\n\r\nok", "reason phrase"),
], ids=["duplicate-content-length", "content-length-list", "cl-then-te", "te-then-cl",
        "two-transfer-encodings", "coding-before-chunked", "obs-fold", "space-before-colon",
        "bare-cr", "length-overflow", "chunk-size-overflow", "http-2", "control-in-reason"])
def test_smuggling_shapes_are_refused_by_llhttp_or_by_us(response: bytes, reason: str) -> None:
    """Answers two readers could frame differently (RFC 9112 §6.3, §11.2) are refused with
    a reason, and the connection is not reused. (The hand parser took the first three and
    the list "2, 2".)"""
    async def main() -> None:
        async with raw(answer(response)) as srv, client() as c:
            with pytest.raises(UpstreamProtocolError, match=reason):
                await get(c, srv.target)
            assert c.idle_connections(srv.target) == 0

    run(main())


def test_a_head_that_never_ends_is_refused_once_it_passes_the_limit() -> None:
    """One header field growing without end, the connection held open: refused as soon as
    the head is over the limit (llhttp itself has no limit)."""
    async def endless(_s: Raw, _c: int, _r: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nX-Big: ")
        for _ in range(40):  # 80 KiB, in pieces
            writer.write(b"a" * 2048)
            await writer.drain()
            await asyncio.sleep(0)
        return True

    async def main() -> None:
        async with raw(endless) as srv, client(max_header_bytes=16 * 1024) as c:
            with pytest.raises(UpstreamProtocolError, match="larger than 16384"):
                await get(c, srv.target, timeout=600)

    run(main())


def test_bytes_beyond_a_head_answer_close_the_connection() -> None:
    """A HEAD answer has no body (llhttp does not know the method): bytes after its head
    answer no request."""
    async def main() -> None:
        head = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
        async with raw(answer(head + b"hello")) as srv, client() as c:
            assert await get(c, srv.target, method="HEAD") == (200, b"")
            await until(lambda: c.idle_connections(srv.target) == 0, what="the close")
            assert await get(c, srv.target, method="HEAD") == (200, b"")
            assert srv.connections == 2

    run(main())


def test_oversized_response_head_is_refused() -> None:
    head = b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 70_000 + b"\r\nContent-Length: 0\r\n\r\n"

    async def main() -> None:
        async with raw(answer(head)) as srv, client() as c:
            with pytest.raises(UpstreamProtocolError, match="larger than 65536"):
                await get(c, srv.target)
        async with raw(answer(head)) as srv, client(max_header_bytes=128 * 1024) as c:
            assert await get(c, srv.target) == (200, b"")

    run(main())


def test_total_timeout_covers_the_head_and_the_body() -> None:
    async def silent(_s: Raw, _c: int, _r: bytes, _w: asyncio.StreamWriter) -> bool:
        return True  # read the request, never answer

    async def stalls(_s: Raw, _c: int, _r: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf")
        return True

    async def main() -> None:
        for respond in (silent, stalls):
            async with raw(respond) as srv, client() as c:
                t0 = time.monotonic()
                with pytest.raises(TimeoutError):
                    await get(c, srv.target, timeout=0.3)
                assert 0.25 < time.monotonic() - t0 < 3
                await asyncio.wait_for(srv.client_gone.wait(), 5)  # and the server knows

    run(main())


def test_a_shorter_deadline_on_a_reused_connection_is_kept() -> None:
    """Deadlines are per request, though the timer belongs to the connection."""
    async def first_only(s: Raw, _c: int, _r: bytes, writer: asyncio.StreamWriter) -> bool:
        if len(s.requests) == 1:
            writer.write(OK)
        return True

    async def main() -> None:
        async with raw(first_only) as srv, client() as c:
            assert await get(c, srv.target, timeout=60) == (200, b"ok")
            t0 = time.monotonic()
            with pytest.raises(TimeoutError):
                await get(c, srv.target, timeout=0.3)
            assert 0.25 < time.monotonic() - t0 < 3 and srv.connections == 1

    run(main())


def test_cancelling_the_caller_closes_the_connection() -> None:
    """A gateway client that goes away cancels its handler: the server must see it."""
    async def streams(_s: Raw, _c: int, _r: bytes, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
                     b"Content-Type: text/event-stream\r\n\r\n9\r\ndata: 0\n\n\r\n")
        return True  # and nothing more: a long generation

    async def main() -> None:
        for during in ("body", "head"):
            respond = streams if during == "body" else answer(b"")
            async with raw(respond) as srv, client() as c:
                first = asyncio.Event()

                async def consume(target: Target = srv.target,
                                  first: asyncio.Event = first) -> None:
                    # No `async with`, no close(): the cancellation alone must do it.
                    resp = await c.request(target, "POST", "/", [], b"{}", timeout=30)
                    async for _ in resp:
                        first.set()

                task = asyncio.create_task(consume())
                if during == "body":
                    await asyncio.wait_for(first.wait(), 5)
                else:
                    await asyncio.wait_for(srv.request_seen.wait(), 5)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                await asyncio.wait_for(srv.client_gone.wait(), 5)
                assert c.idle_connections(srv.target) == 0

    run(main())


def test_unix_socket_target(tmp_path: Path) -> None:
    path = tmp_path / "vllm.sock"

    async def main() -> None:
        async with raw(answer(OK), uds=path) as srv, client() as c:
            target = Target(uds=str(path))
            assert await get(c, target) == (200, b"ok")
            assert await get(c, target) == (200, b"ok")
            assert srv.connections == 1
            assert b"\r\nHost: localhost\r\n" in srv.requests[0]
            assert b"\r\nAccept-Encoding: identity\r\n" in srv.requests[0]

    run(main())


def test_request_that_would_split_in_two_is_refused() -> None:
    target = Target("127.0.0.1", 1)
    for headers, path in [([("X", "a\r\nInjected: 1")], "/"), ([("X\r\nY", "1")], "/"),
                          ([], "/a b"), ([], "/a\nb"), ([("X", "a\0")], "/")]:
        with pytest.raises(ValueError, match="forbidden"):
            encode_request(target, "GET", path, headers, b"")
    data = encode_request(Target("::1", 8001), "GET", "/v1/models", [("Accept", "*/*")], b"")
    assert data == (b"GET /v1/models HTTP/1.1\r\nHost: [::1]:8001\r\nAccept: */*\r\n"
                    b"Accept-Encoding: identity\r\n\r\n")


def test_closed_client_refuses_and_closes_busy_connections() -> None:
    async def main() -> None:
        async with raw(answer(b"")) as srv:
            c = UpstreamClient()
            task = asyncio.create_task(get(c, srv.target))
            await asyncio.wait_for(srv.request_seen.wait(), 5)
            await c.close()
            with pytest.raises(UpstreamDisconnected):
                await task
            await asyncio.wait_for(srv.client_gone.wait(), 5)
            with pytest.raises(UpstreamError, match="closed"):
                await get(c, srv.target)

    run(main())


# --- the supervisor's probes ride the same client ----------------------------------------------


CANARY_ANSWER = (b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 14\r\n\r\n'
                 b'{"choices":[]}')


@pytest.mark.parametrize("transport", ["tcp", "uds"])
def test_probes_go_through_the_upstream_client_each_on_a_new_connection(
        transport: str, tmp_path: Path) -> None:
    """/health, the canary (key and JSON body sent) and /metrics: one connection each, so a
    hung server keeps none between probes, and the TCP port's listener is checked before
    each of them."""
    from sovereignd.process.probe import Prober

    checks: list[str] = []

    async def guard() -> None:
        checks.append("checked")

    async def main() -> None:
        uds = tmp_path / "vllm.sock" if transport == "uds" else None
        async with raw(answer(CANARY_ANSWER), uds=uds) as srv:
            prober = Prober("127.0.0.1", srv.port, str(uds) if uds else None)
            prober.guard = guard
            try:
                health = await prober.health("/health", 5)
                canary = await prober.canary("/v1/completions", {"prompt": "x"}, "k3y", 5)
                metrics = await prober.text("/metrics", 5)
            finally:
                await prober.close()
            assert health.ok and health.status == 200 and canary.ok
            assert metrics == '{"choices":[]}'
            await until(lambda: srv.gone == 3, what="each probe's connection to close")
            assert srv.connections == 3
            assert b"\r\nAuthorization: Bearer k3y\r\n" in srv.requests[1]
            assert srv.requests[1].endswith(b'\r\n\r\n{"prompt":"x"}')
            assert b"\r\nContent-Type: application/json\r\n" in srv.requests[1]
            assert checks == ([] if uds else ["checked"] * 3)  # (a Unix socket is private)

    run(main())


def test_an_impostor_on_the_port_gets_no_probe_not_even_for_metrics() -> None:
    from sovereignd.process.probe import Prober

    holder = {"pid": 4242, "uid": 1001}

    async def impostor() -> tuple[str, dict[str, Any] | None]:
        return "127.0.0.1:1 is held by a process that is not the server", holder

    async def main() -> None:
        async with raw(answer(CANARY_ANSWER)) as srv:
            prober = Prober("127.0.0.1", srv.port)
            prober.guard = impostor
            try:
                health = await prober.health("/health", 5)
                canary = await prober.canary("/v1/completions", {"prompt": "x"}, "k3y", 5)
                assert await prober.text("/metrics", 5) is None
            finally:
                await prober.close()
            for result in (health, canary):
                assert not result.ok and result.impostor == holder
                assert "not the server" in result.detail
            assert srv.connections == 0

    run(main())


def test_a_misframed_health_answer_fails_the_probe_at_once() -> None:
    from sovereignd.process.probe import Prober

    async def main() -> None:
        async with raw(answer(b"HTTP/1.1 200 OK\nContent-Length: 0\n\n")) as srv:
            prober = Prober("127.0.0.1", srv.port)
            try:
                result = await prober.health("/health", 600)
            finally:
                await prober.close()
            assert not result.ok and result.status is None
            assert result.detail.startswith("UpstreamProtocolError: malformed response head")

    run(main())
