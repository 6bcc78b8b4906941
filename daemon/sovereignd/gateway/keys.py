"""Client keys: made and revoked by the operator's CLI, checked by the gateway on every request.

A key is `sk-sov-` followed by 43 characters of URL-safe base64 (32 random bytes). The keys file
(`gateway.keys_file`, JSON) holds, per key, only its SHA-256, a name, a role, when it was
created, a fingerprint (the first 12 hex digits of the hash, the same one the logs show) and
when it was revoked. Revoked entries stay in the file: an auditor asks who had access when, and
the answer must not disappear with the access.

Why plain SHA-256 and not a slow KDF: a slow KDF makes guessing low-entropy passwords expensive.
These keys carry 256 random bits; no guessing attack exists against their hash, and a fast hash
keeps the check per request in microseconds.

The operator's CLI writes the keys file (atomically, mode 0600 for a new file); the daemon only
reads it. An install that lets the service account read it through its group (root:_sovereignd
0640) keeps that group and mode across rewrites. "Last used" is the daemon's knowledge, so it
lives in a separate small file in `daemon.state_dir` (`keys-usage.json`) that the daemon writes
at most every few seconds, never per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import hashlib
import hmac
import os
import re
import secrets
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from sovereignd.errors import SovereigndError
from sovereignd.fsutil import atomic_write
from sovereignd.gateway.quotas import Quota, parse_quota
from sovereignd.gateway.scopes import check_models
from sovereignd.logs.eventlog import Emit, discard
from sovereignd.logs.files import utc_timestamp

KEY_PREFIX = "sk-sov-"
_KEY_RANDOM_BYTES = 32
# token_urlsafe(32) is 43 characters: base64 of 32 bytes without padding.
KEY_LENGTH = len(KEY_PREFIX) + 43
FINGERPRINT_HEX = 12
ROLES = ("client", "admin")
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
KEYS_FILE_VERSION = 1
USAGE_FILE_NAME = "keys-usage.json"
# The daemon's usage file is rewritten at most this often (seconds).
USAGE_FLUSH_INTERVAL = 5.0
# The keys file is stat()ed for changes at most this often (seconds).
RELOAD_CHECK_INTERVAL = 1.0

_HEX = frozenset("0123456789abcdef")


class KeysFileError(SovereigndError):
    """The keys file cannot be read or is malformed; the message names the file and the problem."""


class KeyNameError(SovereigndError):
    """A key name is invalid, already active, or unknown."""


# ---------------------------------------------------------------------------------------------
# Keys and their hashes


def new_key() -> str:
    """A fresh client key: the recognisable prefix and 256 random bits."""
    return KEY_PREFIX + secrets.token_urlsafe(_KEY_RANDOM_BYTES)


def key_hash(key: str) -> str:
    """The SHA-256 (hex) under which a key is stored and looked up."""
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def fingerprint_of_hash(digest: str) -> str:
    """The short, loggable name of a key: the first 12 hex digits of its hash."""
    return digest[:FINGERPRINT_HEX]


def looks_like_key(presented: str) -> bool:
    """True if `presented` has the shape of a sovereignd key (prefix and length)."""
    return len(presented) == KEY_LENGTH and presented.startswith(KEY_PREFIX)


def validate_name(name: str) -> str:
    """Return `name` if it is a valid key name, else raise KeyNameError saying what is allowed."""
    if not NAME_PATTERN.fullmatch(name):
        raise KeyNameError(
            f"invalid key name {name!r}: use 1 to 64 letters, digits and . _ @ -, "
            "starting with a letter or digit")
    return name


# ---------------------------------------------------------------------------------------------
# The keys file


@dataclass(frozen=True)
class KeyEntry:
    """One key as the keys file stores it: never the key itself, only its hash."""

    name: str
    role: str
    created: str
    sha256: str
    fingerprint: str
    revoked: str | None = None
    # The models the key may use (None: every model) and its quotas (gateway/scopes.py,
    # gateway/quotas.py); both optional in the file, so files written before them still load.
    models: tuple[str, ...] | None = None
    quota: Quota = Quota()

    @property
    def active(self) -> bool:
        return self.revoked is None

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "name": self.name, "role": self.role, "created": self.created, "sha256": self.sha256,
            "fingerprint": self.fingerprint, "revoked": self.revoked}
        if self.models is not None:
            doc["models"] = list(self.models)
        if not self.quota.unlimited:
            doc["quota"] = self.quota.to_json()
        return doc


_ENTRY_FIELDS = ("name", "role", "created", "sha256", "fingerprint", "revoked")
_OPTIONAL_FIELDS = ("models", "quota")


def _parse_entry(raw: object, where: str) -> KeyEntry:
    if not isinstance(raw, dict):
        raise TypeError(f"{where}: expected an object, got {type(raw).__name__}")
    missing = [k for k in _ENTRY_FIELDS if k not in raw]
    if missing:
        raise ValueError(f"{where}: missing {', '.join(missing)}")
    extra = sorted(set(raw) - set(_ENTRY_FIELDS) - set(_OPTIONAL_FIELDS))
    if extra:
        raise ValueError(f"{where}: unknown field(s) {', '.join(extra)}")
    name, role, created = raw["name"], raw["role"], raw["created"]
    digest, fp, revoked = raw["sha256"], raw["fingerprint"], raw["revoked"]
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise ValueError(f"{where}: invalid name {name!r}")
    if role not in ROLES:
        raise ValueError(f"{where} ({name}): role must be one of {', '.join(ROLES)}, got {role!r}")
    if not isinstance(created, str) or not created:
        raise ValueError(f"{where} ({name}): created must be a UTC time string")
    if not isinstance(digest, str) or len(digest) != 64 or not set(digest) <= _HEX:
        raise ValueError(f"{where} ({name}): sha256 must be 64 lowercase hex digits")
    if fp != fingerprint_of_hash(digest):
        raise ValueError(f"{where} ({name}): fingerprint does not match sha256")
    if revoked is not None and (not isinstance(revoked, str) or not revoked):
        raise ValueError(f"{where} ({name}): revoked must be null or a UTC time string")
    return KeyEntry(name, role, created, digest, fp, revoked,
                    check_models(raw.get("models"), f"{where} ({name})"),
                    parse_quota(raw.get("quota"), f"{where} ({name})"))


def parse_keys(data: bytes, source: Path) -> list[KeyEntry]:
    """Parse and check keys-file bytes; raise KeysFileError naming the first problem."""
    try:
        return _parse_document(orjson.loads(data))
    except orjson.JSONDecodeError as exc:
        raise KeysFileError(f"{source}: not valid JSON ({exc}); fix the file or restore it, "
                            "then `sovereignd keys list` to check") from exc
    except (TypeError, ValueError) as exc:
        raise KeysFileError(f"{source}: {exc}; fix the file or restore it, then "
                            "`sovereignd keys list` to check") from exc


def _parse_document(raw: object) -> list[KeyEntry]:
    if not isinstance(raw, dict) or raw.get("version") != KEYS_FILE_VERSION:
        raise ValueError(f"expected an object with \"version\": {KEYS_FILE_VERSION}")
    items = raw.get("keys")
    if not isinstance(items, list):
        raise TypeError("\"keys\" must be a list")
    entries = [_parse_entry(item, f"keys[{i}]") for i, item in enumerate(items)]
    active: set[str] = set()
    hashes: set[str] = set()
    for e in entries:
        if e.sha256 in hashes:
            raise ValueError(f"the same key hash appears twice ({e.fingerprint})")
        hashes.add(e.sha256)
        if e.active:
            if e.name in active:
                raise ValueError(f"two active keys are named {e.name!r}")
            active.add(e.name)
    return entries


def set_fingerprint(entries: list[KeyEntry]) -> str:
    """A fingerprint of a whole set of keys (16 hex digits): equal on two hosts exactly when
    they accept the same keys under the same names and roles, with the same revocations, model
    scopes and quotas, however the files were formatted. `keys list` shows the file's; /status
    the loaded set's."""
    canonical = sorted([e.sha256, e.name, e.role, e.created, e.revoked or "",
                        sorted(e.models) if e.models is not None else None,
                        e.quota.to_json()] for e in entries)
    return hashlib.sha256(orjson.dumps(canonical)).hexdigest()[:16]


