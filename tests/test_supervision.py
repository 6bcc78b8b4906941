"""Supervision with the stand-in server for faults the real one cannot produce on demand:
a dead server's remains killed at once (shared memory too), the death of a descendant, a stall
with /health still 200, a failing event log; each figure in /metrics moves with its events."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from http.client import HTTPConnection, HTTPException
from pathlib import Path

import psutil
import pytest

from tests.harness import Daemon, group_processes, http
from tests.helpers import run_cli, wait_for

MakeDaemon = Callable[..., Daemon]
SHM = Path("/dev/shm")


def metric(d: Daemon, name: str, labels: str = "") -> float:
    """One sample of the daemon's /metrics (0 if absent)."""
    text = d.get("/metrics")[1]
    assert isinstance(text, str)
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def only_json_lines(d: Daemon) -> None:
    """Every line the daemon wrote on stdout and stderr is a JSON object."""
    for path in (d.stdout, d.stderr):
        for line in path.read_text().splitlines():
            assert isinstance(json.loads(line), dict), line


def fake_segments(pids: list[int]) -> list[Path]:
    return [SHM / f"sovereignd-fake-{pid}" for pid in pids]


def children(pid: int) -> list[int]:
    return [c.pid for c in psutil.Process(pid).children()]


def test_a_dead_servers_remains_are_killed_at_once_with_its_shared_memory(
        make_daemon: MakeDaemon) -> None:
    """kill -9 of the server's main process: its grandchildren (ignoring SIGTERM, holding
    /dev/shm segments) are SIGKILLed without a grace period, the segments removed, the server
    respawned; events and /metrics say so; stderr holds only JSON."""
    d = make_daemon({"server": {"stop_grace": "30s"}},
                    behaviour={"starts": [{"grandchildren": 2, "grandchildren_ignore_term": True,
                                           "shm": True}], "default": {}})
    d.start()
    d.wait_state("READY")
    pid = d.server_pid()
    kids = children(pid)
    segments = fake_segments(kids)
    wait_for(lambda: all(s.exists() for s in segments), 5, what="segments")
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: len(d.starts()) == 2, 10, what="a respawn")
    st = d.wait_state("READY")
    assert not any(psutil.pid_exists(k) and psutil.Process(k).status() != "zombie" for k in kids)
    assert not any(s.exists() for s in segments)
    assert not group_processes(pid)
    stopped = next(e for e in d.events("server_stopped") if e["pid"] == pid)
    assert stopped["why"] == "exited" and not stopped["graceful"]
    assert {k["pid"] for k in stopped["killed"]} == set(kids)  # SIGKILL, no SIGTERM wait
    assert sorted(stopped["shm_removed"]) == sorted(s.name for s in segments)
    [orphans] = d.events("orphans")
    assert {p["pid"] for p in orphans["processes"]} == set(kids)
    assert st["restarts"] == 1 and st["last_exit"]["returncode"] == -9
    assert metric(d, "sovereignd_restarts_total") == 1 == len(d.events("spawn")) - 1
    assert metric(d, "sovereignd_orphans_killed_total") == len(kids)
    assert metric(d, "sovereignd_shm_removed_total") == len(segments)
    kind = st["last_exit"]["kind"]
    assert metric(d, "sovereignd_server_failures_total", f'{{kind="{kind}"}}') == 1
    assert metric(d, "sovereignd_state", '{state="READY"}') == 1
    only_json_lines(d)


def test_the_death_of_a_descendant_fails_the_server_at_once(make_daemon: MakeDaemon) -> None:
    """A grandchild (an EngineCore) killed: /readyz 503 and a restart without waiting for the
    main process, which would keep answering /health."""
    d = make_daemon({"health": {"canary_interval": "1h"}},
                    behaviour={"starts": [{"grandchildren": 2}], "default": {}})
    d.start()
    d.wait_state("READY")
    pid = d.server_pid()
    victim = children(pid)[0]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: d.get("/readyz")[0] == 503, 5, what="/readyz 503")
    wait_for(lambda: len(d.starts()) == 2, 10, what="a respawn")
    d.wait_state("READY")
    # The engine's death is the run's failure (on a loaded machine a later retry may have
    # its own, e.g. an ephemeral port taken by another program, so look it up by kind).
    died = [e for e in d.events("failure") + d.events("exit") if e.get("kind") == "engine-died"]
    assert died, "no engine-died failure event"
    assert died[0]["process"]["pid"] == victim
    failure = d.events("failure")[-1]
    assert failure["kind"] == "engine-died"
    stopped = next(e for e in d.events("server_stopped") if e["pid"] == pid)
    assert stopped["why"] == "engine-died" and not group_processes(pid)
    assert metric(d, "sovereignd_server_failures_total", '{kind="engine-died"}') == 1
    assert metric(d, "sovereignd_restarts_total") == 1
    only_json_lines(d)


