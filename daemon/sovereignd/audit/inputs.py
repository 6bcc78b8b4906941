"""What every audit control reads, gathered once: the configuration, the period, the event
log's history, the host probe, the auditor's keys, how the daemon is launched and the account
it ran as."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass

from sovereignd.audit.evidence import EventHistory, Period, account_of_uid, read_events
from sovereignd.config import Config
from sovereignd.errors import SovereigndError
from sovereignd.service import guardrails, hostfacts


@dataclass
class Inputs:
    """What every control reads, gathered once by `gather`."""

    cfg: Config
    period: Period
    history: EventHistory
    probe: hostfacts.HostProbe
    keys: list[bytes]
    launch: hostfacts.Launch
    account: guardrails.Account | None
    account_source: str
    uids: list[int]


def gather(cfg: Config, period: Period, probe: hostfacts.HostProbe,
           verification_keys: Iterable[bytes]) -> Inputs:
    """The inputs for `period`: events read up to its end (AuditError if the event log cannot
    be read), the service account from daemon.user or else the uid the daemon last ran as."""
    history = read_events(cfg.logs.dir, period.hi)
    uids = _daemon_uids(history, period)
    account, source = _service_account(cfg, uids)
    return Inputs(cfg, period, history, probe, list(verification_keys),
                  hostfacts.launch_method(probe), account, source, uids)


def _daemon_uids(history: EventHistory, period: Period) -> list[int]:
    """Accounts the daemon ran as in the period (the run in progress at its start counts)."""
    starts = [e for e in history.named("daemon_start") if isinstance(e.get("uid"), int)]
    inside = [e for e in starts if period.holds(e.get("ts"))]
    before = [e for e in starts if period.lo is not None and e["ts"] < period.lo]
    chosen = ([before[-1]] if before else []) + inside
    return sorted({int(e["uid"]) for e in chosen})


def _service_account(cfg: Config, uids: list[int]) -> tuple[guardrails.Account | None, str]:
    if cfg.daemon.user is not None:
        with contextlib.suppress(SovereigndError):  # no such account here: fall back to uids
            return guardrails.Account.named(cfg.daemon.user), "daemon.user"
    if uids:
        return account_of_uid(uids[-1]), "the uid in the daemon_start events"
    return None, "unknown"

