"""`sovereignd drain` / `resume` with the stand-in server: /readyz turns 503 "draining" while
requests in flight finish and new ones are still served for the grace period, then new ones
are refused; resume undoes it; both are operator events and appear in the audit."""

from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
    assert res.returncode == 1 and "--grace" in res.stderr
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
