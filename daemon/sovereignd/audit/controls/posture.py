"""Controls of the posture: file owners and modes, egress blocking."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from sovereignd.audit.evidence import account_label, owner
from sovereignd.audit.inputs import Inputs
from sovereignd.audit.model import FAIL, INFO, PASS, SECTIONS, WARN, Control
from sovereignd.config import Config
from sovereignd.logs import sealing
from sovereignd.service import guardrails, hostfacts


@dataclass(frozen=True)
class _Item:
    """A file or folder shown with its owner and mode, and what it must not be."""

    what: str
    path: Path | None
    kind: str           # "protected" (guards decide), "logs", "folder", "secret"
    required: bool = True


def _posture_items(cfg: Config) -> list[_Item]:
    named = {what: path for what, path in guardrails.protected_paths(cfg)}
    items = [_Item(what, path, "protected", required=what != "keys file")
             for what, path in named.items()]
    if cfg.integrity.manifest is None and cfg.integrity.signature is None:
        items.append(_Item("integrity manifest", None, "protected"))
    if cfg.environment.frozen is None:
        items.append(_Item("frozen environment", None, "protected"))
    items.append(_Item("logs folder", cfg.logs.dir, "logs"))
    if cfg.state_dir != cfg.logs.dir:
        items.append(_Item("state folder", cfg.state_dir, "folder"))
    items.append(_Item("sealing state", sealing.state_path(cfg.state_dir), "secret",
                       required=False))
    if cfg.gateway.tls_key is not None:
        items.append(_Item("TLS key", cfg.gateway.tls_key, "secret"))
    return items


def _judge_item(item: _Item, st: os.stat_result,
                problems: dict[str, guardrails.Problem]) -> tuple[str, str]:
    assert item.path is not None
    mode = stat.S_IMODE(st.st_mode)
    if item.kind == "protected":
        found = problems.pop(str(item.path), None)
        if found is not None:
            return FAIL, f"{found.message} — fix: {found.fix}"
        return PASS, "the service account cannot change it"
    if item.kind == "secret":
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            return FAIL, "readable by others than its owner: it holds a secret key"
        return PASS, "owner only"
    if mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
        return FAIL, "writable by every account"
    if item.kind == "logs" and mode & 0o007:
        return FAIL, ("open to every account: its files can hold prompt content (the daemon "
                      "refuses to start so) — fix: chmod o-rwx " + str(item.path))
    if mode & stat.S_IROTH:
        return WARN, "readable by every account"
    return PASS, "not open to other accounts"


def posture_control(i: Inputs) -> Control:
    """Owners and modes, judged by the daemon's own guard rails for the service account."""
    c = Control("file_posture", SECTIONS[2], "File owners and modes", PASS, "")
    t = c.table("files", "Files and folders", ["what", "path", "owner", "mode", "verdict",
                                                "why"])
    account = i.account
    if account is None:
        # Unknown account: judged as for root, i.e. whether any other account could change them.
        account = guardrails.Account("an unknown account", 0, frozenset())
        c.fact("service_account", "Judged for", None, "an unknown service account (no "
               "daemon.user, no daemon start recorded): whether any other account could "
               "change the files")
    else:
        c.fact("service_account", "Judged for", account.uid,
               f"{account_label(account)} (from {i.account_source})")
    problems = {p.path: p for p in guardrails.check_protected(i.cfg, account)}
    worst = PASS
    for item in _posture_items(i.cfg):
        if item.path is None:
            t.rows.append([item.what, None, None, None, WARN, "not configured"])
            worst = _worse(worst, WARN)
            continue
        try:
            st = item.path.stat()
        except FileNotFoundError:
            verdict = FAIL if item.required else WARN
            t.rows.append([item.what, str(item.path), None, None, verdict, "does not exist"])
            worst = _worse(worst, verdict)
            continue
        except OSError as exc:
            t.rows.append([item.what, str(item.path), None, None, WARN,
                           f"cannot be read: {exc.strerror or exc}"])
            worst = _worse(worst, WARN)
            continue
        verdict, why = _judge_item(item, st, problems)
        worst = _worse(worst, verdict)
        t.rows.append([item.what, str(item.path), owner(st), f"{stat.S_IMODE(st.st_mode):04o}",
                       verdict, why])
    # What is left are folders above the protected files (or their symlink targets).
    for path, p in problems.items():
        try:
            st = Path(path).stat()
        except OSError:
            continue
        t.rows.append(["folder above a protected file", path, owner(st),
                       f"{stat.S_IMODE(st.st_mode):04o}", FAIL, f"{p.message} — fix: {p.fix}"])
        worst = FAIL
    c.verdict = worst
    bad = [r for r in t.rows if r[4] in (FAIL, WARN)]
    c.finding = ("owners and modes as they should be: the service account cannot change what "
                 "approves its model, software and clients" if not bad else
                 "; ".join(f"{r[0]}: {str(r[5]).split(' — fix:')[0]}" for r in bad))
    return c


def _worse(a: str, b: str) -> str:
    order = {INFO: 0, PASS: 1, WARN: 2, FAIL: 3}
    return a if order[a] >= order[b] else b


def egress_control(i: Inputs) -> Control:
    uid = i.account.uid if i.account else None
    name = i.account.name if i.account else None
    found = hostfacts.egress(i.probe, i.launch, uid, name)
    c = Control("egress", SECTIONS[2], "Egress blocking", PASS, "")
    c.fact("checked", "Sources read", found.checked)
    c.fact("blocking", "Blocking rules found", found.blocking)
    if found.unreadable:
        c.fact("unreadable", "Sources present but not readable", found.unreadable)
    if found.blocked:
        c.finding = f"outbound traffic of the service is blocked: {found.blocking[0]}"
    elif found.checked:
        c.verdict = FAIL
        c.finding = ("no rule blocks the service's outbound traffic in "
                     + ", ".join(found.checked))
    else:
        c.verdict = WARN
        where = ("no pf anchor for sovereignd could be read" if i.probe.system == "Darwin"
                 else "no systemd unit, nft or iptables rules could be read")
        c.finding = (f"cannot be checked here: {where}"
                     + (f" ({'; '.join(found.unreadable)})" if found.unreadable else ""))
    return c


