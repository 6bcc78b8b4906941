"""`sovereignd audit` over real daemon runs: figures match the logs, breaks are named."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.harness import Daemon, http
from tests.helpers import run_cli, wait_for

CHAT = {"model": "model", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
COMPLETION = {"model": "model", "prompt": "x", "max_tokens": 4}


@dataclass
class Period:
    """A finished stretch of daemon runs, and what the test sent through it."""

    daemon: Daemon
    key_file: Path
    root: Path


def _add_key(d: Daemon, name: str) -> str:
    res = run_cli("keys", "add", name, "--config", str(d.config_path))
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _approve_weights(d: Daemon) -> Path:
    """Weights for the stand-in's model folder, approved in a manifest kept outside it."""
    weights = d.model / "model.bin"
    weights.write_bytes(os.urandom(256 * 1024))
    (d.model / "tokenizer.json").write_text('{"version": "1.0"}')
    (d.root / "baseline").mkdir()
    d.cfg["integrity"] = {"manifest": str(d.root / "baseline" / "model.sha256"),
                          "stat_interval": "500ms"}
    d.write_config()
    res = run_cli("baseline", "--config", str(d.config_path))
    assert res.returncode == 0, res.stdout + res.stderr
    return weights


def _state(d: Daemon, state: str) -> Callable[[], bool]:
    return lambda: d.get("/readyz")[1].get("state") == state


@pytest.fixture(scope="module")
def period(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Period]:
    """Runs with a crash and restart, a quarantine for tampered weights, an operator restart,
    two clients, a revoked key."""
    root = tmp_path_factory.mktemp("audit")
    d = Daemon(root / "d", behaviour={"starts": [{"crash_after": 1}], "default": {}})
    try:
        weights = _approve_weights(d)
        alice, bob = _add_key(d, "alice"), _add_key(d, "bob")
        init = run_cli("logs", "init-key", "--config", str(d.config_path))
        assert init.returncode == 0, init.stderr
        key_file = root / "auditor.key"
        key_file.write_text(init.stdout)
        d.start()
        d.wait_state("READY")
        # The stand-in crashes on its second API call (the next canary): one restart.
        wait_for(lambda: len(d.starts()) == 2, 15, what="the restart after the crash")
        d.wait_state("READY")
        for _ in range(3):
            assert http("POST", d.url + "/v1/chat/completions", CHAT, _bearer(alice))[0] == 200
        assert http("POST", d.url + "/v1/completions", COMPLETION, _bearer(alice))[0] == 200
        for _ in range(2):
            code, _, _ = http("POST", d.url + "/v1/chat/completions", {**CHAT, "stream": True},
                              _bearer(bob))
            assert code == 200
        assert http("GET", d.url + "/v1/models")[0] == 401
        assert http("GET", d.url + "/invocations", None, _bearer(alice))[0] == 404
        # One byte of the weights changes while serving: quarantined until it is put back.
        original = weights.read_bytes()
        weights.write_bytes(original[:1000] + bytes([original[1000] ^ 0xFF]) + original[1001:])
        wait_for(_state(d, "QUARANTINED"), 15, what="the quarantine")
        weights.write_bytes(original)
        d.wait_state("READY")
        res = run_cli("restart", "--config", str(d.config_path), "--reason", "audit drill")
        assert res.returncode == 0, res.stderr
        wait_for(lambda: len(d.starts()) == 4, 15, what="the operator's restart")
        d.wait_state("READY")
        res = run_cli("keys", "revoke", "bob", "--config", str(d.config_path))
        assert res.returncode == 0, res.stderr
        assert d.stop() == 0
        yield Period(d, key_file, root)
    finally:
        d.close()


def audit(p: Period, *args: str, config: Path | None = None) -> subprocess.CompletedProcess[str]:
    return run_cli("audit", "--config", str(config or p.daemon.config_path), *args)


def audit_json(p: Period, *args: str, config: Path | None = None) -> tuple[int, dict[str, Any]]:
    res = audit(p, "--format", "json", *args, config=config)
    assert res.returncode in (0, 1), res.stderr
    return res.returncode, json.loads(res.stdout)


def control(report: dict[str, Any], control_id: str) -> dict[str, Any]:
    return next(c for c in report["controls"] if c["id"] == control_id)


