"""The README's demo command, as a person would run it: it comes up READY and serves."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from tests.harness import http
from tests.helpers import REPO, wait_for

pytestmark = pytest.mark.timeout(900)


def test_demo_command_sets_up_serves_and_stops_cleanly(tmp_path: Path,
                                                       vllm_ready: object) -> None:
    # The demo listens on the README's fixed address: another demo there would answer for it.
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", 8000)) != 0, \
            "127.0.0.1:8000 is already in use (another demo running?): stop it first"
    demo = tmp_path / "demo"
    out = (tmp_path / "demo.out").open("wb")
    proc = subprocess.Popen([str(REPO / "ops" / "demo" / "run.sh"), "--dir", str(demo)],
                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def ready() -> bool:
            assert proc.poll() is None, (tmp_path / "demo.out").read_text()[-3000:]
            code, body, _ = http("GET", "http://127.0.0.1:8000/readyz", timeout=2)
            return code == 200 and json.loads(body)["state"] == "READY"

        wait_for(ready, 600, interval=1, what="the demo to be READY")
        key = (demo / "client.key").read_text().strip()
        code, body, _ = http("POST", "http://127.0.0.1:8000/v1/chat/completions",
                             {"model": "tiny", "max_tokens": 8,
                              "messages": [{"role": "user", "content": "hello"}]},
                             {"Authorization": f"Bearer {key}"}, timeout=60)
        assert code == 200, body
        assert (demo / "baseline" / "model.sha256").exists()
        text = (tmp_path / "demo.out").read_text()
        assert "http://127.0.0.1:8000/readyz" in text and "client.key" in text
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
        out.close()
    assert code == 0
    verify = subprocess.run([str(REPO / ".venv" / "bin" / "sovereignd"), "logs", "verify",
                             "--config", str(demo / "sovereignd.yaml"), "--key-file",
                             str(demo / "auditor.key")], capture_output=True, text=True,
                            check=False)
    assert verify.returncode == 0, verify.stdout + verify.stderr
