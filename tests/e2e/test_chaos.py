"""The chaos tier: faults done to the real vLLM (CPU build) under one daemon with the default
supervision settings. kill -9 of the API server, of EngineCore, of a Worker, and SIGSTOP of
EngineCore: each ends READY again, with nothing of the old server left (processes, /dev/shm),
and events and /metrics that say what happened. The scenarios share one daemon, in file order.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from sovereignd.config import HealthSection
from sovereignd.process.system import shared_memory
from tests.e2e.conftest import engine_processes, running, vllm_overrides
from tests.harness import Daemon, group_processes
from tests.helpers import wait_for

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(900)]

READY_TIMEOUT = 300
SHM = Path("/dev/shm")


def default_health() -> dict[str, object]:
    """The health section exactly as shipped (the harness's fast test timings removed)."""
    return {f.name: f.default for f in dataclasses.fields(HealthSection)}


@pytest.fixture(scope="module")
def chaos(tmp_path_factory: pytest.TempPathFactory,
          vllm_ready: tuple[Path, Path]) -> Iterator[Daemon]:
    venv, model = vllm_ready
    overrides = vllm_overrides(venv, model)
    overrides["health"] = default_health()
    overrides["restart"] = {"min_uptime": "5s", "max_failures": 10, "window": "10m"}
    d = Daemon(tmp_path_factory.mktemp("chaos"), overrides, fake=False)
    yield from running(d, "chaos-client")


def metric(d: Daemon, name: str, labels: str = "") -> float:
    text = d.get("/metrics")[1]
    assert isinstance(text, str)
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


@dataclasses.dataclass
class Before:
    pid: int
    members: list[psutil.Process]
    shm: set[str]
    restarts: float


def before(d: Daemon) -> Before:
    pid = d.wait_state("READY", timeout=READY_TIMEOUT)["server"]["pid"]
    members = group_processes(pid)
    assert len(members) >= 3
    shm: set[str] = set()
    for p in members:
        shm |= shared_memory(p.pid)
    return Before(pid, members, shm, metric(d, "sovereignd_restarts_total"))


def ready_again(d: Daemon, b: Before) -> dict[str, object]:
    """READY with a new server; nothing of the old one left; restarts counted once more."""
    def new_ready() -> dict[str, object] | None:
        st = d.status()
        ok = st["state"] == "READY" and st["server"] and st["server"]["pid"] != b.pid
        return st if ok else None

    st = wait_for(new_ready, READY_TIMEOUT, interval=0.5, what="READY with a new server")
    assert group_processes(b.pid) == []
    assert all(not p.is_running() for p in b.members)
    assert b.shm and not [n for n in b.shm if (SHM / n).exists()]
    assert metric(d, "sovereignd_restarts_total") == b.restarts + 1
    assert metric(d, "sovereignd_state", '{state="READY"}') == 1
    stopped = [e for e in d.events("server_stopped") if e["pid"] == b.pid]
    assert len(stopped) == 1 and stopped[0]["survivors"] == []
    return st


def wait_503(d: Daemon) -> None:
    wait_for(lambda: d.get("/readyz")[0] == 503, 60, interval=0.01, what="/readyz 503")


def test_kill_9_of_the_api_server_leaves_nothing_and_respawns(chaos: Daemon) -> None:
    d = chaos
    b = before(d)
    os.kill(b.pid, signal.SIGKILL)
    st = ready_again(d, b)
    assert st["last_exit"]["exit"] == "killed by SIGKILL (out of memory?)"  # type: ignore[index]
    stopped = next(e for e in d.events("server_stopped") if e["pid"] == b.pid)
    assert stopped["why"] == "exited" and set(stopped["shm_removed"]) <= b.shm
    names = {p["name"] for p in stopped["killed"]}
    assert {"VLLM::EngineCore", "VLLM::Worker"} <= names, stopped
    assert metric(d, "sovereignd_orphans_killed_total") >= 2
    assert metric(d, "sovereignd_shm_removed_total") >= len(stopped["shm_removed"]) > 0


@pytest.mark.parametrize("victim", ["VLLM::EngineCore", "VLLM::Worker"])
def test_kill_9_of_an_engine_process_fails_the_server_at_once(chaos: Daemon,
                                                             victim: str) -> None:
    d = chaos
    b = before(d)
    failures = metric(d, "sovereignd_server_failures_total", '{kind="engine-died"}')
    proc = engine_processes(b.pid)[victim]
    proc.kill()
    wait_503(d)
    ready_again(d, b)
    failure = [e for e in d.events("failure") if e["pid"] == b.pid][-1]
    assert failure["kind"] == "engine-died" and failure["process"]["pid"] == proc.pid
    assert failure["process"]["name"] == victim
    assert metric(d, "sovereignd_server_failures_total",
                  '{kind="engine-died"}') == failures + 1


def test_sigstop_of_engine_core_is_a_stall_found_and_restarted(chaos: Daemon) -> None:
    """/health keeps answering 200; the canary hangs: suspect (503), then a restart."""
    d = chaos
    b = before(d)
    engine = engine_processes(b.pid)["VLLM::EngineCore"]
    engine.suspend()
    try:
        wait_503(d)
        assert d.get("/readyz")[1]["state"] == "READY"  # suspect: still READY, no traffic
        ready_again(d, b)
    finally:
        if engine.is_running():
            engine.resume()
    failure = [e for e in d.events("failure") if e["pid"] == b.pid][-1]
    assert failure["kind"] == "stall", failure
    assert [e["event"] for e in d.events()
            if e["event"] in ("suspect", "failure")][-2:] == ["suspect", "failure"]
    assert metric(d, "sovereignd_stalls_total", '{stage="confirmed"}') == 1


def test_the_daemon_wrote_only_json_and_stops_clean(chaos: Daemon) -> None:
    d = chaos
    pid = d.wait_state("READY", timeout=READY_TIMEOUT)["server"]["pid"]
    assert d.stop(timeout=60) == 0
    assert group_processes(pid) == []
    for path in (d.stdout, d.stderr):
        for line in path.read_text().splitlines():
            assert isinstance(json.loads(line), dict), line
