"""The cache: what is cached, under which key, for how long, for whom; and how a request uses it.

Layers, each namespaced by the client's API key id (``ns``) so one client can never be served
another's response, history or context, whatever the prompts:

* **Response cache.** Key ``{ns}.{digest}``: ``digest`` is SHA-256 over the namespace, the
  client's purge generation and the request as FILA sends it upstream (model, messages after
  expansion, and every other field of the body) less the fields that do not change the answer:
  ``stream``, ``stream_options`` (a stored answer is served to stream and non-stream clients
  alike), ``user`` and ``metadata`` (labels for the caller's own bookkeeping). The hashed bytes
  are ``ParsedRequest.canonical()``, computed once and shared with the ledger's fingerprint.
  In-process: a bounded LRU (``FILA_CACHE_MEMORY_MB``) in front of Redis; a memory hit never
  touches Redis. In Redis under ``fila:cache:r:{ns}:{digest}``, TTL = the plan's
  ``cache_ttls["response"]`` (1 h by default; 0 turns the layer off for the plan). An entry in
  memory lives at most ``memory_max_age_s`` (60 s) so that another process's refresh reaches this
  one within that bound; purges and deletions reach every process through the log (< 1 s).
  The answer is served as first stored: same body, same ``id``; a ``stream: true`` client gets
  it as SSE chunks. The entry that filled it is stored with it (``cache_source``).
* **Conversation history.** A request with ``conversation_id`` gets its stored history
  prepended; the client's new messages and the first choice's answer are appended once it is
  answered. Redis list ``fila:cache:h:{ns}:{id}``, TTL the plan's ``cache_ttls["conversation"]``
  (24 h) from last use; truncation: see ``fila.domain.context.truncate_history``. Concurrent
  requests on one conversation each append their own turn (atomically), in finishing order.
* **Base context.** Event-sourced (``fila.domain.context``), held in memory by every process
  (the Registry feeds ``fila.projections.cachebook``), prepended before the history. Losing
  Redis loses nothing.

Per request: ``Cache-Control: no-cache`` or ``x-fila-cache: refresh`` skips the lookup, calls
the upstream and overwrites; ``no-store`` or ``x-fila-cache: bypass`` neither reads nor writes.
Not cached (recorded and answered ``bypass``): requests with ``tools``, ``tool_choice``,
``functions`` or ``function_call`` (a tool call may act on the world; replaying it is not
FILA's call to make). Not stored: answers whose choices do not all end in ``stop`` or
``length`` (tool calls, content filter), errors, and answers from a fallback route (another
upstream or model while the primary is down: stored, they would outlive the outage). Cached as
any other: ``n > 1`` (the key includes ``n``; all choices are stored) and ``temperature > 0``
(the cache returns the first sample; clients who want fresh samples send ``no-cache``).
A hit is recorded with the stored usage (prompt, completion, total tokens) and
``tokens_saved`` = its total: billing prices it by the plan's ``cache_hit_billing``, and token
rate limits / hard caps are charged what the plan bills for it (free: nothing).

Stampedes: identical concurrent misses make one upstream call. In a process, the first is the
leader and the others await its answer (single-flight by cache key); across processes the
leader holds ``fila:cache:lock:{ns}:{digest}`` (SET NX PX) and other processes' leaders poll
Redis for the answer for at most ``lock_wait_s``, then call the upstream themselves. Those
served this way are hits with ``cache_layer = "inflight"`` and the leader's entry as source.

Headers: ``x-fila-cache: hit|miss|bypass|refresh``; on hits ``x-fila-cache-layer:
memory|redis|inflight``; when the response cache applies, ``x-fila-cache-key`` (what
``DELETE /admin/cache/entries/{key}`` takes). Management: a purge gives the client a new key
generation (every process reads it from the log, so old entries are unreachable at once; Redis
copies are also deleted, best effort); deleting one entry or a conversation drops it in Redis
and, through the log, in every process's memory. Each is a ``CacheAction`` event.

Degradation: when Redis fails or is slow, its layer is skipped for a short back-off
(``fila.adapters.cache_store``) and the in-process layer carries on: nothing answers 500. Such
a request's ledger entry says ``cache_layer = "degraded"`` (on a miss or refresh: the shared
layer could not be used); conversation history is then read from this process's copy.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

import msgspec
from eventsourcing.persistence import IntegrityError

from fila.adapters.cache_store import MemoryLRU, SharedStore, Stored, StoreUnavailable, decode_stored, encode_stored
from fila.domain import context as domain
from fila.domain.context import BaseContext, CacheAction
from fila.domain.errors import Conflict, InvalidRequest, NotFound
from fila.domain.plans import DEFAULT_CACHE_TTLS
from fila.domain.time import iso
from fila.projections import usage
from fila.projections.cachebook import CacheBook, history_memory_key
from fila.services.chat import ParsedRequest
from fila.services.ids import new_request_id, new_uuid

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode

UNCACHEABLE_FIELDS = ("tools", "tool_choice", "functions", "function_call")
CACHEABLE_FINISH = frozenset({"stop", "length"})

HIT, MISS, BYPASS, REFRESH = "hit", "miss", "bypass", "refresh"
LOOKUP = "lookup"
MEMORY, REDIS, INFLIGHT, DEGRADED = "memory", "redis", "inflight", "degraded"
HEADER, LAYER_HEADER, KEY_HEADER = "x-fila-cache", "x-fila-cache-layer", "x-fila-cache-key"
STATS_VIEW = "cache_stats_daily"


@dataclass(slots=True)
class Lookup:
    """One request's use of the cache, from ``prepare`` to ``release``."""

    ctx: Any
    ns: str
    parsed: ParsedRequest
    enabled: bool = True
    key: str | None = None              # None: the response cache does not apply
    mode: str = BYPASS                  # LOOKUP | REFRESH | BYPASS
    outcome: str = BYPASS               # HIT | MISS | BYPASS | REFRESH
    layer: str | None = None
    stored: Stored | None = None
    degraded: bool = False
    plan_id: str | None = None
    ttl_s: int = 0
    conversation_id: str | None = None
    new_messages: list | None = None
    history: list | None = None         # the stored history as read (before truncation)
    leader: asyncio.Future | None = None
    lock_token: str | None = None

    def fields(self) -> dict[str, Any]:
        """The ledger entry's cache fields (and the summary line's cache outcome)."""
        if not self.enabled:
            return {}
        self.ctx.cache = self.outcome
        if self.stored is not None and self.outcome == HIT:
            return {"cache": HIT, "cache_layer": self.layer, "cache_source": self.stored.source,
                    "tokens_saved": self.stored.total_tokens}
        return {"cache": self.outcome, "cache_layer": DEGRADED if self.degraded else None}

    @property
    def headers(self) -> dict[str, str]:
        if not self.enabled:
            return {}
        headers = {HEADER: self.outcome}
        if self.outcome == HIT:
            headers[LAYER_HEADER] = self.layer or MEMORY
        if self.key is not None:
            headers[KEY_HEADER] = self.key
        return headers


