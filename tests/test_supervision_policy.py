"""The real Supervisor and restart policy in-process: fake runtime, virtual clock, no process.

Beside the process-level tests (test_supervisor.py, test_supervision.py, real processes and
signals): these cover the restart policy, parking and request priorities exactly, in virtual
time (a 30-minute cool-down takes no real time). Every transition the supervisor makes is also
checked against the table in `states` (`Sim.transitions`).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sovereignd import config
from sovereignd.backends.vllm import VllmBackend
from sovereignd.gateway.metrics import Metrics
from sovereignd.logs.eventlog import EventLog
from sovereignd.logs.serveroutput import ServerOutput
from sovereignd.process.serverprocess import ServerProcess
from sovereignd.supervision.policy import RestartPolicy
from sovereignd.supervision.states import TRANSITIONS, State, TransitionError
from sovereignd.supervision.supervisor import Blocked, Request, Supervisor
from tests.fakes.fake_runtime import FakeProbes, FakeRuntime, Script, VirtualTimeLoop

RESTART = {"backoff_initial": 1.0, "backoff_max": 8.0, "min_uptime": 60.0, "max_failures": 5,
           "window": 600.0, "fatal_cooldown": 1800.0}
CRASH_SERVING = Script(healthy_after=2.0, exit_after=10.0, exit_code=1,
                       last_lines=("RuntimeError: CUDA-less engine crashed",))
EARLY_EXIT = ("ValueError: Unknown quantization method: 'fp3'. Must be one of ['awq', 'gptq']")

def _restart_section() -> config.RestartSection:
    return config.RestartSection(**RESTART)  # type: ignore[arg-type]


def _merged(base: str, more: str) -> str:
    """YAML flow pairs "k: v, ..." of `base` with those of `more` put over them."""
    pairs = dict(p.split(": ", 1) for p in base.split(", "))
    pairs.update(dict(p.split(": ", 1) for p in more.split(", ") if p))
    return ", ".join(f"{k}: {v}" for k, v in pairs.items())


class Sim:
    """A Supervisor on a FakeRuntime and FakeProbes, on a virtual-time loop."""

    def __init__(self, root: Path, *scripts: Script, default: Script | None = None,
                 health: str = "", server: str = "") -> None:
        """`health`, `server`: further settings of those sections (YAML flow, "k: v, ...")."""
        model = root / "model"
        model.mkdir(exist_ok=True)
        restart = ", ".join(f"{k}: {v:g}" + ("s" if k != "max_failures" else "")
                            for k, v in RESTART.items())
        cfg = config.loads(
            f"server: {{model: {model}{', ' + server if server else ''}}}\n"
            f"logs: {{dir: {root}}}\ndaemon: {{state_dir: {root}}}\nrestart: {{{restart}}}\n"
            f"health: {{{_merged('interval: 1s, canary_interval: 5s', health)}}}\n"
            .encode(), root / "c.yaml")
        self.loop = VirtualTimeLoop()
        self.runtime = FakeRuntime(self.loop, *scripts, default=default)
        self.probes = FakeProbes(self.runtime)
        self.events: list[dict[str, Any]] = []
        self.sup = Supervisor(cfg, VllmBackend(), EventLog(None, stream=None,
                                                        listeners=[self.events.append]),
                              Metrics(), output=ServerOutput(None, 100), runtime=self.runtime,
                              prober=self.probes)
        self.transitions: list[tuple[float, State, State]] = []
        self.sup.on_transition(self._seen)
        self.task: asyncio.Task[None] | None = None

    def _seen(self, old: State, new: State) -> None:
        assert new in TRANSITIONS[old]
        self.transitions.append((self.loop.time(), old, new))

    def run(self, scenario: Callable[[], Awaitable[None]]) -> None:
        """Start the supervisor, play `scenario`, shut down; every process must be gone."""
        async def main() -> None:
            self.task = asyncio.create_task(self.sup.run())
            try:
                await scenario()
            finally:
                self.sup.request(Request.SHUTDOWN, "test over")
                await self.task

        try:
            self.loop.run_until_complete(main())
        finally:
            self.loop.close()
        assert self.sup.state is State.STOPPED
        assert self.runtime.alive() == []

    async def until(self, what: Callable[[], bool], within: float) -> None:
        """Wait (virtual seconds) for `what`; fail if it is not so by then."""
        deadline = self.loop.time() + within
        while not what():
            assert self.loop.time() < deadline, f"not so within {within}s: {self.path()}"
            await asyncio.sleep(0.05)

    async def reach(self, state: State, within: float = 120.0) -> float:
        """Wait for `state`; the virtual time it was entered."""
        await self.until(lambda: self.sup.state is state, within)
        return self.transitions[-1][0]

    async def idle(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def path(self) -> list[str]:
        return [new.value for _, _, new in self.transitions]

    def at(self, state: State) -> list[float]:
        """The virtual times `state` was entered."""
        return [t for t, _, new in self.transitions if new is state]

    def event(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == name]


@pytest.fixture
def root() -> Iterator[Path]:
    # Not tmp_path: the server's Unix socket path must stay under 104 bytes.
    path = Path(tempfile.mkdtemp(prefix="sv-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


# --- the restart policy alone (pure) ------------------------------------------------------------


def test_policy_first_restart_is_immediate_then_backoff_doubles_up_to_the_cap() -> None:
    policy = RestartPolicy(_restart_section())
    delays = [policy.failed(float(n), 0.0, deterministic=False).delay for n in range(4)]
    assert delays == [0.0, 1.0, 2.0, 4.0]
    assert [policy.delay(n) for n in range(5, 9)] == [8.0, 8.0, 8.0, 8.0]


def test_policy_max_failures_within_the_window_is_a_crash_loop_fatal() -> None:
    policy = RestartPolicy(_restart_section())
    decisions = [policy.failed(10.0 * n, 0.0, deterministic=False) for n in range(5)]
    assert [d.state for d in decisions] == [State.BACKOFF] * 4 + [State.FATAL]
    assert decisions[-1].crash_loop and decisions[-1].failures == 5
    assert policy.cooldown_left(40.0) == 1800.0


def test_policy_failures_older_than_the_window_no_longer_count() -> None:
    policy = RestartPolicy(_restart_section())
    for n in range(4):
        policy.failed(float(n), 0.0, deterministic=False)
    decision = policy.failed(3 + 601.0, 0.0, deterministic=False)
    assert decision.state is State.BACKOFF and decision.failures == 1


def test_policy_a_run_ready_for_min_uptime_counts_as_started_and_clears_the_streak() -> None:
    policy = RestartPolicy(_restart_section())
    for n in range(4):
        policy.failed(float(n), 59.9, deterministic=False)  # READY, but not long enough
    decision = policy.failed(100.0, 60.0, deterministic=False)
    assert decision == policy.failed(100.0, 60.0, deterministic=False)
    assert decision.state is State.BACKOFF and decision.delay == 0.0 and decision.failures == 1


def test_policy_a_deterministic_failure_is_fatal_at_once_with_a_cool_down() -> None:
    policy = RestartPolicy(_restart_section())
    decision = policy.failed(5.0, 0.0, deterministic=True)
    assert decision.state is State.FATAL and not decision.crash_loop
    assert policy.cooldown_left(5.0) == 1800.0 and policy.cooldown_left(2000.0) == 0.0


def test_policy_the_same_early_exit_twice_in_a_streak_is_deterministic_by_evidence() -> None:
    policy = RestartPolicy(_restart_section())
    assert not policy.repeats_early_exit("ValueError: bad (pid 12)")
    policy.failed(1.0, 0.0, deterministic=False)
    assert policy.repeats_early_exit("ValueError: bad (pid 13)")  # pids differ: same cause
    assert not policy.repeats_early_exit("OSError: other")
    policy.failed(2.0, 0.0, deterministic=False)
    assert not policy.repeats_early_exit(None)  # got past /health: no evidence
    policy.forget()
    policy.repeats_early_exit("OSError: other")
    assert not policy.repeats_early_exit("OSError: other")  # a new streak needs it twice


# --- the supervisor: restart policy ---------------------------------------------------------------


def test_crash_loop_restarts_immediately_then_with_doubling_backoff_then_fatal(root: Path) -> None:
    sim = Sim(root, default=CRASH_SERVING)

    async def scenario() -> None:
        await sim.reach(State.FATAL, within=200)

    sim.run(scenario)
    starts, backoffs = sim.at(State.STARTING), sim.at(State.BACKOFF)
    assert len(starts) == 5 and len(backoffs) == 4
    assert [round(s - b, 3) for s, b in zip(starts[1:], backoffs, strict=True)] == [0, 1, 2, 4]
    [fatal] = [e for e in sim.event("state") if e["to"] == "FATAL"]
    assert fatal["kind"] == "crash-loop" and fatal["reason"].startswith("crash loop: 5 failures")
    assert sim.sup.restarts == 4 and len(sim.runtime.servers) == 5


def test_run_ready_for_min_uptime_counts_as_started_so_the_next_restart_is_immediate(
        root: Path) -> None:
    quick = Script(healthy_after=1.0, exit_after=5.0)
    sim = Sim(root, quick, quick, quick, Script(healthy_after=1.0, exit_after=100.0), quick)

    async def scenario() -> None:
        await sim.until(lambda: len(sim.runtime.servers) == 5, within=300)
        await sim.reach(State.READY)

    sim.run(scenario)
    starts, backoffs = sim.at(State.STARTING), sim.at(State.BACKOFF)
    gaps = [round(s - b, 3) for s, b in zip(starts[1:], backoffs, strict=True)]
    assert gaps == [0, 1, 2, 0]  # the 4th run was READY for 99 s >= min_uptime: streak over
    backoff = [e["failures_in_window"] for e in sim.event("state") if e["to"] == "BACKOFF"]
    assert backoff == [1, 2, 3, 1]


def test_a_run_failing_before_min_uptime_is_not_counted_as_started(root: Path) -> None:
    short = Script(healthy_after=1.0, exit_after=50.0)  # READY 49 s < min_uptime 60 s
    sim = Sim(root, default=short)

    async def scenario() -> None:
        await sim.reach(State.FATAL, within=400)

    sim.run(scenario)
    assert len(sim.runtime.servers) == 5


def test_fatal_cool_down_elapsed_starts_the_server_again(root: Path) -> None:
    sim = Sim(root, *[CRASH_SERVING] * 5, default=Script(healthy_after=1.0))

    async def scenario() -> None:
        fatal_at = await sim.reach(State.FATAL, within=200)
        await sim.idle(1799)
        assert sim.sup.state is State.FATAL and len(sim.runtime.servers) == 5
        started = await sim.reach(State.STARTING, within=2)
        assert started == pytest.approx(fatal_at + 1800)
        await sim.reach(State.READY)
        assert sim.sup.status()["failures_in_window"] == 0

    sim.run(scenario)
    assert sim.transitions[-3][2] is State.READY
    assert sim.sup.reason == "shutdown complete"
    assert [e["reason"] for e in sim.event("state") if e["to"] == "STARTING"][-1] == \
        "FATAL cool-down elapsed"


def test_same_early_exit_twice_is_fatal_by_evidence_after_two_spawns(root: Path) -> None:
    sim = Sim(root, default=Script(healthy_after=None, exit_after=3.0, last_lines=(EARLY_EXIT,)))

    async def scenario() -> None:
        await sim.reach(State.FATAL, within=60)
        await sim.idle(600)  # far past any backoff: no third spawn

    sim.run(scenario)
    assert len(sim.runtime.servers) == 2
    assert sim.path()[:4] == ["STARTING", "BACKOFF", "STARTING", "FATAL"]
    assert "twice in a row before answering /health" in sim.sup.last_failure["message"]  # type: ignore[index]


def test_different_early_exits_are_retried_with_backoff_not_fatal_by_evidence(
        root: Path) -> None:
    lines = ("OSError: disk busy", "ConnectionResetError: peer gone", "KeyError: 'rope'")
    scripts = [Script(healthy_after=None, exit_after=3.0, last_lines=(line,)) for line in lines]
    sim = Sim(root, *scripts, default=Script(healthy_after=1.0))

    async def scenario() -> None:
        await sim.until(lambda: len(sim.runtime.servers) == 4, within=60)
        await sim.reach(State.READY)

    sim.run(scenario)
    assert State.FATAL not in {new for _, _, new in sim.transitions}


def test_program_not_found_is_fatal_at_once_without_a_retry(root: Path) -> None:
    sim = Sim(root, Script(spawn_error=FileNotFoundError(2, "No such file")))

    async def scenario() -> None:
        await sim.reach(State.FATAL)
        await sim.idle(1000)

    sim.run(scenario)
    assert sim.path()[:2] == ["STARTING", "FATAL"]
    assert sim.sup.last_failure is not None and sim.sup.last_failure["kind"] == "spawn"
    assert sim.runtime.servers == []


def test_canary_rejected_while_warming_is_fatal_at_once(root: Path) -> None:
    sim = Sim(root, Script(healthy_after=1.0, canary="reject"))

    async def scenario() -> None:
        await sim.reach(State.FATAL)

    sim.run(scenario)
    assert sim.path()[:3] == ["STARTING", "WARMING", "FATAL"]
    assert len(sim.runtime.servers) == 1 and sim.sup.last_failure["kind"] == "canary-rejected"  # type: ignore[index]


def test_engine_process_death_while_ready_kills_the_server_at_once_and_restarts(
        root: Path) -> None:
    sim = Sim(root, default=Script(healthy_after=1.0, ignores_sigterm=True))

    async def scenario() -> None:
        await sim.reach(State.READY)
        first = sim.runtime.current
        assert first is not None
        sim.runtime.crash_worker(first)
        await sim.reach(State.STARTING)
        # SIGKILL at once, no grace: a server without its engine cannot serve
        assert not first.running and first.signalled[-1] == signal.SIGKILL
        await sim.reach(State.READY)

    sim.run(scenario)
    assert sim.sup.last_failure is not None and sim.sup.last_failure["kind"] == "engine-died"


def test_stop_escalates_to_sigkill_after_the_grace_when_sigterm_is_ignored(root: Path) -> None:
    sim = Sim(root, default=Script(healthy_after=1.0, ignores_sigterm=True))

    async def scenario() -> None:
        await sim.reach(State.READY)

    sim.run(scenario)
    [stopped] = sim.event("server_stopped")
    assert stopped["why"] == "shutdown" and not stopped["graceful"]
    assert stopped["seconds"] == pytest.approx(20.0, abs=0.1)  # server.stop_grace
    assert sim.runtime.servers[0].signalled == [signal.SIGTERM, signal.SIGKILL]


def test_server_process_stop_is_graceful_when_the_group_ends_on_sigterm(root: Path) -> None:
    loop = VirtualTimeLoop()
    runtime = FakeRuntime(loop, Script(workers=2, term_seconds=3.0))

    async def scenario() -> None:
        server = ServerProcess(["vllm", "serve"], {}, None, ServerOutput(None, 10),
                               runtime=runtime)
        await server.start()
        assert server.refresh_members() and len(server.members()) == 3
        report = await server.stop(20.0)
        assert report.graceful and report.killed == [] and report.survivors == []
        assert len(report.signalled) == 3 and report.seconds == pytest.approx(3.0, abs=0.1)

    try:
        loop.run_until_complete(scenario())
    finally:
        loop.close()
    assert runtime.alive() == []


def test_model_directory_gone_parks_in_fatal_before_another_spawn(root: Path) -> None:
    sim = Sim(root, CRASH_SERVING, default=Script(healthy_after=1.0))

    async def scenario() -> None:
        await sim.reach(State.READY)
        (root / "model").rename(root / "moved")
        await sim.reach(State.FATAL, within=30)
        assert len(sim.runtime.servers) == 1
        (root / "moved").rename(root / "model")
        sim.sup.request(Request.RESET, "SIGHUP")
        await sim.reach(State.READY)

    sim.run(scenario)
    assert sim.path()[:6] == ["STARTING", "WARMING", "READY", "BACKOFF", "FATAL", "STARTING"]
    assert [e.get("kind") for e in sim.event("state") if e["to"] == "FATAL"] == ["model-missing"]


def test_a_previous_daemons_server_is_stopped_before_the_first_spawn(root: Path) -> None:
    sim = Sim(root, Script(workers=1), default=Script(healthy_after=1.0))
    old = sim.loop.run_until_complete(sim.runtime.spawn(["vllm"], {}, None,
                                                        ServerOutput(None, 10)))
    members = [old.leader.ident.as_dict(), *(w.ident.as_dict() for w in old.workers)]
    (root / "server.pid").write_text(json.dumps(
        {"daemon_pid": 1, "pgid": old.pid, "leader": members[0], "members": members}))

    async def scenario() -> None:
        await sim.reach(State.READY)

    sim.run(scenario)
    [orphans] = sim.event("orphans")
    assert orphans["source"] == "pidfile" and len(orphans["processes"]) == 2
    assert old.signalled == [signal.SIGTERM] and not old.running
    assert len(sim.runtime.servers) == 2


# --- parking --------------------------------------------------------------------------------------


class Drift:
    """A gate like the integrity guards': blocks with QUARANTINED while `drifted`."""

    def __init__(self) -> None:
        self.drifted = False
        self.checked = 0

    async def __call__(self) -> Blocked | None:
        self.checked += 1
        if self.drifted:
            return Blocked(State.QUARANTINED, "weights drifted: CHANGED model.safetensors",
                           {"guard": "integrity"})
        return None


