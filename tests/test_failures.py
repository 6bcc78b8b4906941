"""Failure classification fed with output captured from real servers (tests/data/)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sovereignd.backends.registry import BACKENDS
from sovereignd.process.failures import EVIDENCE_CHARS, classify_exit, redact_text, same_cause
from sovereignd.supervision.supervisor import CLASSIFY_LINES

DATA = Path(__file__).parent / "data" / "server_messages"

# file -> (backend, exit status seen, kind expected)
CAPTURED = {
    "vllm-cpu-model-dir-missing.txt": ("vllm", 1, "model-missing"),
    "vllm-cpu-model-repo-id-offline.txt": ("vllm", 1, "model-missing"),
    "vllm-cpu-model-dir-empty.txt": ("vllm", 1, "model-missing"),
    "vllm-cpu-port-in-use.txt": ("vllm", 1, "port-in-use"),
    "vllm-cpu-cpu-memory-utilization-too-high.txt": ("vllm", 1, "memory-utilization"),
    "vllm-cpu-kvcache-space-too-large.txt": ("vllm", 1, "memory-utilization"),
    "vllm-cpu-max-model-len-over-model-limit.txt": ("vllm", 1, "model-max-len"),
    "vllm-cpu-kv-cache-too-small-for-max-model-len.txt": ("vllm", 1, "kv-cache-memory"),
    "vllm-cpu-unsupported-architecture.txt": ("vllm", 1, "unsupported-architecture"),
    "vllm-cpu-safetensors-truncated.txt": ("vllm", 1, "model-corrupt"),
    # The engine dies on the first request and the API server then exits with status 0.
    "vllm-cpu-head-dim-16-crash-on-first-request.txt": ("vllm", 0, "unsupported-attention"),
    # Flags and parsers (issue 13): argparse usage errors exit 2, vLLM's own checks exit 1.
    "vllm-cpu-unrecognized-argument.txt": ("vllm", 2, "unknown-argument"),
    "vllm-cpu-invalid-choice.txt": ("vllm", 2, "invalid-choice"),
    "vllm-cpu-ambiguous-option.txt": ("vllm", 2, "ambiguous-option"),
    "vllm-cpu-expected-one-argument.txt": ("vllm", 2, "missing-value"),
    "vllm-cpu-unknown-tool-call-parser.txt": ("vllm", 1, "unknown-tool-parser"),
    "vllm-cpu-unknown-reasoning-parser.txt": ("vllm", 1, "unknown-reasoning-parser"),
    "vllm-cpu-auto-tool-choice-without-parser.txt": ("vllm", 1, "tool-choice-without-parser"),
    "vllm-cpu-tokenizer-files-missing.txt": ("vllm", 1, "tokenizer-missing"),
}

# The line each of these must quote (the server's own words, verbatim).
DECISIVE = {
    "vllm-cpu-unrecognized-argument.txt":
        "api_server.py: error: unrecognized arguments: --enable-reasoning",
    "vllm-cpu-expected-one-argument.txt":
        "api_server.py: error: argument --max-num-seqs: expected one argument",
    "vllm-cpu-auto-tool-choice-without-parser.txt":
        "TypeError: Error: --enable-auto-tool-choice requires --tool-call-parser",
}

# Messages quoted in DESIGN.md and the notes from vllm-metal (not reproducible here).
METAL = {
    "ValueError: Paged attention: not enough Metal memory for KV cache. metal_limit=51.54GB, "
    "fraction=0.75, usable_metal=38.65GB, model_memory=21.64GB, overhead=1.08GB, "
    "kv_budget=-0.54GB": "kv-cache-memory",
    "ValueError: To serve at least one request with the models's max seq len (131072), (27.5 "
    "GiB KV cache is needed, which is larger than the available KV cache memory": "kv-cache-memory",
    "ValueError: Unsupported model architecture: Gemma3nForConditionalGeneration":
        "unsupported-architecture",
}


def tail(name: str) -> list[str]:
    return (DATA / name).read_text().splitlines()[-CLASSIFY_LINES:]


@pytest.mark.parametrize("name", sorted(CAPTURED))
def test_real_startup_failures_are_classified_deterministic(name: str) -> None:
    backend, code, kind = CAPTURED[name]
    failure = classify_exit(code, tail(name), BACKENDS[backend].patterns, "starting")
    assert failure.kind == kind, failure
    # A taken port is not: another account may hold it for a moment (retried with backoff).
    assert failure.deterministic == (kind != "port-in-use") and failure.mitigation
    assert failure.evidence  # the line that proved it, for the event log


@pytest.mark.parametrize(("line", "kind"), list(METAL.items()))
def test_metal_messages_are_classified(line: str, kind: str) -> None:
    failure = classify_exit(1, ["Traceback (most recent call last):", line],
                            BACKENDS["vllm"].patterns, "starting")
    assert failure.kind == kind and failure.deterministic


@pytest.mark.parametrize("name", ["vllm-cpu-sigterm-idle.txt",
                                  "vllm-cpu-sigterm-in-flight-abort.txt",
                                  "vllm-cpu-sigterm-drain-shutdown-timeout-10.txt"])
def test_ordinary_shutdown_output_is_not_a_deterministic_failure(name: str) -> None:
    """A clean vLLM shutdown still prints an EngineDeadError traceback: not a FATAL cause."""
    failure = classify_exit(0, tail(name), BACKENDS["vllm"].patterns, "serving")
    assert not failure.deterministic, failure


def test_every_captured_file_is_in_a_table() -> None:
    names = {p.name for p in DATA.glob("*.txt")}
    known = set(CAPTURED) | {n for n in names if "sigterm" in n or "served-as-root" in n
                             or n.startswith("vllm-mlx-")} | SERVED
    assert names <= known


# Captures of servers that started and served (used by test_core_units / test_startup).
SERVED = {"vllm-cpu-log-requests-outputs-debug.txt", "vllm-cpu-no-chat-template.txt"}


@pytest.mark.parametrize("name", sorted(DECISIVE))
def test_the_failure_quotes_the_servers_decisive_line(name: str) -> None:
    """The exit carries the server's own words: the decisive line and the explanation."""
    backend, code, _kind = CAPTURED[name]
    failure = classify_exit(code, tail(name), BACKENDS[backend].patterns, "starting")
    assert failure.evidence == DECISIVE[name]
    assert failure.explanation[-1] == DECISIVE[name]
    assert f'"{DECISIVE[name]}"' in failure.sentence()


