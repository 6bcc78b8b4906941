"""The second real backend, vllm-mlx, under the daemon: the same door, the same guarantees.

vllm-mlx starts in seconds here, so the scenarios that need many real starts (repeated
kills, a crash loop into FATAL and out of it) run against it.
"""

from __future__ import annotations

import json
import os
import signal
from http.client import HTTPConnection
from pathlib import Path

import pytest

from sovereignd.logs.records import iter_records
from tests.e2e import sdk_clients
from tests.harness import Daemon, group_processes, http
from tests.helpers import run_cli, wait_for

pytestmark = pytest.mark.timeout(600)

READY = 120
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "a private question"}],
        "max_tokens": 6}


def ready_pid(d: Daemon, not_pid: int | None = None) -> int:
    def check() -> int | None:
        st = d.status()
        pid = st["server"]["pid"] if st["server"] else None
        return pid if st["state"] == "READY" and pid != not_pid else None

    return wait_for(check, READY, interval=0.2, what="READY")


def test_mlx_serves_chat_and_streams_through_the_gateway(mlx_daemon: Daemon) -> None:
    d = mlx_daemon
    ready_pid(d)
    auth = {"Authorization": f"Bearer {d.client_key}"}
    code, body, _ = http("POST", d.url + "/v1/chat/completions", CHAT, auth, timeout=60)
    assert code == 200, body
    assert json.loads(body)["choices"][0]["message"]["role"] == "assistant"
    conn = HTTPConnection("127.0.0.1", d.port, timeout=60)
    conn.request("POST", "/v1/chat/completions", body=json.dumps({**CHAT, "stream": True}),
                 headers={**auth, "Content-Type": "application/json"})
    resp = conn.getresponse()
    raw = resp.read()
    conn.close()
    assert resp.status == 200 and raw.rstrip().endswith(b"data: [DONE]")
    records = wait_for(lambda: (rs := [r for r in iter_records(d.logs)
                                      if r["client"] == "mlx-client"]) and len(rs) >= 2 and rs,
                       5, what="both records")
    assert {r["stream"] for r in records} == {True, False}
    assert all(r["prompt_tokens"] for r in records)



def test_mlx_anthropic_messages_with_x_api_key(mlx_daemon: Daemon) -> None:
    """vllm-mlx serves the Messages API too; its records keep tokens and first token."""
    ready_pid(mlx_daemon)
    sdk_clients.anthropic_messages(mlx_daemon, "mlx-claude")

@pytest.mark.parametrize("path", ["/v1/mcp/execute", "/v1/mcp/servers", "/docs",
                                  "/openapi.json", "/v1/responses", "/v1/cache", "/v1/status"])
def test_mlx_tool_and_admin_routes_are_closed_at_the_gateway(mlx_daemon: Daemon,
                                                             path: str) -> None:
    d = mlx_daemon
    ready_pid(d)
    auth = {"Authorization": f"Bearer {d.client_key}"}
    assert http("POST", d.url + path, {}, auth)[0] == 404
    assert http("GET", d.url + path, None, auth)[0] == 404


def test_mlx_docs_are_open_at_the_server_port_itself(mlx_daemon: Daemon) -> None:
    """vllm-mlx leaves /docs open without a key: only the gateway closes it."""
    d = mlx_daemon
    ready_pid(d)
    assert http("GET", f"http://127.0.0.1:{d.server_port}/docs")[0] == 200


def test_mlx_key_and_prompts_stay_out_of_every_log(mlx_daemon: Daemon) -> None:
    d = mlx_daemon
    pid = ready_pid(d)
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    key = argv[argv.index(b"--api-key") + 1]  # vllm-mlx can only take it here
    assert len(key) >= 32
    for path in d.logs.iterdir():
        if path.is_file() and not path.name.endswith(".gz"):
            data = path.read_bytes()
            assert key not in data, path
            assert b"a private question" not in data, path
            assert b"hello there" not in data, path  # the Messages API's prompt too
    assert b"preview: [REDACTED]" in (d.logs / "server.log").read_bytes()