def read_keys(path: Path) -> list[KeyEntry]:
    """The entries of the keys file; an absent file has none."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise KeysFileError(f"{path}: cannot read the keys file: {exc.strerror or exc}") from exc
    return parse_keys(data, path)


def write_keys(path: Path, entries: list[KeyEntry]) -> None:
    """Write the keys file atomically, keeping an existing file's group and a stricter mode."""
    mode, gid = 0o600, -1
    try:
        st = path.stat()
    except FileNotFoundError:
        pass
    else:
        # An install may make the file root:<service group> 0640 so the daemon can read but
        # not write it; a rewrite must keep that, but never widen access beyond 0640.
        mode = stat.S_IMODE(st.st_mode) & 0o640 or 0o600
        gid = st.st_gid
    doc = {"version": KEYS_FILE_VERSION, "keys": [e.to_json() for e in entries]}
    atomic_write(path, orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n", mode=mode)
    if gid != -1 and gid != path.stat().st_gid:
        with contextlib.suppress(PermissionError):
            os.chown(path, -1, gid)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    # Two operators running `keys add` at once must not lose one of the additions.
    lock = path.with_name(f".{path.name}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def add_key(path: Path, name: str, role: str = "client",
            clock: Callable[[], float] = time.time, *, models: tuple[str, ...] | None = None,
            quota: Quota | None = None) -> tuple[str, KeyEntry]:
    """Make a key named `name`, store its hash, and return (key, entry). The key is not kept."""
    validate_name(name)
    if role not in ROLES:
        raise KeyNameError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    with _locked(path):
        entries = read_keys(path)
        if any(e.name == name and e.active for e in entries):
            raise KeyNameError(f"an active key named {name!r} exists; revoke it first "
                               f"(`sovereignd keys revoke {name}`) or choose another name")
        key = new_key()
        digest = key_hash(key)
        entry = KeyEntry(name, role, utc_timestamp(clock()), digest, fingerprint_of_hash(digest),
                         models=models, quota=quota or Quota())
        write_keys(path, [*entries, entry])
    return key, entry


def revoke_key(path: Path, name: str, clock: Callable[[], float] = time.time) -> KeyEntry:
    """Mark the active key `name` revoked (kept in the file for the audit trail)."""
    validate_name(name)
    with _locked(path):
        entries = read_keys(path)
        for i, e in enumerate(entries):
            if e.name == name and e.active:
                revoked = dataclasses.replace(e, revoked=utc_timestamp(clock()))
                entries[i] = revoked
                write_keys(path, entries)
                return revoked
    raise _no_active_key(path, name, entries)


def _no_active_key(path: Path, name: str, entries: list[KeyEntry]) -> KeyNameError:
    known = sorted({e.name for e in entries if e.active})
    hint = f"active keys: {', '.join(known)}" if known else "there are no active keys"
    return KeyNameError(f"no active key named {name!r} in {path} ({hint})")


UNCHANGED: Any = object()


def set_key(path: Path, name: str, *, models: tuple[str, ...] | None = UNCHANGED,
            quota: dict[str, int | None] | None = None) -> KeyEntry:
    """Change the scope (`models`; None: every model) and quota limits (`quota`: limit name
    -> value, None removing it) of the active key `name`; a running daemon applies the
    change within a second (its keys-file reload)."""
    validate_name(name)
    with _locked(path):
        entries = read_keys(path)
        for i, e in enumerate(entries):
            if e.name == name and e.active:
                changed = dataclasses.replace(
                    e, models=e.models if models is UNCHANGED else models,
                    quota=e.quota.changed(quota or {}))
                entries[i] = changed
                write_keys(path, entries)
                return changed
    raise _no_active_key(path, name, entries)


# ---------------------------------------------------------------------------------------------
# Last use, kept by the daemon


def read_usage(path: Path) -> dict[str, str]:
    """Fingerprint -> last use (UTC) from the daemon's usage file; absent or unreadable: empty."""
    try:
        raw = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return {}
    used = raw.get("last_used") if isinstance(raw, dict) else None
    if not isinstance(used, dict):
        return {}
    return {k: v for k, v in used.items() if isinstance(k, str) and isinstance(v, str)}


def write_usage(path: Path, last_used: dict[str, str]) -> None:
    """Write the usage file atomically (the daemon's own state, mode 0600)."""
    atomic_write(path, orjson.dumps({"version": 1, "last_used": last_used}) + b"\n", mode=0o600)


@dataclass(frozen=True)
class KeyListing:
    """One row of `sovereignd keys list`: everything about a key except the key."""

    name: str
    role: str
    created: str
    last_used: str | None
    fingerprint: str
    state: str
    revoked: str | None
    models: tuple[str, ...] | None = None
    quota: Quota = Quota()

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "role": self.role, "created": self.created,
                "last_used": self.last_used, "fingerprint": self.fingerprint,
                "state": self.state, "revoked": self.revoked,
                "models": list(self.models) if self.models is not None else None,
                "quota": self.quota.to_json()}


