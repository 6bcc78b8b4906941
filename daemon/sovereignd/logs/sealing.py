"""Forward-secure sealing of request records: the evolving key, its state file, the line format.

The idea is systemd's Forward Secure Sealing. `sovereignd logs init-key` makes a random 32-byte
key for epoch 0 and prints it once: the auditor keeps it elsewhere. The daemon seals each record
with HMAC-SHA256 under the key of the current epoch, and moves to the next epoch at every
rotation and at least every `requests.seal_interval`:

    key[n+1] = SHA-256("sovereignd-evolve" || key[n])

after which key[n] is overwritten in memory and replaced in the state file. Whoever takes the
machine later holds key[n] at best, which seals epoch n and later, never an earlier epoch; the
auditor derives every key from key[0].

Limits, stated plainly: the state file is replaced with `os.replace`, so the old key's bytes may
survive in free disk blocks (copy-on-write file systems, SSD wear levelling); Python copies the
key when hashing, so memory erasure is best effort. The exposure is bounded by the interval.

A sealed line is the record's JSON with `"seal"` as its last key, so the verifier recovers the
exact bytes that were sealed without re-serialising anything:

    {"ts":...,"seq":...,...,"prev":"<64 hex>","epoch":N,"seal":"<64 hex>"}

The sealed bytes are the line without `,"seal":"..."` (closed with `}`); `prev` of a record is
the SHA-256 of the whole previous line (seal included, newline excluded). Records written
without a key have `"epoch":null,"seal":null`.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from sovereignd.errors import SovereigndError
from sovereignd.fsutil import atomic_write
from sovereignd.logs.files import utc_timestamp

STATE_FILE_NAME = "requests-seal.json"
STATE_VERSION = 1
KEY_BYTES = 32
GENESIS_PREV = "0" * 64
_EVOLVE_LABEL = b"sovereignd-evolve"
_KEY_ID_LABEL = b"sovereignd-key-id"

_SEAL_OPEN = b',"seal":"'
_SEAL_CLOSE = b'"}'
_SEAL_NULL = b',"seal":null}'
SEALED_SUFFIX_LEN = len(_SEAL_OPEN) + 64 + len(_SEAL_CLOSE)
_HEX = frozenset(b"0123456789abcdef")


class SealStateError(SovereigndError):
    """The sealing state file is missing where required, unreadable or malformed."""


def evolve(key: bytes | bytearray) -> bytes:
    """The next epoch's key; one-way, so the previous key cannot be computed from it."""
    return hashlib.sha256(_EVOLVE_LABEL + key).digest()


def evolve_to(key: bytes, from_epoch: int, to_epoch: int) -> bytes:
    """Evolve `key` (of `from_epoch`) forward to `to_epoch`; going back is impossible."""
    if to_epoch < from_epoch:
        raise ValueError(f"cannot evolve a key back from epoch {from_epoch} to {to_epoch}")
    for _ in range(to_epoch - from_epoch):
        key = evolve(key)
    return key


def key_id(initial_key: bytes) -> str:
    """A public name for a key lineage (hash of its epoch-0 key), written into the records."""
    return hashlib.sha256(_KEY_ID_LABEL + initial_key).hexdigest()[:16]


def parse_key(text: str) -> bytes:
    """The 32-byte key from its 64-hex-digit form; raise ValueError with the expected form."""
    text = text.strip().lower()
    if len(text) != 2 * KEY_BYTES or not set(text.encode()) <= _HEX:
        raise ValueError(f"a verification key is {2 * KEY_BYTES} hexadecimal digits "
                         f"(as `sovereignd logs init-key` printed it); got {len(text)} characters")
    return bytes.fromhex(text)


def line_hash(line: bytes) -> str:
    """The hash that the next record carries as `prev`."""
    return hashlib.sha256(line).hexdigest()


def seal_bytes(key: bytes | bytearray, core: bytes) -> bytes:
    """The HMAC-SHA256 seal (hex, as bytes) of a record's sealed bytes."""
    return hmac.digest(key, core, "sha256").hex().encode()


def sealed_line(core: bytes, seal_hex: bytes | None) -> bytes:
    """Append the seal to a record's JSON (`core` ends with `}`), or an explicit null seal."""
    if seal_hex is None:
        return core[:-1] + _SEAL_NULL
    return core[:-1] + _SEAL_OPEN + seal_hex + _SEAL_CLOSE


