"""Benchmark (prints figures; not a pass/fail test): the gateway's cost with each requests.sync.

    python -m tests.bench.bench_recordsync [--duration 5] [--warmup 1] [--quiet 20]

The gateway benchmark's set-up (tests/bench/bench_gateway.py: nginx answering fixed JSON as
the daemon's "server", a client key checked per request, sealed records, the daemon pinned to
core 0 and wrk and nginx to core 1), run once per `requests.sync` setting: always, interval
(50 ms, the default), never. For each, at 1 and 32 concurrent connections: requests/s, p50
and p99 latency, the added p50 against direct-to-nginx, and records/s (every request writes
its start entry and its record: two sealed lines). The upstream is nginx, not a model server:
these are the gateway's own costs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from tests.bench import bench_gateway as bg
from tests.harness import http as request

MODES = ("always", "interval", "never")


def sync_daemon(root: Path, mode: str) -> bg.Daemon:
    root.mkdir(parents=True, exist_ok=True)
    d = bg.nginx_daemon(root)
    if mode != "unset":  # "unset": no requests.sync key, for a checkout from before it existed
        d.cfg["requests"] = {**d.cfg.get("requests", {}), "sync": mode,
                             "sync_interval": "50ms"}
        d.write_config()
    return d


def last_seq(logs: Path) -> int:
    return int(bg.last_record(logs)["seq"])


def bench_mode(root: Path, mode: str, args: argparse.Namespace,
               direct: dict[int, bg.Run]) -> list[tuple[bg.Run, float]]:
    d = sync_daemon(root, mode)
    key = bg.prepare_daemon(d)
    d.start()
    out: list[tuple[bg.Run, float]] = []
    try:
        d.wait_state("READY", timeout=60)
        assert d.proc is not None
        daemon_proc = bg.tree(d.proc.pid, with_children=False)
        nginx = bg.tree(d.server_pid(), with_children=True)
        gateway = f"{d.url}/v1/chat/completions"
        code, body, _ = request("POST", gateway, json.loads(bg.CHAT_BODY),
                                {"Authorization": f"Bearer {key}"})
        if code != 200:
            raise RuntimeError(f"the gateway answered {code}: {body[:300]!r}")
        script = bg.write_script(root / "gateway.lua", key)
        direct_script = bg.write_script(root / "direct.lua", key)
        upstream = f"http://127.0.0.1:{d.server_port}/v1/chat/completions"
        for c in bg.CONCURRENCY:
            if c not in direct:
                direct[c] = bg.measure("direct", upstream, direct_script, c,
                                       duration=args.duration, warmup=args.warmup,
                                       gateway=None, upstream=nginx, quiet=args.quiet)
            if args.warmup > 0:
                bg.wrk(gateway, script, c, args.warmup)
            before = last_seq(d.logs)
            run = bg.measure(f"sync={mode}", gateway, script, c, duration=args.duration,
                             warmup=0, gateway=daemon_proc, upstream=nginx, quiet=args.quiet,
                             tries=1)
            lines = last_seq(d.logs) - before
            out.append((run, lines / args.duration))
    finally:
        d.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per measured row")
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds of warm-up before each")
    ap.add_argument("--quiet", type=float, default=20.0,
                    help="before each row, wait up to this many seconds for other load")
    ap.add_argument("--modes", default=",".join(MODES),
                    help="sync settings to measure, comma-separated; `unset` leaves the key "
                         "out (to measure a checkout from before requests.sync)")
    args = ap.parse_args()
    missing = [tool for tool in ("nginx", "wrk") if shutil.which(tool) is None]
    if missing:
        sys.exit(f"bench_recordsync needs {' and '.join(missing)} on PATH")
    print(f"sovereignd requests.sync benchmark — {bg.tool_versions()}")
    print(f"load: wrk -t1, POST /v1/chat/completions, {args.warmup:g} s warm-up then "
          f"{args.duration:g} s per row; upstream nginx (fixed JSON); sealed records")
    direct: dict[int, bg.Run] = {}
    rows: list[tuple[bg.Run, float]] = []
    with tempfile.TemporaryDirectory(prefix="sovereignd-bench-sync-") as tmp:
        for mode in args.modes.split(","):
            rows += bench_mode(Path(tmp) / mode, mode, args, direct)
    print()
    head = (f"{'scenario':<15} {'conc':>4} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
            f"{'added p50':>9} {'records/s':>10} {'errors':>6} {'other %':>8}")
    print(head)
    print("-" * len(head))
    table: list[tuple[bg.Run, float | None]] = [(r, None) for r in direct.values()]
    table += [(r, recs) for r, recs in rows]
    for r, recs in sorted(table, key=lambda x: (x[0].concurrency, x[0].scenario != "direct")):
        added: Any = r.p50_ms - direct[r.concurrency].p50_ms if r.scenario != "direct" else None
        print(f"{r.scenario:<15} {r.concurrency:>4} {r.rps:>9,.0f} {r.p50_ms:>8.3f} "
              f"{r.p99_ms:>8.3f} {'' if added is None else f'{added:+.3f}':>9} "
              f"{'' if recs is None else f'{recs:,.0f}':>10} {r.errors:>6} "
              f"{bg.fmt_foreign(r.foreign):>8}")
    print("  records/s: sealed lines written per second (a start entry and a record per "
          "request); other % = other programs' load on core 0/1 during the row")


if __name__ == "__main__":
    main()
