"""A venv's installed distributions, read from disk: nothing here runs the venv's Python.

The installed set comes from `*.dist-info` (and `*.egg-info`) metadata in its site-packages,
so a broken or hostile venv cannot run code in the daemon, and the check works while the
server's interpreter is busy or gone.

`freeze(venv)` writes what `pip freeze` writes (`pip freeze --all` with `all=True`), with one
difference: for an editable install pip asks git for the remote and commit
(`-e git+URL@COMMIT#egg=name`), while this writes the path form pip uses for a checkout without
version control (`# Editable install with no version control (name==version)` then
`-e /path`), because it runs no programs. Packages are read from the venv's own site-packages
only, as pip sees them when `include-system-site-packages = false` (the default).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import re
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sovereignd.errors import CheckFailed
from sovereignd.integrity.frozen import Pin, Requirement, canonical_name, normalize_version

# ---------------------------------------------------------------------------------------------
# The installed set, read from site-packages


@dataclass(frozen=True)
class Distribution:
    """One installed distribution, as its metadata folder describes it."""

    name: str  # Name from the metadata, as written (pip freeze prints this)
    version: str  # Version from the metadata, as written
    info_dir: Path  # the *.dist-info / *.egg-info folder (or file)
    site: Path  # the site-packages folder RECORD paths are relative to
    direct_url: Mapping[str, Any] | None = None
    editable_location: str | None = None

    @property
    def key(self) -> str:
        """PEP 503 name."""
        return canonical_name(self.name)

    def requirement(self) -> Requirement:
        """This distribution as pip freeze pins it."""
        normal = normalize_version(self.version)
        if self.editable_location is not None:
            return Requirement(name=self.name, pin=Pin.EDITABLE, value=self.editable_location,
                               version=normal or self.version)
        if self.direct_url is not None:
            url = _direct_reference(self.direct_url)
            if url is not None:
                return Requirement(name=self.name, pin=Pin.URL, value=url)
        if normal is None:
            return Requirement(name=self.name, pin=Pin.ARBITRARY, value=self.version)
        return Requirement(name=self.name, pin=Pin.VERSION, value=normal)

    def freeze_lines(self) -> list[str]:
        """The lines pip freeze prints for this distribution (a comment, then `-e`, if editable)."""
        req = self.requirement()
        if req.pin is Pin.EDITABLE:
            pinned = f"{self.name}{'==' if normalize_version(self.version) else '==='}"
            return [f"# Editable install with no version control ({pinned}{req.version})",
                    str(req)]
        return [str(req)]


def _direct_reference(info: Mapping[str, Any]) -> str | None:
    """The `@ URL` part pip freeze writes from direct_url.json (PEP 610), or None if unusable."""
    url = info.get("url")
    if not isinstance(url, str) or not url:
        return None
    fragments = []
    vcs = info.get("vcs_info")
    archive = info.get("archive_info")
    if isinstance(vcs, dict):
        out = f"{vcs.get('vcs')}+{url}@{vcs.get('commit_id')}"
    else:
        out = url
        if isinstance(archive, dict) and isinstance(archive.get("hash"), str):
            fragments.append(archive["hash"])
    subdirectory = info.get("subdirectory")
    if isinstance(subdirectory, str) and subdirectory:
        fragments.append(f"subdirectory={subdirectory}")
    return out + ("#" + "&".join(fragments) if fragments else "")


def _editable_location(info: Mapping[str, Any] | None) -> str | None:
    if info is None:
        return None
    dir_info = info.get("dir_info")
    url = info.get("url")
    if isinstance(dir_info, dict) and dir_info.get("editable") and isinstance(url, str):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme == "file":
            return os.path.normpath(urllib.request.url2pathname(parts.path))
    return None


def site_packages(venv: Path) -> list[Path]:
    """The venv's site-packages folders (lib/, then lib64/ when it is not a link to lib/)."""
    found: list[Path] = []
    seen: set[Path] = set()
    for lib in ("lib", "lib64"):
        for candidate in sorted((venv / lib).glob("python3*/site-packages")):
            real = candidate.resolve()
            if real not in seen and real.is_dir():
                seen.add(real)
                found.append(real)
    return found


def venv_python(venv: Path) -> tuple[int, int] | None:
    """The venv's Python version, from pyvenv.cfg or its lib/pythonX.Y folder name."""
    try:
        for line in (venv / "pyvenv.cfg").read_text(errors="replace").splitlines():
            key, _, value = line.partition("=")
            if key.strip() in ("version", "version_info"):
                m = re.match(r"\s*(\d+)\.(\d+)", value)
                if m:
                    return int(m[1]), int(m[2])
    except OSError:
        pass
    for site in site_packages(venv):
        m = re.fullmatch(r"python(\d+)\.(\d+)t?", site.parent.name)
        if m:
            return int(m[1]), int(m[2])
    return None


