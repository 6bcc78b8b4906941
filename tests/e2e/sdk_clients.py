"""The official openai and anthropic Python SDKs against the daemon on a real server: as the
people who call the model use it (chat, streams, Messages with x-api-key), and the limits they
meet (a scoped key refused, a quota spent, a prompt over the cap), each refusal final for the
SDK (`x-should-retry: false`: one attempt, no retries).

Checks, not tests: test_vllm_cpu.py and test_vllm_mlx.py run them on the daemons they already
share (a real start costs a minute on two cores), before their kill scenarios."""

from __future__ import annotations

from typing import Any

import anthropic
import openai
import pytest

from sovereignd.logs.records import iter_records
from tests.e2e.conftest import setup_cli
from tests.harness import Daemon, http
from tests.helpers import wait_for

MESSAGES = [{"role": "user", "content": "hello there"}]


def records_of(d: Daemon, client: str, n: int) -> list[dict[str, Any]]:
    return wait_for(lambda: (rs := [r for r in iter_records(d.logs) if r["client"] == client])
                    and len(rs) >= n and rs, 10, what=f"{n} records of {client}")


def openai_chat_and_stream(d: Daemon) -> None:
    """Chat and a stream through the openai SDK with the daemon's client key, recorded with
    tokens, time to first token, the client's X-Request-ID and the SDK's retry count."""
    client = openai.OpenAI(base_url=d.url + "/v1", api_key=d.client_key)
    reply = client.chat.completions.create(model="tiny", messages=MESSAGES,
                                           max_tokens=4, extra_headers={"X-Request-ID": "t-1"})
    assert reply.choices[0].message.role == "assistant" and reply.usage is not None
    chunks = list(client.chat.completions.create(model="tiny", messages=MESSAGES,
                                                 max_tokens=4, stream=True))
    assert chunks and all(c.usage is None for c in chunks)  # the usage chunk was not asked for
    client.close()  # its pooled connections, not left to the garbage collector
    def both() -> list[dict[str, Any]] | None:
        recs = [r for r in iter_records(d.logs) if r.get("client_request_id") == "t-1"]
        recs += [r for r in iter_records(d.logs) if recs and r["seq"] > recs[0]["seq"]
                 and r["stream"] and r["client"] == recs[0]["client"]]
        return recs if len(recs) >= 2 else None

    recs = wait_for(both, 10, what="the chat's and the stream's records")
    assert recs[0]["client_request_id"] == "t-1" and recs[0]["retries"] == 0
    assert recs[0]["prompt_tokens"] == reply.usage.prompt_tokens
    assert recs[1]["stream"] and recs[1]["completion_tokens"] and recs[1]["ttft_ms"] is not None


