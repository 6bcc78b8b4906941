"""The model-integrity control: weights against their manifest or signature."""

from __future__ import annotations

from typing import Any

from sovereignd.audit.controls.findings import conclude, last_check
from sovereignd.audit.evidence import ManifestFacts, manifest_facts
from sovereignd.audit.inputs import Inputs
from sovereignd.audit.model import FAIL, PASS, SECTIONS, WARN, Control, Table, short_ts
from sovereignd.errors import ManifestError
from sovereignd.integrity import hashing
from sovereignd.units import human_size


def integrity_control(i: Inputs, incidents: dict[str, Any]) -> Control:
    cfg = i.cfg
    c = Control("integrity", SECTIONS[3], "Model weights against the manifest", PASS, "")
    manifest = cfg.integrity.manifest
    c.fact("on_drift", "Policy on drift (integrity.on_drift)", cfg.integrity.on_drift)
    problems: list[tuple[str, str]] = []
    if manifest is None and cfg.integrity.signature is not None:
        return _signed_control(c, i, incidents)
    if manifest is None:
        c.verdict = FAIL
        c.finding = ("integrity.manifest is not set: the weights are not verified against an "
                     "approved manifest")
        return c
    c.fact("manifest", "Manifest", str(manifest))
    facts: ManifestFacts | None = None
    try:
        facts = manifest_facts(manifest, cfg.server.model)
    except ManifestError as exc:
        problems.append((FAIL, str(exc)))
    if facts is not None:
        c.fact("manifest_sha256", "Manifest SHA-256 (now)", facts.sha256)
        c.fact("files", "Files listed", facts.entries)
        c.fact("bytes", "Bytes covered (sizes now)", facts.bytes_present,
               f"{human_size(facts.bytes_present)} ({facts.bytes_present:,} bytes)")
        if facts.missing:
            c.fact("missing_now", "Listed files missing now", facts.missing[:20])
        pinned = cfg.integrity.manifest_sha256
        if pinned is not None and pinned != facts.sha256:
            problems.append((FAIL, f"the manifest's SHA-256 is {facts.sha256[:16]}…, not the "
                             f"{pinned[:16]}… pinned in integrity.manifest_sha256"))
    full = i.history.last("integrity_verified", where=lambda e: e.get("scope") == "full")
    if full is None:
        problems.append((FAIL, "no full verification of the weights is recorded"))
    else:
        c.fact("last_full_verification", "Last full verification", full["ts"],
               f"{short_ts(full['ts'])}: OK, {full.get('files')} files, "
               f"{human_size(int(full.get('bytes') or 0))} in {full.get('seconds')} s")
    last = last_check(c, i, "integrity", problems, "the weights differ from the manifest")
    known = last.get("manifest_sha256") if last is not None else None
    if facts is not None and isinstance(known, str) and known != facts.sha256:
        problems.append((WARN, "the manifest file changed after the daemon last used it"))
    drifts, q = _drift_tables(c, i, incidents, problems)
    accepted = i.history.in_period(i.period, "baseline_accepted")
    if accepted:
        b = c.table("baselines", "Baselines accepted by an operator",
                    ["time", "manifest sha256", "reason"])
        b.rows.extend([e["ts"], e.get("manifest_sha256"), e.get("reason")] for e in accepted)
    return conclude(c, problems, lambda: (
        f"weights verified against the manifest ({facts.entries if facts else '?'} files, "
        f"{human_size(facts.bytes_present) if facts else '?'}); {len(drifts)} drift(s) and "
        f"{len(q.rows)} quarantine(s) in the period"))


def _drift_tables(c: Control, i: Inputs, incidents: dict[str, Any],
                  problems: list[tuple[str, str]]) -> tuple[list[dict[str, Any]], Table]:
    """The weights' drifts and quarantines of the period as tables; a drift served under
    policy alert is a failure. Returns the drift events and the quarantine table."""
    drifts = i.history.in_period(i.period, "integrity_drift")
    t = c.table("drifts", "Drift detected in the period", ["time", "policy", "files"])
    for d in drifts:
        files = d.get("files") or []
        t.rows.append([d["ts"], d.get("policy"),
                       "; ".join(f"{f.get('path')} {f.get('status')}" for f in files
                                 if isinstance(f, dict))])
        if d.get("policy") == "alert":
            problems.append((FAIL, f"drift at {short_ts(d['ts'])} under policy alert: the "
                             "drifted weights kept being served"))
    q = c.table("quarantines", "Quarantines in the period",
                ["start", "end", "duration", "reason"])
    q.rows.extend(incidents["_quarantine_rows"])
    return drifts, q


def _signed_control(c: Control, i: Inputs, incidents: dict[str, Any]) -> Control:
    """The weights approved by an OpenSSF Model Signing signature: which signature and which
    signer approved the weights that served in the period, and every verification result."""
    cfg = i.cfg
    sig = cfg.integrity.signature
    assert sig is not None
    c.title = "Model weights against their signature"
    problems: list[tuple[str, str]] = []
    c.fact("signature", "Signature (integrity.signature)", str(sig))
    if cfg.integrity.public_key is not None:
        c.fact("public_key", "Signer's public key (integrity.public_key)",
               str(cfg.integrity.public_key))
    else:
        c.fact("certificate_chain", "Certificate chain (integrity.certificate_chain)",
               [str(p) for p in cfg.integrity.certificate_chain])
    try:
        now = hashing.hash_file(sig)
        c.fact("signature_sha256", "Signature SHA-256 (now)", now)
    except OSError as exc:
        now = None
        problems.append((FAIL, f"the signature cannot be read now: {exc.strerror or exc}"))
    results = i.history.in_period(i.period, "signature_verified")
    t = c.table("signature_checks", "Signature verifications in the period",
                ["time", "result", "signer", "signature sha256", "error"])
    t.rows.extend([e["ts"], e.get("result"), e.get("signer"), e.get("signature_sha256"),
                   e.get("error")] for e in results)
    approved = [e for e in results if e.get("result") == "ok"]
    a = c.table("approvals", "Signatures and signers that approved the weights served",
                ["signer", "signature sha256", "first", "last", "verifications"])
    seen: dict[tuple[str, str], list[str]] = {}
    for e in approved:
        seen.setdefault((str(e.get("signer")), str(e.get("signature_sha256"))), []).append(
            e["ts"])
    a.rows.extend([signer, digest, ts[0], ts[-1], len(ts)]
                  for (signer, digest), ts in seen.items())
    last_ok = i.history.last("signature_verified", where=lambda e: e.get("result") == "ok")
    if last_ok is None:
        problems.append((FAIL, "no verified signature is recorded: the weights were never "
                         "approved by their signature"))
    elif now is not None and last_ok.get("signature_sha256") != now:
        problems.append((WARN, "the signature file changed after the daemon last verified it"))
    full = i.history.last("integrity_verified", where=lambda e: e.get("scope") == "full")
    if full is None:
        problems.append((FAIL, "no full verification of the weights is recorded"))
    last_check(c, i, "integrity", problems, "the weights differ from their signature")
    drifts, q = _drift_tables(c, i, incidents, problems)
    refused = len(results) - len(approved)
    return conclude(c, problems, lambda: (
        f"weights approved by {len(seen)} signature/signer pair(s) "
        f"({', '.join(sorted({k[0] for k in seen})) or 'none in the period'}); "
        f"{len(approved)} verification(s) passed, {refused} refused; {len(drifts)} drift(s) "
        f"and {len(q.rows)} quarantine(s) in the period"))


