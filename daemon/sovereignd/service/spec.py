"""What a service manager (launchd, systemd) must know about the daemon, from its configuration:
how long a stop may take, which account and program run it, which folders it writes."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

from sovereignd.config import Config
from sovereignd.errors import SovereigndError

# After stop_grace the server's group gets SIGKILL and up to server.KILL_WAIT (5 s) to vanish;
# then the gateway and control socket close and the last events are written. 15 s covers that
# with room, so the manager's own SIGKILL never cuts a stop the daemon is still doing right.
STOP_MARGIN = 15.0


def stop_timeout(cfg: Config) -> int:
    """Seconds launchd (ExitTimeOut) and systemd (TimeoutStopSec) wait after SIGTERM before
    they SIGKILL the daemon: server.stop_grace + server.drain + STOP_MARGIN, rounded up; with
    several models (stopped together) the longest of theirs."""
    servers = [m.server for m in cfg.models.values()] or [cfg.server]
    return math.ceil(max(s.stop_grace + s.drain for s in servers) + STOP_MARGIN)


def default_program() -> Path:
    """The `sovereignd` console script of the venv this command runs from."""
    return Path(sys.prefix) / "bin" / "sovereignd"


@dataclass(frozen=True)
class ServiceSpec:
    """Who runs the daemon and from where; defaults follow the platform's conventions."""

    program: Path
    user: str
    group: str
    home: Path

    def argv(self, cfg: Config) -> list[str]:
        """The command the service manager starts: `sovereignd run --config PATH`."""
        return [str(self.program), "run", "--config", str(cfg.source)]


def spec(cfg: Config, *, program: Path | None, user: str | None, group: str | None,
         home: Path | None, default_user: str, default_home: Path) -> ServiceSpec:
    """Fill what the operator did not give: the account from daemon.user, else the platform's
    default name; the group of the same name; the account's home."""
    prog = program or default_program()
    if not prog.is_absolute():
        raise SovereigndError(f"--program must be an absolute path (the service manager starts "
                              f"it from /), got {prog}: give the daemon venv's bin/sovereignd "
                              "in full")
    name = user or cfg.daemon.user or default_user
    return ServiceSpec(prog, name, group or name, home or default_home)


def writable_paths(cfg: Config) -> list[Path]:
    """Folders the daemon and its server write: logs, state (pidfile, socket), a Unix socket's
    folder. Nothing else needs to be writable."""
    paths = [cfg.logs.dir, cfg.state_dir]
    if cfg.server.uds is not None:
        paths.append(cfg.server.uds.parent)
    return list(dict.fromkeys(paths))


def read_paths(cfg: Config, spec_: ServiceSpec) -> list[Path]:
    """What the daemon and server only read: program, configuration, model, venv, baselines."""
    paths = [spec_.program, cfg.source, cfg.server.model, cfg.gateway.keys_file]
    for optional in (cfg.server.venv, cfg.integrity.manifest, cfg.environment.frozen):
        if optional is not None:
            paths.append(optional)
    return paths
