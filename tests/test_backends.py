"""Backend profiles: the argument vector and environment each server gets."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from sovereignd import config
from sovereignd.backends.registry import BACKENDS, for_config
from sovereignd.errors import ConfigError


def load(tmp_path: Path, server: str) -> config.Config:
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    text = f"server:\n  model: {model}\n{server}logs:\n  dir: {tmp_path}/logs\n"
    return config.loads(text.encode(), tmp_path / "c.yaml")


def test_vllm_gets_the_key_in_its_environment_only(tmp_path: Path) -> None:
    cfg = load(tmp_path, "  served_model_name: m\n  args: [--max-model-len, '512']\n"
                         "  transport: tcp\n")
    b = for_config(cfg)
    argv = b.argv(cfg, "KEY123")
    assert argv == ["vllm", "serve", str(tmp_path / "model"),
                    "--served-model-name", "m", "--host", "127.0.0.1", "--port", "8001",
                    "--shutdown-timeout", "10", "--max-model-len", "512"]
    assert "KEY123" not in " ".join(argv)
    env = b.env(cfg, "KEY123")
    assert env["VLLM_API_KEY"] == "KEY123"
    assert env["HF_HUB_OFFLINE"] == env["TRANSFORMERS_OFFLINE"] == "1"
    assert env["HF_DATASETS_OFFLINE"] == "1"
    assert not b.key_in_argv and not b.logs_content
    # gloo on loopback; pytest's tmp_path is too long for vLLM's IPC socket names there.
    assert env["GLOO_SOCKET_IFNAME"] == ("lo0" if sys.platform == "darwin" else "lo")
    assert b.private_tmp(cfg) is None and "TMPDIR" not in env
    # vLLM's IPC sockets and rendezvous file in the daemon's private folder.
    state = Path("/var/lib/sovereignd/state")
    cfg = load(tmp_path, f"daemon:\n  state_dir: {state}\n")
    env = for_config(cfg).env(cfg, "K")
    assert env["TMPDIR"] == env["VLLM_RPC_BASE_PATH"] == str(state / "srv" / "tmp")
    # server.env may choose otherwise.
    cfg = load(tmp_path, "  env: {GLOO_SOCKET_IFNAME: eth1}\n")
    assert for_config(cfg).env(cfg, "K")["GLOO_SOCKET_IFNAME"] == "eth1"


def test_vllm_serves_on_a_private_unix_socket_by_default(tmp_path: Path) -> None:
    cfg = load(tmp_path, "")
    argv = for_config(cfg).argv(cfg, "K")
    assert argv[argv.index("--uds") + 1] == str(tmp_path / "logs" / "srv" / "server.sock")
    assert "--port" not in argv and "--host" not in argv


def test_vllm_mlx_serves_on_tcp_by_default_and_refuses_unix(tmp_path: Path) -> None:
    cfg = load(tmp_path, "  backend: vllm-mlx\n  command: [vllm-mlx, serve]\n")
    assert cfg.server_uds is None
    with pytest.raises(ConfigError) as err:
        load(tmp_path, "  backend: vllm-mlx\n  command: [vllm-mlx, serve]\n  transport: unix\n")
    assert {p.path for p in err.value.problems} == {"server.transport"}


def test_vllm_on_a_unix_socket(tmp_path: Path) -> None:
    cfg = load(tmp_path, f"  uds: {tmp_path}/s.sock\n")
    argv = for_config(cfg).argv(cfg, "K")
    assert "--uds" in argv and "--port" not in argv and "--host" not in argv


def test_vllm_mlx_takes_the_model_positionally_and_the_key_as_an_argument(
        tmp_path: Path) -> None:
    cfg = load(tmp_path, "  backend: vllm-mlx\n  command: [vllm-mlx, serve]\n"
                         "  env: {MLX_X: '1'}\n")
    b = for_config(cfg)
    assert b is BACKENDS["vllm-mlx"]
    argv = b.argv(cfg, "KEY123")
    assert argv[:3] == ["vllm-mlx", "serve", str(tmp_path / "model")]
    assert argv[argv.index("--api-key") + 1] == "KEY123"
    assert "--offline" in argv and "--shutdown-timeout" not in argv
    env = b.env(cfg, "KEY123")
    assert "VLLM_API_KEY" not in env and env["MLX_X"] == "1" and env["HF_HUB_OFFLINE"] == "1"
    assert "TMPDIR" not in env and b.private_tmp(cfg) is None
    assert b.redact_argv(argv)[argv.index("--api-key") + 1] == "[REDACTED]"
    assert b.key_in_argv and b.logs_content


@pytest.mark.parametrize(("method", "path", "vllm", "mlx"), [
    ("POST", "/v1/chat/completions", True, True),
    ("POST", "/v1/messages", True, True),
    ("POST", "/v1/messages/count_tokens", True, True),
    ("POST", "/v1/mcp/execute", False, False),
    ("POST", "/v1/responses", True, False),
    ("GET", "/v1/responses/resp_1", True, False),
    ("GET", "/docs", False, False),
    ("POST", "/invocations", False, False),
    ("GET", "/v1/chat/completions", False, False),
])
def test_route_allow_lists(method: str, path: str, vllm: bool, mlx: bool) -> None:
    assert BACKENDS["vllm"].allowed(method, path) is vllm
    assert BACKENDS["vllm-mlx"].allowed(method, path) is mlx


def test_vllm_mlx_config_mistakes_are_caught(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load(tmp_path, f"  backend: vllm-mlx\n  uds: {tmp_path}/s\n")
    paths = {p.path for p in err.value.problems}
    assert {"server.uds", "server.command"} <= paths
