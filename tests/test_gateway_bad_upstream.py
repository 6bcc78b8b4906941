"""The gateway in front of a server whose answer is misframed: a 502 in OpenAI's error shape at
once, a record, and an event saying what the server sent (never the bytes themselves)."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from tests.harness import Daemon, http
from tests.helpers import run_cli, wait_for

MakeDaemon = Callable[..., Daemon]

CHAT = {"model": "model", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}


@pytest.mark.parametrize(("raw", "reason"), [
    # The old hand parser skipped the LF-ended line and with it Transfer-Encoding: the client
    # got "5\r\nhe" as the body, with status 200.
    ("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\n"
     "Content-Length: 7\r\n\r\n5\r\nhello\r\n0\r\n\r\n", "Missing expected CR"),
    # The old parser waited for a CRLF CRLF that never came: a 504 after upstream_timeout.
    ("HTTP/1.1 200 OK\nContent-Type: application/json\nContent-Length: 2\n\n{}",
     "Missing expected CR"),
    # A smuggling shape: which framing wins depends on the reader.
    ("HTTP/1.1 200 OK\r\nContent-Length: 7\r\nTransfer-Encoding: chunked\r\n\r\n"
     "5\r\nhello\r\n0\r\n\r\n", "Content-Length"),
], ids=["bare-lf-between-te-and-cl", "lf-only-head", "cl-and-te"])
def test_a_misframed_answer_is_a_502_at_once_with_an_event(make_daemon: MakeDaemon, raw: str,
                                                           reason: str) -> None:
    d = make_daemon({"gateway": {"upstream_timeout": "600s"}}, {"default": {"raw_answer": raw}})
    res = run_cli("keys", "add", "alice", "--config", str(d.config_path))
    assert res.returncode == 0, res.stderr
    key = res.stdout.strip()
    d.start()
    d.wait_state("READY")
    # (The server holds the connection open for 30 s: an answer within 15 s is not a wait for
    # a timeout or for the close.)
    code, body, _ = http("POST", d.url + "/v1/chat/completions", CHAT,
                         {"Authorization": f"Bearer {key}"}, timeout=15)
    assert code == 502, body
    error = json.loads(body)["error"]
    assert error["type"] == "server_error" and error["code"] == "upstream_bad_response"
    assert error["message"] == "the model server sent a malformed response"
    event = wait_for(lambda: d.events("upstream_bad_response"), 5, what="the event")[0]
    assert event["level"] == "error" and reason in event["detail"]
    assert event["path"] == "/v1/chat/completions" and "hello" not in event["detail"]
    from sovereignd.logs.records import iter_records

    rec = wait_for(lambda: [r for r in iter_records(d.logs) if r["id"] == event["request_id"]],
                   5, what="the record")[0]
    assert rec["status"] == 502 and rec["error"] == "upstream_bad_response"
    assert d.state() == "READY"  # a bad answer is not a dead server
