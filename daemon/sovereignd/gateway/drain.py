"""Drain for maintenance: `/readyz` answers 503 ("draining") so that a load balancer moves
traffic to other hosts, while requests in flight finish and new ones are still served for a
grace period; after it, new API requests are refused with 503 and Retry-After.

This is what HAProxy's own `set server ... state drain` and Kubernetes' readiness-gated
termination do: the health check fails first, the door closes only once the balancer had time
to notice (HAProxy: `inter` x `fall`, see ops/fleet/haproxy.cfg). The drain lasts until
`sovereignd resume`, across restarts of the daemon (gateway.drainstate: a host the operator
took out must not come back READY). Both are operator events (`{"event": "operator",
"action": "drain"}`), so they appear in the audit's operator actions.

Daemon side: `Drain` (held by the gateway and proxy) and its control-socket actions `drain`,
`resume`, `drain-status`. CLI side: `wait_drained`, used by `sovereignd drain` and by
`sovereignd upgrade` before it switches the venv.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client import Gauge

from sovereignd.config import Config
from sovereignd.errors import SovereigndError
from sovereignd.gateway import control, drainstate
from sovereignd.gateway.metrics import Metrics
from sovereignd.logs.eventlog import Emit
from sovereignd.logs.files import utc_timestamp

DEFAULT_GRACE = 30.0
MAX_GRACE = 24 * 3600.0
MAX_REASON = 200


class Drain:
    """The host's drain state: off, draining (grace running: still serving) or refusing.

    With `state_file`, a drain is written there when it begins and removed at resume, and
    `restore()` takes it up again when the daemon starts."""

    def __init__(self, emit: Emit, metrics: Metrics, state_file: Path | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        self._emit = emit
        self._metrics = metrics
        self._state_file = state_file
        self._clock = clock
        self._wall = wall
        self._since: str | None = None  # wall time, for people and the audit
        self._deadline = 0.0            # monotonic end of the grace period
        self._grace = 0.0
        self._reason = ""
        self._by = "operator"
        self._restored: str | None = None  # wall time this daemon took up a saved drain
        self._gauge = Gauge("sovereignd_draining", "1 while the host is drained for "
                            "maintenance (/readyz 503 'draining')", registry=metrics.registry)

    @property
    def active(self) -> bool:
        return self._since is not None

    def refusing(self) -> bool:
        """True once the grace period is over: new API requests are refused."""
        return self._since is not None and self._clock() >= self._deadline

    def grace_left(self) -> float:
        return max(0.0, self._deadline - self._clock()) if self._since is not None else 0.0

    def status(self) -> dict[str, Any] | None:
        """{"since": ISO time, "reason", "by": "operator"|"upgrade", "grace_s",
        "grace_left_s", "refusing": bool, "in_flight": requests being served, "restored": ISO
        time this daemon took the drain up from its state file, or null}, or None when not
        draining."""
        if self._since is None:
            return None
        return {"since": self._since, "reason": self._reason, "by": self._by,
                "grace_s": self._grace, "grace_left_s": round(self.grace_left(), 3),
                "refusing": self.refusing(), "in_flight": self._metrics.requests_in_flight,
                "restored": self._restored}

    def start(self, grace: float, reason: str, by: str = "operator") -> dict[str, Any]:
        """Begin (or re-begin, with a new grace period) draining, and save it."""
        again = self._since is not None
        now = self._wall()
        self._set(utc_timestamp(now), reason, grace, grace, by)
        self._restored = None
        self._emit("operator", level="warning", action="drain", reason=reason, grace_s=grace,
                   in_flight=self._metrics.requests_in_flight, again=again, by=by)
        message = f"draining: /readyz answers 503; requests are served for {grace:g}s more"
        unsaved = self._persist(lambda path: drainstate.save(path, drainstate.Saved(
            since=self._since or "", reason=reason, grace_s=grace, grace_until=now + grace,
            by=by)))
        if unsaved:
            message += f"; WARNING: {unsaved}: a daemon restart would end this drain"
        return {"ok": True, "message": message, "drain": self.status()}

    def resume(self, reason: str) -> dict[str, Any]:
        if self._since is None and not self._file_exists():
            return {"ok": True, "message": "not draining; nothing to resume", "drain": None}
        was = self._since
        self._since = self._restored = None
        self._gauge.set(0)
        self._emit("operator", action="resume", reason=reason, draining_since=was)
        message = "resumed: /readyz follows the server's state again"
        unsaved = self._persist(drainstate.remove)
        if unsaved:
            message += f"; WARNING: {unsaved}: a daemon restart would drain the host again"
        return {"ok": True, "message": message, "drain": None}

    def restore(self) -> None:
        """At daemon start: take up a drain saved by an earlier run, with what is left of its
        grace period by the wall clock (none left: new requests are refused at once).

        A state file that cannot be read fails safe: the host starts drained and refusing, with
        an error event, until `sovereignd resume` -- in a load-balanced fleet a host the
        operator took out must not take traffic because its note of that was damaged; the
        other hosts carry the load meanwhile."""
        if self._state_file is None:
            return
        try:
            saved = drainstate.load(self._state_file)
        except drainstate.Unreadable as exc:
            self._set(utc_timestamp(self._wall()), "drain state unreadable", 0.0, 0.0, "operator")
            self._restored = self._since
            self._emit("drain.state_unreadable", level="error", path=str(self._state_file),
                       error=str(exc), mitigation="the host stays drained and refuses new "
                       "requests; check the file, then `sovereignd resume` (or `drain` again)")
            return
        if saved is None:
            return
        left = min(saved.grace_s, max(0.0, saved.grace_until - self._wall()))
        self._set(saved.since, saved.reason, saved.grace_s, left, saved.by)
        self._restored = utc_timestamp(self._wall())
        self._emit("drain.restored", level="warning", since=saved.since, reason=saved.reason,
                   by=saved.by, grace_s=saved.grace_s, grace_left_s=round(left, 3),
                   refusing=self.refusing(), path=str(self._state_file))

    def _set(self, since: str, reason: str, grace: float, left: float, by: str) -> None:
        self._since, self._reason, self._grace, self._by = since, reason, grace, by
        self._deadline = self._clock() + left
        self._gauge.set(1)

    def _persist(self, write: Callable[[Path], None]) -> str:
        """Apply `write` to the state file; "" or what went wrong (also an error event)."""
        if self._state_file is None:
            return ""
        try:
            write(self._state_file)
        except OSError as exc:
            problem = f"cannot write {self._state_file}: {exc.strerror or exc}"
            self._emit("drain.state_write_failed", level="error", path=str(self._state_file),
                       error=problem)
            return problem
        return ""

    def _file_exists(self) -> bool:
        return self._state_file is not None and self._state_file.exists()

    # --- control-socket actions -------------------------------------------------------------

    def actions(self) -> dict[str, control.Action]:
        """The control actions `drain`, `resume` and `drain-status`."""
        return {"drain": self._drain_action, "resume": self._resume_action,
                "drain-status": lambda _body: {"ok": True, "message": "", "drain": self.status(),
                                               "in_flight": self._metrics.requests_in_flight}}

    def _drain_action(self, body: dict[str, Any]) -> dict[str, Any]:
        grace = body.get("grace", DEFAULT_GRACE)
        if isinstance(grace, bool) or not isinstance(grace, int | float) \
                or not 0 <= grace <= MAX_GRACE:
            return {"ok": False, "error": f"grace must be 0 to {MAX_GRACE:g} seconds"}
        by = body.get("by", "operator")
        if not isinstance(by, str) or by not in drainstate.BY:
            return {"ok": False, "error": f"by must be one of {', '.join(sorted(drainstate.BY))}"}
        return self.start(float(grace), _reason(body, "operator drain"), by)

    def _resume_action(self, body: dict[str, Any]) -> dict[str, Any]:
        return self.resume(_reason(body, "operator resume"))


def _reason(body: dict[str, Any], default: str) -> str:
    return str(body.get("reason") or default)[:MAX_REASON]


# --- client side (the CLI and `upgrade`) -----------------------------------------------------


def drain_status(cfg: Config) -> dict[str, Any]:
    """The running daemon's drain state: the `drain-status` action's answer."""
    return control.call(cfg, "drain-status")


def wait_drained(cfg: Config, timeout: float, say: Callable[[str], None],
                 poll: float = 0.25) -> dict[str, Any]:
    """Wait until the grace period is over and no request is in flight; the last drain status.

    SovereigndError when the drain was lifted meanwhile or `timeout` seconds pass first (the
    host then still serves what is in flight: the caller decides whether to go on)."""
    deadline = time.monotonic() + timeout
    last_said = -1
    while True:
        answer = drain_status(cfg)
        state = answer.get("drain")
        if not isinstance(state, dict):
            raise SovereigndError("the drain was lifted (`sovereignd resume`) while waiting")
        in_flight = int(answer.get("in_flight") or 0)
        if state.get("refusing") and in_flight == 0:
            return state
        if time.monotonic() >= deadline:
            raise SovereigndError(f"still {in_flight} request(s) in flight after {timeout:g}s "
                                  "of draining")
        if in_flight != last_said:
            say(f"drain: {in_flight} request(s) in flight, grace left "
                f"{state.get('grace_left_s')}s")
            last_said = in_flight
        time.sleep(poll)  # polling another process; the deadline bounds it
