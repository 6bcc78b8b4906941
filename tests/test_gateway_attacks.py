"""What clients without a key (or with malformed requests) can do to the gateway, and cannot."""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Callable
from typing import Any

import pytest

from tests.harness import Daemon
from tests.helpers import wait_for
from tests.test_gateway import add_key, records

MakeDaemon = Callable[..., Daemon]
PROMPT = "PROMPT-SECRET-7f3a"


def raw(d: Daemon, data: bytes, timeout: float = 5) -> bytes:
    """Send bytes as they are; return everything the gateway answers until it closes."""
    with socket.create_connection(("127.0.0.1", d.port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    return out


@pytest.fixture
def gw(make_daemon: MakeDaemon) -> tuple[Daemon, str]:
    d = make_daemon(behaviour={"default": {"echo_headers": True, "response_headers": {
        "Set-Cookie": "track=1", "Proxy-Authenticate": "Basic", "Connection": "X-Internal",
        "X-Internal": "server-only", "X-Kept": "yes"}}})
    key = add_key(d, "alice")
    d.start()
    d.wait_state("READY")
    return d, key


def malformed(key: str) -> dict[str, bytes]:
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": PROMPT}]})
    auth = f"Authorization: Bearer {key}".encode()
    n = str(len(body)).encode()
    return {
        "bare_lf": b"POST /v1/chat/completions HTTP/1.1\nHost: x\n" + auth
                   + b"\nContent-Length: " + n + b"\n\n" + body.encode(),
        "cl_and_te": b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + auth
                     + b"\r\nContent-Length: " + n + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
                     + body.encode(),
        "long_line": b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + auth + b"\r\nX-Pad: "
                     + b"a" * 20000 + b"\r\n\r\n",
        "space_before_colon": b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + auth
                              + b"\r\nContent-Length : " + n + b"\r\n\r\n" + body.encode(),
    }


def test_parser_refusals_quote_no_bytes_log_only_json_and_are_recorded(
        gw: tuple[Daemon, str]) -> None:
    """A request the HTTP parser refuses gets a 400 that quotes nothing, a request record with
    its error class, and no line anywhere that holds the client's key or prompt."""
    d, key = gw
    cases = malformed(key)
    for name, data in cases.items():
        answer = raw(d, data)
        assert answer.split(b" ", 2)[1] == b"400", (name, answer[:200])
        assert b"aiohttp" not in answer
        assert key.encode() not in answer and PROMPT.encode() not in answer, name
    wait_for(lambda: len([r for r in records(d) if r["status"] == 400]) >= len(cases), 5,
             what="records of the refusals")
    refused = [r for r in records(d) if r["status"] == 400]
    assert all(r["error"].startswith("http_parser_") and r["remote"] == "127.0.0.1"
               for r in refused)
    assert d.stop() == 0
    for stream in (d.stderr, d.stdout, d.logs / "events.log"):
        text = stream.read_text()
        assert key not in text and PROMPT not in text, stream
        for line in text.splitlines():
            json.loads(line)  # every line the daemon writes is a JSON event


def test_forwarding_headers_and_cookies_do_not_cross(gw: tuple[Daemon, str]) -> None:
    d, key = gw
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                       "max_tokens": 2}).encode()
    answer = raw(d, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                 + key.encode() + b"\r\nX-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Host: evil\r\n"
                 b"Forwarded: for=6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\nCookie: s=1\r\n"
                 b"Connection: close\r\nContent-Type: application/json\r\nContent-Length: "
                 + str(len(body)).encode() + b"\r\n\r\n" + body)
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), answer[:300]
    seen: dict[str, Any] = {k.lower(): v for k, v in
                            json.loads(payload)["request_headers"].items()}
    for name in ("x-forwarded-host", "forwarded", "x-real-ip", "cookie"):
        assert name not in seen, name
    assert seen["x-forwarded-for"] == "127.0.0.1"  # the real peer, not the claimed one
    back = head.lower()
    for name in (b"set-cookie", b"proxy-authenticate", b"x-internal"):
        assert b"\r\n" + name + b":" not in back, name
    assert b"\r\nx-kept: yes" in back


def expect_exchange(d: Daemon, path: str, key: str,
                    announced: int | None = None) -> tuple[bytes, bytes]:
    """Send headers with `Expect: 100-continue` (and `announced` as Content-Length if given);
    the first answer, then (if invited) the final one after the body."""
    body = json.dumps({"model": "m", "prompt": "hi", "max_tokens": 2}).encode()
    length = len(body) if announced is None else announced
    with socket.create_connection(("127.0.0.1", d.port), timeout=5) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                  "Content-Type: application/json\r\nExpect: 100-continue\r\nConnection: close"
                  f"\r\nContent-Length: {length}\r\n\r\n".encode())
        first = s.recv(65536)
        if not first.startswith(b"HTTP/1.1 100"):
            return first, b""
        s.sendall(body)
        rest = b""
        with contextlib.suppress(TimeoutError):
            while chunk := s.recv(65536):
                rest += chunk
        return first, rest


