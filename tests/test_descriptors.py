"""A flood of idle connections under a small descriptor limit: the gateway caps them, the
supervisor keeps its descriptors, the server stays supervised and stoppable."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.harness import Daemon, http
from tests.helpers import cli_env, run_cli, wait_for

MakeDaemon = Callable[..., Daemon]
FLOOD = 1100
LIMIT = 256  # launchd's default soft limit


def control_status(d: Daemon) -> dict[str, object]:
    """The daemon's state through its control socket (the gateway may be full)."""
    res = run_cli("status", "--json", "--config", str(d.config_path))
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert isinstance(data, dict)
    return data


def open_flood(port: int, n: int) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect(("127.0.0.1", port))
        socks.append(s)
    return socks


@pytest.mark.timeout(180)
def test_idle_connection_flood_under_256_descriptors_leaves_supervision_intact(
        make_daemon: MakeDaemon) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < FLOOD + 200:  # this test process holds the flood's client ends
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, FLOOD + 500), hard))
    d = make_daemon({"gateway": {"idle_timeout": "60s"}})
    d.start(prefix=("prlimit", f"--nofile={LIMIT}:{LIMIT}", "--"))
    d.wait_state("READY")
    start = d.events("daemon_start")[0]
    assert start["nofile"]["soft"] == LIMIT
    cap = start["nofile"]["max_connections"]
    assert cap == (LIMIT - 128) // 2
    socks = open_flood(d.port, FLOOD)
    try:
        wait_for(lambda: sum(e["count"] for e in d.events("connections_refused")) > 0, 20,
                 what="refusals")
        # Supervision goes on: the server is killed and replaced, through the control socket.
        pid = int(control_status(d)["server"]["pid"])  # type: ignore[index]
        os.kill(pid, signal.SIGKILL)

        def replaced() -> bool:
            st = control_status(d)
            return st["state"] == "READY" and st["server"]["pid"] != pid  # type: ignore[index]

        wait_for(replaced, 30, interval=0.2, what="a new READY server")
        # A client over the cap is told why, in one short answer.
        code, body, headers = http("GET", d.url + "/readyz", timeout=5)
        assert code == 503 and b"too_many_connections" in body and headers["Retry-After"]
    finally:
        for s in socks:
            s.close()
    wait_for(lambda: http("GET", d.url + "/readyz", timeout=5)[0] == 200, 20,
             what="the gateway answering again")
    assert d.stop() == 0
    refused = d.events("connections_refused")
    assert sum(e["count"] for e in refused) >= FLOOD - cap  # every refusal counted...
    assert len(refused) <= 6  # ...in a few summaries, not one event per connection
    stderr = d.stderr.read_text()
    assert "Too many open files" not in stderr and "EMFILE" not in stderr
    assert not d.events("supervisor_crash")


# The gateway's accept loop alone, in a process with a tiny descriptor limit and caps far
# above it: accept() itself runs out of descriptors (EMFILE).
ACCEPTOR = textwrap.dedent("""
    import asyncio, json, resource, socket, sys
    import uvloop
    from sovereignd.gateway.listener import Listener
    from sovereignd.logs.summary import Summarised

    def emit(name, **fields):
        print(json.dumps({"event": name, **fields}), flush=True)

    class Echo(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport
        def data_received(self, data):
            self.transport.write(data)

    async def main():
        resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), int(sys.argv[1])))
        sock = socket.create_server(("127.0.0.1", 0))
        listener = Listener(sock, Echo, max_total=100000, max_per_address=100000,
                            ssl_context=None,
                            refused=Summarised(emit, "connections_refused", 3600),
                            exhausted=Summarised(emit, "descriptors_exhausted", 3600))
        listener.start()
        emit("listening", port=sock.getsockname()[1])
        await asyncio.get_running_loop().connect_read_pipe(asyncio.Protocol, sys.stdin)
        await asyncio.Event().wait()

    uvloop.run(main())
""")


def test_accept_out_of_descriptors_pauses_and_resumes_without_losing_the_listener(
        tmp_path: Path) -> None:
    """EMFILE from accept() is temporary: one event, accepting pauses, and once descriptors
    are free again new connections are served, on uvloop as the daemon runs."""
    proc = subprocess.Popen([sys.executable, "-c", ACCEPTOR, "64"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=cli_env(None))
    assert proc.stdout is not None
    try:
        port = json.loads(proc.stdout.readline())["port"]
        socks = open_flood(port, 200)
        line = json.loads(proc.stdout.readline())
        assert line["event"] == "descriptors_exhausted" and line["error"] == "EMFILE"
        for s in socks:
            s.close()

        def echoed() -> bool:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as c:
                c.sendall(b"ping")
                return c.recv(4) == b"ping"

        assert wait_for(echoed, 20, interval=0.2, what="accepting again")
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.communicate()
