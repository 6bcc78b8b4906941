"""A small real HTTP server standing in for `vllm serve` (and `vllm-mlx serve`) in tests.

It speaks the parts of the OpenAI-compatible API the daemon and gateway use, checks the key
from VLLM_API_KEY (or --api-key), and misbehaves on demand so faults the real server cannot
produce at will can be tested: fail at start with a given vLLM message, crash after N
requests, hang, answer /health but fail completions, spawn grandchildren that ignore SIGTERM.

Behaviour comes from a JSON control file named by FAKE_VLLM_CONTROL, read at each start:
    {"default": {...}, "starts": [{...}, {...}]}
`starts[i]` applies to the i-th start (counted in `<control>.count`), else `default`. Keys:
    fail_start: str        print this to stderr and exit with exit_code (default 1)
    exit_code: int
    startup_delay: float   seconds before listening
    crash_after: int       after this many API requests, die (crash_signal or exit_code)
    crash_signal: str      e.g. "SIGKILL", "SIGSEGV"
    crash_message: str     print this to stderr before crashing (a real server's last words)
    hang_after: int        after this many API requests, stop answering anything
    fail_completions: bool /health is 200 but completions answer 500
    fail_completions_after: int  the same, after this many API requests
    fail_chat: str         chat completions answer 400 with this message (no chat template)
    grandchildren: int     spawn this many child processes (same process group)
    grandchildren_ignore_term: bool
    setsid_grandchild: bool  one grandchild leaves the group (setsid), as a rogue might
    ignore_term: bool      ignore SIGTERM (the daemon must escalate to SIGKILL)
    shm: bool              each grandchild maps a /dev/shm segment of its own, as vLLM's
                           engine processes do (left behind if they are killed)
    log_content: bool      print each user message preview, as vllm-mlx does
    stream_delay: float    seconds between streamed chunks
    tokens: int            completion tokens to produce (default 4)
    stream_cut_after: int  close the connection after this many streamed chunks, mid-body
    echo_headers: bool     completions answer with the request headers the server received
    response_headers: dict extra header fields on (non-streamed) completion answers
    completion_delay: float  seconds before a client's non-streamed completion is answered
                           (the canary, max_tokens 1, is answered at once)
    raw_answer: str        a client's completion (not the canary) is answered with exactly
                           these bytes (latin-1), which no HTTP library would frame so; the
                           connection then stays open for raw_hold seconds (default 30)
    tokenize: str          how `POST /tokenize` and `/v1/messages/count_tokens` answer:
                           "bytes" (the default: one token per UTF-8 byte of the messages'
                           content (and system) or the prompt, plus 5 per message, as a chat
                           template adds; vLLM's shapes {"count", "max_model_len", "tokens"}
                           and {"input_tokens"}), "fail" (500), "hang" (never), "garbage"
                           (200, not JSON), "absent" (404, as vllm-mlx's /tokenize);
                           `<control>.tokenize-mode`, read at each request, overrides it
Each start appends {"pid", "pgid", "argv", "has_key", "start"} to `<control>.starts`.

Faults on demand, for benchmarks (straight to the server's port, never via the gateway):
`POST /fake/crash` exits at once (writing the time to `<control>.crash`), `POST /fake/hang`
stops answering from then on (writing `<control>.hang`), `POST /fake/stall` stops generating
(streams in flight and new completions wait forever) while /health and /metrics keep answering,
as a SIGSTOPped vLLM EngineCore does (writing `<control>.stall`).
`GET /metrics` serves vLLM's progress counters (`vllm:generation_tokens_total`,
`vllm:prompt_tokens_total`, `vllm:num_requests_running`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from aiohttp import web

GRANDCHILD = (
    "import mmap, os, signal, sys, time\n"
    "if sys.argv[1] == '1': signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "if sys.argv[2] == '1': os.setsid()\n"
    "if sys.argv[3] == '1':\n"
    "    fd = os.open(f'/dev/shm/sovereignd-fake-{os.getpid()}', os.O_CREAT | os.O_RDWR, 0o600)\n"
    "    os.ftruncate(fd, 4096)\n"
    "    segment = mmap.mmap(fd, 4096)\n"
    "time.sleep(3600)\n"
)


def load_behaviour() -> tuple[dict[str, Any], int, Path | None]:
    control = os.environ.get("FAKE_VLLM_CONTROL")
    if not control:
        return {}, 0, None
    path = Path(control)
    spec = json.loads(path.read_text()) if path.exists() else {}
    counter = path.with_name(path.name + ".count")
    n = int(counter.read_text()) if counter.exists() else 0
    counter.write_text(str(n + 1))
    starts = spec.get("starts", [])
    behaviour = starts[n] if n < len(starts) else spec.get("default", {})
    return behaviour, n, path


class Fake:
    def __init__(self, args: argparse.Namespace, behaviour: dict[str, Any]) -> None:
        self.args = args
        self.b = behaviour
        self.key = args.api_key or os.environ.get("VLLM_API_KEY")
        self.requests = 0
        self.hung = False
        self.stalled = asyncio.Event()
        self.generated = 0
        self.prompted = 0
        self.running = 0
        self.in_handlers = 0  # requests whose handler has not returned yet
        self.name = args.served_model_name or args.model
        self.stored: dict[str, dict[str, Any]] = {}  # the Responses API's store, in memory

    @web.middleware
    async def track(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.in_handlers += 1
        try:
            response: web.StreamResponse = await handler(request)
            return response
        finally:
            self.in_handlers -= 1

    async def drain(self, _app: web.Application) -> None:
        """On SIGTERM, before aiohttp closes connections: let the requests in progress end
        within --shutdown-timeout, as vLLM does. (aiohttp alone can cut a connection whose
        handler is just ending when its own shutdown begins.)"""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.args.shutdown_timeout or 0.1)
        while self.in_handlers and loop.time() < deadline:  # noqa: ASYNC110 - a stand-in
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.02)  # the last answers' bytes leave

    def authorised(self, request: web.Request) -> bool:
        if not self.key:
            return True
        return request.headers.get("Authorization") == f"Bearer {self.key}"

    def count(self) -> None:
        self.requests += 1
        crash_after = self.b.get("crash_after")
        if crash_after is not None and self.requests > crash_after:
            print("fake_vllm: crashing as told", file=sys.stderr, flush=True)
            if self.b.get("crash_message"):
                print(self.b["crash_message"], file=sys.stderr, flush=True)
            sig = self.b.get("crash_signal")
            if sig:
                os.kill(os.getpid(), getattr(signal, sig))
            os._exit(int(self.b.get("exit_code", 1)))
        hang_after = self.b.get("hang_after")
        if hang_after is not None and self.requests > hang_after:
            self.hung = True

    async def maybe_hang(self) -> None:
        if self.hung:
            await asyncio.Event().wait()

    async def maybe_stall(self) -> None:
        if self.stalled.is_set():
            await asyncio.Event().wait()  # generation stopped; /health still answers

    async def metrics(self, _request: web.Request) -> web.Response:
        await self.maybe_hang()
        return web.Response(text=(
            "# TYPE vllm:num_requests_running gauge\n"
            f'vllm:num_requests_running{{model_name="{self.name}"}} {self.running}\n'
            "# TYPE vllm:generation_tokens counter\n"
            f'vllm:generation_tokens_total{{model_name="{self.name}"}} {self.generated}\n'
            "# TYPE vllm:prompt_tokens counter\n"
            f'vllm:prompt_tokens_total{{model_name="{self.name}"}} {self.prompted}\n'))

    async def health(self, _request: web.Request) -> web.Response:
        await self.maybe_hang()
        return web.Response(status=200)

    async def models(self, request: web.Request) -> web.Response:
        if not self.authorised(request):
            return self.unauthorised()
        self.count()
        await self.maybe_hang()
        return web.json_response({"object": "list", "data": [
            {"id": self.name, "object": "model", "created": int(time.time()),
             "owned_by": "fake", "root": self.args.model}]})

    def unauthorised(self) -> web.Response:
        return web.json_response({"error": "Unauthorized"}, status=401)

    async def completion(self, request: web.Request) -> web.StreamResponse:
        if not self.authorised(request):
            return self.unauthorised()
        if self.args.runner == "pooling" or self.args.convert == "embed":
            # As vLLM 0.32 with --runner pooling --convert embed: no generation routes.
            return web.json_response({"detail": "Not Found"}, status=404)
        self.count()
        await self.maybe_hang()
        body = await request.json()
        fail_after = self.b.get("fail_completions_after")
        if self.b.get("fail_completions") or (fail_after is not None
                                               and self.requests > fail_after):
            return web.json_response({"error": {"message": "engine dead", "type": "server"}},
                                     status=500)
        raw = self.b.get("raw_answer")
        if raw is not None and body.get("max_tokens") != 1:
            return await self.raw_answer(request, raw)
        chat = request.path.endswith("/chat/completions")
        if chat and self.b.get("fail_chat"):
            return web.json_response({"error": {"message": self.b["fail_chat"], "code": 400,
                                                "type": "BadRequestError"}}, status=400)
        if chat and self.b.get("log_content"):
            last = body.get("messages", [{}])[-1].get("content", "")
            print(f"[REQUEST] last user message preview: {last}", flush=True)
        n = int(body.get("max_tokens") or self.b.get("tokens", 4))
        n = min(n, int(self.b.get("tokens", 4)))
        prompt_tokens = 7
        await self.maybe_stall()
        self.prompted += prompt_tokens
        self.running += 1
        try:
            if body.get("stream"):
                return await self.stream(request, body, chat, n, prompt_tokens)
            delay = float(self.b.get("completion_delay", 0))
            if delay and body.get("max_tokens") != 1:
                await asyncio.sleep(delay)
        finally:
            self.running -= 1
        self.generated += n
        text = " tok" * n
        extra = ({"request_headers": dict(request.headers)} if self.b.get("echo_headers")
                 else {})
        choice: dict[str, Any] = {"index": 0, "finish_reason": "length"}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return web.json_response({
            "id": "cmpl-fake", "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": self.name, "choices": [choice],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": n,
                      "total_tokens": prompt_tokens + n}, **extra},
            headers=self.b.get("response_headers"))

    async def raw_answer(self, request: web.Request, raw: str) -> web.Response:
        """A misframed answer, written past aiohttp; the connection is held open, as a server
        that believes it answered would, then cut."""
        transport = request.transport
        assert transport is not None
        transport.write(raw.encode("latin-1"))
        await asyncio.sleep(float(self.b.get("raw_hold", 30)))
        transport.abort()
        return web.Response()  # (not sent: the connection is gone)

    async def stream(self, request: web.Request, body: dict[str, Any], chat: bool, n: int,
                     prompt_tokens: int) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
        await resp.prepare(request)
        delay = float(self.b.get("stream_delay", 0))
        try:
            await self._stream_chunks(request, resp, body, chat=chat, n=n,
                                      prompt_tokens=prompt_tokens, delay=delay)
        except (ConnectionError, RuntimeError, asyncio.CancelledError):
            # The client (the gateway) went away: a real server aborts the generation.
            control = os.environ.get("FAKE_VLLM_CONTROL")
            if control:
                with Path(f"{control}.aborted").open("a") as f:  # noqa: ASYNC230 - tiny
                    f.write(f"{time.time()}\n")
            raise
        return resp

    async def _stream_chunks(self, request: web.Request, resp: web.StreamResponse,
                             body: dict[str, Any], *,
                             chat: bool, n: int, prompt_tokens: int, delay: float) -> None:
        cut = self.b.get("stream_cut_after")
        for i in range(n):
            if cut is not None and i >= cut:
                # A server that dies mid-stream: no terminating chunk, no [DONE].
                if request.transport is not None:
                    request.transport.abort()
                return
            word = f"{self.b.get('token_text', ' tok')}{i}"  # token_text: e.g. an ESC sequence
            delta: dict[str, Any] = ({"delta": {"content": word}} if chat else {"text": word})
            chunk = {"id": "cmpl-fake", "object": "chat.completion.chunk" if chat
                     else "text_completion", "model": self.name,
                     "choices": [{"index": 0, **delta, "finish_reason": None}]}
            await self.maybe_stall()
            self.generated += 1
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
            if delay:
                await asyncio.sleep(delay)
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = {"id": "cmpl-fake", "object": "chat.completion.chunk", "model": self.name,
                     "choices": [], "usage": {"prompt_tokens": prompt_tokens,
                                              "completion_tokens": n,
                                              "total_tokens": prompt_tokens + n}}
            await resp.write(f"data: {json.dumps(usage)}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()

    async def embeddings(self, request: web.Request) -> web.Response:
        if not self.authorised(request):
            return self.unauthorised()
        self.count()
        if self.b.get("fail_embeddings"):
            return web.json_response({"error": {"message": "fails as told"}}, status=500)
        return web.json_response({"object": "list", "model": self.name, "data": [
            {"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}],
            "usage": {"prompt_tokens": 3, "total_tokens": 3}})

    async def fault(self, request: web.Request) -> web.Response:
        control = os.environ.get("FAKE_VLLM_CONTROL")
        kind = request.match_info["kind"]
        if control:
            Path(f"{control}.{kind}").write_text(repr(time.time()))  # noqa: ASYNC240 - tiny
        if kind == "crash":
            os._exit(3)
        if kind == "stall":
            self.stalled.set()
            return web.Response(text="stalled from now on")
        self.hung = True
        return web.Response(text="hanging from now on")

    async def responses(self, request: web.Request) -> web.Response:
        """vLLM 0.32's Responses API with its in-memory store: POST creates (not streamed),
        GET by id reads back; an unknown id is 404 in vLLM's words."""
        if not self.authorised(request):
            return self.unauthorised()
        rid = request.match_info.get("rid")
        if rid is None:
            self.count()
            rid = f"resp_{os.urandom(8).hex()}"
            self.stored[rid] = {"id": rid, "object": "response", "status": "completed",
                                "model": self.name, "output": [],
                                "usage": {"input_tokens": 3, "output_tokens": 2,
                                          "total_tokens": 5}}
        if rid not in self.stored:
            return web.json_response({"error": {"message": f"Response with id '{rid}' not "
                                                 "found.", "type": "invalid_request_error",
                                                 "param": None, "code": 404}}, status=404)
        return web.json_response(self.stored[rid])

    async def tokenize(self, request: web.Request) -> web.Response:
        """vLLM 0.32's `/tokenize` (unguarded by the key, as vLLM's), with faults on demand."""
        mode = self.b.get("tokenize", "bytes")
        body = await request.json()
        if control := os.environ.get("FAKE_VLLM_CONTROL"):
            override = Path(f"{control}.tokenize-mode")
            if override.exists():  # noqa: ASYNC240 - tiny
                mode = override.read_text().strip()  # noqa: ASYNC240 - tiny
            with Path(f"{control}.tokenize").open("a") as f:  # noqa: ASYNC230 - tiny
                f.write(json.dumps(sorted(body)) + "\n")  # which fields came, not the text
        if mode == "fail":
            return web.json_response({"error": {"message": "tokenizer broke"}}, status=500)
        if mode == "hang":
            await asyncio.sleep(3600)
        if mode == "garbage":
            return web.Response(text="<html>not json</html>", content_type="text/html")
        if mode == "absent":
            return web.json_response({"detail": "Not Found"}, status=404)
        if mode == "over-context" and request.path.endswith("/count_tokens"):
            # vLLM 0.32's count_tokens for a prompt past the context (renderers/params.py).
            return web.json_response({"type": "error", "error": {
                "type": "BadRequestError", "message": "This model's maximum context length "
                "is 100 tokens. However, your prompt contains at least 101 input tokens, "
                "which exceeds this limit even without any output tokens. Please reduce the "
                "length of the input prompt."}}, status=400)
        if isinstance(body.get("messages"), list):
            n = sum(len(str(m.get("content", "")).encode()) + 5 for m in body["messages"])
            n += len(str(body.get("system", "")).encode())
        else:
            n = len(str(body.get("prompt", "")).encode())
        if request.path.endswith("/count_tokens"):  # Anthropic's count, as vLLM serves it
            return web.json_response({"input_tokens": n})
        return web.json_response({"count": n, "max_model_len": 512, "tokens": [1] * n})

    async def unguarded(self, request: web.Request) -> web.Response:
        # Like vLLM's /invocations, /tokenize, /pause: answers without any key.
        return web.json_response({"unguarded": request.path, "choices": [{"text": "leak"}]})


