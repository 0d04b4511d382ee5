"""Admission: the key's plan decides whether a request may run, and under which terms.

In order: the key must have an assignment that is active (else 403, recorded); the plan in
force at the request's time gives the rate limits (else 429 with Retry-After and OpenAI's
``x-ratelimit-*`` headers, recorded with the rule and counts); a plan with ``hard_cap`` on
refuses with 429 ``insufficient_quota`` once the cycle's included tokens are spent. Without a
hard cap nothing is blocked on tokens: usage past the allowance is overage on the bill.

Everything here reads memory (the PlanBook) and at most one Redis script; no database.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from redis.exceptions import RedisError

from fila.adapters.ratelimit import Limits, LocalLimiter, RateLimiter
from fila.domain.cycles import cycle_for
from fila.domain.errors import Forbidden, RateLimited
from fila.domain.plans import ACTIVE, LIMIT_FIELDS
from fila.domain.time import parse_iso
from fila.projections.planbook import AssignmentRecord, PlanBook, PlanRecord
from fila.projections.registry import KeyRecord
from fila.services.gateway import Admitted


def plan_in_force(assignment: AssignmentRecord, now: datetime) -> str:
    """The plan of the last change effective at or before ``now``."""
    current = assignment.plan_history[0][0]
    for plan_id, effective_at in assignment.plan_history:
        if parse_iso(effective_at) <= now:
            current = plan_id
    return current


class CycleTokens:
    """Tokens used in an assignment's current cycle, for hard caps: Redis, or memory without it."""

    TTL_S = 40 * 86400

    def __init__(self, redis: Any | None, prefix: str = "fila:cycle") -> None:
        self.redis = redis
        self.prefix = prefix
        self.local: dict[str, int] = {}

    def _key(self, assignment_id: str, cycle_start: datetime) -> str:
        return f"{self.prefix}:{assignment_id}:{int(cycle_start.timestamp())}"

    async def used(self, assignment_id: str, cycle_start: datetime) -> int:
        key = self._key(assignment_id, cycle_start)
        if self.redis is not None:
            try:
                async with asyncio.timeout(0.25):
                    value = await self.redis.get(key)
                return int(value or 0)
            except (RedisError, OSError):
                pass
        return self.local.get(key, 0)

    async def add(self, assignment_id: str, cycle_start: datetime, tokens: int) -> None:
        key = self._key(assignment_id, cycle_start)
        self.local[key] = self.local.get(key, 0) + tokens
        if self.redis is not None:
            try:
                async with asyncio.timeout(0.25):
                    await self.redis.incrby(key, tokens)
                    await self.redis.expire(key, self.TTL_S)
            except (RedisError, OSError):
                pass


