"""The LaunchDaemon plist, its newsyslog entry and the systemd unit, checked by structure:
launchd.plist(5)'s types, newsyslog.conf(5)'s fields, and `systemd-analyze verify`."""

from __future__ import annotations

import plistlib
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from sovereignd import config
from sovereignd.service import launchd, spec, systemd
from tests.helpers import REPO, run_cli
from tests.service_examples import LINUX, MACOS, render_examples

# launchd.plist(5), XML PROPERTY LIST KEYS: each key the daemon's plist may use, with its type.
Check = Callable[[object], bool]


def _strings(v: object) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


def _str_dict(v: object) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) and isinstance(x, str)
                                       for k, x in v.items())


def _int_dict(v: object) -> bool:
    return isinstance(v, dict) and all(isinstance(x, int) and not isinstance(x, bool)
                                       for x in v.values())


def _int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


KEEPALIVE_KEYS: dict[str, Check] = {  # "KeepAlive <boolean or dictionary of stuff>"
    "SuccessfulExit": lambda v: isinstance(v, bool), "NetworkState": lambda v: isinstance(v, bool),
    "Crashed": lambda v: isinstance(v, bool), "AfterInitialDemand": lambda v: isinstance(v, bool),
    "PathState": lambda v: isinstance(v, dict), "OtherJobEnabled": lambda v: isinstance(v, dict),
}


def _keepalive(v: object) -> bool:
    if isinstance(v, bool):
        return True
    return isinstance(v, dict) and all(k in KEEPALIVE_KEYS and KEEPALIVE_KEYS[k](x)
                                       for k, x in v.items())


LAUNCHD_TYPES: dict[str, Check] = {
    "Label": lambda v: isinstance(v, str), "Disabled": lambda v: isinstance(v, bool),
    "UserName": lambda v: isinstance(v, str), "GroupName": lambda v: isinstance(v, str),
    "InitGroups": lambda v: isinstance(v, bool), "Program": lambda v: isinstance(v, str),
    "ProgramArguments": _strings, "EnableGlobbing": lambda v: isinstance(v, bool),
    "EnableTransactions": lambda v: isinstance(v, bool), "KeepAlive": _keepalive,
    "RunAtLoad": lambda v: isinstance(v, bool), "RootDirectory": lambda v: isinstance(v, str),
    "WorkingDirectory": lambda v: isinstance(v, str), "EnvironmentVariables": _str_dict,
    "Umask": _int, "TimeOut": _int, "ExitTimeOut": _int, "ThrottleInterval": _int,
    "StartInterval": _int, "StandardInPath": lambda v: isinstance(v, str),
    "StandardOutPath": lambda v: isinstance(v, str),
    "StandardErrorPath": lambda v: isinstance(v, str), "Debug": lambda v: isinstance(v, bool),
    "SoftResourceLimits": _int_dict, "HardResourceLimits": _int_dict, "Nice": _int,
    "ProcessType": lambda v: v in ("Background", "Standard", "Adaptive", "Interactive"),
    "AbandonProcessGroup": lambda v: isinstance(v, bool),
    "LowPriorityIO": lambda v: isinstance(v, bool),
    "LaunchOnlyOnce": lambda v: isinstance(v, bool),
}


@pytest.fixture
def cfg(tmp_path: Path) -> config.Config:
    (tmp_path / "model").mkdir()
    path = tmp_path / "etc" / "sovereignd.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump({
        "daemon": {"user": "_sovereignd", "state_dir": str(tmp_path / "home" / "state")},
        "server": {"model": str(tmp_path / "model"), "drain": "25s", "stop_grace": "40s",
                   "env": {"HF_TOKEN": "hf_not_a_real_secret_0123456789"}},
        "logs": {"dir": str(tmp_path / "logs")}}))
    return config.load(path)


def render_plist(cfg: config.Config, home: Path) -> tuple[bytes, dict[str, Any]]:
    spec = launchd.service_spec(cfg, Path("/usr/local/sovereignd/venv/bin/sovereignd"),
                                home=home)
    data = launchd.dumps(launchd.render(cfg, spec))
    return data, plistlib.loads(data)


