"""Declarative configuration: every setting has a type, default, validator and description.

The loader reads the whole YAML file, validates every key and reports every problem at once
with its dotted path; the example configuration and `sovereignd config describe` are rendered
from the same declarations (the idea of gunicorn's `config.py` `Setting`).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from sovereignd.backends import modelfiles
from sovereignd.errors import ConfigError, ConfigProblem
from sovereignd.units import format_duration, format_size, parse_duration, parse_size

T = TypeVar("T")


@dataclass(frozen=True)
class _Context:
    """What parsers need beyond the value: relative paths resolve against the config's folder."""

    base_dir: Path


Parser = Callable[[object, _Context], Any]


# ---------------------------------------------------------------------------------------------
# Value parsers: each raises ValueError with a sentence that completes "<key>: ..."


def _str(value: object, _ctx: _Context) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected a non-empty string, got {value!r}")
    return value


def _opt_str(value: object, ctx: _Context) -> str | None:
    return None if value is None else _str(value, ctx)


def _bool(value: object, _ctx: _Context) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def _int_range(lo: int, hi: int) -> Parser:
    def parse(value: object, _ctx: _Context) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer, got {value!r}")
        if not lo <= value <= hi:
            raise ValueError(f"must be between {lo} and {hi}, got {value}")
        return value

    return parse


def _duration(minimum: float = 0.0) -> Parser:
    def parse(value: object, _ctx: _Context) -> float:
        seconds = parse_duration(value)
        if seconds < minimum:
            raise ValueError(f"must be at least {format_duration(minimum)}, got {value!r}")
        return seconds

    return parse


def _size(value: object, _ctx: _Context) -> int:
    return parse_size(value)


def _opt_size(value: object, _ctx: _Context) -> int | None:
    return None if value is None else parse_size(value)


def _path(value: object, ctx: _Context) -> Path:
    text = _str(value, ctx)
    path = Path(text).expanduser()
    return path if path.is_absolute() else (ctx.base_dir / path)


def _opt_path(value: object, ctx: _Context) -> Path | None:
    return None if value is None else _path(value, ctx)


def _str_list(value: object, _ctx: _Context) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"expected a list of strings, got {value!r}")
    return tuple(value)


def _nonempty_str_list(value: object, ctx: _Context) -> tuple[str, ...]:
    items = _str_list(value, ctx)
    if not items or not items[0]:
        raise ValueError("must name at least the program to run")
    return items


def _path_list(value: object, ctx: _Context) -> tuple[Path, ...]:
    return tuple(_path(v, ctx) for v in _str_list(value, ctx))


def _str_map(value: object, _ctx: _Context) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"expected a mapping of NAME: value, got {value!r}")
    out: dict[str, str] = {}
    for k, v in value.items():
        if not isinstance(k, str) or not k:
            raise ValueError(f"variable names must be strings, got {k!r}")
        if isinstance(v, bool) or not isinstance(v, str | int | float):
            raise ValueError(f"value of {k} must be a string or a number, got {v!r}")
        out[k] = str(v)
    return out


def _choice(*options: str) -> Parser:
    def parse(value: object, _ctx: _Context) -> str:
        if value not in options:
            raise ValueError(f"must be one of {', '.join(options)}; got {value!r}")
        return str(value)

    return parse


def _sha256_hex(value: object, ctx: _Context) -> str | None:
    if value is None:
        return None
    text = _str(value, ctx).lower()
    if len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
        raise ValueError("expected 64 hexadecimal digits (the output of `shasum -a 256`)")
    return text


def _listen(value: object, ctx: _Context) -> str:
    text = _str(value, ctx)
    split_host_port(text)
    return text


def split_host_port(text: str) -> tuple[str, int]:
    """Split "HOST:PORT" or "[V6]:PORT"; raise ValueError with the expected form."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"expected HOST:PORT such as 127.0.0.1:8000, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError(f"port must be between 1 and 65535, got {port}")
    return host, port


def is_loopback(host: str) -> bool:
    """True for localhost, 127.0.0.0/8 and ::1."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------------
# Declarations