def spawn_grandchildren(b: dict[str, Any]) -> list[subprocess.Popen[bytes]]:
    kids = []
    for i in range(int(b.get("grandchildren", 0))):
        ignore = "1" if b.get("grandchildren_ignore_term") else "0"
        rogue = "1" if b.get("setsid_grandchild") and i == 0 else "0"
        shm = "1" if b.get("shm") else "0"
        kids.append(subprocess.Popen([sys.executable, "-c", GRANDCHILD, ignore, rogue, shm]))
    return kids


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model_pos", nargs="?")  # vllm-mlx takes the model positionally
    p.add_argument("--model")
    p.add_argument("--served-model-name")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--uds")
    p.add_argument("--shutdown-timeout", type=float, default=0)
    p.add_argument("--api-key")
    p.add_argument("--runner")
    p.add_argument("--convert")
    args, _unknown = p.parse_known_args()
    args.model = args.model or args.model_pos
    behaviour, start, control = load_behaviour()
    if control is not None:
        with control.with_name(control.name + ".starts").open("a") as f:
            f.write(json.dumps({"pid": os.getpid(), "pgid": os.getpgid(0), "argv": sys.argv,
                                "has_key": bool(args.api_key or os.environ.get("VLLM_API_KEY")),
                                "offline": os.environ.get("HF_HUB_OFFLINE"),
                                "start": start}) + "\n")
    print(f"fake_vllm: start {start} pid {os.getpid()} model {args.model}", flush=True)
    if behaviour.get("fail_start"):
        print(behaviour["fail_start"], file=sys.stderr, flush=True)
        sys.exit(int(behaviour.get("exit_code", 1)))
    if not args.model or not Path(args.model).is_dir():
        print(f"OSError: {args.model} does not appear to have a file named config.json",
              file=sys.stderr, flush=True)
        sys.exit(1)
    if behaviour.get("ignore_term"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    kids = spawn_grandchildren(behaviour)  # left running: the daemon must end the whole group
    time.sleep(float(behaviour.get("startup_delay", 0)))
    fake = Fake(args, behaviour)
    app = web.Application(middlewares=[fake.track])
    app.on_shutdown.append(fake.drain)
    app.router.add_get("/health", fake.health)
    app.router.add_get("/v1/models", fake.models)
    app.router.add_post("/v1/completions", fake.completion)
    app.router.add_post("/v1/chat/completions", fake.completion)
    app.router.add_post("/v1/embeddings", fake.embeddings)
    app.router.add_get("/metrics", fake.metrics)
    app.router.add_post("/fake/{kind:crash|hang|stall}", fake.fault)
    app.router.add_post("/tokenize", fake.tokenize)
    app.router.add_post("/v1/messages/count_tokens", fake.tokenize)
    app.router.add_post("/v1/responses", fake.responses)
    app.router.add_get("/v1/responses/{rid}", fake.responses)
    for path in ("/invocations", "/pause", "/collective_rpc", "/docs",
                 "/v1/mcp/execute"):
        app.router.add_route("*", path, fake.unguarded)
    # aiohttp would install its own SIGTERM handler over SIG_IGN.
    opts: dict[str, Any] = {"print": None, "access_log": None,
                            "shutdown_timeout": args.shutdown_timeout or 0.1,
                            "handle_signals": not behaviour.get("ignore_term")}
    try:
        if args.uds:
            web.run_app(app, path=args.uds, **opts)
        else:
            web.run_app(app, host=args.host, port=args.port, **opts)
    except OSError as exc:
        print(f"ERROR: [Errno {exc.errno}] error while attempting to bind on address "
              f"({args.host!r}, {args.port}): address already in use", file=sys.stderr,
              flush=True)
        sys.exit(1)
    print(f"fake_vllm: stopped ({len(kids)} grandchildren left)", flush=True)


if __name__ == "__main__":
    main()
