"""Drain for maintenance: `/readyz` answers 503 ("draining") so that a load balancer moves
traffic to other hosts, while requests in flight finish and new ones are still served for a
grace period; after it, new API requests are refused with 503 and Retry-After.

This is what HAProxy's own `set server ... state drain` and Kubernetes' readiness-gated
termination do: the health check fails first, the door closes only once the balancer had time
to notice (HAProxy: `inter` x `fall`, see ops/fleet/haproxy.cfg). The drain lasts until
`sovereignd resume` (or a restart of the daemon: it is runtime state, as HAProxy's is without
a server-state file). Both are operator events (`{"event": "operator", "action": "drain"}`),
so they appear in the audit's operator actions.

Daemon side: `Drain` (held by the gateway and proxy) and its control-socket actions `drain`,
`resume`, `drain-status`. CLI side: `wait_drained`, used by `sovereignd drain` and by
`sovereignd upgrade` before it switches the venv.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import Gauge

from sovereignd.config import Config
from sovereignd.errors import SovereigndError
from sovereignd.gateway import control
from sovereignd.gateway.metrics import Metrics
from sovereignd.logs.eventlog import Emit

DEFAULT_GRACE = 30.0
MAX_GRACE = 24 * 3600.0
MAX_REASON = 200


class Drain:
    """The host's drain state: off, draining (grace running: still serving) or refusing."""

    def __init__(self, emit: Emit, metrics: Metrics,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._emit = emit
        self._metrics = metrics
        self._clock = clock
        self._since: str | None = None  # wall time, for people and the audit
        self._deadline = 0.0            # monotonic end of the grace period
        self._grace = 0.0
        self._reason = ""
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
        """{"since": ISO time, "reason", "grace_s", "grace_left_s", "refusing": bool,
        "in_flight": requests being served}, or None when not draining."""
        if self._since is None:
            return None
        return {"since": self._since, "reason": self._reason, "grace_s": self._grace,
                "grace_left_s": round(self.grace_left(), 3), "refusing": self.refusing(),
                "in_flight": self._metrics.requests_in_flight}

    def start(self, grace: float, reason: str) -> dict[str, Any]:
        """Begin (or re-begin, with a new grace period) draining."""
        again = self._since is not None
        self._since = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
        self._grace, self._reason = grace, reason
        self._deadline = self._clock() + grace
        self._gauge.set(1)
        self._emit("operator", level="warning", action="drain", reason=reason, grace_s=grace,
                   in_flight=self._metrics.requests_in_flight, again=again)
        return {"ok": True, "message": f"draining: /readyz answers 503; requests are served "
                f"for {grace:g}s more", "drain": self.status()}

    def resume(self, reason: str) -> dict[str, Any]:
        if self._since is None:
            return {"ok": True, "message": "not draining; nothing to resume", "drain": None}
        was = self._since
        self._since = None
        self._gauge.set(0)
        self._emit("operator", action="resume", reason=reason, draining_since=was)
        return {"ok": True, "message": "resumed: /readyz follows the server's state again",
                "drain": None}

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
        return self.start(float(grace), _reason(body, "operator drain"))

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
