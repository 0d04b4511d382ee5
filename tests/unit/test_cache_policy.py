"""The cache policy without a server: keys, what is cacheable, TTLs on a fake clock, single-flight,
conversation history and its truncation rule, base-context rules, hit billing. Memory layer only."""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

import pytest

from fila.adapters.cache_store import MemoryLRU
from fila.domain.context import (MAX_HISTORY_CHARS, MAX_HISTORY_MESSAGES, context_messages, truncate_history,
                                 validate_context, validate_conversation_id)
from fila.domain.errors import InvalidRequest
from fila.projections.registry import KeyRecord
from fila.services.cache import (BYPASS, HIT, INFLIGHT, MEMORY, MISS, REFRESH, CacheService, cacheable_answer,
                                 parse_cache_key)
from fila.services.chat import parse_chat_request
from fila.services.gateway import RequestContext

MODEL = "gpt-4.1-nano"


class Clock:
    def __init__(self, t: float = 1_800_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@dataclass
class Plan:
    terms: dict[str, Any]


@dataclass
class Assignment:
    plan_id: str


@dataclass
class Plans:
    """The two things the cache asks of the plan book."""

    plans: dict[str, Plan] = field(default_factory=dict)
    assigned: dict[str, str] = field(default_factory=dict)

    def current_assignment(self, api_key_id: str) -> Assignment | None:
        plan_id = self.assigned.get(api_key_id)
        return Assignment(plan_id) if plan_id else None


def key_record() -> KeyRecord:
    key_id = str(uuid.uuid4())
    return KeyRecord(id=key_id, name="t", owner="t", prefix="fila-sk-xx", secret_hash=key_id, issued_at="")


def ctx_for(key: KeyRecord, directive: str | None = None) -> RequestContext:
    return RequestContext(key=key, request_id="r", cache_directive=directive)


def parse(**body: Any):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], **body}
    return parse_chat_request(json.dumps(body).encode(), MODEL)