def test_mlx_repeated_kills_come_back_each_time(mlx_daemon: Daemon) -> None:
    d = mlx_daemon
    pid = ready_pid(d)
    for _ in range(3):
        os.kill(pid, signal.SIGKILL)
        new = ready_pid(d, not_pid=pid)
        assert group_processes(pid) == []
        pid = new


def test_mlx_crash_loop_goes_fatal_and_an_operator_restart_recovers(mlx_daemon: Daemon) -> None:
    """Killed again and again before it counts as a good run: FATAL, not a restart storm."""
    d = mlx_daemon
    pid = ready_pid(d)
    while True:
        os.kill(pid, signal.SIGKILL)
        st = wait_for(lambda p=pid: (s := d.status())["state"] in ("READY", "FATAL")
                      and (s["server"] or {}).get("pid") != p and s, READY, interval=0.2,
                      what="READY or FATAL")
        if st["state"] == "FATAL":
            break
        pid = st["server"]["pid"]
    assert "crash loop" in st["reason"] and st["server"] is None
    delays = [e["delay_s"] for e in d.events("state") if e["to"] == "BACKOFF"]
    assert delays[-3:] == sorted(delays[-3:]) and delays[-1] > 0
    assert d.get("/readyz")[0] == 503
    res = run_cli("restart", "--config", str(d.config_path))
    assert res.returncode == 0, res.stderr
    ready_pid(d)


def test_mlx_port_taken_after_a_crash_is_never_talked_to(mlx_daemon: Daemon,
                                                         tmp_path: Path) -> None:
    """vllm-mlx serves on TCP only. Another process binds its port the moment it dies: the
    daemon sends it nothing (no probe, no key), names it, and serves again once it is gone."""
    from tests.test_serversock import start_impostor

    d = mlx_daemon
    pid = ready_pid(d)
    seen = len(d.events("port_impostor"))
    got = tmp_path / "impostor.bytes"
    os.kill(pid, signal.SIGKILL)
    impostor = start_impostor(d.server_port, got, patience=10)
    try:
        wait_for(lambda: len(d.events("port_impostor")) > seen, 60, what="impostor refused")
        assert d.events("port_impostor")[-1]["holder"]["pid"] == impostor.pid
    finally:
        impostor.kill()
        impostor.wait()
    ready_pid(d, not_pid=pid)
    assert not got.exists() or got.read_bytes() == b""
    assert d.state() == "READY"


def test_mlx_sigterm_leaves_nothing_running(mlx_daemon: Daemon) -> None:
    d = mlx_daemon
    pid = ready_pid(d)
    assert d.stop(timeout=60) == 0
    assert group_processes(pid) == [] and d.leftover_processes() == []


def test_mlx_period_audit_shows_the_real_runs(mlx_daemon: Daemon, tmp_path: Path) -> None:
    """`sovereignd audit` over this real period: the requests by client and model, the kills as
    restarts, the crash loop as a FATAL period, the operator's restart; the records verified
    with the auditor's key; the HTML holds only the report's own elements."""
    from tests.test_audit_html import TAGS, Page

    d = mlx_daemon
    key_file = tmp_path / "auditor.key"
    key_file.write_text(d.auditor_key + "\n")
    args = ["audit", "--config", str(d.config_path), "--key-file", str(key_file)]
    res = run_cli(*args, "--format", "json")
    assert res.returncode in (0, 1), res.stderr
    report = json.loads(res.stdout)
    verdicts = {c["id"]: c["verdict"] for c in report["controls"]}
    assert verdicts["request_chain"] == "PASS"
    assert report["requests"]["by_client"]["mlx-client"]["requests"] >= 2
    assert "tiny" in report["requests"]["by_model"]
    assert len(report["incidents"]["restarts"]) >= 4  # 3 kills, then the crash loop's
    assert report["incidents"]["fatal_periods"]
    assert any(a["action"] == "restart" for a in report["incidents"]["operator_actions"])
    out = tmp_path / "audit.html"
    res = run_cli(*args, "--format", "html", "-o", str(out))
    assert res.returncode in (0, 1), res.stderr
    page = Page(out.read_text())
    assert set(page.tags) <= TAGS and page.tags.count("svg") == 2
    assert ("td", "mlx-client") in page.cells and ("td", "tiny") in page.cells
