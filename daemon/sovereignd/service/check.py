"""`sovereignd check`: the configuration summarised, and the host checked before a start."""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sovereignd.backends import memory, modelfiles, registry, serverargs, tasks
from sovereignd.config import Config
from sovereignd.errors import SovereigndError
from sovereignd.integrity import manifest, signing, software
from sovereignd.integrity.frozen import read_frozen
from sovereignd.service import guardrails
from sovereignd.supervision import budget
from sovereignd.supervision.models import model_config
from sovereignd.units import format_duration

OK, WARN, FAIL = "ok", "warn", "FAIL"


@dataclass
class Report:
    """Checks with their verdicts; `ok` unless one failed (warnings do not fail)."""

    cfg: Config
    items: list[tuple[str, str, str]] = field(default_factory=list)

    def add(self, level: str, what: str, detail: str = "") -> None:
        self.items.append((level, what, detail))

    @property
    def ok(self) -> bool:
        return all(level != FAIL for level, _, _ in self.items)

    def render(self) -> str:
        c = self.cfg
        s = c.server
        uds = c.server_uds
        where = f"unix:{uds}" if uds else f"{s.host}:{s.port}"
        failed = sum(1 for level, _, _ in self.items if level == FAIL)
        warned = sum(1 for level, _, _ in self.items if level == WARN)
        # The verdict first: "valid" alone above a FAIL line read as a pass.
        verdict = ("every check below passed" if not failed
                   else f"{failed} check(s) below FAILED")
        lines = [f"configuration {c.source} (sha256 {c.digest[:16]}…): its settings are valid; "
                 f"{verdict}", "",
                 f"  model        {c.model_name}  <- {s.model}",
                 f"  server       {' '.join(s.command)} ({s.backend}) on {where}",
                 f"  gateway      {c.gateway.listen}",
                 f"  health       every {format_duration(c.health.interval)}, canary every "
                 f"{format_duration(c.health.canary_interval)}, restart after "
                 f"{c.health.failures} failures",
                 f"  restart      backoff {format_duration(c.restart.backoff_initial)}.."
                 f"{format_duration(c.restart.backoff_max)}, FATAL after "
                 f"{c.restart.max_failures} failures in {format_duration(c.restart.window)}",
                 "  integrity    "
                 f"{c.integrity.manifest or c.integrity.signature or 'not configured'}",
                 f"  environment  {c.environment.frozen or 'not configured'}",
                 f"  logs         {c.logs.dir}", ""]
        if len(c.models) > 1:
            lines[2:4] = ["  models       " + ", ".join(
                f"{n} ({m.start}, {m.server.backend})" for n, m in c.models.items())]
        width = max((len(w) for _, w, _ in self.items), default=0)
        for level, what, detail in self.items:
            lines.append(f"  [{level:>4}] {what:<{width}}  {detail}".rstrip())
        lines += ["", f"{failed} failed, {warned} warning(s)"]
        return "\n".join(lines)


def run_checks(cfg: Config) -> Report:
    """Everything that can be known before starting, each with a verdict; with several
    models, each model's checks on its own view, named by the model."""
    report = Report(cfg)
    if len(cfg.models) <= 1:
        _model_checks(cfg, report)
        _check_dirs(cfg, report)
        return report
    for name, spec in cfg.models.items():
        own = Report(model_config(cfg, spec))
        _model_checks(own.cfg, own)
        report.items += [(level, f"{name}: {what}", detail) for level, what, detail in own.items]
    _check_dirs(cfg, report)
    _check_budget(cfg, report)
    return report


def _model_checks(cfg: Config, report: Report) -> None:
    _check_model(cfg, report)
    _check_model_files(cfg, report)
    _check_command(cfg, report)
    _check_server_args(cfg, report)
    _check_ports(cfg, report)
    _check_backend(cfg, report)
    _check_guards(cfg, report)
    _check_context_length(cfg, report)
    _check_memory(cfg, report)
    _check_baselines(cfg, report)
    _check_software(cfg, report)


