"""A venv's installed files hashed against each distribution's RECORD (pip and uv never do)."""

from __future__ import annotations

import base64
import binascii
import csv
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from sovereignd.integrity import hashing
from sovereignd.integrity.venv import Distribution, installed_distributions, site_packages
from sovereignd.units import human_rate, human_size

# ---------------------------------------------------------------------------------------------
# Installed files against their RECORD


@dataclass(frozen=True)
class RecordIssue:
    """One RECORD row that did not verify: which distribution, which file, and why."""

    dist: str
    path: str  # as written in RECORD
    reason: str
    expected: str | None = None  # hex digests, when known
    actual: str | None = None
    line: int = 0


#: Top-level site-packages entries that no RECORD lists and that are not reported: bytecode
#: caches (Python rewrites them; see RecordReport.rewritten_bytecode), and the two files
#: virtualenv writes when it creates a venv.
UNRECORDED_ALLOWED = frozenset({"__pycache__", "_virtualenv.pth", "_virtualenv.py"})


@dataclass(frozen=True)
class RecordReport:
    """Every installed file hashed against its distribution's RECORD."""

    venv: Path
    files_checked: int
    bytes_hashed: int
    seconds: float
    mismatched: tuple[RecordIssue, ...] = ()
    missing: tuple[RecordIssue, ...] = ()
    #: Top-level site-packages entries that no distribution's RECORD lists: an added `.pth`
    #: file runs code at every interpreter start, and pip freeze does not show it.
    unrecorded: tuple[RecordIssue, ...] = ()
    #: Rows that cannot be checked as written (bad hash syntax, unknown algorithm); a hex digest
    #: where base64 belongs is reported here and still compared.
    malformed: tuple[RecordIssue, ...] = ()
    #: Rows naming files outside the venv: not read.
    refused: tuple[RecordIssue, ...] = ()
    #: `.pyc` files whose RECORD hash is the wheel's copy: pip byte-compiles after unpacking
    #: and Python rewrites stale bytecode, so a differing .pyc is reported, not counted as drift.
    rewritten_bytecode: tuple[RecordIssue, ...] = ()
    without_record: tuple[str, ...] = ()
    dists: int = 0

    @property
    def ok(self) -> bool:
        """True when no recorded file changed or went missing and nothing unrecorded was added."""
        return not (self.mismatched or self.missing or self.unrecorded)

    def render(self, limit: int = 50) -> str:
        """A summary line, then the problems by kind (at most `limit` of each)."""
        verdict = "all match" if self.ok else (
            f"{len(self.mismatched)} changed, {len(self.missing)} missing, "
            f"{len(self.unrecorded)} unrecorded")
        lines = [f"RECORD check of {self.venv}: {self.files_checked} files of {self.dists} "
                 f"distributions, {human_size(self.bytes_hashed)} in {self.seconds:.2f} s "
                 f"({human_rate(self.bytes_hashed, self.seconds)}): {verdict}"]
        for title, issues in (("changed", self.mismatched), ("missing", self.missing),
                              ("in site-packages, listed in no RECORD", self.unrecorded),
                              ("malformed RECORD rows", self.malformed),
                              ("bytecode rewritten since install (not drift)",
                               self.rewritten_bytecode),
                              ("outside the venv, not read", self.refused)):
            if issues:
                lines.append(f"  {title}:")
                lines += [f"    {i.dist + ': ' if i.dist else ''}{i.path} ({i.reason})"
                          for i in issues[:limit]]
                if len(issues) > limit:
                    lines.append(f"    ... and {len(issues) - limit} more")
        if self.without_record:
            lines.append("  without a RECORD (not checked): " + ", ".join(self.without_record))
        return "\n".join(lines)


