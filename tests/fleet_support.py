"""Real HAProxy and Prometheus processes for the fleet tests: started on free loopback ports
with their own configuration and data folders, stopped by pid."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from tests.harness import free_port, http
from tests.helpers import cli_argv, cli_env, wait_for


def need(program: str) -> str:
    """The program's path; a clear failure (never a skip) when it is not installed."""
    found = shutil.which(program) or shutil.which(program, path="/usr/sbin:/usr/bin")
    assert found, f"{program} is not installed: apt-get install {program} (ops/test.sh does)"
    return found


def stop(proc: subprocess.Popen[bytes] | None, grace: float = 15) -> None:
    """SIGTERM the process we started, SIGKILL it after `grace` seconds, reap it."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class _Program:
    """A program of ours on a free loopback port, its output in `log`, stopped by pid."""

    port: int
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def spawn(self, argv: list[str]) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)

    def close(self) -> None:
        stop(self.proc)


class HAProxy(_Program):
    """`haproxy -db -f CFG` with the admin socket of the config `sovereignd fleet haproxy`
    rendered."""

    def __init__(self, root: Path, nodes: list[str], check_interval: str = "300ms") -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.socket = root / "admin.sock"
        self.config = root / "haproxy.cfg"
        self.log = root / "haproxy.log"
        res = subprocess.run(cli_argv("fleet", "haproxy", *[f"--node={n}" for n in nodes],
                                      "--listen", f"127.0.0.1:{self.port}",
                                      "--check-interval", check_interval,
                                      "--stats-socket", str(self.socket),
                                      "-o", str(self.config)),
                             capture_output=True, text=True, env=cli_env(), check=False)
        assert res.returncode == 0, res.stderr
        check = subprocess.run([need("haproxy"), "-c", "-f", str(self.config)],
                               capture_output=True, text=True, check=False)
        assert check.returncode == 0, check.stdout + check.stderr

    def start(self) -> None:
        self.spawn([need("haproxy"), "-db", "-f", str(self.config)])
        wait_for(self.socket.exists, 10, what="HAProxy's admin socket")

    def command(self, line: str) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(self.socket))
            s.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def servers_up(self) -> dict[str, bool]:
        """`show servers state`: each server's name -> operational state is RUNNING (2)."""
        lines = self.command("show servers state sovereignd_hosts").splitlines()
        header = next(line for line in lines if line.startswith("# be_id")).split()[1:]
        out = {}
        for line in lines:
            if line and not line.startswith("#") and len(line.split()) > 5:
                row = dict(zip(header, line.split(), strict=False))
                out[row["srv_name"]] = row["srv_op_state"] == "2"
        return out



class Prometheus(_Program):
    """`prometheus` with a configuration and data folder of its own on a free loopback port."""

    def __init__(self, root: Path, config: dict[str, Any]) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.port = free_port()
        self.config = root / "prometheus.yml"
        self.config.write_text(json.dumps(config, indent=2))  # YAML is a superset of JSON
        self.log = root / "prometheus.log"

    def start(self) -> None:
        self.spawn([need("prometheus"), f"--config.file={self.config}",
                    f"--storage.tsdb.path={self.root / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}"])
        wait_for(lambda: http("GET", self.url + "/-/ready", timeout=2)[0] == 200, 30,
                 interval=0.2, what="Prometheus ready")

    def api(self, path: str, **params: str) -> Any:
        status, body, _ = http("GET", f"{self.url}/api/v1/{path}?"
                               + urllib.parse.urlencode(params), timeout=5)
        assert status == 200, body
        return json.loads(body)["data"]


@dataclass
class Load:
    """`total` chat completions through `url`, at most `concurrency` at a time, in a thread."""

    url: str
    key: str
    total: int
    concurrency: int
    statuses: Counter[int] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    done: int = 0
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self._thread.start()

    def join(self, timeout: float) -> None:
        assert self._thread is not None
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"load not done after {timeout}s ({self.done})"

    async def _run(self) -> None:
        body = {"model": "model", "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 4}
        headers = {"Authorization": f"Bearer {self.key}"}
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(self.total):
            queue.put_nowait(i)
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(timeout=timeout) as session:

            async def worker() -> None:
                while not queue.empty():
                    queue.get_nowait()
                    try:
                        async with session.post(self.url + "/v1/chat/completions", json=body,
                                                headers=headers) as resp:
                            payload = await resp.read()
                            self.statuses[resp.status] += 1
                            if resp.status != 200:
                                self.failures.append(f"{resp.status} {payload[:200]!r}")
                    except (aiohttp.ClientError, TimeoutError) as exc:
                        self.statuses[0] += 1
                        self.failures.append(repr(exc))
                    self.done += 1

            await asyncio.gather(*(worker() for _ in range(self.concurrency)))


def wait_until(condition: Any, timeout: float, what: str) -> float:
    """wait_for, returning the monotonic time the condition was first seen to hold."""
    wait_for(condition, timeout, interval=0.02, what=what)
    return time.monotonic()
