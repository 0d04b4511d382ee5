"""End to end: the official openai SDK against a running FILA (uvicorn, PostgreSQL, Redis) and the
fake upstream, the cache seen from a client: miss, hit, refresh, bypass (by header and by
Cache-Control), a cached answer served as a stream, a streamed answer cached, what is never
cached; and every lookup on the ledger (``fila:LedgerEntry.Recorded``)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import msgspec
import openai
import pytest

from fila.config import load_settings
from tests.support import REDIS_URL, ServerHandle, running_fila

ADMIN = "admin-" + uuid.uuid4().hex
MODEL = "gpt-4.1-nano"
RECORDED = "fila:LedgerEntry.Recorded"


pytestmark = pytest.mark.usefixtures("redis_server")


@pytest.fixture
def server(pg_url, fake_upstream) -> Iterator[ServerHandle]:
    settings = load_settings({}, database_url=pg_url, upstream_base_url=fake_upstream.base_url,
                             openai_api_key="sk-upstream", admin_token=ADMIN, log_level="warning", redis_url=REDIS_URL)
    with running_fila(settings) as handle:
        yield handle


@pytest.fixture
def sdk(server) -> Iterator[tuple[openai.OpenAI, str]]:
    created = httpx.post(f"{server.base_url}/admin/api-keys", json={"name": "sdk-cache", "plan": "basic"},
                         headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10)
    assert created.status_code == 201, created.text
    with openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=created.json()["key"], max_retries=0,
                       timeout=10) as client:
        yield client, created.json()["id"]


def entries(server: ServerHandle) -> list[dict[str, Any]]:
    notes = server.container.store.recorder.select_notifications(
        start=0, limit=10_000, topics=[RECORDED], inclusive_of_start=False)
    return [dict(msgspec.json.decode(n.state), id=str(n.originator_id)) for n in notes]


def ask(client: openai.OpenAI, content: str, headers: dict[str, str] | None = None, **extra: Any):
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": content}], extra_headers=headers or {}, **extra)
    return raw.parse(), raw.headers


def test_miss_hit_refresh_and_bypass_each_on_the_ledger(server, sdk, fake_upstream):
    client, key_id = sdk
    prompt = f"cache me {uuid.uuid4()}"
    first, h1 = ask(client, prompt)
    second, h2 = ask(client, prompt)
    third, h3 = ask(client, prompt, {"x-fila-cache": "refresh"})
    fourth, h4 = ask(client, prompt, {"x-fila-cache": "bypass"})
    fifth, h5 = ask(client, prompt)
    assert [h["x-fila-cache"] for h in (h1, h2, h3, h4, h5)] == ["miss", "hit", "refresh", "bypass", "hit"]
    assert h2["x-fila-cache-layer"] == "memory" and "x-fila-cache-layer" not in h1
    assert second.id == first.id and second.choices[0].message.content == first.choices[0].message.content
    assert third.id != first.id and fifth.id == third.id          # the refresh overwrote the entry
    assert fourth.id not in (first.id, third.id)                  # the bypass was not stored
    assert fake_upstream.stats["chat_completions"] == 3

    miss, hit, refresh, bypass, hit2 = entries(server)
    assert (miss["cache"], miss["cache_layer"], miss["cache_source"], miss["tokens_saved"]) == ("miss", None, None, 0)
    assert (hit["cache"], hit["cache_layer"], hit["cache_source"]) == ("hit", "memory", miss["id"])
    assert hit["outcome"] == "ok" and hit["upstream"] is None
    # a hit is recorded with the original usage, so billing (cache_hit_billing) can price it
    assert (hit["prompt_tokens"], hit["completion_tokens"], hit["total_tokens"]) == (
        first.usage.prompt_tokens, first.usage.completion_tokens, first.usage.total_tokens)
    assert hit["tokens_saved"] == first.usage.total_tokens
    assert hit["plan_id"] == miss["plan_id"] is not None
    assert (refresh["cache"], refresh["upstream"]) == ("refresh", f"primary/{MODEL}")
    assert bypass["cache"] == "bypass" and hit2["cache_source"] == refresh["id"]
    assert {e["api_key_id"] for e in (miss, hit, refresh, bypass, hit2)} == {key_id}


def test_cache_control_no_cache_refreshes_and_no_store_bypasses(server, sdk, fake_upstream):
    client, _ = sdk
    prompt = f"cache control {uuid.uuid4()}"
    first, _ = ask(client, prompt)
    fresh, h = ask(client, prompt, {"Cache-Control": "no-cache"})
    assert h["x-fila-cache"] == "refresh" and fresh.id != first.id
    _, h = ask(client, prompt, {"Cache-Control": "no-store"})
    assert h["x-fila-cache"] == "bypass"
    again, h = ask(client, prompt)
    assert h["x-fila-cache"] == "hit" and again.id == fresh.id
    assert [e["cache"] for e in entries(server)] == ["miss", "refresh", "bypass", "hit"]
    with pytest.raises(openai.BadRequestError):
        ask(client, prompt, {"x-fila-cache": "sometimes"})


def test_a_cached_answer_is_served_to_a_stream_client(server, sdk, fake_upstream):
    client, _ = sdk
    prompt = f"stream me {uuid.uuid4()}"
    plain, _ = ask(client, prompt)
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": prompt}], stream=True,
        stream_options={"include_usage": True})
    assert raw.headers["x-fila-cache"] == "hit"
    chunks = list(raw.parse())
    assert {c.id for c in chunks} == {plain.id}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == plain.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.total_tokens == plain.usage.total_tokens
    assert fake_upstream.stats["chat_completions"] == 1
    last = entries(server)[-1]
    assert (last["cache"], last["stream"], last["total_tokens"]) == ("hit", True, plain.usage.total_tokens)


def test_a_streamed_answer_fills_the_cache_for_plain_clients(server, sdk, fake_upstream):
    client, _ = sdk
    prompt = f"streamed first {uuid.uuid4()}"
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                            stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    plain, headers = ask(client, prompt)
    assert headers["x-fila-cache"] == "hit" and plain.choices[0].message.content == streamed
    assert plain.usage.total_tokens > 0
    miss, hit = entries(server)
    assert (miss["cache"], miss["stream"]) == ("miss", True) and hit["cache_source"] == miss["id"]
    assert fake_upstream.stats["chat_completions"] == 1


def test_tool_requests_and_length_limited_answers(server, sdk, fake_upstream):
    client, _ = sdk
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    prompt = f"tools {uuid.uuid4()}"
    for _ in range(2):
        _, headers = ask(client, prompt, tools=tools)
        assert headers["x-fila-cache"] == "bypass" and "x-fila-cache-key" not in headers
    assert fake_upstream.stats["chat_completions"] == 2
    short, _ = ask(client, prompt, max_tokens=2)              # finish_reason "length" is cached
    assert short.choices[0].finish_reason == "length"
    again, headers = ask(client, prompt, max_tokens=2)
    assert headers["x-fila-cache"] == "hit" and again.id == short.id
    assert [e["cache"] for e in entries(server)] == ["bypass", "bypass", "miss", "hit"]


def test_upstream_errors_are_not_cached(server, sdk, fake_upstream):
    client, _ = sdk
    prompt = f"errors {uuid.uuid4()}"
    fake_upstream.configure(status=500)
    with pytest.raises(openai.APIStatusError):
        ask(client, prompt)
    fake_upstream.configure(status=None)
    _, headers = ask(client, prompt)
    assert headers["x-fila-cache"] == "miss"
    failed, answered = entries(server)
    assert (failed["outcome"], failed["cache"]) == ("upstream_error", "miss")
    assert answered["cache"] == "miss"