class PlanAdmission:
    def __init__(self, book: PlanBook, limiter: RateLimiter | None, cycle_tokens: CycleTokens,
                 clock: Callable[[], float] = time.time,
                 refresh: Callable[[], Awaitable[None]] | None = None) -> None:
        self.book = book
        self.refresh = refresh    # reads the log now (the book follows it by polling)
        self.limiter = limiter
        self.local = LocalLimiter(clock)
        self.cycle_tokens = cycle_tokens
        self._limits: dict[tuple[str, int], Limits] = {}

    def limits_of(self, plan: PlanRecord) -> Limits:
        limits = self._limits.get((plan.id, plan.version))
        if limits is None:
            limits = Limits(**{name: plan.terms.get(name) for name in LIMIT_FIELDS})
            self._limits[(plan.id, plan.version)] = limits
        return limits

    def overlap_plan(self, key: KeyRecord, now: datetime) -> str | None:
        """The plan in force, when this request may go upstream while its rate-limit check is
        on its way: the assignment is active and in force, the plan has no hard cap, and the
        limiter last saw every window far from full (``RateLimiter.roomy``). Otherwise None:
        admit first, as usual. The check decides either way; overlapping only hides its round
        trip behind the upstream's, at the price of a cancelled upstream call on the rare
        refusal that the last answer did not foresee (another process used the room)."""
        if self.limiter is None or self.limiter.reserved(key.id):   # a reserved slot needs no round trip
            return None
        assignment = self.book.current_assignment(key.id)
        if assignment is None or assignment.status != ACTIVE:
            return None
        if now < parse_iso(assignment.starts_at) or (assignment.ends_at and now >= parse_iso(assignment.ends_at)):
            return None
        plan = self.book.plans[plan_in_force(assignment, now)]
        if plan.terms.get("hard_cap") or not self.limiter.roomy(key.id, self.limits_of(plan)):
            return None
        return plan.id

    async def admit(self, key: KeyRecord, request: Any, now: datetime) -> Admitted:
        assignment = self.book.current_assignment(key.id)
        if assignment is None and self.refresh is not None:
            # another process may have assigned it a moment ago (a key issued with a plan is two
            # commits, and this process may have read the log between them): read it once more
            await self.refresh()
            assignment = self.book.current_assignment(key.id)
        if assignment is None:
            raise Forbidden("this API key is not assigned to any plan", code="no_active_plan")
        if assignment.status != ACTIVE:
            raise _refusal(Forbidden(f"this API key's plan assignment is {assignment.status}",
                                     code=f"assignment_{assignment.status}"), assignment, None)
        starts_at = parse_iso(assignment.starts_at)
        if now < starts_at or (assignment.ends_at and now >= parse_iso(assignment.ends_at)):
            raise _refusal(Forbidden("this API key's plan assignment is not in force now",
                                     code="assignment_not_in_force"), assignment, None)
        plan = self.book.plans[plan_in_force(assignment, now)]
        limits = self.limits_of(plan)
        if self.limiter is not None:
            decision = await self.limiter.check(key.id, limits)
        else:
            decision = self.local.check(key.id, limits)
        if not decision.allowed:
            refusal = RateLimited(f"Rate limit reached for {decision.rule} on plan '{plan.slug}'",
                                  retry_after=decision.retry_after_s or 1.0, headers=decision.headers())
            refusal.rule, refusal.counts = decision.rule, decision.counts
            raise _refusal(refusal, assignment, plan)
        cycle_start = None
        if plan.terms.get("hard_cap"):
            cycle_start = cycle_for(starts_at, now).start
            used = await self.cycle_tokens.used(assignment.id, cycle_start)
            included = plan.terms["included_tokens"]
            if used >= included:
                refusal = RateLimited(f"You exceeded the {included} tokens included in plan '{plan.slug}' "
                                      "for this billing cycle (the plan has a hard cap).",
                                      retry_after=(cycle_for(starts_at, now).end - now).total_seconds(),
                                      headers=decision.headers(), code="insufficient_quota")
                refusal.type = "insufficient_quota"
                refusal.rule, refusal.counts = "hard_cap", {"cycle_tokens": used, "included_tokens": included}
                raise _refusal(refusal, assignment, plan)
        settle = None
        if limits.tokens_per_minute is not None or cycle_start is not None:
            settle = self._settler(key.id, limits, assignment.id, cycle_start)
        return Admitted(plan_id=plan.id, plan_version=plan.version, assignment_id=assignment.id,
                        headers=decision.headers(), settle=settle)

    def _settler(self, key_id: str, limits: Limits, assignment_id: str, cycle_start: datetime | None):
        def settle(tokens: int) -> Awaitable[None] | None:
            """Count a finished request's tokens; the token limit's share is only queued (no
            task per request), the hard cap's count is returned to be awaited off the answer."""
            if limits.tokens_per_minute is not None:
                if self.limiter is not None:
                    self.limiter.count_tokens(key_id, tokens, limits)
                else:
                    self.local.add_tokens(key_id, tokens)
            if cycle_start is not None:
                return self.cycle_tokens.add(assignment_id, cycle_start, tokens)
            return None
        return settle


def _refusal(error: Any, assignment: AssignmentRecord, plan: PlanRecord | None) -> Any:
    error.assignment_id = assignment.id
    error.plan_id = plan.id if plan else None
    return error
