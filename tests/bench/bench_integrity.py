#!/usr/bin/env python3
"""Benchmark (prints figures; not a pass/fail test): manifest verification and RECORD checking.

Weights: creates (once, then reuses) >= 2 GiB of files in a cache folder, warms the page cache,
then times in one run `sovereignd manifest verify` (library call and CLI process, all cores),
`shasum -a 256 -c` and `sha256sum -c` on the same files, against what SHA-256 itself allows:
one core of OpenSSL on an in-memory buffer, and all cores hashing memory at once.

    python tests/bench/bench_integrity.py                 # 4 x 512 MiB in /tmp/sovereignd-bench
    python tests/bench/bench_integrity.py --buffer-sweep       # also read-buffer sizes, and mmap
    python tests/bench/bench_integrity.py --venv /root/.cache/sovereignd/vllm-cpu --no-weights
"""

from __future__ import annotations

import argparse
import hashlib
import mmap
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "daemon"))

from sovereignd.integrity import hashing, manifest, software  # noqa: E402 - after the path is set
from sovereignd.integrity.record import verify_records  # noqa: E402
from sovereignd.integrity.venv import freeze  # noqa: E402
from sovereignd.units import parse_size  # noqa: E402

BLOCK = 64 * 2**20


def gb_s(size: int, seconds: float) -> float:
    return size / seconds / 1e9


def best_of(repeat: int, fn: Callable[[], object]) -> float:
    """Fastest wall time of `repeat` runs: the least disturbed by other work on the machine."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def ensure_files(folder: Path, count: int, size: int) -> list[Path]:
    """`count` files of `size` bytes of random-looking data; reused when already there."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"model-{i + 1:05d}-of-{count:05d}.bin" for i in range(count)]
    block = bytearray(os.urandom(BLOCK))
    for n, path in enumerate(paths):
        if path.exists() and path.stat().st_size == size:
            continue
        print(f"writing {path} ({size / 2**20:.0f} MiB)", flush=True)
        with path.open("wb") as f:
            written = 0
            while written < size:
                block[:16] = f"{n:08d}{written // BLOCK:08d}".encode()  # no two blocks alike
                chunk = memoryview(block)[: min(BLOCK, size - written)]
                f.write(chunk)
                written += len(chunk)
    for stray in folder.glob("model-*.bin"):
        if stray not in paths:
            stray.unlink()
    return paths


def warm(paths: list[Path]) -> None:
    buf = memoryview(bytearray(2**20))
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            while os.readv(fd, [buf]):
                pass
        finally:
            os.close(fd)


