"""A guard's last verdict as a fact, and problems concluded into a verdict."""

from __future__ import annotations

from typing import Any

from sovereignd.audit.inputs import Inputs
from sovereignd.audit.model import FAIL, WARN, Control, short_ts


def last_check(c: Control, i: Inputs, guard: str, problems: list[tuple[str, str]],
                drifted: str) -> dict[str, Any] | None:
    """The guard's most recent verdict (verified, drift, or a baseline it could not read),
    as a fact; a drift or an unreadable baseline not verified since is a failure."""
    last = i.history.last(f"{guard}_verified", f"{guard}_drift", f"{guard}_baseline_unreadable")
    if last is None:
        return None
    kind = str(last["event"]).removeprefix(f"{guard}_")
    result = {"verified": "verified", "drift": "DRIFT",
              "baseline_unreadable": "baseline unreadable"}[kind]
    c.fact("last_check", "Last check", f"{result} at {last['ts']}",
           f"{result} at {short_ts(last['ts'])} ({last.get('scope') or 'start'})")
    if kind == "drift":
        problems.append((FAIL, f"{drifted} since {short_ts(last['ts'])} and were not "
                         "verified again"))
    elif kind == "baseline_unreadable":
        problems.append((FAIL, f"at {short_ts(last['ts'])} the daemon could not read the "
                         f"baseline ({last.get('error')}) and it was not verified since"))
    return last


def conclude(c: Control, problems: list[tuple[str, str]], ok: Any) -> Control:
    if not problems:
        c.finding = ok()
        return c
    fails = [p for v, p in problems if v == FAIL]
    c.verdict = FAIL if fails else WARN
    c.finding = "; ".join(fails or [p for _, p in problems])
    return c


