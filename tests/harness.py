"""A real `sovereignd run` process under test, with the stand-in server (or a real one).

The harness writes a configuration, starts the daemon as a process, reads its endpoints and
event log, and on close stops it and fails the test if any server process it spawned is
still alive.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import yaml

from tests.helpers import REPO, cli_argv, cli_env, wait_for

FAKE = REPO / "tests" / "fakes" / "fake_vllm.py"


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A free loopback port below the kernel's ephemeral range (32768-60999 by default), so
    that no outgoing connection of another program can take it before the server binds it.

    Never the same port twice in one test process: a daemon's gateway and its server both
    take one before either binds, and a repeat would make the configuration invalid."""
    for _ in range(200):
        port = random.randrange(20000, 32000)
        if port in _HANDED_OUT:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError("no free loopback port in 20000-32000")


def http(method: str, url: str, body: dict[str, Any] | None = None,
         headers: dict[str, str] | None = None, timeout: float = 10) -> tuple[int, bytes,
                                                                             dict[str, str]]:
    """One HTTP request to a loopback URL; returns status, body and headers (no raise)."""
    assert url.startswith(("http://127.", "http://[::1]", "http://localhost")), url
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,  # noqa: S310 - loopback only
                                 headers=headers or {})
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - loopback only
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


class Daemon:
    """One daemon under test, configured in `root`."""

    def __init__(self, root: Path, overrides: dict[str, Any] | None = None,
                 behaviour: dict[str, Any] | None = None, fake: bool = True) -> None:
        self.root = root
        self.model = root / "model"
        self.model.mkdir(parents=True, exist_ok=True)
        (self.model / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
        self.control = root / "control.json"
        self.set_behaviour(behaviour or {"default": {}})
        self.port = free_port()
        self.server_port = free_port()
        self.logs = root / "logs"
        cfg: dict[str, Any] = {
            "daemon": {"allow_root": True},
            "server": {
                "model": str(self.model),
                "port": self.server_port,
                "transport": "tcp",  # tests reach the stand-in's port directly
                "drain": "1s",
                "stop_grace": "3s",
                "start_timeout": "20s",
            },
            "gateway": {"listen": f"127.0.0.1:{self.port}"},
            "health": {"interval": "200ms", "timeout": "500ms", "startup_poll": "100ms",
                       "canary_interval": "1s", "canary_timeout": "2s", "failures": 3},
            "restart": {"backoff_initial": "200ms", "backoff_max": "2s", "min_uptime": "2s",
                        "max_failures": 4, "window": "60s", "fatal_cooldown": "1h"},
            "logs": {"dir": str(self.logs)},
        }
        if fake:
            cfg["server"]["command"] = [sys.executable, str(FAKE)]
            cfg["server"]["env"] = {"FAKE_VLLM_CONTROL": str(self.control)}
        self.cfg = deep_merge(cfg, overrides or {})
        self.config_path = root / "sovereignd.yaml"
        self.write_config()
        self.proc: subprocess.Popen[bytes] | None = None
        self.client_key = ""   # set by tests that add one through the CLI
        self.auditor_key = ""
        self.stdout = root / "daemon.stdout"
        self.stderr = root / "daemon.stderr"

    def write_config(self) -> None:
        self.config_path.write_text(yaml.safe_dump(self.cfg, sort_keys=False))

    def set_behaviour(self, spec: dict[str, Any]) -> None:
        self.control.write_text(json.dumps(spec))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, extra_args: tuple[str, ...] = (),
              env: dict[str, str] | None = None, prefix: tuple[str, ...] = ()) -> None:
        """`prefix`: a program the daemon runs under, e.g. `prlimit --nofile=256:256 --`."""
        with self.stdout.open("ab") as out, self.stderr.open("ab") as err:
            self.proc = subprocess.Popen(
                [*prefix, *cli_argv("run", "--config", str(self.config_path), *extra_args)],
                stdout=out, stderr=err, env=cli_env(env), start_new_session=True)

    # --- observing ----------------------------------------------------------------------------

    def get(self, path: str, timeout: float = 5) -> tuple[int, Any]:
        status, body, _ = http("GET", self.url + path, timeout=timeout)
        try:
            return status, json.loads(body)
        except ValueError:
            return status, body.decode()

    def status(self) -> dict[str, Any]:
        code, body = self.get("/status")
        assert code == 200, body
        assert isinstance(body, dict)
        return body

    def state(self) -> str | None:
        try:
            return str(self.status()["state"])
        except (OSError, AssertionError):
            return None

    def wait_state(self, state: str, timeout: float = 20) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}: "
                                     + self.stderr.read_text()[-3000:])
            st = self.status()
            return st if st["state"] == state else None

        return wait_for(check, timeout, what=f"state {state}")

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        path = self.logs / "events.log"
        if not path.exists():
            return []
        out = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [e for e in out if name is None or e["event"] == name]

    def transitions(self) -> list[tuple[str, str]]:
        return [(e["from"], e["to"]) for e in self.events("state")]

    def starts(self) -> list[dict[str, Any]]:
        path = self.control.with_name(self.control.name + ".starts")
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def server_pid(self) -> int:
        srv = self.status()["server"]
        assert srv is not None, "no server running"
        return int(srv["pid"])

    # --- ending -------------------------------------------------------------------------------

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM the daemon and wait for it; its exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def server_groups(self) -> set[int]:
        """Process groups of every server this daemon spawned (from its events and the
        stand-in's own record)."""
        groups = {int(s["pgid"]) for s in self.starts()}
        groups |= {int(e["pid"]) for e in self.events("spawn")}
        return groups

    def leftover_processes(self) -> list[str]:
        """Processes of any server this daemon started that are still alive."""
        left = []
        for pgid in self.server_groups():
            for p in group_processes(pgid):
                with contextlib.suppress(psutil.Error):
                    left.append(f"{p.pid} {' '.join(p.cmdline())[:100]}")
        return left

    def close(self) -> None:
        """Stop the daemon (SIGKILL if it will not stop) and fail on leaked processes."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.stop(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        left = wait_for_no_leftovers(self, 10)
        for pgid in self.server_groups():  # never leave anything behind, even when failing
            for p in group_processes(pgid):
                with contextlib.suppress(psutil.Error):
                    p.kill()
        assert not left, f"server processes left running: {left}"


def group_processes(pgid: int) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (ProcessLookupError, psutil.Error):
            continue
    return out


def ignores_sigterm(pid: int) -> bool:
    """Whether the process has SIGTERM set to ignored (Linux: the SigIgn mask in
    /proc/PID/status), i.e. a stand-in grandchild is past installing its handler."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = next((line.split()[1] for line in status.splitlines()
                 if line.startswith("SigIgn:")), "0")
    return bool(int(mask, 16) & (1 << (signal.SIGTERM - 1)))


def wait_for_no_leftovers(d: Daemon, timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    left = d.leftover_processes()
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = d.leftover_processes()
    return left