def setting(doc: str, parse: Parser, default: Any = dataclasses.MISSING,
            example: Any = None) -> Any:
    """Declare one setting: its description, parser, default, and a value for the example file."""
    meta = {"doc": doc, "parse": parse, "example": example}
    if isinstance(default, list):
        default = tuple(default)  # list settings parse to tuples; defaults match
    if isinstance(default, dict):
        initial = dict(default)
        return field(default_factory=lambda: dict(initial), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class DaemonSection:
    """How the daemon itself runs."""

    state_dir: Path | None = setting(
        "Folder for the server pidfile, the control socket and sealing state (default: logs.dir). "
        "Must be writable by the service account.",
        _opt_path, None, "/usr/local/var/sovereignd/state")
    allow_root: bool = setting(
        "Allow running as root. A production daemon runs as its own unprivileged account.",
        _bool, False)
    user: str | None = setting(
        "The service account the daemon is expected to run as; checked at start when set.",
        _opt_str, None, "_sovereignd")
    reserved_fds: int = setting(
        "File descriptors kept free for supervision (server pipes, probes, logs, file "
        "watches): client connections are capped so that they never use these.",
        _int_range(32, 1_000_000), 128)
    software_manifest: Path | None = setting(
        "The daemon's own software manifest (its venv and interpreter), with a .sha256 "
        "companion; written by `sovereignd baseline`, verified at start and every "
        "environment.interval. Unset: the daemon does not verify itself.",
        _opt_path, None, "/usr/local/etc/sovereignd/daemon-software.sha256")


@dataclass(frozen=True)
class ServerSection:
    """The model server the daemon starts and keeps alive."""

    model: Path = setting(
        "Local model directory. Never fetched from a hub.", _path, example="/path/to/model-dir")
    backend: str = setting(
        "Which server program this is: vllm (vllm serve, also with vllm-metal) or vllm-mlx.",
        _choice("vllm", "vllm-mlx"), "vllm")
    command: tuple[str, ...] = setting(
        "Argument vector prefix of the server; the daemon appends --model, --host, --port.",
        _nonempty_str_list, ["vllm", "serve"])
    served_model_name: str | None = setting(
        "Model name clients ask for (default: the model directory's name; ORG/NAME for a "
        "Hugging Face cache snapshot models--ORG--NAME/snapshots/REV).",
        _opt_str, None, "my-model")
    host: str = setting(
        "Address the server binds; loopback only unless server.allow_remote is true.",
        _str, "127.0.0.1")
    port: int = setting("Internal port of the server.", _int_range(1, 65535), 8001)
    uds: Path | None = setting(
        "Serve on this Unix socket instead of a TCP port (vllm --uds); host and port are ignored. "
        "Its folder must be the service account's alone (mode 0700).",
        _opt_path, None)
    transport: str = setting(
        "How the daemon reaches the server: unix (a socket in <state_dir>/srv, a folder only "
        "the service account can enter), tcp (server.host:server.port, whose listener is "
        "checked to belong to the server before every connection), or auto (unix where the "
        "backend supports it: vllm; tcp for vllm-mlx).", _choice("auto", "unix", "tcp"), "auto")
    allow_remote: bool = setting(
        "Allow server.host to be a non-loopback address. The server's own key guards only part "
        "of its routes, so this exposes unauthenticated endpoints.", _bool, False)
    args: tuple[str, ...] = setting(
        "Extra arguments passed to the server as given.", _str_list, [],
        ["--max-model-len", "4096"])
    env: dict[str, str] = setting(
        "Extra environment for the server.", _str_map, {}, {"VLLM_CPU_KVCACHE_SPACE": "4"})
    venv: Path | None = setting(
        "Virtual environment the server runs from; watched for drift. Its bin/ is put first on "
        "the server's PATH.", _opt_path, None, "/path/to/server-venv")
    start_timeout: float = setting(
        "Longest time from spawn to READY (health and canary) before the start counts as failed.",
        _duration(1.0), 600.0)
    drain: float = setting(
        "Time in-flight requests get to finish on stop (passed as --shutdown-timeout).",
        _duration(), 10.0)
    stop_grace: float = setting(
        "Time from SIGTERM to SIGKILL of the server's process group; must exceed drain.",
        _duration(0.1), 20.0)
    output_buffer: int = setting(
        "Lines of server output kept in memory for diagnosis.", _int_range(10, 100_000), 500)
    content_lines: str = setting(
        "What to do with server output lines known to hold prompt content (vllm-mlx previews "
        "user messages; vLLM's --enable-log-requests/--enable-log-outputs lines): keep, "
        "redact or drop.", _choice("keep", "redact", "drop"), "redact")
    completions_only: bool = setting(
        "The model serves completions only (a base model): no chat template is required. "
        "Otherwise a model without one fails `check` and is not READY.", _bool, False)


@dataclass(frozen=True)
class GatewaySection:
    """The only door to the model: health endpoints and the authenticated API."""

    listen: str = setting(
        "HOST:PORT of the gateway; loopback only unless gateway.allow_remote is true.",
        _listen, "127.0.0.1:8000")
    allow_remote: bool = setting(
        "Allow a non-loopback gateway.listen (then TLS and admin keys are required).",
        _bool, False)
    tls_cert: Path | None = setting("TLS certificate file (PEM).", _opt_path, None)
    tls_key: Path | None = setting("TLS private key file (PEM).", _opt_path, None)
    keys_file: Path = setting(
        "Client keys (hashes only), written by `sovereignd keys`.", _path, "keys.json")
    max_body: int = setting("Largest request body accepted.", _size, 8 * 2**20)
    idle_timeout: float = setting(
        "A connection that has not sent complete request headers within this time (new, or "
        "kept alive after a response) is closed: slow-header and idle protection in one timer.",
        _duration(0.1), 15.0)
    body_timeout: float = setting(
        "Time a client has to send its request body once the headers arrived.",
        _duration(0.1), 30.0)
    upstream_timeout: float = setting(
        "Longest time a request may take at the server (streams included).",
        _duration(1.0), 600.0)
    max_connections: int = setting(
        "Client connections held at once; more are answered 503 and closed. Lowered at start "
        "to fit the descriptor limit less daemon.reserved_fds.", _int_range(1, 10_000_000), 4096)
    max_connections_per_address: int = setting(
        "Client connections held at once from one client address; more are answered 503.",
        _int_range(1, 10_000_000), 1024)
    client_concurrency: int = setting(
        "Requests one client may have in flight; more get 429.", _int_range(1, 100_000), 16)
    client_rate: int = setting(
        "Requests per minute one client may start (0 = unlimited); more get 429.",
        _int_range(0, 10_000_000), 0)
    auth_failures_per_minute: int = setting(
        "Failed authentications one client address may make per minute (bursts of a tenth of "
        "that, at least 5); beyond it, requests from that address that fail authentication "
        "get 429 with Retry-After. Requests with a valid key are never throttled by this.",
        _int_range(1, 10_000_000), 60)
    auth_event_interval: float = setting(
        "auth_failed events are summarised per client address and reason: the first at once, "
        "then one per interval with a count.", _duration(0.1), 60.0)
    max_prompt_tokens: int = setting(
        "Largest prompt + max_tokens (tokens, the prompt estimated from its size) a request may "
        "ask for; larger ones get 400 before the server sees them. 0: the model's context "
        "(--max-model-len, else max_position_embeddings) is the only cap.",
        _int_range(0, 100_000_000), 0)


@dataclass(frozen=True)
class HealthSection:
    """How the server is probed."""

    interval: float = setting("Time between /health probes.", _duration(0.05), 5.0)
    timeout: float = setting("Time one /health probe may take.", _duration(0.05), 5.0)
    failures: int = setting(
        "Consecutive failed probes (health or canary) that restart the server.",
        _int_range(1, 1000), 3)
    startup_poll: float = setting(
        "Time between /health polls while the server starts (and canary retries while it "
        "warms up): READY is noticed at most this late.", _duration(0.05), 0.25)
    canary_interval: float = setting(
        "Time between canary completions (1 token) while READY; an idle stalled engine is "
        "found within canary_interval + stall_timeout.", _duration(0.1), 5.0)
    canary_timeout: float = setting(
        "Time one canary completion may take.", _duration(0.1), 30.0)
    stall_timeout: float = setting(
        "Work at the server (client requests it has not answered in full, or the canary) "
        "with no progress (no byte from the server, its token counters standing still) this "
        "long: /readyz 503 at once.",
        _duration(0.5), 8.0)
    stall_restart: float = setting(
        "A stall that lasts this much longer is confirmed: the server is restarted (only "
        "where the server's own progress counters can be read).", _duration(0.5), 25.0)


@dataclass(frozen=True)
class RestartSection:
    """When and how fast the server is restarted."""

    backoff_initial: float = setting(
        "Wait before the second restart in a row; the first after a good run is immediate.",
        _duration(), 1.0)
    backoff_max: float = setting("Longest wait between restarts.", _duration(), 300.0)
    min_uptime: float = setting(
        "Time READY after which a run counts as good and the failure history is cleared.",
        _duration(), 60.0)
    max_failures: int = setting(
        "Failures within restart.window that make the server FATAL.", _int_range(1, 1000), 5)
    window: float = setting("Window for restart.max_failures.", _duration(1.0), 600.0)
    fatal_cooldown: float = setting(
        "Time after which FATAL tries again by itself (SIGHUP or `sovereignd restart` sooner).",
        _duration(1.0), 1800.0)


@dataclass(frozen=True)
class IntegritySection:
    """The approved weights, and what happens when they drift."""

    manifest: Path | None = setting(
        "Checksums of the model's files, as `shasum -a 256` writes them. Unset: not verified.",
        _opt_path, None, "/path/to/model-dir/CHECKSUMS.sha256")
    manifest_sha256: str | None = setting(
        "Pin the manifest file's own SHA-256.", _sha256_hex, None)
    signature: Path | None = setting(
        "OpenSSF Model Signing signature of the model (`model_signing sign`), verified offline "
        "before every start; its signed file digests are the approved weights (instead of "
        "integrity.manifest). Unset: no signature required.", _opt_path, None,
        "/path/to/model-dir/model.sig")
    public_key: Path | None = setting(
        "PEM public key (EC P-256/384/521) that must have made integrity.signature.",
        _opt_path, None, "/usr/local/etc/sovereignd/model-signer.pub")
    certificate_chain: tuple[Path, ...] = setting(
        "PEM certificates that must lead to the certificate that made integrity.signature "
        "(instead of integrity.public_key).", _path_list, [])
    on_drift: str = setting(
        "stop: stop the server and quarantine; alert: log and keep serving.",
        _choice("stop", "alert"), "stop")
    watch: bool = setting("Watch the model directory for changes.", _bool, True)
    stat_interval: float = setting(
        "Time between cheap stat checks (size, mtime, inode, ctime) of every file.",
        _duration(0.1), 10.0)
    rehash_interval: float = setting(
        "Time between full re-hashes of every file (0 = never).", _duration(), 86400.0)
    hash_workers: int = setting(
        "Threads hashing files in parallel (0 = one per CPU).", _int_range(0, 256), 0)
    allowed_roots: tuple[Path, ...] = setting(
        "Folders outside the model directory that its symlinks may point into.",
        _path_list, [])


@dataclass(frozen=True)
class EnvironmentSection:
    """The approved server software, and what happens when it drifts."""

    frozen: Path | None = setting(
        "Frozen requirements (`pip freeze` / `uv pip freeze`), with a .sha256 companion. "
        "Unset: not verified.", _opt_path, None, "/path/to/requirements-frozen.txt")
    on_drift: str = setting(
        "block-restart: keep serving, refuse new starts; stop: stop and quarantine; alert: log.",
        _choice("block-restart", "stop", "alert"), "block-restart")
    record_check: bool = setting(
        "Hash every installed file against its RECORD entry.", _bool, True)
    files_check: bool = setting(
        "Hash every file of the server venv and of its interpreter (binary, libpython, standard "
        "library) against the software manifest `sovereignd baseline` writes beside the frozen "
        "file; changed bytecode counts unless it is what its verified source compiles to.",
        _bool, True)
    watch: bool = setting("Watch the server venv's site-packages for changes.", _bool, True)
    interval: float = setting(
        "Time between scheduled environment checks (0 = never).", _duration(), 86400.0)


@dataclass(frozen=True)
class LogsSection:
    """Where the daemon writes its events, the server's output and the request records."""

    dir: Path = setting("Log folder (owned by the service account, mode 0750).", _path,
                        example="/usr/local/var/log/sovereignd")
    max_bytes: int = setting("Size at which events.log and server.log rotate.", _size, 64 * 2**20)
    keep: int = setting("Rotated event/server log files kept.", _int_range(1, 10_000), 10)


@dataclass(frozen=True)
class RequestsSection:
    """The request records: one sealed JSON line per request."""

    rotate_bytes: int = setting("Size at which requests.log rotates.", _size, 64 * 2**20)
    rotate_daily: bool = setting("Also rotate at UTC midnight.", _bool, True)
    compress: bool = setting("Compress rotated files (gzip).", _bool, True)
    keep_files: int = setting(
        "Rotated files kept (0 = all).", _int_range(0, 10_000_000), 0)
    max_age: float = setting("Rotated files older than this are removed (0 = never).",
                             _duration(), 0.0)
    max_total_bytes: int = setting(
        "Rotated request files are removed, oldest first, once together they exceed this size "
        "(0 = no cap): a flood cannot fill the disk. Removals are listed in the retention "
        "ledger, which `logs verify` checks.", _size, 8 * 2**30)
    warn_free_bytes: int = setting(
        "A `requests.space_low` event (and the sovereignd_request_log_disk_free_bytes gauge) "
        "warns while the log folder's file system has less free space than this, or while "
        "the request files exceed 80% of requests.max_total_bytes.", _size, 2 * 2**30)
    record_bodies: str = setting(
        "none: no content; hash: SHA-256 of request and response bodies; full: the bodies.",
        _choice("none", "hash", "full"), "none")
    seal_interval: float = setting(
        "The sealing key evolves (and the old one is erased) at least this often.",
        _duration(1.0), 900.0)
    require_seal: bool = setting(
        "Refuse to start without a sealing key (made by `sovereignd logs init-key`); when "
        "false the daemon writes unsealed records, which `logs verify` reports.", _bool, False)
    checkpoint_interval: float = setting(
        "Time between checkpoints (sequence, head hash) in the event log.",
        _duration(1.0), 300.0)
    sync: str = setting(
        "When records reach the disk. always: fsync before the answer ends (concurrent "
        "requests share one fsync); interval: fsync every sync_interval, so a power loss can "
        "lose the records of that last interval; never: when the OS writes back (Linux: up "
        "to ~30 s). A killed daemon loses no record in any mode.",
        _choice("always", "interval", "never"), "interval")
    sync_interval: float = setting(
        "How often records are fsynced with sync: interval.", _duration(0.001), 0.05)


@dataclass(frozen=True)
class MemorySection:
    """The memory preflight: will the model fit, asked before the server spends a minute loading."""

    check: bool = setting(
        "Estimate the server's memory needs (weights, KV cache of one full-length sequence) "
        "before each start and refuse (FATAL, with the numbers) when they cannot fit.",
        _bool, True)
    overhead: int | None = setting(
        "Memory the server needs beyond weights and KV cache (runtime, activations, compiled "
        "graphs, its helper processes). Unset: 2GiB on the CPU build, 1GiB on Metal and for "
        "vllm-mlx.",
        _opt_size, None)
    budget: int | None = setting(
        "With several models: the memory all started models may need together (each as the "
        "preflight estimates it); an on_demand model that does not fit stops idle on_demand "
        "models, least recently used first, or is refused. Unset: the memory of the machine "
        "(the NUMA node vLLM's CPU build reads, or the cgroup limit).", _opt_size, None)


@dataclass(frozen=True)
class ModelSection:
    """One model of several (under `models: NAME:`): when it runs, beside its own server,
    integrity and environment sections (every key of the top-level sections of those names)."""

    start: str = setting(
        "always: started with the daemon, and /readyz waits for it; on_demand: started by the "
        "first request that names it.", _choice("always", "on_demand"), "always", "always")
    idle_stop: float = setting(
        "on_demand: stop the server after this long without a request (0 = never).",
        _duration(), 0.0, "10m")
    start_wait: float = setting(
        "on_demand: how long the request that starts the model waits for READY; after that "
        "it is answered 503 with Retry-After.", _duration(), 120.0)


# The sections a model under `models:` has of its own (the rest stay the daemon's).
MODEL_SECTIONS: dict[str, type] = {"server": ServerSection, "integrity": IntegritySection,
                                   "environment": EnvironmentSection}
# A model's name as clients send it; ORG/NAME allowed (its folders use ORG--NAME).
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]*(/[A-Za-z0-9][A-Za-z0-9._:-]*)?")