def test_quarantine_gate_blocks_every_start_until_the_files_verify(root: Path) -> None:
    sim = Sim(root, default=Script(healthy_after=1.0))
    gate = Drift()
    gate.drifted = True
    sim.sup.add_gate(gate)

    async def scenario() -> None:
        await sim.reach(State.QUARANTINED)
        await sim.idle(3600)
        assert sim.runtime.servers == [] and sim.sup.state is State.QUARANTINED
        sim.sup.request(Request.RESET, "SIGHUP")  # re-checks: still drifted
        await sim.until(lambda: bool(sim.event("still_blocked")), within=1)
        assert sim.runtime.servers == [] and sim.sup.state is State.QUARANTINED
        gate.drifted = False
        sim.sup.request(Request.RELEASE, "weights verify again")
        await sim.reach(State.READY)

    sim.run(scenario)
    assert sim.path()[:2] == ["QUARANTINED", "STARTING"]
    assert len(sim.runtime.servers) == 1


def test_quarantine_request_while_ready_stops_the_server_and_parks_it(root: Path) -> None:
    sim = Sim(root, default=Script(healthy_after=1.0))
    gate = Drift()
    sim.sup.add_gate(gate)

    async def scenario() -> None:
        await sim.reach(State.READY)
        gate.drifted = True
        sim.sup.request(Request.QUARANTINE, "weights drifted", guard="integrity")
        await sim.reach(State.QUARANTINED)
        await sim.until(lambda: sim.runtime.current is None, within=30)
        await sim.idle(600)
        assert len(sim.runtime.servers) == 1

    sim.run(scenario)
    assert sim.runtime.servers[0].signalled[0] == signal.SIGTERM  # stopped with its grace


