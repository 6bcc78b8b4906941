"""Exceptions that carry an operator sentence; only `cli` turns them into exit statuses."""

from __future__ import annotations

from dataclasses import dataclass


class SovereigndError(Exception):
    """An error whose message is written for the operator: what happened and what to do."""


class UsageError(SovereigndError):
    """A value on the command line cannot be used (a duration, a date, a HOST=FILE pair):
    exit status 2, as argparse gives for its own usage errors -- not 1, which says that a
    check or an audit control failed."""


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


class FileFormatError(SovereigndError):
    """A file the operator wrote or approved cannot be used; names the file and the line."""

    def __init__(self, message: str, *, source: str | None = None,
                 line: int | None = None) -> None:
        self.source = source
        self.line = line
        self.reason = message
        where = source or ""
        if line is not None:
            where = f"{where}, line {line}" if where else f"line {line}"
        super().__init__(f"{where}: {message}" if where else message)


class ManifestError(FileFormatError):
    """The weights manifest (or a `.sha256` companion) is unreadable, malformed or not pinned."""


class FrozenFileError(FileFormatError):
    """The frozen requirements file is unreadable, malformed, or does not match its `.sha256`."""


class WeightsError(SovereigndError):
    """A weight file is corrupt in a way its header shows (truncated, bad offsets, bad JSON)."""

    def __init__(self, path: str, reason: str, advice: str = "") -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}" + (f"; {advice}" if advice else ""))


class CheckFailed(SovereigndError):
    """A verification (manifest, environment, logs) did not pass; the message says which."""


class UnsafeHost(SovereigndError):
    """The host is set up so that the daemon must not start (running as root, files its own
    account could change); a configuration error of the host, so exit status 78 like a bad
    configuration file."""