def anthropic_messages(d: Daemon, name: str) -> None:
    """The Messages API (vLLM 0.32 and vllm-mlx serve it): the SDK's x-api-key is the client
    key, its usage (and, streamed, its event stream's usage and first token) lands in the
    records; a prompt near the cap is judged by the server's count; a bad key gets
    Anthropic's error shape (the SDK's AuthenticationError)."""
    key = setup_cli(d, "keys", "add", name)
    client = anthropic.Anthropic(base_url=d.url, api_key=key)
    wait_for(lambda: _accepted(client), 10, what="the new key (keys file reload)")
    message = client.messages.create(model="tiny", max_tokens=5, messages=MESSAGES)
    assert message.role == "assistant" and message.usage.input_tokens > 0
    with client.messages.stream(model="tiny", max_tokens=5, messages=MESSAGES) as stream:
        final = stream.get_final_message()
    counted = client.messages.count_tokens(model="tiny", messages=MESSAGES)
    assert counted.input_tokens > 0
    recs = [r for r in records_of(d, name, 4) if r["status"] == 200]
    plain, streamed = recs[-3], recs[-2]
    assert plain["path"] == "/v1/messages" and not plain["stream"]
    assert plain["prompt_tokens"] == message.usage.input_tokens
    assert plain["completion_tokens"] == message.usage.output_tokens
    assert streamed["stream"] and streamed["completion_tokens"] == final.usage.output_tokens
    assert streamed["prompt_tokens"] == final.usage.input_tokens
    assert streamed["ttft_ms"] is not None
    assert recs[-1]["path"] == "/v1/messages/count_tokens"
    # Near the cap (512: --max-model-len, or the model's 512 positions for vllm-mlx), a
    # token-dense prompt the estimate would pass (31 tokens) is counted by the server's own
    # count_tokens, and refused in Anthropic's shape with the figure the server gives.
    dense = [{"role": "user", "content": "z" * 120}]
    exact = client.messages.count_tokens(model="tiny", messages=dense).input_tokens
    assert exact > 100
    backend = d.cfg["server"].get("backend", "vllm")
    with pytest.raises(anthropic.BadRequestError,
                       match=rf"\({exact} tokens, counted by the model server's tokenizer "
                       rf"\({backend} /v1/messages/count_tokens\)\) plus max_tokens "
                       rf"\({513 - exact}\)"):
        client.messages.create(model="tiny", max_tokens=513 - exact, messages=dense)
    # Past the context (the estimate, ~150 tokens, would not refuse it): vLLM's count_tokens
    # refuses to count ("at least 513 input tokens"), which is a count too, refused in the
    # gateway's shape (was: vLLM's own 400 after the fallback to the estimate).
    past = [{"role": "user", "content": "z" * 600}]
    how = ", at least" if backend == "vllm" else r"\)"
    with pytest.raises(anthropic.BadRequestError,
                       match=rf"tokens, counted by the model server's tokenizer "
                       rf"\({backend} /v1/messages/count_tokens\){how}"):
        client.messages.create(model="tiny", max_tokens=5, messages=past)
    client.close()
    stranger = anthropic.Anthropic(base_url=d.url, api_key="sk-sov-" + "x" * 43, max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        stranger.messages.create(model="tiny", max_tokens=5, messages=MESSAGES)
    stranger.close()


def _accepted(client: anthropic.Anthropic) -> bool:
    try:
        client.messages.count_tokens(model="tiny", messages=MESSAGES)
    except anthropic.AuthenticationError:
        return False
    return True


def final_refusals(d: Daemon) -> None:
    """A scoped key refused another model (403) and shown none in /v1/models, a quota spent
    (429, and shown so by the quota gauges in /metrics), prompts over the model's 512 tokens
    (400, before the server generates: one far beyond by its estimate, one that the estimate
    would pass refused by the server's own count, with the figure the server's usage gives):
    each tried once by an SDK that would retry twice."""
    scoped = setup_cli(d, "keys", "add", "scoped", "--models", "other-model")
    limited = setup_cli(d, "keys", "add", "limited", "--requests-per-day", "1")
    # max_retries=2 (the SDK's default): a refusal with x-should-retry: false is tried once.
    scoped_client = openai.OpenAI(base_url=d.url + "/v1", api_key=scoped, max_retries=2)
    wait_for(lambda: _listed(scoped_client), 10, what="the new keys (keys file reload)")
    assert [m.id for m in scoped_client.models.list()] == []  # "tiny" is not in its scope
    with pytest.raises(openai.PermissionDeniedError):
        scoped_client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2)
    limited_client = openai.OpenAI(base_url=d.url + "/v1", api_key=limited, max_retries=2)
    limited_client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2)
    with pytest.raises(openai.RateLimitError, match="requests_per_day"):
        limited_client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2)
    code, metrics, _ = http("GET", d.url + "/metrics")
    assert code == 200
    for gauge in ('sovereignd_client_quota_limit{client="limited",quota="requests_per_day"} 1.0',
                  'sovereignd_client_quota_used{client="limited",quota="requests_per_day"} 1.0'):
        assert gauge in metrics.decode(), gauge
    client = openai.OpenAI(base_url=d.url + "/v1", api_key=d.client_key, max_retries=2)
    # The served model's context is 512 tokens (--max-model-len): ~1,400 tokens of prompt by
    # the estimate, over twice the limit: refused uncounted.
    with pytest.raises(openai.BadRequestError,
                       match=r"about 1376 tokens, estimated .* exceeds this model's limit of 512"):
        client.chat.completions.create(model="tiny", max_tokens=2,
                                       messages=[{"role": "user", "content": "word " * 1100}])
    # Token-dense text (the tiny tokenizer spends a token per byte of it): the estimate says
    # 31 tokens, the server counts what its own usage reports.
    dense = [{"role": "user", "content": "z" * 120}]
    usage = client.chat.completions.create(model="tiny", max_tokens=1, messages=dense).usage
    assert usage is not None and usage.prompt_tokens > 120
    exact = usage.prompt_tokens
    with pytest.raises(openai.BadRequestError,
                       match=rf"\({exact} tokens, counted by the model server's tokenizer "
                       rf"\(vllm /tokenize\)\) plus max_tokens \({513 - exact}\) exceeds"):
        client.chat.completions.create(model="tiny", max_tokens=513 - exact, messages=dense)
    # One token less fits exactly, and the server serves it.
    assert client.chat.completions.create(model="tiny", max_tokens=512 - exact,
                                          messages=dense).choices
    scoped_recs = records_of(d, "scoped", 1)
    assert [r["error"] for r in scoped_recs if r["status"] == 403] == ["model_not_allowed"]
    quota = [r for r in records_of(d, "limited", 2) if r["status"] == 429]
    assert len(quota) == 1 and quota[0]["error"] == "quota_requests_per_day"
    capped = [r for r in iter_records(d.logs) if r["error"] == "prompt_too_long"
              and r["path"] == "/v1/chat/completions"]
    assert len(capped) == 2
    assert all(r["start_seq"] is None for r in capped)  # the server never began either
    for each in (scoped_client, limited_client, client):
        each.close()


