"""The server's software: its venv read from disk, compared with the frozen requirements and RECORD.

Nothing here runs the venv's Python: the installed set comes from `*.dist-info` (and
`*.egg-info`) metadata in its site-packages, so a broken or hostile venv cannot run code in
the daemon, and the check works while the server's interpreter is busy or gone.

`freeze(venv)` writes what `pip freeze` writes (`pip freeze --all` with `all=True`), with one
difference: for an editable install pip asks git for the remote and commit
(`-e git+URL@COMMIT#egg=name`), while this writes the path form pip uses for a checkout without
version control (`# Editable install with no version control (name==version)` then
`-e /path`), because it runs no programs. Packages are read from the venv's own site-packages
only, as pip sees them when `include-system-site-packages = false` (the default).
"""

from __future__ import annotations

import base64
import binascii
import csv
import enum
import hashlib
import json
import os
import re
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from email.parser import HeaderParser
from pathlib import Path
from typing import Any

from sovereignd.errors import CheckFailed, FrozenFileError, ManifestError
from sovereignd.integrity import hashing
from sovereignd.integrity.manifest import format_sum_line, parse_sum_lines
from sovereignd.units import human_rate, human_size

# ---------------------------------------------------------------------------------------------
# Names and versions (PEP 503, PEP 440)

_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?$")

# The version grammar of PEP 440 (Appendix B), as packaging implements it.
_VERSION = re.compile(
    r"""^\s*v?
    (?:(?P<epoch>[0-9]+)!)?
    (?P<release>[0-9]+(?:\.[0-9]+)*)
    (?P<pre>[-_.]?(?P<pre_l>alpha|a|beta|b|preview|pre|c|rc)[-_.]?(?P<pre_n>[0-9]+)?)?
    (?P<post>(?:-(?P<post_n1>[0-9]+))|(?:[-_.]?(?P<post_l>post|rev|r)[-_.]?(?P<post_n2>[0-9]+)?))?
    (?P<dev>[-_.]?(?P<dev_l>dev)[-_.]?(?P<dev_n>[0-9]+)?)?
    (?:\+(?P<local>[a-z0-9]+(?:[-_.][a-z0-9]+)*))?
    \s*$""",
    re.VERBOSE | re.IGNORECASE,
)
_PRE = {"alpha": "a", "a": "a", "beta": "b", "b": "b", "c": "rc", "rc": "rc", "pre": "rc",
        "preview": "rc"}


def canonical_name(name: str) -> str:
    """PEP 503 normalised project name: runs of `-_.` become `-`, lower case."""
    return re.sub(r"[-_.]+", "-", name).lower()


def normalize_version(text: str) -> str | None:
    """The PEP 440 normal form of a version (as `str(packaging.version.Version(text))`), or None.

    pip freeze writes this form: `1.0.0.RC1` in METADATA is frozen as `1.0.0rc1`.
    """
    m = _VERSION.match(text)
    if m is None:
        return None
    out = ""
    if m["epoch"] and int(m["epoch"]):
        out += f"{int(m['epoch'])}!"
    out += ".".join(str(int(part)) for part in m["release"].split("."))
    if m["pre"]:
        out += f"{_PRE[m['pre_l'].lower()]}{int(m['pre_n'] or 0)}"
    if m["post"]:
        out += f".post{int(m['post_n1'] or m['post_n2'] or 0)}"
    if m["dev"]:
        out += f".dev{int(m['dev_n'] or 0)}"
    if m["local"]:
        parts = re.split(r"[-_.]", m["local"])
        out += "+" + ".".join(str(int(p)) if p.isdigit() else p.lower() for p in parts)
    return out


# ---------------------------------------------------------------------------------------------
# The frozen requirements file


class Pin(enum.StrEnum):
    """How a frozen line pins its package."""

    VERSION = "=="
    ARBITRARY = "==="  # a version that is not PEP 440, compared as a string
    URL = "@"
    EDITABLE = "-e"


@dataclass(frozen=True)
class Requirement:
    """One package as a frozen file (or a freeze of the venv) pins it."""

    name: str | None  # as written; None for `-e /path` when nothing names the package
    pin: Pin
    value: str  # the version, the URL, or the editable target
    line: int = 0
    #: For an editable install: the version pip's comment line recorded, if any.
    version: str | None = None

    @property
    def key(self) -> str | None:
        """PEP 503 name, used to match packages between the frozen file and the venv."""
        return canonical_name(self.name) if self.name else None

    def __str__(self) -> str:
        if self.pin is Pin.EDITABLE:
            return f"-e {self.value}"
        if self.pin is Pin.URL:
            return f"{self.name} @ {self.value}"
        return f"{self.name}{self.pin}{self.value}"

    def short(self) -> str:
        """The pin without the name: a version, `@ URL` or `-e TARGET`."""
        if self.pin is Pin.VERSION:
            return self.value
        if self.pin is Pin.ARBITRARY:
            return f"==={self.value}"
        return f"@ {self.value}" if self.pin is Pin.URL else f"-e {self.value}"


