"""Writing the approved baselines: the weights manifest and the frozen requirements (+ .sha256).

Everything is computed and checked first (weights hashed, safetensors headers, installed files
against RECORD), then the files are written, each atomically, so a failed check leaves the
previous baseline in place.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sovereignd.config import Config
from sovereignd.errors import CheckFailed, ConfigError, ConfigProblem
from sovereignd.fsutil import atomic_write
from sovereignd.integrity import manifest, signing, software
from sovereignd.integrity.frozen import companion_path, parse_frozen, render_companion
from sovereignd.integrity.record import verify_records
from sovereignd.integrity.venv import freeze
from sovereignd.units import human_rate, human_size


@dataclass(frozen=True)
class Written:
    """One file written: where, its SHA-256, and a phrase saying what it holds."""

    path: Path
    sha256: str
    what: str


@dataclass(frozen=True)
class SignatureSource:
    """A model signature to take the weights manifest from (`baseline --from-signature`), with
    the public key or certificate chain that must have made it."""

    signature: Path
    public_key: Path | None = None
    certificate_chain: tuple[Path, ...] = ()


@dataclass(frozen=True)
class BaselineResult:
    """The files written, and notes for the operator (e.g. a pin to update)."""

    written: tuple[Written, ...]
    notes: tuple[str, ...] = ()

    def render(self) -> str:
        """What was written, one file per entry with its digest, then the notes."""
        lines = [f"wrote {w.path} ({w.what})\n  sha256 {w.sha256}" for w in self.written]
        return "\n".join(lines + list(self.notes))


def _targets(cfg: Config) -> tuple[Path | None, Path | None]:
    """(manifest, frozen) to write; raise ConfigError when the configuration cannot say."""
    problems = []
    frozen = cfg.environment.frozen
    if (cfg.integrity.manifest is None and frozen is None and cfg.daemon.software_manifest is None
            and cfg.integrity.signature is None):
        problems.append(ConfigProblem("integrity.manifest", "neither integrity.manifest nor "
                                      "environment.frozen is set: there is no baseline to write"))
    if frozen is not None and cfg.server.venv is None:
        problems.append(ConfigProblem("server.venv", "must be set to write environment.frozen "
                                      "(the frozen file describes that venv)"))
    if problems:
        raise ConfigError(str(cfg.source), problems)
    return cfg.integrity.manifest, frozen


def write_baselines(cfg: Config, *, workers: int | None = None,
                    from_signature: SignatureSource | None = None) -> BaselineResult:
    """Approve the current weights and software: write integrity.manifest, environment.frozen
    (with its .sha256 and the software manifest it approves) from server.model and
    server.venv, and daemon.software_manifest (+ .sha256) from the daemon's own venv.

    With `from_signature`, integrity.manifest is written from the digests a verified model
    signature approves, once the model folder has been hashed and found to be exactly what it
    signs (the air-gapped transfer: signed on the connected machine, verified here, then
    served under the manifest).

    Raises CheckFailed, writing nothing, if the model folder holds unsafe paths or corrupt
    safetensors, if installed files differ from their RECORD (environment.record_check), or
    if the signature does not verify or does not cover the folder exactly; SignatureError for
    an unreadable signature or key; ConfigError when integrity.manifest is not set for it.
    """
    manifest_path, frozen_path = _targets(cfg)
    threads = cfg.integrity.hash_workers if workers is None else workers
    notes: list[str] = []
    created = None
    if from_signature is not None:
        if manifest_path is None:
            raise ConfigError(str(cfg.source), [ConfigProblem(
                "integrity.manifest", "must be set to write the weights manifest from a "
                "signature (--from-signature)")])
        created, note = _from_signature(cfg, from_signature, manifest_path, threads)
        notes.append(note)
    elif manifest_path is not None:
        created = manifest.create_manifest(cfg.server.model, manifest_path=manifest_path,
                                           allowed_roots=cfg.integrity.allowed_roots,
                                           workers=threads)
    frozen_data = None
    files: software.SoftwareManifest | None = None
    venv = cfg.server.venv
    if frozen_path is not None and venv is not None:
        if cfg.environment.record_check:
            report = verify_records(venv, workers=threads)
            if not report.ok:
                raise CheckFailed("refusing to approve the server venv: installed files differ "
                                  f"from their RECORD:\n{report.render()}\nReinstall the "
                                  "affected packages, then run the baseline again")
        # --all: pip, setuptools and wheel are server software too (uv pip freeze lists them).
        frozen_data = freeze(venv, all=True).encode()
        if cfg.environment.files_check:
            files = software.create(venv, workers=threads)
    own = None
    if cfg.daemon.software_manifest is not None:
        own = software.create(software.own_venv(), workers=threads)
    i = cfg.integrity
    if i.signature is not None:
        # The weights are approved by their signature, not by this command: say which.
        signed = signing.verify(i.signature, public_key=i.public_key,
                                certificate_chain=i.certificate_chain)
        notes.append(f"weights: approved by the signature {i.signature} ({signed.signer}, "
                     f"{len(signed.manifest)} files), not rewritten")

    written: list[Written] = []
    if created is not None and manifest_path is not None:
        digest = manifest.write_manifest(manifest_path, created.manifest)
        written.append(Written(manifest_path, digest, (
            f"{len(created.manifest)} files of {cfg.server.model}, "
            f"{human_size(created.bytes_hashed)} hashed in {created.seconds:.2f} s, "
            f"{human_rate(created.bytes_hashed, created.seconds)}")))
        pin = cfg.integrity.manifest_sha256
        if pin is not None and pin != digest:
            notes.append(f"integrity.manifest_sha256 pins {pin}: set it to {digest} in "
                         f"{cfg.source}, or the daemon will refuse the new manifest")
    if frozen_data is not None and frozen_path is not None:
        if files is not None:
            files_path = software.path_for_frozen(frozen_path)
            files_digest = software.write(files_path, files)
            frozen_data = software.link_line(files_path, files_digest) + frozen_data
            written.append(Written(files_path, files_digest, _software_what(files)))
        atomic_write(frozen_path, frozen_data, mode=0o644)
        companion = companion_path(frozen_path)
        companion_data = render_companion(frozen_path, frozen_data)
        atomic_write(companion, companion_data, mode=0o644)
        count = len(parse_frozen(frozen_data).requirements)
        written.append(Written(frozen_path, companion_data.split(b" ", 1)[0].decode(),
                               f"{count} packages of {venv}, pip freeze --all format"))
        written.append(Written(companion, manifest.file_sha256(companion),
                               f"shasum -a 256 of {frozen_path.name}"))
    if own is not None and cfg.daemon.software_manifest is not None:
        path = cfg.daemon.software_manifest
        digest = software.write(path, own)
        written.append(Written(path, digest, _software_what(own) + " (the daemon itself)"))
        companion = companion_path(path)
        atomic_write(companion, render_companion(path, path.read_bytes()),
                     mode=0o644)
        written.append(Written(companion, manifest.file_sha256(companion),
                               f"shasum -a 256 of {path.name}"))
    return BaselineResult(written=tuple(written), notes=tuple(notes))


def _from_signature(cfg: Config, source: SignatureSource, manifest_path: Path,
                    workers: int) -> tuple[manifest.CreateResult, str]:
    """The weights manifest a verified signature approves, after checking the folder is exactly
    what it signs; and a note naming the signer."""
    signed = signing.verify(source.signature, public_key=source.public_key,
                            certificate_chain=source.certificate_chain)
    model = cfg.server.model
    result, bad = signing.check_folder(signed, model, signature=source.signature,
                                       allowed_roots=cfg.integrity.allowed_roots,
                                       workers=workers, exclude=manifest_path)
    if bad:
        shown = "\n".join(f"  {r.status} ./{r.path}" for r in bad[:20])
        more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
        raise CheckFailed(f"refusing to approve {model} from the signature {source.signature} "
                          f"({signed.signer}): the folder is not what it signs:\n{shown}{more}")
    approved = manifest.Manifest(digests=dict(signed.manifest.digests),
                                 source=str(manifest_path))
    left_out = [p for p in signed.ignored(model) if p.exists() and p != source.signature]
    note = (f"weights: {len(approved)} files approved by the signature {source.signature} "
            f"({signed.signer}); the folder was hashed and matches it")
    if left_out:
        note += ("; the signer left out " + ", ".join(str(p) for p in left_out[:5]) +
                 ": the manifest does not list them, so move them out of the model folder "
                 "or the daemon will report them as extra files")
    return manifest.CreateResult(manifest=approved, bytes_hashed=result.bytes_hashed,
                                 seconds=result.seconds), note


def _software_what(m: software.SoftwareManifest) -> str:
    return (f"{len(m.digests)} files of {m.venv} and its interpreter "
            f"{m.interpreter.summary()}")
