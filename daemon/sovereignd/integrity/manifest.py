"""The weights manifest: what `shasum -a 256` writes, and the model folder checked against it.

Format. One line per file, `<64 hex>  ./relative/path`, sorted bytewise (as `LC_ALL=C sort`
orders `find` output); written byte-identical to `find . -type f | sort | xargs shasum -a 256`
and `sha256sum`, so operators can check it with either tool. Read leniently the way those
tools write and check it: `*` binary marker, paths with or without `./`, upper-case hex, the
GNU/shasum escaping of names holding a backslash or newline (line starts with `\\`), a
trailing CR (`sha256sum -c` strips it), blank lines, and `#` comment lines (both
`shasum -c` and `sha256sum -c` skip them). Never written: comments, blank lines.

Which files. Every regular file under the model folder, recursively, hidden ones included
(an injected `.py` next to a `trust_remote_code` model is drift whatever its name), except the
manifest itself and its in-progress temporary siblings, and `BOOKKEEPING_DIRS`.

Path safety. A manifest path may not be absolute or use `..`; what a path finally resolves to
must lie inside the model folder, its Hugging Face cache repo (when the model folder is a
snapshot of a hub cache, detected from the layout), or `integrity.allowed_roots`. Symlinks to
folders are not followed. Anything else is UNSAFE.
"""

from __future__ import annotations

import enum
import errno
import hashlib
import os
import stat
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from sovereignd.errors import CheckFailed, ManifestError
from sovereignd.fsutil import atomic_write
from sovereignd.integrity import hashing, safetensors
from sovereignd.units import human_rate, human_size

#: File name `manifest create` writes inside the model folder when not told otherwise.
DEFAULT_NAME = "CHECKSUMS.sha256"

#: Folders, relative to the model folder, that tools keep for their own bookkeeping and the server
#: never reads: `huggingface-cli download --local-dir` keeps download metadata and locks in
#: `.cache/huggingface`, and git rewrites `.git/index` on every `git status` (git-lfs also keeps a
#: second copy of each weight there). They are neither listed nor reported as EXTRA; a manifest
#: that lists files inside them is still checked. (The hub cache's own `.locks` folder lies
#: beside `models--*`, outside every snapshot, so it never appears here.)
BOOKKEEPING_DIRS = (".cache/huggingface", ".git")

_HEX = frozenset("0123456789abcdefABCDEF")


# ---------------------------------------------------------------------------------------------
# The shasum line format, shared with the frozen requirements' `.sha256` companion


@dataclass(frozen=True)
class SumLine:
    """One `<hex>  name` line: the digest (lower-case), the name as written, its line number."""

    digest: str
    name: str
    line: int
    binary: bool = False


def _unescape(name: bytes, source: str, lineno: int) -> bytes:
    out = bytearray()
    i = 0
    while i < len(name):
        c = name[i]
        if c == 0x5C:  # backslash
            nxt = name[i + 1:i + 2]
            if nxt == b"\\":
                out += b"\\"
            elif nxt == b"n":
                out += b"\n"
            elif nxt == b"r":  # coreutils 9.2+ also escapes CR
                out += b"\r"
            else:
                raise ManifestError(f"unknown escape \\{nxt.decode(errors='replace')} in an "
                                    "escaped file name (only \\\\, \\n and \\r exist)",
                                    source=source, line=lineno)
            i += 2
        else:
            out.append(c)
            i += 1
    return bytes(out)