@dataclass(frozen=True)
class ModelSpec:
    """One served model: its client-facing name, when it runs, and its own sections."""

    name: str
    start: str
    idle_stop: float
    start_wait: float
    server: ServerSection
    integrity: IntegritySection
    environment: EnvironmentSection

    @property
    def folder(self) -> str:
        """The model's folder name under the state folder (ORG/NAME -> ORG--NAME)."""
        return self.name.replace("/", "--")


SECTIONS: dict[str, type] = {
    "daemon": DaemonSection,
    "server": ServerSection,
    "gateway": GatewaySection,
    "health": HealthSection,
    "restart": RestartSection,
    "integrity": IntegritySection,
    "environment": EnvironmentSection,
    "logs": LogsSection,
    "requests": RequestsSection,
    "memory": MemorySection,
}

# Arguments the daemon sets itself; passing them in server.args would conflict or leak.
_RESERVED_ARGS = {
    "--api-key": "would put a key on the command line, visible to every local user in `ps`; "
                 "the daemon gives the server a fresh key in its environment at each start",
    "--host": "set server.host instead",
    "--port": "set server.port instead",
    "--model": "set server.model instead",
    "--served-model-name": "set server.served_model_name instead",
    "--uds": "set server.uds instead",
    "--shutdown-timeout": "set server.drain instead",
}
# Backends whose server can serve on a Unix socket (vllm --uds; vllm-mlx is TCP only).
UDS_BACKENDS = frozenset({"vllm"})
_RESERVED_ENV = {"VLLM_API_KEY": "the daemon sets a fresh internal key at each start"}


