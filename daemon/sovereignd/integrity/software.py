"""The approved software, file by file: a venv, the interpreter it runs on, and their bytecode.

A software manifest lists a SHA-256 for every file that can run: every file of the venv
(bytecode, `bin/` scripts, files whose RECORD row has no hash, files no RECORD lists), and the
interpreter the venv points at (`pyvenv.cfg` `home`): its binary, its shared library
(libpython, or the framework's `Python` on macOS) and its standard library (without the base
interpreter's own site-packages, which a venv does not read). Its format is what `shasum -a 256`
writes, with absolute paths, so `sha256sum -c` checks it; `#` lines (skipped by both tools)
record the venv and the interpreter's version and build. A symlink to a folder cannot be
hashed: its line holds the SHA-256 of `symlink\\0TARGET` (those lines `sha256sum -c` reports as
unreadable).

Bytecode. Python rewrites a `.pyc` whenever its header no longer matches its source
(importlib, PEP 552), and a server importing code from a venv it can write does so while it
runs; the header alone also proves nothing, since a payload can keep the original 16 bytes. A
changed or new `.pyc` is therefore drift unless its code object equals the one the approved
interpreter compiles from its source, and that source verifies (code objects compare their
bytecode, constants, names and line tables, not the file name: CPython `code_richcompare`).
The comparison runs in a separate process of that interpreter (`-I -S -B`), so a hostile
`.pyc` never reaches `marshal.loads` in the daemon, and bytecode of any Python version is
judged by the Python it was written for.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from sovereignd.errors import CheckFailed, ManifestError
from sovereignd.fsutil import atomic_write
from sovereignd.integrity import hashing
from sovereignd.integrity.frozen import check_companion
from sovereignd.integrity.manifest import format_sum_line, parse_sum_lines
from sovereignd.units import human_rate, human_size

#: Folders of the base interpreter's library folder that are not its standard library: the
#: base installation's own packages (Debian: dist-packages), which a venv does not import.
NOT_STDLIB = ("site-packages", "dist-packages")

#: Time the bytecode judge may take per file, on top of a fixed start-up allowance (seconds).
JUDGE_SECONDS_PER_FILE = 0.05
JUDGE_STARTUP_SECONDS = 30.0

_PYC = re.compile(r"^(?P<stem>[^.]+)\.(?P<tag>[A-Za-z0-9_-]+)(?:\.opt-(?P<opt>[12]))?\.pyc$")

# Run by the interpreter under check with -I -S -B: facts about itself, no site, no bytecode.
_FACTS = r"""
import json, sys, sysconfig
cv = sysconfig.get_config_var
libs = []
name = cv("LDLIBRARY") or ""
if cv("Py_ENABLE_SHARED") and cv("LIBDIR"):
    libs.append(cv("LIBDIR") + "/" + name)
if cv("PYTHONFRAMEWORKPREFIX"):
    libs.append(cv("PYTHONFRAMEWORKPREFIX") + "/" + name)
print(json.dumps({"executable": sys.executable, "version": sys.version.split()[0],
                  "build": sys.version, "implementation": sys.implementation.name,
                  "cache_tag": sys.implementation.cache_tag,
                  "stdlib": sorted({sysconfig.get_path("stdlib"),
                                    sysconfig.get_path("platstdlib")}),
                  "libraries": libs}))
"""

# Run by the approved interpreter with -I -S -B: each .pyc's code against its compiled source.
_JUDGE = r"""
import importlib.util, json, marshal, sys
out = {}
for pyc, source, optimize in json.load(sys.stdin):
    try:
        with open(pyc, "rb") as f:
            data = f.read()
        if data[:4] != importlib.util.MAGIC_NUMBER:
            out[pyc] = "written for another Python version (magic number)"
            continue
        code = marshal.loads(data[16:])
        with open(source, "rb") as f:
            ref = compile(f.read(), source, "exec", dont_inherit=True, optimize=optimize)
        out[pyc] = None if code == ref else "its code is not what its source compiles to"
    except Exception as exc:
        out[pyc] = "cannot be read as bytecode: " + type(exc).__name__
