"""The server's software: its venv's installed set compared with the frozen requirements.

The parts live beside this: the frozen file (`frozen`), the venv read from disk without
running its Python (`venv`), and the installed files against their RECORD (`record`).
"""

from __future__ import annotations

import hashlib
import os
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from sovereignd.integrity.frozen import FrozenRequirements, Pin, Requirement
from sovereignd.integrity.venv import (
    _STDLIB_NAMES,
    freeze_skips,
    installed_distributions,
    venv_python,
)

# ---------------------------------------------------------------------------------------------
# Drift: the frozen file against the venv


@dataclass(frozen=True)
class EnvironmentDiff:
    """Packages added to, removed from, or changed in the venv since the frozen file."""

    venv: Path
    source: str
    added: tuple[Requirement, ...] = ()
    removed: tuple[Requirement, ...] = ()
    changed: tuple[tuple[Requirement, Requirement], ...] = ()  # (frozen, installed)

    @property
    def ok(self) -> bool:
        """True when the venv holds exactly what the frozen file pins."""
        return not (self.added or self.removed or self.changed)

    def render(self) -> str:
        """A human diff: one line per package, `+` added, `-` removed, `~` changed."""
        if self.ok:
            return f"{self.venv} matches {self.source}"
        count = len(self.added) + len(self.removed) + len(self.changed)
        lines = [f"{count} difference(s) between {self.venv} and {self.source}:"]
        lines += [f"  + {r.name} {r.short()}  (installed, not in the frozen file)"
                  for r in self.added]
        lines += [f"  - {r.name} {r.short()}  (in the frozen file, not installed)"
                  for r in self.removed]
        lines += [f"  ~ {f.name or i.name} {f.short()} -> {i.short()}" for f, i in self.changed]
        return "\n".join(lines)


def _split_hash(url: str) -> tuple[str, bool]:
    """The URL without hash fragments (`sha256=...`), and whether it had one."""
    base, _, fragment = url.partition("#")
    parts = [p for p in fragment.split("&") if p]
    kept = [p for p in parts if p.split("=", 1)[0] not in hashlib.algorithms_guaranteed]
    return base + ("#" + "&".join(kept) if kept else ""), len(kept) != len(parts)


def same_pin(frozen: Requirement, installed: Requirement) -> bool:
    """Whether the installed package satisfies the frozen line exactly.

    Versions compare in PEP 440 normal form; URLs compare with a hash fragment ignored when
    only one side has it (uv pip freeze omits it); editable installs compare by name only,
    since their code is a working tree that no version pins.
    """
    if frozen.pin is Pin.EDITABLE or installed.pin is Pin.EDITABLE:
        return frozen.pin is installed.pin
    if frozen.pin in (Pin.VERSION, Pin.ARBITRARY) and installed.pin in (Pin.VERSION,
                                                                         Pin.ARBITRARY):
        return frozen.value == installed.value
    if frozen.pin is Pin.URL and installed.pin is Pin.URL:
        if frozen.value == installed.value:
            return True
        frozen_url, frozen_hashed = _split_hash(frozen.value)
        installed_url, installed_hashed = _split_hash(installed.value)
        return not (frozen_hashed and installed_hashed) and frozen_url == installed_url
    return False


def _location(target: str) -> str:
    """An editable target as a normalised local path (uv writes `-e file:///path`)."""
    parts = urllib.parse.urlsplit(target)
    if parts.scheme == "file":
        target = urllib.request.url2pathname(parts.path)
    return os.path.normpath(target)


def compare(frozen: FrozenRequirements, venv: Path) -> EnvironmentDiff:
    """Diff the venv's installed set against a frozen file (see `same_pin` for equality).

    Packages `pip freeze` leaves out (pip; before Python 3.12 also setuptools, wheel) are
    compared only when the frozen file lists them, so a file from either pip or uv works.
    """
    dists = installed_distributions(venv)
    installed = {d.key: d.requirement() for d in dists}
    by_location = {_location(d.editable_location): d.key for d in dists if d.editable_location}
    skips = freeze_skips(venv_python(venv)) | _STDLIB_NAMES
    matched: set[str] = set()
    removed: list[Requirement] = []
    changed: list[tuple[Requirement, Requirement]] = []
    for req in frozen.requirements:
        key = req.key
        if key is None and req.pin is Pin.EDITABLE:
            key = by_location.get(_location(req.value))
        if key is None or key not in installed:
            removed.append(req)
            continue
        matched.add(key)
        if not same_pin(req, installed[key]):
            changed.append((req, installed[key]))
    added = [req for key, req in sorted(installed.items())
             if key not in matched and key not in skips]
    return EnvironmentDiff(venv=venv, source=frozen.source, added=tuple(added),
                           removed=tuple(removed), changed=tuple(changed))