def test_block_restart_keeps_the_running_server_and_refuses_the_next_start(root: Path) -> None:
    sim = Sim(root, Script(healthy_after=1.0, exit_after=500.0), default=Script(healthy_after=1.0))
    gate = Drift()
    sim.sup.add_gate(gate)

    async def scenario() -> None:
        await sim.reach(State.READY)
        gate.drifted = True  # software drift under block-restart: no request, only the gate
        sim.sup.set_degraded("environment", "software drifted — new starts are refused")
        await sim.idle(400)
        server = sim.runtime.current
        assert server is not None and server.signalled == [] and sim.sup.serving()
        await sim.reach(State.QUARANTINED, within=200)  # it exits at 500 s: no restart
        await sim.idle(3600)
        assert len(sim.runtime.servers) == 1
        gate.drifted = False
        sim.sup.set_degraded("environment", None)
        sim.sup.request(Request.RELEASE, "software verifies again")
        await sim.reach(State.READY)

    sim.run(scenario)
    assert sim.path()[:6] == ["STARTING", "WARMING", "READY", "BACKOFF", "QUARANTINED",
                              "STARTING"]


def test_release_does_not_end_fatal_only_restart_or_reset_does(root: Path) -> None:
    sim = Sim(root, *[CRASH_SERVING] * 5, default=Script(healthy_after=1.0))

    async def scenario() -> None:
        await sim.reach(State.FATAL, within=200)
        sim.sup.request(Request.RELEASE, "files verify again")
        await sim.idle(60)
        assert sim.sup.state is State.FATAL and len(sim.runtime.servers) == 5
        sim.sup.request(Request.RESET, "SIGHUP")
        await sim.reach(State.READY)
        assert sim.sup.status()["failures_in_window"] == 0

    sim.run(scenario)