def test_100_continue_only_after_route_and_key_are_checked(gw: tuple[Daemon, str]) -> None:
    d, key = gw
    first, _ = expect_exchange(d, "/v1/completions", "sk-sov-" + "x" * 43)
    assert first.startswith(b"HTTP/1.1 401"), first[:100]
    first, _ = expect_exchange(d, "/invocations", key)
    assert first.startswith(b"HTTP/1.1 404"), first[:100]
    first, _ = expect_exchange(d, "/v1/completions", key, announced=999_999_999)
    assert first.startswith(b"HTTP/1.1 413"), first[:100]  # no invitation to a refused body
    first, rest = expect_exchange(d, "/v1/completions", key)
    assert first.startswith(b"HTTP/1.1 100 Continue"), first[:100]
    assert (first + rest).split(b"\r\n\r\n", 1)[1].startswith(b"HTTP/1.1 200"), rest[:200]
    wait_for(lambda: len([r for r in records(d) if r["status"] in (401, 404)]) >= 2, 5,
             what="the refusals recorded")
    assert len(d.events("auth_failed")) == 1  # the key was checked once, not twice


def test_unknown_expectation_gets_417_and_a_record_by_error_class(gw: tuple[Daemon, str]) -> None:
    """RFC 9110 10.1.1: an expectation the server does not understand may be answered 417;
    aiohttp answers it before any handler, and the refusal is recorded like every other."""
    d, key = gw
    with socket.create_connection(("127.0.0.1", d.port), timeout=5) as s:
        s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}"
                  "\r\nExpect: 200-ok-please\r\nContent-Length: 2\r\nConnection: close"
                  "\r\n\r\n".encode())
        first = s.recv(65536)
    assert first.startswith(b"HTTP/1.1 417"), first[:100]
    wait_for(lambda: any(r["status"] == 417 for r in records(d)), 5, what="the 417 recorded")
    rec = next(r for r in records(d) if r["status"] == 417)
    assert rec["error"] == "expect_unsupported" and rec["client"] is None
    assert rec["method"] == "POST" and rec["path"] == "/v1/completions"
    assert "200-ok-please" not in json.dumps(rec) and key not in json.dumps(rec)


def pipelined(d: Daemon, n: int, key: str | None = None) -> list[bytes]:
    """`n` pipelined GET /v1/models on one connection; the status codes of the answers."""
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    req = f"GET /v1/models HTTP/1.1\r\nHost: x\r\n{auth}\r\n".encode()
    with socket.create_connection(("127.0.0.1", d.port), timeout=30) as s:
        s.sendall(req * n)
        out = b""
        while out.count(b"HTTP/1.1 ") < n:
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            out += chunk
    return [part[:3] for part in out.split(b"HTTP/1.1 ")[1:]]


def test_unauthenticated_flood_is_throttled_summarised_and_recorded(
        make_daemon: MakeDaemon) -> None:
    """2,000 pipelined requests without a key: a burst of 401s, then 429 with Retry-After;
    a handful of auth_failed events with counts; every request recorded; a valid key from
    the same address still served."""
    d = make_daemon({"gateway": {"auth_failures_per_minute": 60, "auth_event_interval": "1h"}})
    key = add_key(d, "alice")
    d.start()
    d.wait_state("READY")
    codes = [c for _ in range(4) for c in pipelined(d, 500)]
    assert len(codes) == 2000
    assert codes.count(b"401") <= 8 and codes.count(b"429") >= 1990
    assert pipelined(d, 1, key) == [b"200"]
    assert d.stop() == 0
    events = d.events("auth_failed")
    assert len(events) <= 3
    assert sum(e["count"] for e in events) == 2000
    assert all(e["remote"] == "127.0.0.1" for e in events)
    refused = [r for r in records(d) if r["status"] in (401, 429)]
    assert len(refused) == 2000
    assert {r["error"] for r in refused} <= {"auth_missing", "auth_throttled"}


EVIL = "\u001b[1A\u001b[2Kall clear\u202egnp.exe\u009b31m"


def test_control_and_bidi_characters_never_reach_a_terminal_or_report(
        make_daemon: MakeDaemon) -> None:
    """A model name and a prompt holding ESC sequences, C1 and a right-to-left override are
    shown escaped by `logs tail` (requests, events, server output) and in the audit."""
    from tests.harness import http
    from tests.helpers import run_cli

    d = make_daemon({"server": {"content_lines": "keep"}},
                    behaviour={"default": {"log_content": True}})
    key = add_key(d, "alice")
    d.start()
    d.wait_state("READY")
    chat = {"model": EVIL, "messages": [{"role": "user", "content": EVIL}], "max_tokens": 2}
    http("POST", d.url + "/v1/chat/completions", chat, {"Authorization": f"Bearer {key}"})
    http("GET", d.url + "/v1/models", headers={"Authorization": "Bearer sk-\x1b[2J"})
    wait_for(lambda: any(EVIL in str(r.get("model")) for r in records(d)), 5, what="record")
    wait_for(lambda: EVIL in (d.logs / "server.log").read_text(encoding="utf-8")
             or "\\u001b[1A" in (d.logs / "server.log").read_text(), 5, what="server line")
    outputs = {}
    for source in ("--requests", "--events", "--server"):
        res = run_cli("logs", "tail", source, "-n", "50", "--config", str(d.config_path))
        assert res.returncode == 0, res.stderr
        outputs[source] = res.stdout
    for fmt in ("md", "html"):
        res = run_cli("audit", "--format", fmt, "--config", str(d.config_path))
        assert res.returncode in (0, 1), res.stderr
        outputs[fmt] = res.stdout
    for name, text in outputs.items():
        for ch in ("\x1b", "\u202e", "\x9b"):
            assert ch not in text, (name, ch)
    assert "\\x1b[1A\\x1b[2Kall clear\\u202egnp.exe\\x9b31m" in outputs["--requests"]
    assert "\\x1b[1A" in outputs["--server"]
    assert "\\u202e" in outputs["md"] and "\\u202e" in outputs["html"]
