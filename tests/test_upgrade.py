"""`sovereignd upgrade` with the stand-in server: a working new venv is switched in and proven
READY; a broken one is rolled back and the old one serves again; every step is an event."""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable
from pathlib import Path

from sovereignd.service import upgrade
from tests.harness import FAKE, Daemon, free_port
from tests.helpers import run_cli, wait_for

MakeDaemon = Callable[..., Daemon]


def fake_venv(root: Path, name: str, version: str, works: bool = True) -> Path:
    """A folder shaped like a venv: bin/serve runs the stand-in (or fails as a venv without
    vLLM would), and one installed distribution for the freezer to find."""
    venv = root / "server-venvs" / name
    (venv / "bin").mkdir(parents=True)
    info = venv / "lib" / "python3.11" / "site-packages" / f"fakeserver-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: fakeserver\n"
                                   f"Version: {version}\n")
    pip = venv / "lib" / "python3.11" / "site-packages" / "pip-24.0.dist-info"
    pip.mkdir()
    (pip / "METADATA").write_text("Name: pip\nVersion: 24.0\n")
    serve = venv / "bin" / "serve"
    if works:
        serve.write_text(f'#!/bin/sh\ntouch "{venv}/ran"\nexec {sys.executable} {FAKE} "$@"\n')
    else:
        serve.write_text("#!/bin/sh\necho \"ModuleNotFoundError: No module named 'vllm'\" >&2\n"
                         "exit 1\n")
    serve.chmod(0o755)
    return venv


def upgradable(make_daemon: MakeDaemon, tmp_path: Path) -> tuple[Daemon, Path, Path]:
    """A daemon whose server.venv is the symlink opt/server-venv -> server-venvs/old."""
    opt = tmp_path / "opt"
    old = fake_venv(opt, "old", "1.0")
    link = opt / "server-venv"
    link.symlink_to("server-venvs/old")
    frozen = tmp_path / "baseline" / "server-requirements.txt"
    frozen.parent.mkdir()
    data = upgrade.freeze_venv(old)
    frozen.write_bytes(data)
    frozen.with_name(frozen.name + ".sha256").write_bytes(upgrade.companion_bytes(frozen, data))
    d = make_daemon({"server": {"command": [str(link / "bin" / "serve")], "venv": str(link)},
                     # The stand-in venvs have no interpreter of their own to approve.
                     "environment": {"frozen": str(frozen), "files_check": False}})
    d.start()
    d.wait_state("READY")
    return d, opt, frozen


def steps(d: Daemon) -> list[str]:
    return [e["step"] for e in d.events("upgrade")]


def test_a_working_venv_is_switched_in_baselined_and_proven_ready(
        make_daemon: MakeDaemon, tmp_path: Path) -> None:
    d, opt, frozen = upgradable(make_daemon, tmp_path)
    first = d.server_pid()
    new = fake_venv(opt, "new", "2.0")
    res = run_cli("upgrade", "--config", str(d.config_path), "--venv", str(new),
                  "--timeout", "20s", "--drain", "300ms")
    assert res.returncode == 0, res.stdout + res.stderr
    assert (opt / "server-venv").readlink() == Path("server-venvs/new")
    assert (new / "ran").exists()  # the server that answered runs from the new venv
    st = d.status()
    assert st["state"] == "READY" and st["server"]["pid"] != first
    data = frozen.read_bytes()
    # The same format as `sovereignd baseline`: pip freeze --all, so pip is pinned too.
    assert data.splitlines()[0] == b"fakeserver==2.0" and b"pip==" in data
    companion = frozen.with_name(frozen.name + ".sha256").read_text()
    assert companion == f"{hashlib.sha256(data).hexdigest()}  server-requirements.txt\n"
    # Drained first (the balancer moves traffic away), resumed once the new server is READY.
    assert steps(d) == ["begin", "build", "baseline", "drain", "drained", "switch", "restart",
                        "ready", "resume", "done"]
    assert [e["action"] for e in d.events("operator")] == ["drain", "resume"]
    assert d.get("/readyz")[0] == 200
    switch = next(e for e in d.events("upgrade") if e["step"] == "switch")
    assert switch["previous"] == "server-venvs/old" and switch["to"] == "server-venvs/new"
    assert not list(opt.glob(".server-venv.*"))  # no temporary link left