@pytest.mark.parametrize("name", sorted(CAPTURED))
def test_unknown_messages_still_yield_a_decisive_line(name: str) -> None:
    """Without any pattern the decisive line is the server's last explanatory line, never a
    wrapper like "Engine core initialization failed. See root cause above"."""
    _backend, code, _kind = CAPTURED[name]
    failure = classify_exit(code, tail(name), (), "starting")
    assert failure.kind == "exit" and not failure.deterministic
    assert failure.evidence and "See root cause above" not in failure.evidence
    assert len(failure.evidence) <= EVIDENCE_CHARS
    assert failure.explanation and all(len(x) <= EVIDENCE_CHARS for x in failure.explanation)


def test_a_tokenizers_library_too_old_for_the_file_is_named() -> None:
    """tokenizers older than the file's format fails with these lines (public reports, not
    reproducible here: allenai/open-instruct issue 738 with tokenizers 0.19.1,
    huggingface/tokenizers issue 1529 under vLLM); the daemon names a tokenizer problem."""
    for line in ("Exception: data did not match any variant of untagged enum ModelWrapper at "
                 "line 1251012 column 3",
                 "Exception: data did not match any variant of untagged enum "
                 "PyPreTokenizerTypeWrapper at line 12564 column 3",
                 "Exception: data did not match any variant of untagged enum "
                 "PyNormalizerTypeWrapper at line 49 column 3"):
        failure = classify_exit(1, ["Traceback (most recent call last):", line],
                                BACKENDS["vllm"].patterns, "starting")
        assert failure.kind == "tokenizer-missing" and failure.deterministic
        assert "tokenizers" in (failure.mitigation or "")


