"""`sovereignd drain` / `resume` with the stand-in server: /readyz turns 503 "draining" while
requests in flight finish and new ones are still served for the grace period, then new ones
are refused; resume undoes it; both are operator events and appear in the audit."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sovereignd.gateway import drainstate
from tests.harness import Daemon, http
from tests.helpers import cli_argv, cli_env, run_cli, wait_for

MakeDaemon = Callable[..., Daemon]
CHAT = {"model": "model", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}


def _chat(d: Daemon, key: str) -> tuple[int, dict[str, Any]]:
    status, body, _ = http("POST", d.url + "/v1/chat/completions", CHAT,
                           {"Authorization": f"Bearer {key}"}, timeout=20)
    return status, json.loads(body)


def _actions(report: Any) -> list[str]:
    """Every operator action named anywhere in the audit's JSON."""
    found: list[str] = []
    if isinstance(report, dict):
        if "operator_actions" in report and isinstance(report["operator_actions"], list):
            found += [str(a.get("action")) for a in report["operator_actions"]]
        for v in report.values():
            found += _actions(v)
    elif isinstance(report, list):
        for v in report:
            found += _actions(v)
    return found


def _serving_one_request(make_daemon: MakeDaemon, behaviour: dict[str, Any]
                         ) -> tuple[Daemon, str, threading.Thread, list[tuple[int, Any]]]:
    """A READY daemon with client alice and one of her chat requests in flight, in a thread:
    (daemon, her key, the thread, the list its answer lands in)."""
    d = make_daemon(behaviour={"default": behaviour})
    key = run_cli("keys", "add", "alice", "--config", str(d.config_path)).stdout.strip()
    d.start()
    d.wait_state("READY")
    answers: list[tuple[int, Any]] = []
    thread = threading.Thread(target=lambda: answers.append(_chat(d, key)))
    thread.start()
    wait_for(lambda: b"sovereignd_requests_in_flight 1.0" in http(
        "GET", d.url + "/metrics")[1], 5, what="a request in flight")
    return d, key, thread, answers


