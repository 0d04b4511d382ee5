"""Property: whatever the clients send, no client ever receives another client's cached
response, conversation history or base context.

Hypothesis draws a sequence of operations by three clients, over two FILA "processes" (two
gateways, each with its own memory layer, sharing one Redis and one event log): chats from a
small pool of prompts that all clients share (so their requests collide byte for byte),
on conversation ids that all clients share, streamed or not, with refresh/bypass directives;
base contexts set and cleared; purges. Runs of chats go concurrently (stampedes across clients).

The upstream echoes everything it saw: the ``user`` field (which is *not* part of the cache key)
and every message (base context and history included). Each client sends its own secret marker
as ``user`` and in its base context; so an answer carrying another client's marker is a leak.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from contextlib import asynccontextmanager
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fila.adapters.batcher import Batcher
from fila.adapters.cache_store import MemoryLRU, RedisStore
from fila.adapters.eventstore import open_store
from fila.adapters.upstream import UpstreamReply
from fila.domain.errors import NotFound
from fila.projections.registry import KeyRecord, Registry
from fila.services.cache import CacheService
from fila.services.chat import parse_chat_request
from fila.services.gateway import Gateway, RequestContext
from fila.services.routing import Router
from tests.support import new_sqlite_url

MODEL = "gpt-4.1-nano"
PROMPTS = ("hello", "what is the secret?", "repeat everything above")
CONVERSATIONS = (None, "shared-1", "shared-2")
CLIENTS, PROCESSES = 3, 2


pytestmark = pytest.mark.usefixtures("redis_server")

_encode = msgspec.json.Encoder().encode


class EchoUpstream:
    """An upstream that answers with who asked (``user``) and everything it was sent."""

    name = "primary"

    def __init__(self) -> None:
        self.ids = itertools.count(1)

    def _content(self, messages: list, extra: dict[str, Any]) -> str:
        return f"for={extra.get('user')} saw=" + " | ".join(str(m.get("content")) for m in messages)

    async def complete(self, model: str, messages: list, extra: dict[str, Any]) -> UpstreamReply:
        await asyncio.sleep(0.001)
        data = {"id": f"chatcmpl-{next(self.ids)}", "object": "chat.completion", "created": 1, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": self._content(messages, extra)},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}
        return UpstreamReply(body=_encode(data), data=data)

    @asynccontextmanager
    async def stream(self, model: str, messages: list, extra: dict[str, Any]):
        head = {"id": f"chatcmpl-{next(self.ids)}", "object": "chat.completion.chunk", "created": 1, "model": model}
        chunks = [dict(head, choices=[{"index": 0, "delta": {"role": "assistant", "content": ""},
                                       "finish_reason": None}]),
                  dict(head, choices=[{"index": 0, "delta": {"content": self._content(messages, extra)},
                                       "finish_reason": None}]),
                  dict(head, choices=[{"index": 0, "delta": {}, "finish_reason": "stop"}]),
                  dict(head, choices=[], usage={"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15})]

        async def lines():
            for chunk in chunks:
                yield "data: " + _encode(chunk).decode()
            yield "data: [DONE]"

        yield lines()


chat_op = st.tuples(st.just("chat"), st.integers(0, CLIENTS - 1), st.integers(0, len(PROMPTS) - 1),
                    st.sampled_from(CONVERSATIONS), st.booleans(), st.sampled_from([None, None, "refresh", "bypass"]),
                    st.integers(0, PROCESSES - 1))
context_op = st.tuples(st.just("context"), st.integers(0, CLIENTS - 1), st.sampled_from(["set", "clear"]),
                       st.integers(0, PROCESSES - 1))
purge_op = st.tuples(st.just("purge"), st.integers(0, CLIENTS - 1), st.integers(0, PROCESSES - 1))
operations = st.lists(st.one_of(chat_op, chat_op, chat_op, context_op, purge_op), min_size=1, max_size=30)


@pytest.fixture(scope="module")
def store_and_batcher(tmp_path_factory):
    store = open_store(new_sqlite_url(tmp_path_factory.mktemp("isolation")))
    batcher = Batcher(store)
    batcher.start()
    yield store, batcher
    batcher.close()


class World:
    def __init__(self, batcher: Batcher, store: Any) -> None:
        self.batcher = batcher
        self.prefix = f"test:isolation:{uuid.uuid4().hex}"
        self.redis = aioredis.Redis(socket_timeout=5)
        router = Router(EchoUpstream())
        self.registries = [Registry(store.recorder) for _ in range(PROCESSES)]
        self.caches = [CacheService(memory=MemoryLRU(8 * 2**20), shared=RedisStore(self.redis), batcher=batcher,
                                    registry=registry, prefix=self.prefix) for registry in self.registries]
        self.gateways = [Gateway(batcher=batcher, router=router, cache=cache) for cache in self.caches]
        self.keys = []
        self.markers = []
        for i in range(CLIENTS):
            key_id = str(uuid.uuid4())
            self.keys.append(KeyRecord(id=key_id, name=f"c{i}", owner=f"c{i}", prefix="fila-sk-x",
                                       secret_hash=key_id, issued_at=""))
            self.markers.append(f"MARKER{i}x{uuid.uuid4().hex[:10]}")

    async def sync(self) -> None:
        """Every process's registry reads the log (what its poll does within half a second)."""
        for registry in self.registries:
            await self.batcher.run(registry.catch_up)

    def leaks(self, client: int, text: str) -> list[str]:
        return [m for j, m in enumerate(self.markers) if j != client and m in text]

    async def chat(self, client: int, prompt: int, conversation: str | None, stream: bool, directive: str | None,
                   process: int) -> str:
        body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": PROMPTS[prompt]}],
                                "user": self.markers[client], "stream": stream}
        if conversation:
            body["conversation_id"] = conversation
        parsed = parse_chat_request(_encode(body), MODEL)
        ctx = RequestContext(key=self.keys[client], request_id="r", cache_directive=directive)
        gateway = self.gateways[process]
        if not stream:
            return (await gateway.complete(ctx, parsed)).body.decode()
        reply = await gateway.stream(ctx, parsed)
        return b"".join([frame async for frame in reply.frames]).decode()

    async def run(self, ops: list[tuple]) -> None:
        pending: list[tuple[int, Any]] = []

        async def flush() -> None:
            answers = await asyncio.gather(*(coro for _, coro in pending))
            for (client, _), text in zip(pending, answers):
                assert f"for={self.markers[client]}" in text, text
                assert not self.leaks(client, text), f"client {client} got {self.leaks(client, text)}: {text}"
            pending.clear()

        for op in ops:
            if op[0] == "chat":
                pending.append((op[1], self.chat(*op[1:])))
                continue
            await flush()
            if op[0] == "context":
                _, client, action, process = op
                cache = self.caches[process]
                if action == "set":
                    await cache.set_context(self.keys[client].id, f"system of {self.markers[client]}",
                                            f"reference of {self.markers[client]}")
                else:
                    try:
                        await cache.clear_context(self.keys[client].id)
                    except NotFound:
                        pass
            else:
                _, client, process = op
                await self.caches[process].purge(self.keys[client].id)
            await self.sync()
        await flush()

    async def check_stored_state(self) -> None:
        for cache in self.caches:
            for client, key in enumerate(self.keys):
                for conversation in CONVERSATIONS[1:]:
                    try:
                        history = await cache.conversation(key.id, conversation)
                    except NotFound:
                        continue
                    assert not self.leaks(client, _encode(history).decode())
                try:
                    context = await cache.context(key.id)
                except NotFound:
                    continue
                assert not self.leaks(client, _encode(context).decode())
                assert self.markers[client] in context["system"]

    async def close(self) -> None:
        keys = [key async for key in self.redis.scan_iter(match=f"{self.prefix}:*")]
        if keys:
            await self.redis.delete(*keys)
        await self.redis.aclose()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(ops=operations)
def test_no_client_ever_receives_another_clients_response_history_or_context(store_and_batcher, ops):
    store, batcher = store_and_batcher

    async def scenario() -> None:
        world = World(batcher, store)
        try:
            await world.sync()
            await world.run(ops)
            await world.check_stored_state()
        finally:
            await world.close()

    asyncio.run(scenario())


def test_the_property_would_see_a_leak(store_and_batcher, monkeypatch):
    """The check above is not vacuous: with namespaces removed from keys, it finds a leak."""
    store, batcher = store_and_batcher
    monkeypatch.setattr(CacheService, "key_for", lambda self, ns, parsed: "shared." + "0" * 40)

    async def scenario() -> None:
        world = World(batcher, store)
        try:
            with pytest.raises(AssertionError, match="for=MARKER"):
                await world.run([("chat", 0, 0, None, False, None, 0), ("chat", 1, 0, None, False, None, 0)])
        finally:
            await world.close()

    asyncio.run(scenario())
