"""Failure classification fed with output captured from real servers (tests/data/)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sovereignd.backends import BACKENDS
from sovereignd.failures import classify_exit
from sovereignd.supervisor import CLASSIFY_LINES

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
                             or n.startswith("vllm-mlx-")}
    assert names <= known
