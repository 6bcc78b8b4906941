"""Configuration: every problem reported at once, by key path, with exit status 78."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from sovereignd import config
from sovereignd.errors import ConfigError
from sovereignd.units import parse_duration, parse_size
from tests.helpers import REPO, run_cli

MINIMAL = "server:\n  model: {model}\nlogs:\n  dir: {logs}\n"


@pytest.fixture
def model(tmp_path: Path) -> Path:
    m = tmp_path / "model"
    m.mkdir()
    (m / "config.json").write_text("{}")
    return m


def write(tmp_path: Path, text: str, model: Path) -> Path:
    path = tmp_path / "sovereignd.yaml"
    path.write_text(text.format(model=model, logs=tmp_path / "logs"))
    return path


def test_minimal_config_loads_with_defaults(tmp_path: Path, model: Path) -> None:
    cfg = config.load(write(tmp_path, MINIMAL, model))
    assert cfg.server.command == ("vllm", "serve")
    assert cfg.server.port == 8001 and cfg.gateway.listen == "127.0.0.1:8000"
    assert cfg.health.interval == 5.0 and cfg.restart.backoff_max == 300.0
    assert cfg.model_name == "model" and cfg.state_dir == tmp_path / "logs"
    assert cfg.gateway.keys_file == tmp_path / "keys.json"  # relative to the config's folder


def test_design_example_keys_all_load(tmp_path: Path, model: Path) -> None:
    """The configuration shown in DESIGN.md is valid as written (with real paths)."""
    text = f"""
server:
  command: [vllm, serve]
  model: {model}
  served_model_name: my-model
  port: 8001
  args: []
  env: {{}}
  venv: /path/to/server-venv
gateway:
  listen: 127.0.0.1:8000
health:
  interval: 5s
restart:
  backoff_initial: 1s
  backoff_max: 5m
integrity:
  manifest: {model}/CHECKSUMS.sha256
environment:
  frozen: /path/to/requirements-frozen.txt
logs:
  dir: {tmp_path}/logs
