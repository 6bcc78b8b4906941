"""A fake `Runtime` and `ProbeClient` for running the real Supervisor without a process.

Time is virtual: `VirtualTimeLoop` is an asyncio loop whose clock jumps to the next timer
whenever nothing is ready, so a 30-minute FATAL cool-down takes no real time and every
`asyncio.sleep`, `asyncio.timeout` and `Runtime.monotonic()` reads the same clock. (The
`looptime` pytest plugin does the same; this is the 30 lines of it these tests need.)

Each spawn follows a `Script`: when its /health answers, whether its canary does, when it exits
by itself and with which last lines, whether it ignores SIGTERM. Signals act on the fake
process table as the kernel would (SIGKILL ends at once, SIGTERM after `term_seconds` unless
ignored), and everything the supervisor did to processes is recorded for the tests.
"""

from __future__ import annotations

import asyncio
import itertools
import selectors
import signal
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from sovereignd.logs.serveroutput import ServerOutput
from sovereignd.process.probe import ListenerGuard, ProbeResult
from sovereignd.process.system import ProcessId

T = TypeVar("T")
EPOCH = 1_800_000_000.0  # wall clock at virtual time 0


class Deadlock(RuntimeError):
    """Nothing is ready, no timer is pending: the code under test waits for ever."""