def _listed(client: openai.OpenAI) -> bool:
    try:
        client.models.list()
    except openai.AuthenticationError:
        return False
    return True


def responses_bound_to_their_client(d: Daemon) -> None:
    """The Responses API (vLLM 0.32, with its store on): a stored response is read back by
    the client that made it; another client cannot read it, cancel it or continue from it."""
    owner = openai.OpenAI(base_url=d.url + "/v1", api_key=d.client_key, max_retries=0)
    other_key = setup_cli(d, "keys", "add", "stranger")
    other = openai.OpenAI(base_url=d.url + "/v1", api_key=other_key, max_retries=0)
    wait_for(lambda: _listed(other), 10, what="the new key (keys file reload)")
    created = owner.responses.create(model="tiny", input="hello there", max_output_tokens=4,
                                     store=True)
    assert owner.responses.retrieve(created.id).id == created.id
    with pytest.raises(openai.NotFoundError):
        other.responses.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        other.responses.cancel(created.id)
    with pytest.raises(openai.NotFoundError):
        other.responses.create(model="tiny", input="and then?", max_output_tokens=4,
                               previous_response_id=created.id)
    streamed = list(owner.responses.create(model="tiny", input="hi", max_output_tokens=4,
                                           stream=True, store=True))
    sid = next(e.response.id for e in streamed if e.type == "response.created")
    with pytest.raises(openai.NotFoundError):
        other.responses.retrieve(sid)
    recs = [r for r in iter_records(d.logs) if r["path"] == "/v1/responses" and
            r["status"] == 200]
    assert recs and all(r["prompt_tokens"] and r["completion_tokens"] is not None for r in recs)
    refused = [r for r in iter_records(d.logs) if r["error"] == "response_not_found"]
    assert len(refused) == 4 and all(r["client"] == "stranger" for r in refused)
    owner.close()
    other.close()


def stored_response(d: Daemon) -> str:
    """The id of a response stored for the daemon's client, read back once."""
    owner = openai.OpenAI(base_url=d.url + "/v1", api_key=d.client_key, max_retries=0)
    created = owner.responses.create(model="tiny", input="hello there", max_output_tokens=4,
                                     store=True)
    assert owner.responses.retrieve(created.id).id == created.id
    owner.close()
    return created.id


def response_gone(d: Daemon, rid: str) -> None:
    """After a restart of the server, its owner's lookup of `rid` is 404 (vLLM's store lives
    in the server's memory)."""
    owner = openai.OpenAI(base_url=d.url + "/v1", api_key=d.client_key, max_retries=0)
    with pytest.raises(openai.NotFoundError, match=rid):
        owner.responses.retrieve(rid)
    owner.close()