def _reserved_flag(flag: str) -> str | None:
    """The reserved flag `flag` stands for, in any spelling the server's parser accepts:
    vLLM's FlexibleArgumentParser reads `_` as `-` (`--api_key`), and argparse takes any
    unambiguous prefix (`--api-k`, `--hos`; `allow_abbrev`, CPython Lib/argparse.py). A
    prefix of a reserved flag is refused even where it would be ambiguous: the server would
    refuse it too. `sovereignd check` asks the server's own parser as well."""
    if not flag.startswith("--") or len(flag) < 4:
        return None
    spelled = "--" + flag[2:].replace("_", "-")
    for reserved in _RESERVED_ARGS:
        if reserved.startswith(spelled):
            return reserved
    return None


@dataclass(frozen=True)
class Config:
    """A loaded, fully validated configuration."""

    source: Path
    digest: str
    daemon: DaemonSection
    server: ServerSection
    gateway: GatewaySection
    health: HealthSection
    restart: RestartSection
    integrity: IntegritySection
    environment: EnvironmentSection
    logs: LogsSection
    requests: RequestsSection
    memory: MemorySection
    # Every served model by name: one for the single `server:` form, else `models:` in order.
    models: dict[str, ModelSpec] = field(default_factory=dict)

    @property
    def state_dir(self) -> Path:
        return self.daemon.state_dir or self.logs.dir

    @property
    def model_name(self) -> str:
        return self.server.served_model_name or modelfiles.served_name(self.server.model)

    @property
    def listen(self) -> tuple[str, int]:
        return split_host_port(self.gateway.listen)

    @property
    def control_socket(self) -> Path:
        return self.state_dir / "control.sock"

    @property
    def server_uds(self) -> Path | None:
        """The Unix socket the server serves on, or None when it serves on TCP."""
        s = self.server
        if s.uds is not None:
            return s.uds
        if s.transport == "tcp" or (s.transport == "auto" and s.backend not in UDS_BACKENDS):
            return None
        return self.state_dir / "srv" / "server.sock"


