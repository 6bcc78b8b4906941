"""Client keys: the CLI that makes and revokes them, and the KeyStore the gateway checks."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import stat
from pathlib import Path
from typing import Any

import pytest

from sovereignd.gateway import keys
from sovereignd.gateway.keys import KeysFileError, KeyStore
from tests.helpers import run_cli

KEY_RE = re.compile(r"^sk-sov-[A-Za-z0-9_-]{43}$")


class Events:
    """Collects emitted events, standing in for EventLog.emit."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []

    def __call__(self, event: str, level: str = "info", **fields: Any) -> None:
        self.events.append((event, level, fields))

    def named(self, name: str) -> list[dict[str, Any]]:
        return [f for e, _, f in self.events if e == name]


class Ticker:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    path = tmp_path / "sovereignd.yaml"
    path.write_text(f"""
server:
  model: {tmp_path / "model"}
logs:
  dir: {tmp_path / "logs"}
daemon:
  state_dir: {tmp_path / "state"}
gateway:
  keys_file: {tmp_path / "etc" / "keys.json"}
""")
    return path


def keys_file(cfg: Path) -> Path:
    return cfg.parent / "etc" / "keys.json"


def usage_file(cfg: Path) -> Path:
    return cfg.parent / "state" / keys.USAGE_FILE_NAME


def add(cfg: Path, name: str, *extra: str) -> str:
    proc = run_cli("keys", "add", name, "--config", str(cfg), *extra)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_add_prints_a_prefixed_key_once_and_stores_only_its_hash(cfg: Path) -> None:
    proc = run_cli("keys", "add", "alice", "--config", str(cfg))
    assert proc.returncode == 0, proc.stderr
    key = proc.stdout.strip()
    assert KEY_RE.match(key)
    assert "only this once" in proc.stderr
    assert key not in proc.stderr
    path = keys_file(cfg)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert key not in text
    doc = json.loads(text)
    [entry] = doc["keys"]
    digest = hashlib.sha256(key.encode()).hexdigest()
    assert entry == {"name": "alice", "role": "client", "created": entry["created"],
                     "sha256": digest, "fingerprint": digest[:12], "revoked": None}
    assert entry["created"].endswith("Z")


def test_add_refuses_a_second_active_key_with_the_same_name(cfg: Path) -> None:
    add(cfg, "alice")
    proc = run_cli("keys", "add", "alice", "--config", str(cfg))
    assert proc.returncode == 1
    assert "an active key named 'alice' exists" in proc.stderr
    assert proc.stdout == ""


def test_add_rejects_an_invalid_name(cfg: Path) -> None:
    proc = run_cli("keys", "add", "-bad name", "--config", str(cfg))
    assert proc.returncode in (1, 2)
    proc = run_cli("keys", "add", "bad/name", "--config", str(cfg))
    assert proc.returncode == 1
    assert "invalid key name" in proc.stderr


def test_list_shows_names_roles_and_fingerprints_never_keys(cfg: Path) -> None:
    alice = add(cfg, "alice")
    ops = add(cfg, "ops@example.org", "--admin")
    proc = run_cli("keys", "list", "--config", str(cfg))
    assert proc.returncode == 0, proc.stderr
    assert alice not in proc.stdout and ops not in proc.stdout
    fp = hashlib.sha256(alice.encode()).hexdigest()[:12]
    assert re.search(rf"^alice\s+client\s+active\s+{fp}\s", proc.stdout, re.M)
    assert re.search(r"^ops@example.org\s+admin\s+active\s", proc.stdout, re.M)
    rows = json.loads(run_cli("keys", "list", "--config", str(cfg), "--json").stdout)
    assert [(r["name"], r["role"], r["state"], r["last_used"]) for r in rows] == [
        ("alice", "client", "active", None), ("ops@example.org", "admin", "active", None)]


