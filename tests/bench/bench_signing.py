#!/usr/bin/env python3
"""Benchmark (prints figures; not a pass/fail test): the start-up check of a signed model.

For the tiny model and for a ~1 GiB folder of random weights (made once in a cache folder),
signs with `sovereignd model sign` (an EC P-256 key made by openssl), warms the page cache, then
times, best of --repeat runs: the signature alone (model-signing, offline); the whole check the
daemon does before a start (signature + every file hashed by sovereignd's parallel hashing);
the same check with the shasum manifest instead; and `model_signing verify key` (the library
hashing the folder itself) as the reference.

    python tests/bench/bench_signing.py                       # tiny model + 1 GiB
    python tests/bench/bench_signing.py --size 1GiB --repeat 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "daemon"))

from sovereignd.integrity import hashing, manifest, signing  # noqa: E402 - after the path is set
from sovereignd.units import parse_size  # noqa: E402

TINY = Path.home() / ".cache" / "sovereignd" / "models" / "tiny-llama"
MODEL_SIGNING = Path(sys.executable).parent / "model_signing"


def best(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.monotonic()
        fn()
        times.append(time.monotonic() - t0)
    return min(times)


def make_big(folder: Path, size: int) -> Path:
    """`size` bytes of random weights in 256 MiB files, plus a config (made once)."""
    model = folder / f"model-{size}"
    if (model / "config.json").exists():
        return model
    model.mkdir(parents=True, exist_ok=True)
    chunk, left, n = 256 * 2**20, size, 0
    while left > 0:
        part = min(chunk, left)
        with (model / f"pytorch_model-{n:05d}.bin").open("wb") as f:
            for _ in range(0, part, 16 * 2**20):
                f.write(os.urandom(min(16 * 2**20, part)))
        left -= part
        n += 1
    (model / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}\n')
    return model


def bench(model: Path, keys: Path, repeat: int) -> None:
    private, public = keys / "k.pem", keys / "k.pub"
    sig = keys / f"{model.name}.sig"
    sha = keys / f"{model.name}.sha256"
    size = sum(p.stat().st_size for p in model.rglob("*") if p.is_file())
    t_sign = best(lambda: signing.sign(model, private, sig), 1)
    created = manifest.create_manifest(model, manifest_path=sha)
    manifest.write_manifest(sha, created.manifest)
    hashing.hash_files_report({p for p in model.rglob("*") if p.is_file()}, 0)  # warm cache

    def signed_check() -> None:
        s = signing.verify(sig, public_key=public)
        r = manifest.verify_manifest(model, s.manifest, manifest_path=sig,
                                     ignore=s.ignored(model))
        assert r.ok, r.problems

    def manifest_check() -> None:
        m = manifest.read_manifest(sha)
        r = manifest.verify_manifest(model, m, manifest_path=sha)
        assert r.ok, r.problems

    def library() -> None:
        subprocess.run([str(MODEL_SIGNING), "verify", "key", str(model), "--public_key",
                        str(public), "--signature", str(sig)], check=True,
                       capture_output=True)

    t_sig = best(lambda: signing.verify(sig, public_key=public), repeat)
    t_signed = best(signed_check, repeat)
    t_manifest = best(manifest_check, repeat)
    t_lib = best(library, repeat)
    print(f"{model.name}: {size / 2**20:.1f} MiB, "
          f"{sum(1 for p in model.rglob('*') if p.is_file())} files")
    print(f"  sign (sovereignd model sign, once)          {t_sign * 1000:9.1f} ms")
    print(f"  signature alone (offline, no hashing)       {t_sig * 1000:9.1f} ms")
    print(f"  start check, signed (signature + hashing)   {t_signed * 1000:9.1f} ms")
    print(f"  start check, shasum manifest                {t_manifest * 1000:9.1f} ms")
    print(f"  model_signing verify key (library hashing)  {t_lib * 1000:9.1f} ms  (new process)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1GiB", help="size of the big model (default 1GiB)")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/sovereignd-bench-signing"))
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(f"cores: {os.cpu_count()}; best of {args.repeat}, page cache warm")
    with tempfile.TemporaryDirectory() as folder:
        keys = Path(folder)
        subprocess.run(["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout",
                        "-out", str(keys / "k.pem")], check=True, capture_output=True)
        subprocess.run(["openssl", "ec", "-in", str(keys / "k.pem"), "-pubout", "-out",
                        str(keys / "k.pub")], check=True, capture_output=True)
        tiny = keys / "tiny-llama"
        shutil.copytree(TINY, tiny)
        bench(tiny, keys, args.repeat)
        bench(make_big(args.cache, parse_size(args.size)), keys, args.repeat)


if __name__ == "__main__":
    main()
