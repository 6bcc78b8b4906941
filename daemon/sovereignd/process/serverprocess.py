"""The model server as a child process: spawn it in its own process group, watch it, stop it
without leaving a single process behind.

Spawning, lookups, signals and the clock go through a `runtime.Runtime` (the real one by
default; exit is detected there by waiting on the pid in a thread). Stop is SIGTERM to the
group, a grace period, SIGKILL to the group and to every remembered descendant, then a check
that none survived (gunicorn `stop()`, supervisor `kill()` with `-pid`).

A server whose main process has exited has nothing left to drain: what remains of it
(EngineCore, Worker, the resource tracker: vllm issue 55510) is killed at once, and the
shared-memory segments and semaphores its processes had mapped are removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from sovereignd.errors import SovereigndError
from sovereignd.fsutil import atomic_write
from sovereignd.logs.files import dumps
from sovereignd.logs.serveroutput import ServerOutput
from sovereignd.process import system
from sovereignd.process.runtime import OS_RUNTIME, Child, ExitWatcher, Runtime

KILL_WAIT = 5.0  # after SIGKILL the kernel needs only moments; longer means unkillable (D state)
KILL_POLL = 0.005  # look this often for killed processes to be gone (the respawn waits on it)


class SpawnError(SovereigndError):
    """The server program could not be started at all (not found, not executable)."""


@dataclass
class StopReport:
    """What stopping the server's process group took."""

    graceful: bool
    seconds: float
    signalled: list[dict[str, object]] = field(default_factory=list)
    killed: list[dict[str, object]] = field(default_factory=list)
    survivors: list[dict[str, object]] = field(default_factory=list)
    shm_removed: list[str] = field(default_factory=list)