def parse_sum_lines(data: bytes, source: str) -> list[SumLine]:
    """Parse `shasum -a 256` / `sha256sum` output; raise ManifestError naming the bad line."""
    out: list[SumLine] = []
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        line = raw.removesuffix(b"\r")
        if not line.strip() or line.startswith(b"#"):
            continue
        escaped = line.startswith(b"\\")
        if escaped:
            line = line[1:]
        digest_b, sep, rest = line.partition(b" ")
        text = raw.decode(errors="replace")
        if line.startswith((b"SHA256 (", b"SHA256(")):
            raise ManifestError("BSD-style tagged line (written with --tag); write the "
                                "manifest without --tag", source=source, line=lineno)
        if not sep:
            raise ManifestError(f"expected '<64 hex digits>  <path>' as shasum -a 256 writes "
                                f"it, got {text!r}", source=source, line=lineno)
        digest = digest_b.decode(errors="replace")
        if not digest or not set(digest) <= _HEX:
            raise ManifestError(f"{digest!r} is not a hexadecimal digest; expected "
                                "'<64 hex digits>  <path>'", source=source, line=lineno)
        if len(digest) != 64:
            raise ManifestError(f"the digest has {len(digest)} hex digits, SHA-256 has 64 (was "
                                "this written by another algorithm, e.g. plain shasum, which "
                                "is SHA-1?)", source=source, line=lineno)
        mode, name = rest[:1], rest[1:]
        if mode == b"^":
            raise ManifestError("universal-newlines mode (^) hashes text differently; write "
                                "the manifest with shasum -a 256 (no -U)",
                                source=source, line=lineno)
        if mode not in (b" ", b"*"):
            raise ManifestError("expected two spaces (or ' *') between the digest and the "
                                f"path, got {text!r}", source=source, line=lineno)
        if not name:
            raise ManifestError("the line has a digest but no path", source=source, line=lineno)
        if escaped:
            name = _unescape(name, source, lineno)
        out.append(SumLine(digest=digest.lower(), name=os.fsdecode(name), line=lineno,
                           binary=mode == b"*"))
    return out


def format_sum_line(digest: str, name: str) -> bytes:
    """One line exactly as `shasum -a 256` and GNU `sha256sum` (9.1) write it, with newline."""
    raw = os.fsencode(name)
    if b"\\" in raw or b"\n" in raw:
        return (b"\\" + digest.encode() + b"  "
                + raw.replace(b"\\", b"\\\\").replace(b"\n", b"\\n") + b"\n")
    return digest.encode() + b"  " + raw + b"\n"


# ---------------------------------------------------------------------------------------------
# The manifest


@dataclass(frozen=True)
class Manifest:
    """Approved digests by relative path (no `./`), with where they were read from."""

    digests: Mapping[str, str]
    source: str = "manifest"
    #: SHA-256 of the manifest's bytes as read or written ("" for one built in memory).
    sha256: str = ""
    #: Line number of each entry in the file it was read from.
    lines: Mapping[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.digests)

    def render(self) -> bytes:
        """The manifest's bytes, as `shasum -a 256` would write them from the model folder."""
        return render_manifest(self.digests)


def normalize_path(name: str, source: str = "manifest", line: int | None = None) -> str:
    """A manifest path as a relative POSIX path without `./`; raise ManifestError if unsafe."""
    if not name:
        raise ManifestError("empty path", source=source, line=line)
    if name.startswith("/"):
        raise ManifestError(f"absolute path {name!r}: manifest paths are relative to the model "
                            "folder (./path)", source=source, line=line)
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ManifestError(f"path {name!r} leaves the model folder with '..'",
                            source=source, line=line)
    if not parts:
        raise ManifestError(f"path {name!r} names the model folder itself, not a file",
                            source=source, line=line)
    return "/".join(parts)


def parse_manifest(data: bytes, source: str = "manifest") -> Manifest:
    """Parse manifest bytes; raise ManifestError with the line number of the first problem."""
    digests: dict[str, str] = {}
    lines: dict[str, int] = {}
    for entry in parse_sum_lines(data, source):
        rel = normalize_path(entry.name, source, entry.line)
        if rel in digests:
            raise ManifestError(f"./{rel} is listed twice (first at line {lines[rel]})",
                                source=source, line=entry.line)
        digests[rel] = entry.digest
        lines[rel] = entry.line
    if not digests:
        raise ManifestError("the manifest lists no files; write it with `sovereignd manifest "
                            "create MODEL_DIR`", source=source)
    return Manifest(digests=digests, source=source, sha256=hashlib.sha256(data).hexdigest(),
                    lines=lines)


