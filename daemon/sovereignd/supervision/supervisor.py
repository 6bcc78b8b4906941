"""The supervisor: decides when the model server starts, restarts, parks or stops.

One coroutine, `run()`, loops over server runs. Each run spawns the server (STARTING), probes
it to WARMING and READY, and ends on an exit, a failed probe streak, a start timeout or a
request (restart, quarantine, shutdown). Every state change goes through `_transition`,
which checks the table in `states` and logs `{"event":"state","from","to","reason"}`.

Restart policy (`policy.RestartPolicy`, supervisord's BACKOFF -> FATAL, with exponential
backoff): the first restart after a good run is immediate; each further failure waits
backoff_initial, doubling up to backoff_max; `restart.max_failures` failures within
`restart.window` -> FATAL. A run counts as good once it has been READY for
`restart.min_uptime`. Deterministic start-up failures go to FATAL at once: those a pattern
knows (see `failures`), and, whatever the message, a server that exits before its health
endpoint ever answered twice in a row with the same decisive line (deterministic by evidence:
at most 2 spawns). FATAL retries after `restart.fatal_cooldown`, on SIGHUP or on `restart`.

Spawning, signals and the clock go through a `process.runtime.Runtime`, the probes through a
`ProbeClient`: the real ones by default, fakes in tests/test_supervision_policy.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import os
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from sovereignd import __version__
from sovereignd.backends.base import Backend
from sovereignd.config import Config
from sovereignd.gateway.metrics import Metrics
from sovereignd.http.upstream import Target
from sovereignd.logs.eventlog import EventLog
from sovereignd.logs.files import utc_timestamp
from sovereignd.logs.serveroutput import ServerOutput
from sovereignd.process import serversocket
from sovereignd.process.failures import Failure, classify_exit, quote
from sovereignd.process.probe import ListenerGuard, Prober, ProbeResult
from sovereignd.process.progress import ProgressWatch, Verdict, parse_counters
from sovereignd.process.runtime import OS_RUNTIME, Runtime
from sovereignd.process.serverprocess import (
    ServerProcess,
    SpawnError,
    StopReport,
    read_pidfile,
    stop_leftovers,
    write_pidfile,
)
from sovereignd.process.system import ProcessId
from sovereignd.supervision.policy import RestartPolicy
from sovereignd.supervision.states import PARKED, State, check_transition

# Output lines searched for a known failure. The tail is cleared at each start, so these are
# this run's; vLLM's multi-process tracebacks put the root cause ~150 lines before the end.
CLASSIFY_LINES = 500
STALL_LOOK = 1.0  # how often the progress watch looks while READY (seconds)
# Failures found by the supervisor itself: the server cannot serve, so nothing is drained.
KILL_AT_ONCE = frozenset({"engine-died", "stall"})

CANARY_400_FIX = ("a chat model needs a chat template (chat_template in tokenizer_config.json, "
                  "chat_template.jinja, or --chat-template in server.args); for a model that "
                  "serves completions only set server.completions_only: true. `sovereignd "
                  "check` shows which is missing")


class Request(enum.Enum):
    """What other parts of the daemon (signals, control socket, integrity) ask for."""

    SHUTDOWN = "shutdown"
    RESTART = "restart"        # operator: restart now, leave FATAL, forget past failures
    RESET = "reset"            # SIGHUP: leave FATAL or re-check a quarantine; READY stays
    QUARANTINE = "quarantine"  # integrity drift: stop and wait for the files to verify
    RELEASE = "release"        # drift resolved (files verify again, or re-baselined)


@dataclass(frozen=True)
class Blocked:
    """A gate's verdict that the server must not start: where to park and why."""

    state: State
    reason: str
    details: dict[str, Any] = field(default_factory=dict)


Gate = Callable[[], Awaitable[Blocked | None]]


@dataclass(frozen=True)
class Upstream:
    """Where the gateway forwards to, and the internal key it adds."""

    target: Target
    key: str


class ProbeClient(Protocol):
    """The supervisor's HTTP client to the server (`probe.Prober`; a fake in tests)."""

    guard: ListenerGuard | None

    async def health(self, path: str, timeout: float) -> ProbeResult: ...

    async def canary(self, path: str, body: dict[str, Any], key: str,
                     timeout: float) -> ProbeResult: ...

    async def text(self, path: str, timeout: float) -> str | None: ...

    async def close(self) -> None: ...


