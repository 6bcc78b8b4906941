"""Benchmark (prints figures; not a pass/fail test): cold start to READY for each real backend.

    .venv/bin/python -m tests.bench.bench_backends [--rounds 2] [--backends vllm,vllm-mlx]

For each backend, with the tiny generated model:
- the server on its own: the same argv and environment the daemon would use, launched
  directly; time from exec to `/health` 200, then to the first one-token completion;
- under the daemon: time from `sovereignd run` exec to the READY event (spawn, /health,
  canary), without baselines configured, so the daemon's own cost shows;
- the daemon's added time = daemon READY - server alone to first completion (target <= 1 s);
- and, separately, the time the first start's baseline verification takes (weights and the
  whole server venv by RECORD) when baselines are configured.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from sovereignd import config
from sovereignd.backends import registry
from tests.e2e.conftest import CACHE, MLX_VENV, TINY_MODEL, VLLM_VENV
from tests.harness import Daemon, free_port, group_processes, http
from tests.helpers import REPO, run_cli, wait_for


def overrides(backend: str) -> dict[str, Any]:
    if backend == "vllm":
        return {"server": {"command": [str(VLLM_VENV / "bin" / "python"), "-m",
                                       "vllm.entrypoints.openai.api_server"],
                           "venv": str(VLLM_VENV), "model": str(TINY_MODEL),
                           "served_model_name": "tiny",
                           "args": ["--gpu-memory-utilization", "0.3", "--max-model-len", "512"],
                           "env": {"VLLM_CPU_KVCACHE_SPACE": "1"}, "start_timeout": "5m",
                           "drain": "2s", "stop_grace": "15s"},
                "health": {"canary_timeout": "60s", "startup_poll": "250ms"}}
    return {"server": {"backend": "vllm-mlx",
                       "command": [str(MLX_VENV / "bin" / "vllm-mlx"), "serve"],
                       "venv": str(MLX_VENV), "model": str(TINY_MODEL),
                       "served_model_name": "tiny", "start_timeout": "2m", "drain": "2s",
                       "stop_grace": "10s"},
            "health": {"canary_timeout": "60s", "startup_poll": "250ms"}}


def ts(event: dict[str, Any]) -> float:
    return dt.datetime.fromisoformat(event["ts"].replace("Z", "+00:00")).timestamp()


def alone(d: Daemon) -> tuple[float, float]:
    """The server launched directly as the daemon would: (to /health 200, to 1st completion)."""
    cfg = config.load(d.config_path)
    backend = registry.for_config(cfg)
    key = "bench-key-not-secret-0123456789abcdef"
    env = {**os.environ, "PATH": f"{cfg.server.venv}/bin:{os.environ['PATH']}",
           **backend.env(cfg, key)}
    t0 = time.time()
    proc = subprocess.Popen(backend.argv(cfg, key), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{cfg.server.port}"
    try:
        wait_for(lambda: http("GET", base + "/health", timeout=2)[0] == 200, 300,
                 interval=0.05, what="/health")
        health = time.time() - t0
        path, body = backend.canary(cfg)
        code, _, _ = http("POST", base + path, body, {"Authorization": f"Bearer {key}"},
                          timeout=60)
        assert code == 200
        return health, time.time() - t0
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=60)
        wait_for(lambda: group_processes(proc.pid) == [], 60, what="server gone")


def under_daemon(d: Daemon) -> float:
    t0 = time.time()
    d.start()
    d.wait_state("READY", timeout=300)
    ready = next(e for e in d.events("state") if e["to"] == "READY")
    took = ts(ready) - t0
    d.stop(timeout=120)
    return took


def with_baselines(d: Daemon) -> float:
    d.cfg["integrity"] = {"manifest": str(d.root / "model.sha256")}
    d.cfg["environment"] = {"frozen": str(d.root / "frozen.txt")}
    d.write_config()
    res = run_cli("baseline", "--config", str(d.config_path), timeout=600)
    assert res.returncode == 0, res.stderr
    d.start()
    d.wait_state("READY", timeout=300)
    evs = {e["event"]: e for e in d.events() if e["event"].endswith("_verified")}
    d.stop(timeout=120)
    return sum(float(e["seconds"]) for e in evs.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--backends", default="vllm,vllm-mlx")
    args = ap.parse_args()
    subprocess.run([str(REPO / "ops" / "demo" / "setup.sh"), "--only", "model", "--quiet"],
                   check=True)
    subprocess.run([str(REPO / "ops" / "demo" / "setup.sh"), "--only", "mlx", "--quiet"],
                   check=True)
    print(f"cache {CACHE}; tiny model; {os.cpu_count()} CPUs")
    rows = []
    for name in args.backends.split(","):
        health, first, daemon = [], [], []
        verify = 0.0
        with tempfile.TemporaryDirectory(prefix="sovereignd-bench-") as tmp:
            for i in range(args.rounds):
                d = Daemon(Path(tmp) / f"{name}-{i}", overrides(name), fake=False)
                d.cfg["server"]["port"] = free_port()
                d.write_config()
                # Alternate the order: the second start of a pair finds warmer file caches.
                if i % 2:
                    daemon.append(under_daemon(d))
                h, f = alone(d)
                health.append(h)
                first.append(f)
                if not i % 2:
                    daemon.append(under_daemon(d))
                d.close()
            d = Daemon(Path(tmp) / f"{name}-baselines", overrides(name), fake=False)
            verify = with_baselines(d)
            d.close()
        row = {"backend": name, "alone_health_s": statistics.median(health),
               "alone_first_completion_s": statistics.median(first),
               "daemon_ready_s": statistics.median(daemon),
               "added_s": statistics.median(daemon) - statistics.median(first),
               "baseline_verification_s": verify}
        rows.append(row)
        print(f"{name:<9} server alone: /health {row['alone_health_s']:6.2f} s, 1st completion "
              f"{row['alone_first_completion_s']:6.2f} s | under sovereignd: READY "
              f"{row['daemon_ready_s']:6.2f} s | added {row['added_s']:+.2f} s (target <= 1 s)"
              f" | first-start baseline verification {verify:.2f} s")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
