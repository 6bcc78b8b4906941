"""The daemon's guard rails, checked before anything starts: who it runs as, and that what
approves its model and software cannot be changed by the account it runs as.

The configuration, the client keys, the weights manifest and the frozen environment (with its
checksum) decide what the daemon serves and to whom. If the service account could rewrite
them, a compromised server could approve its own drift. So each of them, and every directory
above them, must not be writable by the account: not owned by it (an owner can always chmod),
not group-writable by one of its groups, not world-writable (a sticky directory such as /tmp
is fine when the entry below it belongs to someone else), and not writable through an ACL.
Root can write anything, so when the daemon is allowed to run as root the question becomes
whether anyone else can write them. The log directory must not be readable by others: request
records and server output can hold prompt content.

A problem is a refusal with exit status 78 (EX_CONFIG): the host is configured wrongly, the
same class of error as a bad configuration file, and systemd's RestartPreventExitStatus=78
keeps it from restarting in a loop.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path

from sovereignd.config import Config
from sovereignd.errors import SovereigndError, UnsafeHost
from sovereignd.integrity import software


@dataclass(frozen=True)
class Account:
    """The account whose power over the files is judged: name, uid and all its groups."""

    name: str
    uid: int
    gids: frozenset[int]

    @classmethod
    def current(cls) -> Account:
        uid = os.geteuid()
        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            name = f"uid {uid}"
        return cls(name, uid, frozenset({os.getegid(), *os.getgroups()}))

    @classmethod
    def named(cls, name: str) -> Account:
        """The account called `name`, with its primary and supplementary groups."""
        try:
            entry = pwd.getpwnam(name)
        except KeyError as exc:
            raise SovereigndError(f"there is no account named {name!r} on this host (see "
                                  "daemon.user)") from exc
        gids = {entry.pw_gid, *(g.gr_gid for g in grp.getgrall() if name in g.gr_mem)}
        return cls(name, entry.pw_uid, frozenset(gids))


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the host: the path, what is wrong, and the command that fixes it."""

    path: str
    message: str
    fix: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message} — fix: {self.fix}"


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def protected_paths(cfg: Config) -> list[tuple[str, Path]]:
    """The files that decide what the daemon serves, by what they are."""
    out = [("configuration", cfg.source), ("keys file", cfg.gateway.keys_file)]
    if cfg.integrity.manifest is not None:
        out.append(("integrity manifest", cfg.integrity.manifest))
    # Whoever can replace the signer's key can approve any weights: the key (or chain) is
    # protected like a manifest; the signature itself is tamper-evident.
    if cfg.integrity.public_key is not None:
        out.append(("model signer's public key", cfg.integrity.public_key))
    for n, cert in enumerate(cfg.integrity.certificate_chain):
        out.append((f"model signer's certificate chain {n + 1}", cert))
    if cfg.environment.frozen is not None:
        frozen = cfg.environment.frozen
        out.append(("frozen environment", frozen))
        out.append(("frozen environment checksum", frozen.with_name(frozen.name + ".sha256")))
        if cfg.environment.files_check:
            out.append(("software manifest", software.path_for_frozen(frozen)))
    own = cfg.daemon.software_manifest
    if own is not None:
        out.append(("daemon software manifest", own))
        out.append(("daemon software manifest checksum", own.with_name(own.name + ".sha256")))
    return out


