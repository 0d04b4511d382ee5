"""The chat-completion use case: admit, answer (cache or upstream), record, and only then reply.

Every request ends as exactly one ``LedgerEntry`` committed through the batcher before the
client sees its answer (for a stream: before its final chunk). Refusals, upstream failures
and client disconnects are recorded too. A request with an ``Idempotency-Key`` is recorded
under ``uuid5(key, idempotency key)``; a retry finds that entry and gets the original answer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import msgspec
import structlog
from eventsourcing.application import AggregateNotFoundError
from eventsourcing.persistence import IntegrityError

from fila.domain import ledger
from fila.domain.errors import (Conflict, FilaError, Forbidden, RateLimited, UpstreamClientError, UpstreamError,
                                UpstreamUnavailable)
from fila.domain.ledger import LedgerEntry
from fila.domain.time import iso
from fila.projections.registry import KeyRecord
from fila.services.cache import CacheService, Lookup
from fila.services.ids import new_uuid
from fila.services.chat import ParsedRequest, StreamAssembler, completion_as_chunks, estimate_prompt_tokens
from fila.services.routing import Router

_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode
log = structlog.get_logger("fila.request")
INFLIGHT_WAIT_S = 120.0   # longest wait behind a concurrent attempt with the same Idempotency-Key


@dataclass(slots=True)
class RequestContext:
    key: KeyRecord
    request_id: str
    idempotency_key: str | None = None
    cache_directive: str | None = None      # "refresh" | "bypass" | None
    started: float = field(default_factory=time.perf_counter)
    now: datetime = field(default_factory=lambda: datetime.now(UTC))
    # filled as the request goes, for the summary line
    model: str | None = None
    outcome: str | None = None
    tokens: int = 0
    cache: str = "none"
    entry_id: str | None = None
    request_fingerprint: str | None = None   # with an Idempotency-Key: the request as the client sent it

    def latency_us(self) -> int:
        return int((time.perf_counter() - self.started) * 1_000_000)


@dataclass(slots=True)
class Reply:
    body: bytes
    headers: dict[str, str]
    status: int = 200


@dataclass(slots=True)
class StreamReply:
    frames: AsyncIterator[bytes]
    headers: dict[str, str]


@dataclass(slots=True)
class Admitted:
    """What the plan layer decided: the terms the request is billed under, and headers."""

    plan_id: str | None = None
    plan_version: int | None = None
    assignment_id: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    settle: Callable[[int], Any] | None = None   # after the answer, with the request's total tokens


class AllowAll:
    """The admission used when no plan layer is wired: everyone in, nothing billed."""

    async def admit(self, key: KeyRecord, request: ParsedRequest, now: datetime) -> Admitted:
        return Admitted()

    def overlap_plan(self, key: KeyRecord, now: datetime) -> str | None:
        return None


def _retrieved(future: asyncio.Future) -> None:
    """Mark a background admission's refusal as seen (it is recorded and raised to its waiter)."""
    if not future.cancelled():
        future.exception()


def log_summary(ctx: RequestContext, status: int) -> None:
    _log_request(ctx.request_id, ctx.key.id, status, ctx.started, model=ctx.model, outcome=ctx.outcome,
                 tokens=ctx.tokens, cache=ctx.cache, entry_id=ctx.entry_id)


def log_unauthenticated(request_id: str, status: int, started: float, code: str | None) -> None:
    """The summary line of a request refused before it had a key (401): no key id, no ledger entry."""
    _log_request(request_id, None, status, started, outcome=code or "unauthenticated")


def _log_request(request_id: str, api_key_id: str | None, status: int, started: float, *, model: str | None = None,
                 outcome: str | None = None, tokens: int = 0, cache: str = "none", entry_id: str | None = None) -> None:
    """The one summary line per request (never a secret or a prompt)."""
    log.info("request", request_id=request_id, api_key_id=api_key_id, model=model, outcome=outcome, status=status,
             tokens=tokens, cache=cache, latency_ms=round((time.perf_counter() - started) * 1000, 2),
             entry_id=entry_id)