"""
    cfg = config.loads(text.encode(), tmp_path / "c.yaml")
    assert cfg.restart.backoff_max == 300 and cfg.model_name == "my-model"


BAD_CASES = [
    ("unknown key", "server:\n  model: {model}\n  prot: 1\nlogs:\n  dir: {logs}\n",
     ["server.prot: unknown key (did you mean 'port'?)"]),
    ("unknown section", MINIMAL + "helth:\n  interval: 5s\n",
     ["helth: unknown section (did you mean 'health'?)"]),
    ("missing required", "server:\n  port: 8001\n", ["server.model: required key is missing",
                                                     "logs.dir: required key is missing"]),
    ("bad duration", MINIMAL + "health:\n  interval: soon\n", ["health.interval:"]),
    ("negative duration", MINIMAL + "restart:\n  backoff_max: -5\n", ["restart.backoff_max"]),
    ("bad size", MINIMAL + "requests:\n  rotate_bytes: 12 apples\n", ["requests.rotate_bytes"]),
    ("port range", "server:\n  model: {model}\n  port: 70000\nlogs:\n  dir: {logs}\n",
     ["server.port: must be between 1 and 65535"]),
    ("port type", "server:\n  model: {model}\n  port: eighty\nlogs:\n  dir: {logs}\n",
     ["server.port: expected an integer"]),
    ("bool as int", MINIMAL + "health:\n  failures: true\n", ["health.failures"]),
    ("remote listen", MINIMAL + "gateway:\n  listen: 0.0.0.0:8000\n",
     ["gateway.listen: 0.0.0.0 is not a loopback address"]),
    ("remote server", "server:\n  model: {model}\n  host: 192.0.2.1\nlogs:\n  dir: {logs}\n",
     ["server.host: 192.0.2.1 is not a loopback address"]),
    ("bad listen", MINIMAL + "gateway:\n  listen: localhost\n",
     ["gateway.listen: expected HOST:PORT"]),
    ("api key in args",
     "server:\n  model: {model}\n  args: [--api-key, abc]\nlogs:\n  dir: {logs}\n",
     ["server.args[0]: --api-key would put a key on the command line"]),
    ("port in args",
     "server:\n  model: {model}\n  args: ['--port=9']\nlogs:\n  dir: {logs}\n",
     ["server.args[0]: --port set server.port instead"]),
    ("key in env",
     "server:\n  model: {model}\n  env: {{VLLM_API_KEY: x}}\nlogs:\n  dir: {logs}\n",
     ["server.env.VLLM_API_KEY"]),
    ("grace vs drain",
     "server:\n  model: {model}\n  drain: 30s\n  stop_grace: 10s\nlogs:\n  dir: {logs}\n",
     ["server.stop_grace: must exceed server.drain"]),
    ("backoff order", MINIMAL + "restart:\n  backoff_initial: 10m\n  backoff_max: 1m\n",
     ["restart.backoff_initial: must not exceed backoff_max"]),
    ("same ports", MINIMAL + "gateway:\n  listen: 127.0.0.1:8001\n", ["server.port: 8001"]),
    ("bad choice", MINIMAL + "integrity:\n  on_drift: ignore\n",
     ["integrity.on_drift: must be one of stop, alert"]),
    ("bad pin", MINIMAL + "integrity:\n  manifest_sha256: abc\n", ["integrity.manifest_sha256"]),
    ("tls half", MINIMAL + "gateway:\n  tls_cert: c.pem\n", ["gateway.tls_key"]),
    ("remote without tls", MINIMAL + "gateway:\n  listen: 0.0.0.0:8443\n  allow_remote: true\n",
     ["gateway.tls_cert: a non-loopback listener requires"]),
    ("command empty", "server:\n  model: {model}\n  command: []\nlogs:\n  dir: {logs}\n",
     ["server.command"]),
    ("env not a map", "server:\n  model: {model}\n  env: [A]\nlogs:\n  dir: {logs}\n",
     ["server.env: expected a mapping"]),
    ("section not a map", MINIMAL + "health: 5\n", ["health: expected a mapping"]),
    ("duplicate key", "server:\n  model: {model}\n  port: 1\n  port: 2\nlogs:\n  dir: {logs}\n",
     ["duplicate key 'port'"]),
    ("yaml syntax", "server:\n  model: [unclosed\nlogs: {{}}\n", ["YAML syntax error at line"]),
    ("not a mapping", "- a\n- b\n", ["must be a mapping of sections"]),
]


@pytest.mark.parametrize(("name", "text", "expected"), BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_config_is_rejected_naming_the_key(tmp_path: Path, model: Path, name: str,
                                               text: str, expected: list[str]) -> None:
    path = write(tmp_path, text, model)
    with pytest.raises(ConfigError) as err:
        config.load(path)
    message = str(err.value)
    for fragment in expected:
        assert fragment in message, message


def test_all_problems_are_reported_at_once(tmp_path: Path, model: Path) -> None:
    text = ("server:\n  model: {model}\n  prot: 1\n  args: [--api-key=x]\n"
            "gateway:\n  listen: 10.0.0.1:80\nhealth:\n  interval: never\nlogs:\n  dir: {logs}\n")
    with pytest.raises(ConfigError) as err:
        config.load(write(tmp_path, text, model))
    paths = {p.path for p in err.value.problems}
    assert {"server.prot", "server.args[0]", "gateway.listen", "health.interval"} <= paths


@pytest.mark.parametrize("command", ["check", "run"])
def test_cli_exits_78_on_bad_config_and_names_keys(tmp_path: Path, model: Path,
                                                   command: str) -> None:
    path = write(tmp_path, "server:\n  model: {model}\n  port: x\nlogs:\n  dir: {logs}\n"
                 "gateway:\n  listen: 0.0.0.0:1\n", model)
    res = run_cli(command, "--config", str(path))
    assert res.returncode == 78, res
    assert "server.port" in res.stderr and "gateway.listen" in res.stderr
    if command == "run":  # the daemon: every stderr line is a JSON event, this one too
        [event] = [json.loads(line) for line in res.stderr.splitlines()]
        assert event["event"] == "daemon_exit" and event["exit_status"] == 78
        assert "server.port" in event["error"]


def test_cli_exits_78_on_missing_and_unreadable_file(tmp_path: Path) -> None:
    res = run_cli("check", "--config", str(tmp_path / "absent.yaml"))
    assert res.returncode == 78 and "cannot read the configuration file" in res.stderr
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    res = run_cli("check", "--config", str(binary))
    assert res.returncode == 78 and "not UTF-8" in res.stderr


def test_check_prints_summary_and_exits_zero(tmp_path: Path, model: Path) -> None:
    # What a servable chat model has besides its weights (check fails a model without them).
    (model / "tokenizer.json").write_text("{}")
    (model / "chat_template.jinja").write_text("{{ messages }}")
    text = MINIMAL + "server:\n  command: [/bin/true]\n"
    path = write(tmp_path, "server:\n  model: {model}\n  command: [/bin/true]\n"
                 "logs:\n  dir: {logs}\n", model)
    del text
    res = run_cli("check", "--config", str(path))
    assert res.returncode == 0, res.stdout + res.stderr
    first = res.stdout.splitlines()[0]
    assert "settings are valid; every check below passed" in first and "0 failed" in res.stdout


def test_check_fails_with_exit_1_when_host_checks_fail(tmp_path: Path, model: Path) -> None:
    path = write(tmp_path, "server:\n  model: {model}/gone\n  command: [no-such-program-x]\n"
                 "logs:\n  dir: {logs}\n", model)
    res = run_cli("check", "--config", str(path))
    assert res.returncode == 1
    assert "[FAIL] model directory" in res.stdout and "[FAIL] server command" in res.stdout
    assert "check(s) below FAILED" in res.stdout.splitlines()[0]


def test_example_config_is_generated_from_the_declarations() -> None:
    """config/sovereignd.example.yaml is exactly what `config example` prints."""
    checked_in = (REPO / "config" / "sovereignd.example.yaml").read_text()
    assert checked_in == config.example_yaml() + "\n"
    res = run_cli("config", "example")
    assert res.stdout == checked_in


def test_example_config_parses_and_documents_every_key() -> None:
    raw = yaml.safe_load(config.example_yaml())
    for key, _default, doc in config.describe():
        section, _, name = key.rpartition(".")
        assert doc
        assert f"{name}:" in config.example_yaml()
        # models.NAME.* is shown commented out: the example serves one model.
        assert section in raw or section == "models.NAME"


@pytest.mark.parametrize(("text", "seconds"), [("500ms", 0.5), ("5s", 5), ("10m", 600),
                                                ("1h", 3600), ("1d", 86400), (7, 7),
                                                (0.25, 0.25), ("2", 2)])
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(("text", "size"), [("64MiB", 64 * 2**20), ("1GB", 10**9),
                                            ("512KiB", 512 * 1024), (100, 100), ("2 GiB", 2**31)])
def test_sizes(text: object, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["", "5 parsecs", True, -1, "-5s", None, [1]])
def test_bad_durations_raise(bad: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(bad)