def _record_digest(value: str) -> tuple[str | None, str | None]:
    """(hex digest, problem) for a RECORD hash field `sha256=<urlsafe b64, no padding>`."""
    algo, sep, encoded = value.partition("=")
    if not sep or not encoded:
        return None, f"hash field {value!r} is not algorithm=value"
    if algo != "sha256":
        return None, f"hash algorithm {algo} is not checked (only sha256)"
    if len(encoded) == 64 and all(c in "0123456789abcdefABCDEF" for c in encoded):
        return encoded.lower(), "hex digest where RECORD needs urlsafe base64 (a known " \
                                "packaging bug); compared as hex"
    try:
        raw = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
    except (binascii.Error, ValueError):
        return None, f"hash {encoded!r} is not urlsafe base64"
    if len(raw) != 32:
        return None, f"hash {encoded!r} decodes to {len(raw)} bytes, SHA-256 has 32"
    return raw.hex(), None


@dataclass
class _Rows:
    expected: dict[Path, list[tuple[str, str, str]]] = field(default_factory=dict)
    malformed: list[RecordIssue] = field(default_factory=list)
    refused: list[RecordIssue] = field(default_factory=list)
    without_record: list[str] = field(default_factory=list)
    #: Top-level names each site-packages folder's RECORDs (or legacy metadata) account for.
    claimed: dict[str, set[str]] = field(default_factory=dict)


def _legacy_claims(dist: Distribution) -> set[str]:
    """Top-level names a distribution without RECORD accounts for (egg-info top_level.txt)."""
    names = {dist.info_dir.name}
    try:
        top = (dist.info_dir / "top_level.txt").read_text(errors="replace").split()
    except OSError:
        top = []
    for name in top:
        names |= {name, f"{name}.py"}
    return names


def _under(path: str, prefixes: tuple[str, ...] | None) -> bool:
    return prefixes is None or any(path == p or path.startswith(p + os.sep) for p in prefixes)


def _collect_rows(venv: Path, dists: Iterable[Distribution],
                  prefixes: tuple[str, ...] | None = None) -> _Rows:
    """Every hashed RECORD row under `prefixes` (None: all), grouped by the file to read, with
    the rows that cannot be used and the top-level names the RECORDs claim."""
    rows = _Rows()
    prefix = str(venv) + os.sep
    # A venv holds tens of thousands of recorded files in a few thousand folders: resolve each
    # folder once, then only the files that are themselves symlinks. String paths (os.path)
    # here: pathlib objects cost several times more per row in this loop.
    real_dirs: dict[str, str] = {}
    for dist in dists:
        label = f"{dist.name} {dist.version}"
        site = str(dist.site)
        claimed = rows.claimed.setdefault(site, set())
        if dist.info_dir.parent == dist.site:
            claimed.add(dist.info_dir.name)
        try:
            text = (dist.info_dir / "RECORD").read_text(encoding="utf-8",
                                                        errors="surrogateescape")
        except OSError:
            rows.without_record.append(label)
            claimed |= _legacy_claims(dist)
            continue
        for lineno, row in enumerate(csv.reader(text.splitlines()), start=1):
            if not row or not row[0]:
                continue
            name = row[0]
            candidate = os.path.normpath(os.path.join(site, name))  # noqa: PTH118 - hot loop
            if candidate.startswith(site + os.sep):
                claimed.add(candidate[len(site) + 1:].split(os.sep, 1)[0])
            if not _under(candidate, prefixes):
                continue
            if len(row) > 3:
                rows.malformed.append(RecordIssue(label, name, f"{len(row)} fields, RECORD "
                                                  "rows have 3", line=lineno))
                continue
            value = row[1] if len(row) > 1 else ""
            if not value:
                continue  # RECORD itself, and .pyc files compiled at install, carry no hash
            digest, problem = _record_digest(value)
            if problem:
                rows.malformed.append(RecordIssue(label, name, problem, line=lineno))
            if digest is None:
                continue
            parent, base = os.path.split(candidate)
            real_parent = real_dirs.get(parent)
            if real_parent is None:
                real_parent = real_dirs[parent] = os.path.realpath(parent)
            real = os.path.join(real_parent, base)  # noqa: PTH118 - hot loop
            if os.path.islink(real):  # noqa: PTH114 - hot loop
                real = os.path.realpath(real)
            if not (candidate.startswith(prefix) and real.startswith(prefix)):
                rows.refused.append(RecordIssue(label, name, f"resolves to {real}, outside "
                                                f"{venv}", line=lineno))
                continue
            rows.expected.setdefault(Path(candidate), []).append((label, name, digest))
    return rows