class _InfoDir(importlib.metadata.Distribution):
    """importlib.metadata's reader of one `*.dist-info` / `*.egg-info` folder (or egg-info
    file), as `importlib.metadata.Distribution.at` makes it, except that bytes that are not
    UTF-8 read as U+FFFD instead of raising: an old package's Latin-1 description must not
    hide its name and version."""

    def __init__(self, path: Path) -> None:
        self._path = path

    def read_text(self, filename: str | os.PathLike[str]) -> str | None:
        # filename "" is the path itself: importlib.metadata reads an egg-info file that way.
        try:
            return (self._path / filename).read_text(encoding="utf-8", errors="replace")
        except OSError:
            return None

    def locate_file(self, path: str | os.PathLike[str]) -> Path:
        return self._path.parent / path


def _read_dist(info_dir: Path, site: Path, editable: str | None = None) -> Distribution | None:
    """The distribution a metadata folder describes; None when it has no Name or Version."""
    dist = _InfoDir(info_dir)
    try:
        meta = dist.metadata
    except TypeError:  # no METADATA, PKG-INFO nor egg-info file: 3.11 parses None
        return None
    # get_all, not meta[...]: a missing header is None in 3.11 and a DeprecationWarning in 3.12.
    name, version = (str((meta.get_all(key) or [""])[0]).strip() for key in ("Name", "Version"))
    if not (name and version):
        return None
    direct = None
    if info_dir.is_dir():
        with contextlib.suppress(ValueError):
            value = json.loads(dist.read_text("direct_url.json") or "null")
            direct = value if isinstance(value, dict) else None
    return Distribution(name=name, version=version, info_dir=info_dir,
                        site=site, direct_url=direct,
                        editable_location=editable or _editable_location(direct))


def _dists_in(site: Path) -> list[Distribution]:
    """The distributions in one site-packages folder, by metadata folder name.

    Listed here rather than with `importlib.metadata.distributions(path=[site])`: that caches
    each folder's listing until its mtime changes (FastPath.lookup, CPython 3.11
    Lib/importlib/metadata/__init__.py), and an install within the same mtime tick as an
    earlier read would go unseen by a daemon that reads the venv again and again; it also
    lists in directory order, so which of two metadata folders of one name is "first" would
    depend on the file system.
    """
    dists = []
    for entry in sorted(site.iterdir()):
        if entry.suffix not in (".dist-info", ".egg-info"):
            continue
        dist = _read_dist(entry, site)
        if dist is not None:
            dists.append(dist)
    # Legacy `setup.py develop` installs: an .egg-link names the project folder holding
    # the .egg-info (pip reads the first non-empty line).
    for link in sorted(site.glob("*.egg-link")):
        try:
            target = next((ln.strip() for ln in link.read_text().splitlines() if ln.strip()), "")
        except OSError:
            continue
        project = (site / target).resolve() if target else None
        if project is None or not project.is_dir():
            continue
        for info in sorted(project.glob("*.egg-info")):
            dist = _read_dist(info, site, editable=str(project))
            if dist is not None:
                dists.append(dist)
    return dists


def installed_distributions(venv: Path, *, include_shadowed: bool = False) -> list[Distribution]:
    """Distributions installed in the venv, first found per name (as pip sees them).

    `include_shadowed` also returns later duplicates of a name (a half-finished upgrade leaves
    two dist-info folders), which RECORD checking still covers.
    """
    sites = site_packages(venv)
    if not sites:
        raise CheckFailed(f"{venv} has no lib/python3.*/site-packages: it is not a virtual "
                          "environment (create it with python -m venv or uv venv)")
    out: list[Distribution] = []
    seen: set[str] = set()
    for site in sites:
        for dist in _dists_in(site):
            if dist.key in seen and not include_shadowed:
                continue
            seen.add(dist.key)
            out.append(dist)
    return out


_STDLIB_NAMES = frozenset({"python", "wsgiref", "argparse"})


def freeze_skips(python: tuple[int, int] | None) -> frozenset[str]:
    """Packages `pip freeze` leaves out without --all: pip itself, and before Python 3.12 the
    build tools it used to bundle."""
    tools = {"pip"}
    if python is None or python < (3, 12):
        tools |= {"setuptools", "distribute", "wheel"}
    return frozenset(tools)


def freeze(venv: Path, *, all: bool = False) -> str:
    """The venv's installed set in `pip freeze` format (`pip freeze --all` when `all`)."""
    skip = set(_STDLIB_NAMES)
    if not all:
        skip |= freeze_skips(venv_python(venv))
    dists = [d for d in installed_distributions(venv) if d.key not in skip]
    lines: list[str] = []
    for dist in sorted(dists, key=lambda d: d.name.lower()):
        lines.extend(dist.freeze_lines())
    return "".join(f"{line}\n" for line in lines)