def test_quarantine_during_fatal_moves_to_quarantined_and_waits_for_release(root: Path) -> None:
    sim = Sim(root, *[CRASH_SERVING] * 5, default=Script(healthy_after=1.0))

    async def scenario() -> None:
        await sim.reach(State.FATAL, within=200)
        sim.sup.request(Request.QUARANTINE, "weights drifted")
        await sim.reach(State.QUARANTINED)
        await sim.idle(3600)  # the FATAL cool-down does not apply any more
        assert len(sim.runtime.servers) == 5
        sim.sup.request(Request.RELEASE, "weights verify again")
        await sim.reach(State.READY)

    sim.run(scenario)


# --- request priorities ---------------------------------------------------------------------------


def test_shutdown_wins_over_quarantine_and_restart_requested_at_once(root: Path) -> None:
    sim = Sim(root, default=Script(healthy_after=1.0))

    async def scenario() -> None:
        await sim.reach(State.READY)
        sim.sup.request(Request.RESTART, "operator")
        sim.sup.request(Request.QUARANTINE, "weights drifted")
        sim.sup.request(Request.SHUTDOWN, "SIGTERM")
        assert sim.task is not None
        await sim.task

    sim.run(scenario)
    assert sim.path()[-3:] == ["READY", "STOPPING", "STOPPED"]
    assert len(sim.runtime.servers) == 1


