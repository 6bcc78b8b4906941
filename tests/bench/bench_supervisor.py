"""Benchmark (prints figures; not a pass/fail test): how fast the supervisor reacts.

    python -m tests.bench.bench_supervisor [--rounds 10] [--idle 30]

- crash-to-respawn: the stand-in server exits (its own timestamp) -> the daemon's `spawn`
  event for the next server, at the first failure after a good run (no backoff);
- crash-to-READY with the stand-in server;
- hang detection: the server stops answering -> the daemon's failure event, against the
  configured bound (interval + failures x timeout + (failures - 1) x interval);
- the daemon's idle CPU (% of one core) and RSS while READY with the default probe timing.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from tests.harness import Daemon, http
from tests.helpers import wait_for


def ts(event: dict[str, Any]) -> float:
    return dt.datetime.fromisoformat(event["ts"].replace("Z", "+00:00")).timestamp()


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def summary(name: str, ms: list[float], target: str = "") -> None:
    print(f"{name:<34} n={len(ms):<3} median {statistics.median(ms):8.1f} ms   "
          f"p90 {pct(ms, 0.9):8.1f} ms   max {max(ms):8.1f} ms   {target}")


def crash_rounds(root: Path, rounds: int) -> None:
    d = Daemon(root / "crash", {"restart": {"min_uptime": "300ms", "max_failures": 1000}})
    d.start()
    respawn, ready = [], []
    try:
        d.wait_state("READY")
        for _ in range(rounds):
            time.sleep(0.4)  # past min_uptime: this crash is a first failure (no backoff)
            n = len(d.events("spawn"))
            _post_crash(d)
            wait_for(lambda n=n: len(d.events("spawn")) > n, 10, what="respawn")
            crashed = float((d.root / "control.json.crash").read_text())
            spawn = d.events("spawn")[-1]
            respawn.append((ts(spawn) - crashed) * 1000)
            d.wait_state("READY")
            ready_ev = [e for e in d.events("state") if e["to"] == "READY"][-1]
            ready.append((ts(ready_ev) - crashed) * 1000)
    finally:
        d.close()
    summary("crash-to-respawn", respawn, "(target <= 200 ms; launchd >= 10 s, systemd 100 ms)")
    summary("crash-to-READY (stand-in server)", ready)


def _post_crash(d: Daemon) -> None:
    with contextlib.suppress(OSError):  # the server dies mid-answer, as asked
        http("POST", f"http://127.0.0.1:{d.server_port}/fake/crash", timeout=5)


def hang_rounds(root: Path, rounds: int) -> None:
    health = {"interval": "1s", "timeout": "1s", "canary_timeout": "1s", "failures": 3}
    d = Daemon(root / "hang", {"health": health, "restart": {"min_uptime": "300ms",
                                                             "max_failures": 1000}})
    # The first failing probe starts within one interval; each takes its timeout; the
    # failures are one interval apart.
    bound = 1.0 + 3 * 1.0 + 2 * 1.0
    d.start()
    detect = []
    try:
        d.wait_state("READY")
        for _ in range(rounds):
            time.sleep(0.4)
            n = len(d.events("failure"))
            http("POST", f"http://127.0.0.1:{d.server_port}/fake/hang", timeout=5)
            hung = float((d.root / "control.json.hang").read_text())
            wait_for(lambda n=n: len(d.events("failure")) > n, bound + 10, what="detection")
            detect.append((ts(d.events("failure")[-1]) - hung) * 1000)
            d.wait_state("READY")
    finally:
        d.close()
    summary("hang detection", detect,
            f"(bound {bound * 1000:.0f} ms = interval + 3 x timeout + 2 x interval, all 1 s)")


def idle(root: Path, seconds: float) -> None:
    d = Daemon(root / "idle", {"health": {"interval": "5s", "timeout": "5s",
                                          "canary_interval": "60s"}})
    d.start()
    try:
        d.wait_state("READY", timeout=30)
        time.sleep(2)
        assert d.proc is not None
        p = psutil.Process(d.proc.pid)
        c0, t0 = p.cpu_times(), time.monotonic()
        time.sleep(seconds)
        c1, t1 = p.cpu_times(), time.monotonic()
        cpu = (c1.user + c1.system - c0.user - c0.system) / (t1 - t0) * 100
        rss = p.memory_info().rss / 2**20
    finally:
        d.close()
    print(f"{'daemon idle CPU (READY, 5s/60s)':<34} {cpu:.3f} % of one core over {seconds:.0f} s "
          "(target < 1 %)")
    print(f"{'daemon RSS (READY)':<34} {rss:.1f} MiB (target < 80 MB)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--idle", type=float, default=30.0)
    args = ap.parse_args()
    print(f"sovereignd supervisor benchmark — python {sys.version.split()[0]}, "
          f"{psutil.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory(prefix="sovereignd-bench-") as tmp:
        root = Path(tmp)
        crash_rounds(root, args.rounds)
        hang_rounds(root, max(3, args.rounds // 3))
        idle(root, args.idle)


if __name__ == "__main__":
    main()
