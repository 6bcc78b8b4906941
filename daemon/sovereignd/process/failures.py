"""Why the server stopped: exit statuses and known output turned into operator sentences.

Deterministic start-up failures (not enough memory for the KV cache, an unsupported model,
a missing model directory, a port in use, a flag the server's parser rejects) will not be fixed
by a restart: they send the supervisor straight to FATAL with the mitigation. Patterns live in
one table per backend (see `backends`), fed in tests with messages captured from real servers.

Every classified exit carries the server's own words: the decisive line (the one a pattern
matched, else the last line that explains an exit -- an argparse `error:` line, a traceback's
exception line) and the last few explanatory lines, cut to a readable length and with anything
that looks like a key redacted (`redact_text`).
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
    # Deterministic only before the server served (STARTING, WARMING): out of memory while
    # loading will happen again; out of memory under load may not.
    starting_only: bool = False

    def deterministic_in(self, phase: str) -> bool:
        """Whether this failure, seen in `phase`, will recur on a restart."""
        if self.starting_only:
            return phase in STARTING_PHASES
        return self.deterministic


# Phases (see supervisor) in which the server has not served yet.
STARTING_PHASES = frozenset({"starting", "warming up"})


def pattern(kind: str, regex: str, message: str, mitigation: str, *,
            deterministic: bool = True, starting_only: bool = False) -> FailurePattern:
    return FailurePattern(kind, re.compile(regex), message, mitigation, deterministic,
                          starting_only)


@dataclass(frozen=True)
class Failure:
    """A classified failure of one server run."""

    kind: str
    message: str
    mitigation: str | None = None
    deterministic: bool = False
    returncode: int | None = None
    evidence: str | None = None
    explanation: tuple[str, ...] = ()
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
        if self.explanation:
            out["explanation"] = list(self.explanation)
        out.update(self.details)
        return out

    def quoted(self) -> str:
        """The message with the server's decisive line quoted (BACKOFF reasons)."""
        if self.evidence:
            return f"{self.message}: server said \"{self.evidence}\""
        return self.message

    def sentence(self) -> str:
        """Message, decisive line, mitigation: the FATAL reason /readyz and /status show."""
        text = self.quoted()
        if self.mitigation:
            text += f" — {self.mitigation}"
        return text


# Patterns every backend shares: Python/OS level failures seen whatever the server.
# Python's argparse (vLLM's FlexibleArgumentParser and vllm-mlx's parser both derive from
# it) ends a usage error with `PROG: error: MESSAGE` and exit status 2 (CPython
# Lib/argparse.py `ArgumentParser.error`); the messages are argparse's own.
_ARGS_FIX = ("fix server.args (`sovereignd check` runs the server's own argument parser on "
             "them); removed flags are listed in the server's release notes")
COMMON_PATTERNS: tuple[FailurePattern, ...] = (
    pattern("unknown-argument", r"^\S+: error: unrecognized arguments: ",
            "the server does not know an argument in server.args", _ARGS_FIX),
    pattern("invalid-choice", r"^\S+: error: argument \S+: invalid choice: ",
            "an argument in server.args has a value the server does not accept", _ARGS_FIX),
    pattern("ambiguous-option", r"^\S+: error: ambiguous option: ",
            "an abbreviated flag in server.args matches several of the server's flags",
            "write the flag in full in server.args"),
    pattern("missing-value", r"^\S+: error: argument \S+: expected (one|\d+|at least one) "
            r"argument",
            "a flag in server.args is missing its value", _ARGS_FIX),
    pattern("bad-argument", r"^\S+: error: ",
            "the server rejected its arguments", _ARGS_FIX),
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
            starting_only=True),
)

# Metal (Apple GPU) out of memory: an abort of the command buffer (MLX, vllm-metal). While
# loading it will recur; while serving, a long prompt or many at once can cause it.
METAL_OOM = pattern(
    "metal-out-of-memory", r"(\[METAL\] Command buffer execution failed: Insufficient Memory|"
    r"kIOGPUCommandBufferCallbackErrorOutOfMemory)",
    "Metal ran out of memory",
    "lower --max-model-len / --max-kv-size or the memory fraction in server.args, or serve a "
    "smaller (more quantized) model", starting_only=True)

EVIDENCE_CHARS = 300   # the decisive line, as quoted in events, FATAL and /readyz reasons
EXPLANATION_LINES = 5  # explanatory lines an exit event carries

# vLLM's prefix of a process's log line: `(EngineCore pid=N) ERROR 11-22 02:18:22 [file:1] `.
_VLLM_PREFIX = (r"(?:\([\w-]+ pid=\d+\) )?"
                r"(?:(?:ERROR|CRITICAL) \d\d-\d\d \d\d:\d\d:\d\d \[[^\]]+\] )?")
# Lines that explain an exit: argparse's `PROG: error: ...`, a traceback's last line
# (`pkg.Error: ...` at column 0, also after vLLM's prefix), pydantic's `  Value error, ...`,
# uvicorn's `ERROR:    ...`.
_EXPLAINS = re.compile(
    "^" + _VLLM_PREFIX + r"(?:"
    r"\S+: error: .*"
    r"|(?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception|Exit|Interrupt|Failure)(?::.*)?"
    r"|\s+Value error, .*"
    r"|ERROR:\s+.*)$")
