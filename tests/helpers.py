"""Shared helpers for the test suite: run the CLI as a real process, wait for conditions."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

REPO = Path(__file__).resolve().parent.parent
DAEMON_SRC = REPO / "daemon"

T = TypeVar("T")


def cli_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for running `python -m sovereignd` from this checkout."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(DAEMON_SRC) + (os.pathsep + env["PYTHONPATH"]
                                           if env.get("PYTHONPATH") else "")
    if extra:
        env.update(extra)
    return env


def cli_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "sovereignd", *args]


def run_cli(*args: str, timeout: float = 60, input: str | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `sovereignd ARGS` as a real process and capture its output."""
    return subprocess.run(cli_argv(*args), capture_output=True, text=True, timeout=timeout,
                          input=input, env=cli_env(env), check=False)


def wait_for(condition: Callable[[], T], timeout: float, interval: float = 0.05,
             what: str = "condition") -> T:
    """Poll `condition` until it returns a truthy value; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = condition()
        except Exception as exc:  # noqa: BLE001 - the condition may fail until it holds
            last_exc = exc
        else:
            if value:
                return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}"
                         + (f" (last error: {last_exc!r})" if last_exc else ""))
