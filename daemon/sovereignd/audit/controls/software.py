"""Software-environment controls: the server's venv and the daemon's own software."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from sovereignd.audit.controls.findings import conclude, last_check
from sovereignd.audit.inputs import Inputs
from sovereignd.audit.model import FAIL, PASS, SECTIONS, WARN, Control, short_ts
from sovereignd.errors import FrozenFileError, SovereigndError
from sovereignd.integrity import software
from sovereignd.integrity.frozen import check_companion, parse_frozen
from sovereignd.units import human_size


def environment_control(i: Inputs) -> Control:
    cfg = i.cfg
    env = cfg.environment
    c = Control("environment", SECTIONS[4], "Server software against the frozen requirements",
                PASS, "")
    c.fact("on_drift", "Policy on drift (environment.on_drift)", env.on_drift)
    c.fact("record_check", "Installed files checked against RECORD", env.record_check)
    c.fact("venv", "Server venv", str(cfg.server.venv) if cfg.server.venv else None)
    if env.frozen is None:
        c.verdict = FAIL
        c.finding = ("environment.frozen is not set: the server's software is not verified "
                     "against approved requirements")
        return c
    problems: list[tuple[str, str]] = []
    c.fact("frozen", "Frozen requirements", str(env.frozen))
    digest: str | None = None
    try:
        data = env.frozen.read_bytes()
    except OSError as exc:
        problems.append((FAIL, f"{env.frozen}: cannot be read: {exc.strerror or exc}"))
    else:
        digest = hashlib.sha256(data).hexdigest()
        c.fact("frozen_sha256", "Frozen file SHA-256 (now)", digest)
        # The daemon's own readers: what they refuse at start, the audit fails.
        try:
            frozen = parse_frozen(data, str(env.frozen))
            c.fact("packages", "Packages listed", len(frozen.requirements))
            check_companion(env.frozen, data)
        except FrozenFileError as exc:
            c.fact("companion_matches", "Approved by its .sha256 companion", False)
            problems.append((FAIL, str(exc)))
        else:
            c.fact("companion_matches", "Approved by its .sha256 companion", True)
    if not env.record_check:
        problems.append((WARN, "environment.record_check is off: installed files are not "
                         "checked against their RECORD hashes"))
    _approved_software(c, problems, env.files_check,
                       lambda: software.read_approved(env.frozen) if env.frozen else None)
    last_ok = i.history.last("environment_verified")
    if last_ok is None:
        problems.append((FAIL, "no verification of the server's software is recorded"))
    else:
        c.fact("last_verification", "Last verification", last_ok["ts"],
               f"{short_ts(last_ok['ts'])}: OK, {last_ok.get('packages')} packages, "
               f"{last_ok.get('record_files')} installed files "
               f"({human_size(int(last_ok.get('record_bytes') or 0))}) match RECORD"
               + (f"; {last_ok.get('software_files')} files of the venv and its interpreter "
                  "match the software manifest" if last_ok.get("software_files") else "")
               + (f" (reused the full verification of {last_ok.get('verified_at')} by "
                  f"{last_ok.get('verified_by')}: nothing under the venv changed since)"
                  if last_ok.get("scope") == "reused" else ""))
        known = last_ok.get("frozen_sha256")
        if digest is not None and isinstance(known, str) and known != digest:
            problems.append((WARN, "the frozen file changed after the daemon last verified"))
    last_check(c, i, "environment", problems,
                "the server's software differs from the frozen requirements")
    t = c.table("drifts", "Drift detected in the period",
                ["time", "policy", "added", "removed", "changed", "RECORD mismatches"])
    drifts = i.history.in_period(i.period, "environment_drift")
    for d in drifts:
        t.rows.append([d["ts"], d.get("policy"), *_software_drift(d)])
        if d.get("policy") == "alert":
            problems.append((FAIL, f"drift at {short_ts(d['ts'])} under policy alert: the "
                             "server kept running drifted software"))
    return conclude(c, problems, lambda: (
        f"software verified at {short_ts(last_ok['ts']) if last_ok else '?'}; "
        f"{len(drifts)} drift(s) in the period"))


def _approved_software(c: Control, problems: list[tuple[str, str]], enabled: bool,
                       read: Callable[[], software.SoftwareManifest | None]) -> None:
    """Facts of an approved software manifest (files, interpreter); what the daemon's reader
    refuses, the audit fails."""
    c.fact("files_check", "Every file of the venv and its interpreter hashed", enabled)
    if not enabled:
        problems.append((WARN, "environment.files_check is off: bytecode, scripts, files no "
                         "RECORD lists and the interpreter are not verified"))
        return
    try:
        m = read()
    except SovereigndError as exc:
        problems.append((FAIL, str(exc)))
        return
    if m is None:
        return
    c.fact("software_manifest", "Software manifest", m.source)
    c.fact("software_manifest_sha256", "Software manifest SHA-256", m.sha256)
    c.fact("software_files", "Files approved (venv, interpreter, standard library)",
           len(m.digests))
    c.fact("interpreter", "Approved interpreter", m.interpreter.summary())


def self_control(i: Inputs) -> Control:
    """The daemon's own venv and interpreter (daemon.software_manifest)."""
    path = i.cfg.daemon.software_manifest
    c = Control("daemon_software", SECTIONS[4], "The daemon's own software", PASS, "")
    c.fact("software_manifest", "Software manifest (daemon.software_manifest)",
           str(path) if path else None)
    if path is None:
        c.verdict = WARN
        c.finding = ("daemon.software_manifest is not set: the daemon does not verify its own "
                     "venv and interpreter, so the gateway's code is not shown to be approved")
        return c
    problems: list[tuple[str, str]] = []
    _approved_software(c, problems, True, lambda: software.read_with_companion(path))
    last_ok = i.history.last("self_verified")
    if last_ok is None:
        problems.append((FAIL, "no verification of the daemon's own software is recorded"))
    else:
        c.fact("last_verification", "Last verification", last_ok["ts"],
               f"{short_ts(last_ok['ts'])}: OK, {last_ok.get('files')} files match")
    last_check(c, i, "self", problems, "the daemon's own software differs from its manifest")
    t = c.table("drifts", "Drift detected in the period", ["time", "files"])
    drifts = i.history.in_period(i.period, "self_drift")
    for d in drifts:
        t.rows.append([d["ts"], _software_drift(d)[3]])
        problems.append((FAIL, f"the daemon's own software drifted at {short_ts(d['ts'])}"))
    return conclude(c, problems, lambda: (
        f"the daemon's own software verified at {short_ts(last_ok['ts']) if last_ok else '?'}"))