@dataclass(frozen=True)
class FrozenRequirements:
    """A parsed frozen file: its requirements in file order, where it came from, its digest."""

    requirements: tuple[Requirement, ...]
    source: str = "frozen requirements"
    sha256: str = ""


# Options pip may echo into a freeze (with -r) that do not change what is installed.
_IGNORED_OPTIONS = ("-i", "--index-url", "--extra-index-url", "-f", "--find-links",
                    "--trusted-host", "--pre", "--no-index", "--prefer-binary",
                    "--only-binary", "--no-binary")
_COMMENT = re.compile(r"(^|\s+)#.*$")  # pip's rule: '#' at the start or after whitespace
_EDITABLE_COMMENT = re.compile(
    r"^#\s*Editable\b.*?\((?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)===?(?P<version>[^)]*)\)")
_REQ = re.compile(
    r"^(?P<name>[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)\s*(?:\[[^\]]*\])?\s*"
    r"(?:(?P<op>===|==)\s*(?P<version>\S+)|@\s*(?P<url>\S+))$")
_LOOSE = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*"
                    r"(?P<op>~=|!=|<=|>=|<|>|=(?!=))?")


def _egg_name(target: str) -> str | None:
    fragment = urllib.parse.urlsplit(target).fragment
    for part in fragment.split("&"):
        key, _, value = part.partition("=")
        if key == "egg" and value:
            return value.split("[", 1)[0]
    return None


def parse_frozen(data: bytes | str, source: str = "frozen requirements") -> FrozenRequirements:
    """Parse a `pip freeze` / `uv pip freeze` file; raise FrozenFileError naming the bad line."""
    raw = data if isinstance(data, bytes) else data.encode()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FrozenFileError(f"not UTF-8 text ({exc})", source=source) from exc
    reqs: list[Requirement] = []
    seen: dict[str, int] = {}
    editable_comment: re.Match[str] | None = None
    for lineno, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if stripped.startswith("#"):
            editable_comment = _EDITABLE_COMMENT.match(stripped) or editable_comment
            continue
        stripped = _COMMENT.sub("", stripped).strip()
        if not stripped:
            continue
        req = _parse_line(stripped, lineno, source, editable_comment)
        editable_comment = None
        if req is None:
            continue
        ident = req.key or f"-e {req.value}"
        if ident in seen:
            raise FrozenFileError(f"{req.name or req.value} is listed twice (first at line "
                                  f"{seen[ident]})", source=source, line=lineno)
        seen[ident] = lineno
        reqs.append(req)
    return FrozenRequirements(requirements=tuple(reqs), source=source,
                              sha256=hashlib.sha256(raw).hexdigest())


def _parse_line(line: str, lineno: int, source: str,
                editable_comment: re.Match[str] | None) -> Requirement | None:
    """One requirement line; None for an index option pip may echo (it changes nothing)."""
    def bad(why: str) -> FrozenFileError:
        return FrozenFileError(why, source=source, line=lineno)

    if line.endswith("\\"):
        raise bad("line continuations are not part of a freeze; write the file with pip freeze "
                  "or uv pip freeze")
    if line.startswith(("-e", "--editable")):
        target = re.sub(r"^(?:-e|--editable)(?:\s+|=)?", "", line, count=1).strip()
        if not target:
            raise bad("-e without a path or URL")
        name = _egg_name(target)
        version = None
        if editable_comment is not None:
            name = name or editable_comment["name"]
            version = editable_comment["version"]
        return Requirement(name=name, pin=Pin.EDITABLE, value=target, line=lineno,
                           version=version)
    if line.startswith("-"):
        option = re.split(r"[\s=]", line, maxsplit=1)[0]
        if option in _IGNORED_OPTIONS:
            return None
        if option in ("-r", "--requirement", "-c", "--constraint"):
            raise bad(f"{option} includes another file; a frozen file lists every package itself")
        raise bad(f"option {option} is not something pip freeze writes")
    m = _REQ.match(line)
    if m is None:
        loose = _LOOSE.match(line)
        if ";" in line:
            raise bad(f"{line!r}: environment markers are not part of a freeze")
        if loose and loose["op"]:
            raise bad(f"{line!r} pins with {loose['op']}; a frozen file pins exact versions "
                      "(name==version)")
        if loose and loose.end() == len(line):
            raise bad(f"{line!r} is not pinned; a frozen file pins every package with ==, === "
                      "or @ URL")
        raise bad(f"cannot read {line!r}: expected name==version, name===version, "
                  "name @ URL or -e TARGET")
    if m["url"]:
        return Requirement(name=m["name"], pin=Pin.URL, value=m["url"], line=lineno)
    version = m["version"]
    if m["op"] == "===":
        return Requirement(name=m["name"], pin=Pin.ARBITRARY, value=version, line=lineno)
    normal = normalize_version(version)
    if normal is None:
        raise bad(f"{version!r} is not a PEP 440 version (pip freeze writes such versions "
                  "with ===)")
    return Requirement(name=m["name"], pin=Pin.VERSION, value=normal, line=lineno)


