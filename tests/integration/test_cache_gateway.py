"""The cache through a running FILA (uvicorn, PostgreSQL, Redis): stampedes in one process and
across two, TTL expiry on a fake clock, management actions recorded as events and seen by
every process, base contexts and conversations over HTTP, and isolation between clients."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
import redis

from fila.config import load_settings
from tests.support import REDIS_URL, ServerHandle, running_fila, wait_for
from tests.support import ledger_events as log

ADMIN = "admin-" + uuid.uuid4().hex
MODEL = "gpt-4.1-nano"
RECORDED = "fila:LedgerEntry.Recorded"


pytestmark = pytest.mark.usefixtures("redis_server")


@contextmanager
def serve(database_url: str, upstream: Any, **overrides: Any) -> Iterator[ServerHandle]:
    settings = load_settings({}, database_url=database_url, upstream_base_url=upstream.base_url,
                             openai_api_key="sk-upstream", admin_token=ADMIN, log_level="warning",
                             redis_url=overrides.pop("redis_url", REDIS_URL), **overrides)
    with running_fila(settings) as handle:
        yield handle


def admin(server: ServerHandle, method: str, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.request(method, f"{server.base_url}{path}", headers={"Authorization": f"Bearer {ADMIN}"},
                         timeout=10, **kwargs)


def new_key(server: ServerHandle) -> tuple[str, str]:
    answer = admin(server, "POST", "/admin/api-keys", json={"name": "cache", "plan": "enterprise"})
    assert answer.status_code == 201, answer.text
    return answer.json()["id"], answer.json()["key"]


def chat(server: ServerHandle, secret: str, content: str, **extra: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {secret}", **extra.pop("headers", {})}
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], **extra}
    return httpx.post(f"{server.base_url}/v1/chat/completions", json=body, headers=headers, timeout=15)


def client(server: ServerHandle, secret: str, method: str, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.request(method, f"{server.base_url}{path}", headers={"Authorization": f"Bearer {secret}"},
                         timeout=10, **kwargs)






def knows_key(server: ServerHandle, key_id: str) -> None:
    wait_for(lambda: key_id in server.container.registry.keys, what="the second process to see the key")


@pytest.fixture
def server(pg_url, fake_upstream) -> Iterator[ServerHandle]:
    with serve(pg_url, fake_upstream) as handle:
        yield handle


# -- stampedes ---------------------------------------------------------------------------------


async def fire(urls_and_secrets: list[tuple[str, str]], content: str) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with httpx.AsyncClient(timeout=30, limits=limits) as http:
        body = {"model": MODEL, "messages": [{"role": "user", "content": content}]}
        return await asyncio.gather(*(http.post(f"{url}/v1/chat/completions", json=body,
                                                headers={"Authorization": f"Bearer {secret}"})
                                      for url, secret in urls_and_secrets))


def test_fifty_concurrent_identical_misses_make_one_upstream_call(server, fake_upstream):
    key_id, secret = new_key(server)
    fake_upstream.configure(latency_ms=300)
    answers = asyncio.run(fire([(server.base_url, secret)] * 50, f"stampede {uuid.uuid4()}"))
    assert [a.status_code for a in answers] == [200] * 50
    assert fake_upstream.stats["chat_completions"] == 1
    assert len({a.content for a in answers}) == 1                 # everyone got the leader's answer
    entries = log(server, RECORDED)
    [leader] = [e for e in entries if e["cache"] == "miss"]
    followers = [e for e in entries if e["cache"] == "hit"]
    assert len(followers) == 49 and len(entries) == 50
    assert {(f["cache_layer"], f["cache_source"], f["tokens_saved"]) for f in followers} == {
        ("inflight", leader["id"], leader["total_tokens"])}
    assert {a.headers["x-fila-cache"] for a in answers} == {"miss", "hit"}
    assert {a.headers.get("x-fila-cache-layer") for a in answers if a.headers["x-fila-cache"] == "hit"} == {"inflight"}


def test_identical_misses_in_two_processes_make_one_upstream_call(pg_url, fake_upstream):
    fake_upstream.configure(latency_ms=400)
    with serve(pg_url, fake_upstream) as one, serve(pg_url, fake_upstream) as two:
        key_id, secret = new_key(one)
        knows_key(two, key_id)
        answers = asyncio.run(fire([(one.base_url, secret), (two.base_url, secret)] * 10, f"two {uuid.uuid4()}"))
        assert [a.status_code for a in answers] == [200] * 20
        assert fake_upstream.stats["chat_completions"] == 1
        assert len({a.content for a in answers}) == 1
        entries = log(one, RECORDED)
        [leader] = [e for e in entries if e["cache"] == "miss"]
        assert sorted((e["cache"], e["cache_layer"], e["cache_source"]) for e in entries if e["id"] != leader["id"]) \
            == [("hit", "inflight", leader["id"])] * 19


# -- TTLs on a fake clock ------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = time.time()

    def __call__(self) -> float:
        return self.t


def test_a_response_expires_after_the_plans_ttl_in_memory_and_in_redis(server, fake_upstream):
    clock = Clock()
    cache = server.container.cache
    cache.clock = cache.memory.clock = clock
    _, secret = new_key(server)
    prompt = f"ttl {uuid.uuid4()}"
    first = chat(server, secret, prompt)
    assert first.headers["x-fila-cache"] == "miss"
    clock.t += 59
    assert chat(server, secret, prompt).headers["x-fila-cache-layer"] == "memory"
    clock.t += 3599 - 59                                # memory copies live 60 s at most; Redis the hour
    hit = chat(server, secret, prompt)
    assert (hit.headers["x-fila-cache"], hit.headers["x-fila-cache-layer"]) == ("hit", "redis")
    assert hit.json()["id"] == first.json()["id"]
    clock.t += 1                                        # the plan's response TTL (1 h) is over
    again = chat(server, secret, prompt)
    assert again.headers["x-fila-cache"] == "miss" and again.json()["id"] != first.json()["id"]
    assert fake_upstream.stats["chat_completions"] == 2


# -- management actions ----------------------------------------------------------------------------


def test_a_purge_is_an_event_drops_the_clients_entries_everywhere_and_spares_other_clients(pg_url, fake_upstream):
    with serve(pg_url, fake_upstream) as one, serve(pg_url, fake_upstream) as two:
        key_a, secret_a = new_key(one)
        key_b, secret_b = new_key(one)
        knows_key(two, key_a)
        knows_key(two, key_b)
        prompt = f"purge {uuid.uuid4()}"
        for server in (one, two):
            for secret in (secret_a, secret_b):
                chat(server, secret, prompt)
        assert chat(two, secret_a, prompt).headers["x-fila-cache-layer"] == "memory"
        rkeys = redis.Redis.from_url(REDIS_URL)
        assert rkeys.keys(f"fila:cache:r:{key_a}:*")
        answer = admin(one, "POST", "/admin/cache/purge", json={"api_key_id": key_a})
        assert answer.status_code == 200, answer.text
        assert answer.json()["redis_entries_deleted"] == 1 and not rkeys.keys(f"fila:cache:r:{key_a}:*")
        [purged] = log(one, "fila:CacheAction.Purged")
        assert (purged["api_key_id"], purged["by"]) == (key_a, "admin")
        calls = fake_upstream.stats["chat_completions"]
        assert chat(one, secret_a, prompt).headers["x-fila-cache"] == "miss"
        wait_for(lambda: two.container.cache.book.generations.get(key_a) == 1, what="the other process to see it")
        after = chat(two, secret_a, prompt)       # its memory copy was dropped: a hit of the new entry
        assert (after.headers["x-fila-cache"], after.headers["x-fila-cache-layer"]) == ("hit", "redis")
        assert fake_upstream.stats["chat_completions"] == calls + 1
        assert chat(one, secret_b, prompt).headers["x-fila-cache"] == "hit"     # the other client kept its own
        assert admin(one, "POST", "/admin/cache/purge", json={"api_key_id": str(uuid.uuid4())}).status_code == 404
        assert admin(one, "POST", "/admin/cache/purge", json={}).status_code == 400


def test_deleting_one_entry_is_an_event_and_the_next_request_misses(server, fake_upstream):
    key_id, secret = new_key(server)
    prompt = f"delete {uuid.uuid4()}"
    cache_key = chat(server, secret, prompt).headers["x-fila-cache-key"]
    other_key = chat(server, secret, prompt + " other").headers["x-fila-cache-key"]
    assert cache_key.startswith(f"{key_id}.")
    answer = admin(server, "DELETE", f"/admin/cache/entries/{cache_key}")
    assert answer.status_code == 200 and answer.json() == {"cache_key": cache_key, "deleted": True}
    [deleted] = log(server, "fila:CacheAction.EntryDeleted")
    assert (deleted["cache_key"], deleted["api_key_id"]) == (cache_key, key_id)
    assert chat(server, secret, prompt).headers["x-fila-cache"] == "miss"
    assert chat(server, secret, prompt + " other").headers["x-fila-cache"] == "hit"
    assert admin(server, "DELETE", f"/admin/cache/entries/{other_key[:-1]}").status_code == 400
    assert client(server, secret, "DELETE", f"/admin/cache/entries/{cache_key}").status_code == 401


def test_cache_stats_count_hits_misses_and_tokens_saved_per_client(server):
    key_a, secret_a = new_key(server)
    key_b, secret_b = new_key(server)
    first = chat(server, secret_a, "stats one")
    for _ in range(3):
        chat(server, secret_a, "stats one")
    chat(server, secret_b, "stats two")
    chat(server, secret_b, "stats two", headers={"x-fila-cache": "bypass"})
    stats = admin(server, "GET", "/admin/cache/stats").json()
    tokens = first.json()["usage"]["total_tokens"]
    by_key = {c["api_key_id"]: c for c in stats["clients"]}
    assert (by_key[key_a]["hits"], by_key[key_a]["misses"], by_key[key_a]["tokens_saved"]) == (3, 1, 3 * tokens)
    assert by_key[key_a]["hit_rate"] == 0.75
    assert (by_key[key_b]["hits"], by_key[key_b]["misses"], by_key[key_b]["bypasses"]) == (0, 1, 1)
    assert (stats["overall"]["hits"], stats["overall"]["misses"]) == (3, 2)
    only_b = admin(server, "GET", f"/admin/cache/stats?api_key_id={key_b}").json()
    assert [c["api_key_id"] for c in only_b["clients"]] == [key_b]


# -- base context ------------------------------------------------------------------------------------


def test_a_base_context_is_set_read_replaced_and_deleted_as_events_and_prepended(pg_url, fake_upstream):
    with serve(pg_url, fake_upstream) as server:
        key_a, secret_a = new_key(server)
        _, secret_b = new_key(server)
        assert client(server, secret_a, "GET", "/v1/fila/context").status_code == 404
        bare = chat(server, secret_a, "context prompt").json()["usage"]["prompt_tokens"]
        put = client(server, secret_a, "PUT", "/v1/fila/context", json={"system": "S" * 400})
        assert put.status_code == 200 and put.json()["system"] == "S" * 400 and put.json()["reference"] is None
        with_context = chat(server, secret_a, "context prompt")
        assert with_context.headers["x-fila-cache"] == "miss"     # a different request upstream: its own key
        assert with_context.json()["usage"]["prompt_tokens"] == bare + 4 + 100
        assert chat(server, secret_b, "context prompt").json()["usage"]["prompt_tokens"] == bare   # not B's
        client(server, secret_a, "PUT", "/v1/fila/context", json={"system": "S" * 400, "reference": "R" * 40})
        assert chat(server, secret_a, "context prompt").json()["usage"]["prompt_tokens"] == bare + 104 + 14
        bad = client(server, secret_a, "PUT", "/v1/fila/context", json={"system": 5})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "system"
        assert client(server, secret_a, "PUT", "/v1/fila/context", json={}).status_code == 400
        assert [e["id"] for e in log(server, "fila:BaseContext.Defined")] == [e["id"] for e in log(
            server, "fila:BaseContext.Replaced")]
    with serve(pg_url, fake_upstream) as restarted:    # nothing of it lived in Redis only: rebuilt from the log
        shown = client(restarted, secret_a, "GET", "/v1/fila/context").json()
        assert (shown["system"], shown["reference"]) == ("S" * 400, "R" * 40)
        assert client(restarted, secret_a, "DELETE", "/v1/fila/context").status_code == 200
        assert client(restarted, secret_a, "GET", "/v1/fila/context").status_code == 404
        assert client(restarted, secret_a, "DELETE", "/v1/fila/context").status_code == 404
        assert chat(restarted, secret_a, "context prompt").json()["usage"]["prompt_tokens"] == bare
        [cleared] = log(restarted, "fila:BaseContext.Cleared")
        assert client(restarted, secret_a, "PUT", "/v1/fila/context", json={"reference": "again"}).status_code == 200
        assert len(log(restarted, "fila:BaseContext.Replaced")) == 2 and cleared


# -- conversations -----------------------------------------------------------------------------------


def test_a_conversation_is_kept_per_client_shown_and_deleted_as_an_event(server, fake_upstream):
    key_a, secret_a = new_key(server)
    _, secret_b = new_key(server)
    conversation = f"conv-{uuid.uuid4().hex[:8]}"
    one = chat(server, secret_a, "first turn", conversation_id=conversation)
    two = chat(server, secret_a, "second turn", conversation_id=conversation)
    assert one.status_code == two.status_code == 200
    assert two.json()["usage"]["prompt_tokens"] > one.json()["usage"]["prompt_tokens"] + 4
    shown = client(server, secret_a, "GET", f"/v1/fila/conversations/{conversation}").json()
    assert [m["content"] for m in shown["messages"]] == [
        "first turn", one.json()["choices"][0]["message"]["content"],
        "second turn", two.json()["choices"][0]["message"]["content"]]
    assert client(server, secret_b, "GET", f"/v1/fila/conversations/{conversation}").status_code == 404
    b_one = chat(server, secret_b, "first turn", conversation_id=conversation)
    assert b_one.json()["usage"]["prompt_tokens"] == one.json()["usage"]["prompt_tokens"]   # B's starts empty
    bad = chat(server, secret_a, "x", conversation_id="has spaces")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "conversation_id"
    deleted = client(server, secret_a, "DELETE", f"/v1/fila/conversations/{conversation}")
    assert deleted.status_code == 200 and deleted.json()["deleted"] is True
    [event] = log(server, "fila:CacheAction.ConversationDeleted")
    assert (event["api_key_id"], event["conversation_id"]) == (key_a, conversation)
    assert client(server, secret_a, "GET", f"/v1/fila/conversations/{conversation}").status_code == 404
    assert len(client(server, secret_b, "GET", f"/v1/fila/conversations/{conversation}").json()["messages"]) == 2
    fresh = chat(server, secret_a, "first turn", conversation_id=conversation)
    assert fresh.json()["usage"]["prompt_tokens"] == one.json()["usage"]["prompt_tokens"]
    assert fresh.headers["x-fila-cache"] == "hit"         # same request as the first turn: the cached answer


def test_a_conversation_turn_served_as_a_stream_is_appended_too(server):
    _, secret = new_key(server)
    conversation = f"conv-{uuid.uuid4().hex[:8]}"
    with httpx.stream("POST", f"{server.base_url}/v1/chat/completions", timeout=10,
                      headers={"Authorization": f"Bearer {secret}"},
                      json={"model": MODEL, "messages": [{"role": "user", "content": "streamed turn"}],
                            "stream": True, "conversation_id": conversation}) as answer:
        assert answer.status_code == 200
        body = answer.read()
    assert b"[DONE]" in body
    shown = client(server, secret, "GET", f"/v1/fila/conversations/{conversation}").json()["messages"]
    assert [m["role"] for m in shown] == ["user", "assistant"] and shown[1]["content"]


def test_an_unreadable_redis_entry_is_a_miss_not_an_error(server, fake_upstream):
    key_id, secret = new_key(server)
    prompt = f"corrupt {uuid.uuid4()}"
    cache_key = chat(server, secret, prompt).headers["x-fila-cache-key"]
    rkey = "fila:cache:r:" + cache_key.replace(".", ":", 1)
    redis.Redis.from_url(REDIS_URL).set(rkey, b"\x93not what FILA stores", ex=60)
    server.container.cache.memory.clear()
    again = chat(server, secret, prompt)
    assert again.status_code == 200 and again.headers["x-fila-cache"] == "miss"
    assert fake_upstream.stats["chat_completions"] == 2
