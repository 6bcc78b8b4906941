"""Notice the end of processes that are not our children (the server's EngineCore, Worker) the
moment it happens.

On Linux a pidfd (`os.pidfd_open`, Linux 5.3; pidfd_open(2): "the file descriptor becomes
readable when the process terminates") is registered with the event loop's `add_reader`: no
polling, no CPU while nothing dies. Elsewhere (macOS) the processes are looked at every
`POLL_INTERVAL` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable

from sovereignd.process import system

POLL_INTERVAL = 1.0  # the fallback's period, where pidfds do not exist


class ExitWatch:
    """Calls `on_exit(ident)` once for each watched process that ends (on the loop)."""

    def __init__(self, on_exit: Callable[[system.ProcessId], None]) -> None:
        self._loop = asyncio.get_running_loop()
        self._on_exit = on_exit
        self._fds: dict[int, system.ProcessId] = {}
        self._polled: dict[int, system.ProcessId] = {}
        self._poller: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def watched(self) -> list[system.ProcessId]:
        return [*self._fds.values(), *self._polled.values()]

    def watch(self, ident: system.ProcessId) -> None:
        """Start watching one process; if it is already gone, report it at once."""
        if self._closed or any(i.pid == ident.pid for i in self.watched):
            return
        fd = _pidfd(ident.pid)
        if fd is None:
            self._polled[ident.pid] = ident
            if self._poller is None:
                self._poller = self._loop.create_task(self._poll(), name="exit-poll")
            return
        # The pid may have been reused between identify and pidfd_open: check it is still
        # the same process now that the fd pins it.
        if not system.is_alive(ident):
            os.close(fd)
            self._loop.call_soon(self._on_exit, ident)
            return
        self._fds[fd] = ident
        self._loop.add_reader(fd, self._readable, fd)

    def _readable(self, fd: int) -> None:
        ident = self._fds.pop(fd, None)
        self._loop.remove_reader(fd)
        os.close(fd)
        if ident is not None and not self._closed:
            self._on_exit(ident)

    async def _poll(self) -> None:
        while self._polled:
            await asyncio.sleep(POLL_INTERVAL)  # the fallback only: no pidfd on this system
            for pid, ident in list(self._polled.items()):
                if not system.is_alive(ident):
                    del self._polled[pid]
                    if not self._closed:
                        self._on_exit(ident)
        self._poller = None

    def close(self) -> None:
        """Stop watching everything (idempotent)."""
        self._closed = True
        for fd in list(self._fds):
            self._loop.remove_reader(fd)
            os.close(fd)
        self._fds.clear()
        self._polled.clear()
        if self._poller is not None:
            self._poller.cancel()
            self._poller = None


def _pidfd(pid: int) -> int | None:
    """A pidfd for `pid`, or None where the system has none (or the process is gone)."""
    opener = getattr(os, "pidfd_open", None)
    if opener is None:
        return None
    with contextlib.suppress(OSError):
        fd: int = opener(pid)
        return fd
    return None