# Wrappers that name no cause of their own ("See root cause above").
_WRAPPERS = re.compile(r"(Engine core initialization failed|EngineDeadError|"
                       r"See (the )?(root cause|stack trace)|^\S*SystemExit)")

# Anything that looks like a key: a sovereignd client key, a `--api-key VALUE`, a bearer
# token, an `api_key` in a printed dict or assignment.
_SECRETS = (
    re.compile(r"sk-sov-[A-Za-z0-9_-]+"),
    re.compile(r"(--api[-_]key(?:=|\s+))(?!\[REDACTED\])\S+"),
    re.compile(r"([Bb]earer\s+)(?!\[REDACTED\])\S+"),
    re.compile(r"""(['"]?api[-_]key['"]?\s*[:=]\s*\[?\s*['"]?)(?!\[REDACTED\])[^'",\s\]}]+"""),
)


def redact_text(text: str) -> str:
    """`text` with anything that looks like a key replaced by `[REDACTED]`."""
    for rx in _SECRETS:
        text = rx.sub(lambda m: (m.group(1) if m.groups() else "") + "[REDACTED]", text)
    return text


def cut(text: str, limit: int = EVIDENCE_CHARS) -> str:
    """One line, stripped, redacted and cut to `limit` characters (an ellipsis marks a cut)."""
    text = redact_text(text.strip())
    return text if len(text) <= limit else text[: limit - 1] + "…"


_PREFIX = re.compile("^" + _VLLM_PREFIX)


def quote(line: str) -> str:
    """A server line as quoted in events and reasons: vLLM's log prefix off, cut, redacted."""
    return cut(_PREFIX.sub("", line.strip(), count=1))


def explanatory_lines(lines: Sequence[str], n: int = EXPLANATION_LINES) -> list[str]:
    """The last `n` lines of `lines` that explain an exit, in order, quoted."""
    found = [ln for ln in lines if _EXPLAINS.match(ln.rstrip())]
    return [quote(ln) for ln in found[-n:]]


# An HTTP access-log line (uvicorn's `INFO: 127.0.0.1:5 - "POST /v1/... HTTP/1.1" 200 OK`):
# what the server was doing, never why it ended.
_ACCESS_LOG = re.compile(r'"(?:GET|POST|PUT|PATCH|DELETE|HEAD|OPTIONS) \S+ HTTP/\d(?:\.\d)?"')


def decisive_line(lines: Sequence[str], *, last_resort: bool = True) -> str | None:
    """The line that best says why the server exited: the last explanatory line that is not
    a wrapper of an earlier cause, else the last explanatory line, else (with `last_resort`)
    the last non-empty line that is not an HTTP access-log line; quoted. None if nothing
    qualifies. A server killed by a signal said nothing about it: no last resort then."""
    found = [ln for ln in lines if _EXPLAINS.match(ln.rstrip())]
    causes = [ln for ln in found if not _WRAPPERS.search(ln)]
    rest = [ln for ln in lines if ln.strip() and not _ACCESS_LOG.search(ln)] \
        if last_resort else []
    for group in (causes, found, rest):
        if group:
            return quote(group[-1])
    return None


_VOLATILE = re.compile("^" + _VLLM_PREFIX + r"|0x[0-9a-fA-F]+|\d+")


def same_cause(a: str, b: str) -> bool:
    """Whether two decisive lines state the same cause (pids, ports, addresses and times may
    differ between runs)."""
    return _VOLATILE.sub("#", a) == _VOLATILE.sub("#", b)


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
        hits = [line for line in text_lines if pat.regex.search(line)]
        if hits:
            # The exception line, not the traceback's `raise ...` source line above it.
            stated = [line for line in hits if _EXPLAINS.match(line.rstrip())]
            return pat, quote((stated or hits)[0])
    return None


def classify_exit(returncode: int, lines: Sequence[str],
                  patterns: Sequence[FailurePattern], phase: str) -> Failure:
    """Classify a server exit from its status and its last lines of output."""
    how = describe_exit(returncode)
    explanation = tuple(explanatory_lines(lines))
    found = match_output(lines, patterns)
    if found is not None:
        pat, line = found
        return Failure(kind=pat.kind, message=f"{pat.message} (server {how} while {phase})",
                       mitigation=pat.mitigation, deterministic=pat.deterministic_in(phase),
                       returncode=returncode, evidence=line, explanation=explanation)
    evidence = decisive_line(lines, last_resort=returncode >= 0)
    if returncode == -signal.SIGKILL:
        return Failure(kind="killed", message=f"server {how} while {phase}",
                       mitigation="check the system log for the out-of-memory killer; lower "
                       "--max-model-len or the memory fraction if memory is short",
                       returncode=returncode, evidence=evidence, explanation=explanation)
    if returncode < 0:
        return Failure(kind="signal", message=f"server {how} while {phase}",
                       returncode=returncode, evidence=evidence, explanation=explanation)
    return Failure(kind="exit", message=f"server {how} while {phase}", returncode=returncode,
                   evidence=evidence, explanation=explanation)
