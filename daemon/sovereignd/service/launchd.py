"""The LaunchDaemon property list and its newsyslog entry, rendered from the configuration.

Choices, with launchd.plist(5) as the reference:

- `KeepAlive` is `{SuccessfulExit: false}`, not `true`: the daemon exits 0 only after a clean
  shutdown someone asked for (SIGTERM), and then it should stay down; any other exit is
  restarted. A bad configuration or an unsafe host exits 78 and is retried too (launchd has no
  RestartPreventExitStatus), but at most once per `ThrottleInterval`: 30 s instead of the
  default 10 s makes that a line every half minute in the stderr file rather than thrash, and
  the daemon comes back by itself once the operator has fixed the file. The daemon never exits
  because the model server failed: it keeps running in FATAL (readiness 503), so launchd's
  throttle never stands between a server failure and its recovery.
- `ExitTimeOut` is server.stop_grace + server.drain + a margin: launchd sends SIGKILL after it
  (default 20 s), which would cut the daemon's own orderly stop of the model server.
- `ProcessType` `Interactive`: other types let launchd throttle CPU and I/O of the job.
- `Umask` 23 (0o027): files the daemon creates are not readable by other accounts.
- `SoftResourceLimits`/`HardResourceLimits` `NumberOfFiles` 8192: launchd's default soft limit
  is 256 descriptors, which an idle-connection flood exhausts in a second; 8192 stays below
  the kernel's per-process maximum (kern.maxfilesperproc, 10240 or more), so the kernel-wide
  limits are not raised as a side effect. The daemon raises its soft limit to the hard one at
  start as well, and caps client connections below it. `NumberOfProcesses` is not set.
- No secrets: the environment holds HOME, PATH and LANG only; the daemon makes the server's key
  itself at each start.
"""

from __future__ import annotations

import plistlib
from pathlib import Path
from typing import Any

from sovereignd.config import Config
from sovereignd.service.spec import ServiceSpec, spec, stop_timeout

DEFAULT_LABEL = "org.sovereignd"
DEFAULT_USER = "_sovereignd"
# A real home outside /Users: vLLM, torch and mlx keep caches under ~/.cache, and Metal wants
# an account with a proper home and user context; /usr/local/var survives OS updates.
DEFAULT_HOME = Path("/usr/local/var/sovereignd")
THROTTLE_INTERVAL = 30
UMASK = 0o027
STDOUT_NAME = "launchd.out.log"
STDERR_NAME = "launchd.err.log"

_HEADER = (
    "<!-- Rendered by `sovereignd launchd render`; install as /Library/LaunchDaemons/{label}"
    ".plist (root:wheel 0644).\n"
    "     NumberOfFiles/NumberOfProcesses are deliberately absent: in a system daemon they"
    " raise kernel-wide limits. -->\n"
)


# Descriptors the daemon may open (see the module docstring).
NOFILE = 8192

def service_spec(cfg: Config, program: Path | None = None, user: str | None = None,
                 group: str | None = None, home: Path | None = None) -> ServiceSpec:
    """Who runs the LaunchDaemon: the given values, else daemon.user or _sovereignd and the
    macOS home for it."""
    return spec(cfg, program=program, user=user, group=group, home=home,
                default_user=DEFAULT_USER, default_home=DEFAULT_HOME)


def render(cfg: Config, s: ServiceSpec, label: str = DEFAULT_LABEL) -> dict[str, Any]:
    """The LaunchDaemon's keys, in the order a reader expects them."""
    return {
        "Label": label,
        "ProgramArguments": s.argv(cfg),
        "UserName": s.user,
        "GroupName": s.group,
        "RunAtLoad": True,
        "KeepAlive": {"SuccessfulExit": False},
        "ThrottleInterval": THROTTLE_INTERVAL,
        "ExitTimeOut": stop_timeout(cfg),
        "ProcessType": "Interactive",
        "SoftResourceLimits": {"NumberOfFiles": NOFILE},
        "HardResourceLimits": {"NumberOfFiles": NOFILE},
        "Umask": UMASK,
        "WorkingDirectory": str(s.home),
        "EnvironmentVariables": {
            "HOME": str(s.home),
            "PATH": f"{s.program.parent}:/usr/bin:/bin:/usr/sbin:/sbin",
            "LANG": "en_US.UTF-8",
        },
        "StandardOutPath": str(cfg.logs.dir / STDOUT_NAME),
        "StandardErrorPath": str(cfg.logs.dir / STDERR_NAME),
    }


def dumps(plist: dict[str, Any]) -> bytes:
    """XML property list bytes, with a comment saying where it goes and what is left out."""
    data = plistlib.dumps(plist, fmt=plistlib.FMT_XML, sort_keys=False)
    head, sep, rest = data.partition(b"<plist ")
    return head + _HEADER.format(label=plist["Label"]).encode() + sep + rest


def newsyslog_conf(cfg: Config, s: ServiceSpec) -> str:
    """/etc/newsyslog.d/sovereignd.conf for launchd's stdout and stderr files.

    launchd opens StandardOutPath/StandardErrorPath as the job's account when it spawns the
    job and hands the descriptors over; nothing can make the running daemon reopen them. So:
    owner:group is the service account (a root-owned new file could not be opened at the next
    start); `N` because there is no process to signal (without a pid file newsyslog would HUP
    syslogd, and signalling the daemon through a pidfile its account can write would let that
    account aim root's signal at any process); `B` keeps newsyslog's plain-text banner out of
    JSON lines; no `Z`/`J`: compressing the rotated file would unlink the inode the daemon is
    still writing. A rotation takes effect at the daemon's next start; until then it appends to
    the rotated file. These files carry start-up errors and a copy of the events; events.log,
    which the daemon rotates itself, is the record.
    """
    lines = ["# logfilename  [owner:group]  mode  count  size(KB)  when  flags",
             "# Rendered by `sovereignd launchd newsyslog`; see launchd.py for the choices."]
    for name in (STDOUT_NAME, STDERR_NAME):
        lines.append(f"{cfg.logs.dir / name}\t{s.user}:{s.group}\t640\t5\t10240\t*\tNB")
    return "\n".join(lines) + "\n"