def read_manifest(path: Path) -> Manifest:
    """Read and parse a manifest file; raise ManifestError if it is unreadable or malformed."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ManifestError(f"cannot read the manifest: {exc.strerror or exc}; write it with "
                            "`sovereignd manifest create MODEL_DIR` or `sovereignd baseline`",
                            source=str(path)) from exc
    return parse_manifest(data, str(path))


def _sort_key(rel: str) -> bytes:
    return os.fsencode(rel)


def render_manifest(digests: Mapping[str, str]) -> bytes:
    """Manifest bytes: `<hex>  ./path` lines, sorted bytewise, escaped as shasum escapes."""
    return b"".join(format_sum_line(digests[rel], f"./{rel}")
                    for rel in sorted(digests, key=_sort_key))


def write_manifest(path: Path, manifest: Manifest) -> str:
    """Write the manifest atomically (temporary file, fsync, rename); return its SHA-256."""
    data = manifest.render()
    atomic_write(path, data, mode=0o644)
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str:
    """SHA-256 of one file's bytes (the value `integrity.manifest_sha256` pins)."""
    return hashing.hash_file(path)


def check_manifest_pin(path: Path, expected: str) -> str:
    """Check the manifest file's own SHA-256 against a pin; return it, or raise ManifestError."""
    try:
        actual = file_sha256(path)
    except OSError as exc:
        raise ManifestError(f"cannot read the manifest: {exc.strerror or exc}",
                            source=str(path)) from exc
    if actual != expected.lower():
        raise ManifestError(f"its SHA-256 is {actual}, but integrity.manifest_sha256 pins "
                            f"{expected.lower()}: the manifest changed after it was approved. "
                            "Restore the approved manifest, or re-approve it and update the pin",
                            source=str(path))
    return actual


# ---------------------------------------------------------------------------------------------
# The model folder: which files it holds, and whether each is safe to read


def hf_cache_repo(model_dir: Path) -> Path | None:
    """The `models--org--name` folder if `model_dir` is a snapshot in a Hugging Face hub cache.

    The layout is `models--org--name/snapshots/<revision>/<file>`, each file a symlink to
    `../../blobs/<hash>`; those symlinks are followed when they stay inside that repo folder.
    """
    snap = model_dir.resolve()
    repo = snap.parent.parent
    if (snap.parent.name == "snapshots" and repo.name.startswith("models--")
            and (repo / "blobs").is_dir()):
        return repo
    return None


@dataclass(frozen=True)
class ModelFiles:
    """The model folder's files: relative path → path to read, and what was refused and why."""

    root: Path
    files: dict[str, Path]
    unsafe: dict[str, str]
    #: Folders whose contents may be read through symlinks (root, HF cache repo, allowed roots).
    roots: tuple[Path, ...]


def _allowed_roots(root: Path, allowed_roots: Iterable[Path]) -> tuple[Path, ...]:
    roots = [root]
    repo = hf_cache_repo(root)
    if repo is not None:
        roots.append(repo)
    roots.extend(Path(r).resolve() for r in allowed_roots)
    return tuple(roots)


def _inside(path: Path, roots: tuple[Path, ...]) -> bool:
    return any(path == r or path.is_relative_to(r) for r in roots)


