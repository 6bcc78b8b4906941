"""Unit tests of the small parts the supervisor is built from."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from sovereignd import config
from sovereignd.backends.registry import BACKENDS
from sovereignd.backends.vllm import VllmBackend
from sovereignd.gateway.metrics import Metrics
from sovereignd.logs.eventlog import EventLog
from sovereignd.logs.files import RotatingFile, rotated_files
from sovereignd.logs.serveroutput import ServerOutput
from sovereignd.process.failures import classify_exit, describe_exit
from sovereignd.supervision.states import TRANSITIONS, State, TransitionError, check_transition
from sovereignd.supervision.supervisor import Supervisor


def test_rotating_file_rotates_by_size_and_keeps_a_bounded_number(tmp_path: Path) -> None:
    f = RotatingFile(tmp_path / "server.log", max_bytes=1000, keep=3)
    for i in range(200):
        f.write({"n": i, "pad": "x" * 40})
    f.close()
    files = rotated_files(tmp_path / "server.log")
    assert [p.name for p in files] == ["server.log.3", "server.log.2", "server.log.1",
                                       "server.log"]
    assert all(p.stat().st_size <= 1000 for p in files)
    numbers = [json.loads(line)["n"] for p in files for line in p.read_text().splitlines()]
    assert numbers == list(range(numbers[0], 200))  # oldest dropped, rest in order, no gaps
    assert (tmp_path / "server.log").stat().st_mode & 0o777 == 0o640


def test_server_output_redacts_secrets_and_content_lines(tmp_path: Path) -> None:
    out = ServerOutput(RotatingFile(tmp_path / "server.log", 10**6, 2), buffer_lines=3,
                       content_line=re.compile(r"last user message preview: "),
                       content_mode="redact")
    out.set_secrets("s3cr3t-key")
    out.line("stderr", 1, "INFO args: api_key='s3cr3t-key'")
    out.line("stdout", 1, "[REQUEST] last user message preview: my medical history")
    for i in range(5):
        out.line("stdout", 1, f"line {i}")
    out.close()
    text = (tmp_path / "server.log").read_text()
    assert "s3cr3t-key" not in text and "medical" not in text
    assert "api_key='[REDACTED]'" in text and "preview: [REDACTED]" in text
    assert out.tail() == ["line 2", "line 3", "line 4"]


def test_server_output_can_drop_content_lines(tmp_path: Path) -> None:
    out = ServerOutput(None, 10, re.compile("preview: "), "drop")
    out.line("stdout", 1, "preview: secret prompt")
    assert out.tail() == []


def test_every_state_can_shut_down_and_the_table_is_enforced() -> None:
    for state in State:
        if state is not State.STOPPING:
            assert State.STOPPING in TRANSITIONS[state] or state is State.STOPPED
    check_transition(State.READY, State.BACKOFF)
    with pytest.raises(TransitionError):
        check_transition(State.STOPPED, State.READY)
    with pytest.raises(TransitionError):
        check_transition(State.FATAL, State.READY)


def _supervisor(tmp_path: Path) -> Supervisor:
    model = tmp_path / "m"
    model.mkdir()
    cfg = config.loads(f"server: {{model: {model}}}\nlogs: {{dir: {tmp_path}}}\n"
                       "restart: {backoff_initial: 1s, backoff_max: 10s}\n".encode(),
                       tmp_path / "c.yaml")
    return Supervisor(cfg, VllmBackend(), EventLog(None, stream=None), Metrics(),
                      output=ServerOutput(None, 10))


def test_backoff_is_immediate_then_doubles_to_the_cap(tmp_path: Path) -> None:
    sup = _supervisor(tmp_path)
    assert [sup.backoff_delay(n) for n in range(1, 8)] == [0, 1, 2, 4, 8, 10, 10]


def test_describe_exit() -> None:
    assert describe_exit(0) == "exited with status 0"
    assert describe_exit(-9) == "killed by SIGKILL (out of memory?)"
    assert describe_exit(-11) == "killed by SIGSEGV"


def test_unknown_exit_keeps_the_last_line_as_evidence() -> None:
    f = classify_exit(3, ["starting", "RuntimeError: something odd"], VllmBackend.patterns,
                      "serving")
    assert f.kind == "exit" and not f.deterministic
    assert f.evidence == "RuntimeError: something odd"
    assert f.message == "server exited with status 3 while serving"


def test_every_backend_profile_is_complete() -> None:
    for name, backend in BACKENDS.items():
        assert backend.name == name
        assert backend.routes and backend.health_path.startswith("/")
        assert all(p.regex.pattern for p in backend.patterns)
