"""Real virtual environments for tests, built without network: hand-made wheels, local installs.

`build_base_venv` makes a venv with pip and setuptools (like `python -m venv`), packages
installed by name, by file and in editable mode; `tests/pyenvs.py` builds it once per session.
"""

from __future__ import annotations

import base64
import ensurepip
import hashlib
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path


def make_wheel(out: Path, name: str, version: str, modules: dict[str, str],
               scripts: dict[str, str] | None = None) -> Path:
    """Write a pure-Python wheel holding `modules` (path -> source) and console `scripts`."""
    dist = re.sub(r"[-_.]+", "_", name)
    info = f"{dist}-{version}.dist-info"
    files = dict(modules)
    files[f"{info}/METADATA"] = (f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
                                 "Summary: a test package\n\nA long description.\n")
    files[f"{info}/WHEEL"] = ("Wheel-Version: 1.0\nGenerator: sovereignd-tests\n"
                              "Root-Is-Purelib: true\nTag: py3-none-any\n")
    if scripts:
        files[f"{info}/entry_points.txt"] = "[console_scripts]\n" + "".join(
            f"{k} = {v}\n" for k, v in scripts.items())
    rows = []
    for path, text in files.items():
        data = text.encode()
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        rows.append(f"{path},sha256={digest},{len(data)}")
    rows.append(f"{info}/RECORD,,")
    wheel = out / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for path, text in files.items():
            z.writestr(path, text)
        z.writestr(f"{info}/RECORD", "\n".join(rows) + "\n")
    return wheel


def pip(venv: Path, *args: str) -> str:
    """Run this interpreter's pip against `venv` (pip --python), offline; return its output."""
    result = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"),
         "--disable-pip-version-check", "--no-input", *args],
        capture_output=True, text=True, check=False, timeout=120)
    if result.returncode != 0:
        raise AssertionError(f"pip {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout


def site_packages(venv: Path) -> Path:
    return next((venv / "lib").glob("python3*/site-packages"))


@dataclass(frozen=True)
class PyEnv:
    """A base venv and the wheels it can install from."""

    venv: Path
    wheels: Path
    editable_project: Path

    def copy(self, dest: Path) -> Path:
        """A private copy of the base venv that a test may change."""
        shutil.copytree(self.venv, dest, symlinks=True)
        return dest


# A PEP 517/660 build backend with no requirements, so `pip install -e` works offline; the
# editable wheel holds only a .pth pointing at the project, as setuptools' would.
_EDITABLE_BACKEND = '''
import base64, hashlib, os, zipfile

def _wheel(directory, files):
    info = "edpkg-0.5.dist-info"
    files = dict(files)
    files[info + "/METADATA"] = "Metadata-Version: 2.1\\nName: edpkg\\nVersion: 0.5\\n"
    files[info + "/WHEEL"] = "Wheel-Version: 1.0\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n"
    rows = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest())
        rows.append("%s,sha256=%s,%d" % (path, digest.rstrip(b"=").decode(), len(text.encode())))
    rows.append(info + "/RECORD,,")
    name = "edpkg-0.5-py3-none-any.whl"
    with zipfile.ZipFile(os.path.join(directory, name), "w") as z:
        for path, text in files.items():
            z.writestr(path, text)
        z.writestr(info + "/RECORD", "\\n".join(rows) + "\\n")
    return name

def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    return _wheel(wheel_directory, {"edpkg/__init__.py": open("edpkg/__init__.py").read()})

def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    return _wheel(wheel_directory, {"__editable__.edpkg-0.5.pth": os.path.abspath(".") + "\\n"})
'''


def build_base_venv(root: Path) -> PyEnv:
    """The base venv and its wheels, under `root`."""
    wheels = root / "wheels"
    wheels.mkdir()
    make_wheel(wheels, "Tiny_Pkg", "1.0.0.RC1", {"tiny_pkg/__init__.py": "VALUE = 1\n",
                                                 "tiny_pkg/util.py": "def f():\n    return 1\n"},
               scripts={"tiny": "tiny_pkg:main"})
    make_wheel(wheels, "zeta", "2.0", {"zeta.py": "Z = 1\n"})
    make_wheel(wheels, "zeta", "2.1", {"zeta.py": "Z = 2\n"})
    make_wheel(wheels, "extra-pkg", "0.3", {"extra_pkg.py": "E = 1\n"})
    local = make_wheel(wheels, "alpha.b", "0.1", {"alpha_b.py": "A = 1\n"})
    project = root / "editable-project"
    (project / "edpkg").mkdir(parents=True)
    (project / "edpkg" / "__init__.py").write_text("E = 1\n")
    (project / "pyproject.toml").write_text(
        '[build-system]\nrequires = []\nbuild-backend = "backend"\nbackend-path = ["."]\n')
    (project / "backend.py").write_text(_EDITABLE_BACKEND)
    venv = root / "base-venv"
    # pip and setuptools from the wheels ensurepip bundles, as `python -m venv` would install
    # them, but in the same single pip run as the rest and without byte-compiling: seconds saved.
    bundled = sorted((Path(ensurepip.__file__).parent / "_bundled").glob("*.whl"))
    for wheel in bundled:
        shutil.copy(wheel, wheels)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    pip(venv, "install", "-q", "--no-compile", "--no-index", "--no-deps", "--find-links",
        str(wheels), *(w.name.split("-")[0] for w in bundled),
        "tiny_pkg", "zeta==2.0",  # by name: frozen as name==version
        str(local),  # by file: frozen as name @ file://...
        "-e", str(project))  # PEP 660 editable, via a tiny in-tree backend: offline
    if not bundled:  # a Python without ensurepip's wheels (some distributions strip them)
        subprocess.run([str(venv / "bin" / "python"), "-m", "ensurepip"], check=True,
                       timeout=120, capture_output=True)
    return PyEnv(venv=venv, wheels=wheels, editable_project=project)
