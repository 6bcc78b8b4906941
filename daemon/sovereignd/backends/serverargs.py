"""server.args as the server itself parses them, for `sovereignd check` (no model loaded).

The daemon does not import vLLM (DESIGN.md): a short program runs in the server venv's own
Python, builds the server's own argument parser -- vLLM's `make_arg_parser` on a
`FlexibleArgumentParser` (vllm/entrypoints/launchers/cli_args.py, vllm 0.32; also under
vllm/entrypoints/openai/cli_args.py in older releases), or vllm-mlx's `create_parser`
(vllm_mlx/cli.py, 0.6) -- and parses the argument vector the daemon would start with twice:
without server.args and with them. So every spelling the server accepts is judged as the
server judges it: vLLM turns `--api_key` into `--api-key` and, like any argparse parser,
takes an unambiguous prefix (`--api-k`, `--hos`) for the whole flag.

What comes back: the parser's own `error:` line (unknown flag, bad choice, ambiguous prefix,
missing value), the settings the daemon owns that server.args changed (a key, the host, the
model...), vLLM's own pre-start checks (`validate_parsed_serve_args`: a tool-call parser for
`--enable-auto-tool-choice`...), unknown tool-call and reasoning parser names, and whether
the server would log request content. The arguments travel on the program's stdin, never on
a command line; no key is involved (vLLM's comes from the environment, which the program
does not get; vllm-mlx's is a placeholder).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sovereignd.errors import SovereigndError

# Settings the daemon sets itself, by the server parser's destination name -> the flag.
RESERVED_DESTS = {
    "api_key": "--api-key", "host": "--host", "port": "--port", "model": "--model",
    "model_tag": "the positional model", "served_model_name": "--served-model-name",
    "uds": "--uds", "shutdown_timeout": "--shutdown-timeout",
}
PLACEHOLDER_KEY = "sovereignd-check-placeholder"
RESULT_MARK = "SOVEREIGND-SERVERARGS "
TIMEOUT = 300.0  # importing vLLM on a busy 2-core machine took 8-42 s

_PROGRAM = r'''
import contextlib, io, json, sys
req = json.loads(sys.stdin.read())
out = {"error": None, "changed": [], "validate": None, "unknown_parsers": [],
       "logs_content": False}
sys.argv[0] = req["prog"]
if req["backend"] == "vllm-mlx":
    from vllm_mlx.cli import create_parser
    parser = create_parser()
else:
    try:
        from vllm.utils.argparse_utils import FlexibleArgumentParser
        from vllm.entrypoints.launchers.cli_args import (make_arg_parser,
                                                         validate_parsed_serve_args)
    except ImportError:
        from vllm.utils import FlexibleArgumentParser
        from vllm.entrypoints.openai.cli_args import (make_arg_parser,
                                                      validate_parsed_serve_args)
    parser = make_arg_parser(FlexibleArgumentParser(prog=req["prog"]))

def parse(argv):
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return vars(parser.parse_args(argv)), None
    except SystemExit:
        lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
        return None, lines[-1] if lines else "the parser refused the arguments"

base, error = parse(req["base"])
if error is not None:
    out["error"] = "(without server.args) " + error
else:
    full, out["error"] = parse(req["base"] + req["args"])
    if full is not None:
        out["changed"] = sorted(d for d in req["reserved"]
                                if d in full and full.get(d) != base.get(d))
        out["logs_content"] = bool(full.get("enable_log_requests")
                                   or full.get("enable_log_outputs"))
        if req["backend"] == "vllm":
            import argparse
            try:
                validate_parsed_serve_args(argparse.Namespace(**full))
            except Exception as exc:
                out["validate"] = f"{type(exc).__name__}: {exc}"
            checks = []
            if full.get("tool_call_parser"):
                from vllm.tool_parsers import ToolParserManager
                checks.append(("--tool-call-parser", full["tool_call_parser"],
                               ToolParserManager.list_registered()))
            if full.get("reasoning_parser"):
                from vllm.reasoning import ReasoningParserManager
                checks.append(("--reasoning-parser", full["reasoning_parser"],
                               ReasoningParserManager.list_registered()))
            for flag, name, known in checks:
                if name not in known:
                    out["unknown_parsers"].append([flag, name, sorted(known)])
print("SOVEREIGND-SERVERARGS " + json.dumps(out), flush=True)
'''


@dataclass(frozen=True)
class ParsedArgs:
    """The server parser's verdict on server.args (see the module docstring)."""

    error: str | None = None
    changed: tuple[str, ...] = ()           # reserved flags server.args set (canonical)
    validate: str | None = None             # vLLM's own pre-start check, failed
    unknown_parsers: tuple[tuple[str, str, tuple[str, ...]], ...] = ()
    logs_content: bool = False

    @property
    def ok(self) -> bool:
        return not (self.error or self.changed or self.validate or self.unknown_parsers)

    def sentences(self) -> list[str]:
        """One operator sentence per problem found."""
        out = []
        if self.error:
            out.append(f"the server's parser refuses them: {self.error}")
        for flag in self.changed:
            out.append(f"they set {flag}, which the daemon sets itself (the server's parser "
                       "reads underscores as dashes and takes abbreviations)")
        if self.validate:
            out.append(f"the server's start-up check refuses them: {self.validate}")
        for flag, name, known in self.unknown_parsers:
            shown = ", ".join(known[:12]) + (", …" if len(known) > 12 else "")
            out.append(f"{flag} {name!r} is not one of this server's parsers ({shown})")
        return out


def server_python(command: Sequence[str], venv: Path | None) -> Path | None:
    """The Python of the server venv: server.venv's, else the interpreter of the command."""
    if venv is not None:
        return venv / "bin" / "python"
    prog = Path(command[0])
    if prog.name.startswith("python"):
        return prog
    if prog.is_absolute() and (prog.parent / "python").exists():
        return prog.parent / "python"
    return None


def parse_with_server(python: Path, backend: str, prog: str, base: Sequence[str],
                      args: Sequence[str], *, timeout: float = TIMEOUT) -> ParsedArgs:
    """Run the server's own parser on `base` (the daemon's arguments) and `base + args`.

    Raises SovereigndError when the program cannot run or answers nothing (the venv has no
    vLLM, a broken import): the caller reports "not checked" with the reason.
    """
    request = json.dumps({"backend": backend, "prog": prog, "base": list(base),
                          "args": list(args), "reserved": sorted(RESERVED_DESTS)})
    env = {k: v for k, v in os.environ.items() if k not in ("VLLM_API_KEY", "OPENAI_API_KEY")}
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONNOUSERSITE": "1"})
    try:
        res = subprocess.run([str(python), "-c", _PROGRAM], input=request, env=env,
                             capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SovereigndError(f"could not run {python}: {exc}") from exc
    for line in reversed(res.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            data = json.loads(line[len(RESULT_MARK):])
            return ParsedArgs(
                error=data["error"],
                changed=tuple(RESERVED_DESTS[d] for d in data["changed"]),
                validate=data["validate"],
                unknown_parsers=tuple((f, n, tuple(k)) for f, n, k in data["unknown_parsers"]),
                logs_content=bool(data["logs_content"]))
    last = next((ln for ln in reversed(res.stderr.splitlines()) if ln.strip()),
                f"exit status {res.returncode}")
    raise SovereigndError(f"{python} could not load the server's parser: {last.strip()[:300]}")
