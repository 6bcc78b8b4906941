"""Supervisor states and the one table of allowed transitions (no project imports here)."""

from __future__ import annotations

import enum


class State(enum.Enum):
    """Where the supervised model server is in its life."""

    STOPPED = "STOPPED"          # no server; the daemon is starting up or has shut it down
    STARTING = "STARTING"        # spawned, waiting for /health
    WARMING = "WARMING"          # /health answers, waiting for the first canary completion
    READY = "READY"              # canary answered; the gateway serves
    BACKOFF = "BACKOFF"          # the server failed; waiting before the next start
    FATAL = "FATAL"              # deterministic failure or crash loop; waits for cool-down/operator
    QUARANTINED = "QUARANTINED"  # weights or software drifted; waits for them to verify/re-baseline
    STOPPING = "STOPPING"        # the daemon is shutting down

    def __str__(self) -> str:
        return self.value


SERVING = frozenset({State.READY})
# States in which a server process may exist.
RUNNING = frozenset({State.STARTING, State.WARMING, State.READY, State.STOPPING})
# States that need a person, a cool-down, or files that verify again.
PARKED = frozenset({State.FATAL, State.QUARANTINED})

_ANY_LIVE = {State.STARTING, State.WARMING, State.READY, State.BACKOFF, State.FATAL,
             State.QUARANTINED}

TRANSITIONS: dict[State, frozenset[State]] = {
    State.STOPPED: frozenset({State.STARTING, State.FATAL, State.QUARANTINED, State.STOPPING}),
    State.STARTING: frozenset({State.WARMING, State.BACKOFF, State.FATAL, State.QUARANTINED,
                               State.STOPPING}),
    State.WARMING: frozenset({State.READY, State.BACKOFF, State.FATAL, State.QUARANTINED,
                              State.STOPPING}),
    State.READY: frozenset({State.BACKOFF, State.FATAL, State.QUARANTINED, State.STOPPING}),
    State.BACKOFF: frozenset({State.STARTING, State.FATAL, State.QUARANTINED, State.STOPPING}),
    State.FATAL: frozenset({State.STARTING, State.QUARANTINED, State.STOPPING}),
    State.QUARANTINED: frozenset({State.STARTING, State.FATAL, State.STOPPING}),
    State.STOPPING: frozenset({State.STOPPED}),
}

assert set(TRANSITIONS) == set(State)
assert all(State.STOPPING in TRANSITIONS[s] for s in _ANY_LIVE | {State.STOPPED})


class TransitionError(RuntimeError):
    """A transition the table does not allow: a bug in the supervisor, never an operator error."""


def check_transition(old: State, new: State) -> None:
    """Raise TransitionError unless the table allows old -> new."""
    if new not in TRANSITIONS[old]:
        raise TransitionError(f"transition {old} -> {new} is not allowed")