@dataclass
class _Pending:
    kind: Request
    reason: str
    details: dict[str, Any]


class Supervisor:
    """Owns the model server's life: the state machine, the restart policy, the probes."""

    def __init__(self, cfg: Config, backend: Backend, events: EventLog, metrics: Metrics, *,
                 output: ServerOutput, clock: Callable[[], float] | None = None,
                 runtime: Runtime = OS_RUNTIME, prober: ProbeClient | None = None) -> None:
        """`runtime`: spawning, signals and the clock (`clock`, if given, overrides its
        monotonic clock); `prober`: the HTTP probes (default: a `Prober` to the server)."""
        self.cfg = cfg
        self.backend = backend
        self.events = events
        self.metrics = metrics
        self.output = output
        self.runtime = runtime
        self.clock = clock or runtime.monotonic
        self.policy = RestartPolicy(cfg.restart)
        self.state = State.STOPPED
        self.reason = "daemon starting"
        self.since = runtime.wall()
        self.restarts = 0
        self.starts = 0
        self.last_failure: dict[str, Any] | None = None
        self.degraded: dict[str, str] = {}
        self.checks: dict[str, dict[str, Any]] = {}
        self.probe_stats: dict[str, Any] = {"consecutive_failures": 0}
        self.suspect: str | None = None  # READY, but not trusted with new traffic (503)
        self._suspect_at = 0.0
        self._canary_since: float | None = None
        self._progress = ProgressWatch(cfg.health.stall_timeout, cfg.health.stall_restart)
        self._death: asyncio.Future[ProcessId] | None = None
        self._pending: list[_Pending] = []
        self._wake = asyncio.Event()
        self._shutting_down = False
        self._shutdown_reason = ""
        self._server: ServerProcess | None = None
        self._key: str | None = None
        self._ready_at: float | None = None
        self._start_reason = "daemon started"
        self._gates: list[Gate] = [self._preflight_gate]
        self._listeners: list[Callable[[State, State], None]] = []
        self._done = asyncio.Event()
        s = cfg.server
        uds = str(cfg.server_uds) if cfg.server_uds else None
        self.prober: ProbeClient = prober or Prober(s.host, s.port, uds)
        self.prober.guard = self._probe_guard
        self._target = Target(s.host, s.port, uds)
        self._upstream: Upstream | None = None
        self.pidfile = cfg.state_dir / "server.pid"

    # --- requests from the rest of the daemon ---------------------------------------------------

    def request(self, kind: Request, reason: str, **details: Any) -> None:
        """Ask the supervisor to act; safe to call from signal handlers run by the loop."""
        if kind is Request.SHUTDOWN and not self._shutting_down:
            self._shutting_down = True
            self._shutdown_reason = reason
        self._pending.append(_Pending(kind, reason, details))
        self._wake.set()

    def stop_requested(self) -> bool:
        """True once shutdown was requested (a method: the flag changes across awaits)."""
        return self._shutting_down

    def add_gate(self, gate: Gate) -> None:
        """A check that must pass before every start (integrity, environment)."""
        self._gates.append(gate)

    def on_transition(self, listener: Callable[[State, State], None]) -> None:
        self._listeners.append(listener)

    def set_degraded(self, name: str, reason: str | None) -> None:
        """Mark (or clear) a condition that does not stop serving but must be visible."""
        if reason is None:
            self.degraded.pop(name, None)
        else:
            self.degraded[name] = reason

    def serving(self) -> bool:
        """True while READY and not suspected of a stall: /readyz 200, traffic forwarded."""
        return self.state is State.READY and self.suspect is None

    def upstream(self) -> Upstream | None:
        """Where to forward requests while READY; None in every other state."""
        if not self.serving() or self._key is None:
            return None
        if self._upstream is None or self._upstream.key != self._key:
            self._upstream = Upstream(self._target, self._key)  # once per server start
        return self._upstream

    async def wait_done(self) -> None:
        await self._done.wait()

    # --- state ----------------------------------------------------------------------------------

    def _transition(self, new: State, reason: str, **fields: Any) -> None:
        old = self.state
        check_transition(old, new)
        self.state, self.reason, self.since = new, reason, self.runtime.wall()
        self.suspect = None
        self.metrics.set_state(old, new)
        self.events.emit("state", level="warning" if new in PARKED else "info",
                         **{"from": old.value, "to": new.value, "reason": reason}, **fields)
        for listener in self._listeners:
            listener(old, new)

    def status(self) -> dict[str, Any]:
        """The JSON of /status."""
        server: dict[str, Any] | None = None
        if self._server is not None and self._server.running:
            srv = self._server
            server = {"pid": srv.pid, "pgid": srv.pgid,
                      "started_at": utc_timestamp(srv.started_wall),
                      "uptime_s": round(self.clock() - srv.started, 3),
                      "processes": len(srv.tracked),
                      "argv": self.backend.redact_argv(srv.argv)}
        return {
            "state": self.state.value, "since": utc_timestamp(self.since), "reason": self.reason,
            "version": __version__, "backend": self.backend.name,
            "model": {"name": self.cfg.model_name, "path": str(self.cfg.server.model)},
            "server": server, "starts": self.starts, "restarts": self.restarts,
            "failures_in_window": self.policy.in_window(self.clock()),
            "last_exit": self.last_failure,
            "degraded": dict(self.degraded), "probe": dict(self.probe_stats),
            "suspect": self.suspect,
            **{name: result for name, result in self.checks.items()},
            "daemon": {"pid": os.getpid(), "config": str(self.cfg.source),
                       "config_sha256": self.cfg.digest},
        }

    # --- the loop -------------------------------------------------------------------------------

    async def run(self) -> None:
        """Supervise until shutdown is requested; then stop the server and return."""
        try:
            await self._clean_leftovers()
            while not self._shutting_down:
                if self.state in PARKED:
                    await self._park()  # returns when it is time to try again
                    if self.stop_requested():
                        break
                if await self._blocked_by_gate():
                    continue
                await self._serve_once()
            await self._shutdown()
        except BaseException as exc:
            # A bug must not leave a server running without its supervisor: stop it first,
            # report after (reporting can fail too: a full disk).
            if self._server is not None:
                await asyncio.shield(self._server.stop(self.cfg.server.stop_grace))
            self.events.emit("supervisor_crash", level="critical", error=repr(exc))
            raise
        finally:
            await self.prober.close()
            self._done.set()

    def _take(self) -> list[_Pending]:
        pending, self._pending = self._pending, []
        self._wake.clear()
        return pending

    async def _wait_wake(self, timeout: float | None) -> bool:
        """Wait for a request or the timeout; True if woken by a request."""
        if self._wake.is_set():
            return True
        try:
            async with asyncio.timeout(timeout):
                await self._wake.wait()
        except TimeoutError:
            return False
        return True

    async def _clean_leftovers(self) -> None:
        """Stop a previous daemon's server (found through the pidfile) before spawning anew."""
        record = read_pidfile(self.pidfile)
        if record is None:
            return
        found = await stop_leftovers(record, self.cfg.server.stop_grace,
                                     self.runtime) if record else []
        if found:
            self.metrics.orphans_killed.inc(len(found))
            self.events.emit("orphans", level="warning", processes=found, source="pidfile",
                             reason="a previous daemon's server was still running")
        with contextlib.suppress(FileNotFoundError):
            self.pidfile.unlink()

    async def _blocked_by_gate(self) -> bool:
        for gate in self._gates:
            blocked = await gate()
            if blocked is None:
                continue
            if blocked.state is State.FATAL:
                self.policy.park_fatal(self.clock())
            if self.state is blocked.state:
                self.reason = blocked.reason
                self.events.emit("still_blocked", level="warning", state=self.state.value,
                                 reason=blocked.reason, **blocked.details)
            else:
                self._transition(blocked.state, blocked.reason, **blocked.details)
            return True
        return False

    async def _preflight_gate(self) -> Blocked | None:
        """Failures worth catching before a minute of model loading."""
        s = self.cfg.server
        if not s.model.is_dir():
            what = "does not exist" if not s.model.exists() else "is not a directory"
            return Blocked(State.FATAL, f"model directory {s.model} {what}",
                           {"kind": "model-missing", "mitigation": "set server.model to a local "
                            "model directory readable by the service account"})
        if not os.access(s.model, os.R_OK | os.X_OK):
            return Blocked(State.FATAL, f"model directory {s.model} is not readable",
                           {"kind": "model-unreadable", "mitigation": "make it readable by the "
                            "service account"})
        uds = self.cfg.server_uds
        if uds is not None:
            try:
                await self.runtime.to_thread(serversocket.prepare_uds, uds)
            except serversocket.SocketDirError as exc:
                return Blocked(State.FATAL, str(exc), {"kind": "socket-folder"})
        tmp = self.backend.private_tmp(self.cfg)
        if tmp is not None:
            try:
                await self.runtime.to_thread(serversocket.prepare_private_tmp, tmp)
            except serversocket.SocketDirError as exc:
                return Blocked(State.FATAL, str(exc), {"kind": "socket-folder"})
        return None

    async def verify_listener(self) -> serversocket.ListenerCheck:
        """Whether the server's TCP port is held by the server this daemon started (its
        socket in the descriptors of the server's processes)."""
        s, server = self.cfg.server, self._server

        def check() -> serversocket.ListenerCheck:  # reads /proc: off the loop
            pids = [m.pid for m in server.members()] if server is not None else []
            return serversocket.check_listener(s.host, s.port, pids)

        return await self.runtime.to_thread(check)

    async def _probe_guard(self) -> tuple[str, dict[str, Any] | None] | None:
        check = await self.verify_listener()
        return None if check.owned else (check.detail, check.impostor)

    def _port_taken(self, detail: str, holder: dict[str, Any] | None) -> Failure:
        # Not deterministic: whoever holds the port may go; retried with backoff, never
        # parked in FATAL for good (a crash loop still ends in FATAL with its cool-down).
        self.events.emit("port_impostor", level="critical", port=self.cfg.server.port,
                         holder=holder or {}, detail=detail)
        return Failure(kind="port-in-use", message=detail,
                       mitigation="stop whatever listens there (`lsof -iTCP:"
                       f"{self.cfg.server.port} -sTCP:LISTEN`), keep other accounts off it "
                       "with the firewall rules in ops/, or choose another server.port")

    async def _park(self) -> None:
        """Wait in FATAL or QUARANTINED for the cool-down, the operator or verified files."""
        while not self._shutting_down:
            timeout = None
            if self.state is State.FATAL:
                timeout = self.policy.cooldown_left(self.clock())
            if not await self._wait_wake(timeout):
                self.policy.forget()
                self._start_reason = "FATAL cool-down elapsed"
                return
            for req in self._take():
                if req.kind is Request.SHUTDOWN:
                    return
                if req.kind in (Request.RESTART, Request.RESET, Request.RELEASE):
                    if req.kind is Request.RELEASE and self.state is not State.QUARANTINED:
                        continue
                    self.policy.forget()
                    self._start_reason = req.reason
                    self.events.emit("operator" if req.kind is not Request.RELEASE else "release",
                                     action=req.kind.value, reason=req.reason, **req.details)
                    return
                if req.kind is Request.QUARANTINE and self.state is State.FATAL:
                    self._transition(State.QUARANTINED, req.reason, **req.details)

    async def _serve_once(self) -> None:
        """One run of the server, from spawn to its end."""
        key = secrets.token_urlsafe(32)
        argv = self.backend.argv(self.cfg, key)
        env = self._server_env(key)
        self.output.set_secrets(key)
        self.output.clear_tail()
        if self.starts:
            self.restarts += 1
            self.metrics.restarts.inc()
        self.starts += 1
        self._transition(State.STARTING, self._start_reason)
        self._ready_at = None
        s = self.cfg.server
        if self.cfg.server_uds is None and not await self.runtime.to_thread(
                serversocket.port_free, s.host, s.port):
            holder = await self.runtime.to_thread(serversocket.holder_of, s.port)
            await self._failed(self._port_taken(
                f"port {s.host}:{s.port} is already in use by another process", holder), None)
            return
        server = ServerProcess(argv, env, self.cfg.state_dir, self.output,
                               on_members=self._members_changed, runtime=self.runtime)
        try:
            await server.start()
        except SpawnError as exc:
            await self._failed(Failure(kind="spawn", message=str(exc), deterministic=True), None)
            return
        self._server, self._key = server, key
        self._members_changed(server)
        self.events.emit("spawn", pid=server.pid, argv=self.backend.redact_argv(argv),
                         env=sorted(set(env) - set(os.environ) | set(self.cfg.server.env)),
                         start=self.starts)
        assert server.exited is not None
        self._death = death = asyncio.get_running_loop().create_future()
        probe = asyncio.create_task(self._probe(server), name="probe")
        stall = asyncio.create_task(self._watch_progress(), name="progress")
        woken = asyncio.create_task(self._wake.wait(), name="wake")
        try:
            while True:
                waiters: set[asyncio.Future[Any]] = {server.exited, probe, stall, death, woken}
                done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                if server.exited in done:
                    phase = {State.STARTING: "starting", State.WARMING: "warming up",
                             State.READY: "serving"}.get(self.state, "running")
                    # A dead server has nothing to drain: kill what is left of it at once
                    # (EngineCore, Worker, resource tracker), then read its last words.
                    report = await self._stop_server(server, 0.0, "exited")
                    await server.wait_output_closed(0.2)
                    code = server.exited.result()
                    failure = classify_exit(code, self.output.tail(CLASSIFY_LINES),
                                            self.backend.patterns, phase)
                    await self._failed(failure, server, stopped=report)
                    return
                if death in done:
                    await self._failed(self._death_failure(server, death.result()), server)
                    return
                if probe in done:
                    await self._failed(probe.result(), server)
                    return
                if stall in done:
                    await self._failed(stall.result(), server)
                    return
                # A request arrived.
                action = self._requests_while_running()
                if action is None:
                    woken = asyncio.create_task(self._wake.wait(), name="wake")
                    continue
                if action.kind is Request.SHUTDOWN:
                    return  # _shutdown stops the server
                if action.kind is Request.QUARANTINE:
                    self._transition(State.QUARANTINED, action.reason, **action.details)
                else:
                    self.policy.forget()
                    self._start_reason = action.reason
                    self._transition(State.BACKOFF, f"restarting: {action.reason}")
                await self._stop_server(server, self.cfg.server.stop_grace, action.reason)
                return
        finally:
            self._death = None
            self._canary_since = None
            for task in (probe, stall, woken):
                task.cancel()
            await asyncio.gather(probe, stall, woken, return_exceptions=True)

    def _requests_while_running(self) -> _Pending | None:
        """The request that ends this run, by priority; SIGHUP (RESET) does not end a run."""
        pending = self._take()
        for kind in (Request.SHUTDOWN, Request.QUARANTINE, Request.RESTART):
            for req in pending:
                if req.kind is kind:
                    return req
        return None

    def _server_env(self, key: str) -> dict[str, str]:
        env = dict(os.environ)
        for name in ("VLLM_API_KEY", "OPENAI_API_KEY"):
            env.pop(name, None)  # never inherit a key from whoever started the daemon
        venv = self.cfg.server.venv
        if venv is not None:
            env["VIRTUAL_ENV"] = str(venv)
            env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        env.update(self.backend.env(self.cfg, key))
        return env

    def _members_changed(self, server: ServerProcess) -> None:
        with contextlib.suppress(OSError):
            write_pidfile(self.pidfile, server)

    async def _probe(self, server: ServerProcess) -> Failure:
        """Drive STARTING -> WARMING -> READY, then probe until a failure streak; return it."""
        h = self.cfg.health
        deadline = server.started + self.cfg.server.start_timeout
        path = self.backend.health_path
        while True:
            result = await self.prober.health(path, min(h.timeout, self._left(deadline)))
            self._observe(result, quiet=True)
            if result.ok:
                break
            if result.impostor is not None:
                return self._port_taken(result.detail, result.impostor)
            if self.clock() < deadline:
                await asyncio.sleep(h.startup_poll)
            if self.clock() >= deadline:  # no probe begins past it (as the canary's loop)
                return self._start_timeout("/health did not answer 200", result)
        await self.runtime.to_thread(server.refresh_members)
        self._transition(State.WARMING, "health endpoint answers",
                         seconds=round(self.clock() - server.started, 3))
        canary_path, body = self.backend.canary(self.cfg)
        assert self._key is not None
        failed = 0
        while True:
            result = await self.prober.canary(canary_path, body, self._key,
                                              min(h.canary_timeout, self._left(deadline)))
            self._observe(result)
            if result.ok:
                break
            if result.impostor is not None:
                return self._port_taken(result.detail, result.impostor)
            if result.status == 400:  # the server refuses the request itself: no retry helps
                return Failure(kind="canary-rejected", message="the server refused the canary "
                               f"request {canary_path} with HTTP 400 while warming up",
                               mitigation=CANARY_400_FIX, deterministic=True,
                               evidence=quote(result.detail))
            failed += 1
            if failed >= h.failures:
                return Failure(kind="canary", message=f"the canary request ({canary_path}) "
                               f"failed {failed} times while warming up "
                               f"(last: {result.detail})",
                               mitigation="see server.log for the server's own error")
            if self.clock() < deadline:
                await asyncio.sleep(h.startup_poll)
            if self.clock() >= deadline:  # no attempt begins past it (with what time left?)
                return self._start_timeout(f"the canary request ({canary_path}) did not succeed",
                                           result)
        await self.runtime.to_thread(server.refresh_members)
        await self._arm(server)
        self._ready_at = self.clock()
        self._progress.progress(self.clock())
        self._transition(State.READY, f"canary request ({canary_path}) answered",
                         seconds=round(self._ready_at - server.started, 3),
                         canary_ms=round(result.seconds * 1000, 1))
        failed = 0
        next_canary = self.clock() + h.canary_interval
        while True:
            await asyncio.sleep(h.interval)
            await self.runtime.to_thread(server.refresh_members)
            # After a failed canary the next probe is a canary again, so a server whose
            # /health is fine but whose engine is dead is caught in `failures` intervals.
            retry_canary = failed > 0 and self.probe_stats.get("last_kind") == "canary"
            if retry_canary or self.clock() >= next_canary:
                result = await self._canary(canary_path, body, h.canary_timeout)
                next_canary = self.clock() + h.canary_interval
            else:
                result = await self.prober.health(path, h.timeout)
            self._observe(result)
            if result.impostor is not None:
                return self._port_taken(result.detail, result.impostor)
            if result.ok:
                failed = 0
                self.probe_stats["consecutive_failures"] = 0
                if result.kind == "canary":
                    self._clear_suspect(f"canary request ({canary_path}) answered")
                continue
            if result.kind == "canary" and self._progress.last_progress > self.clock() \
                    - result.seconds:
                # A busy server answers the canary late, not never: its counters or its
                # bytes to clients moved meanwhile. Not a failure.
                self.events.emit("canary_late", level="info", detail=result.detail,
                                 reason="the server made progress meanwhile (busy)")
                continue
            if result.kind == "canary":
                # READY -> READY (suspect): no new traffic until confirmed or cleared.
                self._set_suspect(f"the canary request ({canary_path}) failed: {result.detail}")
            failed += 1
            self.probe_stats["consecutive_failures"] = failed
            if failed >= h.failures:
                return Failure(kind="unhealthy", message=f"{result.kind} probe failed {failed} "
                               f"times in a row (last: {result.detail})",
                               mitigation="the server stopped answering; see server.log")

    async def _canary(self, path: str, body: dict[str, Any], timeout: float) -> ProbeResult:
        """One canary completion while READY; the progress watch knows it is in flight."""
        assert self._key is not None
        self._canary_since = self.clock()
        try:
            result = await self.prober.canary(path, body, self._key, timeout)
        finally:
            self._canary_since = None
        if result.ok:
            self._progress.progress(self.clock())
        return result

    async def _arm(self, server: ServerProcess) -> None:
        """At READY: watch every process of the server for its death, note its shared memory."""
        server.watch_exits(self._member_died)
        await self.runtime.to_thread(server.remember_shared_memory)

    def _member_died(self, ident: ProcessId) -> None:
        if self._death is not None and not self._death.done():
            self._death.set_result(ident)

    def _death_failure(self, server: ServerProcess, ident: ProcessId) -> Failure:
        name = server.names.get(ident.pid, "?")
        return Failure(kind="engine-died",
                       message=f"{name} (pid {ident.pid}), a process of the server, died; the "
                       "server cannot serve without it",
                       mitigation="see server.log; the kernel log (dmesg) says whether the "
                       "out-of-memory killer ended it",
                       details={"process": {"pid": ident.pid, "name": name}})

    def _set_suspect(self, reason: str) -> None:
        if self.suspect is None and self.state is State.READY:
            self.suspect = reason
            self._suspect_at = self.clock()
            self.metrics.server_up.set(0)
            self.metrics.stalls.labels(stage="suspected").inc()
            self.events.emit("suspect", level="warning", reason=reason,
                             readyz=503, action="no new traffic until the server answers")

    def _clear_suspect(self, why: str) -> None:
        if self.suspect is not None and self.state is State.READY:
            self.events.emit("suspect_cleared", level="info", was=self.suspect, reason=why)
            self.suspect = None
            self.metrics.server_up.set(1)

    async def _watch_progress(self) -> Failure:
        """While READY: work in flight with no progress -> suspect (503), then a restart."""
        h = self.cfg.health
        watch = self._progress
        metrics_path = "/metrics" if self.backend.name == "vllm" else None
        while True:
            await asyncio.sleep(STALL_LOOK)
            if self.state is not State.READY:
                continue
            now = self.clock()
            busy = self._work_at_server()
            watch.progress(self.metrics.upstream_progress)
            if busy and metrics_path is not None and now - watch.last_progress >= STALL_LOOK:
                text = await self.prober.text(metrics_path, h.timeout)
                watch.counters(self.clock(), parse_counters(text) if text else None)
                # Reading them may take up to health.timeout on a loaded host: judge by what
                # the gateway saw meanwhile too, not by what it had seen before.
                watch.progress(self.metrics.upstream_progress)
                busy = self._work_at_server()
            verdict = watch.look(self.clock(), busy)
            quiet = round(watch.quiet_for(self.clock()), 1)
            if verdict in (Verdict.PROGRESS, Verdict.IDLE):
                if watch.progress_since(self._suspect_at):
                    self._clear_suspect("the server makes progress again")
            elif verdict is Verdict.SUSPECT:
                self._set_suspect(f"work in flight and no progress for {quiet:g}s "
                                  "(no byte from the server, its token counters still)")
            else:
                self.metrics.stalls.labels(stage="confirmed").inc()
                return Failure(kind="stall",
                               message=f"the server made no progress for {quiet:g}s with work "
                               "in flight (its token counters stood still)",
                               mitigation="a stalled engine (deadlock, SIGSTOP, swap); see "
                               "server.log", details={"quiet_s": quiet})

    def _work_at_server(self) -> bool:
        """Requests the server has not answered in full (not those whose answer waits for
        its record's fsync or for the client: `Metrics.upstream_pending`), or the canary."""
        return self.metrics.upstream_pending > 0 or self._canary_since is not None

    def _left(self, deadline: float) -> float:
        return max(0.05, deadline - self.clock())

    def _start_timeout(self, what: str, last: ProbeResult) -> Failure:
        return Failure(kind="start-timeout",
                       message=f"{what} within server.start_timeout "
                       f"({self.cfg.server.start_timeout:g}s; last: {last.detail})",
                       mitigation="raise server.start_timeout if the model is large; "
                       "see server.log")

    def _observe(self, result: ProbeResult, quiet: bool = False) -> None:
        self.metrics.probe_latency.labels(kind=result.kind).observe(result.seconds)
        self.probe_stats[f"last_{result.kind}_ms"] = round(result.seconds * 1000, 2)
        self.probe_stats["last_kind"] = result.kind
        if not result.ok:
            self.metrics.probe_failures.labels(kind=result.kind).inc()
            if not quiet:
                self.events.emit("probe_failed", level="warning", kind=result.kind,
                                 detail=result.detail, state=self.state.value)

    def backoff_delay(self, failures: int) -> float:
        """Wait before restart number `failures` in a row (`RestartPolicy.delay`)."""
        return self.policy.delay(failures)

    def _by_evidence(self, failure: Failure) -> Failure:
        """Deterministic by evidence: the server exited before its health endpoint ever
        answered, with the same decisive line as the previous run of this failure streak."""
        line = failure.evidence if (failure.returncode is not None
                                    and self.state is State.STARTING) else None
        if not self.policy.repeats_early_exit(line) or failure.deterministic:
            return failure
        return dataclasses.replace(
            failure, deterministic=True,
            message=f"{failure.message}, twice in a row before answering /health",
            mitigation=failure.mitigation or "a restart will not fix this; see server.log "
            "for the server's own error")

    async def _failed(self, failure: Failure, server: ServerProcess | None,
                      stopped: StopReport | None = None) -> None:
        """A run ended badly: record it, move to BACKOFF or FATAL, stop what is left, wait.
        `stopped`: the server was already stopped (it had exited)."""
        failure = self._by_evidence(failure)
        now = self.clock()
        ready_for = now - self._ready_at if self._ready_at is not None else 0.0
        decision = self.policy.failed(now, ready_for, failure.deterministic)
        self.metrics.failures.labels(kind=failure.kind).inc()
        record = failure.as_dict()
        record["at"] = utc_timestamp(self.runtime.wall())
        if server is not None:
            record["pid"] = server.pid
            record["uptime_s"] = round(now - server.started, 3)
        self.last_failure = record
        self.events.emit("exit" if failure.returncode is not None else "failure",
                         level="error", **record,
                         last_lines=self.output.tail(10) if failure.returncode is not None else [])
        delay = 0.0
        if decision.state is State.FATAL and not decision.crash_loop:
            self._transition(State.FATAL, failure.sentence(), kind=failure.kind)
        elif decision.state is State.FATAL:
            self._transition(
                State.FATAL, f"crash loop: {decision.failures} failures within "
                f"{self.cfg.restart.window:g}s (last: {failure.quoted()}); retrying after "
                f"{self.cfg.restart.fatal_cooldown:g}s, on SIGHUP or `sovereignd restart`",
                kind="crash-loop")
        else:
            delay = decision.delay
            self._transition(State.BACKOFF, failure.quoted(), delay_s=delay,
                             failures_in_window=decision.failures)
            self._start_reason = f"restart after failure ({failure.kind})"
        if server is not None and stopped is None:
            grace = 0.0 if failure.kind in KILL_AT_ONCE else self.cfg.server.stop_grace
            await self._stop_server(server, grace, failure.kind)
        if delay > 0:
            deadline = now + delay
            while not self._shutting_down and self.clock() < deadline:
                if await self._wait_wake(deadline - self.clock()):
                    action = self._requests_while_running()
                    if action is not None and action.kind is Request.SHUTDOWN:
                        return
                    if action is not None and action.kind is Request.QUARANTINE:
                        self._transition(State.QUARANTINED, action.reason, **action.details)
                        return
                    if action is not None and action.kind is Request.RESTART:
                        self.policy.forget()
                        self._start_reason = action.reason
                        return

    async def _stop_server(self, server: ServerProcess, grace: float, why: str) -> StopReport:
        was_running = server.running
        report = await server.stop(grace)
        orphans = [p for p in report.signalled if p["pid"] != server.pid] if not was_running \
            else []
        if orphans:
            self.metrics.orphans_killed.inc(len(orphans))
            self.events.emit("orphans", level="warning", processes=orphans, source="exit",
                             reason="the server exited and left these processes running")
        if report.shm_removed:
            self.metrics.shm_removed.inc(len(report.shm_removed))
        self.events.emit("server_stopped", level="info" if report.graceful else "warning",
                         pid=server.pid, why=why, graceful=report.graceful,
                         seconds=round(report.seconds, 3), killed=report.killed,
                         survivors=report.survivors, shm_removed=report.shm_removed)
        if report.survivors:
            self.events.emit("survivors", level="critical", processes=report.survivors,
                             reason="processes survived SIGKILL (stuck in the kernel?)")
        if server is self._server:
            self._server, self._key = None, None
        if not report.survivors:
            with contextlib.suppress(FileNotFoundError):
                self.pidfile.unlink()
            await self.runtime.to_thread(serversocket.remove_leftovers, self.cfg.server_uds,
                                         self.backend.private_tmp(self.cfg))
        return report

    async def _shutdown(self) -> None:
        """READY ends at once (/readyz 503); the server drains, stops; STOPPED."""
        self._transition(State.STOPPING, self._shutdown_reason or "shutdown requested")
        if self._server is not None:
            await self._stop_server(self._server, self.cfg.server.stop_grace, "shutdown")
        self._transition(State.STOPPED, "shutdown complete")
