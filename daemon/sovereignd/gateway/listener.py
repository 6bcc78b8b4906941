"""The gateway's accept loop: connection caps and descriptor exhaustion handled where they
happen, so a flood of idle connections can never starve supervision of file descriptors.

Why our own loop: neither asyncio's nor uvloop's server caps connections, and on EMFILE the
standard loop reports every failed accept through the loop's exception handler ("socket.accept()
out of system resource", asyncio/selector_events.py) while uvloop's libuv silently accepts and
closes the waiting connections (libuv `uv__emfile_trick`, seen here: the listener survives, the
clients get resets, nothing is logged). Here:

- connections beyond `max_total`, or beyond `max_per_address` from one client address, are
  answered `503` with `Retry-After` and closed at once (nginx's `limit_conn` answers 503);
- EMFILE/ENFILE/ENOBUFS/ENOMEM from accept() is temporary: accepting pauses for a moment and
  resumes; one summarised `descriptors_exhausted` event is written, nothing else notices;
- accepted sockets go to the aiohttp server through `loop.connect_accepted_socket`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import ssl
from collections.abc import Callable

from sovereignd.logs.summary import Summarised

# Failures of accept() that mean "out of resources for now", as asyncio's selector loop
# treats them (asyncio/selector_events.py `_accept_connection`).
_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
ACCEPT_BACKOFF = 0.5   # seconds accept pauses after running out of descriptors
ACCEPT_BATCH = 128     # connections taken per readiness event before yielding to the loop
_REFUSAL_BODY = (b'{"error": {"message": "too many connections", "type": "server_error", '
                 b'"param": null, "code": "too_many_connections"}}')
REFUSAL = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
           b"Retry-After: 1\r\nConnection: close\r\nContent-Length: "
           + str(len(_REFUSAL_BODY)).encode() + b"\r\n\r\n" + _REFUSAL_BODY)


class _Counted(asyncio.Protocol):
    """Passes everything to the real protocol; gives the connection's slot back at its end."""

    def __init__(self, inner: asyncio.Protocol, release: Callable[[], None]) -> None:
        self.inner, self._release = inner, release

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._release()
        self.inner.connection_lost(exc)


class Listener:
    """Accepts on one TCP socket, within the caps, and hands connections to `factory`."""

    def __init__(self, sock: socket.socket, factory: Callable[[], asyncio.Protocol], *,
                 max_total: int, max_per_address: int, ssl_context: ssl.SSLContext | None,
                 refused: Summarised, exhausted: Summarised) -> None:
        self.sock = sock
        self.factory = factory
        self.max_total, self.max_per_address = max_total, max_per_address
        self.ssl_context = ssl_context
        self.refused, self.exhausted = refused, exhausted
        self.open = 0
        self.by_address: dict[str, int] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._resume: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.sock.setblocking(False)
        self._loop.add_reader(self.sock.fileno(), self._accept)

    def close(self) -> None:
        """Stop accepting and close the listening socket (open connections stay)."""
        if self._closed:
            return
        self._closed = True
        if self._resume is not None:
            self._resume.cancel()
        if self._loop is not None:
            self._loop.remove_reader(self.sock.fileno())
        self.sock.close()
        for task in self._tasks:
            task.cancel()

    def _accept(self) -> None:
        assert self._loop is not None
        for _ in range(ACCEPT_BATCH):
            try:
                conn, addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _EXHAUSTED:
                    self._pause(exc)
                return  # ECONNABORTED and the like: that one connection is gone
            host = addr[0] if isinstance(addr, tuple) else str(addr)
            if self.open >= self.max_total or \
                    self.by_address.get(host, 0) >= self.max_per_address:
                self._refuse(conn, host)
                continue
            self.open += 1
            self.by_address[host] = self.by_address.get(host, 0) + 1
            task = self._loop.create_task(self._serve(conn, host))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _serve(self, conn: socket.socket, host: str) -> None:
        assert self._loop is not None
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._release(host)

        try:
            await self._loop.connect_accepted_socket(
                lambda: _Counted(self.factory(), release), conn, ssl=self.ssl_context)
        except (OSError, ssl.SSLError, asyncio.CancelledError, TimeoutError):
            release()  # a failed TLS handshake or a client gone before it began
            with contextlib.suppress(OSError):
                conn.close()

    def _release(self, host: str) -> None:
        self.open -= 1
        left = self.by_address.get(host, 1) - 1
        if left:
            self.by_address[host] = left
        else:
            self.by_address.pop(host, None)

    def _refuse(self, conn: socket.socket, host: str) -> None:
        why = "total" if self.open >= self.max_total else "per_address"
        with contextlib.suppress(OSError):
            conn.setblocking(False)
            if self.ssl_context is None:  # a TLS client could not read a plain answer
                conn.send(REFUSAL)
        conn.close()
        self.refused.note(f"{host}/{why}", remote=host, limit=why, open=self.open,
                          max_total=self.max_total, max_per_address=self.max_per_address)

    def _pause(self, exc: OSError) -> None:
        assert self._loop is not None
        self._loop.remove_reader(self.sock.fileno())
        self.exhausted.note("accept", error=errno.errorcode.get(exc.errno or 0, str(exc)),
                            open=self.open, backoff_s=ACCEPT_BACKOFF)
        self._resume = self._loop.call_later(ACCEPT_BACKOFF, self._resume_accepting)

    def _resume_accepting(self) -> None:
        self._resume = None
        if not self._closed and self._loop is not None:
            self._loop.add_reader(self.sock.fileno(), self._accept)