def answer(content: str = "hi", finish: str = "stop", answer_id: str = "chatcmpl-1") -> dict[str, Any]:
    return {"id": answer_id, "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}


def service(clock: Clock | None = None, plans: Plans | None = None) -> CacheService:
    clock = clock or Clock()
    return CacheService(memory=MemoryLRU(10 * 2**20, clock=clock), plans=plans, clock=clock)


async def key_of(cache: CacheService, key: KeyRecord, **body: Any) -> str | None:
    return (await cache.prepare(ctx_for(key), parse(**body))).key


# -- keys ----------------------------------------------------------------------------------------


async def test_fields_that_do_not_change_the_answer_do_not_change_the_key():
    cache, key = service(), key_record()
    base = await key_of(cache, key)
    assert base is not None and parse_cache_key(base) == (key.id, base.split(".")[1])
    for same in ({"stream": True}, {"stream": True, "stream_options": {"include_usage": False}},
                 {"user": "someone"}, {"metadata": {"tag": "x"}}):
        assert await key_of(cache, key, **same) == base, same


async def test_every_field_that_changes_the_answer_changes_the_key():
    cache, key = service(), key_record()
    base = await key_of(cache, key)
    variants = [{"temperature": 0.7}, {"n": 2}, {"model": "gpt-4o"}, {"seed": 1}, {"max_tokens": 5},
                {"messages": [{"role": "user", "content": "hello!"}]},
                {"messages": [{"role": "system", "content": "hello"}]}, {"response_format": {"type": "json_object"}}]
    keys = [await key_of(cache, key, **variant) for variant in variants]
    assert base not in keys and len(set(keys)) == len(keys)


async def test_the_same_prompt_from_two_clients_has_two_keys():
    cache = service()
    assert await key_of(cache, key_record()) != await key_of(cache, key_record())


async def test_a_purge_generation_changes_every_key_of_that_client_only():
    cache, a, b = service(), key_record(), key_record()
    before_a, before_b = await key_of(cache, a), await key_of(cache, b)
    cache.book._purged("action", {"api_key_id": a.id}, 1)
    assert await key_of(cache, a) != before_a
    assert await key_of(cache, b) == before_b


@pytest.mark.parametrize("body", [{"tools": [{"type": "function", "function": {"name": "f"}}]},
                                  {"tool_choice": "none"}, {"functions": [{"name": "f"}]},
                                  {"function_call": "auto"}])
async def test_requests_with_tools_are_not_cached(body):
    lookup = await service().prepare(ctx_for(key_record()), parse(**body))
    assert lookup.key is None and lookup.outcome == BYPASS and lookup.headers == {"x-fila-cache": BYPASS}


async def test_directives_map_to_refresh_and_bypass():
    cache, key = service(), key_record()
    refresh = await cache.prepare(ctx_for(key, "refresh"), parse())
    bypass = await cache.prepare(ctx_for(key, "bypass"), parse())
    assert (refresh.mode, refresh.outcome, refresh.key is not None) == (REFRESH, REFRESH, True)
    assert (bypass.mode, bypass.outcome, bypass.key) == (BYPASS, BYPASS, None)


def test_cacheable_answers_end_in_stop_or_length_only():
    assert cacheable_answer(answer(finish="stop")) and cacheable_answer(answer(finish="length"))
    assert not cacheable_answer(answer(finish="tool_calls"))
    assert not cacheable_answer(answer(finish="content_filter"))
    assert not cacheable_answer({"choices": []})


def test_a_malformed_cache_key_is_a_400():
    for bad in ("nope", f"{uuid.uuid4()}.xyz", f"{uuid.uuid4()}.{'a' * 39}", f"not-a-uuid.{'a' * 40}"):
        with pytest.raises(InvalidRequest):
            parse_cache_key(bad)


# -- a request's use of the cache ---------------------------------------------------------------


async def fill(cache: CacheService, key: KeyRecord, data: dict[str, Any], plan_id: str | None = None,
               **answered: Any) -> str:
    lookup = await cache.prepare(ctx_for(key), parse())
    assert await cache.find(lookup, plan_id) is None
    entry_id = str(uuid.uuid4())
    await cache.answered(lookup, entry_id, json.dumps(data).encode(), data, 5, 2, 7, **answered)
    cache.release(lookup)
    return entry_id


async def lookup_once(cache: CacheService, key: KeyRecord, plan_id: str | None = None):
    lookup = await cache.prepare(ctx_for(key), parse())
    stored = await cache.find(lookup, plan_id)
    cache.release(lookup)
    return lookup, stored


async def test_a_filled_answer_is_a_hit_with_its_source_and_usage_until_the_plans_ttl_ends():
    clock = Clock()
    plans = Plans(plans={"p": Plan({"cache_ttls": {"response": 100, "conversation": 60, "context": 60}})})
    cache, key = service(clock, plans), key_record()
    source = await fill(cache, key, answer(), plan_id="p")
    clock.t += 99.9
    lookup, stored = await lookup_once(cache, key, "p")
    assert lookup.outcome == HIT and lookup.layer == MEMORY and stored.source == source
    assert lookup.fields() == {"cache": HIT, "cache_layer": MEMORY, "cache_source": source, "tokens_saved": 7}
    assert lookup.headers["x-fila-cache"] == HIT and lookup.headers["x-fila-cache-layer"] == MEMORY
    clock.t += 0.1
    lookup, stored = await lookup_once(cache, key, "p")
    assert stored is None and lookup.outcome == MISS and lookup.fields() == {"cache": MISS, "cache_layer": None}


async def test_the_default_ttl_is_an_hour():
    clock = Clock()
    cache, key = service(clock), key_record()
    await fill(cache, key, answer())
    clock.t += 3599
    assert (await lookup_once(cache, key))[1] is not None
    clock.t += 1
    assert (await lookup_once(cache, key))[1] is None


async def test_a_plan_with_a_zero_response_ttl_caches_nothing():
    plans = Plans(plans={"p": Plan({"cache_ttls": {"response": 0, "conversation": 60, "context": 60}})})
    cache, key = service(plans=plans), key_record()
    await fill(cache, key, answer(), plan_id="p")
    lookup, stored = await lookup_once(cache, key, "p")
    assert stored is None and lookup.outcome == BYPASS


@pytest.mark.parametrize("data, kwargs", [(answer(finish="tool_calls"), {}), (answer(finish="content_filter"), {}),
                                          (answer(), {"fallback": True})])
async def test_unstorable_answers_are_not_stored(data, kwargs):
    cache, key = service(), key_record()
    await fill(cache, key, data, **kwargs)
    assert (await lookup_once(cache, key))[1] is None


async def test_a_refresh_overwrites_and_a_bypass_neither_reads_nor_writes():
    cache, key = service(), key_record()
    await fill(cache, key, answer(answer_id="first"))
    refresh = await cache.prepare(ctx_for(key, "refresh"), parse())
    assert await cache.find(refresh, None) is None            # skipped the lookup
    await cache.answered(refresh, "e2", b'{"id":"second"}', answer(answer_id="second"), 5, 2, 7)
    bypass = await cache.prepare(ctx_for(key, "bypass"), parse())
    assert await cache.find(bypass, None) is None
    await cache.answered(bypass, "e3", b'{"id":"third"}', answer(answer_id="third"), 5, 2, 7)
    _, stored = await lookup_once(cache, key)
    assert stored.body == b'{"id":"second"}' and stored.source == "e2"


async def test_concurrent_identical_misses_wait_for_one_leader_and_are_inflight_hits():
    cache, key = service(), key_record()
    lookups = [await cache.prepare(ctx_for(key), parse()) for _ in range(20)]
    finds = [asyncio.create_task(cache.find(lookup, None)) for lookup in lookups]
    await asyncio.sleep(0.01)
    leaders = [lookup for lookup, task in zip(lookups, finds) if task.done()]
    assert len(leaders) == 1 and await finds[lookups.index(leaders[0])] is None
    await cache.answered(leaders[0], "leader-entry", b'{"id":"x"}', answer(), 5, 2, 7)
    results = await asyncio.gather(*finds)
    followers = [lookup for lookup in lookups if lookup is not leaders[0]]
    assert sorted(r.source if r is not None else "" for r in results) == [""] + ["leader-entry"] * 19
    assert [f.fields() for f in followers] == [{"cache": HIT, "cache_layer": INFLIGHT, "cache_source": "leader-entry",
                                                "tokens_saved": 7}] * 19
    assert leaders[0].fields() == {"cache": MISS, "cache_layer": None}


async def test_when_the_leader_fails_its_followers_ask_the_upstream_themselves():
    cache, key = service(), key_record()
    leader = await cache.prepare(ctx_for(key), parse())
    follower = await cache.prepare(ctx_for(key), parse())
    assert await cache.find(leader, None) is None
    waiting = asyncio.create_task(cache.find(follower, None))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    cache.release(leader)                 # the leader's upstream call failed
    assert await waiting is None and follower.outcome == MISS and follower.leader is None
    assert not cache._flights


# -- conversations and base contexts -------------------------------------------------------------


async def converse(cache: CacheService, key: KeyRecord, text: str, reply: str, conversation: str = "c1") -> list:
    lookup = await cache.prepare(ctx_for(key), parse(messages=[{"role": "user", "content": text}],
                                                     conversation_id=conversation))
    sent = lookup.parsed.messages
    assert await cache.find(lookup, None) is None
    await cache.answered(lookup, "e", None, answer(reply), 5, 2, 7)
    cache.release(lookup)
    return sent


async def test_a_conversation_prepends_its_history_and_only_to_its_own_client():
    cache, a, b = service(), key_record(), key_record()
    assert await converse(cache, a, "one", "A1") == [{"role": "user", "content": "one"}]
    assert await converse(cache, a, "two", "A2") == [
        {"role": "user", "content": "one"}, {"role": "assistant", "content": "A1"}, {"role": "user", "content": "two"}]
    assert await converse(cache, b, "hello", "B1") == [{"role": "user", "content": "hello"}]   # same id, other key
    assert [m["content"] for m in await cache.conversation(a.id, "c1")] == ["one", "A1", "two", "A2"]


async def test_a_conversation_expires_a_day_after_its_last_use():
    clock = Clock()
    cache, key = service(clock), key_record()
    await converse(cache, key, "one", "A1")
    clock.t += 86_399
    assert len(await converse(cache, key, "two", "A2")) == 3   # used: kept another day
    clock.t += 86_399
    assert len(await converse(cache, key, "three", "A3")) == 5
    clock.t += 86_400
    assert await converse(cache, key, "four", "A4") == [{"role": "user", "content": "four"}]


def turn(i: int, size: int = 10) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{i}".ljust(size, "u")}, {"role": "assistant", "content": "a" * size}]


def test_truncation_keeps_the_newest_whole_turns_within_50_messages():
    history = [m for i in range(40) for m in turn(i)]
    kept = truncate_history(history)
    assert len(kept) == MAX_HISTORY_MESSAGES and kept == history[-MAX_HISTORY_MESSAGES:]
    assert kept[0]["role"] == "user"


def test_truncation_keeps_the_newest_whole_turns_within_32k_characters():
    history = [m for i in range(10) for m in turn(i, size=5000)]     # 10 000 characters a turn
    kept = truncate_history(history)
    assert kept == history[-6:] and sum(len(m["content"]) for m in kept) <= MAX_HISTORY_CHARS


def test_truncation_never_starts_mid_turn():
    history = [{"role": "assistant", "content": "orphan"}, *turn(1), *turn(2)]
    assert truncate_history(history) == [*turn(1), *turn(2)]
    assert truncate_history([{"role": "assistant", "content": "x" * 40_000}]) == []


def test_base_context_rules():
    assert validate_context("sys", None) == ("sys", None)
    assert validate_context("", "ref") == (None, "ref")
    assert context_messages("sys", "ref") == [{"role": "system", "content": "sys"},
                                              {"role": "system", "content": "ref"}]
    for system, reference in ((None, None), ("", ""), (3, None), ("x" * 16_001, None), (None, "x" * 48_001)):
        with pytest.raises(InvalidRequest):
            validate_context(system, reference)
    for bad in ("", "a b", "x" * 129, "a/b", 5):
        with pytest.raises(InvalidRequest):
            validate_conversation_id(bad)


async def test_a_base_context_is_prepended_until_its_ttl_ends():
    clock = Clock()
    plans = Plans(plans={"p": Plan({"cache_ttls": {"response": 10, "conversation": 60, "context": 1000}})})
    cache, key = service(clock, plans), key_record()
    plans.assigned[key.id] = "p"
    cache.book._context_set("ctx-id", {"api_key_id": key.id, "system": "S", "reference": "R",
                                       "at": "2027-01-15T08:00:00+00:00"}, 1)
    clock.t = cache.book.contexts[key.id].set_at_s + 999
    lookup = await cache.prepare(ctx_for(key), parse())
    assert [m["content"] for m in lookup.parsed.messages] == ["S", "R", "hello"]
    assert (await cache.prepare(ctx_for(key_record()), parse())).parsed.messages == [
        {"role": "user", "content": "hello"}]                          # another client: nothing prepended
    clock.t += 1
    assert (await cache.prepare(ctx_for(key), parse())).parsed.messages == [{"role": "user", "content": "hello"}]


def test_hits_settle_the_tokens_the_plan_bills():
    plans = Plans(plans={"full": Plan({"cache_hit_billing": "full"}), "free": Plan({"cache_hit_billing": "free"}),
                         "half": Plan({"cache_hit_billing": "fraction", "cache_hit_fraction": "0.5"})})
    cache = service(plans=plans)
    assert [cache.billable_hit_tokens(p, 7) for p in ("full", "free", "half", None)] == [7, 0, 3, 7]


async def test_without_a_cache_the_gateway_passes_through():
    cache = CacheService.off()
    lookup = await cache.prepare(ctx_for(key_record()), parse(conversation_id="c"))
    assert await cache.find(lookup, None) is None
    assert lookup.fields() == {} and lookup.headers == {}