class _VirtualSelector(selectors.DefaultSelector):
    def __init__(self, loop: VirtualTimeLoop) -> None:
        super().__init__()
        self._loop = loop

    def select(self, timeout: float | None = None) -> list[Any]:
        events: list[Any] = super().select(0)
        if events or timeout == 0:
            return events
        if timeout is None:
            raise Deadlock("the loop would wait for ever: no timer and no callback pending")
        self._loop.advance(timeout)
        return events


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop on a virtual clock that starts at 0 and moves only to the next timer."""

    def __init__(self) -> None:
        self._now = 0.0
        super().__init__(_VirtualSelector(self))

    def time(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += max(0.0, seconds)


@dataclass
class Script:
    """How one spawn of the fake server behaves; times are seconds after its spawn."""

    healthy_after: float | None = 2.0   # /health answers 200 from then on; None: never
    canary: str = "ok"                  # "ok", "fail" (HTTP 500) or "reject" (HTTP 400)
    canary_seconds: float = 0.002       # time the canary takes to answer (a timeout past it)
    exit_after: float | None = None     # exits by itself then, with exit_code; None: never
    exit_code: int = 1
    last_lines: tuple[str, ...] = ()    # written to stderr just before it exits by itself
    ignores_sigterm: bool = False
    term_seconds: float = 0.5           # time from SIGTERM to exit when not ignored
    workers: int = 1                    # further processes in its group (EngineCore, ...)
    spawn_error: OSError | None = None  # the program cannot be started at all


@dataclass
class FakeProcess:
    ident: ProcessId
    pgid: int
    name: str
    leader: bool
    alive: bool = True
    code: int | None = None


@dataclass
class FakeServer:
    """One spawn: its script (tests may change it while it runs), processes and exit."""

    script: Script
    argv: list[str]
    started: float
    leader: FakeProcess
    workers: list[FakeProcess]
    exited: asyncio.Future[int]
    output: ServerOutput
    signals: list[int] = field(default_factory=list)  # signals received by the leader

    @property
    def pid(self) -> int:
        return self.leader.ident.pid

    @property
    def running(self) -> bool:
        return self.leader.alive

    @property
    def signalled(self) -> list[int]:
        """The signals the main process got, in order, each once (a stop sends SIGTERM both
        to the group and to the process)."""
        return list(dict.fromkeys(int(s) for s in self.signals))

    async def output_closed(self, timeout: float) -> None:
        return None


class _Watch:
    def __init__(self, runtime: FakeRuntime, on_exit: Callable[[ProcessId], None]) -> None:
        self._runtime, self._on_exit = runtime, on_exit
        self._closed = False

    def watch(self, ident: ProcessId) -> None:
        """As ExitWatch: a process already gone is reported at once."""
        if self._closed:
            return
        if self._runtime.is_alive(ident):
            self._runtime.watchers.append((ident, self))
        else:
            self._runtime.loop.call_soon(self.ended, ident)

    def ended(self, ident: ProcessId) -> None:
        if not self._closed:
            self._on_exit(ident)

    def close(self) -> None:
        self._closed = True


class FakeRuntime:
    """A process table in memory, driven by scripts, on the loop's virtual clock."""

    def __init__(self, loop: VirtualTimeLoop, *scripts: Script,
                 default: Script | None = None) -> None:
        self.loop = loop
        self.scripts: deque[Script] = deque(scripts)
        self.default = default or Script()
        self.servers: list[FakeServer] = []
        self.procs: dict[int, FakeProcess] = {}
        self.watchers: list[tuple[ProcessId, _Watch]] = []
        self._pids = itertools.count(4000)

    # --- clock ----------------------------------------------------------------------------------

    def monotonic(self) -> float:
        return self.loop.time()

    def wall(self) -> float:
        return EPOCH + self.loop.time()

    # --- spawning -------------------------------------------------------------------------------

    async def spawn(self, argv: list[str], env: dict[str, str], cwd: Path | None,
                    output: ServerOutput) -> FakeServer:
        script = replace(self.scripts.popleft() if self.scripts else self.default)
        if script.spawn_error is not None:
            raise script.spawn_error
        leader = self._process(None, argv[0])
        workers = [self._process(leader.ident.pid, f"VLLM::Worker_{i}")
                   for i in range(script.workers)]
        server = FakeServer(script, argv, self.loop.time(), leader, workers,
                            self.loop.create_future(), output)
        self.servers.append(server)
        if script.exit_after is not None:
            self.loop.call_later(script.exit_after, self._exits_by_itself, server)
        return server

    def _process(self, pgid: int | None, name: str) -> FakeProcess:
        pid = next(self._pids)
        proc = FakeProcess(ProcessId(pid, self.wall(), 1000), pgid or pid, name, pgid is None)
        self.procs[pid] = proc
        return proc

    def _exits_by_itself(self, server: FakeServer) -> None:
        if not server.leader.alive:
            return
        for line in server.script.last_lines:
            server.output.line("stderr", server.pid, line)
        self._end(server.leader, server.script.exit_code)

    def _end(self, proc: FakeProcess, code: int) -> None:
        if not proc.alive:
            return
        proc.alive, proc.code = False, code
        for server in self.servers:
            if server.leader is proc and not server.exited.done():
                server.exited.set_result(code)
        for ident, watch in list(self.watchers):
            if ident.pid == proc.ident.pid:
                self.loop.call_soon(watch.ended, ident)

    def crash_worker(self, server: FakeServer, code: int = -9) -> None:
        """A process of the server other than the main one dies (the OOM killer's work)."""
        self._end(server.workers[0], code)

    @property
    def current(self) -> FakeServer | None:
        """The last server spawned, if its main process still runs."""
        return self.servers[-1] if self.servers and self.servers[-1].running else None

    def alive(self) -> list[FakeProcess]:
        return [p for p in self.procs.values() if p.alive]

    # --- lookups and signals (system.py's contracts) --------------------------------------------

    async def to_thread(self, func: Callable[..., T], /, *args: Any) -> T:
        return func(*args)

    def exit_watch(self, on_exit: Callable[[ProcessId], None]) -> _Watch:
        return _Watch(self, on_exit)

    def identify(self, pid: int) -> ProcessId | None:
        proc = self.procs.get(pid)
        return proc.ident if proc is not None and proc.alive else None

    def is_alive(self, ident: ProcessId) -> bool:
        return self.identify(ident.pid) == ident

    def describe(self, pid: int) -> str:
        proc = self.procs.get(pid)
        return proc.name if proc is not None and proc.alive else "?"

    def group_members(self, pgid: int, uid: int | None = None,
                      not_before: float | None = None) -> list[ProcessId]:
        return [p.ident for p in self.alive() if p.pgid == pgid
                and (uid is None or p.ident.uid == uid)
                and (not_before is None or p.ident.create_time >= not_before - 1.0)]

    def descendants(self, pid: int) -> list[ProcessId]:
        return [p.ident for p in self.alive() if p.pgid == pid and not p.leader]

    def signal_group(self, pgid: int, signum: int) -> bool:
        members = [p for p in self.alive() if p.pgid == pgid]
        for proc in members:
            self._deliver(proc, signum)
        return bool(members)

    def signal_process(self, ident: ProcessId, signum: int) -> bool:
        if not self.is_alive(ident):
            return False
        self._deliver(self.procs[ident.pid], signum)
        return True

    def _deliver(self, proc: FakeProcess, signum: int) -> None:
        server = next(s for s in self.servers if proc in (s.leader, *s.workers))
        if proc.leader:
            server.signals.append(signum)
        if signum == signal.SIGKILL:
            self._end(proc, -signal.SIGKILL)
        elif signum == signal.SIGTERM and not server.script.ignores_sigterm:
            self.loop.call_later(server.script.term_seconds, self._end, proc, 0)

    def shared_memory(self, pid: int) -> set[str]:
        return set()

    def remove_shared_memory(self, names: set[str], uid: int) -> list[str]:
        return []