# ---------------------------------------------------------------------------------------------
# Loading


class _StrictLoader(yaml.SafeLoader):
    """A SafeLoader that refuses duplicate keys, which YAML would otherwise silently overwrite."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: dict[object, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first at line {seen[key] + 1})",
                key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _suggest(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _load_section(cls: type, raw: object, name: str, ctx: _Context,
                  problems: list[ConfigProblem]) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        problems.append(ConfigProblem(name, f"expected a mapping of settings, got {raw!r}"))
        return None
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    ok = True
    for key in raw:
        if key not in fields:
            # Reported, but the known keys are still built so cross-checks can run on them.
            problems.append(ConfigProblem(f"{name}.{key}", "unknown key"
                                          + _suggest(str(key), list(fields))))
    for fname, f in fields.items():
        if fname not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                problems.append(ConfigProblem(f"{name}.{fname}", "required key is missing"))
                ok = False
            elif isinstance(f.default, str) and f.metadata["parse"] in (_path, _opt_path):
                values[fname] = f.metadata["parse"](f.default, ctx)  # relative default path
            continue
        try:
            values[fname] = f.metadata["parse"](raw[fname], ctx)
        except ValueError as exc:
            problems.append(ConfigProblem(f"{name}.{fname}", str(exc)))
            ok = False
    return cls(**values) if ok else None


def _cross_checks(sec: dict[str, Any]) -> list[ConfigProblem]:
    """Checks across keys; a section that failed to parse is skipped, the others still run."""
    problems: list[ConfigProblem] = []
    s: ServerSection | None = sec["server"]
    g: GatewaySection | None = sec["gateway"]
    r: RestartSection | None = sec["restart"]
    if s is not None:
        if not s.allow_remote and not is_loopback(s.host):
            problems.append(ConfigProblem(
                "server.host", f"{s.host} is not a loopback address; the server must only be "
                "reachable through the gateway (set server.allow_remote: true to override)"))
        if s.stop_grace <= s.drain:
            problems.append(ConfigProblem(
                "server.stop_grace", f"must exceed server.drain ({format_duration(s.drain)}) so "
                "in-flight requests can finish before SIGKILL"))
        for i, arg in enumerate(s.args):
            flag = arg.split("=", 1)[0]
            reserved = _reserved_flag(flag)
            if reserved == flag:
                problems.append(ConfigProblem(f"server.args[{i}]",
                                              f"{flag} {_RESERVED_ARGS[flag]}"))
            elif reserved is not None:
                problems.append(ConfigProblem(
                    f"server.args[{i}]", f"the server's parser reads {flag} as {reserved}: "
                    f"{_RESERVED_ARGS[reserved]}"))
        for name, why in _RESERVED_ENV.items():
            if name in s.env:
                problems.append(ConfigProblem(f"server.env.{name}", why))
        if s.uds is not None and s.transport == "tcp":
            problems.append(ConfigProblem("server.uds", "server.transport is tcp; remove "
                                          "server.uds or set server.transport: unix"))
        if s.backend == "vllm-mlx":
            if s.uds is not None:
                problems.append(ConfigProblem("server.uds", "vllm-mlx cannot serve on a Unix "
                                              "socket; remove server.uds"))
            if s.transport == "unix":
                problems.append(ConfigProblem("server.transport", "vllm-mlx cannot serve on a "
                                              "Unix socket; use tcp or auto"))
            if Path(s.command[0]).name == "vllm":
                problems.append(ConfigProblem(
                    "server.command", "server.backend is vllm-mlx but the command is vllm's; "
                    "set it to [vllm-mlx, serve] (or the full path in its venv)"))
    if g is not None:
        host, port = split_host_port(g.listen)
        if not g.allow_remote and not is_loopback(host):
            problems.append(ConfigProblem(
                "gateway.listen", f"{host} is not a loopback address (set gateway.allow_remote: "
                "true to listen on the network; TLS is then required)"))
        if not is_loopback(host) and (g.tls_cert is None or g.tls_key is None):
            problems.append(ConfigProblem(
                "gateway.tls_cert", "a non-loopback listener requires gateway.tls_cert and "
                "gateway.tls_key"))
        if (g.tls_cert is None) != (g.tls_key is None):
            problems.append(ConfigProblem("gateway.tls_key",
                                          "set both tls_cert and tls_key, or neither"))
        if s is not None and s.uds is None and port == s.port:
            problems.append(ConfigProblem(
                "server.port", f"{port} is also the gateway's port (gateway.listen)"))
    problems.extend(_signature_checks(sec["integrity"]))
    if r is not None and r.backoff_initial > r.backoff_max:
        problems.append(ConfigProblem("restart.backoff_initial", "must not exceed backoff_max"))
    return problems


def _signature_checks(i: IntegritySection | None) -> list[ConfigProblem]:
    """integrity.signature needs exactly one way to verify it and replaces the manifest."""
    if i is None:
        return []
    if i.signature is None:
        if i.public_key is not None or i.certificate_chain:
            key = "integrity.public_key" if i.public_key is not None else \
                "integrity.certificate_chain"
            return [ConfigProblem(key, "set integrity.signature too (the model's signature "
                                  "file), or remove this key")]
        return []
    if i.manifest is not None:
        return [ConfigProblem("integrity.signature", "set integrity.signature or "
                              "integrity.manifest, not both (the signature's digests are the "
                              "approved weights)")]
    if (i.public_key is None) == (not i.certificate_chain):
        return [ConfigProblem("integrity.signature", "set exactly one of integrity.public_key "
                              "(a key signature) or integrity.certificate_chain (a certificate "
                              "signature)")]
    return []


def load(path: Path | str) -> Config:
    """Read and validate a configuration file; raise ConfigError listing every problem."""
    source = Path(path)
    try:
        data = source.read_bytes()
    except OSError as exc:
        raise ConfigError(str(source), [ConfigProblem(
            "", f"cannot read the configuration file: {exc.strerror or exc}")]) from exc
    return loads(data, source)


def loads(data: bytes, source: Path) -> Config:
    """Validate configuration bytes as if read from `source` (relative paths resolve there)."""
    where = str(source)
    try:
        raw = yaml.load(data.decode("utf-8"), Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except UnicodeDecodeError as exc:
        raise ConfigError(where, [ConfigProblem("", f"not UTF-8 text: {exc}")]) from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(where, [ConfigProblem("", f"YAML syntax error{at}: {problem}")]) from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(where, [ConfigProblem("", "the file must be a mapping of sections")])
    ctx = _Context(base_dir=source.resolve().parent)
    problems: list[ConfigProblem] = []
    for key in raw:
        if key not in SECTIONS and key != "models":
            problems.append(ConfigProblem(str(key), "unknown section"
                                          + _suggest(str(key), [*SECTIONS, "models"])))
    several = raw.get("models") is not None
    sections = {name: _load_section(cls, raw.get(name), name, ctx, problems)
                for name, cls in SECTIONS.items() if not (several and name in MODEL_SECTIONS)}
    if several:
        models = _load_models(raw, ctx, sections, problems)
        first = next(iter(models.values()), None)
        for name in MODEL_SECTIONS:  # the first model's, for code that reads one model
            sections[name] = getattr(first, name) if first is not None else None
    else:
        problems.extend(_cross_checks(sections))
        models = _single_model(sections)
    if problems or any(v is None for v in sections.values()):
        raise ConfigError(where, problems)
    return Config(source=source.resolve(), digest=hashlib.sha256(data).hexdigest(),
                  models=models, **sections)


def _single_model(sections: dict[str, Any]) -> dict[str, ModelSpec]:
    """The top-level `server:` form as one model, named by its served_model_name."""
    s = sections["server"]
    if s is None or sections["integrity"] is None or sections["environment"] is None:
        return {}
    name = s.served_model_name or modelfiles.served_name(s.model)
    return {name: ModelSpec(name, "always", 0.0, 0.0, s, sections["integrity"],
                            sections["environment"])}


def _load_models(raw: dict[str, Any], ctx: _Context, sections: dict[str, Any],
                 problems: list[ConfigProblem]) -> dict[str, ModelSpec]:
    """`models: NAME: {server, integrity, environment, start, idle_stop, start_wait}`;
    each model's problems are reported under models.NAME."""
    for name in MODEL_SECTIONS:
        if raw.get(name) is not None:
            problems.append(ConfigProblem(name, f"with models: set {name} per model "
                                          f"(models.NAME.{name}), not at the top level"))
    raw_models = raw["models"]
    if not isinstance(raw_models, dict) or not raw_models:
        problems.append(ConfigProblem("models", "expected a mapping of model names to their "
                                      f"settings, got {raw_models!r}"))
        return {}
    models: dict[str, ModelSpec] = {}
    own = {f.name for f in dataclasses.fields(ModelSection)}
    for name, m in raw_models.items():
        at = f"models.{name}"
        if not isinstance(name, str) or _MODEL_NAME.fullmatch(name) is None:
            problems.append(ConfigProblem(at, "a model name is letters, digits and . _ : - "
                                          "(ORG/NAME allowed), as clients send it in `model`"))
            continue
        if not isinstance(m, dict):
            problems.append(ConfigProblem(at, f"expected a mapping of settings, got {m!r}"))
            continue
        for key in m:
            if key not in own and key not in MODEL_SECTIONS:
                problems.append(ConfigProblem(f"{at}.{key}", "unknown key" + _suggest(
                    str(key), [*own, *MODEL_SECTIONS])))
        spec = _load_section(ModelSection, {k: v for k, v in m.items() if k in own}, at, ctx,
                             problems)
        parts = {sec: _load_section(cls, m.get(sec), f"{at}.{sec}", ctx, problems)
                 for sec, cls in MODEL_SECTIONS.items()}
        server = parts["server"]
        if server is not None and server.served_model_name not in (None, name):
            problems.append(ConfigProblem(f"{at}.server.served_model_name", f"the model's "
                                          f"name is its key under models ({name!r}); remove "
                                          "this key"))
        checked = {**sections, **parts}
        for p in _cross_checks(checked):
            key = p.path if not p.path.startswith(tuple(MODEL_SECTIONS)) else f"{at}.{p.path}"
            if all(key != q.path or p.message != q.message for q in problems):
                problems.append(ConfigProblem(key, p.message))
        if spec is None or any(v is None for v in parts.values()):
            continue
        models[name] = ModelSpec(name, spec.start, spec.idle_stop, spec.start_wait,
                                 dataclasses.replace(server, served_model_name=name),
                                 parts["integrity"], parts["environment"])
    ports: dict[int, str] = {}
    for name, spec in models.items():
        s = spec.server
        tcp = s.uds is None and (s.transport == "tcp" or (
            s.transport == "auto" and s.backend not in UDS_BACKENDS))
        if not tcp:
            continue
        if s.port in ports:
            problems.append(ConfigProblem(f"models.{name}.server.port", f"{s.port} is also the "
                                          f"port of model {ports[s.port]!r}; give each model "
                                          "its own"))
        ports.setdefault(s.port, name)
    return models


