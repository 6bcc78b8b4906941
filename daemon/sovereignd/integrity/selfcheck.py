"""The daemon verifies itself: its own venv and interpreter against `daemon.software_manifest`.

"Which code served each request" includes the gateway's code. The daemon's files are verified
before the first server start and every `environment.interval`, like the server's software;
drift is reported (event `self_drift`, /status `self`, the audit) and the daemon keeps
serving: code that has been changed under a running daemon cannot be trusted to stop itself,
so the answer is an alert for the operator, not a decision of the changed code. A
software manifest that is unreadable or not approved by its `.sha256` companion blocks
server starts like any other unreadable baseline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sovereignd.config import Config
from sovereignd.errors import ManifestError
from sovereignd.integrity import software
from sovereignd.integrity.monitor import Guard
from sovereignd.logs.eventlog import EventLog
from sovereignd.supervision.supervisor import Blocked, Supervisor


class SelfGuard(Guard):
    """The daemon's own venv and interpreter against its software manifest."""

    name = "self"
    what = "the daemon's own software"

    def __init__(self, cfg: Config, supervisor: Supervisor, events: EventLog) -> None:
        super().__init__(cfg, supervisor, events)
        self.software: software.SoftwareManifest | None = None
        self.files = 0
        self.recompiled = 0

    @property
    def path(self) -> Path:
        assert self.cfg.daemon.software_manifest is not None
        return self.cfg.daemon.software_manifest

    @property
    def policy(self) -> str:
        return "alert"

    @property
    def interval(self) -> float:
        return self.cfg.environment.interval

    def _watch_enabled(self) -> bool:
        return False

    def watched(self) -> list[Path]:
        return []

    async def gate(self) -> Blocked | None:
        """As every guard's gate; drift found at start also marks the daemon degraded (the
        schedule's re-checks do so through the alert policy)."""
        blocked = await super().gate()
        if self.drift:
            self.supervisor.set_degraded(self.name, self.reason() + " — alert only")
        return blocked

    def baseline_files(self) -> list[Path]:
        return [self.path]

    def load(self) -> None:
        m = software.read_with_companion(self.path)
        own = software.own_venv().resolve()
        if m.venv != own:
            raise ManifestError(f"approves the venv {m.venv}, but the daemon runs from {own}; "
                                "run `sovereignd baseline` with this daemon",
                                source=str(self.path))
        self.software = m

    def verify(self, paths: list[str] | None, low_priority: bool) -> dict[str, dict[str, Any]]:
        assert self.software is not None
        report = software.verify(self.software, paths=paths,
                                 workers=self.cfg.integrity.hash_workers,
                                 low_priority=low_priority, stop=self._stop)
        if paths is None:
            self.files, self.recompiled = report.files_checked, len(report.recompiled)
        out: dict[str, dict[str, Any]] = {k: {} for k in self.drift}
        out.update(software.drift_entries(report))
        return out

    def verified_fields(self) -> dict[str, Any]:
        return {"files": self.files, "bytecode_recompiled": self.recompiled}

    def baseline_fields(self) -> dict[str, Any]:
        return software.status_fields(self.software)


def guards_for(cfg: Config, supervisor: Supervisor, events: EventLog) -> list[Guard]:
    """The self guard when `daemon.software_manifest` is set, its gate added; else a status
    entry saying the daemon does not verify itself."""
    if cfg.daemon.software_manifest is None:
        supervisor.checks["self"] = {"result": "disabled", "summary": "daemon.software_manifest "
                                     "is not set: the daemon does not verify its own software"}
        return []
    guard = SelfGuard(cfg, supervisor, events)
    supervisor.add_gate(guard.gate)
    return [guard]
