"""The supervisor's one seam to the operating system: spawning, finding and signalling
processes, and the clock.

`Runtime` is what the supervisor and `ServerProcess` call instead of `subprocess`, `os.kill`,
psutil or `time.monotonic`; `OS_RUNTIME` is the real one, built from `system` (find, identify,
signal), `subprocess.Popen` with a reaper thread, the event loop's pipe readers, `ExitWatch`
and `time.monotonic`. Tests pass a fake one (tests/fakes/fake_runtime.py) to run the real
supervisor without a process, the pattern of watchdog's `PollingEmitter(stat=, listdir=)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

from sovereignd.logs.serveroutput import ServerOutput
from sovereignd.process import system
from sovereignd.process.exitwatch import ExitWatch

T = TypeVar("T")


class Child(Protocol):
    """A spawned server's main process, as the runtime reports it."""

    @property
    def pid(self) -> int: ...

    @property
    def exited(self) -> asyncio.Future[int]:
        """Resolves to the exit status (negative: killed by that signal) when the process ends."""
        ...

    async def output_closed(self, timeout: float) -> None:
        """Wait up to `timeout` seconds for stdout and stderr to deliver their last lines."""
        ...


class ExitWatcher(Protocol):
    """Calls its callback once for each watched process that ends (see `ExitWatch`)."""

    def watch(self, ident: system.ProcessId) -> None: ...

    def close(self) -> None: ...


class Runtime(Protocol):
    """Spawning, process lookup, signals and the clock, as the supervisor uses them.

    Lookup and signal methods have the contracts of the functions of the same name in
    `system`; `spawn` raises OSError (FileNotFoundError, PermissionError) as Popen does."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (deadlines, uptimes)."""
        ...

    def wall(self) -> float:
        """Seconds since the epoch (timestamps shown to people)."""
        ...

    async def spawn(self, argv: list[str], env: dict[str, str], cwd: Path | None,
                    output: ServerOutput) -> Child:
        """Start `argv` in a new session (its own process group), stdin closed, each line of
        stdout and stderr sent to `output`."""
        ...

    async def to_thread(self, func: Callable[..., T], /, *args: Any) -> T:
        """Run a blocking lookup (reads of /proc, psutil) off the event loop."""
        ...

    def exit_watch(self, on_exit: Callable[[system.ProcessId], None]) -> ExitWatcher: ...

    def identify(self, pid: int) -> system.ProcessId | None: ...

    def is_alive(self, ident: system.ProcessId) -> bool: ...

    def describe(self, pid: int) -> str: ...

    def group_members(self, pgid: int, uid: int | None = None,
                      not_before: float | None = None) -> list[system.ProcessId]: ...

    def descendants(self, pid: int) -> list[system.ProcessId]: ...

    def signal_group(self, pgid: int, signum: int) -> bool: ...

    def signal_process(self, ident: system.ProcessId, signum: int) -> bool: ...

    def shared_memory(self, pid: int) -> set[str]: ...

    def remove_shared_memory(self, names: set[str], uid: int) -> list[str]: ...


class _LinePipe(asyncio.Protocol):
    """Splits a pipe's bytes into lines (\\n or \\r, for progress bars) for ServerOutput."""

    def __init__(self, stream: str, pid: int, output: ServerOutput) -> None:
        self.stream, self.pid, self.output = stream, pid, output
        self._buf = b""
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self._buf += data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        *lines, self._buf = self._buf.split(b"\n")
        for raw in lines:
            if raw.strip():
                self.output.line(self.stream, self.pid, raw.decode("utf-8", "replace"))
        if len(self._buf) > 64 * 1024:  # a line without end: store what we have
            self.output.line(self.stream, self.pid, self._buf.decode("utf-8", "replace"))
            self._buf = b""

    def connection_lost(self, exc: Exception | None) -> None:
        if self._buf.strip():
            self.output.line(self.stream, self.pid, self._buf.decode("utf-8", "replace"))
        self._buf = b""
        if not self.closed.done():
            self.closed.set_result(None)


class _OsChild:
    """A Popen whose exit is noticed by a reaper thread, not by asyncio's `Process.wait()`,
    which on Python 3.11 also waits for the pipes to close: an orphaned `VLLM::EngineCore`
    keeps them open, so the server's death would go unnoticed."""

    def __init__(self, popen: subprocess.Popen[bytes], exited: asyncio.Future[int]) -> None:
        self._popen = popen
        self._exited = exited
        self.pipes: list[_LinePipe] = []

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def exited(self) -> asyncio.Future[int]:
        return self._exited

    async def output_closed(self, timeout: float) -> None:
        pending = [p.closed for p in self.pipes if not p.closed.done()]
        if pending:
            await asyncio.wait(pending, timeout=timeout)

    @staticmethod
    def reap(loop: asyncio.AbstractEventLoop, popen: subprocess.Popen[bytes],
             fut: asyncio.Future[int]) -> None:
        code = popen.wait()

        def deliver() -> None:
            if not fut.done():
                fut.set_result(code)

        with contextlib.suppress(RuntimeError):  # loop closed: nobody is waiting any more
            loop.call_soon_threadsafe(deliver)


class OsRuntime:
    """The real runtime: this machine's processes, signals and monotonic clock."""

    def monotonic(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()

    async def spawn(self, argv: list[str], env: dict[str, str], cwd: Path | None,
                    output: ServerOutput) -> Child:
        loop = asyncio.get_running_loop()
        # Popen, not asyncio's subprocess: exit is watched by a reaper thread (see _OsChild);
        # fork/exec takes a millisecond, which the loop can afford.
        popen = subprocess.Popen(  # noqa: ASYNC220
            argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, start_new_session=True, close_fds=True)
        child = _OsChild(popen, loop.create_future())
        threading.Thread(target=_OsChild.reap, args=(loop, popen, child.exited),
                         name=f"reap-{popen.pid}", daemon=True).start()
        for name, pipe in (("stdout", popen.stdout), ("stderr", popen.stderr)):
            proto = _LinePipe(name, popen.pid, output)
            await loop.connect_read_pipe(lambda p=proto: p, pipe)  # type: ignore[misc]
            child.pipes.append(proto)
        return child

    async def to_thread(self, func: Callable[..., T], /, *args: Any) -> T:
        return await asyncio.to_thread(func, *args)

    def exit_watch(self, on_exit: Callable[[system.ProcessId], None]) -> ExitWatcher:
        return ExitWatch(on_exit)

    def identify(self, pid: int) -> system.ProcessId | None:
        return system.identify(pid)

    def is_alive(self, ident: system.ProcessId) -> bool:
        return system.is_alive(ident)

    def describe(self, pid: int) -> str:
        return system.describe(pid)

    def group_members(self, pgid: int, uid: int | None = None,
                      not_before: float | None = None) -> list[system.ProcessId]:
        return system.group_members(pgid, uid, not_before)

    def descendants(self, pid: int) -> list[system.ProcessId]:
        return system.descendants(pid)

    def signal_group(self, pgid: int, signum: int) -> bool:
        return system.signal_group(pgid, signum)

    def signal_process(self, ident: system.ProcessId, signum: int) -> bool:
        return system.signal_process(ident, signum)

    def shared_memory(self, pid: int) -> set[str]:
        return system.shared_memory(pid)

    def remove_shared_memory(self, names: set[str], uid: int) -> list[str]:
        return system.remove_shared_memory(names, uid)


OS_RUNTIME: Runtime = OsRuntime()
