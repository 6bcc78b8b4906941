"""Benchmark (prints figures; not a pass/fail test): the gateway under floods, stand-in server.

    python -m tests.bench.bench_attacks [--idle 5000] [--unauth 20000]

- idle-connection flood: the daemon started under a descriptor limit (256 = launchd's default
  soft limit; 1024 = systemd's default soft limit, here also as the hard limit so the daemon
  cannot raise it), N idle connections: how many it holds, how many it refuses, whether the
  server is still supervised (killed -> READY again) and the daemon stops cleanly;
- unauthenticated flood: M pipelined requests without a key on 4 connections: requests/s,
  auth_failed events written (and per second), bytes added to events.log and requests.log.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tests.harness import Daemon
from tests.helpers import cli_argv, cli_env, wait_for


def control_state(d: Daemon) -> dict[str, object]:
    res = subprocess.run(cli_argv("status", "--json", "--config", str(d.config_path)),
                         capture_output=True, text=True, env=cli_env(None), check=False)
    data = json.loads(res.stdout)
    assert isinstance(data, dict)
    return data


def idle_flood(root: Path, limit: int, n: int) -> None:
    d = Daemon(root / f"idle{limit}", {"gateway": {"idle_timeout": "5m"}})
    d.start(prefix=("prlimit", f"--nofile={limit}:{limit}", "--"))
    try:
        d.wait_state("READY")
        start = d.events("daemon_start")[0]["nofile"]
        socks = []
        t0 = time.monotonic()
        for _ in range(n):
            s = socket.socket()
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                s.connect(("127.0.0.1", d.port))
            socks.append(s)
        time.sleep(2)  # a benchmark: let the daemon take what it will
        pid = int(control_state(d)["server"]["pid"])  # type: ignore[index]
        os.kill(pid, signal.SIGKILL)
        t1 = time.monotonic()
        wait_for(lambda: control_state(d)["state"] == "READY"
                 and control_state(d)["server"]["pid"] != pid, 60,  # type: ignore[index]
                 interval=0.1, what="READY again")
        back = time.monotonic() - t1
        for s in socks:
            s.close()
        code = d.stop()
        refused = sum(e["count"] for e in d.events("connections_refused"))
        crashed = bool(d.events("supervisor_crash")) or "Too many open files" in \
            d.stderr.read_text()
        print(f"limit {limit}: held {start['max_connections']} of {n} idle connections "
              f"(opened in {time.monotonic() - t0 - back:.1f} s), refused {refused} with 503; "
              f"server killed -> READY again in {back:.2f} s; stop exit {code}; "
              f"crash: {'yes' if crashed else 'no'} (stand-in server)")
    finally:
        d.close()


def unauth_flood(root: Path, n: int) -> None:
    d = Daemon(root / "unauth")
    d.start()
    try:
        d.wait_state("READY")
        events0 = (d.logs / "events.log").stat().st_size
        req0 = (d.logs / "requests.log").stat().st_size
        per = n // 4
        req = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"
        t0 = time.monotonic()
        answered = 0
        for _ in range(4):
            with socket.create_connection(("127.0.0.1", d.port), timeout=60) as s:
                s.sendall(req * per)
                out = b""
                while out.count(b"HTTP/1.1 ") < per:
                    chunk = s.recv(1 << 20)
                    if not chunk:
                        break
                    out += chunk
                answered += out.count(b"HTTP/1.1 ")
        seconds = time.monotonic() - t0
        d.stop()
        events = d.events("auth_failed")
        events_bytes = (d.logs / "events.log").stat().st_size - events0
        req_bytes = (d.logs / "requests.log").stat().st_size - req0
        print(f"unauthenticated flood: {answered} requests in {seconds:.2f} s "
              f"({answered / seconds:,.0f}/s); auth_failed events {len(events)} "
              f"({len(events) / seconds:.2f}/s) standing for "
              f"{sum(e['count'] for e in events)} failures; events.log +{events_bytes:,} B, "
              f"requests.log +{req_bytes:,} B (stand-in server)")
    finally:
        d.close()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--idle", type=int, default=5000)
    p.add_argument("--unauth", type=int, default=20000)
    args = p.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, args.idle + 1000), hard))
    with tempfile.TemporaryDirectory(prefix="bench-attacks-") as tmp:
        for limit in (256, 1024):
            idle_flood(Path(tmp), limit, args.idle)
        unauth_flood(Path(tmp), args.unauth)


if __name__ == "__main__":
    main()