def _can_change(path: Path, st: os.stat_result, account: Account, child: os.stat_result | None,
                use_access: bool) -> tuple[str, str] | None:
    """Why `account` can change `path` (a file, or a directory above one), and the fix."""
    mode = stat.S_IMODE(st.st_mode)
    is_dir = stat.S_ISDIR(st.st_mode)
    what = f"mode {mode:04o}, owner {_user(st.st_uid)}:{_group(st.st_gid)}"
    # In a sticky directory (such as /tmp) only an entry's owner may rename or remove it.
    sticky_safe = (is_dir and bool(mode & stat.S_ISVTX) and child is not None
                   and (child.st_uid == 0 if account.uid == 0 else child.st_uid != account.uid))
    if account.uid == 0:
        if mode & 0o002 and not sticky_safe:
            return f"is writable by every account ({what})", f"chmod o-w {path}"
        if mode & 0o020 and st.st_gid != 0 and not sticky_safe:
            return (f"is writable by group {_group(st.st_gid)} ({what})", f"chmod g-w {path}")
        return None
    if st.st_uid == account.uid:
        return (f"is owned by {account.name}, which can therefore change it ({what})",
                f"chown root {path} && chmod go-w {path}")
    if mode & 0o020 and st.st_gid in account.gids and not sticky_safe:
        return (f"is writable by group {_group(st.st_gid)}, which {account.name} is in "
                f"({what})", f"chmod g-w {path}")
    if mode & 0o002 and not sticky_safe:
        return f"is writable by every account ({what})", f"chmod o-w {path}"
    if use_access and not sticky_safe and os.access(path, os.W_OK):
        return (f"is writable by {account.name} through an access-control list ({what})",
                f"remove that entry (Linux: setfacl -b {path}; macOS: chmod -N {path})")
    return None


def check_protected(cfg: Config, account: Account) -> list[Problem]:
    """Every protected file, and every directory above it, that `account` could change."""
    use_access = account.uid == os.geteuid() and account.uid != 0
    problems: dict[str, Problem] = {}
    chains = []
    for what, given in protected_paths(cfg):
        # The path as written (whoever can replace a symlink on it matters) and where it leads.
        for path in dict.fromkeys((Path.cwd() / given, given.resolve())):
            chains.append((what, path))
    for what, path in chains:
        child: os.stat_result | None = None
        # The file itself (when it exists), then each directory up to /.
        for node in (path, *path.parents):
            try:
                st = node.stat()
            except FileNotFoundError:
                child = None
                continue
            except OSError:
                break
            found = _can_change(node, st, account, child, use_access)
            if found is not None and str(node) not in problems:
                why, fix = found
                label = what if node == path else f"folder of the {what}"
                problems[str(node)] = Problem(str(node), f"the {label} {why}", fix)
            child = st
    return list(problems.values())


def check_logs(cfg: Config) -> list[Problem]:
    """The log folder must not be readable by others: its records can hold prompt content."""
    try:
        st = cfg.logs.dir.stat()
    except OSError:
        return []  # the daemon creates it with mode 0750
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o007:
        return [Problem(str(cfg.logs.dir), f"the log folder is open to every account (mode "
                        f"{mode:04o}); its files can hold prompt content",
                        f"chmod o-rwx {cfg.logs.dir}")]
    return []


def check_identity(cfg: Config, account: Account, allow_root: bool) -> list[Problem]:
    """Root only when told so; the configured account when daemon.user names one."""
    problems = []
    if account.uid == 0 and not (allow_root or cfg.daemon.allow_root):
        problems.append(Problem(
            "account", "the daemon is running as root; a production daemon runs as its own "
            "unprivileged account, so that a compromised model server can read its model and "
            "write its logs and nothing else",
            "start it as the service account (launchd UserName, systemd User=; see the "
            "README's Production install), or pass --allow-root / set daemon.allow_root: true "
            "if running as root is intended (a demo, a disposable container)"))
    user = cfg.daemon.user
    if user is not None and user != account.name:
        problems.append(Problem(
            "account", f"daemon.user is {user}, but the daemon runs as {account.name} "
            f"(uid {account.uid})", f"start it as {user} (launchd UserName, systemd User=), "
            "or correct daemon.user"))
    return problems


def check(cfg: Config, account: Account, allow_root: bool) -> list[Problem]:
    """Everything the guard rails refuse, for `account`."""
    return (check_identity(cfg, account, allow_root) + check_protected(cfg, account)
            + check_logs(cfg))


def enforce(cfg: Config, allow_root: bool) -> None:
    """Raise UnsafeHost unless this process may run the daemon as configured."""
    problems = check(cfg, Account.current(), allow_root)
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise UnsafeHost(f"refusing to start: {len(problems)} problem(s) with how this host "
                         f"is set up:\n{lines}")


def account_for_check(cfg: Config) -> Account:
    """Whose view `sovereignd check` takes: daemon.user's when set (an operator runs `check`
    as root before the service runs as its account), else the current account's."""
    if cfg.daemon.user is not None:
        return Account.named(cfg.daemon.user)
    return Account.current()
