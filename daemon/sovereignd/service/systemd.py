"""The systemd unit, rendered from the configuration, with the sandbox the daemon can live in.

Choices (systemd.service(5), systemd.exec(5), systemd.resource-control(5)):

- `Restart=on-failure` with `RestartPreventExitStatus=78`: a crash of the daemon is restarted;
  a bad configuration or unsafe host (exit 78) is not restarted in a loop. Model-server
  failures never reach systemd: the daemon stays up in FATAL and retries on its own schedule.
- `KillMode=control-group` and `TimeoutStopSec` = stop_grace + drain + a margin: the daemon
  stops the server's process group itself; systemd kills whatever is left in the cgroup only
  after that has had its time.
- `ProtectSystem=strict` makes the whole file system read-only but `ReadWritePaths=` (logs
  and state only), so the account cannot alter its program, venvs, model or baselines even
  where file modes would allow it. `ProtectHome=yes` hides /home, /root and /run/user; that is
  why the account's home (caches) is /var/lib/sovereignd. If the configuration points into a
  home folder anyway (a model under /home/...), the unit says `ProtectHome=read-only`, so the
  model stays readable and nothing there writable.
- `IPAddressDeny=any` + `IPAddressAllow=localhost`: the kernel (cgroup BPF) drops every packet
  to or from anything but loopback, so a compromised server has no route out.
- Not set: `MemoryDenyWriteExecute` (the CPU build's oneDNN and torch inductor generate code at
  run time), `SystemCallFilter` (vLLM's NUMA binding calls set_mempolicy/mbind, outside
  @system-service), `ProcSubset=pid` (psutil and vLLM read /proc/meminfo and /proc/cpuinfo),
  `PrivateNetwork` (the gateway must be reachable on loopback from the host).
"""

from __future__ import annotations

from pathlib import Path

from sovereignd.config import Config
from sovereignd.service.spec import ServiceSpec, read_paths, spec, stop_timeout, writable_paths

DEFAULT_USER = "sovereignd"
DEFAULT_HOME = Path("/var/lib/sovereignd")
HOME_ROOTS = (Path("/home"), Path("/root"), Path("/run/user"))


def service_spec(cfg: Config, program: Path | None = None, user: str | None = None,
                 group: str | None = None, home: Path | None = None) -> ServiceSpec:
    """Who runs the unit: the given values, else daemon.user or sovereignd with home
    /var/lib/sovereignd."""
    return spec(cfg, program=program, user=user, group=group, home=home,
                default_user=DEFAULT_USER, default_home=DEFAULT_HOME)


def _under_home(path: Path) -> bool:
    return any(path == root or root in path.parents for root in HOME_ROOTS)


def _quote(value: Path | str, command: bool = False) -> str:
    # systemd splits command lines and path lists on whitespace, expands %-specifiers, and
    # $VARIABLES in commands: escape and quote so a path is taken as written.
    text = str(value).replace("%", "%%")
    if command:
        text = text.replace("$", "$$")
    if any(c.isspace() or c in "\"'\\" for c in text):
        text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return text


def render(cfg: Config, s: ServiceSpec) -> str:
    """The unit file's text."""
    writable = writable_paths(cfg)
    if not any(s.home == w or w in s.home.parents for w in writable):
        writable.append(s.home)  # its caches (~/.cache of vLLM, torch, the tokenizers)
    in_home = [p for p in read_paths(cfg, s) + writable if _under_home(p)]
    protect_home = "read-only" if in_home else "yes"
    home_note = (f"# {', '.join(map(str, in_home))} lie(s) under a home folder: read-only, "
                 "not hidden.\n" if in_home else "")
    argv = " ".join(_quote(a, command=True) for a in s.argv(cfg))
    outer = [p for p in dict.fromkeys(writable) if not any(o in p.parents for o in writable)]
    rw = " ".join(_quote(p) for p in outer)
    return f"""\
# Rendered by `sovereignd systemd render --config {cfg.source}`.
# Install as /etc/systemd/system/sovereignd.service, then: systemctl daemon-reload &&
# systemctl enable --now sovereignd. Why each setting: daemon/sovereignd/systemd.py.
[Unit]
Description=sovereignd: a supervised local LLM server behind one authenticated door
After=network.target
StartLimitIntervalSec=300
StartLimitBurst=5

[Service]
Type=exec
User={s.user}
Group={s.group}
ExecStart={argv}
# SIGHUP leaves FATAL or re-checks a quarantine; it does not reload the configuration.
ExecReload=/bin/kill -HUP $MAINPID
Restart=on-failure
RestartSec=5s
RestartPreventExitStatus=78
KillMode=control-group
KillSignal=SIGTERM
TimeoutStopSec={stop_timeout(cfg)}s
# Descriptors: systemd's default soft limit (1024) falls to a flood of idle connections.
LimitNOFILE=65536
UMask=0027
WorkingDirectory={_quote(s.home)}
Environment={_quote(f"PATH={s.program.parent}:/usr/bin:/bin")}
Environment=LANG=C.UTF-8

# Sandbox: read-only system, no home folders, writable logs and state only, loopback only.
NoNewPrivileges=yes
ProtectSystem=strict
{home_note}ProtectHome={protect_home}
ReadWritePaths={rw}
PrivateTmp=yes
PrivateDevices=yes
IPAddressDeny=any
IPAddressAllow=localhost
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
CapabilityBoundingSet=
AmbientCapabilities=
LockPersonality=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
RestrictNamespaces=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
SystemCallArchitectures=native

[Install]
WantedBy=multi-user.target
"""
