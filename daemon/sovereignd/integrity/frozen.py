"""Frozen requirements files (`pip freeze` / `uv pip freeze` output) and their `.sha256`
companions: parsing, with an error naming the bad line, and approval checks; and the project
name and version normal forms (PEP 503, PEP 440) both sides of a comparison use.
"""

from __future__ import annotations

import enum
import hashlib
import os
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from packaging.utils import canonicalize_name
from packaging.version import Version

from sovereignd.errors import FrozenFileError, ManifestError
from sovereignd.integrity.manifest import format_sum_line, parse_sum_lines

# ---------------------------------------------------------------------------------------------
# Names and versions (PEP 503, PEP 440)


def canonical_name(name: str) -> str:
    """PEP 503 normalised project name: runs of `-_.` become `-`, lower case
    (`packaging.utils.canonicalize_name`)."""
    return str(canonicalize_name(name))


def normalize_version(text: str) -> str | None:
    """The PEP 440 normal form of a version (`str(packaging.version.Version(text))`), or None
    where packaging refuses it: not PEP 440, or a number over Python's limit for int() of
    4,300 digits (packaging raises the ValueError of int(), not InvalidVersion).

    pip freeze writes this form: `1.0.0.RC1` in METADATA is frozen as `1.0.0rc1`.
    """
    try:
        return str(Version(text))
    except ValueError:  # InvalidVersion is a ValueError
        return None


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
        shown = version if len(version) <= 80 else version[:60] + f"... ({len(version)} chars)"
        raise bad(f"{shown!r} is not a PEP 440 version that packaging can read (pip freeze "
                  "writes other versions with ===)")
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
