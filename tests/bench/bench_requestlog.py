"""Benchmark (prints figures, not pass/fail): the request log's write and verify paths.

    /tmp/dv/bin/python tests/bench/bench_requestlog.py [--records N] [--rotate 64MiB]

Measures `RequestLog.record()` with sealing on and rotation + gzip every `--rotate` (the
default configuration), the time of each call (so rotation stalls show in the tail), unsealed
writing for comparison, `verify_logs` throughput with the key, and `KeyStore.authenticate`.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "daemon"))

from sovereignd.gateway import keys
from sovereignd.logs import sealing
from sovereignd.logs.records import list_segments
from sovereignd.logs.requestlog import RequestLog
from sovereignd.logs.verify import verify_logs
from sovereignd.units import parse_size


def fields(i: int) -> dict[str, object]:
    return {"id": f"0b5e6a4c8d2f4e1a9c3b7d5e{i:08x}", "client": "alice", "method": "POST",
            "path": "/v1/chat/completions", "model": "my-model", "status": 200,
            "stream": True, "latency_ms": 812.25, "ttfb_ms": 3.5, "ttft_ms": 41.75,
            "prompt_tokens": 412, "completion_tokens": 128, "bytes_in": 2210,
            "bytes_out": 18233, "remote": "127.0.0.1", "error": None}


def bench_write(root: Path, n: int, rotate: int,
                sealed: bool) -> tuple[list[int], float, Path, bytes | None]:
    """Write `n` records; return per-call times (ns), elapsed seconds, the folder, the key."""
    logs, state = root / "logs", root / "state"
    key = sealing.init_key(state)[0] if sealed else None
    log = RequestLog(logs, state, rotate_bytes=rotate, compress=True)
    log.open()
    batch = [fields(i) for i in range(n)]
    times = [0] * n
    clock = time.perf_counter_ns
    gc.collect()
    start = time.perf_counter()
    for i, f in enumerate(batch):
        t0 = clock()
        log.record(f)
        times[i] = clock() - t0
    elapsed = time.perf_counter() - start
    t_close = time.perf_counter()
    log.close()
    close_s = time.perf_counter() - t_close
    print(f"  close (waits for the last compression): {close_s:.2f} s")
    return times, elapsed, logs, key


def report(label: str, times: list[int], elapsed: float) -> None:
    n = len(times)
    ordered = sorted(times)
    p50 = ordered[n // 2] / 1000
    p99 = ordered[int(n * 0.99)] / 1000
    p999 = ordered[int(n * 0.999)] / 1000
    worst = ordered[-1] / 1000
    print(f"{label}: {n:,} records in {elapsed:.2f} s = {n / elapsed:,.0f} records/s, "
          f"{elapsed / n * 1e6:.2f} us/record (mean)")
    print(f"  per call: p50 {p50:.2f} us, p99 {p99:.2f} us, p99.9 {p999:.2f} us, "
          f"max {worst / 1000:.1f} ms (rotation: fsync, rename, key evolution)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=300_000)
    parser.add_argument("--rotate", default="64MiB")
    args = parser.parse_args()
    rotate = parse_size(args.rotate)
    print(f"python {sys.version.split()[0]}, {args.records:,} records, rotation every "
          f"{args.rotate} with gzip in a worker thread")
    with tempfile.TemporaryDirectory(prefix="bench-reqlog-") as tmp:
        root = Path(tmp)
        times, elapsed, logs, key = bench_write(root / "sealed", args.records, rotate, True)
        report("record() sealed", times, elapsed)
        segments = list_segments(logs)
        size = sum(s.path.stat().st_size for s in segments)
        live = (logs / "requests.log").stat().st_size
        print(f"  {len(segments)} rotated file(s), {size / 2**20:.1f} MiB compressed; live file "
              f"{live / 2**20:.1f} MiB")

        t0 = time.perf_counter()
        result = verify_logs(logs, key, None)
        vt = time.perf_counter() - t0
        assert result.ok, result.broken
        print(f"verify_logs with key: {result.records:,} records in {vt:.2f} s = "
              f"{result.records / vt:,.0f} records/s")
        t0 = time.perf_counter()
        result = verify_logs(logs, None, None)
        vt = time.perf_counter() - t0
        print(f"verify_logs chain only: {result.records / vt:,.0f} records/s")

        times, elapsed, _, _ = bench_write(root / "unsealed", args.records // 3, rotate, False)
        report("record() unsealed (no key), for comparison", times, elapsed)

        path = root / "keys.json"
        key_text, _ = keys.add_key(path, "alice")
        for i in range(99):
            keys.add_key(path, f"user{i}")
        store = keys.KeyStore(path)
        store.load()
        rounds = 200_000
        t0 = time.perf_counter()
        for _ in range(rounds):
            store.authenticate(key_text)
        at = time.perf_counter() - t0
        samples = []
        for _ in range(5):
            t1 = time.perf_counter()
            for _ in range(20_000):
                store.authenticate("sk-sov-" + "x" * 43)
            samples.append((time.perf_counter() - t1) / 20_000)
        print(f"KeyStore.authenticate (100 keys): {at / rounds * 1e6:.2f} us valid, "
              f"{statistics.median(samples) * 1e6:.2f} us unknown")


if __name__ == "__main__":
    main()
