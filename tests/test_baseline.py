"""`sovereignd baseline`: both baselines written in the formats shasum and pip freeze use."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest

from sovereignd.integrity import manifest
from sovereignd.integrity.venv import freeze
from tests.helpers import run_cli
from tests.modeldirs import make_model
from tests.venvtools import PyEnv, site_packages

# The session's real venv (built once, copied per test): registered as a plugin so that
# every module using it shares one fixture, not one per importing module.
pytest_plugins = ("tests.pyenvs",)


@pytest.fixture
def setup(pyenv: PyEnv, tmp_path: Path) -> tuple[Path, Path, Path]:
    """(config, model folder, venv) with integrity.manifest and environment.frozen set."""
    model = make_model(tmp_path / "model")
    venv = pyenv.copy(tmp_path / "venv")
    config = tmp_path / "sovereignd.yaml"
    config.write_text(f"""\
server:
  model: {model}
  venv: {venv}
integrity:
  manifest: {tmp_path / "approved" / "CHECKSUMS.sha256"}
environment:
  frozen: {tmp_path / "approved" / "requirements-frozen.txt"}
logs:
  dir: {tmp_path / "logs"}
""")
    return config, model, venv


def test_baseline_writes_both_baselines_that_the_checks_then_accept(
        setup: tuple[Path, Path, Path], tmp_path: Path) -> None:
    config, model, venv = setup
    result = run_cli("baseline", "--config", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    approved = tmp_path / "approved"
    manifest_file = approved / "CHECKSUMS.sha256"
    frozen = approved / "requirements-frozen.txt"
    companion = approved / "requirements-frozen.txt.sha256"
    for path in (manifest_file, frozen, companion):
        assert f"wrote {path}" in result.stdout
        assert hashlib.sha256(path.read_bytes()).hexdigest() in result.stdout
    assert "5 files of" in result.stdout
    link, _, rest = frozen.read_text().partition("\n")
    assert rest == freeze(venv, all=True)
    files = approved / "requirements-frozen.software.sha256"
    digest = hashlib.sha256(files.read_bytes()).hexdigest()
    assert link == f"# sovereignd software manifest: {files.name} sha256={digest}"
    assert f"wrote {files}" in result.stdout
    assert run_cli("manifest", "verify", str(model), "-m", str(manifest_file)).returncode == 0
    env = run_cli("env", "verify", "--config", str(config))
    assert env.returncode == 0, env.stdout + env.stderr
    tool = ["shasum", "-a", "256", "-c"] if shutil.which("shasum") else ["sha256sum", "-c"]
    assert subprocess.run([*tool, companion.name], cwd=approved, check=False,
                          capture_output=True).returncode == 0


def test_rebaselining_accepts_a_change(setup: tuple[Path, Path, Path], tmp_path: Path) -> None:
    config, model, _ = setup
    assert run_cli("baseline", "--config", str(config)).returncode == 0
    (model / "config.json").write_text("{}\n")
    manifest_file = tmp_path / "approved" / "CHECKSUMS.sha256"
    assert run_cli("manifest", "verify", str(model), "-m", str(manifest_file)).returncode == 1
    assert run_cli("baseline", "--config", str(config), "--accept").returncode == 0
    assert run_cli("manifest", "verify", str(model), "-m", str(manifest_file)).returncode == 0


def test_a_stale_manifest_pin_is_pointed_out(setup: tuple[Path, Path, Path]) -> None:
    config, _, _ = setup
    config.write_text(config.read_text().replace(
        "integrity:\n", f"integrity:\n  manifest_sha256: {'ab' * 32}\n"))
    result = run_cli("baseline", "--config", str(config))
    assert result.returncode == 0
    assert f"integrity.manifest_sha256 pins {'ab' * 32}: set it to" in result.stdout


def test_tampered_venv_is_not_approved_and_nothing_is_written(
        setup: tuple[Path, Path, Path], tmp_path: Path) -> None:
    config, _, venv = setup
    (site_packages(venv) / "zeta.py").write_text("Z = 'patched'\n")
    result = run_cli("baseline", "--config", str(config))
    assert result.returncode == 1
    assert "refusing to approve the server venv" in result.stderr and "zeta.py" in result.stderr
    assert not (tmp_path / "approved").exists()


def test_nothing_to_baseline_is_a_configuration_error(tmp_path: Path) -> None:
    config = tmp_path / "sovereignd.yaml"
    config.write_text(f"server:\n  model: {tmp_path}\nlogs:\n  dir: {tmp_path}\n")
    result = run_cli("baseline", "--config", str(config))
    assert result.returncode == 78
    assert "there is no baseline to write" in result.stderr
    config.write_text(config.read_text() + f"environment:\n  frozen: {tmp_path / 'f.txt'}\n")
    result = run_cli("baseline", "--config", str(config))
    assert result.returncode == 78
    assert "server.venv: must be set" in result.stderr


def test_baseline_library_call_returns_what_it_wrote(setup: tuple[Path, Path, Path]) -> None:
    from sovereignd import config as config_mod
    from sovereignd.integrity import baseline

    cfg = config_mod.load(setup[0])
    result = baseline.write_baselines(cfg, workers=1)
    assert [w.path.name for w in result.written] == [
        "CHECKSUMS.sha256", "requirements-frozen.software.sha256", "requirements-frozen.txt",
        "requirements-frozen.txt.sha256"]
    assert cfg.integrity.manifest is not None
    assert manifest.read_manifest(cfg.integrity.manifest).sha256 == result.written[0].sha256


def test_with_several_models_each_models_software_is_baselined_and_verified(
        pyenv: PyEnv, tmp_path: Path) -> None:
    """Two models with their own venvs and frozen files: `baseline` writes both, `env verify`
    checks each and names the model whose venv drifted; `--model` checks one."""
    models = {}
    for name in ("chat", "embed"):
        models[name] = {"server": {"model": str(make_model(tmp_path / f"{name}-model")),
                                   "venv": str(pyenv.copy(tmp_path / f"{name}-venv")),
                                   "port": 8100 + len(models)},
                        "environment": {"frozen": str(tmp_path / f"{name}-frozen.txt")}}
    config = tmp_path / "c.yaml"
    import yaml

    config.write_text(yaml.safe_dump({"models": models, "logs": {"dir": str(tmp_path / "l")}}))
    res = run_cli("baseline", "--config", str(config))
    assert res.returncode == 0, res.stdout + res.stderr
    res = run_cli("env", "verify", "--config", str(config))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "== model chat" in res.stdout and "== model embed" in res.stdout
    (site_packages(tmp_path / "embed-venv") / "intruder.py").write_text("x = 1\n")
    res = run_cli("env", "verify", "--config", str(config))
    assert res.returncode == 1 and "embed" in res.stderr and "chat" not in res.stderr
    assert run_cli("env", "verify", "--config", str(config), "--model", "chat").returncode == 0
