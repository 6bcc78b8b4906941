"""The supervisor with a real stand-in server process: start, probe, restart, park, stop."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from tests.harness import Daemon, group_processes, http, ignores_sigterm
from tests.helpers import run_cli, wait_for

MakeDaemon = Callable[..., Daemon]

KV_CACHE_ERROR = (
    "ValueError: To serve at least one request with the models's max seq len (131072), "
    "(27.5 GiB KV cache is needed, which is larger than the available KV cache memory "
    "(3.1 GiB). Based on the available memory, the estimated maximum model length is 14864. "
    "Try increasing `gpu_memory_utilization` or decreasing `max_model_len` when initializing "
    "the engine.")


def test_becomes_ready_with_key_offline_env_and_own_process_group(make_daemon: MakeDaemon) -> None:
    """The server is spawned with the contract's argv and environment, in its own group."""
    d = make_daemon()
    d.start()
    st = d.wait_state("READY")
    code, body = d.get("/readyz")
    assert code == 200 and body["state"] == "READY"
    assert d.get("/healthz")[0] == 200
    [start] = d.starts()
    argv = start["argv"]
    assert argv[argv.index("--model") + 1] == str(d.model)
    assert argv[argv.index("--served-model-name") + 1] == "model"
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert argv[argv.index("--port") + 1] == str(d.server_port)
    assert argv[argv.index("--shutdown-timeout") + 1] == "1"
    assert start["has_key"] and start["offline"] == "1"
    assert start["pgid"] == start["pid"] != os.getpgid(d.proc.pid)  # type: ignore[union-attr]
    assert st["server"]["pid"] == start["pid"]
    assert st["model"]["name"] == "model" and st["restarts"] == 0
    assert [t for t in d.transitions()] == [("STOPPED", "STARTING"), ("STARTING", "WARMING"),
                                            ("WARMING", "READY")]
    metrics = d.get("/metrics")[1]
    assert 'sovereignd_state{state="READY"} 1.0' in metrics
    assert "sovereignd_probe_latency_seconds_bucket" in metrics
    lines = (d.logs / "server.log").read_text().splitlines()
    assert any('"stream":"stdout"' in ln and "fake_vllm: start 0" in ln for ln in lines)


def test_crash_is_restarted_immediately_and_counted(make_daemon: MakeDaemon) -> None:
    """A server that dies while READY is respawned at once (first failure: no backoff)."""
    d = make_daemon(behaviour={"starts": [{"crash_after": 1}], "default": {}})
    d.start()
    d.wait_state("READY")
    # The second canary (after canary_interval) crashes start 0; start 1 behaves.
    wait_for(lambda: len(d.starts()) == 2, 15, what="a second start")
    st = d.wait_state("READY")
    assert st["restarts"] == 1
    assert st["last_exit"]["kind"] == "exit" and st["last_exit"]["returncode"] == 1
    backoff = [e for e in d.events("state") if e["to"] == "BACKOFF"]
    assert backoff[0]["delay_s"] == 0.0
    assert ("READY", "BACKOFF") in d.transitions()


def test_hang_is_detected_within_bound_and_restarted(make_daemon: MakeDaemon) -> None:
    """A server that stops answering while alive is stopped (SIGTERM/SIGKILL) and replaced."""
    d = make_daemon(behaviour={"starts": [{"hang_after": 1, "ignore_term": True}],
                               "default": {}})
    d.start()
    d.wait_state("READY")
    first = d.starts()[0]["pid"]
    wait_for(lambda: len(d.starts()) == 2, 20, what="a restart after the hang")
    d.wait_state("READY")
    failure = d.status()["last_exit"]
    assert failure["kind"] == "unhealthy", failure
    stopped = next(e for e in d.events("server_stopped") if e["pid"] == first)
    assert stopped["graceful"] is False and stopped["killed"]  # SIGTERM ignored -> SIGKILL
    assert not psutil.pid_exists(first) or psutil.Process(first).status() == "zombie"


def test_completions_failing_while_health_ok_is_a_failure(make_daemon: MakeDaemon) -> None:
    """/health 200 is not enough: failing canaries restart the server."""
    d = make_daemon(behaviour={"starts": [{"fail_completions_after": 1}], "default": {}})
    d.start()
    d.wait_state("READY")
    wait_for(lambda: len(d.starts()) == 2, 20, what="a restart after failing canaries")
    d.wait_state("READY")
    assert d.status()["last_exit"]["kind"] == "unhealthy"
    assert "canary" in d.status()["last_exit"]["message"]


