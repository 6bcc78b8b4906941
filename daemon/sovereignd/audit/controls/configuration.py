"""Controls of the configuration: file, listen addresses, offline mode, secrets."""

from __future__ import annotations

import hashlib
import re

from sovereignd.audit.inputs import Inputs
from sovereignd.audit.model import FAIL, INFO, PASS, SECTIONS, WARN, Control
from sovereignd.config import is_loopback
from sovereignd.gateway import keys as keys_mod
from sovereignd.gateway import keyscope
from sovereignd.logs import sealing
from sovereignd.supervision.models import model_config

OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
# Environment variable names whose values are secrets: shown only as fingerprints.
_SECRET_NAME = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL)", re.IGNORECASE)


def _fingerprint(secret: str) -> str:
    return "sha256:" + hashlib.sha256(secret.encode()).hexdigest()[:12]






def config_control(i: Inputs) -> Control:
    cfg = i.cfg
    c = Control("config", SECTIONS[1], "Configuration file", PASS,
                f"{cfg.source}, sha256 {cfg.digest[:16]}…")
    c.fact("path", "Path", str(cfg.source))
    c.fact("sha256", "SHA-256 (now)", cfg.digest)
    c.fact("model", "Model served", f"{cfg.model_name} <- {cfg.server.model}")
    c.fact("server_command", "Server command", " ".join(cfg.server.command))
    seen: dict[str, str] = {}
    for e in i.history.in_period(i.period, "daemon_start"):
        digest = e.get("config_sha256")
        if isinstance(digest, str):
            seen.setdefault(digest, e["ts"])
    t = c.table("runs", "Configuration of each daemon start in the period",
                ["first started", "config sha256", "same as now"])
    for digest, ts in seen.items():
        t.rows.append([ts, digest, digest == cfg.digest])
    other = [d for d in seen if d != cfg.digest]
    if other:
        c.verdict = WARN
        c.finding = (f"the configuration changed during the period: {len(other)} other "
                     f"version(s) ran ({', '.join(d[:16] + '…' for d in other)})")
    spawns = i.history.in_period(i.period, "spawn")
    if spawns:
        c.fact("last_argv", "Last server command line (as logged, redacted)",
               spawns[-1].get("argv"), " ".join(map(str, spawns[-1].get("argv") or [])))
    return c


def listen_control(i: Inputs) -> Control:
    cfg = i.cfg
    host, _port = cfg.listen
    # Each model's server (its own socket or port; the single `server:` form is one).
    servers = []
    for spec in cfg.models.values():
        view = model_config(cfg, spec)
        uds, s = view.server_uds, view.server
        servers.append((spec.name, f"unix:{uds}" if uds else f"{s.host}:{s.port}",
                        uds is not None or is_loopback(s.host), s.host))
    server_at = ", ".join(at if len(servers) == 1 else f"{name} {at}"
                          for name, at, _ok, _h in servers)
    c = Control("listen", SECTIONS[1], "Listen addresses", PASS,
                f"gateway {cfg.gateway.listen} and server {server_at} are loopback only")
    c.fact("gateway", "Gateway (the only door)", cfg.gateway.listen)
    c.fact("gateway_loopback", "Gateway on loopback", is_loopback(host))
    c.fact("server", "Model server", server_at)
    c.fact("server_loopback", "Server on loopback or a socket",
           all(ok for _n, _at, ok, _h in servers))
    c.fact("tls", "TLS", cfg.gateway.tls_cert is not None,
           f"certificate {cfg.gateway.tls_cert}" if cfg.gateway.tls_cert else "no (loopback)")
    problems = []
    if not is_loopback(host):
        problems.append(f"the gateway listens on {host}, reachable from the network"
                        + (" with TLS" if cfg.gateway.tls_cert else " WITHOUT TLS"))
    for name, _at, ok, server_host in servers:
        if not ok:
            problems.append(f"the model server{'' if len(servers) == 1 else ' of ' + name} "
                            f"listens on {server_host}: its unguarded routes (/invocations, "
                            "/tokenize) are reachable without the gateway")
    if problems:
        remote_server = not all(ok for _n, _at, ok, _h in servers)
        c.verdict = FAIL if remote_server or not cfg.gateway.tls_cert else WARN
        c.finding = "; ".join(problems)
    return c