_KINDS = {stat.S_IFDIR: "a folder", stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket",
          stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device"}


def _kind(mode: int) -> str:
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


class _Refused(Exception):
    """Internal: a path is not read; `missing` tells MISSING from UNSAFE."""

    def __init__(self, missing: bool, why: str, broken_link: bool = False) -> None:
        super().__init__(why)
        self.missing = missing
        self.why = why
        self.broken_link = broken_link


def _readable(root: Path, rel: str, roots: tuple[Path, ...]) -> Path:
    """The path to read for `rel`, after the safety checks; raise _Refused otherwise."""
    path = root / rel
    try:
        lst = path.lstat()
    except FileNotFoundError:
        raise _Refused(True, "no such file") from None
    except NotADirectoryError:
        raise _Refused(True, "a parent of the path is a file, not a folder") from None
    except OSError as exc:
        raise _Refused(False, f"cannot stat: {exc.strerror or exc}") from exc
    real = Path(os.path.realpath(path))
    if not _inside(real, roots):
        where = "symlink to" if stat.S_ISLNK(lst.st_mode) else "resolves to"
        raise _Refused(False, f"{where} {real}, outside the model folder and "
                              "integrity.allowed_roots")
    if stat.S_ISLNK(lst.st_mode):
        try:
            st = real.stat()
        except OSError:
            raise _Refused(True, f"broken symlink to {real}", broken_link=True) from None
        if not stat.S_ISREG(st.st_mode):
            raise _Refused(False, f"symlink to {_kind(st.st_mode)} ({real}); only files are "
                                  "followed")
        return real
    if not stat.S_ISREG(lst.st_mode):
        raise _Refused(False, f"{_kind(lst.st_mode)}, not a regular file")
    return real


def _excluded_names(root: Path,
                    exclude: Iterable[Path]) -> tuple[set[str], set[tuple[str, str]]]:
    """Relative paths to leave out (the manifest), and (folder, name) of its temp siblings."""
    names: set[str] = set()
    siblings: set[tuple[str, str]] = set()
    for p in exclude:
        full = Path(os.path.realpath(p.parent)) / p.name
        if full.is_relative_to(root):
            rel = full.relative_to(root).as_posix()
            names.add(rel)
            parent = full.parent.relative_to(root).as_posix()
            siblings.add(("" if parent == "." else parent, p.name))
    return names, siblings


def _walk(root: Path, exclude: Iterable[Path]) -> Iterator[str]:
    """Relative paths of all entries under root but folders; folder symlinks are not followed."""
    names, siblings = _excluded_names(root, exclude)
    stack = [""]
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(root / folder if folder else root))
        except FileNotFoundError:
            continue  # removed while we walked
        except OSError as exc:
            raise CheckFailed(f"cannot list {root / folder}: {exc.strerror or exc}; the "
                              "account checking the model must be able to read all of it"
                              ) from exc
        for entry in entries:
            rel = f"{folder}/{entry.name}" if folder else entry.name
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
            except OSError:
                is_dir = False
            if is_dir:
                if rel not in BOOKKEEPING_DIRS and rel not in names:
                    stack.append(rel)
                continue
            # fsutil.atomic_write names its temporary file ".<name>.<random>.tmp".
            if rel in names or any(
                    folder == d and entry.name.startswith(f".{n}.") and entry.name.endswith(".tmp")
                    for d, n in siblings):
                continue
            yield rel


def list_model_files(model_dir: Path, *, exclude: Iterable[Path] = (),
                     allowed_roots: Iterable[Path] = ()) -> ModelFiles:
    """Every file of the model folder, recursively, split into safe-to-read and refused.

    `exclude` names files to leave out (the manifest); their `.tmp` siblings go too.
    """
    root = model_dir.resolve()
    if not root.is_dir():
        raise CheckFailed(f"model folder {model_dir} does not exist or is not a folder")
    roots = _allowed_roots(root, allowed_roots)
    files: dict[str, Path] = {}
    unsafe: dict[str, str] = {}
    for rel in _walk(root, exclude):
        try:
            files[rel] = _readable(root, rel, roots)
        except _Refused as refused:
            if not refused.missing or refused.broken_link:  # else it vanished since the walk
                unsafe[rel] = refused.why
    return ModelFiles(root=root, files=files, unsafe=unsafe, roots=roots)


# ---------------------------------------------------------------------------------------------
# Creating a manifest


@dataclass(frozen=True)
class CreateResult:
    """A manifest made from the model folder, and what it cost."""

    manifest: Manifest
    bytes_hashed: int
    seconds: float


