"""The gateway in front of the stand-in server: routes, keys, limits, streams, records."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Callable
from http import client as httpclient
from pathlib import Path
from typing import Any

import pytest

from tests.harness import Daemon, http
from tests.helpers import run_cli, wait_for

MakeDaemon = Callable[..., Daemon]

CHAT = {"model": "model", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}


def add_key(d: Daemon, name: str, *extra: str) -> str:
    res = run_cli("keys", "add", name, "--config", str(d.config_path), *extra)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def auditor_key(d: Daemon) -> str:
    res = run_cli("logs", "init-key", "--config", str(d.config_path))
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def records(d: Daemon) -> list[dict[str, Any]]:
    from sovereignd.logs.records import iter_records

    return list(iter_records(d.logs))


def records_all(d: Daemon) -> list[dict[str, Any]]:
    from sovereignd.logs.records import iter_records

    return list(iter_records(d.logs, kinds=None))


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def gw(make_daemon: MakeDaemon) -> tuple[Daemon, str]:
    d = make_daemon(behaviour={"default": {"stream_delay": 0.05}})
    key = add_key(d, "alice")
    d.start()
    d.wait_state("READY")
    return d, key


def test_allow_listed_routes_pass_with_a_client_key(gw: tuple[Daemon, str]) -> None:
    d, key = gw
    for method, path, body in [("GET", "/v1/models", None),
                               ("POST", "/v1/chat/completions", CHAT),
                               ("POST", "/v1/completions", {"model": "model", "prompt": "x"}),
                               ("POST", "/v1/embeddings", {"model": "model", "input": "x"})]:
        code, payload, headers = http(method, d.url + path, body, bearer(key))
        assert code == 200, (path, payload)
        assert len(headers["X-Request-ID"]) == 24
        assert headers["Server"] == "sovereignd"
    # A record is written once its response has been handed to the transport: wait for it.
    recs = wait_for(lambda: [r for r in records(d) if r["kind"] == "request"][3:] and
                    [r for r in records(d) if r["kind"] == "request"], 5, what="four records")
    assert [r["path"] for r in recs] == ["/v1/models", "/v1/chat/completions",
                                         "/v1/completions", "/v1/embeddings"]
    chat = recs[1]
    assert chat["client"] == "alice" and chat["model"] == "model" and chat["status"] == 200
    assert chat["prompt_tokens"] == 7 and chat["completion_tokens"] == 4
    assert chat["bytes_in"] == len(json.dumps(CHAT)) and chat["bytes_out"] > 0
    assert chat["remote"] == "127.0.0.1" and chat["stream"] is False
    assert chat["latency_ms"] >= chat["ttfb_ms"] > 0 and chat["error"] is None


@pytest.mark.parametrize("path", [
    "/invocations", "/pause", "/tokenize", "/collective_rpc", "/v1/../invocations",
    "/v1/%2e%2e/invocations", "/%69nvocations", "/v1/models/../../invocations",
    "//v1/models", "/v1//models", "/v1/models%2F..%2F..%2Finvocations", "/docs",
    "/v1/mcp/execute", "/health", "/metrics/../invocations", "/V1/MODELS",
])
def test_everything_else_is_404_even_with_a_key(gw: tuple[Daemon, str], path: str) -> None:
    d, key = gw
    conn = httpclient.HTTPConnection("127.0.0.1", d.port, timeout=5)
    # http.client sends the path exactly as given: no client-side normalisation.
    conn.request("POST", path, body=b"{}", headers={**bearer(key),
                                                   "Content-Type": "application/json"})
    resp = conn.getresponse()
    body = json.loads(resp.read())
    conn.close()
    assert resp.status == 404, (path, body)
    assert body["error"]["code"] == "unknown_route"


def test_the_same_route_answers_straight_at_the_server_port(gw: tuple[Daemon, str]) -> None:
    """The stand-in, like vLLM, serves /invocations to anyone: only the gateway stops it."""
    d, _ = gw
    assert http("POST", f"http://127.0.0.1:{d.server_port}/invocations", {})[0] == 200


def test_wrong_method_is_405(gw: tuple[Daemon, str]) -> None:
    d, key = gw
    code, body, _ = http("DELETE", d.url + "/v1/models", None, bearer(key))
    assert code == 405 and json.loads(body)["error"]["code"] == "method_not_allowed"


def test_missing_wrong_and_revoked_keys_are_401_and_logged_without_the_key(
        gw: tuple[Daemon, str]) -> None:
    d, key = gw
    assert http("GET", d.url + "/v1/models")[0] == 401
    bad = "sk-sov-" + "A" * 43
    code, body, headers = http("GET", d.url + "/v1/models", None, bearer(bad))
    assert code == 401 and headers["WWW-Authenticate"] == "Bearer"
    assert json.loads(body)["error"]["code"] == "invalid_api_key"
    res = run_cli("keys", "revoke", "alice", "--config", str(d.config_path))
    assert res.returncode == 0, res.stderr
    wait_for(lambda: http("GET", d.url + "/v1/models", None, bearer(key))[0] == 401, 5,
             what="revocation to take effect without a restart")
    failures = d.events("auth_failed")
    assert {f["reason"] for f in failures} >= {"missing", "unknown", "revoked"}
    assert any(f.get("key_name") == "alice" for f in failures)
    for path in d.logs.iterdir():
        if path.is_file():
            data = path.read_bytes()
            assert key.encode() not in data and bad.encode() not in data, path
    assert 'sovereignd_auth_failures_total{reason="unknown"}' in d.get("/metrics")[1]


def test_a_key_added_while_running_works_at_once(gw: tuple[Daemon, str]) -> None:
    d, _ = gw
    bob = add_key(d, "bob")
    wait_for(lambda: http("GET", d.url + "/v1/models", None, bearer(bob))[0] == 200, 5,
             what="the new key to be accepted")


def test_body_over_the_limit_is_413(make_daemon: MakeDaemon) -> None:
    d = make_daemon({"gateway": {"max_body": "1KiB"}})
    key = add_key(d, "alice")
    d.start()
    d.wait_state("READY")
    big = {"model": "model", "prompt": "x" * 4096}
    code, body, _ = http("POST", d.url + "/v1/completions", big, bearer(key))
    assert code == 413 and json.loads(body)["error"]["code"] == "body_too_large"


def test_per_client_concurrency_and_rate_limits_are_429(make_daemon: MakeDaemon) -> None:
    d = make_daemon({"gateway": {"client_concurrency": 1, "client_rate": 6}},
                    {"default": {"stream_delay": 0.3}})
    key = add_key(d, "alice")
    d.start()
    d.wait_state("READY")
    # One slow stream in flight: a second request from the same client is refused.
    conn = httpclient.HTTPConnection("127.0.0.1", d.port, timeout=10)
    conn.request("POST", "/v1/chat/completions",
                 body=json.dumps({**CHAT, "stream": True}),
                 headers={**bearer(key), "Content-Type": "application/json"})
    first = conn.getresponse()
    code, body, headers = http("GET", d.url + "/v1/models", None, bearer(key))
    assert code == 429 and json.loads(body)["error"]["code"] == "concurrency"
    assert headers["Retry-After"] == "1"
    first.read()
    conn.close()
    # Rate: 6 per minute allows a burst of one (ten seconds' worth); the next waits.
    wait_for(lambda: http("GET", d.url + "/v1/models", None, bearer(key))[0] == 429, 5,
             what="the rate limit")
    code, body, headers = http("GET", d.url + "/v1/models", None, bearer(key))
    assert code == 429 and json.loads(body)["error"]["code"] == "rate"
    assert int(headers["Retry-After"]) >= 1


def test_not_ready_is_503_with_retry_after_and_state(make_daemon: MakeDaemon) -> None:
    d = make_daemon(behaviour={"default": {"fail_start": "boom", "exit_code": 1}},
                    overrides={"restart": {"max_failures": 1}})
    key = add_key(d, "alice")
    d.start()
    d.wait_state("FATAL")
    code, body, headers = http("GET", d.url + "/v1/models", None, bearer(key))
    err = json.loads(body)["error"]
    assert code == 503 and err["code"] == "not_ready" and "FATAL" in err["message"]
    assert headers["Retry-After"] == "60"
    assert http("GET", d.url + "/v1/models")[0] == 401  # state is not told before auth


def read_events(resp: httpclient.HTTPResponse) -> list[tuple[float, bytes]]:
    """Server-sent events with the time each arrived."""
    out, buf = [], b""
    while True:
        chunk = resp.read1(65536)
        if not chunk:
            break
        buf += chunk
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            out.append((time.monotonic(), event))
    return out


def stream(d: Daemon, key: str, body: dict[str, Any]) -> list[tuple[float, bytes]]:
    conn = httpclient.HTTPConnection("127.0.0.1", d.port, timeout=10)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                 headers={**bearer(key), "Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type", "").startswith(
        "text/event-stream")
    try:
        return read_events(resp)
    finally:
        conn.close()


@pytest.mark.parametrize("loop", ["default", "asyncio"])
def test_the_daemon_serves_on_uvloop_and_on_the_standard_loop_when_asked(
        make_daemon: MakeDaemon, loop: str) -> None:
    """uvloop by default; SOVEREIGND_LOOP=asyncio, the escape hatch, serves the same."""
    d = make_daemon(behaviour={"default": {"stream_delay": 0.05, "tokens": 3}})
    key = add_key(d, "alice")
    d.start(env={} if loop == "default" else {"SOVEREIGND_LOOP": "asyncio"})
    d.wait_state("READY")
    [start] = d.events("daemon_start")
    assert start["loop"] == ("uvloop" if loop == "default" else "asyncio")
    code, payload, _ = http("POST", d.url + "/v1/chat/completions", CHAT, bearer(key))
    assert code == 200 and json.loads(payload)["usage"]["completion_tokens"] == 3
    events = stream(d, key, {**CHAT, "stream": True})
    assert [e for _, e in events][-1] == b"data: [DONE]" and len(events) >= 4
    assert d.stop() == 0


def test_stream_arrives_chunk_by_chunk_with_tokens_recorded(make_daemon: MakeDaemon) -> None:
    d = make_daemon(behaviour={"default": {"stream_delay": 0.25, "tokens": 4}})
    key = add_key(d, "alice")
    d.start()
    d.wait_state("READY")
    events = stream(d, key, {**CHAT, "stream": True})
    data = [e for _, e in events]
    assert data[-1] == b"data: [DONE]"
    # Four tokens 0.25 s apart: the first arrived well before the end, not all at once.
    assert events[-1][0] - events[0][0] >= 0.6
    # The client did not ask for usage: the extra usage chunk the gateway asked for is withheld.
    assert not any(b'"usage"' in e for e in data)
    rec = wait_for(lambda: [r for r in records(d) if r["kind"] == "request"], 5,
                   what="the record")[-1]
    assert rec["stream"] is True and rec["prompt_tokens"] == 7
    assert rec["completion_tokens"] == 4 and 0 < rec["ttft_ms"] < rec["latency_ms"]
    # Asked for: passed through unchanged.
    data = [e for _, e in stream(d, key, {**CHAT, "stream": True,
                                          "stream_options": {"include_usage": True}})]
    assert any(b'"usage"' in e for e in data)


def test_client_disconnect_mid_stream_cancels_upstream(make_daemon: MakeDaemon) -> None:
    d = make_daemon(behaviour={"default": {"stream_delay": 0.3, "tokens": 20}})
    key = add_key(d, "alice")
    d.start()
    d.wait_state("READY")
    sock = socket.create_connection(("127.0.0.1", d.port), timeout=5)
    body = json.dumps({**CHAT, "stream": True, "max_tokens": 20}).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                 + f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    assert b"200 OK" in sock.recv(4096)
    sock.close()
    aborted = d.control.with_name("control.json.aborted")
    wait_for(aborted.exists, 10, what="the upstream stream to be aborted")
    rec = wait_for(lambda: [r for r in records(d) if r.get("error") == "client_disconnect"], 5,
                   what="the record of the disconnected request")[0]
    assert rec["client"] == "alice" and rec["stream"] is True


def test_request_log_verifies_after_traffic_and_never_holds_the_internal_key(
        make_daemon: MakeDaemon) -> None:
    d = make_daemon()
    auditor = auditor_key(d)
    key = add_key(d, "alice")
    d.start()
    d.wait_state("READY")
    environ = Path(f"/proc/{d.server_pid()}/environ").read_bytes().split(b"\0")
    internal = next(v.split(b"=", 1)[1] for v in environ if v.startswith(b"VLLM_API_KEY="))
    for _ in range(5):
        http("POST", d.url + "/v1/chat/completions", CHAT, bearer(key))
    http("GET", d.url + "/v1/models")
    assert d.stop() == 0
    keyfile = d.root / "auditor.key"
    keyfile.write_text(auditor + "\n")
    res = run_cli("logs", "verify", "--config", str(d.config_path), "--key-file", str(keyfile))
    assert res.returncode == 0, res.stdout + res.stderr
    for path in d.logs.iterdir():
        if path.is_file():
            data = path.read_bytes()
            assert internal not in data and key.encode() not in data, path


def test_status_and_metrics_need_an_admin_key_on_a_network_listener(
        make_daemon: MakeDaemon, tmp_path: Path) -> None:
    """A non-loopback listener needs TLS and admin keys for /status and /metrics."""
    cert, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    import subprocess

    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.2", "-keyout", str(keyfile), "-out", str(cert)],
                   check=True, capture_output=True)
    d = make_daemon({"gateway": {"allow_remote": True, "tls_cert": str(cert),
                                 "tls_key": str(keyfile)}})
    # The operator's explicit network listener; the test still talks to it over loopback.
    d.cfg["gateway"]["listen"] = f"0.0.0.0:{d.port}"
    d.write_config()
    admin = add_key(d, "ops", "--admin")
    client = add_key(d, "alice")
    d.start()
    import ssl

    ctx = ssl.create_default_context(cafile=str(cert))
    ctx.check_hostname = False

    def get(path: str, key: str | None) -> int:
        conn = httpclient.HTTPSConnection("127.0.0.1", d.port, timeout=5, context=ctx)
        conn.request("GET", path, headers=bearer(key) if key else {})
        status = conn.getresponse().status
        conn.close()
        return status

    wait_for(lambda: get("/healthz", None) == 200, 10, what="the TLS listener")
    assert get("/status", None) == 401
    assert get("/status", client) == 403
    assert get("/status", admin) == 200
    assert get("/metrics", client) == 403 and get("/metrics", admin) == 200


def test_twenty_thousand_requests_with_rotation_verify_exactly(make_daemon: MakeDaemon) -> None:
    """Load through the gateway with the log rotating every 256 KiB: nothing lost or doubled."""
    d = make_daemon({"requests": {"rotate_bytes": "256KiB", "compress": True},
                     "health": {"interval": "5s", "canary_interval": "60s"}})
    auditor = auditor_key(d)
    key = add_key(d, "alice")
    d.start()
    d.wait_state("READY")
    total, concurrency = 20_000, 16

    async def load() -> int:
        import aiohttp

        ok = 0
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=connector) as session:
            async def worker(n: int) -> None:
                nonlocal ok
                for _ in range(n):
                    async with session.get(d.url + "/v1/models", headers=bearer(key)) as r:
                        await r.read()
                        ok += r.status == 200

            await asyncio.wait_for(asyncio.gather(
                *(worker(total // concurrency) for _ in range(concurrency))), timeout=240)
        return ok

    assert asyncio.run(load()) == total
    d.stop()
    everything = records_all(d)
    recs = [r for r in everything if r["kind"] == "request"]
    assert len(recs) == total and len({r["id"] for r in recs}) == total
    seqs = [r["seq"] for r in everything]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # no gap, no duplicate
    assert len(list(d.logs.glob("requests-*.log.gz"))) > 10
    keyfile = d.root / "auditor.key"
    keyfile.write_text(auditor + "\n")
    res = run_cli("logs", "verify", "--config", str(d.config_path), "--key-file", str(keyfile))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "OK" in res.stdout


def test_what_the_server_receives(make_daemon: MakeDaemon) -> None:
    """The internal key instead of the client's, the request id, the client's own fields,
    and Accept-Encoding: identity whatever the client asked (no compressed bodies)."""
    d = make_daemon(behaviour={"default": {"echo_headers": True}})
    key = add_key(d, "alice")
    d.start()
    d.wait_state("READY")
    conn = httpclient.HTTPConnection("127.0.0.1", d.port, timeout=10)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(CHAT),
                 headers={**bearer(key), "Content-Type": "application/json",
                          "Accept-Encoding": "gzip, br", "X-Custom": "kept",
                          "X-Api-Key": key, "Connection": "keep-alive, X-Hop",
                          "X-Hop": "for the gateway only"})
    resp = conn.getresponse()
    answer = json.loads(resp.read())
    conn.close()
    assert resp.status == 200 and resp.getheader("Content-Encoding") is None
    seen = {k.lower(): v for k, v in answer["request_headers"].items()}
    assert seen["accept-encoding"] == "identity" and seen["x-custom"] == "kept"
    assert seen["authorization"].startswith("Bearer ") and key not in seen["authorization"]
    assert "x-api-key" not in seen and key not in json.dumps(seen)
    assert "x-hop" not in seen and "connection" not in seen
    assert seen["x-request-id"] == resp.getheader("X-Request-ID")
    assert seen["host"] == f"127.0.0.1:{d.server_port}"


def read_cut_stream(d: Daemon, key: str, body: dict[str, Any]) -> list[bytes]:
    """A stream the gateway must cut: the events that came, then an incomplete body."""
    conn = httpclient.HTTPConnection("127.0.0.1", d.port, timeout=10)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                 headers={**bearer(key), "Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    events = []
    buf = b""
    try:
        with pytest.raises(httpclient.IncompleteRead):
            while True:
                chunk = resp.read1(65536)
                if not chunk:
                    break  # a clean end: the pytest.raises above fails the test
                buf += chunk
                while b"\n\n" in buf:
                    event, buf = buf.split(b"\n\n", 1)
                    events.append(event)
    finally:
        conn.close()
    return events


def test_a_stream_the_server_cuts_is_cut_for_the_client_too(make_daemon: MakeDaemon) -> None:
    """Ending the body cleanly would tell the client it got the whole stream."""
    d = make_daemon(behaviour={"default": {"stream_cut_after": 2, "tokens": 6}})
    key = add_key(d, "alice")
    d.start()
    d.wait_state("READY")
    events = read_cut_stream(d, key, {**CHAT, "stream": True, "max_tokens": 6})
    assert len(events) == 2 and b"[DONE]" not in b"".join(events)
    rec = wait_for(lambda: [r for r in records(d) if r.get("error") == "upstream_disconnect"],
                   5, what="the record")[0]
    assert rec["status"] == 200 and rec["stream"] is True and rec["bytes_out"] > 0
    assert http("GET", d.url + "/v1/models", None, bearer(key))[0] == 200  # still serving


def test_upstream_timeout_before_and_during_a_stream(make_daemon: MakeDaemon) -> None:
    """504 when the answer is late; a stream running past the deadline is cut, and the
    record keeps the status the client saw."""
    d = make_daemon({"gateway": {"upstream_timeout": "1s"}},
                    {"default": {"completion_delay": 5, "stream_delay": 0.3, "tokens": 20}})
    key = add_key(d, "alice")
    d.start()
    d.wait_state("READY")
    t0 = time.monotonic()
    code, body, _ = http("POST", d.url + "/v1/chat/completions", CHAT, bearer(key))
    assert code == 504 and json.loads(body)["error"]["code"] == "upstream_timeout"
    assert time.monotonic() - t0 < 4
    events = read_cut_stream(d, key, {**CHAT, "stream": True, "max_tokens": 20})
    assert 1 <= len(events) < 20
    recs = wait_for(lambda: [r for r in records(d) if r.get("error") == "upstream_timeout"][1:]
                    and [r for r in records(d) if r.get("error") == "upstream_timeout"], 5,
                    what="both records")
    assert [(r["status"], r["stream"]) for r in recs] == [(504, False), (200, True)]
    aborted = d.control.with_name("control.json.aborted")
    wait_for(aborted.exists, 10, what="the server to see the gateway give up the stream")