def cacheable_answer(data: dict[str, Any]) -> bool:
    choices = data.get("choices")
    return bool(choices) and all(c.get("finish_reason") in CACHEABLE_FINISH for c in choices)


def _readable(raw: bytes | None) -> Stored | None:
    """A stored answer as read from Redis; one FILA cannot read (another version's) is a miss."""
    if raw is None:
        return None
    try:
        return decode_stored(raw)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


def _messages(values: list[bytes] | None) -> list[dict[str, Any]]:
    messages = []
    for value in values or ():
        try:
            message = _decode(value)
        except msgspec.DecodeError:
            continue
        if isinstance(message, dict):
            messages.append(message)
    return messages


def parse_cache_key(cache_key: str) -> tuple[str, str]:
    """``{api_key_id}.{digest}`` -> (api_key_id, digest); a malformed key is a 400."""
    ns, _, digest = cache_key.partition(".")
    try:
        UUID(ns)
        int(digest, 16)
    except ValueError:
        raise InvalidRequest("a cache key looks like '<api key id>.<40 hex digits>' (the x-fila-cache-key header)",
                             param="cache_key") from None
    if len(digest) != 40:
        raise InvalidRequest("a cache key's digest has 40 hex digits", param="cache_key")
    return ns, digest.lower()


class CacheService:
    def __init__(self, *, memory: MemoryLRU, shared: SharedStore | None = None, plans: Any = None,
                 batcher: Any = None, registry: Any = None, clock: Callable[[], float] = time.time,
                 memory_max_age_s: float = 60.0, lock_ttl_s: float = 30.0, lock_wait_s: float = 5.0,
                 poll_s: float = 0.02, prefix: str = "fila:cache", enabled: bool = True) -> None:
        self.memory = memory
        self.shared = shared
        self.plans = plans
        self.batcher = batcher
        self.registry = registry
        self.clock = clock
        self.memory_max_age_s = memory_max_age_s
        self.lock_ttl_ms = int(lock_ttl_s * 1000)
        self.lock_wait_s = lock_wait_s
        self.poll_s = poll_s
        self.prefix = prefix
        self.enabled = enabled
        self.book = CacheBook()
        self._flights: dict[str, asyncio.Future] = {}
        self._background: set[asyncio.Task] = set()
        if registry is not None:
            self.book.attach(registry)

    @classmethod
    def off(cls) -> CacheService:
        """No cache at all (a Gateway built without one): requests pass through untouched."""
        return cls(memory=MemoryLRU(0), enabled=False)

    # -- terms -------------------------------------------------------------------------------------

    def ttl(self, plan_id: str | None, layer: str) -> int:
        plan = self.plans.plans.get(plan_id) if self.plans is not None and plan_id else None
        if plan is None:
            return DEFAULT_CACHE_TTLS[layer]
        return (plan.terms.get("cache_ttls") or DEFAULT_CACHE_TTLS).get(layer, DEFAULT_CACHE_TTLS[layer])

    def _key_plan(self, ns: str) -> str | None:
        assignment = self.plans.current_assignment(ns) if self.plans is not None else None
        return assignment.plan_id if assignment is not None else None

    def billable_hit_tokens(self, plan_id: str | None, total: int) -> int:
        """A hit's tokens as the plan bills them (for token rate limits and hard caps)."""
        plan = self.plans.plans.get(plan_id) if self.plans is not None and plan_id else None
        mode = plan.terms.get("cache_hit_billing", "full") if plan is not None else "full"
        if mode == "free":
            return 0
        if mode == "fraction":
            return math.floor(total * Decimal(plan.terms.get("cache_hit_fraction", "1")))
        return total

    # -- keys --------------------------------------------------------------------------------------

    def key_for(self, ns: str, parsed: ParsedRequest) -> str:
        digest = hashlib.sha256(f"{ns}\x1f{self.book.generations.get(ns, 0)}\x1f".encode())
        digest.update(parsed.canonical())        # the same bytes the ledger's fingerprint hashes
        return f"{ns}.{digest.hexdigest()[:40]}"

    def _rkey(self, key: str) -> str:
        return f"{self.prefix}:r:{key.replace('.', ':', 1)}"

    def _lock_key(self, key: str) -> str:
        return f"{self.prefix}:lock:{key.replace('.', ':', 1)}"

    def _hkey(self, ns: str, conversation_id: str) -> str:
        return f"{self.prefix}:h:{ns}:{conversation_id}"

    # -- a request's use of the cache ------------------------------------------------------------

    async def prepare(self, ctx: Any, parsed: ParsedRequest) -> Lookup:
        """Expand the request (base context, conversation history) and decide how it uses the cache."""
        ns = ctx.key.id
        if not self.enabled:
            return Lookup(ctx=ctx, ns=ns, parsed=parsed, enabled=False)
        if self.book.pending:
            self._apply_evictions()
        lookup = Lookup(ctx=ctx, ns=ns, parsed=parsed)
        prefix = None
        context = self.book.contexts.get(ns)
        if context is not None and self.clock() < context.set_at_s + self.ttl(self._key_plan(ns), "context"):
            prefix = context.messages
        conversation_id = parsed.request.conversation_id
        history = None
        if conversation_id is not None:
            lookup.conversation_id = domain.validate_conversation_id(conversation_id)
            lookup.new_messages = parsed.messages
            lookup.history, lookup.degraded = await self._read_history(ns, conversation_id)
            history = domain.truncate_history(lookup.history)
        if prefix or history:
            messages = [*(prefix or ()), *(history or ()), *parsed.messages]
            parsed = lookup.parsed = ParsedRequest(raw={**parsed.raw, "messages": messages},
                                                   request=parsed.request, model=parsed.model)
        directive = ctx.cache_directive
        if directive == "bypass" or any(name in parsed.raw for name in UNCACHEABLE_FIELDS):
            lookup.mode = lookup.outcome = BYPASS
        else:
            lookup.mode = REFRESH if directive == "refresh" else LOOKUP
            lookup.outcome = REFRESH if directive == "refresh" else MISS
            lookup.key = self.key_for(ns, parsed)
        ctx.cache = lookup.outcome
        return lookup

    async def find(self, lookup: Lookup, plan_id: str | None) -> Stored | None:
        """A stored (or in-flight) answer for this request, or None: the caller asks the upstream.

        On None the caller may be the flight's leader: it must call ``answered`` or ``release``.
        """
        if not lookup.enabled:
            return None
        lookup.plan_id = plan_id
        if lookup.key is None:
            return None
        lookup.ttl_s = self.ttl(plan_id, "response")
        if lookup.ttl_s <= 0:
            lookup.key, lookup.mode, lookup.outcome = None, BYPASS, BYPASS
            return None
        shared = self.shared
        if lookup.mode == REFRESH:
            lookup.degraded = lookup.degraded or (shared is not None and not shared.available)
            return None
        key = lookup.key
        stored = self.memory.get(key)
        if stored is not None:
            return self._hit(lookup, stored, MEMORY)
        if shared is not None:
            try:
                raw = await shared.get(self._rkey(key))
            except StoreUnavailable:
                lookup.degraded = True
            else:
                stored = _readable(raw)
                if stored is not None and stored.expires_at > self.clock():
                    self._remember(key, stored)
                    return self._hit(lookup, stored, REDIS)
        flight = self._flights.get(key)
        if flight is not None:
            stored = await asyncio.shield(flight)
            if stored is not None:
                return self._hit(lookup, stored, INFLIGHT)
            return None      # the leader got no storable answer: ask the upstream ourselves
        lookup.leader = self._flights[key] = asyncio.get_running_loop().create_future()
        if shared is not None and not lookup.degraded:
            stored = await self._await_other_process(lookup)
            if stored is not None:
                self._finish_flight(lookup, stored)
                return self._hit(lookup, stored, INFLIGHT)
        return None

    def _hit(self, lookup: Lookup, stored: Stored, layer: str) -> Stored:
        lookup.stored, lookup.layer, lookup.outcome = stored, layer, HIT
        lookup.degraded = False
        lookup.ctx.cache = HIT
        return stored

    async def _await_other_process(self, lookup: Lookup) -> Stored | None:
        """Lead across processes (take the lock), or wait for the process that holds it."""
        shared = self.shared
        rkey, lock_key = self._rkey(lookup.key), self._lock_key(lookup.key)
        token = new_request_id()
        try:
            if await shared.acquire(lock_key, token, self.lock_ttl_ms):
                lookup.lock_token = token
                return None
            deadline = time.monotonic() + self.lock_wait_s
            while time.monotonic() < deadline:
                await asyncio.sleep(self.poll_s)
                raw, locked = await shared.get_with_lock(rkey, lock_key)
                stored = _readable(raw)
                if stored is not None and stored.expires_at > self.clock():
                    self._remember(lookup.key, stored)
                    return stored
                if not locked:   # the other leader gave up: lead in its place
                    if await shared.acquire(lock_key, token, self.lock_ttl_ms):
                        lookup.lock_token = token
                        return None
            return None          # waited long enough: ask the upstream ourselves
        except StoreUnavailable:
            lookup.degraded = True
            return None

    def _remember(self, key: str, stored: Stored) -> None:
        expires = stored.expires_at
        if self.shared is not None:    # other processes may refresh it: bound how stale this copy gets
            expires = min(expires, self.clock() + self.memory_max_age_s)
        self.memory.put(key, stored, len(stored.body), expires)

    def _finish_flight(self, lookup: Lookup, stored: Stored | None) -> None:
        future, lookup.leader = lookup.leader, None
        if future is None:
            return
        if self._flights.get(lookup.key) is future:
            del self._flights[lookup.key]
        if not future.done():
            future.set_result(stored)

    async def answered(self, lookup: Lookup, entry_id: Any, body: bytes | None, data: dict[str, Any],
                       prompt_tokens: int, completion_tokens: int, total_tokens: int, *,
                       fallback: bool = False) -> None:
        """After the upstream's answer is committed: store it, hand it to followers, extend history.

        An answer from a fallback route (another upstream or model, while the primary is down) is
        served but not stored: the cache would otherwise keep serving it after the primary is back.
        """
        if not lookup.enabled:
            return
        stored = None
        if (lookup.key is not None and lookup.mode != BYPASS and lookup.ttl_s > 0 and not fallback
                and cacheable_answer(data)):
            stored = Stored(body=body if body is not None else _encode(data), source=str(entry_id),
                            prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                            total_tokens=total_tokens, expires_at=self.clock() + lookup.ttl_s)
            self._remember(lookup.key, stored)
        self._finish_flight(lookup, stored)
        if self.shared is not None:
            try:
                if stored is not None:
                    await self.shared.set(self._rkey(lookup.key), encode_stored(stored), lookup.ttl_s * 1000)
                if lookup.lock_token is not None:
                    token, lookup.lock_token = lookup.lock_token, None
                    await self.shared.release(self._lock_key(lookup.key), token)
            except StoreUnavailable:
                pass
        if lookup.conversation_id is not None:
            await self._append_history(lookup, data)

    async def served(self, lookup: Lookup) -> None:
        """After a hit is committed: extend the conversation, if the request named one."""
        if lookup.conversation_id is not None and lookup.stored is not None:
            await self._append_history(lookup, _decode(lookup.stored.body))

    def release(self, lookup: Lookup) -> None:
        """The request is over (answered or not): never leave followers or a lock behind."""
        if lookup.leader is not None:
            self._finish_flight(lookup, None)
        if lookup.lock_token is not None and self.shared is not None:
            token, lookup.lock_token = lookup.lock_token, None
            self._detach(self._quiet(self.shared.release(self._lock_key(lookup.key), token)))

    def _detach(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    @staticmethod
    async def _quiet(coro: Any) -> None:
        try:
            await coro
        except StoreUnavailable:
            pass

    def _apply_evictions(self) -> None:
        pending = self.book.pending
        while pending:
            kind, what = pending.popleft()
            if kind == "prefix":
                self.memory.delete_prefix(what)
            else:
                self.memory.delete(what)

    # -- conversation history ----------------------------------------------------------------------

    async def _read_history(self, ns: str, conversation_id: str) -> tuple[list, bool]:
        """(stored messages, degraded): Redis when it answers, else this process's copy."""
        if self.shared is not None:
            try:
                values = await self.shared.read_list(self._hkey(ns, conversation_id))
                return _messages(values), False
            except StoreUnavailable:
                copy = self.memory.get(history_memory_key(ns, conversation_id))
                return list(copy or ()), True
        return list(self.memory.get(history_memory_key(ns, conversation_id)) or ()), False

    async def _append_history(self, lookup: Lookup, data: dict[str, Any]) -> None:
        added = list(lookup.new_messages or ())
        choices = data.get("choices") or ()
        if choices:
            message = choices[0].get("message") or {}
            answer = {"role": "assistant", "content": message.get("content")}
            if message.get("tool_calls"):
                answer["tool_calls"] = message["tool_calls"]
            added.append(answer)
        ttl = self.ttl(lookup.plan_id, "conversation")
        if ttl <= 0:
            return
        encoded = [_encode(message) for message in added]
        history = [*(lookup.history or ()), *added][-domain.MAX_HISTORY_MESSAGES:]
        self.memory.put(history_memory_key(lookup.ns, lookup.conversation_id), history, len(_encode(history)),
                        self.clock() + ttl)
        if self.shared is not None:
            try:
                await self.shared.append(self._hkey(lookup.ns, lookup.conversation_id), encoded,
                                         domain.MAX_HISTORY_MESSAGES, ttl * 1000)
            except StoreUnavailable:
                pass

    async def conversation(self, ns: str, conversation_id: str) -> list[dict[str, Any]]:
        """The history a request on this conversation would get prepended (404 if none)."""
        domain.validate_conversation_id(conversation_id)
        stored, _ = await self._read_history(ns, conversation_id)
        messages = domain.truncate_history(stored)
        if not messages:
            raise NotFound(f"no conversation '{conversation_id}' (or it expired)", param="conversation_id",
                           code="conversation_not_found")
        return messages

    async def delete_conversation(self, ns: str, conversation_id: str) -> dict[str, Any]:
        domain.validate_conversation_id(conversation_id)
        await self._commit(CacheAction.delete_conversation(new_uuid(), ns, conversation_id, f"client:{ns}",
                                                           self._now()))
        existed = self.memory.delete(history_memory_key(ns, conversation_id))
        if self.shared is not None:
            try:
                existed = bool(await self.shared.delete(self._hkey(ns, conversation_id))) or existed
            except StoreUnavailable:
                pass
        return {"id": conversation_id, "object": "fila.conversation.deleted", "deleted": existed}

    # -- base context ----------------------------------------------------------------------------

    async def context(self, ns: str) -> dict[str, Any]:
        await self._refresh()       # read what another process wrote (its poll may not have run yet)
        return self._context(ns)

    def _context(self, ns: str) -> dict[str, Any]:
        record = self.book.contexts.get(ns)
        ttl = self.ttl(self._key_plan(ns), "context")
        if record is None or self.clock() >= record.set_at_s + ttl:
            raise NotFound("this API key has no base context (or it expired)", code="context_not_found")
        return record.to_public(ttl)

    async def set_context(self, ns: str, system: Any, reference: Any) -> dict[str, Any]:
        await self._refresh()
        at = self._now()
        if ns in self.book.context_version:
            aggregate = await self._load(domain.context_id_for(ns))
            aggregate.replace(system, reference, at)
        else:
            aggregate = BaseContext.define(ns, system, reference, at)
        await self._commit(aggregate, conflict="the base context changed meanwhile; retry")
        return self._context(ns)

    async def clear_context(self, ns: str) -> None:
        await self._refresh()
        if ns not in self.book.contexts:
            raise NotFound("this API key has no base context", code="context_not_found")
        aggregate = await self._load(domain.context_id_for(ns))
        aggregate.clear(self._now())
        await self._commit(aggregate, conflict="the base context changed meanwhile; retry")

    # -- admin -------------------------------------------------------------------------------------

    async def purge(self, api_key_id: str) -> dict[str, Any]:
        """Drop every cached response of a client, in every process (a new key generation)."""
        await self._commit(CacheAction.purge(new_uuid(), api_key_id, "admin", self._now()))
        self._apply_evictions()
        redis_deleted = None
        if self.shared is not None:
            try:
                redis_deleted = await self.shared.delete_matching(f"{self.prefix}:r:{api_key_id}:*")
            except StoreUnavailable:
                pass    # the new generation already makes them unreachable; their TTL ends them
        return {"api_key_id": api_key_id, "purged": True, "generation": self.book.generations.get(api_key_id, 0),
                "redis_entries_deleted": redis_deleted}

    async def delete_entry(self, cache_key: str) -> dict[str, Any]:
        ns, digest = parse_cache_key(cache_key)
        cache_key = f"{ns}.{digest}"
        await self._commit(CacheAction.delete_entry(new_uuid(), ns, cache_key, "admin", self._now()))
        existed = self.memory.delete(cache_key)
        self._apply_evictions()
        if self.shared is not None:
            try:
                existed = bool(await self.shared.delete(self._rkey(cache_key))) or existed
            except StoreUnavailable:
                pass
        return {"cache_key": cache_key, "deleted": existed}

    # -- plumbing ----------------------------------------------------------------------------------

    def _now(self) -> str:
        return iso(datetime.fromtimestamp(self.clock(), UTC))

    async def _load(self, aggregate_id: UUID) -> Any:
        return await self.batcher.run(self.batcher.store.repository.get, aggregate_id)

    async def _refresh(self) -> None:
        if self.registry is not None:
            await self.batcher.run(self.registry.catch_up)

    async def _commit(self, aggregate: Any, conflict: str = "a concurrent change; retry") -> None:
        try:
            await self.batcher.commit(aggregate)
        except IntegrityError:
            raise Conflict(conflict, code="concurrent_change") from None
        await self._refresh()

    async def drain(self) -> None:
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    # -- stats -------------------------------------------------------------------------------------

    async def stats(self, projector: Any, db: Any, api_key_id: str | None = None, *, wait_for: int = 0,
                    timeout: float = 2.0) -> dict[str, Any]:
        """Hits, misses, hit rate, tokens saved, overall and per client, from the ``cache_stats_daily``
        view (``fila.projections.usage``), once it has projected ``wait_for`` (bounded wait)."""
        deadline = time.monotonic() + timeout
        position = await self.batcher.run(projector.position, STATS_VIEW)
        while position < wait_for and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
            position = await self.batcher.run(projector.position, STATS_VIEW)
        report = await self.batcher.run(lambda: usage.cache_stats(db, api_key_id))
        return dict(report, as_of=position)