def create_manifest(model_dir: Path, *, manifest_path: Path | None = None,
                    allowed_roots: Iterable[Path] = (), workers: int = 0,
                    low_priority: bool = False, check_headers: bool = True) -> CreateResult:
    """Hash every file of the model folder into a Manifest; raise CheckFailed if any is unsafe.

    `manifest_path` (default: MODEL_DIR/CHECKSUMS.sha256) is left out of the listing. With
    `check_headers`, a safetensors file whose header shows it corrupt is refused too: approving
    a truncated shard would only move the failure to the server's start.
    """
    target = manifest_path or model_dir / DEFAULT_NAME
    listing = list_model_files(model_dir, exclude=[target], allowed_roots=allowed_roots)
    if listing.unsafe:
        lines = "\n".join(f"  ./{rel}: {why}" for rel, why in sorted(listing.unsafe.items()))
        raise CheckFailed(f"refusing to write a manifest for {listing.root}: "
                          f"{len(listing.unsafe)} path(s) unsafe to read:\n{lines}\n"
                          "Remove them, replace symlinks by the files, or add their real "
                          "folder to integrity.allowed_roots (--allowed-root)")
    if not listing.files:
        raise CheckFailed(f"model folder {listing.root} holds no files")
    if check_headers:
        bad = safetensors.check_safetensors_files(listing.files)
        if bad:
            lines = "\n".join(f"  ./{rel}: {exc.reason}" for rel, exc in bad.items())
            raise CheckFailed(f"refusing to write a manifest for {listing.root}: "
                              f"{len(bad)} safetensors file(s) are corrupt:\n{lines}\n"
                              "Restore them from the source before approving the model")
    by_target = {path: rel for rel, path in listing.files.items()}
    run = hashing.hash_files_report(list(by_target), workers, low_priority=low_priority)
    digests: dict[str, str] = {}
    for rel, path in listing.files.items():
        if path in run.digests:
            digests[rel] = run.digests[path]
    if run.errors or len(digests) != len(listing.files):
        gone = "\n".join(f"  ./{by_target[p]}: {why}" for p, why in sorted(run.errors.items()))
        raise CheckFailed(f"files changed while the manifest was being made:\n{gone}\n"
                          "Run again once the model folder is complete")
    manifest = Manifest(digests=digests, source=str(target))
    return CreateResult(manifest=manifest, bytes_hashed=run.bytes_hashed, seconds=run.seconds)


# ---------------------------------------------------------------------------------------------
# Verifying


class Status(enum.StrEnum):
    """Outcome for one file, as `manifest verify` prints it."""

    OK = "OK"
    FAILED = "FAILED"    # listed; content differs (or cannot be read, like shasum's FAILED open)
    MISSING = "MISSING"  # listed; not there
    EXTRA = "EXTRA"      # there; not listed
    UNSAFE = "UNSAFE"    # symlink leaving the allowed folders, or not a regular file


@dataclass(frozen=True)
class FileResult:
    """One file's outcome; `expected`/`actual` are digests where they are known."""

    path: str
    status: Status
    expected: str | None = None
    actual: str | None = None
    detail: str = ""

    def render(self) -> str:
        """`./path: STATUS` as `shasum -c` prints it, plus the reason when it is not OK."""
        name = f"./{self.path}"
        if "\n" in name:  # as sha256sum -c prints such names
            name = "\\" + name.replace("\\", "\\\\").replace("\n", "\\n")
        line = f"{name}: {self.status}"
        extra = []
        if self.status is Status.FAILED and self.expected and self.actual:
            extra.append(f"expected {self.expected}, got {self.actual}")
        if self.detail:
            extra.append(self.detail)
        return f"{line} ({'; '.join(extra)})" if extra else line