class ServerProcess:
    """One run of the model server: its process group, output and identity."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path | None,
                 output: ServerOutput,
                 on_members: Callable[[ServerProcess], None] | None = None, *,
                 runtime: Runtime = OS_RUNTIME) -> None:
        self.argv = argv
        self.env = env
        self.cwd = cwd
        self.output = output
        self.runtime = runtime
        self._on_members = on_members
        self._child: Child | None = None
        self.pid = 0
        self.leader: system.ProcessId | None = None
        self.started = 0.0        # monotonic
        self.started_wall = 0.0   # epoch seconds
        self.exited: asyncio.Future[int] | None = None
        self.tracked: dict[int, system.ProcessId] = {}
        self.shm: set[str] = set()  # shared memory seen mapped by this run's processes
        self.names: dict[int, str] = {}  # process titles of the watched processes
        self._exits: ExitWatcher | None = None

    async def start(self) -> None:
        """Spawn the server in a new session (its own process group) and start watching it."""
        rt = self.runtime
        try:
            self._child = await rt.spawn(self.argv, self.env, self.cwd, self.output)
        except FileNotFoundError as exc:
            raise SpawnError(f"cannot start the server: {self.argv[0]!r} was not found "
                             "(set server.command to the full path, or server.venv)") from exc
        except PermissionError as exc:
            raise SpawnError(f"cannot start the server: {self.argv[0]!r} is not executable "
                             "by the service account") from exc
        except OSError as exc:
            raise SpawnError(f"cannot start the server: {exc.strerror or exc}") from exc
        self.pid = self._child.pid
        self.started = rt.monotonic()
        self.started_wall = rt.wall()
        self.leader = rt.identify(self.pid) or system.ProcessId(
            self.pid, self.started_wall, os.getuid())
        self.tracked = {self.pid: self.leader}
        self.exited = self._child.exited

    @property
    def pgid(self) -> int:
        return self.pid

    @property
    def running(self) -> bool:
        return self.exited is not None and not self.exited.done()

    def returncode(self) -> int | None:
        if self.exited is not None and self.exited.done():
            return self.exited.result()
        return None

    def refresh_members(self) -> bool:
        """Remember the server's current descendants (they may later escape the group or be
        re-parented); True if the set changed."""
        if self.leader is None:
            return False
        changed = False
        for ident in self.runtime.descendants(self.pid) + self.runtime.group_members(
                self.pgid, self.leader.uid, self.leader.create_time):
            if ident.pid not in self.tracked:
                self.tracked[ident.pid] = ident
                changed = True
        if changed and self._on_members is not None:
            self._on_members(self)
        return changed

    def members(self) -> list[system.ProcessId]:
        """Every live process of this run: remembered descendants plus the group's members."""
        found: dict[int, system.ProcessId] = {}
        for ident in self.tracked.values():
            if self.runtime.is_alive(ident):
                found[ident.pid] = ident
        if self.leader is not None:
            for ident in self.runtime.group_members(self.pgid, self.leader.uid,
                                                    self.leader.create_time):
                found.setdefault(ident.pid, ident)
        return list(found.values())

    def remember_shared_memory(self, members: list[system.ProcessId] | None = None) -> None:
        """Note the /dev/shm segments this run's processes have mapped (blocking; Linux)."""
        for m in self.members() if members is None else members:
            self.shm |= self.runtime.shared_memory(m.pid)

    def watch_exits(self, on_death: Callable[[system.ProcessId], None]) -> None:
        """Call `on_death` the moment any remembered process other than the main one ends
        (the main process's end is `exited`)."""
        if self._exits is None:
            self._exits = self.runtime.exit_watch(on_death)
        for ident in self.tracked.values():
            if ident.pid != self.pid:
                self.names.setdefault(ident.pid, self.runtime.describe(ident.pid))
                self._exits.watch(ident)

    async def wait_output_closed(self, timeout: float) -> None:
        """Give the output pipes a moment to deliver a dying server's last lines."""
        if self._child is not None:
            await self._child.output_closed(timeout)

    async def stop(self, grace: float) -> StopReport:
        """SIGTERM the group, wait up to `grace`, SIGKILL what is left, verify none survive,
        remove the run's shared memory. A server whose main process has exited (or a grace of
        0) is killed at once: nothing is left to drain."""
        rt = self.runtime
        t0 = rt.monotonic()
        if self._exits is not None:
            self._exits.close()  # deaths from here on are ours
        report = StopReport(graceful=True, seconds=0.0)
        if not self.running or grace <= 0:
            # Nothing to drain: SIGKILL at once. If the main process is gone, every moment
            # spent here delays the respawn: names and shared memory were noted at READY.
            members = await rt.to_thread(self.members)
            if self.running or not self.shm:  # alive, or died before READY: look now
                await rt.to_thread(self.remember_shared_memory, members)
            self._kill(members)
            names = {m.pid: self.names.get(m.pid) or rt.describe(m.pid) for m in members}
            report.signalled = [{"pid": m.pid, "name": names[m.pid]} for m in members]
            report.killed = list(report.signalled)
            report.graceful = not members
            remaining = await self._wait_killed(members, rt.monotonic() + KILL_WAIT)
        else:
            await rt.to_thread(self.refresh_members)
            members = await rt.to_thread(self.members)
            names = {m.pid: rt.describe(m.pid) for m in members}
            await rt.to_thread(self.remember_shared_memory, members)
            if members:
                report.signalled = [{"pid": m.pid, "name": names[m.pid]} for m in members]
                rt.signal_group(self.pgid, system.SIGTERM)
                for m in members:
                    rt.signal_process(m, system.SIGTERM)
            remaining = await self._wait_gone(members, t0 + grace)
            if remaining:
                report.graceful = False
                self._kill(remaining)
                report.killed = [{"pid": m.pid, "name": names.get(m.pid, "?")}
                                 for m in remaining]
                remaining = await self._wait_killed(remaining, rt.monotonic() + KILL_WAIT)
        report.survivors = [{"pid": m.pid, "name": names.get(m.pid, "?")} for m in remaining]
        if not remaining and self.shm and self.leader is not None:
            report.shm_removed = await rt.to_thread(rt.remove_shared_memory, self.shm,
                                                    self.leader.uid)
        await self.wait_output_closed(0.5)
        report.seconds = rt.monotonic() - t0
        return report

    def _kill(self, members: list[system.ProcessId]) -> None:
        """SIGKILL the group and each remembered process (also those that left the group)."""
        self.runtime.signal_group(self.pgid, system.SIGKILL)
        for m in members:
            self.runtime.signal_process(m, system.SIGKILL)

    async def _wait_killed(self, members: list[system.ProcessId],
                           deadline: float) -> list[system.ProcessId]:
        """After SIGKILL: wait for each end as an event (pidfds; the respawn waits on this),
        then look once more, the group included; what is still alive by `deadline`."""
        left = {m.pid for m in members}
        gone = asyncio.Event()

        def ended(ident: system.ProcessId) -> None:
            left.discard(ident.pid)
            if not left:
                gone.set()

        watch = self.runtime.exit_watch(ended)
        for m in members:
            watch.watch(m)
        if left:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, deadline - self.runtime.monotonic())):
                    await gone.wait()
        watch.close()
        return await self._wait_gone(members, deadline, KILL_POLL)

    async def _wait_gone(self, members: list[system.ProcessId], deadline: float,
                         poll: float = 0.05) -> list[system.ProcessId]:
        # The leader's exit is an event; its descendants are not our children, so their end
        # can only be observed by looking, a few times a second, until the deadline.
        alive = members
        while True:
            alive = [m for m in alive if self.runtime.is_alive(m)]
            if self.leader is not None:
                extra = [m for m in self.runtime.group_members(
                             self.pgid, self.leader.uid, self.leader.create_time)
                         if m.pid not in {a.pid for a in alive}]
                alive += extra
            if not alive or self.runtime.monotonic() >= deadline:
                return alive
            wait = min(poll, max(0.0, deadline - self.runtime.monotonic()))
            if self.exited is not None and not self.exited.done():
                await asyncio.wait([self.exited], timeout=wait)
            else:
                await asyncio.sleep(wait)