class FakeProbes:
    """The supervisor's probes, answered from the fake server's script at the virtual time.

    `tokens`: vLLM's token counter as its internal /metrics shows it (None: no counters, as a
    server other than vLLM); tests move it to show progress the gateway does not see."""

    def __init__(self, runtime: FakeRuntime) -> None:
        self.runtime = runtime
        self.guard: ListenerGuard | None = None
        self.canaries = 0
        self.tokens: float | None = None
        self.metrics_reads = 0
        self.metrics_seconds = 0.0  # time /metrics takes to answer (a loaded host)

    def _server(self) -> FakeServer | None:
        return self.runtime.current

    async def health(self, path: str, timeout: float) -> ProbeResult:
        server = self._server()
        if server is None:
            return ProbeResult("health", False, 0.0, "ConnectionRefusedError")
        after = server.script.healthy_after
        if after is None or self.runtime.loop.time() < server.started + after:
            return ProbeResult("health", False, 0.0, "ConnectionRefusedError")
        return ProbeResult("health", True, 0.001, "", 200)

    async def canary(self, path: str, body: dict[str, Any], key: str,
                     timeout: float) -> ProbeResult:
        self.canaries += 1
        health = await self.health(path, timeout)
        if not health.ok:
            return ProbeResult("canary", False, 0.0, health.detail)
        script = self._server().script  # type: ignore[union-attr]
        if script.canary_seconds > timeout:  # as Prober: the client gives up at the timeout
            await asyncio.sleep(timeout)
            return ProbeResult("canary", False, timeout, f"no answer within {timeout:g}s")
        await asyncio.sleep(script.canary_seconds)
        if self._server() is None:  # the server went while the canary waited
            return ProbeResult("canary", False, script.canary_seconds, "ConnectionResetError")
        mode = script.canary
        if mode == "reject":
            return ProbeResult("canary", False, 0.001, 'HTTP 400: {"error":"no template"}', 400)
        if mode == "fail":
            return ProbeResult("canary", False, script.canary_seconds,
                               "HTTP 500: engine dead", 500)
        return ProbeResult("canary", True, script.canary_seconds, "", 200)

    async def text(self, path: str, timeout: float) -> str | None:
        """vLLM's /metrics (the families the stall watch reads), when `tokens` is set."""
        if self._server() is None or self.tokens is None or path != "/metrics":
            return None
        self.metrics_reads += 1
        await asyncio.sleep(min(self.metrics_seconds, timeout))
        return ("# HELP vllm:generation_tokens_total Number of generation tokens processed.\n"
                "# TYPE vllm:generation_tokens_total counter\n"
                f'vllm:generation_tokens_total{{model_name="m"}} {self.tokens}\n'
                "# TYPE vllm:num_requests_running gauge\n"
                'vllm:num_requests_running{model_name="m"} 1.0\n')

    async def close(self) -> None:
        return None