class Gateway:
    def __init__(self, *, batcher: Any, router: Router, admission: Any = None,
                 cache: CacheService | None = None) -> None:
        self.batcher = batcher
        self.router = router
        self.admission = admission or AllowAll()
        self.cache = cache if cache is not None else CacheService.off()
        self._inflight: dict[UUID, asyncio.Future] = {}
        self._background: set[asyncio.Task] = set()
        self.overlaps_cancelled = 0     # upstream calls stopped by a refusal that came back late

    # -- recording -------------------------------------------------------------------------

    def _entry(self, ctx: RequestContext, entry_id: UUID, admitted: Admitted | None, *, outcome: str,
               status: int, model: str, **fields: Any) -> LedgerEntry.Recorded:
        ctx.outcome = outcome
        ctx.entry_id = str(entry_id)
        ctx.tokens = fields.get("total_tokens", 0)
        if admitted is not None:
            fields.setdefault("plan_id", admitted.plan_id)
            fields.setdefault("plan_version", admitted.plan_version)
            fields.setdefault("assignment_id", admitted.assignment_id)
        return ledger.recorded(entry_id, api_key_id=ctx.key.id, at=iso(ctx.now), outcome=outcome, status=status,
                               model=model, idempotency_key=ctx.idempotency_key, latency_us=ctx.latency_us(),
                               request_fingerprint=ctx.request_fingerprint, **fields)

    async def _record_failure(self, ctx: RequestContext, parsed: ParsedRequest, admitted: Admitted | None,
                              error: FilaError, fingerprint: str, lookup: Lookup) -> None:
        if isinstance(error, UpstreamUnavailable):
            outcome = ledger.BREAKER_OPEN
        elif isinstance(error, UpstreamClientError):
            outcome = ledger.UPSTREAM_REJECTED
        else:
            outcome = ledger.UPSTREAM_ERROR
        entry = self._entry(ctx, new_uuid(), admitted, outcome=outcome, status=error.status, model=parsed.model,
                            fingerprint=fingerprint, stream=parsed.request.stream,
                            error=error.code or type(error).__name__, **lookup.fields())
        await self.batcher.commit(entry)

    async def _admit(self, ctx: RequestContext, parsed: ParsedRequest, fingerprint: str) -> Admitted:
        try:
            return await self.admission.admit(ctx.key, parsed, ctx.now)
        except (Forbidden, RateLimited) as refusal:
            outcome = (ledger.FORBIDDEN if isinstance(refusal, Forbidden)
                       else ledger.QUOTA_EXHAUSTED if refusal.code == "insufficient_quota"
                       else ledger.RATE_LIMITED)
            entry = self._entry(ctx, new_uuid(), None, outcome=outcome, status=refusal.status, model=parsed.model,
                                fingerprint=fingerprint, stream=parsed.request.stream, error=refusal.code,
                                refusal_rule=getattr(refusal, "rule", None),
                                refusal_counts=getattr(refusal, "counts", None),
                                plan_id=getattr(refusal, "plan_id", None),
                                assignment_id=getattr(refusal, "assignment_id", None))
            await self.batcher.commit(entry)
            raise

    async def _previous(self, entry_id: UUID) -> LedgerEntry | None:
        def load() -> LedgerEntry | None:
            try:
                return self.batcher.store.repository.get(entry_id)
            except AggregateNotFoundError:
                return None
        return await self.batcher.run(load)

    # -- non-streamed --------------------------------------------------------------------------

    async def complete(self, ctx: RequestContext, parsed: ParsedRequest) -> Reply:
        ctx.model = parsed.model
        if ctx.idempotency_key:
            ctx.request_fingerprint = ledger.fingerprint(parsed.canonical())
        lookup = await self.cache.prepare(ctx, parsed)     # base context + history prepended, cache key
        parsed = lookup.parsed
        fingerprint = ledger.fingerprint(parsed.canonical())
        entry_id = self._entry_id(ctx)
        if ctx.idempotency_key:
            previous = await self._replayable(ctx, entry_id)
            if previous is not None:
                await self._same_request(ctx, previous, parsed.model, fingerprint, parsed.request.stream)
                return Reply(previous.response.encode(), {"idempotent-replayed": "true"})
        try:
            return await self._complete(ctx, parsed, fingerprint, entry_id, lookup)
        finally:
            self._release(entry_id)
            self.cache.release(lookup)

    async def _complete(self, ctx: RequestContext, parsed: ParsedRequest, fingerprint: str,
                        entry_id: UUID, lookup: Lookup) -> Reply:
        admitted, admission = None, None
        plan_id = self.admission.overlap_plan(ctx.key, ctx.now)
        if plan_id is None:
            admitted = await self._admit(ctx, parsed, fingerprint)
            plan_id = admitted.plan_id
        else:   # the key has room: its rate-limit check runs while the cache and upstream work
            admission = asyncio.ensure_future(self._admit(ctx, parsed, fingerprint))
            admission.add_done_callback(_retrieved)
        try:
            if await self.cache.find(lookup, plan_id) is not None:
                admitted = admitted or await admission
                return await self._record_hit(ctx, parsed, admitted, entry_id, fingerprint, lookup)
            call = self.router.complete(parsed.model, parsed.messages, parsed.extra())
            if admitted is None:
                call = asyncio.ensure_future(call)
                admitted = await self._admitted_during(admission, call)
            reply, route = await call
        except (UpstreamError, UpstreamUnavailable, UpstreamClientError) as error:
            await self._record_failure(ctx, parsed, admitted or await admission, error, fingerprint, lookup)
            raise
        finally:
            if admission is not None and not admission.done():   # left early: let it finish, recorded
                self._background.add(admission)
                admission.add_done_callback(self._background.discard)
        prompt, completion, total = _usage(reply.data)
        entry = self._entry(ctx, entry_id, admitted, outcome=ledger.OK, status=200, model=parsed.model,
                            fingerprint=fingerprint, prompt_tokens=prompt, completion_tokens=completion,
                            total_tokens=total, upstream=f"{route.upstream.name}/{route.model}",
                            response=reply.body.decode() if ctx.idempotency_key else None, **lookup.fields())
        replayed = await self._commit_or_replay(ctx, entry)
        if replayed is not None:
            return Reply(replayed.response.encode(), {"idempotent-replayed": "true"})
        await self.cache.answered(lookup, entry_id, reply.body, reply.data, prompt, completion, total,
                                  fallback=route.upstream is not self.router.primary or route.model != parsed.model)
        self._settle(admitted, total)
        return Reply(reply.body, dict(admitted.headers, **lookup.headers))

    async def _admitted_during(self, admission: asyncio.Future, call: asyncio.Future) -> Admitted:
        """The admission's verdict while the upstream call runs; a refusal cancels the call."""
        try:
            return await admission
        except BaseException:   # refused, or this request itself cancelled (client gone)
            call.cancel()
            await asyncio.wait([call])
            if admission.done() and not admission.cancelled() and admission.exception() is not None:
                answered = not call.cancelled() and call.exception() is None
                self.overlaps_cancelled += 1
                log.warning("overlapped_upstream_call_cancelled", upstream_had_answered=answered,
                            reason="the rate-limit check refused while the call was under way")
            raise

    async def _record_hit(self, ctx: RequestContext, parsed: ParsedRequest, admitted: Admitted,
                          entry_id: UUID, fingerprint: str, lookup: Lookup) -> Reply:
        """A cached answer: recorded with the original usage (billing reads cache == "hit"), then served."""
        stored = lookup.stored
        entry = self._entry(ctx, entry_id, admitted, outcome=ledger.OK, status=200, model=parsed.model,
                            fingerprint=fingerprint, stream=parsed.request.stream,
                            prompt_tokens=stored.prompt_tokens, completion_tokens=stored.completion_tokens,
                            total_tokens=stored.total_tokens,
                            response=stored.body.decode() if ctx.idempotency_key else None, **lookup.fields())
        replayed = await self._commit_or_replay(ctx, entry)
        if replayed is not None:
            return Reply(replayed.response.encode(), {"idempotent-replayed": "true"})
        await self.cache.served(lookup)
        self._settle(admitted, self.cache.billable_hit_tokens(admitted.plan_id, stored.total_tokens))
        return Reply(stored.body, dict(admitted.headers, **lookup.headers))

    def _entry_id(self, ctx: RequestContext) -> UUID:
        if ctx.idempotency_key:
            return ledger.entry_id_for(ctx.key.id, ctx.idempotency_key)
        return new_uuid()

    async def _replayable(self, ctx: RequestContext, entry_id: UUID) -> LedgerEntry | None:
        """The committed answer of an earlier attempt with this Idempotency-Key, if any."""
        while (pending := self._inflight.get(entry_id)) is not None:
            try:
                await asyncio.wait_for(asyncio.shield(pending), timeout=INFLIGHT_WAIT_S)
            except TimeoutError:
                # an attempt that never finished (a stream whose client left before it began):
                # its claim is stale, take it over; the store's uniqueness still bills once
                if self._inflight.get(entry_id) is pending:
                    self._release(entry_id)
        # claim the key before the next await: concurrent attempts now wait for this one
        self._inflight[entry_id] = asyncio.get_running_loop().create_future()
        try:
            previous = await self._previous(entry_id)
        except BaseException:
            self._release(entry_id)
            raise
        if previous is None:
            return None
        self._release(entry_id)
        return previous

    async def _same_request(self, ctx: RequestContext, previous: LedgerEntry, model: str, fingerprint: str,
                            stream: bool) -> None:
        """A retry gets the first attempt's answer. Another request reusing its Idempotency-Key
        (a different body as the client sent it) is refused with a 409, recorded under an id of
        its own. An entry recorded before the client's own fingerprint was kept counts as a retry."""
        recorded = getattr(previous, "request_fingerprint", None)
        if recorded is None or recorded == ctx.request_fingerprint:
            ctx.outcome, ctx.entry_id, ctx.cache = "replayed", str(previous.id), "idempotent"
            return
        error = Conflict("this Idempotency-Key was already used with a different request body; "
                         "use a new key for a new request", param="Idempotency-Key", code="idempotency_key_reused")
        entry = self._entry(ctx, new_uuid(), None, outcome=ledger.IDEMPOTENCY_CONFLICT, status=error.status,
                            model=model, fingerprint=fingerprint, stream=stream, error=error.code)
        await self.batcher.commit(entry)
        raise error

    async def _commit_or_replay(self, ctx: RequestContext, entry: LedgerEntry.Recorded) -> LedgerEntry | None:
        try:
            await self.batcher.commit(entry)
            return None
        except IntegrityError:
            if not ctx.idempotency_key:
                raise
            previous = await self._previous(entry.originator_id)
            if previous is not None:
                await self._same_request(ctx, previous, entry.model, entry.fingerprint, entry.stream)
            ctx.outcome = "replayed"
            return previous

    def _release(self, entry_id: UUID) -> None:
        waiter = self._inflight.pop(entry_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- streamed ------------------------------------------------------------------------------

    async def stream(self, ctx: RequestContext, parsed: ParsedRequest) -> StreamReply:
        ctx.model = parsed.model
        if ctx.idempotency_key:
            ctx.request_fingerprint = ledger.fingerprint(parsed.canonical())
        lookup = await self.cache.prepare(ctx, parsed)
        parsed = lookup.parsed
        fingerprint = ledger.fingerprint(parsed.canonical())
        include_usage = bool(parsed.request.stream_options and parsed.request.stream_options.include_usage)
        entry_id = self._entry_id(ctx)
        if ctx.idempotency_key:
            previous = await self._replayable(ctx, entry_id)
            if previous is not None:
                await self._same_request(ctx, previous, parsed.model, fingerprint, True)
                return StreamReply(_frames(completion_as_chunks(_decode(previous.response), include_usage), ctx),
                                   {"idempotent-replayed": "true"})
        hit = None
        try:
            admitted = await self._admit(ctx, parsed, fingerprint)
            if await self.cache.find(lookup, admitted.plan_id) is not None:
                hit = await self._record_hit(ctx, parsed, admitted, entry_id, fingerprint, lookup)
            else:
                try:
                    manager, lines, route, permit = await self.router.open_stream(
                        parsed.model, parsed.messages, parsed.extra())
                except (UpstreamError, UpstreamUnavailable, UpstreamClientError) as error:
                    await self._record_failure(ctx, parsed, admitted, error, fingerprint, lookup)
                    raise
        except BaseException:
            self._release(entry_id)
            self.cache.release(lookup)
            raise
        if hit is not None:     # a cached answer, served as a stream
            self._release(entry_id)
            self.cache.release(lookup)
            return StreamReply(_frames(completion_as_chunks(_decode(hit.body), include_usage), ctx), hit.headers)
        frames = self._relay(ctx, parsed, admitted, entry_id, fingerprint, include_usage, manager, lines,
                             route, permit, lookup)
        return StreamReply(frames, dict(admitted.headers, **lookup.headers))

    async def _relay(self, ctx: RequestContext, parsed: ParsedRequest, admitted: Admitted, entry_id: UUID,
                     fingerprint: str, include_usage: bool, manager: Any, lines: AsyncIterator[str],
                     route: Any, permit: Any, lookup: Lookup) -> AsyncIterator[bytes]:
        assembler = StreamAssembler()
        held: list[bytes] = []      # the final chunks, sent only after the commit
        finished = False
        entry: LedgerEntry | None = None
        try:
            async for line in lines:
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                chunk = _decode(payload)
                assembler.add(chunk)
                frame = b"data: " + payload.encode() + b"\n\n"
                if chunk.get("usage") and not chunk.get("choices"):
                    if include_usage:
                        held.append(frame)
                elif any(c.get("finish_reason") for c in chunk.get("choices") or ()):
                    held.append(frame)
                else:
                    yield frame
            permit.success()
            finished = True
            prompt, completion, total = _usage({"usage": assembler.usage})
            usage_source = "upstream"
            if assembler.usage is None:   # an upstream that ignores include_usage
                prompt = estimate_prompt_tokens(parsed.messages)
                completion = assembler.estimated_completion_tokens()
                total, usage_source = prompt + completion, "estimated"
            entry = self._entry(ctx, entry_id, admitted, outcome=ledger.OK, status=200, model=parsed.model,
                                fingerprint=fingerprint, stream=True, prompt_tokens=prompt,
                                completion_tokens=completion, total_tokens=total,
                                upstream=f"{route.upstream.name}/{route.model}",
                                error=None if usage_source == "upstream" else "usage_estimated",
                                response=_encode(assembler.completion()).decode() if ctx.idempotency_key else None,
                                **lookup.fields())
            await self._commit_or_replay(ctx, entry)
            await self.cache.answered(lookup, entry_id, None, assembler.completion(), prompt, completion, total,
                                      fallback=route.upstream is not self.router.primary or route.model != parsed.model)
            self._settle(admitted, total)
            for frame in held:
                yield frame
            yield b"data: [DONE]\n\n"
            log_summary(ctx, 200)
        except UpstreamError as error:
            permit.failure()
            finished = True
            entry = self._partial(ctx, parsed, admitted, fingerprint, assembler, route, ledger.UPSTREAM_ERROR,
                                  502, error.code, lookup)
            await self.batcher.commit(entry)
            yield b"data: " + _encode({"error": {"message": error.message, "type": error.type,
                                                 "code": error.code, "param": None}}) + b"\n\n"
            log_summary(ctx, 502)
        finally:
            if not finished:
                # the client went away mid-stream: record what the upstream had produced so far
                permit.release()
                entry = self._partial(ctx, parsed, admitted, fingerprint, assembler, route,
                                      ledger.CLIENT_DISCONNECTED, 499, "client_disconnected", lookup)
                # no await here: a cancelled scope would cancel it again, so the rest runs detached
                task = asyncio.get_running_loop().create_task(self._after_disconnect(ctx, entry, manager))
                self._background.add(task)
                task.add_done_callback(self._background.discard)
            self._release(entry_id)
            self.cache.release(lookup)
            if finished:
                await manager.__aexit__(None, None, None)

    def _partial(self, ctx: RequestContext, parsed: ParsedRequest, admitted: Admitted, fingerprint: str,
                 assembler: StreamAssembler, route: Any, outcome: str, status: int, error: str | None,
                 lookup: Lookup) -> LedgerEntry.Recorded:
        prompt = estimate_prompt_tokens(parsed.messages)
        completion = assembler.estimated_completion_tokens()
        return self._entry(ctx, new_uuid(), admitted, outcome=outcome, status=status, model=parsed.model,
                           fingerprint=fingerprint, stream=True, prompt_tokens=prompt,
                           completion_tokens=completion, total_tokens=prompt + completion,
                           upstream=f"{route.upstream.name}/{route.model}", error=error, **lookup.fields())

    async def _after_disconnect(self, ctx: RequestContext, entry: LedgerEntry, manager: Any) -> None:
        try:
            await manager.__aexit__(None, None, None)
        except Exception as error:  # closing a broken upstream stream; nothing to recover
            log.debug("upstream_close_failed", error=type(error).__name__)
        try:
            await self.batcher.commit(entry)
        except Exception as error:  # nobody is waiting for this answer any more; say so in the log
            log.error("disconnect_record_failed", entry_id=str(entry.originator_id), error=type(error).__name__)
        else:
            log_summary(ctx, 499)

    def _settle(self, admitted: Admitted, tokens: int) -> None:
        """Count the tokens against the plan's token limit and hard cap, off the answer's path:
        the counters (Redis) matter for the next request, not for this one."""
        pending = admitted.settle(tokens) if admitted.settle is not None else None
        if pending is not None:
            task = asyncio.get_running_loop().create_task(pending)
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def drain(self) -> None:
        """Wait for detached recordings (on shutdown)."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)


def _usage(data: dict[str, Any]) -> tuple[int, int, int]:
    usage = data.get("usage") or {}
    prompt = int(usage.get("prompt_tokens") or 0)
    completion = int(usage.get("completion_tokens") or 0)
    return prompt, completion, int(usage.get("total_tokens") or prompt + completion)


async def _frames(frames: list[bytes], ctx: RequestContext) -> AsyncIterator[bytes]:
    for frame in frames:
        yield frame
    log_summary(ctx, 200)