def _check_budget(cfg: Config, report: Report) -> None:
    """The `start: always` models together against the memory budget (each as estimated)."""
    if not cfg.memory.check:
        return
    needs = {name: budget.need_of(model_config(cfg, spec)) for name, spec in cfg.models.items()
             if spec.start == "always"}
    known = {n: v for n, v in needs.items() if v is not None}
    limit, source = (cfg.memory.budget, "memory.budget") if cfg.memory.budget is not None \
        else (memory.read_host_memory().total, memory.read_host_memory().source)
    total = sum(known.values())
    what = (f"start: always models need {memory.size(total)} together ("
            + ", ".join(f"{n} {memory.size(v)}" for n, v in known.items())
            + f"; not estimated: {', '.join(n for n in needs if n not in known) or 'none'}) "
            f"of {memory.size(limit)} ({source})")
    report.add(OK if total <= limit else FAIL, "memory budget", what)


def _check_model(cfg: Config, report: Report) -> None:
    model = cfg.server.model
    if not model.is_dir():
        report.add(FAIL, "model directory", f"{model} does not exist or is not a directory")
    elif not (model / "config.json").is_file():
        report.add(WARN, "model directory", f"{model} has no config.json")
    else:
        report.add(OK, "model directory", str(model))


def _check_model_files(cfg: Config, report: Report) -> None:
    """Tokenizer files and a chat template, as the server will look for them."""
    model, args = cfg.server.model, cfg.server.args
    if not model.is_dir():
        return
    problem = modelfiles.tokenizer_problem(model, args)
    report.add(FAIL if problem else OK, "tokenizer", problem or "tokenizer files present")
    source = modelfiles.chat_template_source(model, args)
    if source is not None:
        report.add(OK, "chat template", source)
    elif cfg.server.completions_only:
        report.add(OK, "chat template", "none; server.completions_only is set (chat requests "
                   "will answer 400)")
    elif tasks.is_pooling(model, args, cfg.server.backend):
        report.add(OK, "chat template", "none needed: a pooling model ("
                   f"{tasks.task_of(model, args, cfg.server.backend)}), readiness is proven "
                   "by its own request")
    else:
        report.add(FAIL, "chat template", "none (tokenizer_config.json has no chat_template, "
                   "no chat_template.jinja, no --chat-template): every chat request would "
                   "answer 400; add the model's template, or set server.completions_only: true "
                   "for a model that serves completions only")


def _check_server_args(cfg: Config, report: Report) -> None:
    """server.args through the server's own parser, in the server venv (no model loaded)."""
    s = cfg.server
    backend = registry.for_config(cfg)
    python = serverargs.server_python(s.command, s.venv)
    argv = backend.argv(cfg, serverargs.PLACEHOLDER_KEY)
    base = argv[: len(argv) - len(s.args)]
    # vLLM's parser is the `serve` subcommand's own; vllm-mlx's takes `serve` itself.
    skip = len(s.command) - 1 if s.backend == "vllm-mlx" else len(s.command)
    if python is None or not python.exists():
        report.add(WARN, "server.args", "not checked by the server's parser: set server.venv "
                   "(the server's Python is needed)")
        logs_content = any(a.split("=", 1)[0] in backend.content_flags for a in s.args)
    else:
        try:
            parsed = serverargs.parse_with_server(python, s.backend, _prog(s.command),
                                                  base[skip:], s.args)
        except SovereigndError as exc:
            report.add(WARN, "server.args", f"not checked by the server's parser: {exc}")
            return
        for sentence in parsed.sentences():
            report.add(FAIL, "server.args", sentence)
        if parsed.ok:
            report.add(OK, "server.args", f"accepted by the server's own parser ({python})")
        logs_content = parsed.logs_content
    if logs_content:
        verdict = {"keep": "KEPT in server.log", "redact": "redacted in server.log",
                   "drop": "dropped from server.log"}[s.content_lines]
        report.add(WARN, "server output", "server.args make the server log request content "
                   f"(prompts, generated text); server.content_lines is {s.content_lines!r}: "
                   f"those lines are {verdict}")


def _prog(command: tuple[str, ...]) -> str:
    """The program name the server's parser prints in its `error:` lines."""
    if command[-1] == "serve":
        return " ".join(Path(c).name for c in command[-2:])
    return Path(command[-1]).name


def _check_command(cfg: Config, report: Report) -> None:
    prog = cfg.server.command[0]
    path = os.environ.get("PATH", "")
    if cfg.server.venv is not None:
        path = f"{cfg.server.venv / 'bin'}{os.pathsep}{path}"
        if not (cfg.server.venv / "bin").is_dir():
            report.add(FAIL, "server venv", f"{cfg.server.venv} has no bin/ folder")
    found = shutil.which(prog, path=path)
    if found is None:
        report.add(FAIL, "server command", f"{prog!r} not found (set server.command to a full "
                   "path or server.venv)")
    else:
        report.add(OK, "server command", found)