def list_keys(path: Path, usage_path: Path | None) -> list[KeyListing]:
    """Every key in the file (revoked ones too), with its last use when the daemon recorded it."""
    usage = read_usage(usage_path) if usage_path is not None else {}
    return [KeyListing(e.name, e.role, e.created, usage.get(e.fingerprint), e.fingerprint,
                       "active" if e.active else "revoked", e.revoked, e.models, e.quota)
            for e in read_keys(path)]


# ---------------------------------------------------------------------------------------------
# The gateway's view


@dataclass(frozen=True)
class Client:
    """An authenticated caller: what the gateway, the metrics and the request records name."""

    name: str
    role: str
    fingerprint: str
    models: frozenset[str] | None = None
    quota: Quota = Quota()

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


@dataclass(frozen=True)
class AuthOutcome:
    """The result of checking a presented key, with what may be logged about a failure."""

    client: Client | None
    # "ok", "missing", "malformed", "unknown" or "revoked".
    reason: str
    # Hash-derived, never the key; None when the presented string is not key-shaped (it might
    # be a password pasted by mistake, whose short hash should not land in logs).
    fingerprint: str | None = None
    # The name of a revoked key that was presented, so the operator sees who still uses it.
    revoked_name: str | None = None

    def log_fields(self) -> dict[str, Any]:
        """Fields for an `auth.failed` event: reason, fingerprint, revoked key name."""
        fields: dict[str, Any] = {"reason": self.reason}
        if self.fingerprint is not None:
            fields["fingerprint"] = self.fingerprint
        if self.revoked_name is not None:
            fields["key_name"] = self.revoked_name
        return fields