def test_a_venv_that_never_becomes_ready_is_rolled_back_and_the_old_one_serves(
        make_daemon: MakeDaemon, tmp_path: Path) -> None:
    d, opt, frozen = upgradable(make_daemon, tmp_path)
    first = d.server_pid()
    before = frozen.read_bytes(), frozen.with_name(frozen.name + ".sha256").read_bytes()
    broken = fake_venv(opt, "broken", "3.0", works=False)
    res = run_cli("upgrade", "--config", str(d.config_path), "--venv", str(broken),
                  "--timeout", "20s", "--drain", "300ms")
    assert res.returncode == 1
    assert "rolled back to" in res.stderr and "which serves again" in res.stderr
    assert (opt / "server-venv").readlink() == Path("server-venvs/old")
    assert (frozen.read_bytes(), frozen.with_name(frozen.name + ".sha256").read_bytes()) \
        == before
    st = d.wait_state("READY")
    assert st["server"]["pid"] != first and (opt / "server-venvs" / "old" / "ran").exists()
    assert steps(d) == ["begin", "build", "baseline", "drain", "drained", "switch", "restart",
                        "failed", "rollback", "restart", "ready", "rolled_back", "resume"]
    assert d.get("/readyz")[0] == 200  # the old venv serves, and the drain is over
    failed = next(e for e in d.events("upgrade") if e["step"] == "failed")
    assert failed["level"] == "error" and "FATAL" in failed["reason"]
    # The broken venv's failures are in the log between the switch and the rollback.
    assert ("STARTING", "BACKOFF") in d.transitions() and ("FATAL", "STARTING") in d.transitions()


def test_upgrade_refuses_without_a_running_daemon_or_a_symlinked_venv(tmp_path: Path,
                                                                      make_daemon: MakeDaemon
                                                                      ) -> None:
    opt = tmp_path / "opt"
    fake_venv(opt, "old", "1.0")
    (opt / "server-venv").symlink_to("server-venvs/old")
    d = make_daemon({"server": {"venv": str(opt / "server-venv")}})
    new = fake_venv(opt, "new", "2.0")
    res = run_cli("upgrade", "--config", str(d.config_path), "--venv", str(new))
    assert res.returncode == 1 and "nothing was changed: an upgrade needs the running daemon" \
        in res.stderr
    assert (opt / "server-venv").readlink() == Path("server-venvs/old")  # nothing switched
    d.cfg["server"]["venv"] = str(opt / "server-venvs" / "old")
    d.write_config()
    res = run_cli("upgrade", "--config", str(d.config_path), "--venv", str(new))
    assert res.returncode == 1 and "is not a symlink" in res.stderr