def test_quarantine_wins_over_restart_requested_at_once(root: Path) -> None:
    sim = Sim(root, default=Script(healthy_after=1.0))

    async def scenario() -> None:
        await sim.reach(State.READY)
        sim.sup.request(Request.RESTART, "operator")
        sim.sup.request(Request.QUARANTINE, "weights drifted")
        await sim.reach(State.QUARANTINED)
        await sim.idle(600)

    sim.run(scenario)
    assert len(sim.runtime.servers) == 1 and State.BACKOFF not in {n for _, _, n in
                                                                  sim.transitions}


def test_restart_request_while_ready_restarts_with_a_clean_failure_history(root: Path) -> None:
    sim = Sim(root, CRASH_SERVING, CRASH_SERVING, default=Script(healthy_after=1.0))

    async def scenario() -> None:
        await sim.until(lambda: len(sim.runtime.servers) == 3, within=100)
        await sim.reach(State.READY)
        assert sim.sup.status()["failures_in_window"] == 2
        sim.sup.request(Request.RESTART, "sovereignd restart")
        await sim.until(lambda: len(sim.runtime.servers) == 4, within=60)
        await sim.reach(State.READY)

    sim.run(scenario)
    assert sim.sup.status()["failures_in_window"] == 0
    assert sim.runtime.servers[2].signalled[0] == signal.SIGTERM  # drained with SIGTERM


def test_sighup_reset_does_not_end_a_ready_run(root: Path) -> None:
    sim = Sim(root, default=Script(healthy_after=1.0))

    async def scenario() -> None:
        await sim.reach(State.READY)
        sim.sup.request(Request.RESET, "SIGHUP")
        sim.sup.request(Request.RELEASE, "files verify again")
        await sim.idle(120)
        assert sim.sup.state is State.READY and len(sim.runtime.servers) == 1

    sim.run(scenario)
    assert sim.runtime.servers[0].signalled == [signal.SIGTERM]  # only the shutdown's


def test_restart_request_during_backoff_starts_at_once(root: Path) -> None:
    sim = Sim(root, *[CRASH_SERVING] * 3, default=Script(healthy_after=1.0))

    async def scenario() -> None:
        await sim.until(lambda: len(sim.at(State.BACKOFF)) == 3, within=100)
        waited_from = sim.loop.time()  # this backoff is 2 s
        sim.sup.request(Request.RESTART, "operator")
        started = await sim.reach(State.STARTING, within=1)
        assert started == pytest.approx(waited_from)
        await sim.reach(State.READY)
        assert sim.sup.status()["failures_in_window"] == 0

    sim.run(scenario)


def test_shutdown_during_backoff_stops_without_another_start(root: Path) -> None:
    sim = Sim(root, *[CRASH_SERVING] * 3)

    async def scenario() -> None:
        await sim.until(lambda: len(sim.at(State.BACKOFF)) == 3, within=100)
        sim.sup.request(Request.SHUTDOWN, "SIGTERM")
        assert sim.task is not None
        await sim.task

    sim.run(scenario)
    assert sim.path()[-3:] == ["BACKOFF", "STOPPING", "STOPPED"]
    assert len(sim.runtime.servers) == 3


def test_quarantine_during_backoff_parks_without_another_start(root: Path) -> None:
    sim = Sim(root, *[CRASH_SERVING] * 3, default=Script(healthy_after=1.0))

    async def scenario() -> None:
        await sim.until(lambda: len(sim.at(State.BACKOFF)) == 3, within=100)
        sim.sup.request(Request.QUARANTINE, "weights drifted")
        await sim.reach(State.QUARANTINED, within=1)
        await sim.idle(600)
        assert len(sim.runtime.servers) == 3

    sim.run(scenario)


# --- the state table ------------------------------------------------------------------------------


def test_a_transition_outside_the_table_is_refused(root: Path) -> None:
    sim = Sim(root)
    with pytest.raises(TransitionError):
        sim.sup._transition(State.READY, "skipping STARTING")  # the guard itself
    assert sim.sup.state is State.STOPPED and sim.transitions == []
    sim.loop.close()


# --- start timeout, canary, unhealthy streak --------------------------------------------------


