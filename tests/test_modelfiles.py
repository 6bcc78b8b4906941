"""Names, files and sizes as the server sees them (issue 13, item 5), and `check`'s model-file
checks (item 4). Facts from vLLM's source are cited in sovereignd/modelfiles.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from sovereignd import config
from sovereignd.backends import memory, modelfiles
from sovereignd.backends.registry import for_config
from sovereignd.errors import ConfigError
from tests.helpers import run_cli
from tests.modeldirs import make_hf_cache, make_model


def load(tmp_path: Path, model: Path, server: str = "") -> config.Config:
    text = f"server:\n  model: {model}\n{server}logs:\n  dir: {tmp_path}/logs\n"
    return config.loads(text.encode(), tmp_path / "c.yaml")


def test_an_hf_cache_snapshot_is_served_as_org_name(tmp_path: Path) -> None:
    """Not as the 40-hex revision: clients, records and the audit see `org/tiny`."""
    snapshot = make_hf_cache(tmp_path / "hub")
    cfg = load(tmp_path, snapshot)
    assert cfg.model_name == "org/tiny"
    argv = for_config(cfg).argv(cfg, "k")
    assert argv[argv.index("--served-model-name") + 1] == "org/tiny"
    assert modelfiles.hf_cache_name(tmp_path / "models--acme--a--b" / "snapshots" / "r") \
        == "acme/a/b"
    assert modelfiles.served_name(tmp_path / "plain-dir") == "plain-dir"
    assert load(tmp_path, snapshot, "  served_model_name: mine\n").model_name == "mine"


def test_vllm_serve_takes_the_model_positionally_the_api_server_module_by_flag(
        tmp_path: Path) -> None:
    model = make_model(tmp_path / "m")
    serve = load(tmp_path, model)
    argv = for_config(serve).argv(serve, "k")
    assert argv[:3] == ["vllm", "serve", str(model)] and "--model" not in argv
    module = load(tmp_path, model, "  command: [python, -m, vllm.entrypoints.openai.api_server]\n")
    argv = for_config(module).argv(module, "k")
    assert argv[3:5] == ["--model", str(model)]


@pytest.mark.parametrize("spelling", ["--api_key", "--api-k", "--api_k=abc", "--hos", "--por",
                                      "--served_model_name", "--mod", "--shutdown_timeout"])
def test_reserved_flags_are_refused_in_every_spelling_the_server_accepts(
        tmp_path: Path, spelling: str) -> None:
    """vLLM reads `--api_key` as `--api-key` and takes unambiguous prefixes."""
    model = make_model(tmp_path / "m")
    args = json.dumps([spelling] if "=" in spelling else [spelling, "x"])
    with pytest.raises(ConfigError) as err:
        load(tmp_path, model, f"  args: {args}\n")
    assert "server's parser reads" in str(err.value)


def test_flags_that_only_start_like_reserved_ones_are_allowed(tmp_path: Path) -> None:
    model = make_model(tmp_path / "m")
    cfg = load(tmp_path, model, "  args: [--model-impl, vllm, --port-offset-x, '1', -p]\n")
    assert cfg.server.args[0] == "--model-impl"


def _weights(root: Path, *names: str, size: int = 855_440) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        (root / name).write_bytes(b"\0" * size)
    return root


def test_consolidated_and_sharded_files_count_as_vllm_loads_them(tmp_path: Path) -> None:
    """The issue's row: model.safetensors + consolidated.safetensors + an index naming the
    first. vLLM loads one of them (with --load-format auto a consolidated file means the
    Mistral layout); the preflight counted both (1,710,880 bytes for 855,440 loaded)."""
    d = _weights(tmp_path / "a", "model.safetensors", "consolidated.safetensors")
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"w": "model.safetensors"}}))
    assert modelfiles.vllm_weight_files(d) == [d / "consolidated.safetensors"]
    assert memory.weights_bytes(d) == 855_440
    # Told to read the HF layout, vLLM follows the index: the file it names, once.
    assert modelfiles.vllm_weight_files(d, ["--load-format", "safetensors"]) == \
        [d / "model.safetensors"]
    assert memory.weights_bytes(d, ["--load-format=safetensors"]) == 855_440


def test_an_index_keeps_only_the_shards_it_names(tmp_path: Path) -> None:
    d = _weights(tmp_path / "b", "model-00001-of-00002.safetensors",
                 "model-00002-of-00002.safetensors", "model.safetensors", size=100)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    assert memory.weights_bytes(d) == 200
    (d / "model.safetensors.index.json").unlink()
    assert memory.weights_bytes(d) == 300  # no index: vLLM loads every *.safetensors


def test_bin_weights_drop_training_leftovers_and_yield_to_safetensors(tmp_path: Path) -> None:
    d = _weights(tmp_path / "c", "pytorch_model.bin", "optimizer.bin", "training_args.bin",
                 size=10)
    assert memory.weights_bytes(d) == 10
    _weights(d, "model.safetensors", size=7)
    assert memory.weights_bytes(d) == 7
    (d / "sub").mkdir()
    _weights(d / "sub", "extra.safetensors", size=1000)  # vLLM globs the top level only
    assert memory.weights_bytes(d) == 7


def test_unknown_load_formats_count_every_weight_file(tmp_path: Path) -> None:
    d = _weights(tmp_path / "d", "model.gguf", size=5)
    assert modelfiles.vllm_weight_files(d, ["--load-format", "gguf"]) is None
    assert memory.weights_bytes(d, ["--load-format", "gguf"]) == 5


def _check(tmp_path: Path, model: Path, server: str = "") -> str:
    (tmp_path / "c.yaml").write_text(
        f"server:\n  model: {model}\n  port: 1\n{server}gateway:\n  listen: 127.0.0.1:2\n"
        f"logs:\n  dir: {tmp_path}/logs\ndaemon:\n  allow_root: true\nmemory:\n  check: false\n")
    res = run_cli("check", "--config", str(tmp_path / "c.yaml"))
    return res.stdout + res.stderr


def _line(report: str, what: str) -> str:
    return next(ln for ln in report.splitlines() if f"] {what}" in ln)


def test_check_requires_a_chat_template_unless_completions_only(tmp_path: Path) -> None:
    """A chat model without a template answers 400 to every chat request (captured:
    vllm-cpu-no-chat-template.txt): `check` fails it; completions_only accepts it."""
    model = make_model(tmp_path / "m")
    shutil.rmtree(model / "sub")
    (model / "tokenizer_config.json").write_text('{"bos_token": "<s>"}')
    out = _check(tmp_path, model)
    assert "[FAIL] chat template" in out and "completions_only" in _line(out, "chat template")
    out = _check(tmp_path, model, "  completions_only: true\n")
    assert "[  ok] chat template" in out
    (model / "tokenizer_config.json").write_text('{"chat_template": "{{ messages }}"}')
    assert "tokenizer_config.json" in _line(_check(tmp_path, model), "chat template")
    (model / "tokenizer_config.json").write_text("{}")
    (model / "chat_template.jinja").write_text("{{ messages }}")
    assert "chat_template.jinja" in _line(_check(tmp_path, model), "chat template")
    (model / "chat_template.jinja").unlink()
    out = _check(tmp_path, model, "  args: [--chat-template, /t.jinja]\n")
    assert "--chat-template" in _line(out, "chat template")


def test_check_requires_tokenizer_files(tmp_path: Path) -> None:
    """The captured start without tokenizer files exits 1: `check` says so first."""
    model = make_model(tmp_path / "m")
    assert "[  ok] tokenizer" in _check(tmp_path, model)
    (model / "tokenizer.json").unlink()
    assert "[FAIL] tokenizer" in _check(tmp_path, model)
    (model / "tokenizer.model").write_bytes(b"\x00")
    assert "[  ok] tokenizer" in _check(tmp_path, model)


def test_check_without_the_server_venv_says_args_were_not_checked(tmp_path: Path) -> None:
    """Without the server's Python the parser cannot be asked: a warning, not a silent pass;
    content-logging flags are still seen."""
    model = make_model(tmp_path / "m")
    out = _check(tmp_path, model, "  args: [--enable-log-requests]\n")
    assert "[warn] server.args" in out and "not checked" in _line(out, "server.args")
    assert "log request content" in _line(out, "server output")


# --- the context length, as vLLM 0.32 derives it ----------------------------------------------


def _model(tmp_path: Path, config: dict[str, object],
           tokenizer: dict[str, object] | None = None) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(config))
    if tokenizer is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(tokenizer))
    return tmp_path


@pytest.mark.parametrize(("config", "tokenizer", "expected"), [
    ({"max_position_embeddings": 4096}, None, (4096, "max_position_embeddings in config.json")),
    ({"max_position_embeddings": 4096, "n_positions": 2048}, None,
     (2048, "n_positions in config.json")),
    ({"max_position_embeddings": 4096, "model_max_length": 8192}, None,
     (8192, "model_max_length in config.json")),
    ({"max_position_embeddings": 4096}, {"model_max_length": 1024},
     (1024, "model_max_length in tokenizer_config.json")),
    ({"max_position_embeddings": 4096}, {"model_max_length": 1e30},
     (4096, "max_position_embeddings in config.json")),
    ({"max_position_embeddings": 4096, "rope_scaling": {"type": "linear", "factor": 2.0}}, None,
     (8192, "max_position_embeddings in config.json times the RoPE scaling factor 2")),
    ({"max_position_embeddings": 131072,
      "rope_parameters": {"rope_type": "llama3", "factor": 8.0}}, None,
     (131072, "max_position_embeddings in config.json")),
    ({"max_position_embeddings": 32768, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
     None, (32768, "max_position_embeddings in config.json")),
    ({"model_type": "gemma3", "text_config": {
        "max_position_embeddings": 131072, "rope_scaling": {"rope_type": "linear",
                                                            "factor": 8.0}}},
     None, (131072, "max_position_embeddings in config.json")),
    ({"text_config": {"max_position_embeddings": 2048}, "max_position_embeddings": 99}, None,
     (2048, "max_position_embeddings in config.json")),
    ({"hidden_size": 128}, None, None),
])
def test_context_length_follows_vllms_derivation(
        tmp_path: Path, config: dict[str, object], tokenizer: dict[str, object] | None,
        expected: tuple[int, str] | None) -> None:
    assert modelfiles.context_length(_model(tmp_path, config, tokenizer)) == expected


def test_context_length_of_an_unreadable_config_is_unknown(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    assert modelfiles.context_length(tmp_path) is None


def test_check_fails_a_max_model_len_the_model_does_not_allow(tmp_path: Path) -> None:
    """vLLM refuses --max-model-len above the derived length after a minute of loading:
    `check` says so first, with the number and where it comes from; the escape hatch vLLM
    offers (VLLM_ALLOW_LONG_MAX_MODEL_LEN) turns it into a warning."""
    model = make_model(tmp_path / "m")
    length = 2048
    (model / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"],
                                                   "max_position_embeddings": length}))
    out = _check(tmp_path, model, f"  args: [--max-model-len, '{length}']\n")
    assert "[  ok] context length" in out
    out = _check(tmp_path, model, f"  args: [--max-model-len, '{length * 2}']\n")
    line = _line(out, "context length")
    assert "[FAIL]" in line and f"--max-model-len {length * 2} is greater than the model's " \
        f"{length} tokens (max_position_embeddings in config.json)" in line
    out = _check(tmp_path, model, f"  args: [--max-model-len, '{length * 2}']\n"
                 "  env: {VLLM_ALLOW_LONG_MAX_MODEL_LEN: '1'}\n")
    assert "[warn] context length" in out
