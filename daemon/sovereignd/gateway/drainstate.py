"""The drain's state file, so that a drain survives a daemon restart (a crash, launchd or
systemd restarting the daemon, `sovereignd upgrade`): a host the operator took out of the load
balancer must not come back READY and take traffic.

`<state_dir>/drain.json`, one JSON object written whole (temp file + os.replace, mode 0600)
when a drain begins and removed at `sovereignd resume`. HAProxy keeps its own servers' drain
state across reloads the same way (HAProxy configuration manual: `server-state-file`, global
section 3.1, and `load-server-state-from-file`, proxies section 4).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import orjson

from sovereignd.errors import SovereigndError
from sovereignd.fsutil import atomic_write

FILE_NAME = "drain.json"
VERSION = 1
BY = frozenset({"operator", "upgrade"})


class Unreadable(SovereigndError):
    """The state file exists but cannot be read or is not a drain state written by us."""


@dataclass(frozen=True)
class Saved:
    """A drain as written to the state file."""

    since: str          # ISO 8601 wall time the drain began (for people and the audit)
    reason: str
    grace_s: float      # the grace period asked for, seconds
    grace_until: float  # Unix time the grace period ends (wall clock: it crosses restarts)
    by: str             # "operator" (`sovereignd drain`) or "upgrade" (`sovereignd upgrade`)


def state_path(state_dir: Path) -> Path:
    return state_dir / FILE_NAME


def save(path: Path, saved: Saved) -> None:
    """Write the drain state whole (mode 0600). OSError when it cannot be written."""
    atomic_write(path, orjson.dumps({"version": VERSION, **asdict(saved)}), mode=0o600)


def remove(path: Path) -> None:
    """Forget the drain. OSError when the file exists and cannot be removed."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def load(path: Path) -> Saved | None:
    """The saved drain, or None when there is none (no file).

    Unreadable (with the reason, never the file's content) when the file cannot be read or
    does not hold a drain state of this version: the caller decides how to fail safe."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise Unreadable(f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise Unreadable(f"{path} is not JSON ({len(data)} bytes)") from exc
    if not isinstance(doc, dict) or doc.get("version") != VERSION:
        raise Unreadable(f"{path} is not a drain state of version {VERSION}")
    try:
        saved = Saved(since=doc["since"], reason=doc["reason"], grace_s=doc["grace_s"],
                      grace_until=doc["grace_until"], by=doc["by"])
    except KeyError as exc:
        raise Unreadable(f"{path} lacks the field {exc.args[0]!r}") from exc
    problems = [name for name, ok in (
        ("since", isinstance(saved.since, str)),
        ("reason", isinstance(saved.reason, str)),
        ("grace_s", _seconds(saved.grace_s)),
        ("grace_until", _seconds(saved.grace_until)),
        ("by", isinstance(saved.by, str) and saved.by in BY)) if not ok]
    if problems:
        raise Unreadable(f"{path} has invalid field(s): {', '.join(problems)}")
    return saved


def _seconds(value: object) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value) and value >= 0)