def split_line(line: bytes) -> tuple[bytes, str | None]:
    """Split a line into (sealed bytes, seal hex or None if unsealed); ValueError if no seal."""
    if line.endswith(_SEAL_NULL):
        return line[:-len(_SEAL_NULL)] + b"}", None
    n = SEALED_SUFFIX_LEN
    if (len(line) > n and line.endswith(_SEAL_CLOSE)
            and line[-n:-n + len(_SEAL_OPEN)] == _SEAL_OPEN):
        seal = line[-n + len(_SEAL_OPEN):-len(_SEAL_CLOSE)]
        if set(seal) <= _HEX:
            return line[:-n] + b"}", seal.decode()
    raise ValueError("the record does not end with its seal")


def check_seal(key: bytes, core: bytes, seal_hex: str) -> bool:
    """True if `seal_hex` is the seal of `core` under `key` (constant-time comparison)."""
    return hmac.compare_digest(hmac.digest(key, core, "sha256").hex(), seal_hex)


# ---------------------------------------------------------------------------------------------
# The state file: the current key and its epoch, nothing older


@dataclass
class SealState:
    """The daemon's current sealing key. `key` is a bytearray so it can be overwritten."""

    key_id: str
    epoch: int
    key: bytearray
    updated: str

    def to_bytes(self) -> bytes:
        return orjson.dumps({"version": STATE_VERSION, "key_id": self.key_id, "epoch": self.epoch,
                             "key": self.key.hex(), "updated": self.updated}) + b"\n"

    def advance(self, clock: Callable[[], float] = time.time) -> None:
        """Evolve to the next epoch and overwrite the old key in place."""
        new = evolve(self.key)
        self.key[:] = new
        self.epoch += 1
        self.updated = utc_timestamp(clock())

    def erase(self) -> None:
        """Overwrite the key in memory (best effort: see the module docstring)."""
        self.key[:] = bytes(len(self.key))


def state_path(state_dir: Path) -> Path:
    return state_dir / STATE_FILE_NAME


def read_state(state_dir: Path) -> SealState | None:
    """The sealing state, or None if there is none; SealStateError if it is unusable."""
    path = state_path(state_dir)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise SealStateError(f"{path}: cannot read the sealing state: {exc.strerror or exc}; "
                             "the daemon's account must be able to read and replace it") from exc
    try:
        return _parse_state(orjson.loads(data))
    except (orjson.JSONDecodeError, TypeError, ValueError) as exc:
        raise SealStateError(
            f"{path}: the sealing state is damaged ({exc}); records cannot be sealed until it is "
            "replaced with `sovereignd logs init-key --force` (which starts a new key)") from exc


def _parse_state(raw: Any) -> SealState:
    if not isinstance(raw, dict) or raw.get("version") != STATE_VERSION:
        raise ValueError(f"expected an object with \"version\": {STATE_VERSION}")
    epoch, kid, key_hex = raw.get("epoch"), raw.get("key_id"), raw.get("key")
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise ValueError("epoch must be a non-negative integer")
    if not isinstance(kid, str) or len(kid) != 16:
        raise ValueError("key_id must be 16 hex digits")
    if not isinstance(key_hex, str):
        raise TypeError("key must be a string")
    key = parse_key(key_hex)
    return SealState(kid, epoch, bytearray(key), str(raw.get("updated", "")))


def write_state(state_dir: Path, state: SealState) -> None:
    """Replace the state file atomically (mode 0600): the previous key is gone from the file."""
    atomic_write(state_path(state_dir), state.to_bytes(), mode=0o600)


def init_key(state_dir: Path, force: bool = False,
             clock: Callable[[], float] = time.time) -> tuple[bytes, SealState]:
    """Make the epoch-0 key and its state file; return (key for the auditor, state)."""
    path = state_path(state_dir)
    if not force and path.exists():
        raise SealStateError(
            f"{path} exists: the request log is already sealed with a key the auditor holds. "
            "--force replaces it with a new key: records sealed so far stay verifiable only "
            "with the old verification key, and the log notes the change of key at the next "
            "start of the daemon")
    key = secrets.token_bytes(KEY_BYTES)
    state = SealState(key_id(key), 0, bytearray(key), utc_timestamp(clock()))
    write_state(state_dir, state)
    return key, state