def test_health_never_200_within_start_timeout_fails_the_start_and_restarts(root: Path) -> None:
    sim = Sim(root, Script(healthy_after=None), default=Script(healthy_after=1.0),
              server="start_timeout: 30s")

    async def scenario() -> None:
        failed_at = await sim.reach(State.BACKOFF, within=60)
        assert failed_at == pytest.approx(30.0, abs=0.3)
        assert not sim.sup.serving()
        await sim.reach(State.READY)

    sim.run(scenario)
    assert sim.path()[:5] == ["STARTING", "BACKOFF", "STARTING", "WARMING", "READY"]
    [failure] = sim.event("failure")
    assert failure["kind"] == "start-timeout"
    assert "/health did not answer 200 within server.start_timeout (30s" in failure["message"]
    # Not deterministic (a slow disk, a large model): retried, the first time at once; the
    # stuck server is stopped with its grace (it may be a live one, loading).
    [backoff] = [e for e in sim.event("state") if e["to"] == "BACKOFF"]
    assert backoff["delay_s"] == 0
    assert sim.runtime.servers[0].signalled == [signal.SIGTERM]
    assert sim.at(State.STARTING)[1] == pytest.approx(sim.at(State.BACKOFF)[0] + 0.5, abs=0.01)


def test_no_health_probe_begins_past_start_timeout(root: Path) -> None:
    """A server that would answer /health only just after start_timeout is a start timeout,
    not READY through a last probe begun past the deadline (as the canary's loop)."""
    sim = Sim(root, Script(healthy_after=30.1), default=Script(healthy_after=1.0),
              server="start_timeout: 30s")

    async def scenario() -> None:
        await sim.reach(State.BACKOFF, within=60)
        await sim.reach(State.READY)

    sim.run(scenario)
    assert sim.path()[:2] == ["STARTING", "BACKOFF"]
    [failure] = sim.event("failure")
    assert failure["kind"] == "start-timeout"


def test_start_timeouts_in_a_row_back_off_then_end_in_a_crash_loop_fatal(root: Path) -> None:
    sim = Sim(root, default=Script(healthy_after=None), server="start_timeout: 10s")

    async def scenario() -> None:
        await sim.reach(State.FATAL, within=200)

    sim.run(scenario)
    assert len(sim.runtime.servers) == 5
    assert {e["kind"] for e in sim.event("failure")} == {"start-timeout"}
    assert [e["delay_s"] for e in sim.event("state") if e["to"] == "BACKOFF"] == [0, 1, 2, 4]


def test_a_late_canary_while_warming_makes_the_server_ready_only_once_it_answers(
        root: Path) -> None:
    sim = Sim(root, Script(healthy_after=2.0, canary_seconds=12.0))

    async def scenario() -> None:
        warming = await sim.reach(State.WARMING)
        await sim.idle(11.0)
        assert sim.sup.state is State.WARMING and sim.sup.upstream() is None
        ready = await sim.reach(State.READY, within=2)
        assert ready - warming == pytest.approx(12.0, abs=0.01)

    sim.run(scenario)
    [ready_event] = [e for e in sim.event("state") if e["to"] == "READY"]
    assert ready_event["canary_ms"] == pytest.approx(12000, abs=1)
    assert sim.event("failure") == [] and sim.event("probe_failed") == []


def test_a_canary_that_never_answers_while_warming_fails_the_start_at_its_timeout(
        root: Path) -> None:
    sim = Sim(root, Script(healthy_after=1.0, canary_seconds=10_000.0),
              default=Script(healthy_after=1.0), server="start_timeout: 60s")

    async def scenario() -> None:
        failed_at = await sim.reach(State.BACKOFF, within=100)
        assert 60.0 <= failed_at <= 60.25  # not later: the canary is cut short
        await sim.reach(State.READY)

    sim.run(scenario)
    assert sim.path()[:3] == ["STARTING", "WARMING", "BACKOFF"]
    [failure] = sim.event("failure")
    assert failure["kind"] == "start-timeout"
    assert "the canary request (/v1/chat/completions) did not succeed within " \
        "server.start_timeout" in failure["message"]
    # Two canaries, each given the canary_timeout (30 s) or what is left of start_timeout.
    assert [e["detail"] for e in sim.event("probe_failed")] == \
        ["no answer within 30s", "no answer within 28.75s"]


def test_unhealthy_streak_of_health_failures_while_ready_restarts_the_server(
        root: Path) -> None:
    sim = Sim(root, Script(healthy_after=1.0), default=Script(healthy_after=1.0),
              health="failures: 4, canary_interval: 1h")

    async def scenario() -> None:
        await sim.reach(State.READY)
        await sim.idle(10.5)
        first = sim.runtime.current
        assert first is not None
        first.script.healthy_after = None  # /health refuses from now on
        broke_at = sim.loop.time()
        failed_at = await sim.reach(State.BACKOFF, within=10)
        assert 3.0 < failed_at - broke_at <= 4.0  # the 4th probe (1 s apart) after it
        await sim.reach(State.READY)

    sim.run(scenario)
    failed = [e for e in sim.event("probe_failed") if e["state"] == "READY"]
    assert [e["kind"] for e in failed] == ["health"] * 4
    [failure] = sim.event("failure")
    assert failure["kind"] == "unhealthy" and "failed 4 times in a row" in failure["message"]
    assert sim.runtime.servers[0].signalled[0] == signal.SIGTERM  # drained with its grace
    assert len(sim.runtime.servers) == 2


def test_failed_health_probes_fewer_than_the_streak_do_not_restart(root: Path) -> None:
    sim = Sim(root, default=Script(healthy_after=1.0), health="failures: 3, canary_interval: 1h")

    async def scenario() -> None:
        await sim.reach(State.READY)
        server = sim.runtime.current
        assert server is not None
        for _ in range(3):  # three times two failures, each time followed by a good probe
            await sim.idle(10.5 - sim.loop.time() % 1)
            server.script.healthy_after = None
            await sim.idle(2.0)
            assert sim.sup.probe_stats["consecutive_failures"] == 2
            server.script.healthy_after = 0.0
        await sim.idle(60)
        assert sim.sup.probe_stats["consecutive_failures"] == 0

    sim.run(scenario)
    assert len(sim.runtime.servers) == 1 and sim.event("failure") == []
    assert len([e for e in sim.event("probe_failed") if e["state"] == "READY"]) == 6


