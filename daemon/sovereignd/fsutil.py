"""File-system helpers shared by every module that writes a file as a whole."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def atomic_write(path: Path, data: bytes, mode: int = 0o644,
                 owner: tuple[int, int] | None = None) -> None:
    """Write `data` to a temporary file beside `path`, fsync it, and move it into place.

    Readers see the old content or the new, never a partial file (gunicorn's pidfile,
    prometheus' write_to_textfile). `owner` (uid, gid) is set before the move, so a file
    that must stay readable by a group is never briefly unreadable.
    """
    # A folder made here (state_dir by `logs init-key`, which may be logs.dir) must not be
    # open to other accounts: the guard rails refuse a log folder readable by others.
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if owner is not None:
            os.fchown(fd, *owner)
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        Path(tmp).replace(path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            Path(tmp).unlink()
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    # The rename is durable only once the directory entry is on disk.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