def test_plist_parses_and_every_key_has_the_type_launchd_requires(cfg: config.Config,
                                                                  tmp_path: Path) -> None:
    data, plist = render_plist(cfg, tmp_path / "home")
    bad = {k: v for k, v in plist.items() if k not in LAUNCHD_TYPES or not LAUNCHD_TYPES[k](v)}
    assert bad == {}
    assert plist["ProgramArguments"] == ["/usr/local/sovereignd/venv/bin/sovereignd", "run",
                                         "--config", str(cfg.source)]
    assert (plist["UserName"], plist["GroupName"]) == ("_sovereignd", "_sovereignd")
    assert plist["RunAtLoad"] is True and plist["KeepAlive"] == {"SuccessfulExit": False}
    assert plist["ProcessType"] == "Interactive"
    assert plist["Umask"] == 23  # 0o027 in decimal: plists have no octal
    assert plist["ThrottleInterval"] >= 10  # not below launchd's default
    assert plist["StandardErrorPath"] == str(cfg.logs.dir / "launchd.err.log")
    assert plist["EnvironmentVariables"]["HOME"] == plist["WorkingDirectory"]
    assert data.startswith(b"<?xml") and b"NumberOfFiles" in data  # only in the comment


def test_exit_timeout_outlasts_the_daemons_own_stop(cfg: config.Config, tmp_path: Path) -> None:
    _, plist = render_plist(cfg, tmp_path / "home")
    assert plist["ExitTimeOut"] > cfg.server.stop_grace + cfg.server.drain
    assert plist["ExitTimeOut"] == spec.stop_timeout(cfg) == 40 + 25 + 15


def test_no_secret_and_no_kernel_wide_limits_in_the_plist(cfg: config.Config,
                                                          tmp_path: Path) -> None:
    data, plist = render_plist(cfg, tmp_path / "home")
    assert b"hf_not_a_real_secret" not in data and b"HF_TOKEN" not in data
    assert set(plist["EnvironmentVariables"]) == {"HOME", "PATH", "LANG"}
    assert not re.search(rb"(?i)<key>[^<]*(key|token|secret|password)[^<]*</key>", data)
    # Descriptors: above launchd's default soft limit (256), below the kernel's per-process
    # maximum (10240), so that the kernel-wide limits are never raised as a side effect.
    for key in ("SoftResourceLimits", "HardResourceLimits"):
        assert plist[key] == {"NumberOfFiles": 8192}


# --- newsyslog.conf(5) --------------------------------------------------------------------


@dataclass(frozen=True)
class NewsyslogEntry:
    """One line of newsyslog.conf(5): logfilename [owner:group] mode count size when flags
    [path_to_pid_file] [signal_number]."""

    path: str
    owner: str | None
    group: str | None
    mode: int
    count: int
    size_kb: int | None
    when: str | None
    flags: str
    pid_file: str | None
    signal: int | None


def parse_newsyslog(text: str) -> list[NewsyslogEntry]:
    entries = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = line.split()
        path = fields.pop(0)
        assert path.startswith("/"), f"logfilename must be absolute: {path}"
        owner = group = None
        if fields and re.fullmatch(r"[\w.-]*[:.][\w.-]*", fields[0]) and not fields[0].isdigit():
            owner, _, group = fields.pop(0).replace(".", ":", 1).partition(":")
        assert re.fullmatch(r"[0-7]{3,4}", fields[0]), f"mode must be octal: {fields[0]}"
        mode = int(fields.pop(0), 8)
        count = int(fields.pop(0))
        size_text = fields.pop(0)
        size_kb = None if size_text == "*" else int(size_text)
        when_text = fields.pop(0)
        assert when_text == "*" or re.fullmatch(r"(\d+|@[\dT]+|\$[\dDWM]+)", when_text)
        when = None if when_text == "*" else when_text
        flags = ""
        if fields and not fields[0].startswith("/"):
            flags = fields.pop(0)
            assert re.fullmatch(r"[-BCDGJNUWXZRTYE]+", flags, re.IGNORECASE), flags
        pid_file = fields.pop(0) if fields and fields[0].startswith("/") else None
        sig = int(fields.pop(0)) if fields else None
        assert not fields, f"unexpected fields {fields}"
        entries.append(NewsyslogEntry(path, owner, group, mode, count, size_kb, when, flags,
                                      pid_file, sig))
    return entries