def test_report_figures_match_the_logs(period: Period) -> None:
    """Counts by client, tokens, errors and restarts are those of the records and events."""
    from sovereignd.logs.records import iter_records

    code, report = audit_json(period, "--key-file", str(period.key_file))
    records = list(iter_records(period.daemon.logs))
    by_client = Counter(r["client"] for r in records)
    assert by_client == {"alice": 4, "bob": 2, None: 2}
    clients = report["requests"]["by_client"]
    assert clients["alice"]["requests"] == 4 and clients["bob"]["requests"] == 2
    assert clients["(not authenticated)"]["requests"] == 2
    # Three chats and a completion for alice, two streamed chats for bob: 7 + 4 tokens each.
    assert (clients["alice"]["prompt_tokens"], clients["alice"]["completion_tokens"]) == (28, 16)
    assert (clients["bob"]["prompt_tokens"], clients["bob"]["completion_tokens"]) == (14, 8)
    total = report["requests"]["total"]
    assert total["requests"] == len(records) == 8
    assert total["prompt_tokens"] == sum(r["prompt_tokens"] or 0 for r in records) == 42
    assert total["errors"] == 2 and total["error_rate"] == 0.25
    assert report["requests"]["by_status"] == {"200": 6, "401": 1, "404": 1}
    assert report["requests"]["by_model"]["model"]["requests"] == 6
    assert report["requests"]["error_classes"] == {"auth_missing": 1, "not_found": 1}
    assert total["latency_ms_p50"] <= total["latency_ms_p99"]

    restarts = report["incidents"]["restarts"]
    spawns = [e for e in period.daemon.events("spawn") if e["start"] > 1]
    assert len(restarts) == len(spawns) == 3
    assert restarts[0]["kind"] == "exit" and "status 1" in restarts[0]["message"]
    assert restarts[1]["reason"] == "weights verify again" and restarts[1]["kind"] is None
    assert restarts[2]["reason"] == "operator: audit drill" and restarts[2]["kind"] is None
    assert sum(n for _, n in report["charts"]["restarts_per_day"]) == 3

    quarantines = report["incidents"]["quarantines"]
    entered = [e for e in period.daemon.events("state") if e["to"] == "QUARANTINED"]
    assert len(quarantines) == len(entered) == 1
    assert quarantines[0]["start"] == entered[0]["ts"] and quarantines[0]["end"] is not None
    assert "model.bin" in quarantines[0]["reason"]
    integrity = control(report, "integrity")
    assert integrity["verdict"] == "PASS", integrity["finding"]
    assert integrity["evidence"]["files"] == 3  # config.json, model.bin, tokenizer.json
    assert integrity["evidence"]["bytes"] == sum(
        p.stat().st_size for p in period.daemon.model.iterdir())
    [drift] = integrity["tables"]["drifts"]["rows"]
    assert drift[1] == "stop" and drift[2] == "model.bin FAILED"
    assert len(integrity["tables"]["quarantines"]["rows"]) == 1
    assert "1 drift(s) and 1 quarantine(s)" in integrity["finding"]
    assert control(report, "incidents")["verdict"] == "WARN"  # a quarantine to review
    assert sum(n for _, n in report["charts"]["requests_per_day"]) == 8

    changes = [(c["change"], c["name"]) for c in report["incidents"]["key_changes"]]
    assert changes == [("added", "alice"), ("added", "bob"), ("revoked", "bob")]
    actions = [a["action"] for a in report["incidents"]["operator_actions"]]
    assert actions == ["daemon started", "release", "restart", "shutdown", "daemon stopped"]

    chain = control(report, "request_chain")
    assert chain["verdict"] == "PASS", chain["finding"]
    assert chain["evidence"]["seals_checked"] is True
    # The requests, the start entries of the six that reached the server, open and close.
    assert chain["evidence"]["records"] == 8 + 6 + 2
    accounted = control(report, "request_records")
    assert accounted["verdict"] == "PASS", accounted["finding"]
    ev = accounted["evidence"]
    assert (ev["started"], ev["completed"], ev["incomplete"], ev["open"]) == (6, 6, 0, 0)
    assert ev["sync"] == ["interval 50.0 ms"] and ev["exposures"] == 0
    assert control(report, "offline")["verdict"] == "PASS"
    assert control(report, "listen")["verdict"] == "PASS"
    assert control(report, "incidents")["tables"]["restarts"]["rows"][0][3] == "exit"
    # The tests run as root with allow_root: the report must say so, and fail for it.
    assert control(report, "service_account")["verdict"] == "FAIL"
    assert code == 1 and report["result"] == "FAIL"
    assert report["sovereignd_version"] and report["produced_at"] and report["period"]["until"]


def test_report_never_shows_a_key(period: Period) -> None:
    """Client keys appear only as fingerprints; the auditor's key not at all."""
    res = audit(period, "--key-file", str(period.key_file))
    auditor_key = period.key_file.read_text().strip()
    assert auditor_key not in res.stdout
    assert "sk-sov-" not in res.stdout
    keys = json.loads((period.daemon.root / "keys.json").read_text())["keys"]
    for k in keys:
        assert k["fingerprint"] in res.stdout and k["sha256"] not in res.stdout