def _stream(d: Daemon, key: str, out: list[object]) -> None:
    """One long streamed completion through the gateway; its status or error in `out`."""
    conn = HTTPConnection("127.0.0.1", d.port, timeout=60)
    try:
        conn.request("POST", "/v1/completions",
                     body=json.dumps({"model": "model", "prompt": "x", "max_tokens": 10_000,
                                      "stream": True}),
                     headers={"Authorization": f"Bearer {key}",
                              "Content-Type": "application/json"})
        resp = conn.getresponse()
        out.append(resp.status)
        resp.read()
    except (OSError, HTTPException) as exc:  # the stalled server is killed mid-stream
        out.append(exc)
    finally:
        conn.close()


def test_a_stall_with_health_ok_turns_ready_503_then_restarts(make_daemon: MakeDaemon) -> None:
    """Generation stops while /health answers 200 and a stream is in flight: suspect (503, no
    new traffic) after stall_timeout, restart after stall_restart more; then READY again."""
    d = make_daemon({"health": {"stall_timeout": "1s", "stall_restart": "2s",
                                "canary_interval": "1h", "canary_timeout": "30s"}},
                    behaviour={"starts": [{"tokens": 10_000, "stream_delay": 0.05}],
                               "default": {}})
    key = run_cli("keys", "add", "stall-client", "--config", str(d.config_path)).stdout.strip()
    d.start()
    d.wait_state("READY")
    out: list[object] = []
    t = threading.Thread(target=_stream, args=(d, key, out), daemon=True)
    t.start()
    wait_for(lambda: metric(d, "sovereignd_requests_in_flight") == 1, 10, what="in flight")
    http("POST", f"http://127.0.0.1:{d.server_port}/fake/stall", timeout=5)
    assert metric(d, "sovereignd_requests_at_server") == 1  # a stalled answer: work there

    def suspect() -> dict[str, object] | None:
        code, body = d.get("/readyz")
        return body if code == 503 and body.get("suspect") else None

    body = wait_for(suspect, 10, what="/readyz 503 while suspect")
    assert body["state"] == "READY" and "no progress" in str(body["suspect"])
    wait_for(lambda: len(d.starts()) == 2, 15, what="a restart after the stall")
    st = d.wait_state("READY")
    t.join(30)
    assert st["last_exit"]["kind"] == "stall"
    assert [e["event"] for e in d.events() if e["event"] in ("suspect", "failure")] == [
        "suspect", "failure"]
    assert metric(d, "sovereignd_stalls_total", '{stage="suspected"}') == 1
    assert metric(d, "sovereignd_stalls_total", '{stage="confirmed"}') == 1
    assert metric(d, "sovereignd_server_failures_total", '{kind="stall"}') == 1
    assert metric(d, "sovereignd_restarts_total") == 1
    only_json_lines(d)


