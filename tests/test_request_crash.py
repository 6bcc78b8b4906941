"""SIGKILL of the daemon under load (stand-in server): no answered request loses its record."""

from __future__ import annotations

import asyncio
import json
from http.client import HTTPConnection
from typing import Any

import pytest

from sovereignd.logs.verify import verify_logs
from tests.crashload import account, load_then_kill, opens, verify_with_key, wait_log_reopened
from tests.harness import Daemon
from tests.helpers import run_cli
from tests.test_gateway import MakeDaemon

RUNS = 5

pytestmark = pytest.mark.timeout(300)


def _setup(d: Daemon) -> None:
    for args in (("logs", "init-key"), ("keys", "add", "crash-client")):
        res = run_cli(*args, "--config", str(d.config_path))
        assert res.returncode == 0, res.stderr
        if args[0] == "logs":
            d.auditor_key = res.stdout.strip()
        else:
            d.client_key = res.stdout.strip()


def test_sigkill_under_load_leaves_every_answer_recorded_and_every_start_closed(
        make_daemon: MakeDaemon) -> None:
    """Five SIGKILLs under 4 plain + 4 streaming clients: every answer a client received
    whole has its record (status, tokens); every started request is completed or incomplete."""
    d = make_daemon(behaviour={"default": {"stream_delay": 0.02, "tokens": 16}})
    _setup(d)
    answered = unrecorded = incomplete = partial = 0
    for run in range(RUNS):
        before = opens(d)
        d.start()
        d.wait_state("READY")
        got = asyncio.run(load_then_kill(d, d.client_key, "model", plain=4, streams=4,
                                         seconds=1.0 + 0.3 * run, max_tokens=16))
        d.start()  # the next start closes what the killed run left open
        wait_log_reopened(d, before + 1)
        d.wait_state("READY")  # a SIGTERM before the daemon's handlers are set would kill it
        assert d.stop() == 0
        acc = account(d, got)
        assert acc.answered > 0
        assert acc.unrecorded == [], f"run {run}: answered but unrecorded"
        assert acc.without_tokens == [], f"run {run}: records without status/tokens"
        assert acc.unaccounted == [], f"run {run}: starts neither completed nor incomplete"
        assert acc.partial_unaccounted == [], f"run {run}: a cut stream has no entry"
        partial += acc.partial_streams
        answered += acc.answered
        unrecorded += len(acc.unrecorded)
        incomplete = len(acc.incomplete)  # cumulative: the whole log
    report = verify_with_key(d)
    result = verify_logs(d.logs, bytes.fromhex(d.auditor_key), d.logs)
    assert result.ok and result.seals_checked
    assert len(result.unclean_restarts) == RUNS
    assert result.starts == result.completed + len(result.incomplete)
    # Streams were in flight at each kill: they are listed, with the unclean stop as cause.
    assert result.incomplete and all(x["reason"] == "unclean_stop" for x in result.incomplete)
    assert result.exposures == []  # the host did not go down: nothing could be missing
    assert "request(s) started" in report
    print(f"\ncrash runs: {RUNS}, answered completely {answered}, "
          f"answered-but-unrecorded {unrecorded}, incomplete entries {incomplete}, "
          f"streams cut off as clients saw them {partial}, "
          f"starts {result.starts}, completed {result.completed} (stand-in)")


def _find(d: Daemon, kind: str, rid: str) -> dict[str, Any] | None:
    from sovereignd.logs.records import iter_records

    return next((r for r in iter_records(d.logs, kinds=(kind,)) if r["id"] == rid), None)


def test_the_record_is_on_file_before_the_client_sees_the_end_of_the_answer(
        make_daemon: MakeDaemon) -> None:
    """A stream's start entry is there while it runs, its record before `[DONE]` arrives; a
    plain answer's record before its body arrives."""
    d = make_daemon(behaviour={"default": {"stream_delay": 0.05, "tokens": 6}})
    _setup(d)
    d.start()
    d.wait_state("READY")
    conn = HTTPConnection("127.0.0.1", d.port, timeout=10)
    body = json.dumps({"model": "model", "stream": True, "max_tokens": 6,
                       "messages": [{"role": "user", "content": "hello"}]})
    conn.request("POST", "/v1/chat/completions", body,
                 {"Authorization": f"Bearer {d.client_key}", "Content-Type": "application/json"})
    resp = conn.getresponse()
    rid = resp.getheader("X-Request-ID") or ""
    first = resp.readline()
    assert first.startswith(b"data: {")
    start = _find(d, "start", rid)
    assert start is not None and start["client"] == "crash-client"
    assert _find(d, "request", rid) is None  # still streaming
    while not (line := resp.readline()).startswith(b"data: [DONE]"):
        assert line, "the stream ended without [DONE]"
    rec = _find(d, "request", rid)  # read the moment [DONE] arrived, before anything else
    assert rec is not None and rec["status"] == 200 and rec["start_seq"] == start["seq"]
    assert (rec["prompt_tokens"], rec["completion_tokens"]) == (7, 6)
    conn.close()

    conn = HTTPConnection("127.0.0.1", d.port, timeout=10)
    conn.request("POST", "/v1/chat/completions", json.dumps({**json.loads(body),
                                                             "stream": False}),
                 {"Authorization": f"Bearer {d.client_key}", "Content-Type": "application/json"})
    resp = conn.getresponse()
    rid = resp.getheader("X-Request-ID") or ""
    rec = _find(d, "request", rid)  # headers and body go out together, after the record
    assert rec is not None and rec["completion_tokens"] == 6
    assert json.loads(resp.read())["usage"]["completion_tokens"] == 6
    conn.close()