@dataclass
class _Loaded:
    by_hash: dict[str, KeyEntry] = field(default_factory=dict)
    signature: tuple[int, int, int, int] | None = None
    # One Client per active key, made once per load rather than per request.
    clients: dict[str, Client] = field(default_factory=dict)
    fingerprint: str = set_fingerprint([])


class KeyStore:
    """The gateway's view of the keys file: authenticates keys, reloads on change, counts failures.

    Lookup is by the SHA-256 of the presented key in a dict, then `hmac.compare_digest` on the
    stored hash. A dict lookup's timing depends on the hash of what was presented, not on how
    close it is to a real key: learning "which hash prefixes are stored" gives no way to find a
    key with that hash. Comparing against every stored hash in turn would cost O(keys) per
    request for no gain.
    """

    def __init__(self, path: Path, usage_path: Path | None = None, *,
                 emit: Emit = discard,
                 clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic,
                 check_interval: float = RELOAD_CHECK_INTERVAL,
                 stat_file: Callable[[Path], os.stat_result] = os.stat) -> None:
        self.path = path
        self.usage_path = usage_path
        self._emit = emit
        self._clock = clock
        self._monotonic = monotonic
        self._check_interval = check_interval
        self._stat = stat_file
        self._loaded = _Loaded()
        self._next_check = 0.0
        self._last_used: dict[str, str] = {}
        self._usage_dirty = False
        self._stamp_second = -1
        self._stamp = ""
        self.failures = 0
        self.failures_by_reason: dict[str, int] = {}

    def load(self) -> None:
        """First load at start: a malformed file raises KeysFileError (there is no good set yet)."""
        self._loaded = self._read()
        self._next_check = self._monotonic() + self._check_interval
        if self.usage_path is not None:
            self._last_used = read_usage(self.usage_path)
        active = sum(1 for e in self._loaded.by_hash.values() if e.active)
        self._emit("keys.loaded", file=str(self.path), active=active,
                   fingerprint=self._loaded.fingerprint)
        if active == 0:
            self._emit("keys.none", level="warning", file=str(self.path),
                       hint="every API request gets 401; add a key with `sovereignd keys add`")

    @property
    def fingerprint(self) -> str:
        """set_fingerprint of the keys in effect (compare across hosts)."""
        return self._loaded.fingerprint

    def _signature(self) -> tuple[int, int, int, int] | None:
        try:
            st = self._stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_dev, st.st_mtime_ns, st.st_size)

    def _read(self) -> _Loaded:
        signature = self._signature()
        entries = read_keys(self.path) if signature is not None else []
        clients = {e.sha256: Client(e.name, e.role, e.fingerprint,
                                    None if e.models is None else frozenset(e.models), e.quota)
                   for e in entries if e.active}
        return _Loaded({e.sha256: e for e in entries}, signature, clients,
                       set_fingerprint(entries))

    def reload(self) -> bool:
        """Re-read the keys file if it changed; on a bad file keep the last good set and log.

        Returns True if a new set of keys took effect.
        """
        self._next_check = self._monotonic() + self._check_interval
        signature = self._signature()
        if signature == self._loaded.signature:
            return False
        try:
            loaded = self._read()
        except KeysFileError as exc:
            # Remember the bad file's signature so it is not re-parsed every second; the next
            # change (the operator's fix) is picked up.
            self._loaded.signature = signature
            self._emit("keys.reload_failed", level="error", file=str(self.path),
                       problem=str(exc), kept=len(self._loaded.by_hash))
            return False
        if loaded.signature is None:
            self._emit("keys.file_missing", level="error", file=str(self.path),
                       hint="no key is accepted until the file is restored")
        self._loaded = loaded
        self._emit("keys.reloaded", file=str(self.path),
                   active=sum(1 for e in loaded.by_hash.values() if e.active),
                   fingerprint=loaded.fingerprint)
        return True

    def check(self, presented: str | None) -> AuthOutcome:
        """Check a presented key and say why it failed; counts failures."""
        if self._monotonic() >= self._next_check:
            self.reload()
        if not presented:
            return self._fail(AuthOutcome(None, "missing"))
        if not looks_like_key(presented):
            return self._fail(AuthOutcome(None, "malformed"))
        digest = key_hash(presented)
        fp = fingerprint_of_hash(digest)
        entry = self._loaded.by_hash.get(digest)
        if entry is None or not hmac.compare_digest(entry.sha256, digest):
            return self._fail(AuthOutcome(None, "unknown", fp))
        if not entry.active:
            return self._fail(AuthOutcome(None, "revoked", fp, entry.name))
        # Last use is kept to the second: finer adds nothing, and the text is made once a second.
        second = int(self._clock())
        if second != self._stamp_second:
            self._stamp_second, self._stamp = second, utc_timestamp(float(second))
        self._last_used[fp] = self._stamp
        self._usage_dirty = True
        return AuthOutcome(self._loaded.clients[digest], "ok", fp)

    def authenticate(self, presented: str | None) -> Client | None:
        """The client a presented key belongs to, or None (missing, unknown or revoked)."""
        return self.check(presented).client

    def _fail(self, outcome: AuthOutcome) -> AuthOutcome:
        self.failures += 1
        self.failures_by_reason[outcome.reason] = self.failures_by_reason.get(outcome.reason, 0) + 1
        return outcome

    def clients(self) -> list[Client]:
        """The active clients, for metrics labels and /status."""
        return list(self._loaded.clients.values())

    def take_usage(self) -> dict[str, str] | None:
        """A copy of last-use times if they changed since the last call, else None."""
        if not self._usage_dirty:
            return None
        self._usage_dirty = False
        return dict(self._last_used)

    def flush_usage(self) -> None:
        """Write last-use times now if they changed (blocking; the daemon uses `usage_flusher`)."""
        snapshot = self.take_usage()
        if snapshot is not None and self.usage_path is not None:
            write_usage(self.usage_path, snapshot)


async def usage_flusher(store: KeyStore, stop: asyncio.Event,
                        interval: float = USAGE_FLUSH_INTERVAL) -> None:
    """Write the store's last-use times every `interval` while they change, and once at stop."""
    while True:
        stopping = False
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval)
            stopping = True
        snapshot = store.take_usage()
        if snapshot is not None and store.usage_path is not None:
            try:
                await asyncio.to_thread(write_usage, store.usage_path, snapshot)
            except OSError as exc:
                store._emit("keys.usage_write_failed", level="warning",
                            file=str(store.usage_path), error=exc.strerror or str(exc))
        if stopping:
            return