def test_crash_loop_backs_off_then_goes_fatal_and_keeps_answering(
        make_daemon: MakeDaemon) -> None:
    """K failures in the window -> FATAL with growing delays; /readyz says why; restart."""
    d = make_daemon(behaviour={"default": {"crash_after": 0}})
    d.start()
    st = d.wait_state("FATAL", timeout=30)
    assert "crash loop" in st["reason"]
    delays = [e["delay_s"] for e in d.events("state") if e["to"] == "BACKOFF"]
    assert delays == [0.0, 0.2, 0.4]
    assert len(d.starts()) == 4 and st["server"] is None
    code, body = d.get("/readyz")
    assert code == 503 and body["state"] == "FATAL" and "crash loop" in body["reason"]
    assert d.get("/healthz")[0] == 200
    # The operator fixes the cause and asks for a restart: FATAL is left at once.
    d.set_behaviour({"default": {}})
    res = run_cli("restart", "--config", str(d.config_path))
    assert res.returncode == 0, res.stderr
    d.wait_state("READY")
    assert ("FATAL", "STARTING") in d.transitions()
    assert any(e["event"] == "operator" for e in d.events())


def test_sighup_leaves_fatal(make_daemon: MakeDaemon) -> None:
    """SIGHUP is the other way out of FATAL."""
    d = make_daemon(behaviour={"default": {"fail_start": KV_CACHE_ERROR}})
    d.start()
    d.wait_state("FATAL")
    d.set_behaviour({"default": {}})
    d.signal(signal.SIGHUP)
    d.wait_state("READY")


def test_deterministic_startup_error_is_fatal_at_once_with_mitigation(
        make_daemon: MakeDaemon) -> None:
    """A KV-cache memory error will not go away by restarting: FATAL, one start only."""
    d = make_daemon(behaviour={"default": {"fail_start": KV_CACHE_ERROR}})
    d.start()
    st = d.wait_state("FATAL")
    assert len(d.starts()) == 1
    assert st["last_exit"]["kind"] == "kv-cache-memory"
    assert "--max-model-len" in st["last_exit"]["mitigation"]
    assert "max-model-len" in d.get("/readyz")[1]["reason"]
    assert [t for t in d.transitions()][-1] == ("STARTING", "FATAL")


def test_sigkill_exit_is_reported_as_possible_out_of_memory(make_daemon: MakeDaemon) -> None:
    d = make_daemon(behaviour={"starts": [{"crash_after": 1, "crash_signal": "SIGKILL"}],
                               "default": {}})
    d.start()
    wait_for(lambda: len(d.starts()) == 2, 15, what="restart after SIGKILL")
    last = d.wait_state("READY")["last_exit"]
    assert last["kind"] == "killed" and last["exit"] == "killed by SIGKILL (out of memory?)"


def test_missing_model_directory_is_fatal_before_spawning(make_daemon: MakeDaemon,
                                                          tmp_path: Path) -> None:
    d = make_daemon({"server": {"model": str(tmp_path / "nowhere")}})
    d.start()
    st = d.wait_state("FATAL")
    assert "does not exist" in st["reason"] and d.starts() == []


def test_server_port_in_use_backs_off_without_spawning_then_serves(
        make_daemon: MakeDaemon) -> None:
    """Whoever holds the port may let it go: a start failure retried with backoff, not FATAL."""
    import socket

    d = make_daemon({"restart": {"max_failures": 100}})
    with socket.socket() as s:
        s.bind(("127.0.0.1", d.server_port))
        s.listen()
        d.start()
        wait_for(lambda: len(d.events("port_impostor")) >= 2, 20, what="two refused starts")
        assert d.starts() == [] and "FATAL" not in {t for _, t in d.transitions()}
        holder = d.events("port_impostor")[0]["holder"]
        assert holder["pid"] == os.getpid() and holder["uid"] == os.getuid()
    d.wait_state("READY")


def test_sigterm_drains_stops_whole_group_and_exits_zero(make_daemon: MakeDaemon) -> None:
    """Grandchildren ignoring SIGTERM are SIGKILLed after the grace; nothing is left."""
    d = make_daemon(behaviour={"default": {"grandchildren": 2,
                                           "grandchildren_ignore_term": True}})
    d.start()
    d.wait_state("READY")
    pgid = d.starts()[0]["pgid"]
    wait_for(lambda: len(group_processes(pgid)) == 3, 5, what="grandchildren")
    # On a loaded machine a grandchild may not have set SIGTERM to ignored yet.
    wait_for(lambda: all(ignores_sigterm(p.pid) for p in group_processes(pgid)
                         if p.pid != pgid), 10, what="grandchildren ignoring SIGTERM")
    t0 = time.monotonic()
    assert d.stop() == 0
    assert time.monotonic() - t0 < 3 + 5 + 2  # grace + kill wait + margin
    assert group_processes(pgid) == []
    stopped = d.events("server_stopped")[-1]
    assert stopped["graceful"] is False and len(stopped["killed"]) == 2
    assert d.transitions()[-2:] == [("READY", "STOPPING"), ("STOPPING", "STOPPED")]


