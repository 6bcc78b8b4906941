"""Benchmark (prints figures; not a pass/fail test): quarantine to the load balancer routing
elsewhere, with the HAProxy configuration `sovereignd fleet haproxy` writes by default.

    python -m tests.bench.bench_fleet [--check-interval 1s] [--rounds 3]

Three daemons with the stand-in server on loopback behind a real HAProxy; a light load (4 at
a time) runs through HAProxy while one host's approved weights get a flipped byte. Printed per
round: flipped byte -> QUARANTINED, QUARANTINED -> HAProxy marks the host DOWN (its admin
socket, polled every 20 ms), the last request reaching the host after its quarantine, and the
failed client requests.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from datetime import datetime
from pathlib import Path

from sovereignd.logs.records import iter_records
from tests.fleet_support import HAProxy, Load
from tests.harness import Daemon
from tests.helpers import run_cli, wait_for
from tests.test_audit import _approve_weights


def _ts(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def round_(root: Path, check_interval: str) -> str:
    keys = root / "keys.json"
    hosts = [Daemon(root / f"h{i}", {"gateway": {"keys_file": str(keys)}},
                    {"default": {"completion_delay": 0.05}}) for i in range(3)]
    haproxy: HAProxy | None = None
    try:
        weights = _approve_weights(hosts[0])
        hosts[0].cfg["integrity"]["stat_interval"] = "200ms"
        hosts[0].write_config()
        key = run_cli("keys", "add", "bench", "--config", str(hosts[0].config_path)).stdout
        for d in hosts:
            d.start()
        for d in hosts:
            d.wait_state("READY")
        haproxy = HAProxy(root / "haproxy", [f"h{i}=127.0.0.1:{d.port}"
                                             for i, d in enumerate(hosts)], check_interval)
        haproxy.start()
        wait_for(lambda: all(haproxy.servers_up().values()), 15, what="every host UP")
        load = Load(haproxy.url, key.strip(), total=1500, concurrency=4)
        load.start()
        wait_for(lambda: load.done >= 100, 60, what="100 requests")
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 1
        flipped = time.time()
        weights.write_bytes(bytes(data))
        wait_for(lambda: not haproxy.servers_up()["h0"], 30, interval=0.02, what="h0 DOWN")
        down = time.time()
        load.join(120)
        q = _ts(next(e for e in hosts[0].events("state") if e["to"] == "QUARANTINED")["ts"])
        last = max(_ts(r["ts"]) for r in iter_records(hosts[0].logs))
        return (f"flip->QUARANTINED {q - flipped:.2f} s, QUARANTINED->DOWN {down - q:.2f} s, "
                f"last request at the host {last - q:+.2f} s, {len(load.failures)} of "
                f"{load.total} failed")
    finally:
        if haproxy is not None:
            haproxy.close()
        for d in hosts:
            d.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check-interval", default="1s")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    print(f"fleet (stand-in server, shared machine), HAProxy checks every "
          f"{args.check_interval}, fall 2:")
    for n in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
            print(f"  round {n + 1}: {round_(Path(tmp), args.check_interval)}", flush=True)


if __name__ == "__main__":
    main()