def test_switch_link_replaces_atomically(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    link = tmp_path / "current"
    link.symlink_to("a")
    upgrade.switch_link(link, "b")
    assert link.readlink() == Path("b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "current"]


def test_event_action_accepts_known_steps_and_plain_values_only() -> None:
    recorded: list[dict[str, object]] = []

    class Events:
        def emit(self, event: str, level: str = "info", **fields: object) -> None:
            recorded.append({"event": event, "level": level, **fields})

    action = upgrade.event_action(Events())  # type: ignore[arg-type]
    assert action({"step": "bogus"})["ok"] is False
    assert action({"step": "rollback", "to": "x", "level": "debug", "nested": {"a": 1}})["ok"]
    assert recorded == [{"event": "upgrade", "level": "warning", "step": "rollback", "to": "x"}]


def test_a_built_venv_that_cannot_be_baselined_is_not_switched_in(
        make_daemon: MakeDaemon, tmp_path: Path) -> None:
    """The build path for real (python -m venv, pip install -r): a venv with nothing in it
    cannot be frozen, so the upgrade stops before the switch."""
    d, opt, frozen = upgradable(make_daemon, tmp_path)
    before = frozen.read_bytes()
    empty = tmp_path / "requirements.txt"
    empty.write_text("")
    res = run_cli("upgrade", "--config", str(d.config_path), "--name", "empty-1",
                  "--requirements", str(empty), "--python", sys.executable, timeout=120)
    assert res.returncode == 1 and "holds no installed distributions" in res.stderr
    assert (opt / "server-venvs" / "empty-1" / "bin" / "pip").exists()
    assert (opt / "server-venv").readlink() == Path("server-venvs/old")
    assert frozen.read_bytes() == before
    assert steps(d) == ["begin", "build", "built", "failed"]
    assert "nothing was switched" in res.stderr


def test_requirements_without_hashes_are_refused_unless_the_operator_insists(
        make_daemon: MakeDaemon, tmp_path: Path) -> None:
    d, opt, _ = upgradable(make_daemon, tmp_path)
    loose = tmp_path / "requirements.txt"
    loose.write_text("# a hand-written file\nsix==1.16.0\nzeta==2.0 \\\n"
                     "    --hash=sha256:" + "ab" * 32 + "\n")
    res = run_cli("upgrade", "--config", str(d.config_path), "--name", "loose-1",
                  "--requirements", str(loose), "--python", sys.executable, timeout=120)
    assert res.returncode == 1
    assert "pins packages without --hash (line 2: six==1.16.0)" in res.stderr
    assert "--allow-unhashed" in res.stderr
    assert not (opt / "server-venvs" / "loose-1").exists()
    assert (opt / "server-venv").readlink() == Path("server-venvs/old")
    # Insisting builds with plain pip (which still checks the one hash it is given).
    res = run_cli("upgrade", "--config", str(d.config_path), "--name", "loose-2",
                  "--requirements", str(loose), "--python", sys.executable,
                  "--allow-unhashed", timeout=180)
    assert res.returncode == 1 and "building the venv failed" in res.stderr
    assert f"--quiet install -r {loose}`" in res.stderr  # not --require-hashes --no-deps


# --- several models ---------------------------------------------------------------------------


def two_models(make_daemon: MakeDaemon, tmp_path: Path, shared: bool) -> tuple[Daemon, Path]:
    """A daemon serving `chat` and `embed` (the stand-in with vLLM's pooling flags), from one
    venv symlink (shared) or from one each (opt/venv-chat, opt/venv-embed), with baselines."""
    opt = tmp_path / "opt"
    d = make_daemon()
    server = d.cfg.pop("server")
    d.cfg["models"] = {}
    for name in ("chat", "embed"):
        link = opt / ("server-venv" if shared else f"venv-{name}")
        if not link.is_symlink():
            old = fake_venv(opt, f"old-{link.name}", "1.0")
            link.symlink_to(f"server-venvs/{old.name}")
        frozen = tmp_path / "baseline" / f"{name}.txt"  # one baseline each
        frozen.parent.mkdir(exist_ok=True)
        data = upgrade.freeze_venv(link.resolve())
        frozen.write_bytes(data)
        frozen.with_name(frozen.name + ".sha256").write_bytes(
            upgrade.companion_bytes(frozen, data))
        extra = {} if name == "chat" else {"port": free_port(),
                                           "args": ["--runner", "pooling", "--convert", "embed"]}
        d.cfg["models"][name] = {
            "server": {**server, **extra, "command": [str(link / "bin" / "serve")],
                       "venv": str(link)},
            "environment": {"frozen": str(frozen), "files_check": False}}
    d.write_config()
    d.start()
    for name in ("chat", "embed"):
        wait_for(lambda n=name: model_pid(d, n) is not None  # type: ignore[misc]
                 and d.status()["models"][n]["state"] == "READY", timeout=20)
    return d, opt


def model_pid(d: Daemon, name: str) -> int | None:
    server = d.status()["models"][name]["server"]
    return None if server is None else int(server["pid"])


def test_every_model_sharing_the_venv_is_upgraded_and_restarted_one_at_a_time(
        make_daemon: MakeDaemon, tmp_path: Path) -> None:
    d, opt = two_models(make_daemon, tmp_path, shared=True)
    before = {n: model_pid(d, n) for n in ("chat", "embed")}
    new = fake_venv(opt, "new", "2.0")
    res = run_cli("upgrade", "--config", str(d.config_path), "--venv", str(new),
                  "--timeout", "20s", "--drain", "300ms")
    assert res.returncode == 0, res.stdout + res.stderr
    assert (opt / "server-venv").readlink() == Path("server-venvs/new")
    st = d.status()["models"]
    for name in ("chat", "embed"):  # both run from the new venv, proven READY
        assert st[name]["state"] == "READY" and model_pid(d, name) != before[name]
        assert st[name]["server"]["argv"][0] == str(opt / "server-venv" / "bin" / "serve")
    # The one shared venv switched once, each model's baseline rewritten, the models restarted
    # in turn (the other one serving meanwhile).
    log = [(e["step"], e.get("model")) for e in d.events("upgrade")]
    assert log == [("begin", None), ("build", None), ("baseline", None), ("baseline", None),
                   ("drain", None), ("drained", None), ("switch", None),
                   ("restart", "chat"), ("ready", "chat"), ("restart", "embed"),
                   ("ready", "embed"), ("resume", None), ("done", None)]
    assert next(e for e in d.events("upgrade") if e["step"] == "begin")["models"] == "chat,embed"
    for frozen in (tmp_path / "baseline").glob("*.txt"):
        assert frozen.read_bytes().splitlines()[0] == b"fakeserver==2.0"


def test_models_on_different_venvs_are_upgraded_one_venv_at_a_time_and_a_failure_names_it(
        make_daemon: MakeDaemon, tmp_path: Path) -> None:
    d, opt = two_models(make_daemon, tmp_path, shared=False)
    chat_pid = model_pid(d, "chat")
    broken = fake_venv(opt, "broken", "3.0", works=False)
    args = ("upgrade", "--config", str(d.config_path), "--venv", str(broken),
            "--timeout", "20s", "--drain", "0")
    res = run_cli(*args)  # one new venv cannot replace two different ones
    assert res.returncode == 1 and "2 different venvs" in res.stderr and "--model" in res.stderr
    assert steps(d) == []
    res = run_cli(*args, "--model", "embed")
    assert res.returncode == 1
    assert "failed for model embed" in res.stderr and "which serves again" in res.stderr
    assert (opt / "venv-embed").readlink() == Path("server-venvs/old-venv-embed")
    assert (opt / "venv-chat").readlink() == Path("server-venvs/old-venv-chat")
    wait_for(lambda: d.status()["models"]["embed"]["state"] == "READY", timeout=20)
    assert model_pid(d, "chat") == chat_pid  # the other model never stopped
    assert {e.get("model") for e in d.events("upgrade")
            if e["step"] in ("failed", "rollback", "restart", "rolled_back")} == {"embed"}
    assert (tmp_path / "baseline" / "embed.txt").read_bytes().startswith(
        b"fakeserver==1.0")
    # The other model's venv, named: only it changes.
    new = fake_venv(opt, "new", "2.0")
    res = run_cli("upgrade", "--config", str(d.config_path), "--venv", str(new),
                  "--timeout", "20s", "--drain", "0", "--model", "chat")
    assert res.returncode == 0, res.stdout + res.stderr
    assert (opt / "venv-chat").readlink() == Path("server-venvs/new")
    assert (opt / "venv-embed").readlink() == Path("server-venvs/old-venv-embed")
    assert model_pid(d, "chat") != chat_pid
    res = run_cli("upgrade", "--config", str(d.config_path), "--venv", str(new),
                  "--model", "nope")
    assert res.returncode == 1 and "--model 'nope': no such model here" in res.stderr