def test_printed_key_authenticates_and_a_revoked_one_does_not(cfg: Path) -> None:
    key = add(cfg, "alice")
    events = Events()
    store = KeyStore(keys_file(cfg), usage_file(cfg), emit=events)
    store.load()
    client = store.authenticate(key)
    assert client is not None
    assert (client.name, client.role, client.is_admin) == ("alice", "client", False)

    proc = run_cli("keys", "revoke", "alice", "--config", str(cfg))
    assert proc.returncode == 0, proc.stderr
    assert store.reload()
    outcome = store.check(key)
    assert outcome.client is None
    assert outcome.reason == "revoked"
    assert outcome.log_fields() == {"reason": "revoked", "fingerprint": client.fingerprint,
                                    "key_name": "alice"}
    # The revoked entry stays for the audit trail, and the name can be given a new key.
    rows = json.loads(run_cli("keys", "list", "--config", str(cfg), "--json").stdout)
    assert [(r["name"], r["state"]) for r in rows] == [("alice", "revoked")]
    assert rows[0]["revoked"].endswith("Z")
    new = add(cfg, "alice")
    assert store.reload()
    assert store.authenticate(new) is not None
    assert store.authenticate(key) is None


def test_revoking_an_unknown_name_says_which_keys_exist(cfg: Path) -> None:
    add(cfg, "alice")
    proc = run_cli("keys", "revoke", "bob", "--config", str(cfg))
    assert proc.returncode == 1
    assert "no active key named 'bob'" in proc.stderr
    assert "alice" in proc.stderr


def test_admin_key_authenticates_as_admin(cfg: Path) -> None:
    key = add(cfg, "ops", "--admin")
    store = KeyStore(keys_file(cfg))
    store.load()
    client = store.authenticate(key)
    assert client is not None and client.is_admin


