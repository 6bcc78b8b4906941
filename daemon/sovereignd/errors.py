"""Exceptions that carry an operator sentence; only `cli` turns them into exit statuses."""

from __future__ import annotations

from dataclasses import dataclass


class SovereigndError(Exception):
    """An error whose message is written for the operator: what happened and what to do."""


@dataclass(frozen=True)
class ConfigProblem:
    """One problem in a configuration file, located by its dotted key path."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ConfigError(SovereigndError):
    """The configuration is invalid; carries every problem found, not just the first."""

    def __init__(self, source: str, problems: list[ConfigProblem]) -> None:
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} configuration problem(s):\n{lines}")


class CheckFailed(SovereigndError):
    """A verification (manifest, environment, logs) did not pass; the message says which."""


class UnsafeHost(SovereigndError):
    """The host is set up so that the daemon must not start (running as root, files its own
    account could change); a configuration error of the host, so exit status 78 like a bad
    configuration file."""
