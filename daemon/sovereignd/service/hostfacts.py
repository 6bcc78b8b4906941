"""Facts about the host for the audit report: identity, service manager, egress blocking.

Everything here reads the machine the report is produced on, through one `HostProbe` (the
file-system root and a command runner), so tests can point it at a prepared folder and fake
commands. Nothing here changes the host; a fact that cannot be read is reported as unknown,
never guessed.
"""

from __future__ import annotations

import os
import platform
import plistlib
import re
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

# `run` returns this status when the program does not exist, as a shell would.
NOT_FOUND = 127
SERVICE_NAME = "sovereignd"
_UNIT_DIRS = ("etc/systemd/system", "run/systemd/system", "lib/systemd/system",
              "usr/lib/systemd/system")
_DENY_ALL = {"any", "0.0.0.0/0", "::/0"}


def run_command(argv: Sequence[str], timeout: float = 5.0) -> tuple[int, str]:
    """Run a read-only command; (status, stdout and stderr). 127 if it is not installed."""
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                              check=False, env={**os.environ, "LC_ALL": "C"})
    except FileNotFoundError:
        return NOT_FOUND, ""
    except (OSError, subprocess.TimeoutExpired) as exc:
        return 1, str(exc)
    return done.returncode, done.stdout + done.stderr


@dataclass(frozen=True)
class HostProbe:
    """Where host facts are read from: a file-system root, a command runner, the OS name."""

    root: Path = Path("/")
    run: Callable[[Sequence[str]], tuple[int, str]] = run_command
    system: str = field(default_factory=platform.system)

    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)


# ---------------------------------------------------------------------------------------------
# Identity


def _os_name(probe: HostProbe) -> str:
    if probe.system == "Darwin":
        version = platform.mac_ver()[0]
        return f"macOS {version}" if version else "macOS"
    try:
        text = probe.path("etc", "os-release").read_text()
    except OSError:
        return f"{probe.system} {platform.release()}"
    m = re.search(r'^PRETTY_NAME="?([^"\n]*)"?', text, re.MULTILINE)
    return m.group(1) if m else probe.system


def _cpu_model(probe: HostProbe) -> str | None:
    if probe.system == "Darwin":
        code, out = probe.run(["sysctl", "-n", "machdep.cpu.brand_string"])
        return (out.strip() or None) if code == 0 else None
    try:
        text = probe.path("proc", "cpuinfo").read_text()
    except OSError:
        return platform.processor() or None
    # x86 says "model name"; ARM boards say "Hardware" or only "CPU part".
    for key in ("model name", "Hardware", "Processor", "cpu model"):
        m = re.search(rf"^{key}\s*:\s*(.+)$", text, re.MULTILINE)
        if m:
            return m.group(1).strip()
    return platform.processor() or None


def identity(probe: HostProbe) -> dict[str, Any]:
    """Hostname, OS, kernel, CPU (chip) model and count, memory, Python of this machine."""
    try:
        memory: int | None = int(psutil.virtual_memory().total)
    except (OSError, RuntimeError):
        memory = None
    return {
        "hostname": socket.gethostname(),
        "os": _os_name(probe),
        "kernel": f"{platform.system()} {platform.release()}",
        "machine": platform.machine(),
        "cpu_model": _cpu_model(probe),
        "cpu_count": os.cpu_count(),
        "memory_bytes": memory,
        "python": sys.version.split()[0],
    }


# ---------------------------------------------------------------------------------------------
# Service manager


@dataclass
class Launch:
    """How the daemon is installed to be launched on this host, as far as it can be told."""

    manager: str                      # "systemd", "launchd" or "unknown"
    definition: Path | None = None    # the unit file or plist
    loaded: bool | None = None        # None: could not be asked
    state: str = "unknown"
    user: str | None = None           # User= / UserName of the definition
    settings: dict[str, list[str]] = field(default_factory=dict)
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"manager": self.manager,
                "definition": str(self.definition) if self.definition else None,
                "loaded": self.loaded, "state": self.state, "user": self.user,
                "detail": self.detail}


def _unit_settings(text: str) -> dict[str, list[str]]:
    """Key=value lines of a unit file (all sections); a key may repeat."""
    out: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")) or "=" not in line:
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def _systemd(probe: HostProbe, name: str) -> Launch | None:
    unit = f"{name}.service"
    for folder in _UNIT_DIRS:
        path = probe.path(folder, unit)
        if not path.is_file():
            continue
        try:
            text = path.read_text()
            dropins = sorted(path.with_name(unit + ".d").glob("*.conf"))
            text += "".join("\n" + p.read_text() for p in dropins)
        except OSError as exc:
            return Launch("systemd", path, detail=f"cannot read {path}: {exc.strerror or exc}")
        settings = _unit_settings(text)
        users = settings.get("User") or []
        launch = Launch("systemd", path, user=users[-1] if users else None, settings=settings)
        if not probe.path("run", "systemd", "system").is_dir():
            launch.detail = "systemd is not running here, so whether the unit is active " \
                            "cannot be asked"
            return launch
        code, out = probe.run(["systemctl", "is-active", unit])
        state = out.strip().splitlines()[0] if out.strip() else "unknown"
        launch.state = state
        launch.loaded = code == 0
        launch.detail = f"`systemctl is-active {unit}`: {state}"
        return launch
    return None