@dataclass(frozen=True)
class VerifyReport:
    """Every checked file's outcome, with the bytes hashed and the time taken."""

    model_dir: Path
    results: tuple[FileResult, ...]
    bytes_hashed: int
    seconds: float

    @property
    def ok(self) -> bool:
        """True only if every checked file is OK (nothing missing, extra or unsafe)."""
        return all(r.status is Status.OK for r in self.results)

    @property
    def problems(self) -> tuple[FileResult, ...]:
        """Every result that is not OK, in path order."""
        return tuple(r for r in self.results if r.status is not Status.OK)

    def counts(self) -> dict[Status, int]:
        """How many files have each status."""
        out = dict.fromkeys(Status, 0)
        for r in self.results:
            out[r.status] += 1
        return out

    def lines(self, quiet: bool = False) -> list[str]:
        """One line per file (only the problems when `quiet`), as `shasum -c` prints them."""
        return [r.render() for r in (self.problems if quiet else self.results)]

    def summary(self) -> str:
        """One line: counts per status, bytes hashed, time and throughput."""
        counts = ", ".join(f"{n} {s}" for s, n in self.counts().items() if n)
        return (f"{len(self.results)} file(s): {counts or 'nothing to check'}; "
                f"{human_size(self.bytes_hashed)} hashed in {self.seconds:.2f} s "
                f"({human_rate(self.bytes_hashed, self.seconds)})")


def _relative_name(absolute: Path, given_root: Path, root: Path) -> str | None:
    """`absolute` relative to the model folder ("." for the folder itself), None if outside."""
    for base in (given_root, root):
        if absolute.is_relative_to(base):
            return absolute.relative_to(base).as_posix()
    # Reached through a symlinked parent (/tmp and /private/tmp on macOS): resolve the parent
    # only, since the file itself may be gone, or be a symlink that must not be followed.
    real = Path(os.path.realpath(absolute.parent)) / absolute.name
    if real.is_relative_to(root):
        return real.relative_to(root).as_posix()
    return None


def _subset_filter(root: Path, given_root: Path,
                   paths: Iterable[str | Path] | None) -> tuple[str, ...] | None:
    """Relative prefixes to check (None: everything), from relative names or absolute paths.

    Absolute paths outside the model folder are ignored: a watcher may pass the manifest's own
    path, or events from beside the folder.
    """
    if paths is None:
        return None
    out: list[str] = []
    for p in paths:
        if Path(p).is_absolute():
            rel = _relative_name(Path(p), given_root, root)
            if rel == ".":
                return None
            if rel is not None:
                out.append(rel)
            continue
        parts = [s for s in str(p).split("/") if s not in ("", ".")]
        if not parts:
            return None
        if ".." not in parts:
            out.append("/".join(parts))
    return tuple(out)


def _selected(rel: str, prefixes: tuple[str, ...] | None) -> bool:
    return prefixes is None or any(rel == p or rel.startswith(p + "/") for p in prefixes)


