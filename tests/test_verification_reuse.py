"""A server venv verified in full is not hashed again for the next start while nothing under it
changed (integrity.reuse): a second model on the same venv and an on_demand model's next
start reuse the verification, and say so; a file changed in between means the full
verification, and drift quarantines as before."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sovereignd.integrity.reuse import Verifications, fingerprint
from tests.harness import Daemon, free_port, http
from tests.helpers import run_cli, wait_for
from tests.venvtools import PyEnv, site_packages

pytest_plugins = ("tests.pyenvs",)

MakeDaemon = Callable[..., Daemon]
EMBED = {"model": "embed", "input": "hello"}


def shared_venv_daemon(make_daemon: MakeDaemon, pyenv: PyEnv,
                       chat_env: dict[str, Any] | None = None) -> tuple[Daemon, Path]:
    """chat (start: always) and embed (on_demand, idle_stop 1 s) from one copy of a real venv,
    approved by one frozen baseline (on_drift: stop)."""
    d = make_daemon()
    venv = pyenv.copy(d.root / "server-venv")
    frozen = str(d.root / "baseline" / "server-requirements.txt")
    control = d.root / "control-embed.json"
    control.write_text(json.dumps({"default": {}}))
    server = {**d.cfg.pop("server"), "venv": str(venv)}
    env = {"frozen": frozen, "on_drift": "stop"}
    d.cfg["models"] = {
        "chat": {"server": server, "environment": {**env, **(chat_env or {})}},
        "embed": {"server": {**server, "port": free_port(),
                             "args": ["--runner", "pooling", "--convert", "embed"],
                             "env": {"FAKE_VLLM_CONTROL": str(control)}},
                  "environment": env, "start": "on_demand", "idle_stop": "1s"}}
    d.write_config()
    res = run_cli("baseline", "--config", str(d.config_path))
    assert res.returncode == 0, res.stdout + res.stderr
    d.client_key = run_cli("keys", "add", "alice", "--config",
                           str(d.config_path)).stdout.strip()
    d.start()
    wait_for(lambda: d.status()["models"]["chat"]["state"] == "READY", 30, what="chat READY")
    return d, venv


def embed(d: Daemon) -> int:
    status, _, _ = http("POST", d.url + "/v1/embeddings", EMBED,
                        {"Authorization": f"Bearer {d.client_key}"}, timeout=30)
    return status


def verified(d: Daemon, model: str) -> list[dict[str, Any]]:
    return [e for e in d.events("environment_verified") if e.get("model") == model]


def test_an_unchanged_shared_venv_is_not_hashed_again_by_later_starts(
        make_daemon: MakeDaemon, pyenv: PyEnv) -> None:
    d, _venv = shared_venv_daemon(make_daemon, pyenv)
    [full] = verified(d, "chat")
    assert full["scope"] == "full" and full["record_files"] > 0
    for start in (1, 2):  # the first start, and the next one after an idle stop
        assert embed(d) == 200
        scopes = [e["scope"] for e in verified(d, "embed")]
        assert scopes == ["reused"] * start  # no full verification: nothing was hashed
        check = d.status()["models"]["embed"]["environment"]
        assert check["result"] == "ok" and check["reused"] == check["last_full"]
        wait_for(lambda: d.status()["models"]["embed"]["state"] == "STOPPED", 20,
                 what="the idle stop")
    reused = verified(d, "embed")[-1]
    # The record says whose verification it was, when, and what it proved.
    assert reused["verified_by"] == "chat"
    assert d.events()[0]["ts"] <= reused["verified_at"] <= full["ts"]  # chat's, at its start
    assert reused["record_files"] == full["record_files"]
    assert reused["frozen_sha256"] == full["frozen_sha256"]
    assert reused["unchanged_entries"] > reused["record_files"]


def test_a_file_changed_between_starts_means_the_full_verification_and_quarantine(
        make_daemon: MakeDaemon, pyenv: PyEnv) -> None:
    # The chat model's guard does not watch, so only the reuse check can see the change.
    d, venv = shared_venv_daemon(make_daemon, pyenv, {"watch": False, "interval": "0"})
    assert embed(d) == 200
    assert [e["scope"] for e in verified(d, "embed")] == ["reused"]
    wait_for(lambda: d.status()["models"]["embed"]["state"] == "STOPPED", 20,
             what="the idle stop")
    target = site_packages(venv) / "tiny_pkg" / "util.py"
    st = target.stat()
    data = target.read_bytes()
    target.write_bytes(data[:-1] + (b"#" if data[-1:] != b"#" else b"!"))  # same size
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the same mtime
    assert embed(d) == 503
    wait_for(lambda: d.status()["models"]["embed"]["state"] == "QUARANTINED", 20,
             what="the embed model's quarantine")
    drift = [e for e in d.events("environment_drift") if e.get("model") == "embed"][-1]
    assert drift["scope"] == "full"
    assert any(f["path"] == "file tiny_pkg/util.py" and f["status"] == "FAILED"
               for f in drift["files"])
    assert [e["scope"] for e in verified(d, "embed")] == ["reused"]  # not reused again
    assert d.status()["models"]["chat"]["state"] == "READY"  # its loaded server serves on


def test_the_fingerprint_sees_a_same_size_same_mtime_rewrite_and_new_files(
        tmp_path: Path) -> None:
    root = tmp_path / "venv"
    (root / "lib").mkdir(parents=True)
    f = root / "lib" / "mod.py"
    f.write_text("x = 1\n")
    known = Verifications()
    key = ("environment", str(root))
    known.record(key, fingerprint([root]), "chat", {"record_files": 1})
    hit = known.reusable(key, [root])
    assert hit is not None and hit.by == "chat" and hit.fields == {"record_files": 1}
    st = f.stat()
    f.write_text("x = 2\n")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # ctime still moves (inode(7))
    assert known.reusable(key, [root]) is None
    assert known.reusable(key, [root]) is None  # forgotten: the next one verifies in full
    known.record(key, fingerprint([root]), "chat", {})
    (root / "lib" / "new.pth").write_text("import os\n")
    assert known.reusable(key, [root]) is None
    known.record(key, fingerprint([root]), "chat", {})
    assert known.reusable(("environment", "another venv"), [root]) is None
    assert known.reusable(key, [tmp_path / "missing"]) is None  # unreadable: not reused