def companion_path(frozen: Path) -> Path:
    """The `.sha256` file that approves a frozen file: the same name with `.sha256` added."""
    return frozen.with_name(frozen.name + ".sha256")


def render_companion(frozen: Path, data: bytes) -> bytes:
    """The companion's bytes, as `shasum -a 256 NAME` run beside the frozen file writes them."""
    return format_sum_line(hashlib.sha256(data).hexdigest(), frozen.name)


def check_companion(frozen: Path, data: bytes) -> str:
    """Check the frozen file's bytes against its `.sha256` companion; return the digest."""
    comp = companion_path(frozen)
    fix = (f"approve the file with `shasum -a 256 {frozen.name} > {comp.name}` in "
           f"{frozen.parent}, or write both with `sovereignd baseline`")
    try:
        comp_data = comp.read_bytes()
    except FileNotFoundError:
        raise FrozenFileError(f"its checksum file {comp.name} is missing; {fix}",
                              source=str(frozen)) from None
    except OSError as exc:
        raise FrozenFileError(f"cannot read {comp}: {exc.strerror or exc}",
                              source=str(frozen)) from exc
    try:
        lines = parse_sum_lines(comp_data, str(comp))
    except ManifestError as exc:
        raise FrozenFileError(exc.reason, source=str(comp), line=exc.line) from exc
    if len(lines) != 1:
        raise FrozenFileError(f"must hold exactly one line naming {frozen.name}, has "
                              f"{len(lines)}; {fix}", source=str(comp))
    entry = lines[0]
    named = Path(entry.name)
    same = (named.name == frozen.name if not named.is_absolute()
            else os.path.realpath(named) == os.path.realpath(frozen))
    if not same or (not named.is_absolute() and named.parent != Path()):
        raise FrozenFileError(f"names {entry.name!r}, not {frozen.name}", source=str(comp),
                              line=entry.line)
    actual = hashlib.sha256(data).hexdigest()
    if actual != entry.digest:
        raise FrozenFileError(f"its SHA-256 is {actual} but {comp.name} approves "
                              f"{entry.digest}: the frozen file changed after it was approved. "
                              f"Restore it, or re-approve: {fix}", source=str(frozen))
    return actual


def read_frozen(path: Path, *, require_companion: bool = True) -> FrozenRequirements:
    """Read, check against its `.sha256` companion, and parse a frozen requirements file."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise FrozenFileError(f"cannot read the frozen requirements: {exc.strerror or exc}; "
                              "write them with `sovereignd baseline`", source=str(path)) from exc
    if require_companion:
        check_companion(path, data)
    return parse_frozen(data, str(path))


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


def _read_metadata(info_dir: Path) -> tuple[str, str] | None:
    """(Name, Version) from METADATA or PKG-INFO; None when unreadable or incomplete."""
    candidates = ([info_dir] if info_dir.is_file()
                  else [info_dir / "METADATA", info_dir / "PKG-INFO"])
    for path in candidates:
        try:
            with path.open("r", encoding="utf-8", errors="replace") as f:
                head = []
                for line in f:  # headers end at the first blank line; skip the long description
                    if not line.strip():
                        break
                    head.append(line)
        except OSError:
            continue
        headers = HeaderParser().parsestr("".join(head))
        name, version = headers.get("Name"), headers.get("Version")
        if name and version:
            return str(name).strip(), str(version).strip()
    return None


def _read_json(path: Path) -> Mapping[str, Any] | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _dists_in(site: Path) -> list[Distribution]:
    dists = []
    for entry in sorted(site.iterdir()):
        if entry.suffix not in (".dist-info", ".egg-info"):
            continue
        meta = _read_metadata(entry)
        if meta is None:
            continue
        direct = _read_json(entry / "direct_url.json") if entry.is_dir() else None
        dists.append(Distribution(name=meta[0], version=meta[1], info_dir=entry, site=site,
                                  direct_url=direct,
                                  editable_location=_editable_location(direct)))
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
            meta = _read_metadata(info)
            if meta is not None:
                dists.append(Distribution(name=meta[0], version=meta[1], info_dir=info,
                                          site=site, editable_location=str(project)))
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