def test_a_failed_canary_while_ready_stops_new_traffic_until_a_canary_answers(
        root: Path) -> None:
    sim = Sim(root, default=Script(healthy_after=1.0))

    async def scenario() -> None:
        await sim.reach(State.READY)
        server = sim.runtime.current
        assert server is not None and sim.sup.upstream() is not None
        server.script.canary = "fail"
        await sim.until(lambda: bool(sim.event("suspect")), within=6)
        # READY (the process is fine) but suspect: /readyz 503, nothing forwarded.
        assert sim.sup.state is State.READY and not sim.sup.serving()
        assert sim.sup.upstream() is None
        server.script.canary = "ok"
        await sim.until(lambda: bool(sim.event("suspect_cleared")), within=2)
        assert sim.sup.serving() and sim.sup.upstream() is not None
        await sim.idle(60)

    sim.run(scenario)
    assert len(sim.runtime.servers) == 1 and sim.event("failure") == []
    assert sim.event("suspect_cleared")[0]["reason"] == \
        "canary request (/v1/chat/completions) answered"


def test_canary_failures_while_ready_in_a_row_restart_the_server(root: Path) -> None:
    sim = Sim(root, Script(healthy_after=1.0), default=Script(healthy_after=1.0))

    async def scenario() -> None:
        await sim.reach(State.READY)
        server = sim.runtime.current
        assert server is not None
        server.script.canary = "fail"
        await sim.reach(State.BACKOFF, within=10)
        await sim.reach(State.READY)

    sim.run(scenario)
    failed = [e for e in sim.event("probe_failed") if e["state"] == "READY"]
    assert [e["kind"] for e in failed] == ["canary"] * 3  # a failed canary is retried at once
    [failure] = sim.event("failure")
    assert failure["kind"] == "unhealthy" and "canary probe failed 3 times" in failure["message"]
    assert len(sim.event("suspect")) == 1


# --- the stall watch ---------------------------------------------------------------------------
# The gateway's side, as the proxy keeps it: `metrics.upstream_pending` (requests sent to the
# server and not yet answered by it in full) and `metrics.upstream_progress` (the time of the
# last byte from the server). The server's side: FakeProbes.tokens (vLLM's token counters).
# The canary is kept out of the way (canary_interval: 1h) unless a test says otherwise.

STALL = "canary_interval: 1h, stall_timeout: 8s, stall_restart: 25s"


def _busy(sim: Sim, pending: int = 1) -> float:
    """A request forwarded now (its bytes, if any, are for the test to give); now."""
    sim.sup.metrics.upstream_pending = pending
    return sim.loop.time()


def _byte(sim: Sim) -> None:
    sim.sup.metrics.upstream_progress = sim.loop.time()


def test_stall_work_without_progress_is_suspect_then_confirmed_and_killed_at_once(
        root: Path) -> None:
    sim = Sim(root, Script(healthy_after=1.0), default=Script(healthy_after=1.0), health=STALL)
    sim.probes.tokens = 500.0  # counters readable, and standing still

    async def scenario() -> None:
        await sim.reach(State.READY)
        await sim.idle(30)
        stalled = sim.runtime.current
        assert stalled is not None
        since = _busy(sim)
        await sim.until(lambda: bool(sim.event("suspect")), within=10)
        # The watch looks every STALL_LOOK (1 s): it sees the work within 1 s, the stall
        # within 1 s of stall_timeout after that.
        assert 8.0 <= sim.loop.time() - since <= 10.01
        assert sim.sup.state is State.READY and not sim.sup.serving()
        assert sim.sup.upstream() is None
        await sim.idle(since + 32.9 - sim.loop.time())
        assert sim.sup.state is State.READY and stalled.signalled == []  # not yet confirmed
        await sim.until(lambda: bool(sim.event("failure")), within=3)
        assert 33.0 <= sim.loop.time() - since <= 35.01
        sim.sup.metrics.upstream_pending = 0  # the gateway's request failed with the server
        await sim.reach(State.READY)

    sim.run(scenario)
    [failure] = sim.event("failure")
    assert failure["kind"] == "stall" and "token counters stood still" in failure["message"]
    # A stalled engine has nothing to drain: SIGKILL, no SIGTERM and grace first.
    assert sim.runtime.servers[0].signalled == [signal.SIGKILL]
    stalls = sim.sup.metrics.stalls
    assert [stalls.labels(stage=s)._value.get() for s in ("suspected", "confirmed")] == [1, 1]
    assert sim.probes.metrics_reads > 0


def test_stall_suspicion_clears_when_the_server_makes_progress_again(root: Path) -> None:
    sim = Sim(root, default=Script(healthy_after=1.0), health=STALL)
    sim.probes.tokens = 500.0

    async def scenario() -> None:
        await sim.reach(State.READY)
        _busy(sim)
        await sim.until(lambda: bool(sim.event("suspect")), within=10)
        await sim.idle(5)
        _byte(sim)  # a byte from the server to the request
        await sim.until(lambda: bool(sim.event("suspect_cleared")), within=1.5)
        assert sim.sup.serving() and sim.sup.upstream() is not None
        for _ in range(100):  # the request goes on, with bytes now and then
            await sim.idle(5)
            _byte(sim)
        sim.sup.metrics.upstream_pending = 0
        await sim.idle(100)

    sim.run(scenario)
    assert len(sim.runtime.servers) == 1 and sim.event("failure") == []
    assert len(sim.event("suspect")) == 1
    assert sim.event("suspect_cleared")[0]["reason"] == "the server makes progress again"