print(json.dumps(out))
"""


@dataclass(frozen=True)
class Interpreter:
    """The Python a venv runs on, as it describes itself (paths absolute)."""

    executable: str
    version: str
    build: str  # sys.version: version, build date, compiler
    implementation: str
    stdlib: tuple[str, ...]
    libraries: tuple[str, ...] = ()

    def to_json(self) -> str:
        """One line of JSON (the manifest's `# python:` comment)."""
        return json.dumps({"executable": self.executable, "version": self.version,
                           "build": self.build, "implementation": self.implementation,
                           "stdlib": list(self.stdlib), "libraries": list(self.libraries)},
                          sort_keys=True)

    def summary(self) -> str:
        """`CPython 3.11.7 at /path (build ...)`."""
        impl = {"cpython": "CPython", "pypy": "PyPy"}.get(self.implementation,
                                                          self.implementation)
        return f"{impl} {self.version} at {self.executable} ({self.build})"


def base_executable(venv: Path) -> Path:
    """The interpreter binary a venv runs: its `bin/python` resolved (links lead to `home`)."""
    for name in ("python3", "python"):
        candidate = venv / "bin" / name
        if candidate.exists():
            return candidate.resolve()
    raise CheckFailed(f"{venv} has no bin/python3: it is not a virtual environment")


def describe_interpreter(executable: Path) -> Interpreter:
    """Ask the interpreter for its version, build and library paths (runs it, -I -S -B).

    Raises CheckFailed when it cannot run or answers nonsense.
    """
    try:
        proc = subprocess.run([str(executable), "-I", "-S", "-B", "-c", _FACTS],
                              capture_output=True, timeout=60, check=False,
                              stdin=subprocess.DEVNULL)
        facts = json.loads(proc.stdout)
        return Interpreter(
            executable=str(Path(facts["executable"]).resolve()), version=facts["version"],
            build=facts["build"], implementation=facts["implementation"],
            stdlib=tuple(str(Path(p).resolve()) for p in facts["stdlib"]),
            libraries=tuple(str(Path(p).resolve()) for p in facts["libraries"]
                            if Path(p).exists()))
    except (OSError, subprocess.SubprocessError, ValueError, KeyError, TypeError) as exc:
        raise CheckFailed(f"cannot ask the interpreter {executable} for its version and "
                          f"libraries: {type(exc).__name__}") from exc


@dataclass(frozen=True)
class SoftwareManifest:
    """Approved digests by absolute path, for one venv and its interpreter."""

    venv: Path
    interpreter: Interpreter
    digests: Mapping[str, str]
    source: str = "software manifest"
    sha256: str = ""

    def roots(self) -> tuple[str, ...]:
        """Folders walked for files: the venv and the standard library folders."""
        return (str(self.venv), *self.interpreter.stdlib)

    def singles(self) -> tuple[str, ...]:
        """Files outside those folders: the interpreter binary and its shared library."""
        return (self.interpreter.executable, *self.interpreter.libraries)


def _link_digest(path: str) -> str:
    return hashlib.sha256(b"symlink\0" + os.fsencode(str(Path(path).readlink()))).hexdigest()


def _skipped(root: str, dirpath: str, name: str, stdlib: bool) -> bool:
    return stdlib and dirpath == root and name in NOT_STDLIB


def _walk(root: str, stdlib: bool) -> Iterator[tuple[str, bool]]:
    """(path, is a symlink to a folder) of every file under root, not following folder links."""
    if os.path.islink(root) or not os.path.isdir(root):  # noqa: PTH112,PTH114 - hot path
        if os.path.lexists(root):
            yield root, os.path.islink(root) and os.path.isdir(root)  # noqa: PTH112,PTH114
        return
    for dirpath, dirnames, filenames in os.walk(root):
        keep = []
        for d in dirnames:
            full = os.path.join(dirpath, d)  # noqa: PTH118 - hot loop
            if _skipped(root, dirpath, d, stdlib):
                continue
            if os.path.islink(full):  # noqa: PTH114 - hot loop
                yield full, True
            else:
                keep.append(d)
        dirnames[:] = keep
        for f in filenames:
            yield os.path.join(dirpath, f), False  # noqa: PTH118 - hot loop


def _under(path: str, prefixes: tuple[str, ...] | None) -> bool:
    return prefixes is None or any(path == p or path.startswith(p.rstrip("/") + "/")
                                   for p in prefixes)


def _present(m: SoftwareManifest, prefixes: tuple[str, ...] | None) -> dict[str, bool]:
    """Files present now under the manifest's roots (limited to `prefixes`)."""
    found: dict[str, bool] = {}
    stdlib = set(m.interpreter.stdlib)
    starts: list[tuple[str, str]] = []  # (walk start, root it belongs to)
    for root in m.roots():
        if prefixes is None:
            starts.append((root, root))
            continue
        for p in prefixes:
            if _under(p, (root,)):
                starts.append((p, root))
            elif _under(root, (p,)):
                starts.append((root, root))
    for start, root in starts:
        if start != root and root in stdlib and any(
                _under(start, (os.path.join(root, n),)) for n in NOT_STDLIB):  # noqa: PTH118
            continue
        is_std = root in stdlib and start == root
        for path, link in _walk(start, is_std):
            found[path] = link
    for single in m.singles():
        if _under(single, prefixes) and os.path.lexists(single):
            found[single] = False
    return found


def _hash(paths: Mapping[str, bool], workers: int, low_priority: bool,
          stop: threading.Event | None) -> tuple[dict[str, str], dict[str, str], int]:
    """(digests, errors, bytes) for files (followed) and folder symlinks (their target)."""
    files = [Path(p) for p, link in paths.items() if not link]
    run = hashing.hash_files_report(files, workers, low_priority=low_priority, stop=stop)
    digests = {str(p): d for p, d in run.digests.items()}
    errors = {str(p): why for p, why in run.errors.items()}
    for p, link in paths.items():
        if link:
            try:
                digests[p] = _link_digest(p)
            except OSError as exc:
                errors[p] = exc.strerror or str(exc)
    return digests, errors, run.bytes_hashed


def create(venv: Path, *, workers: int = 0) -> SoftwareManifest:
    """Hash every file of the venv and of its interpreter (blocking; raises CheckFailed when
    a file cannot be read, naming it)."""
    root = venv.resolve()
    interp = describe_interpreter(base_executable(root))
    draft = SoftwareManifest(venv=root, interpreter=interp, digests={})
    digests, errors, _ = _hash(_present(draft, None), workers, False, None)
    if errors:
        shown = "; ".join(f"{p}: {why}" for p, why in sorted(errors.items())[:10])
        raise CheckFailed(f"cannot approve {root}: {len(errors)} file(s) cannot be read "
                          f"({shown})")
    return SoftwareManifest(venv=root, interpreter=interp, digests=digests)


def render(m: SoftwareManifest) -> bytes:
    """The manifest's bytes: two `#` lines, then `<hex>  /absolute/path` sorted bytewise."""
    head = (f"# sovereignd software manifest of the venv {m.venv}\n"
            f"# python: {m.interpreter.to_json()}\n").encode()
    return head + b"".join(format_sum_line(m.digests[p], p)
                           for p in sorted(m.digests, key=os.fsencode))


def write(path: Path, m: SoftwareManifest) -> str:
    """Write the manifest atomically; return its SHA-256."""
    data = render(m)
    atomic_write(path, data, mode=0o644)
    return hashlib.sha256(data).hexdigest()


def parse(data: bytes, source: str) -> SoftwareManifest:
    """Parse a software manifest; raise ManifestError naming the problem."""
    venv = interp = None
    for line in data.split(b"\n")[:4]:
        text = line.decode(errors="replace")
        if text.startswith("# sovereignd software manifest of the venv "):
            venv = Path(text.removeprefix("# sovereignd software manifest of the venv "))
        elif text.startswith("# python: "):
            try:
                f = json.loads(text.removeprefix("# python: "))
                interp = Interpreter(executable=f["executable"], version=f["version"],
                                     build=f["build"], implementation=f["implementation"],
                                     stdlib=tuple(f["stdlib"]),
                                     libraries=tuple(f["libraries"]))
            except (ValueError, KeyError, TypeError) as exc:
                raise ManifestError(f"the '# python:' line is not the JSON sovereignd writes "
                                    f"({type(exc).__name__})", source=source) from exc
    if venv is None or interp is None:
        raise ManifestError("not a software manifest: its first lines must name the venv and "
                            "the interpreter; write it with `sovereignd baseline`",
                            source=source)
    digests: dict[str, str] = {}
    for entry in parse_sum_lines(data, source):
        if not entry.name.startswith("/"):
            raise ManifestError(f"{entry.name!r} is not an absolute path", source=source,
                                line=entry.line)
        digests[entry.name] = entry.digest
    return SoftwareManifest(venv=venv, interpreter=interp, digests=digests, source=source,
                            sha256=hashlib.sha256(data).hexdigest())


def read(path: Path, expected_sha256: str | None = None) -> SoftwareManifest:
    """Read a software manifest, checking its SHA-256 when the approving file gives one."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ManifestError(f"cannot read the software manifest: {exc.strerror or exc}; "
                            "write it with `sovereignd baseline`", source=str(path)) from exc
    actual = hashlib.sha256(data).hexdigest()
    if expected_sha256 is not None and actual != expected_sha256:
        raise ManifestError(f"its SHA-256 is {actual} but the approved baseline names "
                            f"{expected_sha256}: it changed after approval; run "
                            "`sovereignd baseline` to approve the software as it is now",
                            source=str(path))
    return parse(data, str(path))


# ---------------------------------------------------------------------------------------------
# Verification


@dataclass(frozen=True)
class FileIssue:
    """One file that does not verify."""

    path: str
    status: str  # CHANGED, MISSING, EXTRA
    detail: str
    expected: str | None = None
    actual: str | None = None


@dataclass(frozen=True)
class SoftwareReport:
    """Every approved file (or those under the paths asked for) against the manifest."""

    venv: Path
    interpreter: Interpreter
    files_checked: int
    bytes_hashed: int
    seconds: float
    issues: tuple[FileIssue, ...] = ()
    #: Bytecode files that differ from the approved copy but hold exactly the code their
    #: verified source compiles to (Python rewrote them): not drift.
    recompiled: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """True when every file matches (recompiled bytecode included)."""
        return not self.issues

    def render(self, limit: int = 50) -> str:
        """A summary line, then one line per problem (at most `limit`)."""
        counts: dict[str, int] = {}
        for i in self.issues:
            counts[i.status] = counts.get(i.status, 0) + 1
        verdict = "all match" if self.ok else ", ".join(
            f"{n} {s.lower()}" for s, n in sorted(counts.items()))
        lines = [f"software check of {self.venv} and {self.interpreter.summary()}: "
                 f"{self.files_checked} files, {human_size(self.bytes_hashed)} in "
                 f"{self.seconds:.2f} s ({human_rate(self.bytes_hashed, self.seconds)}): "
                 f"{verdict}"]
        if self.recompiled:
            lines.append(f"  {len(self.recompiled)} bytecode file(s) rewritten by Python, "
                         "same code as their verified source (not drift)")
        lines += [f"  {i.status} {i.path} ({i.detail})" for i in self.issues[:limit]]
        if len(self.issues) > limit:
            lines.append(f"  ... and {len(self.issues) - limit} more")
        return "\n".join(lines)


def bytecode_source(pyc: str) -> tuple[str, int] | None:
    """(source path, optimization level) of a `__pycache__/NAME.TAG[.opt-N].pyc`, else None."""
    path = Path(pyc)
    m = _PYC.match(path.name)
    if m is None or path.parent.name != "__pycache__":
        return None
    return str(path.parent.parent / f"{m['stem']}.py"), int(m["opt"] or 0)


def judge_bytecode(python: str, jobs: Iterable[tuple[str, str, int]]) -> dict[str, str | None]:
    """Compare each (pyc, source, optimize) in a separate process of `python`: None when the
    code equals the compiled source, else why not. A judge that fails condemns its files."""
    batch = list(jobs)
    if not batch:
        return {}
    timeout = JUDGE_STARTUP_SECONDS + JUDGE_SECONDS_PER_FILE * len(batch)
    failed = "could not be compared with its source"
    try:
        proc = subprocess.run([python, "-I", "-S", "-B", "-c", _JUDGE],
                              input=json.dumps(batch).encode(), capture_output=True,
                              timeout=timeout, check=False)
        verdicts = json.loads(proc.stdout)
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        return {pyc: f"{failed} ({type(exc).__name__})" for pyc, _, _ in batch}
    if not isinstance(verdicts, dict):
        return {pyc: failed for pyc, _, _ in batch}
    return {pyc: verdicts.get(pyc, failed) if isinstance(verdicts.get(pyc, failed), str | None)
            else failed for pyc, _, _ in batch}


@dataclass
class _Run:
    digests: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    bytes: int = 0


def verify(m: SoftwareManifest, *, paths: Iterable[str | Path] | None = None, workers: int = 0,
           low_priority: bool = False, stop: threading.Event | None = None) -> SoftwareReport:
    """Hash the approved files and whatever else now lies under the roots; compare.

    `paths` limits the check to files and folders under those paths (a watcher's events).
    Blocking: from an event loop, call it in a thread. Setting `stop` raises hashing.Stopped.
    """
    start = time.monotonic()
    prefixes = None if paths is None else tuple(os.path.abspath(p) for p in paths)  # noqa: PTH100
    present = _present(m, prefixes)
    approved = {p: d for p, d in m.digests.items() if _under(p, prefixes)}
    wanted = dict(present)
    for p in approved:
        wanted.setdefault(p, os.path.islink(p) and os.path.isdir(p))  # noqa: PTH112,PTH114
    run = _Run()
    run.digests, run.errors, run.bytes = _hash(wanted, workers, low_priority, stop)
    issues: list[FileIssue] = []
    suspects: list[FileIssue] = []
    for p in sorted(set(approved) | set(present), key=os.fsencode):
        expected, actual = approved.get(p), run.digests.get(p)
        if expected is not None and actual is None:
            why = run.errors.get(p, hashing.MISSING)
            issues.append(FileIssue(p, "MISSING", "no such file" if why == hashing.MISSING
                                    else f"cannot read: {why}", expected=expected))
        elif expected is None and actual is not None:
            suspects.append(FileIssue(p, "EXTRA", "not in the approved software",
                                      actual=actual))
        elif expected is not None and actual != expected:
            suspects.append(FileIssue(p, "CHANGED", f"sha256 {actual}, approved {expected}",
                                      expected=expected, actual=actual))
    issues += _judge(m, suspects, run, workers, stop)
    issues.sort(key=lambda i: os.fsencode(i.path))
    recompiled = tuple(sorted({i.path for i in suspects} - {i.path for i in issues}))
    return SoftwareReport(venv=m.venv, interpreter=m.interpreter,
                          files_checked=len(run.digests), bytes_hashed=run.bytes,
                          seconds=time.monotonic() - start, issues=tuple(issues),
                          recompiled=recompiled)


def _judge(m: SoftwareManifest, suspects: list[FileIssue], run: _Run, workers: int,
           stop: threading.Event | None) -> list[FileIssue]:
    """The suspects that stay drift: all but bytecode equal to its verified source."""
    jobs: dict[str, tuple[str, int]] = {}
    kept: list[FileIssue] = []
    for issue in suspects:
        found = bytecode_source(issue.path) if issue.path.endswith(".pyc") else None
        if found is None or found[0] not in m.digests:
            kept.append(issue)
        else:
            jobs[issue.path] = found
    if not jobs:
        return kept
    judge = m.interpreter.executable
    extra = [Path(p) for p in {judge, *(s for s, _ in jobs.values())} if p not in run.digests]
    more = hashing.hash_files_report(extra, workers, stop=stop)
    run.digests.update({str(p): d for p, d in more.digests.items()})
    if run.digests.get(judge) != m.digests.get(judge):
        return kept + [FileIssue(p, "CHANGED", "bytecode, and the interpreter that would "
                                 "judge it is not the approved one") for p in jobs]
    verified = {pyc: job for pyc, job in jobs.items()
                if run.digests.get(job[0]) == m.digests[job[0]]}
    kept += [FileIssue(p, "CHANGED", "bytecode of a source that does not verify")
             for p in jobs if p not in verified]
    verdicts = judge_bytecode(judge, [(p, s, o) for p, (s, o) in verified.items()])
    by_path = {i.path: i for i in suspects}
    for pyc, why in verdicts.items():
        if why is not None:
            i = by_path[pyc]
            kept.append(FileIssue(pyc, i.status, f"bytecode: {why}", expected=i.expected,
                                  actual=i.actual))
    return kept


# ---------------------------------------------------------------------------------------------
# How a baseline approves a software manifest

_LINK = re.compile(
    rb"^# sovereignd software manifest: (?P<name>[^/\n]+) sha256=(?P<hex>[0-9a-f]{64})$",
    re.MULTILINE)


def path_for_frozen(frozen: Path) -> Path:
    """Where `sovereignd baseline` writes the server's software manifest: beside the frozen
    file, `NAME.software.sha256` for `NAME.txt`."""
    return frozen.with_name(frozen.stem + ".software.sha256")


def link_line(manifest_path: Path, digest: str) -> bytes:
    """The comment line of the frozen file that approves the software manifest by digest
    (pip and uv skip comment lines; the frozen file's `.sha256` companion covers it)."""
    return f"# sovereignd software manifest: {manifest_path.name} sha256={digest}\n".encode()


def approves_manifest(frozen: Path) -> bool:
    """Whether the frozen file names a software manifest (False also when unreadable)."""
    try:
        return _LINK.search(frozen.read_bytes()) is not None
    except OSError:
        return False


def read_approved(frozen: Path) -> SoftwareManifest:
    """The software manifest a frozen file approves (its companion checked first).

    Raises FrozenFileError or ManifestError with an operator sentence.
    """
    try:
        data = frozen.read_bytes()
    except OSError as exc:
        raise ManifestError(f"cannot read the frozen requirements: {exc.strerror or exc}",
                            source=str(frozen)) from exc
    check_companion(frozen, data)
    m = _LINK.search(data)
    if m is None:
        raise ManifestError("approves no software manifest, so the venv's files and its "
                            "interpreter cannot be verified; run `sovereignd baseline` (or set "
                            "environment.files_check: false)", source=str(frozen))
    return read(frozen.parent / m["name"].decode(), m["hex"].decode())


def read_with_companion(path: Path) -> SoftwareManifest:
    """A software manifest approved by its own `.sha256` companion (the daemon's own)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ManifestError(f"cannot read the software manifest: {exc.strerror or exc}; write "
                            "it with `sovereignd baseline`", source=str(path)) from exc
    check_companion(path, data)
    return parse(data, str(path))


def own_venv() -> Path:
    """The venv this daemon runs from (sys.prefix); CheckFailed when it runs outside one."""
    if sys.prefix == sys.base_prefix:
        raise CheckFailed("the daemon does not run from a virtual environment, so it has no "
                          "venv of its own to approve")
    return Path(sys.prefix)


# ---------------------------------------------------------------------------------------------
# What the guards publish


def drift_entries(report: SoftwareReport) -> dict[str, dict[str, str | None]]:
    """The report's problems as a guard's drift items, keyed `file /absolute/path`."""
    return {f"file {i.path}": {"status": i.status, "expected": i.expected,
                               "actual": i.actual, "detail": i.detail}
            for i in report.issues}


def status_fields(m: SoftwareManifest | None) -> dict[str, str]:
    """The approved interpreter and the manifest's digest, for /status, events and the audit."""
    if m is None:
        return {}
    return {"python": m.interpreter.summary(), "python_version": m.interpreter.version,
            "software_manifest": m.source, "software_manifest_sha256": m.sha256}


def interpreter_check(m: SoftwareManifest, venv: Path) -> tuple[bool, str]:
    """Whether `venv` runs the approved interpreter with its binary unchanged: (ok, sentence).

    Cheap (one file hashed), for `sovereignd check`; the full check is `verify`.
    """
    exe = base_executable(venv)
    if str(exe) != m.interpreter.executable:
        return False, (f"{venv} runs {exe}, but the approved interpreter is "
                       f"{m.interpreter.summary()}; run `sovereignd baseline` if this is meant")
    try:
        actual = hashing.hash_file(exe)
    except OSError as exc:
        return False, f"cannot read {exe}: {exc.strerror or exc}"
    if actual != m.digests.get(str(exe)):
        return False, (f"{exe} changed since it was approved (sha256 {actual}, approved "
                       f"{m.digests.get(str(exe))})")
    return True, (f"{m.interpreter.summary()}, binary as approved; {len(m.digests)} files "
                  f"approved in {m.source}")
