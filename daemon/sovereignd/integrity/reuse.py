"""Reusing a full verification of files that have not changed since (AIDE's and IMA's idea:
a file whose inode metadata is unchanged since it was measured need not be measured again).

A full verification of a server venv hashes every installed file (~9-10 s for the vLLM CPU
build on 2 cores). Models often share one venv, and an on_demand model's guard is created
afresh at each start, so without this every on_demand start re-hashed a venv that another
model's guard, or its own previous start, had just verified.

The proof that nothing changed is a fingerprint taken BEFORE the verification hashed the
files: every entry under the verified roots with its (inode, size, mtime_ns, ctime_ns), not
following symlinks. Any write, rename, replacement, chmod or chown changes one of these,
ctime included, which no unprivileged process can set back (utimensat(2) sets atime and mtime
only; ctime is set by the kernel to the current time on every inode change, see inode(7)).
A file changed while it was being hashed therefore fails the next comparison too. A
verification is reused only when its key (what was verified, against which baseline, with
which checks) is the same and the fingerprint is equal now; anything else, or any error
while looking, means the full verification runs as before.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Fingerprint:
    """The digest of every entry's (path, inode, size, mtime_ns, ctime_ns, mode) under some
    roots, and how many entries it covers."""

    digest: str
    entries: int


def fingerprint(roots: Iterable[Path]) -> Fingerprint:
    """Walk `roots` (sorted, symlinks not followed) and digest each entry's stat.
    OSError when a root cannot be read (the caller then verifies in full)."""
    h = hashlib.sha256()
    count = 0
    for root in sorted({os.path.realpath(r) for r in roots}):
        st = os.lstat(root)
        h.update(f"{root}\0{st.st_ino}\0{st.st_mode}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\n"
                 .encode(errors="surrogateescape"))
        stack = [root]
        while stack:
            folder = stack.pop()
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
            for entry in entries:
                st = entry.stat(follow_symlinks=False)
                h.update(f"{entry.path}\0{st.st_ino}\0{st.st_size}\0{st.st_mode}\0"
                         f"{st.st_mtime_ns}\0{st.st_ctime_ns}\n".encode(errors="surrogateescape"))
                count += 1
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
    return Fingerprint(h.hexdigest(), count)


@dataclass(frozen=True)
class Verification:
    """A full verification that found nothing: when (wall clock, seconds since the epoch),
    for which model, its fingerprint and the figures its event reported."""

    fingerprint: Fingerprint
    at: float
    by: str
    fields: dict[str, Any]


@dataclass
class Verifications:
    """The daemon's passed full verifications by key; one per daemon, shared by the guards of
    every model (held in memory only: a daemon restart verifies in full again)."""

    passed: dict[tuple[Any, ...], Verification] = field(default_factory=dict)

    def record(self, key: tuple[Any, ...], fp: Fingerprint, by: str,
               fields: dict[str, Any]) -> None:
        self.passed[key] = Verification(fp, time.time(), by, dict(fields))

    def forget(self, key: tuple[Any, ...]) -> None:
        self.passed.pop(key, None)

    def reusable(self, key: tuple[Any, ...], roots: Iterable[Path]) -> Verification | None:
        """The passed verification under `key` if every entry under `roots` is unchanged
        since it (blocking: walks the roots); None (and forgotten) otherwise."""
        known = self.passed.get(key)
        if known is None:
            return None
        try:
            now = fingerprint(roots)
        except OSError:
            now = None
        if now != known.fingerprint:
            self.forget(key)
            return None
        return known