def test_stall_a_server_whose_counters_move_is_busy_not_stalled(root: Path) -> None:
    # A long answer that is not streamed sends no byte until it is complete; vLLM's token
    # counters show that it is being generated.
    sim = Sim(root, default=Script(healthy_after=1.0), health=STALL)
    sim.probes.tokens = 0.0

    async def scenario() -> None:
        await sim.reach(State.READY)
        _busy(sim, pending=32)
        for _ in range(300):
            await sim.idle(1.0)
            assert sim.probes.tokens is not None
            sim.probes.tokens += 7

    sim.run(scenario)
    assert sim.event("suspect") == [] and len(sim.runtime.servers) == 1


def test_stall_bytes_that_arrive_while_the_counters_are_read_are_progress(root: Path) -> None:
    # A loaded host: a 1.5 s pause in the bytes makes the watch read the counters, which takes
    # 5 s (health.timeout); the bytes flow again meanwhile. Judged by what it saw before the
    # read, the watch would call 6.5 s of silence a stall (stall_timeout 4 s).
    sim = Sim(root, default=Script(healthy_after=1.0),
              health="canary_interval: 1h, stall_timeout: 4s, timeout: 5s")
    sim.probes.tokens = 500.0
    sim.probes.metrics_seconds = 60.0

    async def scenario() -> None:
        await sim.reach(State.READY)
        _busy(sim, pending=32)
        for _ in range(20):
            for _ in range(10):  # bytes every 0.25 s for 2.5 s ...
                _byte(sim)
                await sim.idle(0.25)
            await sim.idle(1.5)  # ... then none for 1.5 s
        assert sim.probes.metrics_reads > 0

    sim.run(scenario)
    assert sim.event("suspect") == [] and len(sim.runtime.servers) == 1


def test_stall_without_counters_is_suspect_but_never_confirmed(root: Path) -> None:
    # A server without vLLM's counters (or before it reports any): bytes are the only
    # evidence, and a non-streamed answer sends none until complete, so no restart.
    sim = Sim(root, default=Script(healthy_after=1.0), health=STALL)

    async def scenario() -> None:
        await sim.reach(State.READY)
        _busy(sim)
        await sim.until(lambda: bool(sim.event("suspect")), within=10)
        await sim.idle(600)
        assert sim.sup.state is State.READY and not sim.sup.serving()

    sim.run(scenario)
    assert len(sim.runtime.servers) == 1 and sim.event("failure") == []


def test_stall_idle_server_is_never_suspect(root: Path) -> None:
    # No work in flight: silence is not a stall, for however long.
    sim = Sim(root, default=Script(healthy_after=1.0), health=STALL)
    sim.probes.tokens = 500.0

    async def scenario() -> None:
        await sim.reach(State.READY)
        _busy(sim)
        await sim.idle(3)
        _byte(sim)  # answered
        sim.sup.metrics.upstream_pending = 0
        await sim.idle(3600)
        assert sim.sup.serving()

    sim.run(scenario)
    assert sim.event("suspect") == [] and sim.event("failure") == []
    assert sim.probes.metrics_reads <= 3  # counters read only while work is in flight


def test_stall_a_canary_in_flight_is_work_so_a_stall_on_an_idle_server_is_found(
        root: Path) -> None:
    # No client request: the canary is the only work, and it hangs (a SIGSTOPped engine whose
    # /health still answers 200). Suspect stall_timeout after it was sent, then confirmed.
    sim = Sim(root, Script(healthy_after=1.0), default=Script(healthy_after=1.0),
              health="canary_interval: 5s, stall_timeout: 8s, stall_restart: 25s")
    sim.probes.tokens = 500.0

    async def scenario() -> None:
        ready = await sim.reach(State.READY)
        server = sim.runtime.current
        assert server is not None
        server.script.canary_seconds = 10_000.0
        await sim.until(lambda: bool(sim.event("suspect")), within=20)
        assert 5 + 8 <= sim.loop.time() - ready <= 6 + 10.01  # canary sent at 5-6 s
        await sim.until(lambda: bool(sim.event("failure")), within=30)
        await sim.reach(State.READY)

    sim.run(scenario)
    [failure] = sim.event("failure")
    assert failure["kind"] == "stall"
    assert sim.runtime.servers[0].signalled == [signal.SIGKILL]


def test_a_canary_answering_late_while_the_counters_move_is_not_a_failure(root: Path) -> None:
    sim = Sim(root, default=Script(healthy_after=1.0), health="canary_interval: 5s")
    sim.probes.tokens = 0.0

    async def scenario() -> None:
        await sim.reach(State.READY)
        server = sim.runtime.current
        assert server is not None
        server.script.canary_seconds = 45.0  # past canary_timeout (30 s): a busy server
        _busy(sim, pending=32)
        for _ in range(200):
            await sim.idle(1.0)
            assert sim.probes.tokens is not None
            sim.probes.tokens += 7

    sim.run(scenario)
    assert len(sim.event("canary_late")) >= 3
    assert sim.event("suspect") == [] and sim.event("failure") == []
    assert len(sim.runtime.servers) == 1