def test_newsyslog_entry_parses_and_keeps_the_daemon_writing(cfg: config.Config,
                                                             tmp_path: Path) -> None:
    spec = launchd.service_spec(cfg, Path("/usr/local/sovereignd/venv/bin/sovereignd"))
    entries = parse_newsyslog(launchd.newsyslog_conf(cfg, spec))
    _, plist = render_plist(cfg, tmp_path / "home")
    assert {e.path for e in entries} == {plist["StandardOutPath"], plist["StandardErrorPath"]}
    for e in entries:
        assert (e.owner, e.group) == ("_sovereignd", "_sovereignd")  # new file stays openable
        assert e.mode == 0o640 and e.count >= 1 and e.size_kb
        assert "N" in e.flags and "B" in e.flags          # nothing to signal; no banner
        assert not set("ZJXY") & set(e.flags.upper())     # no compression of an open file
        assert e.pid_file is None and e.signal is None


def test_newsyslog_parser_reads_the_formats_of_the_man_page() -> None:
    [a, b] = parse_newsyslog("/var/log/a.log  root:wheel 644 7 * @T00 J\n"
                             "/var/log/b.log 640 5 100 * Z /var/run/b.pid 30\n")
    assert (a.owner, a.group, a.when, a.flags) == ("root", "wheel", "@T00", "J")
    assert (b.owner, b.mode, b.size_kb, b.pid_file, b.signal) == (None, 0o640, 100,
                                                                  "/var/run/b.pid", 30)


# --- systemd ------------------------------------------------------------------------------