def test_without_the_auditors_key_seals_are_a_warning(period: Period) -> None:
    _, report = audit_json(period)
    chain = control(report, "request_chain")
    assert chain["verdict"] == "WARN" and "NOT checked" in chain["finding"]


def test_period_bounds_select_records_and_incidents(period: Period) -> None:
    """--until before everything: an empty period; a bare --until date covers its whole day."""
    _, before = audit_json(period, "--until", "2000-01-01")
    assert before["requests"]["total"]["requests"] == 0
    assert before["incidents"]["restarts"] == []
    assert before["period"]["until"] == "2000-01-02T00:00:00.000Z"  # the whole 1st
    day = period.daemon.events()[0]["ts"][:10]
    _, same_day = audit_json(period, "--since", day, "--until", day)
    assert same_day["requests"]["total"]["requests"] == 8
    assert same_day["period"]["since"] == f"{day}T00:00:00.000Z"
    assert len(same_day["charts"]["requests_per_day"]) == 1
    bad = audit(period, "--since", "last tuesday")
    assert bad.returncode == 2 and "is not a date or time" in bad.stderr  # a usage error


def test_markdown_reads_as_a_ticket(period: Period) -> None:
    res = audit(period, "--key-file", str(period.key_file))
    assert res.returncode == 1
    lines = res.stdout.splitlines()
    assert lines[0] == "# sovereignd audit report: FAIL"
    head = "\n".join(lines[:8])
    assert "**Period:** start of the kept logs" in head and "**Produced:**" in head
    assert "by sovereignd 0.1.0" in head
    assert "| Request records complete and unaltered | PASS |" in res.stdout
    assert "| alice | 4 | 0 | 0.0% | 28 | 16 |" in res.stdout
    for section in ("## Host and service", "## Configuration", "## Posture",
                    "## Model integrity", "## Software environment", "## Request records",
                    "## Incidents"):
        assert section in lines


def test_html_is_self_contained_and_renders_its_charts(period: Period, tmp_path: Path) -> None:
    """One file, no network, inline SVG bars; headless Chromium renders it to a screenshot."""
    out = tmp_path / "audit.html"
    res = audit(period, "--key-file", str(period.key_file), "-o", str(out))
    assert res.returncode == 1 and "audit report written to" in res.stderr
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") and "<style>" in page
    for external in ("<script", "<link", " src=", "@import", "url("):
        assert external not in page
    assert page.count("<svg") == 2
    bars = page.count('<rect class="bar"') + page.count('<rect class="bar restart"')
    assert bars >= 2
    assert "8 requests</title>" in page and "3 restarts</title>" in page
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (ops/test.sh installs Debian's package)")
    shot = tmp_path / "audit.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu",
                    "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'prof'}",
                    f"--screenshot={shot}", "--window-size=1280,2000", out.as_uri()],
                   capture_output=True, timeout=60, check=False)
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (1280, 2000)
    assert len(data) > 50_000, "the screenshot is nearly empty"


def test_tampered_record_fails_the_control_and_names_file_and_seq(period: Period,
                                                                  tmp_path: Path) -> None:
    """One field of one record edited after the daemon stopped: FAIL, with file and seq."""
    copy = tmp_path / "d"
    shutil.copytree(period.daemon.root, copy)
    config = copy / "sovereignd.yaml"
    config.write_text(config.read_text().replace(str(period.daemon.root), str(copy)))
    live = copy / "logs" / "requests.log"
    lines = live.read_bytes().splitlines(keepends=True)
    n = next(i for i, ln in enumerate(lines)
             if b'"client":"bob"' in ln and b'"kind":"request"' in ln)
    seq = json.loads(lines[n])["seq"]
    lines[n] = lines[n].replace(b'"completion_tokens":4', b'"completion_tokens":1')
    live.write_bytes(b"".join(lines))

    code, report = audit_json(period, "--key-file", str(period.key_file), config=config)
    chain = control(report, "request_chain")
    assert code == 1 and chain["verdict"] == "FAIL"
    assert chain["evidence"]["break"]["file"] == "requests.log"
    assert chain["evidence"]["break"]["seq"] == seq
    assert f"requests.log, seq {seq}" in chain["finding"]
    # Without the key the chain alone still shows the edit at the same record.
    code, report = audit_json(period, config=config)
    chain = control(report, "request_chain")
    assert code == 1 and chain["verdict"] == "FAIL"
    assert chain["evidence"]["break"]["seq"] == seq
    md = audit(period, "--key-file", str(period.key_file), config=config).stdout
    assert f"| Request records complete and unaltered | FAIL | BROKEN — edited at requests.log, " \
           f"seq {seq}" in md