def _software_drift(event: dict[str, Any]) -> list[str]:
    """Added, removed, changed packages and RECORD mismatches of an environment_drift event.

    The daemon lists them as `files`: {"path": "package vllm" | "file vllm/x.py", "status"};
    separate lists (added, removed, changed, record_mismatches) are read too."""
    if not isinstance(event.get("files"), list):
        return [_names(event.get(k)) for k in ("added", "removed", "changed",
                                               "record_mismatches")]
    groups: dict[str, list[str]] = {"ADDED": [], "REMOVED": [], "CHANGED": [], "file": []}
    for item in event["files"]:
        if not isinstance(item, dict):
            continue
        path, status = str(item.get("path", "")), str(item.get("status", ""))
        if path.startswith("package "):
            name = path.removeprefix("package ")
            shown = item.get("installed") or item.get("frozen") or name
            if status == "CHANGED":
                shown = f"{item.get('frozen')} -> {item.get('installed')}"
            groups.setdefault(status, []).append(str(shown))
        else:
            groups["file"].append(f"{path.removeprefix('file ')} {status}".strip())
    cells = [_names(groups[k]) for k in ("ADDED", "REMOVED", "CHANGED", "file")]
    count, listed = event.get("count"), sum(len(v) for v in groups.values())
    if isinstance(count, int) and count > listed:
        # The daemon names the first few; the rest are only counted.
        cells[3] = f"{'' if cells[3] == '—' else cells[3] + '; '}{count - listed} more not named"
    return cells


def _names(value: Any) -> str:
    """Drift lists hold names, `name==ver` strings or objects; shown compactly."""
    if not value:
        return "—"
    if isinstance(value, dict):
        value = [f"{k} {v}" for k, v in value.items()]
    if not isinstance(value, list):
        return str(value)
    out = []
    for item in value[:10]:
        if isinstance(item, dict):
            out.append(str(item.get("name") or item.get("path") or item.get("file") or item))
        else:
            out.append(str(item))
    more = f" (+{len(value) - 10})" if len(value) > 10 else ""
    return ", ".join(out) + more