def test_a_busy_server_that_streams_is_never_suspected(make_daemon: MakeDaemon) -> None:
    """Streams that keep producing bytes for longer than stall_timeout + stall_restart: no
    suspicion, no restart."""
    d = make_daemon({"health": {"stall_timeout": "1s", "stall_restart": "1s"}},
                    behaviour={"default": {"tokens": 80, "stream_delay": 0.05}})
    key = run_cli("keys", "add", "busy-client", "--config", str(d.config_path)).stdout.strip()
    d.start()
    d.wait_state("READY")
    outs: list[list[object]] = [[] for _ in range(4)]
    threads = [threading.Thread(target=_stream, args=(d, key, o), daemon=True) for o in outs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [o for o in outs] == [[200]] * 4
    assert not d.events("suspect") and len(d.starts()) == 1
    assert metric(d, "sovereignd_stalls_total", '{stage="suspected"}') == 0


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_an_answer_waiting_for_its_client_to_read_is_no_work_at_the_server(
        make_daemon: MakeDaemon, stream: bool) -> None:
    """A client that does not read a large answer (12 MB of JSON, or 20 MB of SSE): the
    request is in flight at the gateway, but the gateway waits on the client, not the server,
    so the stall watch sees no work and no stall (while requests_in_flight was its measure of
    work: suspect after stall_timeout, then the restart of a healthy server, whose counters
    stood still because nobody read from it)."""
    d = make_daemon({"health": {"stall_timeout": "1s", "stall_restart": "1s",
                                "canary_interval": "1h"}},
                    behaviour={"default": {"tokens": 3_000_000, "token_text": "x" * 1000}})
    key = run_cli("keys", "add", "slow-reader", "--config", str(d.config_path)).stdout.strip()
    d.start()
    d.wait_state("READY")
    conn = HTTPConnection("127.0.0.1", d.port, timeout=60)
    try:
        conn.request("POST", "/v1/completions",
                     body=json.dumps({"model": "model", "prompt": "x", "stream": stream,
                                      "max_tokens": 20_000 if stream else 3_000_000}),
                     headers={"Authorization": f"Bearer {key}",
                              "Content-Type": "application/json"})
        resp = conn.getresponse()  # the head only: the body waits in the gateway
        assert resp.status == 200
        wait_for(lambda: metric(d, "sovereignd_requests_in_flight") == 1, 10,
                 what="the request in flight at the gateway")
        # The whole answer cannot sit in the socket buffers: the gateway waits on the client.
        assert len(resp.read1(1)) == 1
        time.sleep(4.0)  # stall_timeout + stall_restart + 2 looks of the watch, not reading
        assert metric(d, "sovereignd_requests_in_flight") == 1
        assert metric(d, "sovereignd_requests_at_server") == 0  # what the watch counts
        body = resp.read()
        assert len(body) > 12_000_000
    finally:
        conn.close()
    assert d.events("suspect") == [] and d.events("failure") == []
    assert len(d.starts()) == 1
    assert metric(d, "sovereignd_stalls_total", '{stage="suspected"}') == 0


def test_a_failing_canary_turns_readyz_503_before_the_restart(make_daemon: MakeDaemon) -> None:
    """One failed canary: 503 at once (suspect); the restart waits for `failures` of them."""
    d = make_daemon({"health": {"failures": 3, "canary_interval": "500ms"}},
                    behaviour={"starts": [{"fail_completions_after": 1}], "default": {}})
    d.start()
    d.wait_state("READY")
    wait_for(lambda: len(d.starts()) == 2, 20, what="a restart after failing canaries")
    d.wait_state("READY")
    names = [e["event"] for e in d.events() if e["event"] in ("suspect", "probe_failed",
                                                              "failure")]
    assert names[:2] == ["probe_failed", "suspect"] and names[-1] == "failure"
    assert metric(d, "sovereignd_probe_failures_total", '{kind="canary"}') == len(
        [e for e in d.events("probe_failed") if e["kind"] == "canary"])


def fill_page_slack(path: Path, page: int = 4096) -> None:
    """tmpfs allocates whole pages: a full filesystem still takes writes that fit in the last
    page of an open file. Fill that slack with valid JSON lines, so the next event needs a page."""
    while True:
        slack = -path.stat().st_size % page
        if slack < 64:
            return
        pad = '{"event":"pad","x":"' + "x" * (slack - 23) + '"}\n'
        try:
            with path.open("a") as f:
                f.write(pad)
        except OSError:
            return


@pytest.mark.root
def test_a_full_disk_under_the_event_log_does_not_stop_supervision(
        make_daemon: MakeDaemon, tmp_path: Path) -> None:
    """events.log on a full filesystem (a real ENOSPC): a crash is still handled (server
    stopped, respawned); the events go to stderr as JSON and are counted in /metrics."""
    logs = tmp_path / "tiny"
    logs.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0750", "tmpfs", str(logs)],
                   check=True)
    try:
        d = make_daemon({"logs": {"dir": str(logs)}},
                        behaviour={"starts": [{"grandchildren": 1}], "default": {}})
        d.start()
        d.wait_state("READY")
        filler = logs / "filler"
        with filler.open("wb") as f, pytest.raises(OSError):
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        fill_page_slack(logs / "events.log")
        pid = d.server_pid()
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: len(d.starts()) == 2, 10, what="a respawn")
        wait_for(lambda: d.state() == "READY", 20, what="READY again")
        assert not group_processes(pid)
        assert metric(d, "sovereignd_event_log_failures_total") > 0
        assert metric(d, "sovereignd_restarts_total") == 1
        stderr = [json.loads(ln) for ln in d.stderr.read_text().splitlines()]
        assert any(e["event"] == "exit" and e["pid"] == pid for e in stderr)
        filler.unlink()
        d.close()
    finally:
        subprocess.run(["umount", "-l", str(logs)], check=False)