def test_rogue_grandchild_that_left_the_group_is_still_stopped(make_daemon: MakeDaemon) -> None:
    """A descendant that called setsid() escapes group signals; it is remembered by pid."""
    d = make_daemon(behaviour={"default": {"grandchildren": 1, "setsid_grandchild": True,
                                           "grandchildren_ignore_term": True}})
    d.start()
    d.wait_state("READY")
    leader = psutil.Process(d.server_pid())
    rogue = wait_for(leader.children, 5, what="the grandchild")[0]
    wait_for(lambda: os.getpgid(rogue.pid) != leader.pid, 5, what="setsid")
    wait_for(lambda: d.status()["server"]["processes"] == 2, 5, what="tracking")
    assert d.stop() == 0
    assert not rogue.is_running() or rogue.status() == psutil.STATUS_ZOMBIE


def test_daemon_killed_then_restarted_cleans_old_group(make_daemon: MakeDaemon) -> None:
    """kill -9 of the daemon leaves its server; the next daemon stops it before spawning."""
    d = make_daemon(behaviour={"default": {"grandchildren": 2}})
    d.start()
    d.wait_state("READY")
    old = d.starts()[0]
    assert d.proc is not None
    d.proc.kill()
    d.proc.wait()
    assert len(group_processes(old["pgid"])) == 3  # the orphaned server and its children
    d.start()
    d.wait_state("READY")
    assert group_processes(old["pgid"]) == []
    orphans = d.events("orphans")
    assert orphans and {p["pid"] for p in orphans[-1]["processes"]} >= {old["pid"]}
    servers = [s for s in d.starts() if group_processes(s["pgid"])]
    assert len(servers) == 1 and servers[0]["pid"] == d.server_pid()


def test_internal_key_never_on_a_command_line_or_in_logs(make_daemon: MakeDaemon) -> None:
    d = make_daemon()
    d.start()
    d.wait_state("READY")
    environ = Path(f"/proc/{d.server_pid()}/environ").read_bytes().split(b"\0")
    key = next(v.split(b"=", 1)[1] for v in environ if v.startswith(b"VLLM_API_KEY="))
    assert len(key) >= 32
    for pid in psutil.pids():
        try:
            assert key not in Path(f"/proc/{pid}/cmdline").read_bytes()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    # The key works against the server itself, so it is the real one.
    code, _, _ = http("GET", f"http://127.0.0.1:{d.server_port}/v1/models",
                      headers={"Authorization": f"Bearer {key.decode()}"})
    assert code == 200
    d.stop()
    for path in [*d.logs.rglob("*"), d.stdout, d.stderr, d.config_path]:
        if path.is_file():
            assert key not in path.read_bytes(), path


def test_status_command_human_and_json(make_daemon: MakeDaemon) -> None:
    d = make_daemon()
    d.start()
    d.wait_state("READY")
    res = run_cli("status", "--config", str(d.config_path))
    assert res.returncode == 0 and "state:     READY" in res.stdout, res
    res = run_cli("status", "--config", str(d.config_path), "--json")
    import json

    assert json.loads(res.stdout)["state"] == "READY"
    # Without the control socket, `status` asks the loopback gateway's /status instead.
    (d.logs / "control.sock").unlink()
    res = run_cli("status", "--config", str(d.config_path))
    assert res.returncode == 0 and "state:     READY" in res.stdout, res


def test_status_without_daemon_says_so(tmp_path: Path) -> None:
    d = Daemon(tmp_path / "none")
    res = run_cli("status", "--config", str(d.config_path))
    assert res.returncode == 1 and "is it running" in res.stderr


def test_gateway_port_in_use_fails_with_a_sentence(make_daemon: MakeDaemon) -> None:
    import socket

    d = make_daemon()
    with socket.socket() as s:
        s.bind(("127.0.0.1", d.port))
        s.listen()
        d.start()
        assert d.proc is not None
        assert d.proc.wait(timeout=20) == 1
    assert "cannot listen on" in d.stderr.read_text()
    assert d.starts() == []


def test_sigterm_while_starting_up_is_a_clean_stop(make_daemon: MakeDaemon) -> None:
    """A SIGTERM that arrives as soon as the request log is open (before the gateway listens)
    stops the daemon cleanly: exit 0, and the next start finds no unclean stop to report."""
    d = make_daemon()
    reqlog = d.logs / "requests.log"
    for _ in range(3):
        before = reqlog.stat().st_size if reqlog.exists() else 0
        d.start()
        wait_for(lambda: reqlog.exists() and reqlog.stat().st_size > before, 20,  # noqa: B023
                 what="the request log opened")
        assert d.stop() == 0
    d.start()
    d.wait_state("READY")
    assert d.stop() == 0
    opens = [json.loads(line) for line in reqlog.read_text().splitlines()
             if '"open"' in line]
    opens = [o for o in opens if o.get("kind") == "open"]
    assert len(opens) == 4
    assert [o["unclean"] for o in opens] == [False] * 4
