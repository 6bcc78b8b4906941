"""Parallel file hashing: same digests as hashlib, vanished files reported, low priority."""

from __future__ import annotations

import hashlib
import os
import sys
import threading
from pathlib import Path

import pytest

from sovereignd.integrity import hashing


def _files(tmp_path: Path) -> dict[Path, bytes]:
    contents = {
        tmp_path / "empty": b"",
        tmp_path / "small": b"hello\n",
        tmp_path / "exact-buffer": os.urandom(64 * 1024),
        tmp_path / "several-buffers": os.urandom(3 * 64 * 1024 + 17),
    }
    for path, data in contents.items():
        path.write_bytes(data)
    return contents


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_digests_match_hashlib_for_any_worker_count(tmp_path: Path, workers: int) -> None:
    contents = _files(tmp_path)
    run = hashing.hash_files_report(list(contents), workers, buffer_size=64 * 1024)
    assert run.digests == {p: hashlib.sha256(d).hexdigest() for p, d in contents.items()}
    assert run.bytes_hashed == sum(len(d) for d in contents.values())
    assert not run.errors


def test_a_file_that_vanished_is_reported_missing_not_raised(tmp_path: Path) -> None:
    contents = _files(tmp_path)
    gone = tmp_path / "gone"
    digests = hashing.hash_files([*contents, gone])
    assert gone not in digests and len(digests) == len(contents)
    run = hashing.hash_files_report([gone, *contents])
    assert run.missing == [gone]


def test_folders_and_fifos_are_errors_and_a_fifo_does_not_hang(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    run = hashing.hash_files_report([tmp_path, fifo], 2)
    assert set(run.errors) == {tmp_path, fifo}
    assert "not a regular file" in run.errors[fifo]


def test_hash_file_reads_one_file(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    assert hashing.hash_file(path) == hashlib.sha256(b"abc").hexdigest()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux's")
def test_low_priority_lowers_only_the_calling_thread() -> None:
    seen: list[int] = []

    def worker() -> None:
        assert hashing.lower_thread_priority()
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))

    before = os.getpriority(os.PRIO_PROCESS, 0)
    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == [max(before, hashing.LOW_PRIORITY_NICE)]
    assert os.getpriority(os.PRIO_PROCESS, 0) == before


def test_low_priority_run_still_hashes(tmp_path: Path) -> None:
    contents = _files(tmp_path)
    run = hashing.hash_files_report(list(contents), 2, low_priority=True)
    assert len(run.digests) == len(contents)


def test_negative_workers_is_refused() -> None:
    with pytest.raises(ValueError, match="workers"):
        hashing.resolve_workers(-1)


@pytest.mark.parametrize("workers", [1, 2])
def test_setting_stop_abandons_the_run(tmp_path: Path, workers: int) -> None:
    contents = _files(tmp_path)
    stop = threading.Event()
    stop.set()
    with pytest.raises(hashing.Stopped):
        hashing.hash_files_report(list(contents), workers, buffer_size=64 * 1024, stop=stop)