# ---------------------------------------------------------------------------------------------
# Describing


def _render_value(value: Any) -> str:
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, tuple):
        value = [str(v) for v in value]
    dumped = yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
    return dumped.removesuffix("\n...").removesuffix("...").strip()


def _format_default(f: dataclasses.Field[Any]) -> str:
    default = (f.default_factory() if f.default_factory is not dataclasses.MISSING
               else f.default)
    if default is dataclasses.MISSING:
        return "required"
    if default is None:
        return "unset"
    if f.metadata["parse"] is _size or (isinstance(default, int) and f.name.endswith("bytes")):
        return format_size(int(default))
    if isinstance(default, float):
        return format_duration(default)
    return _render_value(default)


def example_yaml() -> str:
    """Render the commented example configuration from the declarations."""
    out = ["# sovereignd configuration. Every key is shown; commented keys show their default.",
           "# Durations: seconds or 500ms, 5s, 10m, 1h, 1d. Sizes: bytes or 512KiB, 64MiB, 1GiB.",
           "# Relative paths are resolved against the folder of this file.", ""]
    for name, cls in SECTIONS.items():
        out.append(f"{name}:  # {(cls.__doc__ or '').strip()}")
        for f in dataclasses.fields(cls):
            doc = f.metadata["doc"]
            out.extend(f"  # {line}" for line in _wrap(doc, 94))
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            example = f.metadata["example"]
            if required:
                out.append(f"  {f.name}: {_render_value(example)}")
            elif example is not None:
                out.append(f"  {f.name}: {_render_value(example)}  # default: {_format_default(f)}")
            else:
                out.append(f"  # {f.name}: {_format_default(f)}")
        out.append("")
    out.append("# models:  # Several models behind the one gateway, instead of the top-level "
               "server, integrity")
    out.append("#          # and environment sections (which then are set per model).")
    out.append("#   NAME:  # the name clients send as `model` (the served model name)")
    out.append("#     server: {model: /path/to/model-dir, ...}  # every key of the server section")
    out.append("#     integrity: {manifest: /path/to/model-dir/CHECKSUMS.sha256}  # this model's")
    out.append("#     environment: {frozen: /path/to/requirements-frozen.txt}  # its server venv")
    for f in dataclasses.fields(ModelSection):
        out.extend(f"#     # {line}" for line in _wrap(f.metadata["doc"], 90))
        out.append(f"#     {f.name}: {_format_default(f)}")
    out.append("")
    return "\n".join(out)


def describe() -> list[tuple[str, str, str]]:
    """Every setting as (key path, default, description), for `sovereignd config describe`."""
    return [(f"{name}.{f.name}", _format_default(f), f.metadata["doc"])
            for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)] + [
        (f"models.NAME.{f.name}", _format_default(f), f.metadata["doc"])
        for f in dataclasses.fields(ModelSection)]


def _wrap(text: str, width: int) -> list[str]:
    words, lines, line = text.split(), [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    if line:
        lines.append(line)
    return lines
