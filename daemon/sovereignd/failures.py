"""Why the server stopped: exit statuses and known output turned into operator sentences.

Deterministic start-up failures (not enough memory for the KV cache, an unsupported model,
a missing model directory, a port in use) will not be fixed by a restart: they send the
supervisor straight to FATAL with the mitigation. Patterns live in one table per backend
(see `backends`), fed in tests with messages captured from real servers.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class FailurePattern:
    """A line of server output that identifies a known failure."""

    kind: str
    regex: re.Pattern[str]
    message: str
    mitigation: str
    deterministic: bool = True


def pattern(kind: str, regex: str, message: str, mitigation: str,
            deterministic: bool = True) -> FailurePattern:
    return FailurePattern(kind, re.compile(regex), message, mitigation, deterministic)


@dataclass(frozen=True)
class Failure:
    """A classified failure of one server run."""

    kind: str
    message: str
    mitigation: str | None = None
    deterministic: bool = False
    returncode: int | None = None
    evidence: str | None = None
    details: dict[str, object] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"kind": self.kind, "message": self.message,
                                  "deterministic": self.deterministic}
        if self.mitigation:
            out["mitigation"] = self.mitigation
        if self.returncode is not None:
            out["returncode"] = self.returncode
            out["exit"] = describe_exit(self.returncode)
        if self.evidence:
            out["evidence"] = self.evidence
        out.update(self.details)
        return out

    def sentence(self) -> str:
        text = self.message
        if self.mitigation:
            text += f" — {self.mitigation}"
        return text


# Patterns every backend shares: Python/OS level failures seen whatever the server.
COMMON_PATTERNS: tuple[FailurePattern, ...] = (
    pattern("port-in-use",
            r"(\[Errno (98|48)\] [Aa]ddress already in use|address already in use)",
            "the server's port is already in use",
            "stop whatever listens on server.port (see `lsof -iTCP -sTCP:LISTEN`) or choose "
            "another server.port",
            # Another local account can take a free port at any moment and let it go again:
            # retried with backoff, not parked in FATAL until an operator acts.
            deterministic=False),
    pattern("model-unreadable", r"PermissionError: \[Errno 13\] Permission denied",
            "the server could not read a file it needs",
            "make the model directory and its files readable by the service account"),
    pattern("out-of-memory", r"(MemoryError|Cannot allocate memory|std::bad_alloc)",
            "the server ran out of memory",
            "lower --max-model-len or the memory fraction, or serve a smaller model",
            deterministic=False),
)


def describe_exit(returncode: int) -> str:
    """`exited with status 1`, `killed by SIGKILL (out of memory?)`, ..."""
    if returncode >= 0:
        return f"exited with status {returncode}"
    signum = -returncode
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    if signum == signal.SIGKILL:
        return f"killed by {name} (out of memory?)"
    return f"killed by {name}"


def match_output(lines: Iterable[str],
                 patterns: Sequence[FailurePattern]) -> tuple[FailurePattern, str] | None:
    """The first pattern, in table order, that matches any line; with the matching line.

    Table order matters: specific patterns (KV cache too small) come before generic ones
    (No such file), because a traceback often contains both.
    """
    text_lines = list(lines)
    for pat in patterns:
        for line in text_lines:
            if pat.regex.search(line):
                return pat, line.strip()[:500]
    return None


def classify_exit(returncode: int, lines: Sequence[str],
                  patterns: Sequence[FailurePattern], phase: str) -> Failure:
    """Classify a server exit from its status and its last lines of output."""
    how = describe_exit(returncode)
    found = match_output(lines, patterns)
    if found is not None:
        pat, line = found
        return Failure(kind=pat.kind, message=f"{pat.message} (server {how} while {phase})",
                       mitigation=pat.mitigation, deterministic=pat.deterministic,
                       returncode=returncode, evidence=line)
    if returncode == -signal.SIGKILL:
        return Failure(kind="killed", message=f"server {how} while {phase}",
                       mitigation="check the system log for the out-of-memory killer; lower "
                       "--max-model-len or the memory fraction if memory is short",
                       returncode=returncode)
    if returncode < 0:
        return Failure(kind="signal", message=f"server {how} while {phase}",
                       returncode=returncode)
    last = next((ln.strip() for ln in reversed(lines) if ln.strip()), None)
    return Failure(kind="exit", message=f"server {how} while {phase}", returncode=returncode,
                   evidence=last[:500] if last else None)
