"""`sovereignd audit export`: what an auditor needs from one host, in one file.

The file is a gzip-compressed tar archive (`tar tzf` lists it) holding:
- `export.json`: format and version, when and where it was made (host facts), the period, the
  configuration's digest, the sealing head (key id and epoch, never the sealing key), the
  SHA-256 of every other member, and this host's own audit report for the period (the
  controls that only the host can judge: account, launch, listeners, posture, integrity),
- `logs/`: the event log (with its checkpoints) and every request-record file, whole: the chain
  is verified from its start, so records outside the period are kept too. The server's output
  (`server.log`) is left out: it can hold prompt text.
- `config/`: the configuration file as loaded,
- `baselines/`: the weights manifest, the frozen requirements with their `.sha256` and software
  manifest, the daemon's own software manifest, whichever are configured,
- `keys/`: the keys file (hashes of keys only), for the record of key changes.

`audit fleet` (audit.fleet) reads these files; it verifies each host's chain and seals with that
host's verification key, which never is in the export.
"""

from __future__ import annotations

import hashlib
import io
import socket
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from sovereignd import __version__
from sovereignd.audit.evidence import AuditError
from sovereignd.audit.report import build_report
from sovereignd.config import Config
from sovereignd.fsutil import atomic_write
from sovereignd.integrity import software
from sovereignd.logs import sealing
from sovereignd.logs.files import utc_timestamp
from sovereignd.service import hostfacts

FORMAT = "sovereignd-audit-export"
VERSION = 1
MANIFEST = "export.json"
LOG_PATTERNS = ("events.log*", "requests*")


@dataclass(frozen=True)
class Exported:
    """What `export` wrote: the file, its member count and size, the sealing head."""

    path: Path
    members: int
    size: int
    sealing_head: dict[str, Any] | None


def _evidence_files(cfg: Config) -> list[tuple[str, Path]]:
    """(name in the archive, file on this host) for everything exported besides export.json."""
    files: list[tuple[str, Path]] = []
    logs = cfg.logs.dir
    seen: set[Path] = set()
    for pattern in LOG_PATTERNS:
        for path in sorted(logs.glob(pattern)):
            if path.is_file() and not path.name.endswith(".tmp") and path not in seen:
                seen.add(path)
                files.append((f"logs/{path.name}", path))
    if cfg.source is not None:
        files.append((f"config/{Path(cfg.source).name}", Path(cfg.source)))
    baselines: list[Path] = []
    if cfg.integrity.manifest is not None:
        baselines.append(cfg.integrity.manifest)
    frozen = cfg.environment.frozen
    if frozen is not None:
        baselines += [frozen, frozen.with_name(frozen.name + ".sha256"),
                      software.path_for_frozen(frozen)]
    if cfg.daemon.software_manifest is not None:
        own = cfg.daemon.software_manifest
        baselines += [own, own.with_name(own.name + ".sha256")]
    for path in baselines:
        if path.is_file():
            files.append((f"baselines/{path.name}", path))
    if cfg.gateway.keys_file.is_file():
        files.append((f"keys/{cfg.gateway.keys_file.name}", cfg.gateway.keys_file))
    return files


def _sealing_head(cfg: Config) -> dict[str, Any] | None:
    """The sealing state's key id and epoch (to tell records cut off at the end); its key is
    erased from memory and never written."""
    try:
        state = sealing.read_state(cfg.state_dir)
    except sealing.SealStateError as exc:
        return {"error": str(exc)}
    if state is None:
        return None
    head = {"key_id": state.key_id, "epoch": state.epoch, "updated": state.updated}
    state.erase()
    return head


def export(cfg: Config, output: Path, since: float | None, until: float | None, *,
           name: str | None = None, now: float | None = None) -> Exported:
    """Write the export of this host for the period to `output` (atomically); `name` is how
    the fleet report names the host (default: its host name)."""
    produced = time.time() if now is None else now
    report = build_report(cfg, since, until, now=produced)
    members: dict[str, bytes] = {}
    for member, path in _evidence_files(cfg):
        try:
            members[member] = path.read_bytes()
        except FileNotFoundError:
            continue  # rotated away while exporting: the chain check will say what is missing
        except OSError as exc:
            raise AuditError(f"{path}: cannot read it for the export: "
                             f"{exc.strerror or exc}") from exc
    head = _sealing_head(cfg)
    manifest = {
        "format": FORMAT, "version": VERSION, "sovereignd_version": __version__,
        "exported_at": utc_timestamp(produced),
        "period": {"since": utc_timestamp(since) if since is not None else None,
                   "until": utc_timestamp(until if until is not None else produced)},
        "name": name or socket.gethostname(),
        "host": hostfacts.identity(hostfacts.HostProbe()),
        "config": {"path": str(cfg.source), "sha256": cfg.digest},
        "sealing_head": head,
        "files": {name: hashlib.sha256(data).hexdigest() for name, data in members.items()},
        "report": report.to_json(),
    }
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for member, data in [(MANIFEST, orjson.dumps(manifest, option=orjson.OPT_INDENT_2,
                                                     default=str)), *members.items()]:
            info = tarfile.TarInfo(member)
            info.size, info.mode, info.mtime = len(data), 0o644, int(produced)
            tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    try:
        atomic_write(output, data, mode=0o600)
    except OSError as exc:
        raise AuditError(f"{output}: cannot write the export: {exc.strerror or exc}") from exc
    return Exported(output, len(members) + 1, len(data), head)


def member_digest_problems(root: Path, files: dict[str, str]) -> list[str]:
    """Members whose bytes differ from the digests export.json lists (or that are missing)."""
    problems = []
    for name, digest in sorted(files.items()):
        path = root / name
        try:
            actual = hashlib.sha256(path.read_bytes()).hexdigest()
        except FileNotFoundError:
            problems.append(f"{name}: listed in {MANIFEST} but not in the archive")
            continue
        if actual != digest:
            problems.append(f"{name}: differs from the digest in {MANIFEST}")
    listed = set(files) | {MANIFEST}
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.relative_to(root).as_posix() not in listed:
            problems.append(f"{path.relative_to(root).as_posix()}: in the archive but not "
                            f"listed in {MANIFEST}")
    return problems


def unpack(path: Path, into: Path) -> dict[str, Any]:
    """Extract an export into `into` (regular files only, no path outside it); its manifest.
    AuditError for a file that is not an export."""
    try:
        with tarfile.open(path, mode="r:gz") as tar:
            for member in tar.getmembers():
                if not member.isfile():
                    raise AuditError(f"{path}: member {member.name!r} is not a regular file")
            tar.extractall(into, filter="data")  # refuses absolute paths, '..' and links
    except (OSError, tarfile.TarError, EOFError) as exc:
        raise AuditError(f"{path}: not a readable audit export ({exc})") from exc
    try:
        manifest = orjson.loads((into / MANIFEST).read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        raise AuditError(f"{path}: no readable {MANIFEST}: not an audit export") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise AuditError(f"{path}: not a sovereignd audit export")
    if manifest.get("version") != VERSION:
        raise AuditError(f"{path}: export format version {manifest.get('version')!r}; this "
                         f"sovereignd reads version {VERSION}")
    into.chmod(0o700)
    return manifest