METAL_OOM_LINES = [
    "libc++abi: terminating due to uncaught exception of type std::runtime_error: [METAL] "
    "Command buffer execution failed: Insufficient Memory "
    "(00000008:kIOGPUCommandBufferCallbackErrorOutOfMemory)",
    "[METAL] Command buffer execution failed: Insufficient Memory",
]


@pytest.mark.parametrize("backend", ["vllm", "vllm-mlx"])
@pytest.mark.parametrize("line", METAL_OOM_LINES)
def test_metal_out_of_memory_is_fatal_only_while_starting(backend: str, line: str) -> None:
    """Out of memory while loading will recur; while serving, a restart with backoff."""
    patterns = BACKENDS[backend].patterns
    for phase, fatal in (("starting", True), ("warming up", True), ("serving", False)):
        failure = classify_exit(-6, [line], patterns, phase)
        assert failure.kind == "metal-out-of-memory", failure
        assert failure.deterministic is fatal, phase


def test_python_out_of_memory_is_fatal_only_while_starting() -> None:
    patterns = BACKENDS["vllm"].patterns
    assert classify_exit(1, ["MemoryError"], patterns, "starting").deterministic
    assert not classify_exit(1, ["MemoryError"], patterns, "serving").deterministic


def test_an_engine_dying_while_serving_is_not_deterministic() -> None:
    """The head-dim crash's last words without its root cause: an engine died mid-run."""
    lines = [ln for ln in tail("vllm-cpu-head-dim-16-crash-on-first-request.txt")
             if "Unsupported CPU attention" not in ln]
    failure = classify_exit(0, lines, BACKENDS["vllm"].patterns, "serving")
    assert not failure.deterministic and failure.evidence


def test_secrets_in_server_lines_are_redacted() -> None:
    """Anything that looks like a key never reaches an event, a reason or server.log."""
    lines = [
        "ValueError: bad --api-key sk-sov-AbCdEf0123456789_-xyz given",
        "(APIServer pid=1) INFO non-default args: {'api_key': ['hunter2hunter2'], 'port': 1}",
        "RuntimeError: header Authorization: Bearer abc.def.ghi refused",
        "SystemExit: --api_key=topsecret9",
    ]
    failure = classify_exit(1, lines, (), "starting")
    text = " ".join([failure.sentence(), *failure.explanation, str(failure.as_dict())])
    for secret in ("AbCdEf0123456789", "hunter2hunter2", "abc.def.ghi", "topsecret9"):
        assert secret not in redact_text(" ".join(lines))
        assert secret not in text
    assert "[REDACTED]" in text


def test_long_lines_are_cut() -> None:
    failure = classify_exit(1, ["ValueError: " + "x" * 5000], (), "starting")
    assert failure.evidence is not None and len(failure.evidence) == EVIDENCE_CHARS
    assert failure.evidence.endswith("…")


def test_same_cause_ignores_pids_ports_and_addresses() -> None:
    a = "(APIServer pid=7142) ValueError: port 18013 at 0x7f3a busy"
    b = "(APIServer pid=9001) ValueError: port 18014 at 0x7f99 busy"
    assert same_cause(a, b)
    assert not same_cause(a, "(APIServer pid=1) KeyError: port 1 at 0x1 busy")


def test_a_killed_server_is_not_quoted_saying_what_it_was_doing() -> None:
    """kill -9 while serving: the last access-log or INFO line is not the server's word on
    its end, so no evidence is quoted; an exit with a status still quotes its last line, but
    never an access-log line."""
    lines = ["INFO 11-29 21:40:01 [loggers.py:123] Engine 000: Avg prompt throughput: 1.0",
             'INFO:     127.0.0.1:50312 - "POST /v1/chat/completions HTTP/1.1" 200 OK']
    patterns = BACKENDS["vllm"].patterns
    killed = classify_exit(-9, lines, patterns, "serving")
    assert killed.kind == "killed" and killed.evidence is None
    assert "server said" not in killed.sentence()
    exited = classify_exit(3, [*lines, "shutting down: bye"], patterns, "serving")
    assert exited.evidence == "shutting down: bye"
    only_access = classify_exit(3, lines[1:], patterns, "serving")
    assert only_access.evidence is None