def verify_manifest(model_dir: Path, manifest: Manifest, *,
                    paths: Iterable[str | Path] | None = None,
                    manifest_path: Path | None = None, allowed_roots: Iterable[Path] = (),
                    workers: int = 0, low_priority: bool = False,
                    stop: threading.Event | None = None,
                    ignore: Iterable[Path] = ()) -> VerifyReport:
    """Check the model folder against the manifest: OK, FAILED, MISSING, EXTRA or UNSAFE per file.

    `paths` limits the check to those files or folders (relative names, or absolute paths as
    a file watcher reports them); listed files under them are re-hashed and unlisted ones
    reported EXTRA. `manifest_path` is excluded from the EXTRA files (default:
    MODEL_DIR/CHECKSUMS.sha256). `low_priority` is for scheduled re-hashes; setting `stop`
    abandons the check (hashing.Stopped). `ignore` names further files or folders left out as
    the manifest is (a signature's `ignore_paths`). Raises CheckFailed if the model folder is
    missing or cannot be listed. Blocking: from an event loop, call it in a thread.
    """
    start = time.monotonic()
    target = manifest_path or model_dir / DEFAULT_NAME
    listing = list_model_files(model_dir, exclude=[target, *ignore],
                               allowed_roots=allowed_roots)
    root = listing.root
    prefixes = _subset_filter(root, model_dir.absolute(), paths)
    itself, _ = _excluded_names(root, [target, *ignore])
    results: dict[str, FileResult] = {}
    to_hash: dict[str, Path] = {}
    for rel, expected in manifest.digests.items():
        # `find . -type f | xargs shasum > CHECKSUMS.sha256` lists the half-written manifest
        # itself; no file can hold its own digest, so that entry is not checked.
        if not _selected(rel, prefixes) or rel in itself:
            continue
        try:
            to_hash[rel] = _readable(root, rel, listing.roots)
        except _Refused as refused:
            status = Status.MISSING if refused.missing else Status.UNSAFE
            results[rel] = FileResult(rel, status, expected=expected, detail=refused.why)
    for rel, reason in listing.unsafe.items():
        if _selected(rel, prefixes) and rel not in results:
            results[rel] = FileResult(rel, Status.UNSAFE, expected=manifest.digests.get(rel),
                                      detail=reason)
    for rel in listing.files:
        if _selected(rel, prefixes) and rel not in manifest.digests:
            results[rel] = FileResult(rel, Status.EXTRA, detail="not in the manifest")
    run = hashing.hash_files_report(set(to_hash.values()), workers, low_priority=low_priority,
                                    stop=stop)
    for rel, path in to_hash.items():
        expected = manifest.digests[rel]
        actual = run.digests.get(path)
        if actual is None:
            error = run.errors.get(path, hashing.MISSING)
            if error == hashing.MISSING:
                results[rel] = FileResult(rel, Status.MISSING, expected=expected,
                                          detail="disappeared during the check")
            else:
                results[rel] = FileResult(rel, Status.FAILED, expected=expected,
                                          detail=f"cannot read: {error}")
        elif actual == expected:
            results[rel] = FileResult(rel, Status.OK, expected=expected, actual=actual)
        else:
            detail = ""
            if rel.endswith(".safetensors"):
                problem = safetensors.check_safetensors_files({rel: path}).get(rel)
                detail = problem.reason if problem else ""
            results[rel] = FileResult(rel, Status.FAILED, expected=expected, actual=actual,
                                      detail=detail)
    ordered = tuple(results[rel] for rel in sorted(results, key=_sort_key))
    return VerifyReport(model_dir=root, results=ordered, bytes_hashed=run.bytes_hashed,
                        seconds=time.monotonic() - start)


# ---------------------------------------------------------------------------------------------
# The cheap stat check between re-hashes


@dataclass(frozen=True)
class FileStat:
    """What a cheap check compares: any change to content or metadata moves one of these."""

    size: int
    mtime_ns: int
    ino: int
    ctime_ns: int
    dev: int = 0


StatSnapshot = dict[str, FileStat]


def _file_stat(path: Path) -> FileStat | None:
    try:
        st = path.stat()  # follows symlinks: a hub-cache blob's own inode and times
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
            raise
        try:
            st = path.lstat()  # a broken symlink still has its own identity
        except OSError:
            return None
    return FileStat(size=st.st_size, mtime_ns=st.st_mtime_ns, ino=st.st_ino,
                    ctime_ns=st.st_ctime_ns, dev=st.st_dev)


def stat_snapshot(model_dir: Path, *, manifest_path: Path | None = None,
                  ignore: Iterable[Path] = ()) -> StatSnapshot:
    """Size, mtime, inode and ctime of every file of the model folder (no reads, no hashing);
    `ignore` as for verify_manifest."""
    root = model_dir.resolve()
    target = manifest_path or model_dir / DEFAULT_NAME
    snapshot: StatSnapshot = {}
    for rel in _walk(root, [target, *ignore]):
        st = _file_stat(root / rel)
        if st is not None:
            snapshot[rel] = st
    return snapshot


def changed_paths(before: StatSnapshot, after: StatSnapshot) -> list[str]:
    """Relative paths added, removed or changed between two snapshots, sorted; re-verify these."""
    return sorted((k for k in before.keys() | after.keys() if before.get(k) != after.get(k)),
                  key=_sort_key)
