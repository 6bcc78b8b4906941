"""`manifest`, `model sign`, `env` and `baseline`: the model's weights and the server's
software, checked and approved."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sovereignd.cli.common import EX_OK, config_arg, load_config
from sovereignd.config import Config
from sovereignd.errors import CheckFailed, ConfigError, ConfigProblem, SovereigndError, UsageError


def _workers_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", "-j", type=int, default=None, metavar="N",
                   help="threads hashing files in parallel (default: one per CPU, or "
                        "integrity.hash_workers with --config)")


def _model_views(cfg: Config, name: str | None) -> list[tuple[str, Config]]:
    """(model name, its configuration view) for `--model NAME`, or for every configured model
    without one (the single `server:` form is one model). ConfigError for an unknown name."""
    from sovereignd.supervision.models import model_config

    if name is not None and name not in cfg.models:
        raise ConfigError("command line", [ConfigProblem(
            "--model", f"no model {name!r} in the configuration (models: "
            f"{', '.join(cfg.models)})")])
    return [(n, model_config(cfg, spec)) for n, spec in cfg.models.items()
            if name is None or n == name]


def _workers(args: argparse.Namespace) -> int:
    if args.workers is not None and args.workers < 0:
        raise UsageError("--workers must be 0 (one per CPU) or more")
    return args.workers or 0


def _cmd_manifest_create(args: argparse.Namespace) -> int:
    from sovereignd.integrity import manifest
    from sovereignd.units import human_rate, human_size

    out: Path = args.output or args.model_dir / manifest.DEFAULT_NAME
    result = manifest.create_manifest(args.model_dir, manifest_path=out,
                                      allowed_roots=args.allowed_root, workers=_workers(args))
    digest = manifest.write_manifest(out, result.manifest)
    print(f"wrote {out}: {len(result.manifest)} files, {human_size(result.bytes_hashed)} hashed "
          f"in {result.seconds:.2f} s ({human_rate(result.bytes_hashed, result.seconds)})\n"
          f"manifest sha256 {digest} (integrity.manifest_sha256 pins this)", file=sys.stderr)
    return EX_OK


def _cmd_manifest_verify(args: argparse.Namespace) -> int:
    from sovereignd.integrity import manifest

    path: Path = args.manifest or args.model_dir / manifest.DEFAULT_NAME
    approved = manifest.read_manifest(path)
    report = manifest.verify_manifest(args.model_dir, approved, manifest_path=path,
                                      allowed_roots=args.allowed_root, workers=_workers(args))
    for line in report.lines(quiet=args.quiet):
        print(line)
    sys.stdout.flush()
    print(report.summary(), file=sys.stderr)
    if not report.ok:
        raise CheckFailed(f"{args.model_dir} does not match {path}: "
                          f"{len(report.problems)} of {len(report.results)} files are not OK")
    return EX_OK


def _cmd_model_sign(args: argparse.Namespace) -> int:
    from sovereignd.integrity import signing

    out: Path = args.signature or args.model_dir / "model.sig"
    signed = signing.sign(args.model_dir, args.private_key, out)
    print(f"wrote {out}: {len(signed.manifest)} files signed by {signed.signer}\n"
          f"configure integrity.signature: {out} and integrity.public_key: the public half "
          "of the key (openssl ec -in KEY -pubout)", file=sys.stderr)
    return EX_OK


def add_model(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("model", help="sign a model folder (OpenSSF Model Signing)")
    msub = p.add_subparsers(dest="model_cmd", required=True)
    s = msub.add_parser("sign", help="sign MODEL_DIR with an EC private key, as `model_signing "
                                     "sign key` does (on the connected machine; the sovereign "
                                     "one verifies with integrity.signature)")
    s.add_argument("model_dir", type=Path, metavar="MODEL_DIR")
    s.add_argument("--private-key", type=Path, required=True, metavar="KEY",
                   help="PEM EC private key (P-256, P-384 or P-521), not encrypted")
    s.add_argument("--signature", type=Path, metavar="FILE",
                   help="signature to write (default: MODEL_DIR/model.sig)")
    s.set_defaults(handler=_cmd_model_sign)


def add_manifest(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("manifest", help="write or check a model folder's checksums "
                                        "(shasum -a 256 format)")
    msub = p.add_subparsers(dest="manifest_cmd", required=True)
    c = msub.add_parser("create", help="hash every file of MODEL_DIR into a manifest")
    c.add_argument("model_dir", type=Path, metavar="MODEL_DIR")
    c.add_argument("--output", "-o", type=Path, metavar="FILE",
                   help="manifest to write (default: MODEL_DIR/CHECKSUMS.sha256)")
    for q in (c, v := msub.add_parser(
            "verify", help="check MODEL_DIR against its manifest; exit 0 only if all is OK")):
        _workers_arg(q)
        q.add_argument("--allowed-root", action="append", type=Path, default=[], metavar="DIR",
                       help="folder outside MODEL_DIR that its symlinks may point into "
                            "(repeatable; integrity.allowed_roots)")
    c.set_defaults(handler=_cmd_manifest_create)
    v.add_argument("model_dir", type=Path, metavar="MODEL_DIR")
    v.add_argument("--manifest", "-m", type=Path, metavar="FILE",
                   help="manifest to check against (default: MODEL_DIR/CHECKSUMS.sha256)")
    v.add_argument("--quiet", "-q", action="store_true", help="print only files that are not OK")
    v.set_defaults(handler=_cmd_manifest_verify)


def _env_targets(args: argparse.Namespace, view: Config | None = None,
                 ) -> tuple[Path, Path | None, bool, int, bool]:
    """(venv, frozen file or None, whether to check RECORD, workers, whether to check every
    file against the software manifest) from flags and config (`view`: one model's)."""
    venv, frozen, record, workers = args.venv, args.frozen, not args.no_record, args.workers
    files = not args.no_files
    if args.config is not None:
        cfg = view if view is not None else load_config(args)
        venv = venv or cfg.server.venv
        frozen = frozen or cfg.environment.frozen
        record = record and cfg.environment.record_check
        files = files and cfg.environment.files_check
        workers = cfg.integrity.hash_workers if workers is None else workers
        if venv is None:
            from sovereignd.errors import ConfigProblem

            raise ConfigError(str(args.config), [ConfigProblem(
                "server.venv", "is not set: there is no server venv to verify")])
    if venv is None:
        raise SovereigndError("say which venv to verify: --config FILE or --venv DIR")
    return venv, frozen, record, workers or 0, files


def _cmd_env_verify(args: argparse.Namespace) -> int:
    from sovereignd.integrity import software

    if args.self:
        cfg = load_config(args)
        if cfg.daemon.software_manifest is None:
            raise SovereigndError("daemon.software_manifest is not set: the daemon has no "
                                  "approved software of its own to verify against")
        own = software.verify(software.read_with_companion(cfg.daemon.software_manifest),
                              workers=args.workers or 0)
        print(own.render())
        if not own.ok:
            raise CheckFailed("the daemon's own venv or interpreter differs from "
                              f"{cfg.daemon.software_manifest}")
        return EX_OK
    if args.config is not None and args.venv is None and args.frozen is None:
        views = _model_views(load_config(args), args.model)
        if len(views) > 1:  # several models: each one's venv against its own baseline
            failed_models = []
            for name, view in views:
                print(f"== model {name}")
                try:
                    _verify_env(*_env_targets(args, view))
                except CheckFailed as exc:
                    print(f"FAILED: {exc}")
                    failed_models.append(name)
            if failed_models:
                raise CheckFailed(f"the server software of {', '.join(failed_models)} differs "
                                  "from its approved baseline")
            return EX_OK
        return _verify_env(*_env_targets(args, views[0][1]))
    return _verify_env(*_env_targets(args))


def _verify_env(venv: Path, frozen: Path | None, record: bool, workers: int,
                files: bool) -> int:
    from sovereignd.integrity import environment, software
    from sovereignd.integrity.frozen import read_frozen
    from sovereignd.integrity.record import verify_records

    failed = []
    if frozen is not None:
        diff = environment.compare(read_frozen(frozen), venv)
        print(diff.render())
        if not diff.ok:
            failed.append("installed packages differ from the frozen requirements")
    if frozen is not None and files and not software.approves_manifest(frozen):
        print(f"{frozen} approves no software manifest: the venv's files and its interpreter "
              "are not verified (write one with `sovereignd baseline`; the daemon refuses to "
              "start the server without it unless environment.files_check is false)")
    elif frozen is not None and files:
        approved = software.verify(software.read_approved(frozen), workers=workers)
        print(approved.render())
        if not approved.ok:
            failed.append("files of the venv or its interpreter differ from the approved "
                          "software")
    if record:
        report = verify_records(venv, workers=workers)
        print(report.render())
        if not report.ok:
            failed.append("installed files differ from their RECORD")
    if frozen is None and not record:
        raise SovereigndError("nothing to verify: no frozen file (--frozen or "
                              "environment.frozen) and RECORD checking is off")
    if failed:
        raise CheckFailed(f"{venv}: " + "; ".join(failed))
    return EX_OK


def _cmd_env_freeze(args: argparse.Namespace) -> int:
    from sovereignd.integrity.venv import freeze

    sys.stdout.write(freeze(args.venv, all=args.all))
    return EX_OK


def add_env(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("env", aliases=["environment"],
                       help="check or freeze the server's virtual environment")
    esub = p.add_subparsers(dest="env_cmd", required=True)
    v = esub.add_parser("verify", help="compare the server venv with the frozen requirements "
                                       "and hash its files against their RECORD")
    config_arg(v, required=False)
    v.add_argument("--venv", type=Path, metavar="DIR", help="venv to check (server.venv)")
    v.add_argument("--frozen", type=Path, metavar="FILE",
                   help="frozen requirements with a .sha256 beside them (environment.frozen)")
    v.add_argument("--no-record", action="store_true", help="skip the RECORD hash check")
    v.add_argument("--no-files", action="store_true",
                   help="skip hashing every file against the software manifest")
    v.add_argument("--self", action="store_true",
                   help="verify the daemon's own venv and interpreter (daemon.software_manifest)")
    v.add_argument("--model", metavar="NAME",
                   help="with several models: only this model's venv (default: each model's)")
    _workers_arg(v)
    v.set_defaults(handler=_cmd_env_verify)
    f = esub.add_parser("freeze", help="print VENV's packages as pip freeze does, without "
                                       "running its Python")
    f.add_argument("venv", type=Path, metavar="VENV")
    f.add_argument("--all", action="store_true",
                   help="also list pip, setuptools and wheel (as pip freeze --all, uv pip freeze)")
    f.set_defaults(handler=_cmd_env_freeze)


def _cmd_baseline(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    from sovereignd.integrity import baseline

    source = None
    if args.from_signature is not None:
        if (args.public_key is None) == (not args.certificate_chain):
            raise ConfigError("command line", [ConfigProblem(
                "--from-signature", "needs exactly one of --public-key or --certificate-chain "
                "(the key or chain that must have made the signature)")])
        source = baseline.SignatureSource(args.from_signature, args.public_key,
                                          tuple(args.certificate_chain or ()))
    views = _model_views(cfg, args.model)
    if source is not None and len(views) > 1:
        raise ConfigError("command line", [ConfigProblem(
            "--from-signature", "signs one model's folder: name it with --model")])
    for name, view in views:
        if len(cfg.models) > 1:
            print(f"== model {name}")
        result = baseline.write_baselines(view, workers=args.workers, from_signature=source)
        print(result.render())
    if args.accept:
        from sovereignd.gateway import control

        if cfg.control_socket.exists():
            print(control.request(cfg, "baseline-accepted", reason=args.reason))
        else:
            print("no daemon is running for this configuration; it will verify against the "
                  "new baselines when it starts")
    return EX_OK


def add_baseline(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("baseline", help="approve the current weights and software: write "
                                        "integrity.manifest, environment.frozen (+ .sha256 and "
                                        "the software manifest) and daemon.software_manifest")
    config_arg(p)
    _workers_arg(p)
    p.add_argument("--accept", action="store_true",
                   help="also tell the running daemon: it re-reads the baselines, verifies, "
                        "and leaves QUARANTINED if everything matches (recorded as an event)")
    p.add_argument("--reason", default="operator accepted a new baseline",
                   help="recorded with --accept in the event log")
    p.add_argument("--model", metavar="NAME",
                   help="with several models: only this model's baselines (default: each "
                        "model's, in turn)")
    p.add_argument("--from-signature", type=Path, metavar="SIG",
                   help="write integrity.manifest from the digests this model signature "
                        "(OpenSSF model signing) approves, once it verifies and the model "
                        "folder is exactly what it signs")
    p.add_argument("--public-key", type=Path, metavar="PEM",
                   help="with --from-signature: the signer's public key")
    p.add_argument("--certificate-chain", type=Path, action="append", metavar="PEM",
                   help="with --from-signature: the certificate chain (repeatable)")
    p.set_defaults(handler=_cmd_baseline)