# --- pidfile ------------------------------------------------------------------------------------


def write_pidfile(path: Path, server: ServerProcess) -> None:
    """Record the running server's group and members, so a restarted daemon can clean up."""
    assert server.leader is not None
    record = {"daemon_pid": os.getpid(), "pgid": server.pgid, "leader": server.leader.as_dict(),
              "members": [m.as_dict() for m in server.tracked.values()],
              "argv0": server.argv[0], "written_at": time.time()}
    atomic_write(path, dumps(record) + b"\n", mode=0o644)


def read_pidfile(path: Path) -> dict[str, object] | None:
    """The recorded server, None if there is no pidfile, {} if it is unreadable."""
    try:
        data = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, orjson.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def leftovers(record: dict[str, object],
              runtime: Runtime = OS_RUNTIME) -> list[system.ProcessId]:
    """Processes of a previous daemon's server that still run, verified by pid, start time and
    uid: the remembered members that are still the same processes, and processes in the
    recorded group owned by the same uid that started after the recorded leader."""
    found: dict[int, system.ProcessId] = {}
    leader = record.get("leader")
    members = record.get("members")
    pgid = record.get("pgid")
    if not isinstance(leader, dict) or not isinstance(pgid, int):
        return []
    try:
        lead = system.ProcessId(int(leader["pid"]), float(leader["create_time"]),
                               int(leader["uid"]))
    except (KeyError, TypeError, ValueError):
        return []
    for m in [leader, *(members if isinstance(members, list) else [])]:
        try:
            ident = system.ProcessId(int(m["pid"]), float(m["create_time"]), int(m["uid"]))
        except (KeyError, TypeError, ValueError):
            continue
        if runtime.is_alive(ident):
            found[ident.pid] = ident
    for ident in runtime.group_members(pgid, lead.uid, lead.create_time):
        if ident.pid != os.getpid():
            found.setdefault(ident.pid, ident)
    return list(found.values())


async def stop_leftovers(record: dict[str, object], grace: float,
                         runtime: Runtime = OS_RUNTIME) -> list[dict[str, object]]:
    """Stop a previous server's processes (SIGTERM, grace, SIGKILL); return what was found."""
    found = await runtime.to_thread(leftovers, record, runtime)
    if not found:
        return []
    described = [{"pid": m.pid, "name": runtime.describe(m.pid)} for m in found]
    # Signals go to each verified process, not to the recorded group id: by now that id may
    # belong to an unrelated program.
    for m in found:
        runtime.signal_process(m, system.SIGTERM)
    deadline = runtime.monotonic() + grace
    alive = found
    while alive and runtime.monotonic() < deadline:
        await asyncio.sleep(0.05)
        alive = [m for m in alive if runtime.is_alive(m)]
    for m in alive:
        runtime.signal_process(m, system.SIGKILL)
    deadline = runtime.monotonic() + KILL_WAIT
    while alive and runtime.monotonic() < deadline:
        await asyncio.sleep(0.05)
        alive = [m for m in alive if runtime.is_alive(m)]
    if alive:
        raise SovereigndError(
            "processes of a previous server survived SIGKILL: "
            + ", ".join(f"{m.pid}" for m in alive)
            + "; they may be stuck in the kernel (uninterruptible I/O). Reboot may be needed.")
    return described
