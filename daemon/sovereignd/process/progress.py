"""Is the model server making progress? `/health` does not say (vllm issue 39863: 200 while a
deadlocked engine serves nothing); bytes and the server's own token counters do.

Work is in flight when the gateway forwards requests or the canary waits for its answer.
Progress is any byte from the server to a forwarded request, a canary answer, or a change of
vLLM's own counters on its internal `/metrics` (`vllm:generation_tokens_total`,
`vllm:prompt_tokens_total`; vLLM docs "Production Metrics"). Work with no progress for
`health.stall_timeout` is a suspected stall (/readyz 503 at once, no new traffic); for
`health.stall_restart` more, a confirmed one (restart) — confirmed only where the counters can be
read, since a long answer that is not streamed sends no byte until it is complete.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

COUNTERS = ("vllm:generation_tokens", "vllm:prompt_tokens")  # family names (no _total)
RUNNING = "vllm:num_requests_running"


@dataclass(frozen=True)
class ServerCounters:
    """vLLM's progress counters (summed over label sets) and its running-request gauge."""

    tokens: float
    running: float


_TOTALS = frozenset(f"{name}_total" for name in COUNTERS)


def parse_counters(text: str) -> ServerCounters | None:
    """The counters from vLLM's Prometheus text, or None if it has none of them.

    Read by sample name, not by family: prometheus_client's parser files a `..._total` sample
    under its family only when the TYPE line names the family as vLLM writes it (`# TYPE
    vllm:generation_tokens_total counter`); under `# TYPE vllm:generation_tokens counter` it
    puts the sample in a family of its own and leaves the counter's family empty."""
    tokens, running, seen = 0.0, 0.0, False
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in _TOTALS:
                seen = True
                tokens += sample.value
            elif sample.name == RUNNING:
                running += sample.value
    return ServerCounters(tokens, running) if seen else None


class Verdict(enum.Enum):
    """What the watch concludes at one look."""

    IDLE = "idle"            # no work, and the last work ended with progress
    PROGRESS = "progress"    # work that moves
    SUSPECT = "suspect"      # work, no progress for stall_timeout
    CONFIRMED = "confirmed"  # still none for stall_restart more, and the counters prove it


class ProgressWatch:
    """Keeps the time of the last progress and judges a stall (times are monotonic seconds)."""

    def __init__(self, stall_timeout: float, stall_restart: float) -> None:
        self.stall_timeout = stall_timeout
        self.stall_restart = stall_restart
        self.last_progress = 0.0
        self.busy_since: float | None = None
        self._tokens: float | None = None
        self.counters_seen = False

    def progress(self, now: float) -> None:
        """Evidence of progress (a byte from the server, a canary answer)."""
        self.last_progress = max(self.last_progress, now)

    def counters(self, now: float, seen: ServerCounters | None) -> None:
        """A reading of the server's counters; a change is progress."""
        if seen is None:
            return
        self.counters_seen = True
        if self._tokens is not None and seen.tokens != self._tokens:
            self.progress(now)
        self._tokens = seen.tokens

    def look(self, now: float, busy: bool) -> Verdict:
        """Judge at `now`, given whether work is in flight. Work that ended without any
        progress (a canary that timed out) keeps counting: silence after it is no proof of
        health, only the next progress is."""
        if busy and self.busy_since is None:
            self.busy_since = now
        if self.busy_since is None:
            return Verdict.IDLE
        if not busy and self.last_progress >= self.busy_since:
            self.busy_since = None
            return Verdict.IDLE
        quiet = now - max(self.last_progress, self.busy_since)
        if quiet < self.stall_timeout:
            return Verdict.PROGRESS
        if quiet >= self.stall_timeout + self.stall_restart and self.counters_seen:
            return Verdict.CONFIRMED
        return Verdict.SUSPECT

    def progress_since(self, when: float) -> bool:
        return self.last_progress > when

    def quiet_for(self, now: float) -> float:
        """Seconds of work without progress (0 when idle)."""
        if self.busy_since is None:
            return 0.0
        return max(0.0, now - max(self.last_progress, self.busy_since))