def test_drain_serves_through_the_grace_period_then_refuses_and_resume_restores(
        make_daemon: MakeDaemon) -> None:
    d, key, slow, before = _serving_one_request(make_daemon, {"completion_delay": 1.0})
    drain = subprocess.Popen(cli_argv("drain", "--config", str(d.config_path), "--grace", "2s",
                                      "--reason", "kernel update"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env())
    try:
        _code, ready = wait_for(lambda: (r := d.get("/readyz"))[0] == 503 and r, 5,
                               what="/readyz 503")
        assert ready["reason"] == "draining" and ready["state"] == "READY"
        assert ready["drain"]["reason"] == "kernel update" and not ready["drain"]["refusing"]
        assert _chat(d, key)[0] == 200  # a new request in the grace period is still served
        out, err = drain.communicate(timeout=30)
    finally:
        if drain.poll() is None:
            drain.kill()
            drain.wait()
    assert drain.returncode == 0, out + err
    assert b"drained" in out
    slow.join(20)
    assert before and before[0][0] == 200  # the request in flight when draining began ended
    status, body = _chat(d, key)
    assert status == 503 and body["error"]["code"] == "draining"
    assert d.status()["drain"]["refusing"] is True
    shown = run_cli("status", "--config", str(d.config_path)).stdout
    assert shown.startswith("drain:     DRAINING since") and "refusing new requests" in shown
    # Bad input: a grace period the daemon refuses changes nothing.
    res = run_cli("drain", "--config", str(d.config_path), "--grace", "30d", "--no-wait")
    assert res.returncode == 1 and "grace must be" in res.stderr
    res = run_cli("resume", "--config", str(d.config_path), "--reason", "kernel updated")
    assert res.returncode == 0 and "resumed" in res.stdout
    assert d.get("/readyz")[0] == 200 and d.status()["drain"] is None
    assert "DRAINING" not in run_cli("status", "--config", str(d.config_path)).stdout
    assert _chat(d, key)[0] == 200
    ops = [(e["action"], e["reason"]) for e in d.events("operator")]
    assert ops == [("drain", "kernel update"), ("resume", "kernel updated")]
    assert http("GET", d.url + "/metrics")[1].count(b"sovereignd_draining 0.0") == 1
    res = run_cli("audit", "--config", str(d.config_path), "--format", "json")
    assert {"drain", "resume"} <= set(_actions(json.loads(res.stdout))), res.stderr


def test_drain_refuses_bad_durations_and_says_when_no_daemon_runs(tmp_path: Path,
                                                                   make_daemon: MakeDaemon
                                                                   ) -> None:
    d = make_daemon()
    res = run_cli("drain", "--config", str(d.config_path), "--grace", "soon")
    assert res.returncode == 2 and "--grace" in res.stderr
    res = run_cli("drain", "--config", str(d.config_path))
    assert res.returncode == 1 and "no daemon is running" in res.stderr
    res = run_cli("resume", "--config", str(d.config_path))
    assert res.returncode == 1 and "no daemon is running" in res.stderr


def test_a_request_cut_by_a_server_the_daemon_stops_is_a_retryable_503(
        make_daemon: MakeDaemon) -> None:
    """A restart whose server will not drain (it ignores SIGTERM and is killed): the request
    it held gets 503 `server_stopping` with Retry-After -- a balancer sends it elsewhere --
    not 502, and its record says so."""
    d, _key, held, answer = _serving_one_request(
        make_daemon, {"completion_delay": 30, "ignore_term": True})
    assert run_cli("restart", "--config", str(d.config_path)).returncode == 0
    held.join(30)
    assert answer, "no answer"
    status, body = answer[0]
    assert status == 503 and body["error"]["code"] == "server_stopping"
    wait_for(lambda: any(e.get("killed") for e in d.events("server_stopped")), 10,
             what="the server killed after its grace")
    from sovereignd.logs.records import iter_records

    assert [r["error"] for r in iter_records(d.logs) if r["client"] == "alice"] \
        == ["server_stopping"]


# --- a drain kept across daemon restarts ------------------------------------------------------


def _first_readyz(d: Daemon) -> tuple[int, Any]:
    """The first answer a (re)started daemon's /readyz gives: the balancer's first look."""
    return wait_for(lambda: d.get("/readyz"), 20, interval=0.02, what="the gateway listening")


def _kill_and_restart(d: Daemon) -> tuple[int, Any]:
    """SIGKILL the daemon (a crash: nothing runs on its way down), start it again; the first
    /readyz answer of the new daemon."""
    assert d.proc is not None
    d.signal(signal.SIGKILL)
    d.proc.wait(10)
    d.start()
    return _first_readyz(d)


def test_a_drain_survives_a_killed_daemon_until_resume_removes_it(
        make_daemon: MakeDaemon) -> None:
    """SIGKILL mid-drain and restart: /readyz is 503 "draining" from the new daemon's first
    answer, with the drain's original start, what is left of its grace, and an event saying
    so; once the grace has passed a restarted daemon refuses new requests at once; `resume`
    removes the saved drain, and the next daemon is not drained."""
    d = make_daemon()
    key = run_cli("keys", "add", "alice", "--config", str(d.config_path)).stdout.strip()
    d.start()
    d.wait_state("READY")
    res = run_cli("drain", "--config", str(d.config_path), "--grace", "1h", "--reason",
                  "rack move", "--no-wait")
    assert res.returncode == 0, res.stderr
    saved = d.logs / "drain.json"
    assert saved.stat().st_mode & 0o777 == 0o600
    since = d.status()["drain"]["since"]

    code, ready = _kill_and_restart(d)
    assert code == 503 and ready["reason"] == "draining", ready
    assert ready["drain"]["since"] == since and ready["drain"]["reason"] == "rack move"
    assert not ready["drain"]["refusing"] and 0 < ready["drain"]["grace_left_s"] <= 3600
    d.wait_state("READY")
    assert d.get("/readyz")[0] == 503  # READY, and still out of the balancer
    assert _chat(d, key)[0] == 200      # the grace period goes on: still served
    restored = d.events("drain.restored")
    assert len(restored) == 1 and restored[0]["since"] == since
    assert restored[0]["reason"] == "rack move" and restored[0]["refusing"] is False
    shown = run_cli("status", "--config", str(d.config_path)).stdout
    assert shown.startswith("drain:     DRAINING since") and "kept across a daemon restart" \
        in shown

    # A drain whose grace has passed: the next daemon refuses new requests from the start.
    res = run_cli("drain", "--config", str(d.config_path), "--grace", "0s", "--no-wait")
    assert res.returncode == 0, res.stderr
    code, ready = _kill_and_restart(d)
    assert code == 503 and ready["drain"]["refusing"] is True
    d.wait_state("READY")
    status, body = _chat(d, key)
    assert status == 503 and body["error"]["code"] == "draining"
    assert d.events("drain.restored")[-1]["refusing"] is True
    assert b"sovereignd_draining 1.0" in http("GET", d.url + "/metrics")[1]

    res = run_cli("resume", "--config", str(d.config_path), "--reason", "moved")
    assert res.returncode == 0 and "resumed" in res.stdout, res.stderr
    assert not saved.exists()
    assert d.stop() == 0
    d.start()
    d.wait_state("READY")
    assert d.get("/readyz")[0] == 200 and d.status()["drain"] is None
    assert len(d.events("drain.restored")) == 2  # not a third time
    assert _chat(d, key)[0] == 200


def test_an_unreadable_drain_state_keeps_the_host_drained_and_says_why(
        make_daemon: MakeDaemon) -> None:
    """A damaged state file fails safe: the host starts drained and refusing (a host the
    operator took out must not take traffic), an error event names the file and the problem
    but never its content, and `resume` clears it."""
    d = make_daemon()
    key = run_cli("keys", "add", "alice", "--config", str(d.config_path)).stdout.strip()
    d.logs.mkdir(mode=0o750)
    saved = d.logs / "drain.json"
    for damaged in (b'{"version": 1, "since": "secret-looking-text", "reason": 5}',
                    b"secret-looking-text"):
        saved.write_bytes(damaged)
        d.start()
        code, ready = _first_readyz(d)
        assert code == 503 and ready["reason"] == "draining" and ready["drain"]["refusing"]
        d.wait_state("READY")
        assert _chat(d, key)[0] == 503
        event = d.events("drain.state_unreadable")[-1]
        assert event["level"] == "error" and event["path"] == str(saved)
        assert "secret-looking-text" not in event["error"]
        # What the SovereigndDrainStateBroken alert (ops/fleet/alerts.yml) counts.
        assert b'sovereignd_events_total{event="drain.state_unreadable",level="error"} 1.0' \
            in http("GET", d.url + "/metrics")[1]
        assert d.stop() == 0
    assert "lacks the field 'grace_s'" in d.events("drain.state_unreadable")[0]["error"]
    assert "is not JSON" in d.events("drain.state_unreadable")[1]["error"]
    d.start()
    d.wait_state("READY")
    assert run_cli("resume", "--config", str(d.config_path)).returncode == 0
    assert not saved.exists() and d.get("/readyz")[0] == 200 and _chat(d, key)[0] == 200


def test_the_drain_state_file_rejects_what_it_did_not_write(tmp_path: Path) -> None:
    """Each damaged or foreign state file is Unreadable with a reason; a saved drain reads back
    as written; no file is no drain."""
    path = tmp_path / "drain.json"
    assert drainstate.load(path) is None
    saved = drainstate.Saved(since="2026-11-30T01:00:00.000+00:00", reason="r", grace_s=30.0,
                             grace_until=1.8e9, by="upgrade")
    drainstate.save(path, saved)
    assert drainstate.load(path) == saved and path.stat().st_mode & 0o777 == 0o600
    good = json.loads(path.read_text())
    for doc, problem in (
            ([1], "not a drain state of version 1"), ({**good, "version": 2}, "version 1"),
            ({**good, "grace_s": -1}, "invalid field(s): grace_s"),
            ({**good, "grace_until": True}, "invalid field(s): grace_until"),
            ({**good, "by": ["upgrade"]}, "invalid field(s): by"),
            ({**good, "by": "someone"}, "invalid field(s): by"),
            ({**good, "since": None, "reason": 1}, "invalid field(s): since, reason")):
        path.write_text(json.dumps(doc))
        with pytest.raises(drainstate.Unreadable, match=re.escape(problem)):
            drainstate.load(path)
    path.write_bytes(b'{"version": 1, "since": "x", "reason": "y", "grace_s": NaN}')
    with pytest.raises(drainstate.Unreadable, match="is not JSON"):
        drainstate.load(path)
    path.unlink()
    path.mkdir()
    with pytest.raises(drainstate.Unreadable, match="cannot read"):
        drainstate.load(path)


def test_upgrade_ends_a_drain_a_dead_upgrade_left_but_keeps_the_operators(
        make_daemon: MakeDaemon, tmp_path: Path) -> None:
    """`upgrade --drain` after a restart: a saved drain of an upgrade that never finished (it
    and the daemon were killed) is taken over and ended once the new server is READY; a drain
    the operator set before the upgrade, restored across a SIGKILL, stays after it."""
    from tests.test_upgrade import fake_venv, steps, upgradable

    d, opt, _frozen = upgradable(make_daemon, tmp_path)
    assert d.proc is not None
    d.signal(signal.SIGKILL)
    d.proc.wait(10)
    saved = d.logs / "drain.json"
    drainstate.save(saved, drainstate.Saved(since="2026-11-30T01:00:00.000+00:00",
                                            reason="upgrade to lost", grace_s=30.0,
                                            grace_until=0.0, by="upgrade"))
    d.start()
    assert _first_readyz(d)[0] == 503
    d.wait_state("READY")
    res = run_cli("upgrade", "--config", str(d.config_path), "--venv",
                  str(fake_venv(opt, "new", "2.0")), "--timeout", "20s", "--drain", "300ms")
    assert res.returncode == 0, res.stdout + res.stderr
    assert steps(d)[-2:] == ["resume", "done"]
    assert not saved.exists() and d.get("/readyz")[0] == 200

    assert run_cli("drain", "--config", str(d.config_path), "--grace", "0s", "--reason",
                   "disk swap", "--no-wait").returncode == 0
    _kill_and_restart(d)
    d.wait_state("READY")
    res = run_cli("upgrade", "--config", str(d.config_path), "--venv",
                  str(fake_venv(opt, "newer", "3.0")), "--timeout", "20s", "--drain", "300ms")
    assert res.returncode == 0, res.stdout + res.stderr
    skipped = [e for e in d.events("upgrade") if e["step"] == "drain"][-1]
    assert "stays drained" in skipped["skipped"] and "resume" not in steps(d)[-3:]
    code, ready = d.get("/readyz")
    assert code == 503 and ready["drain"]["reason"] == "disk swap"
    assert ready["drain"]["by"] == "operator" and saved.exists()
