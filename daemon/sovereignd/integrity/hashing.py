"""Parallel SHA-256 of many files: the one place that reads files to hash them.

SHA-256 of one file is sequential by nature, so parallelism is across files: each worker thread
reads its file with large `readinto` calls into one reusable buffer and feeds `hashlib`, which
releases the GIL while it hashes more than 2 KiB. One big file therefore uses one core; many
files use all of them.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import hashlib
import mmap
import os
import stat
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

#: Bytes read per call. Reads of 128 KiB to 2 MiB hashed equally fast, 8 and 16 MiB a few
#: percent slower (tests/bench/bench_integrity.py --buffer-sweep): one that fits a core's L2
#: cache, so hashlib reads what the kernel just copied, and little memory per thread.
DEFAULT_BUFFER_SIZE = 2**20

#: Nice value of hashing threads for scheduled re-hashes (Linux; see `lower_thread_priority`).
LOW_PRIORITY_NICE = 10

#: Reason recorded for a file that did not exist when its turn came.
MISSING = "missing"

# A plain flag rather than an inline sys.platform test, so type checkers on one platform still
# check the other platform's branch.
_LINUX = sys.platform.startswith("linux")

_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)


@dataclass
class HashRun:
    """What one `hash_files_report` call found: digests, files it could not read, and its cost."""

    digests: dict[Path, str] = field(default_factory=dict)
    #: Files that could not be hashed, with the reason ("missing", "not a regular file", ...).
    errors: dict[Path, str] = field(default_factory=dict)
    bytes_hashed: int = 0
    seconds: float = 0.0

    @property
    def missing(self) -> list[Path]:
        """Files that did not exist when their turn came (deleted or renamed mid-run)."""
        return [p for p, why in self.errors.items() if why == MISSING]


def resolve_workers(workers: int) -> int:
    """Number of threads for `workers` (0 = one per CPU)."""
    if workers < 0:
        raise ValueError(f"workers must be 0 (one per CPU) or more, got {workers}")
    return workers or os.cpu_count() or 1


def lower_thread_priority() -> bool:
    """Lower the calling thread's CPU (and, via nice, I/O) priority; return whether it could.

    On Linux each thread is its own schedulable task, so `setpriority(PRIO_PROCESS, tid)` touches
    only this thread and the daemon's event loop keeps its priority; the CFQ/BFQ I/O schedulers
    derive I/O priority from nice. On macOS `PRIO_PROCESS` would slow the whole daemon, so the
    thread is put in the Darwin background band instead (`PRIO_DARWIN_THREAD`, Python 3.12+),
    which lowers both CPU and I/O priority; on older Pythons it is left alone.
    """
    if _LINUX:
        tid = threading.get_native_id()
        try:
            # Never raise it: an unprivileged thread may not, and a daemon started at nice 15
            # meant it.
            nice = max(os.getpriority(os.PRIO_PROCESS, tid), LOW_PRIORITY_NICE)
            os.setpriority(os.PRIO_PROCESS, tid, nice)
        except OSError:
            return False
        return True
    darwin_thread = getattr(os, "PRIO_DARWIN_THREAD", None)
    darwin_bg = getattr(os, "PRIO_DARWIN_BG", None)
    if darwin_thread is not None and darwin_bg is not None:
        try:
            os.setpriority(darwin_thread, 0, darwin_bg)
        except OSError:
            return False
        return True
    return False


def _describe(exc: OSError) -> str:
    if exc.errno == errno.ENOENT:
        return MISSING
    if exc.errno == errno.ELOOP:
        return "symlink loop"
    if exc.errno == errno.EISDIR:
        return "not a regular file (a directory)"
    return exc.strerror or str(exc)


@contextlib.contextmanager
def _read_buffer(size: int) -> Iterator[memoryview]:
    """A page-aligned buffer of `size` bytes for one hashing thread.

    Alignment matters: a bytearray starts 16 bytes into its allocation, and copying page-cache
    pages into a destination that is not cache-line aligned made read+hash 30 % slower on the
    AMD EPYC this was measured on (1.0 vs 1.42 GB/s per core). An anonymous mmap is aligned.
    """
    with mmap.mmap(-1, size) as buffer:
        view = memoryview(buffer)
        try:
            yield view
        finally:
            view.release()


class Stopped(Exception):
    """Raised by a hashing call whose `stop` event was set: the run was abandoned part-way."""


def _hash_one(path: Path, view: memoryview,
              stop: threading.Event | None = None) -> tuple[str, int]:
    """SHA-256 of one regular file read through `view`; raise OSError on any read problem."""
    # O_NONBLOCK: opening a FIFO planted in the model folder must fail the check, not hang it.
    fd = os.open(path, _OPEN_FLAGS)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        if hasattr(os, "posix_fadvise") and st.st_size > len(view):
            # Doubles the kernel's read-ahead window on a cold cache; harmless when warm, and
            # a wasted syscall for the thousands of small files of a venv.
            with contextlib.suppress(OSError):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        h = hashlib.sha256()
        total = 0
        # readv into the worker's buffer: no allocation per chunk, and the GIL is released
        # both while the kernel copies and while hashlib hashes.
        while n := os.readv(fd, [view]):
            h.update(view[:n])
            total += n
            if stop is not None and stop.is_set():
                raise Stopped
        return h.hexdigest(), total
    finally:
        os.close(fd)


def hash_file(path: Path, buffer_size: int = DEFAULT_BUFFER_SIZE) -> str:
    """SHA-256 hex digest of one file; raise OSError if it cannot be read."""
    with _read_buffer(buffer_size) as view:
        digest, _ = _hash_one(path, view)
    return digest


def hash_files_report(paths: Iterable[Path], workers: int = 0, *, low_priority: bool = False,
                      buffer_size: int = DEFAULT_BUFFER_SIZE,
                      stop: threading.Event | None = None) -> HashRun:
    """Hash every file in `paths` on `workers` threads; unreadable files land in `errors`.

    Files are taken largest first so the last big file does not run alone on one core while
    the others idle. `low_priority` lowers the worker threads' priority (scheduled re-hashes);
    the pool is private to this call, because a lowered thread cannot raise itself again.
    Setting `stop` (e.g. at daemon shutdown) ends the run within one buffer per thread and
    raises Stopped. Blocking: from an event loop, call it in a thread.
    """
    start = time.monotonic()
    run = HashRun()
    sized: list[tuple[int, Path]] = []
    for path in dict.fromkeys(paths):
        try:
            sized.append((path.stat().st_size, path))
        except OSError as exc:
            run.errors[path] = _describe(exc)
    sized.sort(key=lambda item: item[0], reverse=True)
    queue = collections.deque(path for _, path in sized)
    lock = threading.Lock()

    def worker() -> None:
        if low_priority:
            lower_thread_priority()
        with _read_buffer(buffer_size) as view:
            while True:
                try:
                    path = queue.popleft()  # deque.popleft is atomic: no lock to share work
                except IndexError:
                    return
                try:
                    digest, size = _hash_one(path, view, stop)
                except Stopped:
                    queue.clear()  # the other threads find nothing left and end too
                    raise
                except OSError as exc:
                    with lock:
                        run.errors[path] = _describe(exc)
                    continue
                with lock:
                    run.digests[path] = digest
                    run.bytes_hashed += size

    count = min(resolve_workers(workers), len(queue))
    if count <= 1 and not low_priority:
        worker()  # no thread for the common one-file case (the daemon re-checks single files)
    elif count:
        with ThreadPoolExecutor(max_workers=count, thread_name_prefix="sovereignd-hash") as pool:
            for future in [pool.submit(worker) for _ in range(count)]:
                future.result()
    run.seconds = time.monotonic() - start
    return run


def hash_files(paths: Iterable[Path], workers: int = 0, *, low_priority: bool = False,
               stop: threading.Event | None = None) -> dict[Path, str]:
    """SHA-256 hex digest of each readable file in `paths`; files that vanished are left out.

    Use `hash_files_report` to learn which files could not be read and why.
    """
    return hash_files_report(paths, workers, low_priority=low_priority, stop=stop).digests
