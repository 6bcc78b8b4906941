"""The vLLM profile (`vllm serve`, also with the vllm-metal plugin)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from sovereignd.backends.base import OFFLINE_ENV, Backend, Route, _route
from sovereignd.config import Config
from sovereignd.process import serversocket
from sovereignd.process.failures import COMMON_PATTERNS, METAL_OOM, FailurePattern, pattern


class VllmBackend(Backend):
    """The vLLM profile (`vllm serve`, also with the vllm-metal plugin)."""

    name = "vllm"
    key_in_argv = False
    logs_content = False
    # vLLM's request logger (vllm/entrypoints/serve/utils/request_logger.py, vllm 0.32) with
    # --enable-log-requests / --enable-log-outputs: `Request ID JSON body: {...}` and
    # `Request ID details: prompt: '...'` at DEBUG, `Generated response ID: output: '...'` at
    # INFO, `Generated response ID details: output_token_ids: [...]` at DEBUG. Captured in
    # tests/data/server_messages/vllm-cpu-log-requests-outputs-debug.txt.
    content_line: re.Pattern[str] | None = re.compile(
        r"(Request \S+ (?:JSON body|details):|"
        r"Generated response \S+.*?(?:: output:| details: output_token_ids:))\s*")
    content_flags: tuple[str, ...] = ("--enable-log-requests", "--enable-log-outputs")
    routes: tuple[Route, ...] = (
        *Backend.routes,
        # OpenAI's Responses API; stored responses are bound to their client
        # (gateway/responses.py), so GET and cancel by id pass only for their owner.
        _route("/v1/responses", "POST"),
        _route("/v1/responses/", "GET", "POST", prefix=True),
        # Pooling models' scoring routes (vLLM 0.32 serves both spellings).
        _route("/v1/rerank", "POST"),
        _route("/v1/score", "POST"),
        _route("/rerank", "POST"),
        _route("/score", "POST"),
    )
    # /tokenize: vllm/entrypoints/serve/tokenize/api_router.py (vLLM 0.32); the gateway calls
    # it, clients cannot (it is not in `routes`).
    count_routes: tuple[tuple[str, str], ...] = (
        ("/v1/chat/completions", "/tokenize"), ("/v1/completions", "/tokenize"),
        ("/v1/messages", "/v1/messages/count_tokens"))
    memory_flags: tuple[str, ...] = ("--max-model-len", "--gpu-memory-utilization",
                                      "--kv-cache-memory-bytes")
    patterns: tuple[FailurePattern, ...] = (
        # Order matters: the first pattern that matches any of the last lines wins, and a
        # traceback often holds several (the root cause, then "Engine core initialization
        # failed"). Messages verbatim in tests/data/server_messages/.
        pattern("kv-cache-memory",
                r"(not enough Metal memory for KV cache|kv_budget=-|"
                r"To serve at least one request with the model'?s'? max seq len|"
                r"No available memory for the cache blocks|"
                r"larger than the available KV cache memory|"
                r"Insufficient memory for KV cache)",
                "not enough memory for the KV cache at this maximum model length",
                "lower --max-model-len in server.args, raise the memory fraction "
                "(VLLM_METAL_MEMORY_FRACTION or --gpu-memory-utilization, VLLM_CPU_KVCACHE_SPACE "
                "on CPU) if memory allows, or serve a smaller model"),
        pattern("memory-utilization",
                r"(Available memory on node \d+.*is less than desired CPU memory utilization|"
                r"Available memory on node \d+.*is less than requested memory for kv|"
                r"Free memory on device.*is less than desired GPU memory utilization)",
                "not enough free memory for the memory the server was told to reserve",
                "lower --gpu-memory-utilization (e.g. 0.3) or VLLM_CPU_KVCACHE_SPACE in "
                "server.args/server.env, free memory held by other processes, or serve a "
                "smaller model"),
        pattern("model-max-len",
                r"(User-specified max_model_len \(\d+\) is greater than the derived max_model_len|"
                r"max_model_len.*exceeds|Model's max seq len .* is larger than)",
                "--max-model-len is larger than the model supports",
                "lower --max-model-len in server.args to at most the model's context length"),
        pattern("unsupported-architecture",
                r"(Model architectures? \[.*\] (are|is) not supported|"
                r"Unsupported model architecture|Cannot find model module)",
                "the model's architecture is not supported by this server",
                "serve a model whose architecture this vLLM supports, or upgrade the server venv "
                "(and re-baseline it)"),
        pattern("unsupported-attention",
                r"Unsupported CPU attention configuration",
                "the server cannot run this model's attention shape on this hardware",
                "serve a model with a supported head size (e.g. 64 or 128)"),
        pattern("model-corrupt",
                r"(SafetensorError: Error while deserializing header|"
                r"HeaderTooLarge|incomplete metadata, file not fully covered|"
                r"invalid load key|Unable to load weights)",
                "a weight file is corrupt or truncated",
                "restore the model's files from the approved copy and verify them with "
                "`sovereignd manifest verify`"),
        pattern("model-missing",
                r"(Invalid repository ID or local directory specified|"
                r"Repo id must be in the form|"
                r"Cannot find an appropriate cached snapshot folder|"
                r"does not appear to have a file named config\.json)",
                "the model directory is missing, empty or not a model",
                "set server.model to a local model directory with config.json and weights, "
                "readable by the service account"),
        # Start-up checks of vLLM's own (vllm 0.32; captured output in tests/data/).
        pattern("unknown-tool-parser", r"invalid tool call parser: ",
                "server.args name a tool-call parser this vLLM does not have",
                "set --tool-call-parser to one of the names the server lists (see the "
                "evidence), or upgrade the server venv"),
        pattern("unknown-reasoning-parser", r"Reasoning parser '.*' not found",
                "server.args name a reasoning parser this vLLM does not have",
                "set --reasoning-parser to one of the names the server lists (see the "
                "evidence), or upgrade the server venv"),
        pattern("tool-choice-without-parser",
                r"--enable-auto-tool-choice requires --tool-call-parser",
                "--enable-auto-tool-choice needs --tool-call-parser",
                "add --tool-call-parser NAME to server.args (the parser for the model's "
                "tool-call format), or remove --enable-auto-tool-choice"),
        pattern("log-outputs-without-requests",
                r"--enable-log-outputs requires --enable-log-requests",
                "--enable-log-outputs needs --enable-log-requests",
                "remove --enable-log-outputs from server.args (it logs generated text)"),
        pattern("tokenizer-missing",
                r"(Couldn't instantiate the backend tokenizer|Can't load tokenizer for|"
                r"[Tt]okenizer class \S+ does not exist|"
                # tokenizers older than the file (e.g. huggingface/tokenizers issue 1529,
                # allenai/open-instruct issue 738): ModelWrapper, PyPreTokenizerTypeWrapper...
                r"data did not match any variant of untagged enum \w+)",
                "the model's tokenizer files are missing, unreadable or too new for the "
                "installed tokenizers library",
                "put tokenizer.json and tokenizer_config.json (from the model's release) in "
                "the model directory, or upgrade `tokenizers` in the server venv if the file "
                "is newer than it"),
        METAL_OOM,
        *COMMON_PATTERNS,
    )

    def argv(self, cfg: Config, key: str) -> list[str]:
        """The server's argument vector; the key is passed only where the server needs it.

        `vllm serve MODEL`: the model is positional (`--model` is deprecated for `vllm serve`
        since vLLM 0.20 and warned about at every start); the api_server module
        (`python -m vllm.entrypoints.openai.api_server`) keeps `--model`.
        """
        s = cfg.server
        model = [str(s.model)] if s.command[-1] == "serve" else ["--model", str(s.model)]
        argv = [*s.command, *model, "--served-model-name", cfg.model_name]
        uds = cfg.server_uds
        if uds is not None:
            argv += ["--uds", str(uds)]
        else:
            argv += ["--host", s.host, "--port", str(s.port)]
        if s.drain > 0:
            argv += ["--shutdown-timeout", str(round(s.drain))]
        return argv + list(s.args)

    def private_tmp(self, cfg: Config) -> Path | None:
        """The server's own temporary folder, beside its socket in the daemon's private 0700
        server folder (made and emptied before each start), or None for a backend without.

        vLLM puts there, instead of the shared /tmp: its ZMQ IPC sockets between the API
        server, EngineCore and Worker (`VLLM_RPC_BASE_PATH`, default `tempfile.gettempdir()`)
        and the torch.distributed rendezvous file `vllm_dist_<hex>` (`get_file_store_init_
        method`, under `tempfile.gettempdir()`; vllm/utils/network_utils.py, vllm 0.32), which
        it never removes. Both follow TMPDIR. None where the folder's path is too long for
        the IPC socket names (a state_dir over ~55 bytes): vLLM then keeps the system's."""
        tmp = cfg.state_dir / "srv" / "tmp"
        return tmp if serversocket.ipc_fits(tmp) else None

    def env(self, cfg: Config, key: str) -> dict[str, str]:
        """Environment additions: the internal key, the offline switches, the private
        temporary folder, gloo on loopback, then server.env (which may override the last two).

        `GLOO_SOCKET_IFNAME`: each gloo process group vLLM makes opens a TCP listener (13 in
        the Worker of vllm-cpu 0.32 with one CPU) on the address the host name resolves to,
        which can be a network address; pinned to the loopback interface here."""
        env = dict(OFFLINE_ENV)
        tmp = self.private_tmp(cfg)
        if tmp is not None:
            env["TMPDIR"] = env["VLLM_RPC_BASE_PATH"] = str(tmp)
        env["GLOO_SOCKET_IFNAME"] = "lo0" if sys.platform == "darwin" else "lo"
        env.update(cfg.server.env)
        env["VLLM_API_KEY"] = key
        return env
