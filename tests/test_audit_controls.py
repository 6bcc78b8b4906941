"""Audit controls judged on a prepared site: a clean period passes, each finding turns a verdict.

The site holds what a daemon run as an unprivileged account leaves behind: configuration,
manifest and frozen requirements owned by root, a sealed request log, and the event log; the
host (service unit, firewall) is a prepared folder and fake commands.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from sovereignd import cli
from sovereignd import config as config_mod
from sovereignd.audit import evidence, report
from sovereignd.gateway import keys as keys_mod
from sovereignd.integrity import manifest, software
from sovereignd.logs import sealing
from sovereignd.logs.files import utc_timestamp
from sovereignd.service import hostfacts
from tests.reqlog_support import T0, Clock, Events, write

try:
    NOBODY = pwd.getpwnam("nobody")
except KeyError:  # pragma: no cover - every Debian and macOS has it
    NOBODY = None

pytestmark = pytest.mark.skipif(NOBODY is None, reason="needs the `nobody` account")


def ts(offset: float) -> str:
    return utc_timestamp(T0 + offset)


class Site:
    """A logs folder, baselines and configuration as an unprivileged daemon would leave them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.model = root / "model"
        self.model.mkdir(parents=True)
        (self.model / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
        (self.model / "model.safetensors").write_bytes(b"\0" * 4096)
        self.manifest = self.model / "CHECKSUMS.sha256"
        self.manifest.write_text("".join(
            f"{hashlib.sha256(p.read_bytes()).hexdigest()}  ./{p.name}\n"
            for p in sorted(self.model.iterdir()) if p != self.manifest))
        self.software = root / "requirements-frozen.software.sha256"
        self.software.write_text(
            f"# sovereignd software manifest of the venv {root / 'venv'}\n"
            '# python: {"build": "3.11.7 (main)", "executable": "/usr/bin/python3.11", '
            '"implementation": "cpython", "libraries": [], "stdlib": ["/usr/lib/python3.11"], '
            '"version": "3.11.7"}\n' + "ab" * 32 + "  /usr/bin/python3.11\n")
        link = software.link_line(self.software, manifest.file_sha256(self.software)).decode()
        self.own = root / "daemon-software.sha256"
        shutil.copy(self.software, self.own)
        (root / "daemon-software.sha256.sha256").write_text(
            f"{manifest.file_sha256(self.own)}  {self.own.name}\n")
        self.frozen = root / "requirements-frozen.txt"
        self.frozen.write_text(link + "# uv pip freeze\naiohttp==3.9.5\nnumpy==1.26.4\n"
                               "vllm==0.8.0\n")
        digest = hashlib.sha256(self.frozen.read_bytes()).hexdigest()
        (root / "requirements-frozen.txt.sha256").write_text(
            f"{digest}  requirements-frozen.txt\n")
        self.logs = root / "logs"
        self.logs.mkdir(mode=0o750)
        self.logs.chmod(0o750)
        self.keys_file = root / "keys.json"
        keys_mod.add_key(self.keys_file, "alice", clock=lambda: T0 - 60)
        self.key, _ = sealing.init_key(self.logs)
        (root / "auditor.key").write_text(self.key.hex() + "\n")
        self.events: list[dict[str, Any]] = []
        self.overrides: dict[str, Any] = {}

    def write_requests(self, count: int = 6) -> None:
        from sovereignd.logs.requestlog import RequestLog

        log = RequestLog(self.logs, self.logs, clock=Clock(T0 + 5), emit=Events(),
                         compress=False)
        log.open()
        write(log, 0, count)
        log.close()

    def event(self, offset: float, name: str, level: str = "info", **fields: Any) -> None:
        self.events.append({"ts": ts(offset), "level": level, "event": name, **fields})

    def clean_run(self) -> None:
        """A daemon run as `nobody` that verified everything and stopped cleanly."""
        assert NOBODY is not None
        self.event(0, "daemon_start", version="0.1.0", pid=100, uid=NOBODY.pw_uid,
                   config_sha256=self.config().digest)
        self.event(0.5, "integrity_verified", scope="full", files=2, bytes=4136, seconds=0.01,
                   manifest=str(self.manifest),
                   manifest_sha256=hashlib.sha256(self.manifest.read_bytes()).hexdigest())
        self.event(0.6, "environment_verified", packages=3, record_files=1200,
                   record_bytes=2**30, seconds=4.2, frozen=str(self.frozen),
                   frozen_sha256=hashlib.sha256(self.frozen.read_bytes()).hexdigest())
        self.event(0.65, "self_verified", scope="full", files=1)
        self.event(1, "state", **{"from": "STOPPED", "to": "STARTING",
                                  "reason": "daemon started"})
        self.event(1.1, "spawn", pid=200, argv=["vllm", "serve"], start=1,
                   env=["HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                        "VLLM_API_KEY"])
        self.event(3, "state", **{"from": "STARTING", "to": "WARMING", "reason": "health"})
        self.event(4, "state", **{"from": "WARMING", "to": "READY", "reason": "canary"})

    def stop(self, offset: float) -> None:
        self.event(offset, "state", **{"from": "READY", "to": "STOPPING", "reason": "SIGTERM"})
        self.event(offset + 0.1, "state", **{"from": "STOPPING", "to": "STOPPED",
                                             "reason": "shutdown complete"})
        self.event(offset + 0.2, "daemon_stop", pid=100, state="STOPPED")

    def config_path(self) -> Path:
        assert NOBODY is not None
        cfg: dict[str, Any] = {
            "daemon": {"user": NOBODY.pw_name, "software_manifest": str(self.own)},
            "server": {"model": str(self.model), "command": ["vllm", "serve"]},
            "gateway": {"listen": "127.0.0.1:8000", "keys_file": str(self.keys_file)},
            "integrity": {"manifest": str(self.manifest)},
            "environment": {"frozen": str(self.frozen)},
            "logs": {"dir": str(self.logs)},
        }
        for section, values in self.overrides.items():
            cfg.setdefault(section, {}).update(values)
        path = self.root / "sovereignd.yaml"
        path.write_text(yaml.safe_dump(cfg))
        path.chmod(0o644)
        return path

    def config(self) -> config_mod.Config:
        return config_mod.load(self.config_path())

    def finish(self) -> None:
        with (self.logs / "events.log").open("w") as f:
            for e in self.events:
                f.write(json.dumps(e) + "\n")

    def report(self, probe: hostfacts.HostProbe, **kw: Any) -> report.AuditReport:
        self.finish()
        return report.build_report(self.config(), T0 - 3600, T0 + 3600,
                                  verification_keys=[self.key], probe=probe, **kw)


class FakeHost:
    """A host folder with a systemd unit, and fake read-only commands."""

    def __init__(self, root: Path, unit: str | None = None, running: bool = True,
                 commands: dict[str, tuple[int, str]] | None = None) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        if unit is not None:
            path = root / "etc/systemd/system/sovereignd.service"
            path.parent.mkdir(parents=True)
            path.write_text(unit)
        if running:
            (root / "run/systemd/system").mkdir(parents=True)
        self.commands = commands or {}
        self.calls: list[list[str]] = []

    def run(self, argv: Sequence[str]) -> tuple[int, str]:
        self.calls.append(list(argv))
        return self.commands.get(argv[0], (hostfacts.NOT_FOUND, ""))

    def probe(self) -> hostfacts.HostProbe:
        return hostfacts.HostProbe(root=self.root, run=self.run, system="Linux")


UNIT = """[Unit]
Description=sovereignd
[Service]
User=nobody
ExecStart=/opt/sovereignd/bin/sovereignd run --config /etc/sovereignd/sovereignd.yaml
IPAddressDeny=any
IPAddressAllow=localhost
"""


@pytest.fixture
def site(tmp_path: Path) -> Site:
    s = Site(tmp_path / "site")
    s.write_requests()
    s.clean_run()
    s.stop(30)
    return s


@pytest.fixture
def host(tmp_path: Path) -> FakeHost:
    return FakeHost(tmp_path / "host", UNIT, commands={"systemctl": (0, "active\n")})


def verdicts(report: report.AuditReport) -> dict[str, str]:
    return {c.id: c.verdict for c in report.controls}


def test_a_clean_period_passes_every_control(site: Site, host: FakeHost) -> None:
    report = site.report(host.probe())
    failing = {c.id: c.finding for c in report.controls if c.verdict not in ("PASS", "INFO")}
    assert failing == {}
    assert report.result == "PASS" and not report.failed
    assert report.control("launch").finding.startswith("started by systemd")
    assert "IPAddressDeny=any" in report.control("egress").finding
    integrity = report.control("integrity")
    facts = {f.key: f.value for f in integrity.facts}
    sizes = sum(p.stat().st_size for p in site.model.iterdir() if p != site.manifest)
    assert facts["files"] == 2 and facts["bytes"] == sizes
    assert report.control("request_activity").facts[0].value == 6


def test_cli_exits_0_when_every_control_passes(site: Site, host: FakeHost,
                                               monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    site.finish()
    probe = host.probe()
    monkeypatch.setattr(hostfacts, "HostProbe", lambda: probe)
    code = cli.main(["audit", "--config", str(site.config_path()), "--since",
                     ts(-3600), "--until", ts(3600), "--key-file", str(site.root / "auditor.key"),
                     "--format", "json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["result"] == "PASS"
    assert out["counts"]["fail"] == 0
    assert [c["id"] for c in out["controls"]] == [
        "host", "service_account", "launch", "config", "listen", "offline", "secrets",
        "file_posture", "egress", "integrity", "environment", "daemon_software", "request_chain",
        "request_records",
        "request_activity", "event_coverage", "incidents", "changes"]


def test_drift_resolved_by_verifying_again_is_listed_and_passes(site: Site,
                                                                host: FakeHost) -> None:
    site.event(10, "integrity_drift", level="error", policy="stop",
               manifest=str(site.manifest),
               files=[{"path": "model.safetensors", "status": "FAILED", "expected": "ab",
                       "actual": "cd"}])
    site.event(10.1, "state", level="warning", **{"from": "READY", "to": "QUARANTINED",
                                                  "reason": "weights drifted"})
    site.event(20, "integrity_verified", scope="files", files=1, bytes=4096, seconds=0.01,
               manifest=str(site.manifest), manifest_sha256="x")
    site.event(20.1, "release", action="release", reason="files verify again")
    site.event(20.2, "state", **{"from": "QUARANTINED", "to": "STARTING",
                                 "reason": "files verify again"})
    report = site.report(host.probe())
    integrity = report.control("integrity")
    drifts = next(t for t in integrity.tables if t.key == "drifts").rows
    quarantines = next(t for t in integrity.tables if t.key == "quarantines").rows
    assert drifts == [[ts(10), "stop", "model.safetensors FAILED"]]
    assert quarantines[0][:2] == [ts(10.1), ts(20.2)]
    assert quarantines[0][2] == "10.1 s"
    assert integrity.verdict == "WARN"  # the last event's manifest digest is not the file's
    assert report.control("incidents").verdict == "WARN"
    assert report.incidents["quarantines"][0]["seconds"] == pytest.approx(10.1, abs=0.01)


def test_unresolved_drift_fails_integrity(site: Site, host: FakeHost) -> None:
    site.event(10, "integrity_drift", level="error", policy="stop",
               manifest=str(site.manifest),
               files=[{"path": "model.safetensors", "status": "MISSING", "expected": "ab",
                       "actual": None}])
    site.event(10.1, "state", level="warning", **{"from": "READY", "to": "QUARANTINED",
                                                  "reason": "weights drifted"})
    report = site.report(host.probe())
    integrity = report.control("integrity")
    assert integrity.verdict == "FAIL"
    assert "differ from the manifest since" in integrity.finding
    fatal_or_q = report.incidents["quarantines"]
    assert fatal_or_q[0]["end"] is None  # still quarantined when the logs end


def test_software_drift_under_alert_fails_environment(site: Site, host: FakeHost) -> None:
    # The shape the daemon's environment guard logs.
    site.event(12, "environment_drift", level="error", scope="full", policy="alert", count=25,
               files=[{"path": "package evil", "status": "ADDED", "installed": "evil==1.0"},
                      {"path": "package numpy", "status": "CHANGED", "frozen": "numpy==1.26.4",
                       "installed": "numpy==2.0.0"},
                      {"path": "file vllm/x.py", "status": "FAILED", "dist": "vllm",
                       "expected": "a", "actual": "b", "detail": None}],
               frozen=str(site.frozen), frozen_sha256="0" * 64)
    report = site.report(host.probe())
    env = report.control("environment")
    assert env.verdict == "FAIL" and "policy alert" in env.finding
    assert "differs from the frozen requirements since" in env.finding
    row = next(t for t in env.tables if t.key == "drifts").rows[0]
    assert row[2:] == ["evil==1.0", "—", "numpy==1.26.4 -> numpy==2.0.0",
                       "vllm/x.py FAILED; 22 more not named"]


def test_unset_baselines_and_a_root_daemon_fail(site: Site, host: FakeHost) -> None:
    site.overrides = {"integrity": {"manifest": None}, "environment": {"frozen": None},
                      "daemon": {"user": None}}
    site.events[0]["uid"] = 0
    report = site.report(host.probe())
    v = verdicts(report)
    assert v["integrity"] == v["environment"] == v["service_account"] == "FAIL"
    assert "integrity.manifest is not set" in report.control("integrity").finding


def test_writable_baselines_and_open_secrets_fail_posture(site: Site, host: FakeHost) -> None:
    """The daemon's own guard rails judge the baselines for the service account."""
    site.manifest.chmod(0o666)
    site.model.chmod(0o777)
    sealing.state_path(site.logs).chmod(0o644)
    report = site.report(host.probe())
    posture = report.control("file_posture")
    rows = {r[0]: r for r in posture.tables[0].rows}
    assert rows["integrity manifest"][4] == "FAIL"
    assert "writable by every account" in rows["integrity manifest"][5]
    assert "fix: chmod o-w" in rows["integrity manifest"][5]
    folder = rows["folder above a protected file"]
    assert folder[1] == str(site.model) and folder[4] == "FAIL"
    assert rows["sealing state"][4] == "FAIL"
    assert rows["configuration"][4] == "PASS"
    assert posture.verdict == "FAIL"


def test_baselines_owned_by_the_service_account_fail_posture(site: Site,
                                                             host: FakeHost) -> None:
    """An owner can always chmod: a frozen file owned by the account approves its own drift."""
    assert NOBODY is not None
    import os

    os.chown(site.frozen, NOBODY.pw_uid, -1)
    report = site.report(host.probe())
    rows = {r[0]: r for r in report.control("file_posture").tables[0].rows}
    assert rows["frozen environment"][4] == "FAIL"
    assert "is owned by nobody" in rows["frozen environment"][5]


def test_fatal_periods_and_unclean_stops_are_incidents(site: Site, host: FakeHost) -> None:
    site.events = site.events[:-3]  # no clean stop: the daemon was killed while FATAL
    site.event(5, "exit", level="error", kind="kv-cache-memory", message="KV cache too small",
               deterministic=True, returncode=1, exit="exited with status 1")
    site.event(5.1, "state", level="warning", **{"from": "READY", "to": "FATAL",
                                                 "reason": "KV cache too small"})
    site.event(40, "daemon_start", version="0.1.0", pid=101, uid=site.events[0]["uid"])
    report = site.report(host.probe())
    fatal = report.incidents["fatal_periods"]
    assert [(f["start"], f["end"]) for f in fatal] == [(ts(5.1), ts(40))]
    assert "killed" in fatal[0]["ended_by"]
    unclean = report.incidents["unclean_stops"]
    assert [(u["previous_start"], u["previous_pid"], u["ts"]) for u in unclean] == [
        (ts(0), 100, ts(40))]
    assert report.control("incidents").verdict == "WARN"


def test_egress_from_firewall_rules_or_none(tmp_path: Path) -> None:
    """nft and iptables rules for the service account count; readable rules without one fail."""
    nft = FakeHost(tmp_path / "a", commands={"nft": (0, 'table inet sovereignd {\n chain out {'
                                                     '\n meta skuid "nobody" drop\n }\n}\n')})
    found = hostfacts.egress(nft.probe(), hostfacts.launch_method(nft.probe()), 65534, "nobody")
    assert found.blocked and "skuid" in found.blocking[0]
    ipt = FakeHost(tmp_path / "b", commands={"iptables": (0, "-P OUTPUT ACCEPT\n-A OUTPUT -m "
                                                          "owner --uid-owner 65534 -j REJECT\n")})
    assert hostfacts.egress(ipt.probe(), hostfacts.Launch("unknown"), 65534, "nobody").blocked
    other = FakeHost(tmp_path / "c", commands={"iptables": (0, "-A OUTPUT -m owner "
                                                            "--uid-owner 1234 -j DROP\n")})
    found = hostfacts.egress(other.probe(), hostfacts.Launch("unknown"), 65534, "nobody")
    assert not found.blocked and found.checked == ["`iptables -S OUTPUT`"]
    denied = FakeHost(tmp_path / "d", commands={"nft": (1, "Operation not permitted")})
    found = hostfacts.egress(denied.probe(), hostfacts.Launch("unknown"), None, None)
    assert not found.checked and "Operation not permitted" in found.unreadable[0]


def test_egress_verdicts(site: Site, tmp_path: Path) -> None:
    bare_unit = FakeHost(tmp_path / "u", UNIT.replace("IPAddressDeny=any\n", ""),
                         commands={"systemctl": (0, "active\n")})
    assert verdicts(site.report(bare_unit.probe()))["egress"] == "FAIL"
    nothing = FakeHost(tmp_path / "n", running=False)
    report = site.report(nothing.probe())
    assert verdicts(report)["egress"] == "WARN"
    assert "cannot be checked here" in report.control("egress").finding
    launch = report.control("launch")
    assert launch.verdict == "WARN" and "how the daemon is launched is unknown" in launch.finding


def test_installed_launchd_plist_and_pf_anchor_are_recognised(tmp_path: Path) -> None:
    """The plist and pf anchor that ops/macos/install.sh puts in place, as the audit sees them."""
    from tests.helpers import REPO

    root = tmp_path / "mac"
    (root / "Library/LaunchDaemons").mkdir(parents=True)
    (root / "etc/pf.anchors").mkdir(parents=True)
    shutil.copy(REPO / "launchd/org.sovereignd.plist", root / "Library/LaunchDaemons")
    shutil.copy(REPO / "ops/macos/pf.anchors/org.sovereignd", root / "etc/pf.anchors")
    (root / "etc/pf.conf").write_text('anchor "org.sovereignd"\nload anchor "org.sovereignd" '
                                      'from "/etc/pf.anchors/org.sovereignd"\n')
    calls: list[list[str]] = []

    def run(argv: Sequence[str]) -> tuple[int, str]:
        calls.append(list(argv))
        if argv[0] == "launchctl":
            return 0, "system/org.sovereignd = {\n\tstate = running\n"
        return 1, "pfctl: Permission denied"

    probe = hostfacts.HostProbe(root=root, run=run, system="Darwin")
    launch = hostfacts.launch_method(probe)
    assert (launch.manager, launch.loaded, launch.state, launch.user) == (
        "launchd", True, "running", "_sovereignd")
    found = hostfacts.egress(probe, launch, 260, "_sovereignd")
    assert found.blocked and "block drop out log quick" in found.blocking[0]
    assert ["launchctl", "print", "system/org.sovereignd"] in calls
    (root / "etc/pf.conf").write_text("")
    assert not hostfacts.egress(probe, launch, 260, "_sovereignd").blocked


def test_installed_systemd_unit_is_recognised(tmp_path: Path) -> None:
    """The unit ops/linux/install.sh installs blocks egress with IPAddressDeny."""
    from tests.helpers import REPO

    host = FakeHost(tmp_path / "linux", (REPO / "ops/linux/sovereignd.service").read_text(),
                    commands={"systemctl": (3, "inactive\n")})
    launch = hostfacts.launch_method(host.probe())
    assert (launch.manager, launch.loaded, launch.state, launch.user) == (
        "systemd", False, "inactive", "sovereignd")
    found = hostfacts.egress(host.probe(), launch, None, "sovereignd")
    assert found.blocked and "IPAddressDeny=any (IPAddressAllow=localhost)" in found.blocking[0]


def test_dates_accept_iso_forms_in_utc() -> None:
    parse = evidence.parse_date
    assert parse("2026-11-22", "--since") == 1795305600.0
    assert parse("2026-11-22", "--until", end_of_day=True) == 1795305600.0 + 86400
    assert parse("2026-11-22T02:11Z", "--since") == 1795313460.0
    assert parse("2026-11-22 03:11:00+01:00", "--since") == 1795313460.0
    assert parse("2026-11-22T02:11:00", "--since") == 1795313460.0
    with pytest.raises(evidence.AuditError, match="--since 'yesterday' is not a date"):
        parse("yesterday", "--since")


def test_secret_looking_server_env_is_shown_as_a_fingerprint(site: Site,
                                                             host: FakeHost) -> None:
    site.overrides = {"server": {"env": {"HF_TOKEN": "hf_verysecretvalue", "OMP_THREADS": 4}}}
    report = site.report(host.probe())
    secrets = report.control("secrets")
    rows = dict(map(tuple, secrets.tables[0].rows))  # type: ignore[arg-type]
    assert rows["OMP_THREADS"] == "4"
    assert rows["HF_TOKEN"].startswith("sha256:") and "verysecret" not in rows["HF_TOKEN"]
    assert secrets.verdict == "WARN"
    from sovereignd.audit import render

    for fmt in render.FORMATS:
        assert "hf_verysecretvalue" not in render.render(report, fmt)


def test_events_rotated_away_before_the_period_are_a_warning(site: Site,
                                                             host: FakeHost) -> None:
    """Once rotation drops files, a period reaching back before the oldest event is not covered."""
    site.overrides = {"logs": {"keep": 1}}
    (site.logs / "events.log.1").write_text(json.dumps(
        {"ts": ts(-1), "level": "info", "event": "probe_failed"}) + "\n")
    report = site.report(host.probe())
    coverage = report.control("event_coverage")
    assert coverage.verdict == "WARN" and "earlier events are gone" in coverage.finding


def test_baselines_the_daemon_would_refuse_fail_with_its_reasons(site: Site,
                                                                 host: FakeHost) -> None:
    """A frozen file edited after approval, a manifest with a bad line: the daemon's readers'
    own messages, with the line and the fix."""
    site.frozen.write_text(site.frozen.read_text() + "evil==1.0\n")
    site.manifest.write_text(site.manifest.read_text() + "not a checksum line\n")
    report = site.report(host.probe())
    env = report.control("environment")
    assert env.verdict == "FAIL" and "sovereignd baseline" in env.finding
    assert {f.key: f.value for f in env.facts}["companion_matches"] is False
    integrity = report.control("integrity")
    assert integrity.verdict == "FAIL" and "line 3" in integrity.finding


def test_the_daemons_own_software_is_a_control(site: Site, host: FakeHost) -> None:
    """Unset: a warning; set and drifted in the period: FAIL, naming the file."""
    report = site.report(host.probe())
    env = report.control("environment")
    facts = {f.key: f.value for f in env.facts}
    assert facts["interpreter"].startswith("CPython 3.11.7 at /usr/bin/python3.11")
    assert facts["software_files"] == 1
    assert report.control("daemon_software").verdict == "PASS"
    site.event(20, "self_drift", level="error", scope="full", policy="alert", count=1,
               files=[{"path": "file /venv/lib/python3.11/site-packages/x.pth",
                       "status": "EXTRA"}])
    own = site.report(host.probe()).control("daemon_software")
    assert own.verdict == "FAIL" and "drifted" in own.finding
    assert "x.pth EXTRA" in own.tables[0].rows[0][1]
    site.overrides = {"daemon": {"software_manifest": None}}
    own = site.report(host.probe()).control("daemon_software")
    assert own.verdict == "WARN" and "does not verify its own" in own.finding


def test_a_frozen_file_approving_no_software_manifest_fails(site: Site,
                                                            host: FakeHost) -> None:
    text = site.frozen.read_text().split("\n", 1)[1]
    site.frozen.write_text(text)
    (site.root / "requirements-frozen.txt.sha256").write_text(
        f"{manifest.file_sha256(site.frozen)}  requirements-frozen.txt\n")
    env = site.report(host.probe()).control("environment")
    assert env.verdict == "FAIL" and "approves no software manifest" in env.finding


def test_software_manifests_owned_by_the_service_account_fail_posture(
        site: Site, host: FakeHost) -> None:
    """The software manifests approve code as the frozen file does: the account must not own
    them (the daemon's guard rails refuse to start on the same evidence)."""
    assert NOBODY is not None
    for path in (site.software, site.own):
        os.chown(path, NOBODY.pw_uid, -1)
    rows = {r[0]: r for r in site.report(host.probe()).control("file_posture").tables[0].rows}
    for what in ("software manifest", "daemon software manifest"):
        assert rows[what][4] == "FAIL" and "is owned by nobody" in rows[what][5]
    assert rows["daemon software manifest checksum"][4] != "FAIL"


def _crashed_run(site: Site, *, starts: int, ended: int) -> None:
    """A writer run killed with `starts` requests accepted and `ended` of them recorded."""
    from sovereignd.logs.requestlog import RequestLog
    from tests.reqlog_support import crash, request

    log = RequestLog(site.logs, site.logs, clock=Clock(T0 + 40), emit=Events(),
                     compress=False)
    log.open()
    seqs = [log.start(request(100 + i)) for i in range(starts)]
    for i, s in enumerate(seqs[:ended]):
        log.record(request(100 + i, start_seq=s))
    crash(log)
    again = RequestLog(site.logs, site.logs, clock=Clock(T0 + 50), emit=Events(),
                       compress=False)
    again.open()
    again.close()


def test_requests_in_flight_at_a_crash_are_listed_as_incomplete_and_pass(
        site: Site, host: FakeHost) -> None:
    """The request-records control counts starts, completions and incomplete ones, with the
    cause, and states the requests.sync setting in force with what it means for power loss."""
    _crashed_run(site, starts=3, ended=1)
    c = site.report(host.probe()).control("request_records")
    facts = {f.key: f.value for f in c.facts}
    assert c.verdict == "PASS", c.finding
    assert (facts["started"], facts["completed"], facts["incomplete"], facts["open"]) == \
        (3, 1, 2, 0)
    assert [row[4] for row in c.tables[0].rows] == ["unclean_stop", "unclean_stop"]
    assert facts["sync"] == ["interval 50.0 ms"]
    text = {f.key: f.text for f in c.facts}
    assert "power loss can lose the records of answers given in the last 50.0 ms" in \
        str(text["sync"])
    assert "2 incomplete (2 unclean_stop)" in c.finding


def test_an_unclean_stop_that_could_have_lost_an_answered_record_fails(
        site: Site, host: FakeHost, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run that wrote records after its answers (format 1) and was killed: FAIL."""
    from sovereignd.logs import requestlog

    monkeypatch.setattr(requestlog, "FORMAT", 1)
    _crashed_run(site, starts=0, ended=0)
    c = site.report(host.probe()).control("request_records")
    assert c.verdict == "FAIL"
    assert "could be missing its record" in c.finding
