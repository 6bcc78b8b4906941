"""Benchmark (prints figures; not a pass/fail test): from a changed byte to a stopped server.

    python -m tests.bench.bench_detection [--size-gib 1] [--rounds 3]

A model directory with one large weight file is approved (`sovereignd baseline`), the daemon
serves it (stand-in server), then one byte of the file is rewritten in place. Measured: the
write -> /readyz 503 (QUARANTINED), and the write -> the server process gone. The target is
1 s plus the time to hash the file, which is printed alongside (one core, OpenSSL SHA-256).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import tempfile
import time
from pathlib import Path

from tests.harness import Daemon
from tests.helpers import run_cli, wait_for


def make_file(path: Path, size: int) -> None:
    block = os.urandom(1 << 20)
    with path.open("wb") as f:
        for _ in range(size >> 20):
            f.write(block)


def hash_seconds(path: Path) -> float:
    t0 = time.perf_counter()
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-gib", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="sovereignd-detect-") as tmp:
        d = Daemon(Path(tmp) / "d")
        weights = d.model / "model.safetensors.bin"
        make_file(weights, int(args.size_gib * (1 << 30)))
        d.cfg["integrity"] = {"manifest": str(d.root / "model.sha256")}
        d.write_config()
        res = run_cli("baseline", "--config", str(d.config_path), timeout=600)
        assert res.returncode == 0, res.stderr
        hashed = statistics.median(hash_seconds(weights) for _ in range(2))
        d.start()
        to_503, to_stopped = [], []
        try:
            for _ in range(args.rounds):
                pid = d.wait_state("READY", timeout=120)["server"]["pid"]
                offset = weights.stat().st_size // 2
                with weights.open("r+b") as f:
                    f.seek(offset)
                    old = f.read(1)
                    f.seek(offset)
                    t0 = time.time()
                    f.write(bytes([old[0] ^ 0xFF]))
                wait_for(lambda: d.get("/readyz")[0] == 503, 60, interval=0.005,
                         what="503")
                to_503.append(time.time() - t0)
                wait_for(lambda p=pid: not Path(f"/proc/{p}").exists(), 60, interval=0.005,
                         what="server gone")
                to_stopped.append(time.time() - t0)
                with weights.open("r+b") as f:
                    f.seek(offset)
                    f.write(old)
        finally:
            d.close()
    size = f"{args.size_gib:g} GiB"
    print(f"weight file {size}; one SHA-256 pass over it (one core): {hashed:.3f} s")
    print(f"write -> /readyz 503        median {statistics.median(to_503):.3f} s   "
          f"max {max(to_503):.3f} s   (n={len(to_503)})")
    print(f"write -> server stopped     median {statistics.median(to_stopped):.3f} s   "
          f"max {max(to_stopped):.3f} s")
    print(f"target: <= 1 s + hash time = {1 + hashed:.3f} s -> "
          f"{'met' if max(to_stopped) <= 1 + hashed else 'NOT met'}")


if __name__ == "__main__":
    main()