def offline_control(i: Inputs) -> Control:
    env = i.cfg.server.env
    overridden = {k: env[k] for k in OFFLINE_VARS if k in env and env[k] not in ("1", "true")}
    c = Control("offline", SECTIONS[1], "Offline mode of the server", PASS, "")
    c.fact("required", "Required variables", list(OFFLINE_VARS),
           " ".join(f"{k}=1" for k in OFFLINE_VARS))
    spawns = i.history.in_period(i.period, "spawn")
    missing = [(e["ts"], [k for k in OFFLINE_VARS if k not in (e.get("env") or [])])
               for e in spawns]
    missing = [(ts, m) for ts, m in missing if m]
    c.fact("spawns", "Server starts in the period", len(spawns))
    c.fact("spawns_listing_all", "Starts whose logged environment names all three",
           len(spawns) - len(missing))
    if overridden:
        c.verdict = FAIL
        c.finding = ("server.env overrides the offline switches ("
                     + ", ".join(f"{k}={v}" for k, v in overridden.items())
                     + "): the server may fetch from a hub")
    elif not spawns:
        c.verdict = INFO
        c.finding = ("no server start in the period; the daemon sets "
                     + ", ".join(OFFLINE_VARS) + " to 1 at every start")
    elif missing:
        c.verdict = WARN
        c.finding = (f"{len(missing)} start(s) did not list every offline variable among the "
                     "variables the daemon added (they came from the daemon's own "
                     "environment, which the daemon overrides with 1)")
    else:
        c.finding = (f"all {len(spawns)} server start(s) in the period had "
                     + ", ".join(OFFLINE_VARS) + " set by the daemon")
    return c


def secrets_control(i: Inputs) -> Control:
    cfg = i.cfg
    c = Control("secrets", SECTIONS[1], "Secrets (fingerprints only)", PASS,
                "no secret is written in the configuration; keys are stored as hashes")
    secret_env = {k: v for k, v in cfg.server.env.items() if _SECRET_NAME.search(k)}
    t = c.table("server_env", "server.env (secret-looking values as fingerprints)",
                ["name", "value"])
    for k, v in sorted(cfg.server.env.items()):
        t.rows.append([k, _fingerprint(v) if k in secret_env else v])
    try:
        entries = keys_mod.read_keys(cfg.gateway.keys_file)
    except keys_mod.KeysFileError as exc:
        c.verdict = FAIL
        c.finding = str(exc)
        entries = []
    kt = c.table("client_keys", "Client keys (hashes stored; fingerprints shown)",
                 ["name", "role", "fingerprint", "created", "revoked", "models",
                  "quota (used now/limit)"])
    used = keyscope.used_from_records(cfg.logs.dir, [e.name for e in entries if e.active])
    for e in entries:
        kt.rows.append([e.name, e.role, e.fingerprint, e.created, e.revoked,
                        ",".join(e.models) if e.models is not None else "all",
                        keyscope.describe_quota(e.quota, used.get(e.name))])
    c.fact("internal_key", "Server's internal key",
           "fresh per start, passed in the environment, never logged")
    try:
        state = sealing.read_state(cfg.state_dir)
    except sealing.SealStateError as exc:
        state = None
        c.fact("sealing_key", "Request-log sealing key", None, f"unreadable: {exc}")
    else:
        c.fact("sealing_key_id", "Request-log sealing key id",
               state.key_id if state else None,
               f"{state.key_id} (epoch {state.epoch})" if state else "none on this machine")
        if state is not None:
            state.erase()
    if cfg.gateway.tls_key is not None:
        c.fact("tls_key", "TLS private key", str(cfg.gateway.tls_key))
    if secret_env and c.verdict == PASS:
        c.verdict = WARN
        c.finding = (f"server.env holds {len(secret_env)} secret-looking value(s) "
                     f"({', '.join(sorted(secret_env))}) in clear in the configuration file; "
                     "shown here only as fingerprints")
    return c