def directives(unit: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in unit.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def verify(unit_text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is missing: install systemd (apt-get install systemd)")
    path = tmp_path / "units" / "sovereignd.service"
    path.parent.mkdir(exist_ok=True)
    path.write_text(unit_text)
    return subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True,
                          text=True, check=False, timeout=60)


@pytest.fixture
def program(tmp_path: Path) -> Path:
    """A real executable for ExecStart= (verify checks that it exists)."""
    prog = tmp_path / "venv" / "bin" / "sovereignd"
    prog.parent.mkdir(parents=True)
    prog.write_text("#!/bin/sh\nexit 0\n")
    prog.chmod(0o755)
    return prog


def test_systemd_analyze_verify_accepts_the_rendered_unit(tmp_path: Path, program: Path) -> None:
    res = run_cli("systemd", "render", "--config", str(linux_config_file(tmp_path)), "--program",
                  str(program))
    assert res.returncode == 0, res.stderr
    checked = verify(res.stdout, tmp_path)
    assert checked.returncode == 0 and checked.stdout + checked.stderr == "", checked.stderr
    # The check has teeth: a value systemd cannot parse is reported.
    broken = verify(res.stdout.replace("ProtectHome=yes", "ProtectHome=maybe"), tmp_path)
    assert "protect home value" in broken.stderr and "maybe" in broken.stderr


@pytest.mark.parametrize("kind", ["systemd", "launchd"])
def test_a_relative_program_is_refused_with_what_to_give(tmp_path: Path, kind: str) -> None:
    out = tmp_path / "unit"
    res = run_cli(kind, "render", "--config", str(linux_config_file(tmp_path)), "--program",
                  "venv/bin/sovereignd", "--output", str(out))
    assert res.returncode == 1 and res.stdout == ""
    assert "--program must be an absolute path" in res.stderr
    assert "venv/bin/sovereignd" in res.stderr and "Traceback" not in res.stderr
    assert not out.exists()


def linux_config_file(tmp_path: Path) -> Path:
    """The Linux installer's configuration with its defaults, as a file."""
    path = tmp_path / "etc" / "sovereignd.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(LINUX.config_text())
    return path


def test_unit_runs_as_the_account_in_a_sandbox_with_matching_stop_timeout(
        tmp_path: Path, program: Path) -> None:
    cfg = LINUX.load()
    unit = systemd.render(cfg, systemd.service_spec(cfg, program))
    d = directives(unit)
    assert d["User"] == d["Group"] == ["sovereignd"]
    assert d["ExecStart"] == [f"{program} run --config /etc/sovereignd/sovereignd.yaml"]
    assert d["Restart"] == ["on-failure"] and d["RestartPreventExitStatus"] == ["78"]
    assert d["KillMode"] == ["control-group"]
    assert d["TimeoutStopSec"] == [f"{spec.stop_timeout(cfg)}s"]
    assert spec.stop_timeout(cfg) > cfg.server.stop_grace + cfg.server.drain
    assert d["ReadWritePaths"] == ["/var/log/sovereignd /var/lib/sovereignd"]
    for key, value in (("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"),
                       ("ProtectHome", "yes"), ("PrivateTmp", "yes"), ("IPAddressDeny", "any"),
                       ("IPAddressAllow", "localhost"), ("CapabilityBoundingSet", ""),
                       ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6"),
                       ("LockPersonality", "yes"), ("Type", "exec"), ("UMask", "0027")):
        assert d[key] == [value], key
    assert "MemoryDenyWriteExecute" not in d  # oneDNN and inductor generate code at run time


def test_a_model_under_home_makes_home_read_only_instead_of_hidden(tmp_path: Path,
                                                                   program: Path) -> None:
    text = LINUX.config_text().replace("/srv/models/my-model", "/home/alice/models/my model")
    cfg = config.loads(text.encode(), Path("/etc/sovereignd/sovereignd.yaml"))
    unit = systemd.render(cfg, systemd.service_spec(cfg, program))
    assert directives(unit)["ProtectHome"] == ["read-only"]
    checked = verify(unit, tmp_path)
    assert checked.returncode == 0 and checked.stderr == ""


def test_special_characters_in_paths_are_escaped_for_systemd(tmp_path: Path) -> None:
    prog = tmp_path / "my venv%1" / "sovereignd"
    prog.parent.mkdir()
    prog.write_text("#!/bin/sh\n")
    prog.chmod(0o755)
    cfg = LINUX.load()
    unit = systemd.render(cfg, systemd.service_spec(cfg, prog))
    assert f'ExecStart="{tmp_path}/my venv%%1/sovereignd" run' in unit
    checked = verify(unit, tmp_path)
    assert checked.returncode == 0 and checked.stderr == "", checked.stderr


def test_checked_in_examples_are_what_the_renderers_produce() -> None:
    """launchd/org.sovereignd.plist, launchd/newsyslog.d/sovereignd.conf and
    ops/linux/sovereignd.service, the firewall rules ops/linux/sovereignd.nft and
    ops/macos/pf.anchors/org.sovereignd (regenerate: python -m tests.service_examples)."""
    for path, data in render_examples().items():
        assert path.read_bytes() == data, f"{path} is out of date"
    plist = plistlib.loads((REPO / "launchd" / "org.sovereignd.plist").read_bytes())
    assert plist["ProgramArguments"][0] == str(MACOS.program)
    assert plist["StandardOutPath"].startswith(str(MACOS.logs))


def test_the_pf_boot_job_parses_and_enables_pf_with_the_anchor_config() -> None:
    plist = plistlib.loads((REPO / "ops" / "macos" / "org.sovereignd.pf.plist").read_bytes())
    assert {k: v for k, v in plist.items()
            if k not in LAUNCHD_TYPES or not LAUNCHD_TYPES[k](v)} == {}
    assert plist["ProgramArguments"] == ["/sbin/pfctl", "-E", "-f", "/etc/pf.conf"]
    assert plist["RunAtLoad"] is True
