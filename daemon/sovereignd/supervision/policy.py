"""The restart policy: failures in, a decision out (no I/O, no clock of its own).

supervisord's BACKOFF -> FATAL with exponential backoff: the first restart after a good run is
immediate; each further failure waits `backoff_initial`, doubling up to `backoff_max`;
`max_failures` failures within `window` seconds -> FATAL (a crash loop). A run counts as good
once it has been READY for `min_uptime`; a good run starts the failure streak over. A failure
known to be deterministic -> FATAL at once. FATAL tries again after `fatal_cooldown` (sooner on
SIGHUP or `sovereignd restart`, which `forget` the streak).

Deterministic by evidence: a server that exits before its health endpoint ever answered, twice
in a row within one streak, with the same decisive line (`failures.same_cause`), will not be
fixed by a third start.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from sovereignd.config import RestartSection
from sovereignd.process.failures import same_cause
from sovereignd.supervision.states import State


@dataclass(frozen=True)
class Decision:
    """What to do after a failure: BACKOFF for `delay` seconds, or FATAL."""

    state: State               # State.BACKOFF or State.FATAL
    delay: float               # seconds to wait before the next start (BACKOFF only)
    failures: int              # failures within the window, this one included
    crash_loop: bool = False   # FATAL because of the count, not of the failure itself


class RestartPolicy:
    """The failure streak of one supervised server and the decisions drawn from it.

    Times are seconds on the caller's monotonic clock, passed in as `now`."""

    def __init__(self, restart: RestartSection) -> None:
        self.restart = restart
        self._history: deque[float] = deque()
        self._early_exit: str | None = None  # decisive line of the last exit before /health
        self.fatal_until: float | None = None

    def delay(self, failures: int) -> float:
        """Wait before restart number `failures` in a row: 0, initial, 2x initial, ... max."""
        r = self.restart
        if failures <= 1:
            return 0.0
        return float(min(r.backoff_max, r.backoff_initial * 2 ** (failures - 2)))

    def in_window(self, now: float) -> int:
        """Failures within the last `window` seconds."""
        horizon = now - self.restart.window
        while self._history and self._history[0] < horizon:
            self._history.popleft()
        return len(self._history)

    def forget(self) -> None:
        """Start the streak over (an operator's restart, SIGHUP, the cool-down elapsed)."""
        self._history.clear()

    def repeats_early_exit(self, line: str | None) -> bool:
        """Record this failure's early-exit line (None: it did not exit before /health
        answered); True if it repeats the previous failure's within the current streak."""
        previous, self._early_exit = self._early_exit, line
        return (line is not None and previous is not None and bool(self._history)
                and same_cause(previous, line))

    def failed(self, now: float, ready_for: float, deterministic: bool) -> Decision:
        """Record a failure at `now` of a run that was READY for `ready_for` seconds (0 if it
        never was) and decide. FATAL sets `fatal_until` (`now` + `fatal_cooldown`)."""
        if ready_for >= self.restart.min_uptime:
            self._history.clear()  # a good run: the failure streak starts over
        self._history.append(now)
        count = self.in_window(now)
        if deterministic or count >= self.restart.max_failures:
            self.park_fatal(now)
            return Decision(State.FATAL, 0.0, count, crash_loop=not deterministic)
        return Decision(State.BACKOFF, self.delay(count), count)

    def park_fatal(self, now: float) -> None:
        """FATAL for another reason (a gate): retry after the cool-down."""
        self.fatal_until = now + self.restart.fatal_cooldown

    def cooldown_left(self, now: float) -> float | None:
        """Seconds until FATAL tries again by itself; None if no cool-down runs."""
        if self.fatal_until is None:
            return None
        return max(0.0, self.fatal_until - now)