def _launchd(probe: HostProbe, name: str) -> Launch | None:
    folder = probe.path("Library", "LaunchDaemons")
    for path in sorted(folder.glob(f"*{name}*.plist")):
        try:
            with path.open("rb") as f:
                plist = plistlib.load(f)
        except (OSError, plistlib.InvalidFileException, ValueError) as exc:
            return Launch("launchd", path, detail=f"cannot read {path}: {exc}")
        label = str(plist.get("Label") or path.stem)
        launch = Launch("launchd", path, user=plist.get("UserName"),
                        settings={"Label": [label]})
        if probe.system != "Darwin":
            launch.detail = "launchd is not running here"
            return launch
        code, out = probe.run(["launchctl", "print", f"system/{label}"])
        launch.loaded = code == 0
        m = re.search(r"^\s*state = (\S+)", out, re.MULTILINE)
        launch.state = m.group(1) if m else ("loaded" if code == 0 else "not loaded")
        launch.detail = f"`launchctl print system/{label}`: {launch.state}"
        return launch
    return None


def launch_method(probe: HostProbe, name: str = SERVICE_NAME) -> Launch:
    """The systemd unit or launchd plist that launches the daemon, and whether it is loaded."""
    found = _launchd(probe, name) if probe.system == "Darwin" else _systemd(probe, name)
    if found is not None:
        return found
    where = ("/Library/LaunchDaemons" if probe.system == "Darwin"
             else ", ".join("/" + d for d in _UNIT_DIRS[:1] + _UNIT_DIRS[2:]))
    return Launch("unknown", detail=f"no {name} service definition found in {where}: how the "
                  "daemon is launched is unknown")


# ---------------------------------------------------------------------------------------------
# Egress blocking


@dataclass
class Egress:
    """Whether outbound network access of the service is blocked, and what shows it."""

    checked: list[str] = field(default_factory=list)     # sources that could be read
    blocking: list[str] = field(default_factory=list)    # rules that block, as found
    unreadable: list[str] = field(default_factory=list)  # sources present but not readable

    @property
    def blocked(self) -> bool:
        return bool(self.blocking)


def _matches_account(line: str, account: tuple[int | None, str | None]) -> bool:
    uid, name = account
    if uid is None and name is None:
        return True
    words = set(re.split(r"[\s\"{},]+", line))
    return (uid is not None and str(uid) in words) or (name is not None and name in words)


def _negated(rule: str) -> bool:
    """A rule about every account but one (nft `!=`, iptables `! --uid-owner`, pf `user !=`)."""
    return "!=" in rule or "! --uid-owner" in rule


def _firewall(probe: HostProbe, egress: Egress, argv: list[str], owner_word: str,
              account: tuple[int | None, str | None]) -> None:
    code, out = probe.run(argv)
    what = " ".join(argv)
    if code == NOT_FOUND:
        return
    if code != 0:
        egress.unreadable.append(f"`{what}` failed ({out.strip()[:120] or f'status {code}'})")
        return
    egress.checked.append(f"`{what}`")
    for line in out.splitlines():
        low = line.lower()
        # A negated owner (`skuid != x`, `! --uid-owner x`) keeps OTHER accounts off the
        # server's port (ops/linux/sovereignd.nft): that blocks nothing the account sends.
        if owner_word in low and ("drop" in low or "reject" in low) and not _negated(low) \
                and _matches_account(line, account):
            egress.blocking.append(f"{what}: {line.strip()}")


def egress(probe: HostProbe, launch: Launch, uid: int | None, user: str | None) -> Egress:
    """Look for egress blocking of the service account: unit settings, nft, iptables, pf."""
    found = Egress()
    account = (uid, user)
    if launch.manager == "systemd" and launch.definition is not None and launch.settings:
        found.checked.append(f"systemd unit {launch.definition}")
        deny = [v for values in launch.settings.get("IPAddressDeny", []) for v in values.split()]
        if _DENY_ALL & set(deny):
            allow = " ".join(launch.settings.get("IPAddressAllow", [])) or "nothing"
            found.blocking.append(f"{launch.definition}: IPAddressDeny={' '.join(deny)} "
                                  f"(IPAddressAllow={allow})")
    if probe.system == "Darwin":
        anchors = sorted(probe.path("etc", "pf.anchors").glob("*sovereignd*"))
        for anchor in anchors:
            try:
                rules = anchor.read_text()
            except OSError as exc:
                found.unreadable.append(f"{anchor}: {exc.strerror or exc}")
                continue
            found.checked.append(f"pf anchor {anchor}")
            blocks = [ln.strip() for ln in rules.splitlines()
                      if ln.strip().startswith("block") and "out" in ln
                      and not _negated(ln)]
            try:
                pf_conf = probe.path("etc", "pf.conf").read_text()
            except OSError:
                pf_conf = ""
            if not blocks:
                continue
            if f'anchor "{anchor.name}"' not in pf_conf:
                found.unreadable.append(f"{anchor} has block rules but /etc/pf.conf does not "
                                        "load it")
                continue
            # What pf has loaded now (root only); the files say what loads at boot.
            code, out = probe.run(["pfctl", "-a", anchor.name, "-s", "rules"])
            if code == 0 and "block" not in out:
                found.unreadable.append(f"pf has no rules loaded in anchor {anchor.name} "
                                        "(`pfctl -f /etc/pf.conf` was not run, or pf is off)")
                continue
            loaded = "loaded" if code == 0 else "loaded at boot by /etc/pf.conf"
            found.blocking.extend(f"{anchor} ({loaded}): {b}" for b in blocks)
    else:
        _firewall(probe, found, ["nft", "list", "ruleset"], "skuid", account)
        for prog in ("iptables", "ip6tables"):
            _firewall(probe, found, [prog, "-S", "OUTPUT"], "--uid-owner", account)
    return found