def _listening(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def _check_ports(cfg: Config, report: Report) -> None:
    s = cfg.server
    if cfg.server_uds is None:
        if _listening(s.host, s.port):
            report.add(WARN, "server port", f"{s.host}:{s.port} is in use now (a running "
                       "sovereignd's server, or another program)")
        else:
            report.add(OK, "server port", f"{s.host}:{s.port} is free")
    host, port = cfg.listen
    if _listening(host, port):
        report.add(WARN, "gateway port", f"{cfg.gateway.listen} is in use now (a running "
                   "sovereignd, or another program)")
    else:
        report.add(OK, "gateway port", f"{cfg.gateway.listen} is free")


def _check_dirs(cfg: Config, report: Report) -> None:
    for what, path in (("logs.dir", cfg.logs.dir), ("state dir", cfg.state_dir)):
        probe = path
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        if not os.access(probe, os.W_OK):
            report.add(FAIL, what, f"{path} cannot be created or written by this user")
        else:
            report.add(OK, what, str(path))


def _check_backend(cfg: Config, report: Report) -> None:
    backend = registry.for_config(cfg)
    if backend.key_in_argv:
        report.add(WARN, "internal key", f"{backend.name} takes its key only as --api-key: it "
                   "is visible to local users in `ps` while the server runs")
    if backend.logs_content:
        report.add(WARN, "server output", f"{backend.name} logs request content; "
                   f"server.content_lines is {cfg.server.content_lines!r}")


def _check_guards(cfg: Config, report: Report) -> None:
    # `run` refuses on these; `check` shows them for the account that will run the daemon.
    try:
        account = guardrails.account_for_check(cfg)
    except SovereigndError as exc:
        report.add(FAIL, "service account", str(exc))
        return
    problems = guardrails.check_protected(cfg, account) + guardrails.check_logs(cfg)
    if cfg.daemon.user is not None:
        problems += guardrails.check_identity(cfg, account, allow_root=False)
    elif account.uid == 0 and not cfg.daemon.allow_root:
        # Who runs `check` as root is usually the operator, not the service.
        report.add(WARN, "service account", "daemon.user is not set, so this was checked as "
                   "root; `sovereignd run` refuses root unless --allow-root or "
                   "daemon.allow_root: set daemon.user to the service account")
    for p in problems:
        report.add(FAIL, "guard rails", str(p))
    if not problems:
        who = "no other account" if account.uid == 0 else "it"
        report.add(OK, "guard rails", f"as {account.name}: {who} can change the protected "
                   "files; the log folder is closed to others")


def _check_context_length(cfg: Config, report: Report) -> None:
    """--max-model-len against the longest sequence vLLM derives from the model's files: vLLM
    refuses a longer one at start-up, after loading for a minute ("User-specified
    max_model_len (N) is greater than the derived max_model_len", vllm 0.32 config/model.py)."""
    s = cfg.server
    if s.backend != "vllm" or not s.model.is_dir():
        return
    try:
        asked = memory.parse_server_args(s.args, s.env).max_model_len
    except (SovereigndError, ValueError):
        return  # a malformed value: the server-arguments check reports it
    derived = modelfiles.context_length(s.model)
    if derived is None:
        report.add(WARN, "context length", "config.json gives no maximum length: vLLM assumes "
                   "2048 tokens (set --max-model-len in server.args)")
        return
    length, source = derived
    if asked is None or asked <= length:
        report.add(OK, "context length", f"{asked or length} tokens (the model allows {length}: "
                   f"{source})")
    elif s.env.get("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "").lower() in ("1", "true"):
        report.add(WARN, "context length", f"--max-model-len {asked} is above the model's "
                   f"{length} ({source}); allowed by VLLM_ALLOW_LONG_MAX_MODEL_LEN, but "
                   "positions past it give wrong output")
    else:
        report.add(FAIL, "context length", f"--max-model-len {asked} is greater than the "
                   f"model's {length} tokens ({source}): vLLM would refuse to start; lower "
                   f"--max-model-len in server.args to at most {length}")


def _check_memory(cfg: Config, report: Report) -> None:
    verdict = memory.Preflight(cfg).evaluate()
    if verdict is None:
        report.add(OK, "memory", "not checked (memory.check is off, or not a vLLM server)")
    elif not verdict.ok:
        report.add(FAIL, "memory", verdict.sentence())
    elif verdict.summary.startswith("not estimated"):
        report.add(WARN, "memory", verdict.summary)
    else:
        report.add(OK, "memory", verdict.summary)


def _check_baselines(cfg: Config, report: Report) -> None:
    """The baselines exist, parse, and match their pins (hashing everything is for
    `sovereignd manifest verify` / `env verify`, or the daemon's first start)."""
    path = cfg.integrity.manifest
    if cfg.integrity.signature is not None:
        _check_signature(cfg, report)
    elif path is None:
        report.add(WARN, "weights baseline", "integrity.manifest is not set: the weights will "
                   "not be verified (write one with `sovereignd baseline`)")
    else:
        try:
            if cfg.integrity.manifest_sha256 is not None:
                manifest.check_manifest_pin(path, cfg.integrity.manifest_sha256)
            listed = manifest.read_manifest(path)
            report.add(OK, "weights baseline", f"{path}: {len(listed.digests)} files listed"
                       + (", pin matches" if cfg.integrity.manifest_sha256 else ""))
        except (SovereigndError, OSError) as exc:
            report.add(FAIL, "weights baseline", f"{exc} (write it with `sovereignd baseline`)")
    frozen = cfg.environment.frozen
    if frozen is None:
        report.add(WARN, "software baseline", "environment.frozen is not set: the server "
                   "software will not be verified")
    elif cfg.server.venv is None:
        report.add(FAIL, "software baseline", "environment.frozen needs server.venv")
    else:
        try:
            reqs = read_frozen(frozen)
            report.add(OK, "software baseline", f"{frozen}: {len(reqs.requirements)} packages, "
                       ".sha256 companion matches")
        except (SovereigndError, OSError) as exc:
            report.add(FAIL, "software baseline", f"{exc} (write it with `sovereignd baseline`)")


def _check_signature(cfg: Config, report: Report) -> None:
    """The model's signature verifies with the configured key or chain, and the model folder
    is what it signs (every file hashed: a signature is only worth the files it covers)."""
    i = cfg.integrity
    assert i.signature is not None
    try:
        signed = signing.verify(i.signature, public_key=i.public_key,
                                certificate_chain=i.certificate_chain)
    except SovereigndError as exc:
        report.add(FAIL, "model signature", str(exc))
        return
    report.add(OK, "model signature", f"{i.signature}: signed by {signed.signer}, "
               f"{len(signed.manifest)} files")
    try:
        result, bad = signing.check_folder(signed, cfg.server.model, signature=i.signature,
                                           allowed_roots=i.allowed_roots,
                                           workers=i.hash_workers)
    except SovereigndError as exc:
        report.add(FAIL, "signed weights", str(exc))
        return
    if bad:
        shown = ", ".join(f"{r.status} {r.path}" for r in bad[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        report.add(FAIL, "signed weights", f"the model folder {cfg.server.model} is not what "
                   f"the signature covers: {shown}{more}")
    else:
        report.add(OK, "signed weights", f"{len(result.results)} files match the signature "
                   f"({result.seconds:.2f} s)")


def _check_software(cfg: Config, report: Report) -> None:
    """The approved interpreters (server's and daemon's) against the ones that would run."""
    targets: list[tuple[str, Path, Callable[[], software.SoftwareManifest]]] = []
    frozen = cfg.environment.frozen
    if frozen is not None and cfg.server.venv is not None and cfg.environment.files_check:
        targets.append(("server interpreter", cfg.server.venv,
                        lambda: software.read_approved(frozen)))
    own = cfg.daemon.software_manifest
    if own is None:
        report.add(WARN, "daemon software", "daemon.software_manifest is not set: the daemon "
                   "does not verify its own venv and interpreter")
    else:
        try:
            targets.append(("daemon interpreter", software.own_venv(),
                            lambda: software.read_with_companion(own)))
        except SovereigndError as exc:
            report.add(FAIL, "daemon software", str(exc))
    for name, venv, read in targets:
        try:
            ok, text = software.interpreter_check(read(), venv)
            report.add(OK if ok else FAIL, name, text)
        except (SovereigndError, OSError) as exc:
            report.add(FAIL, name, f"{exc} (write it with `sovereignd baseline`)")