def _unrecorded(rows: _Rows, sites: Iterable[Path],
                prefixes: tuple[str, ...] | None) -> list[RecordIssue]:
    """Top-level site-packages entries (under `prefixes`) that nothing installed accounts for."""
    found = []
    for site in sites:
        claimed = rows.claimed.get(str(site), set())
        for child in sorted(site.iterdir()):
            entry, path = child.name, str(child)
            if entry in claimed or entry in UNRECORDED_ALLOWED or not _under(path, prefixes):
                continue
            if entry.endswith(".egg-link"):
                continue  # a legacy develop install's pointer, read as its distribution
            why = ("a .pth file: its import lines run at every interpreter start"
                   if entry.endswith(".pth") else "no installed distribution lists it")
            found.append(RecordIssue("", entry, why))
    return found


def _prefixes(venv: Path, given: Path, paths: Iterable[Path] | None) -> tuple[str, ...] | None:
    """Absolute, resolved forms of the paths a check is limited to (None: everything)."""
    if paths is None:
        return None
    out = []
    for p in paths:
        absolute = Path(p) if Path(p).is_absolute() else given / p
        if absolute.is_relative_to(given) and not absolute.is_relative_to(venv):
            absolute = venv / absolute.relative_to(given)
        # Resolve the parent only: the file itself may be gone or be a symlink.
        out.append(os.path.join(os.path.realpath(absolute.parent), absolute.name))  # noqa: PTH118
    return tuple(out)


def verify_records(venv: Path, *, paths: Iterable[Path] | None = None, workers: int = 0,
                   low_priority: bool = False,
                   stop: threading.Event | None = None) -> RecordReport:
    """Hash every file each distribution's RECORD lists and compare (pip and uv never do).

    Rows without a hash are skipped; rows naming files outside the venv are refused, not read.
    Top-level site-packages entries no RECORD lists are reported (`unrecorded`). `paths` limits
    the check to files and folders under those paths (a watcher's events). Setting `stop`
    abandons the check (hashing.Stopped). Blocking: from an event loop, call it in a thread.
    """
    start = time.monotonic()
    root = venv.resolve()
    prefixes = _prefixes(root, venv.absolute(), paths)
    dists = installed_distributions(root, include_shadowed=True)
    rows = _collect_rows(root, dists, prefixes)
    run = hashing.hash_files_report(rows.expected, workers, low_priority=low_priority,
                                    stop=stop)
    mismatched: list[RecordIssue] = []
    missing: list[RecordIssue] = []
    bytecode: list[RecordIssue] = []
    for path, expectations in rows.expected.items():
        actual = run.digests.get(path)
        for label, name, digest in expectations:
            if actual is None:
                why = run.errors.get(path, hashing.MISSING)
                missing.append(RecordIssue(label, name, "no such file" if why == hashing.MISSING
                                           else f"cannot read: {why}", expected=digest))
            elif actual != digest:
                issue = RecordIssue(label, name, f"sha256 {actual}, RECORD says {digest}",
                                    expected=digest, actual=actual)
                (bytecode if name.endswith(".pyc") else mismatched).append(issue)
    return RecordReport(
        venv=root, files_checked=len(run.digests), bytes_hashed=run.bytes_hashed,
        seconds=time.monotonic() - start, mismatched=tuple(mismatched), missing=tuple(missing),
        unrecorded=tuple(_unrecorded(rows, site_packages(root), prefixes)),
        malformed=tuple(rows.malformed), refused=tuple(rows.refused),
        rewritten_bytecode=tuple(bytecode), without_record=tuple(rows.without_record),
        dists=len(dists))