def memory_hash_rate(threads: int, size: int = 256 * 2**20, chunk: int = 2**20) -> float:
    """GB/s of hashlib SHA-256 over an in-memory buffer on `threads` threads at once."""
    data = memoryview(os.urandom(size))

    def work() -> None:
        h = hashlib.sha256()
        for offset in range(0, size, chunk):
            h.update(data[offset:offset + chunk])

    def run() -> None:
        pool = [threading.Thread(target=work) for _ in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()

    return gb_s(size * threads, best_of(3, run))


def mmap_hash(paths: list[Path], workers: int) -> None:
    """Hash through mmap (no copy into a buffer); for comparison only: a file truncated while
    mapped would kill the daemon with SIGBUS, so sovereignd reads instead."""
    queue = list(paths)
    lock = threading.Lock()

    def work() -> None:
        while True:
            with lock:
                if not queue:
                    return
                path = queue.pop()
            with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                m.madvise(mmap.MADV_SEQUENTIAL)
                h = hashlib.sha256()
                view = memoryview(m)
                for offset in range(0, len(m), 2**20):
                    h.update(view[offset:offset + 2**20])
                view.release()

    pool = [threading.Thread(target=work) for _ in range(workers)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()


def bench_weights(args: argparse.Namespace) -> None:
    model = args.dir / "model"
    size = parse_size(args.size)
    paths = ensure_files(model, args.files, size)
    total = size * len(paths)
    target = model / manifest.DEFAULT_NAME
    if not target.exists() or target.stat().st_mtime < max(p.stat().st_mtime for p in paths):
        manifest.write_manifest(target, manifest.create_manifest(model).manifest)
    approved = manifest.read_manifest(target)
    warm(paths)
    workers = hashing.resolve_workers(args.workers)
    cpus = os.cpu_count() or 1
    print(f"\n{len(paths)} files x {size / 2**20:.0f} MiB = {total / 2**30:.2f} GiB in {model}, "
          f"page cache warm; {cpus} CPUs, {workers} hashing threads; best of {args.repeat}")

    # The limit is measured before and after the runs and the better figure kept, so that other
    # work on the machine during one measurement does not flatter the percentages.
    one_core = memory_hash_rate(1)
    all_cores = memory_hash_rate(cpus)

    rows: list[tuple[str, float]] = []

    def library() -> None:
        report = manifest.verify_manifest(model, approved, workers=args.workers)
        assert report.ok, report.lines(quiet=True)

    rows.append(("sovereignd manifest verify (library)", best_of(args.repeat, library)))
    cli = [sys.executable, "-m", "sovereignd", "manifest", "verify", str(model), "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(REPO / "daemon")}
    rows.append(("sovereignd manifest verify (CLI)", best_of(args.repeat, lambda: subprocess.run(
        cli, check=True, env=env, capture_output=True))))
    for tool in (["shasum", "-a", "256", "-c"], ["sha256sum", "-c"]):
        if shutil.which(tool[0]) is None:
            print(f"  ({tool[0]} not installed: skipped)")
            continue
        rows.append((" ".join(tool), best_of(min(args.repeat, 2), lambda t=tool: subprocess.run(
            [*t, "--quiet", manifest.DEFAULT_NAME], cwd=model, check=True,
            capture_output=True))))

    one_core = max(one_core, memory_hash_rate(1))
    all_cores = max(all_cores, memory_hash_rate(cpus))
    print("\nSHA-256 limit (hashlib/OpenSSL, in-memory buffer, best before/after):")
    print(f"  1 core                          {one_core:6.2f} GB/s")
    print(f"  {cpus} cores at once                 {all_cores:6.2f} GB/s  "
          f"({all_cores / one_core:.2f}x one core)")

    print(f"\nVerify {total / 2**30:.2f} GiB (warm cache):")
    shasum_rate = next((gb_s(total, s) for name, s in rows if name.startswith("shasum")), None)
    for name, seconds in rows:
        rate = gb_s(total, seconds)
        extra = f"  {rate / shasum_rate:5.1f}x shasum" if shasum_rate else ""
        print(f"  {name:38s} {seconds:7.2f} s  {rate:6.2f} GB/s  "
              f"{100 * rate / all_cores:5.1f}% of the {cpus}-core limit{extra}")
    lib_rate = gb_s(total, rows[0][1])
    print(f"\n  target >= 3.0 GB/s on 2 cores: {'met' if lib_rate >= 3.0 else 'NOT met'} "
          f"({lib_rate:.2f} GB/s; this machine's {cpus}-core SHA-256 ceiling is "
          f"{all_cores:.2f} GB/s)")

    if args.buffer_sweep:
        print(f"\nRead buffer per hashing thread ({workers} threads, library hashing only; "
              "rounds interleaved, best kept):")
        sizes = [128 * 2**10, 256 * 2**10, 512 * 2**10, 2**20, 2 * 2**20, 8 * 2**20, 16 * 2**20]
        runs: dict[str, Callable[[], object]] = {
            f"{b // 2**10:6d} KiB": (lambda b=b: hashing.hash_files_report(
                paths, workers, buffer_size=b)) for b in sizes}
        runs["mmap      "] = lambda: mmap_hash(paths, workers)
        best = dict.fromkeys(runs, float("inf"))
        for _ in range(args.repeat):
            for label, fn in runs.items():
                best[label] = min(best[label], best_of(1, fn))
        for label, seconds in best.items():
            note = ("  <- default" if label.strip() == f"{hashing.DEFAULT_BUFFER_SIZE // 2**10} KiB"
                    else "  (no copy; not used: SIGBUS if a file shrinks while mapped)"
                    if label.startswith("mmap") else "")
            print(f"  {label} {gb_s(total, seconds):6.2f} GB/s{note}")


def bench_venv(args: argparse.Namespace) -> None:
    venv = args.venv
    if not (venv / "pyvenv.cfg").exists():
        print(f"\n{venv}: not a venv (no pyvenv.cfg); RECORD benchmark skipped")
        return
    print(f"\nRECORD verification of {venv}:")
    for label in ("first run", "again (warm cache)"):
        start = time.perf_counter()
        report = verify_records(venv, workers=args.workers)
        seconds = time.perf_counter() - start
        verdict = ("all match" if report.ok else
                   f"{len(report.mismatched)} changed, {len(report.missing)} missing")
        print(f"  {label:20s} {report.files_checked} files of {report.dists} distributions, "
              f"{report.bytes_hashed / 2**30:.2f} GiB in {seconds:.2f} s: "
              f"{gb_s(report.bytes_hashed, seconds):.2f} GB/s, "
              f"{report.files_checked / seconds:,.0f} files/s; {verdict}")
    print(f"\nSoftware verification of {venv} and its interpreter, every file, bytecode "
          f"included (load {load()}):")
    start = time.perf_counter()
    approved = software.create(venv, workers=args.workers)
    seconds = time.perf_counter() - start
    print(f"  baseline (hash all)  {len(approved.digests)} files in {seconds:.2f} s; "
          f"{approved.interpreter.summary()}")
    for label in ("verify", "verify again"):
        start = time.perf_counter()
        files = software.verify(approved, workers=args.workers)
        seconds = time.perf_counter() - start
        print(f"  {label:20s} {files.files_checked} files, "
              f"{files.bytes_hashed / 2**30:.2f} GiB in {seconds:.2f} s: "
              f"{gb_s(files.bytes_hashed, seconds):.2f} GB/s; "
              f"{'all match' if files.ok else f'{len(files.issues)} problems'}, "
              f"{len(files.recompiled)} recompiled .pyc")
    start = time.perf_counter()
    frozen = freeze(venv)
    print(f"  freeze (metadata only) {len(frozen.splitlines())} lines in "
          f"{time.perf_counter() - start:.3f} s")


def load() -> str:
    """The 1-minute load average: the figures mean little if other work shares the cores."""
    return f"{os.getloadavg()[0]:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/sovereignd-bench"),
                        help="cache folder for the generated files (kept between runs)")
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--size", default="512MiB", help="size of each file")
    parser.add_argument("--workers", type=int, default=0, help="hashing threads (0: one per CPU)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement (best kept)")
    parser.add_argument("--buffer-sweep", action="store_true",
                        help="also time read-buffer sizes and mmap")
    parser.add_argument("--venv", type=Path, help="also time RECORD verification of this venv")
    parser.add_argument("--no-weights", action="store_true", help="skip the weights benchmark")
    args = parser.parse_args()
    print(f"load average at start: {load()} on {os.cpu_count()} CPUs")
    if not args.no_weights:
        bench_weights(args)
    if args.venv:
        bench_venv(args)
    print(f"\nload average at end: {load()}")


if __name__ == "__main__":
    main()