def test_changes_take_effect_without_restart_after_at_most_the_check_interval(
        tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    first, _ = keys.add_key(path, "alice")
    ticker = Ticker()
    store = KeyStore(path, emit=Events(), monotonic=ticker)
    store.load()
    second, _ = keys.add_key(path, "bob")
    # Within the interval the file is not even stat()ed: the new key is not known yet.
    assert store.authenticate(second) is None
    ticker.t += keys.RELOAD_CHECK_INTERVAL
    assert store.authenticate(second) is not None
    keys.revoke_key(path, "alice")
    assert store.authenticate(first) is not None
    ticker.t += keys.RELOAD_CHECK_INTERVAL
    assert store.authenticate(first) is None


def test_malformed_keys_file_keeps_the_last_good_set_and_says_what_is_wrong(
        tmp_path: Path, cfg: Path) -> None:
    path = keys_file(cfg)
    key = add(cfg, "alice")
    events = Events()
    store = KeyStore(path, emit=events)
    store.load()
    doc = json.loads(path.read_text())
    doc["keys"][0]["role"] = "root"
    path.write_text(json.dumps(doc))
    assert not store.reload()
    [failed] = events.named("keys.reload_failed")
    assert "role must be one of client, admin" in failed["problem"]
    assert str(path) in failed["problem"]
    assert store.authenticate(key) is not None

    path.write_text("{not json")
    assert not store.reload()
    assert "not valid JSON" in events.named("keys.reload_failed")[-1]["problem"]
    assert store.authenticate(key) is not None
    # At start there is no good set to keep: the error goes to the caller.
    with pytest.raises(KeysFileError, match="not valid JSON"):
        KeyStore(path).load()
    proc = run_cli("keys", "list", "--config", str(cfg))
    assert proc.returncode == 1
    assert str(path) in proc.stderr and "not valid JSON" in proc.stderr


@pytest.mark.parametrize(("mutate", "problem"), [
    (lambda d: d["keys"][0].update(sha256="x" * 64), "sha256 must be 64 lowercase hex"),
    (lambda d: d["keys"][0].update(fingerprint="000000000000"), "fingerprint does not match"),
    (lambda d: d["keys"].append(dict(d["keys"][0])), "the same key hash appears twice"),
    (lambda d: d["keys"][0].pop("created"), "missing created"),
    (lambda d: d.update(version=2), "\"version\": 1"),
])
def test_keys_file_problems_are_named(tmp_path: Path, mutate: Any, problem: str) -> None:
    path = tmp_path / "keys.json"
    keys.add_key(path, "alice")
    doc = json.loads(path.read_text())
    mutate(doc)
    path.write_text(json.dumps(doc))
    with pytest.raises(KeysFileError, match=re.escape(problem)):
        keys.read_keys(path)


def test_failed_authentications_are_counted_with_a_hash_fingerprint_only(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    keys.add_key(path, "alice")
    store = KeyStore(path)
    store.load()
    stranger = keys.new_key()
    outcome = store.check(stranger)
    assert outcome.reason == "unknown"
    assert outcome.fingerprint == hashlib.sha256(stranger.encode()).hexdigest()[:12]
    assert stranger not in str(outcome.log_fields())
    # Something that is not key-shaped (a pasted password?) gets no fingerprint at all.
    assert store.check("hunter2").log_fields() == {"reason": "malformed"}
    assert store.check(None).reason == "missing"
    assert store.check("").reason == "missing"
    assert store.failures == 4
    assert store.failures_by_reason == {"unknown": 1, "malformed": 1, "missing": 2}


def test_last_use_goes_to_the_state_file_and_shows_in_list(cfg: Path) -> None:
    key = add(cfg, "alice")
    add(cfg, "bob")
    store = KeyStore(keys_file(cfg), usage_file(cfg), clock=lambda: 1_800_000_000.7)
    store.load()
    assert store.authenticate(key) is not None
    store.flush_usage()
    assert stat.S_IMODE(usage_file(cfg).stat().st_mode) == 0o600
    rows = json.loads(run_cli("keys", "list", "--config", str(cfg), "--json").stdout)
    assert {r["name"]: r["last_used"] for r in rows} == {
        "alice": "2027-01-15T08:00:00.000Z", "bob": None}
    # Nothing changed since: no rewrite.
    mtime = usage_file(cfg).stat().st_mtime_ns
    store.flush_usage()
    assert usage_file(cfg).stat().st_mtime_ns == mtime


def test_usage_flusher_writes_once_more_when_stopped(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    key, _ = keys.add_key(path, "alice")
    usage = tmp_path / "state" / keys.USAGE_FILE_NAME
    store = KeyStore(path, usage)
    store.load()
    store.authenticate(key)

    async def scenario() -> None:
        stop = asyncio.Event()
        stop.set()
        await keys.usage_flusher(store, stop, interval=60)

    asyncio.run(scenario())
    assert list(keys.read_usage(usage)) == [keys.fingerprint_of_hash(keys.key_hash(key))]


def test_a_rewrite_keeps_the_install_group_readable_mode(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    keys.add_key(path, "alice")
    path.chmod(0o640)
    keys.add_key(path, "bob")
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    path.chmod(0o666)  # a careless hand edit, which the next rewrite must narrow
    keys.add_key(path, "carol")
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_the_key_appears_in_no_file_and_no_event(cfg: Path) -> None:
    key = add(cfg, "alice")
    events = Events()
    store = KeyStore(keys_file(cfg), usage_file(cfg), emit=events)
    store.load()
    assert store.authenticate(key) is not None
    store.check(key[:-1] + ("A" if key[-1] != "A" else "B"))
    store.flush_usage()
    for args in (("list",), ("list", "--json"), ("revoke", "alice")):
        proc = run_cli("keys", *args, "--config", str(cfg))
        assert key not in proc.stdout + proc.stderr
    store.reload()
    assert store.check(key).reason == "revoked"
    files = [p for p in cfg.parent.rglob("*") if p.is_file()]
    assert keys_file(cfg) in files and usage_file(cfg) in files
    for p in files:
        assert key.encode() not in p.read_bytes(), p
    assert key not in repr(events.events)


def test_the_keys_set_fingerprint_changes_with_a_scope_or_a_quota(tmp_path: Path) -> None:
    """Two hosts with the same keys but different model scopes or quotas enforce different
    things: their fingerprints differ; the file's formatting does not matter."""
    import dataclasses

    from sovereignd.gateway.quotas import Quota

    path = tmp_path / "keys.json"
    keys.add_key(path, "alice")
    entries = keys.read_keys(path)
    base = keys.set_fingerprint(entries)
    scoped = [dataclasses.replace(entries[0], models=("chat",))]
    limited = [dataclasses.replace(entries[0], quota=Quota(tokens_per_day=10))]
    assert len({base, keys.set_fingerprint(scoped), keys.set_fingerprint(limited)}) == 3
    path.write_text(json.dumps(json.loads(path.read_text()), indent=8))
    assert keys.set_fingerprint(keys.read_keys(path)) == base
