"""The command line as a package: every entry point reaches the same `main`, and only `cli/`
turns errors into exit statuses (STYLE.md)."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.helpers import DAEMON_SRC, REPO, cli_env

PACKAGE = DAEMON_SRC / "sovereignd"
# The process may end only here: the cli package and `python -m sovereignd`.
MAY_EXIT = ("cli/", "__main__.py")


def _exits(tree: ast.AST) -> list[int]:
    """Lines that end the process: sys.exit / os._exit / exit / quit calls, raise SystemExit."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = (f"{f.value.id}.{f.attr}" if isinstance(f, ast.Attribute)
                    and isinstance(f.value, ast.Name) else f.id if isinstance(f, ast.Name)
                    else "")
            if name in ("sys.exit", "os._exit", "exit", "quit"):
                lines.append(node.lineno)
        elif isinstance(node, ast.Raise) and node.exc is not None:
            exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            if isinstance(exc, ast.Name) and exc.id == "SystemExit":
                lines.append(node.lineno)
    return lines


def test_only_the_cli_package_ends_the_process() -> None:
    """No module outside `sovereignd/cli/` (and `__main__`) calls sys.exit or raises
    SystemExit: the rest raise SovereigndError and `cli.main` picks the status."""
    found = {str(p.relative_to(PACKAGE)): lines for p in sorted(PACKAGE.rglob("*.py"))
             if (lines := _exits(ast.parse(p.read_text(), str(p))))}
    outside = {path: lines for path, lines in found.items() if not path.startswith(MAY_EXIT)}
    assert outside == {}
    # The scan sees the ones that are allowed, so an empty `outside` means something.
    assert {"__main__.py", "cli/__main__.py"} <= found.keys()


@pytest.mark.parametrize("module", ["sovereignd", "sovereignd.cli"])
def test_python_dash_m_reaches_main_and_its_exit_statuses(module: str, tmp_path: Path) -> None:
    """`python -m sovereignd` and `python -m sovereignd.cli` run the same parser and turn a
    configuration error into 78 with one sentence on stderr."""
    env = cli_env()
    version = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True,
                             text=True, env=env, timeout=60, check=False)
    assert version.returncode == 0 and version.stdout.startswith("sovereignd "), version
    missing = tmp_path / "missing.yaml"
    res = subprocess.run([sys.executable, "-m", module, "check", "--config", str(missing)],
                         capture_output=True, text=True, env=env, timeout=60, check=False)
    assert res.returncode == 78, res
    assert res.stderr.startswith("sovereignd: ") and "Traceback" not in res.stderr


def test_console_script_names_cli_main(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                       ) -> None:
    """pyproject's `sovereignd` script resolves to the package's `main`, which returns the
    status (78 for a configuration it cannot read) rather than exiting."""
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, attr = scripts["sovereignd"].partition(":")
    entry = getattr(importlib.import_module(module), attr)
    from sovereignd.cli.main import main

    assert entry is main
    assert entry(["check", "--config", str(tmp_path / "missing.yaml")]) == 78
    assert capsys.readouterr().err.startswith("sovereignd: ")


@pytest.mark.parametrize("argv", [
    ["fleet", "haproxy", "--node", "not-an-address", "--listen", "127.0.0.1:18080"],
    ["fleet", "haproxy", "--node", "127.0.0.1:8000", "--listen", "127.0.0.1:18080",
     "--check-interval", "soon"],
    ["audit", "fleet", "host.tar.gz", "--key-file", "no-equals-sign"],
])
def test_an_unusable_value_on_the_command_line_is_status_2_not_a_failed_check(
        argv: list[str]) -> None:
    """1 means a check or an audit control failed; a value that cannot be used is a usage
    error, 2 as argparse's own, with the option named and where to read more."""
    res = subprocess.run([sys.executable, "-m", "sovereignd", *argv], capture_output=True,
                         text=True, env=cli_env(), timeout=60, check=False)
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith(f"sovereignd {argv[0]}: ") and "--help" in res.stderr
    assert res.stdout == ""
