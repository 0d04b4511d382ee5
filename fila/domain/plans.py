"""Plans and plan assignments.

A ``Plan`` carries the commercial terms (price, included tokens, overage prices, rate limits,
cache settings, hard cap). Every edit is an ``Updated`` event naming what changed, and the
plan's version after it; a request records the plan id and version in force when it ran, so
a later edit never rewrites the past (``terms_of`` rebuilds the terms of any version).

An ``Assignment`` puts one API key on one plan from a start date (its billing anchor).
Status: active -> suspended -> active (reactivate), and either -> cancelled (final).
``change_plan`` switches the plan mid-cycle; the bill prorates it (see ``fila.domain.billing``).
The ids are deterministic (``uuid5`` of the plan's slug; of the key and its assignment
count) so a duplicate slug, or two concurrent "first" assignments of one key, collide in the
store instead of both being kept.
"""

from __future__ import annotations

import re
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any
from uuid import NAMESPACE_URL, UUID, uuid5

from eventsourcing.domain import Aggregate, event

from fila.domain.billing import CACHE_HIT_MODES, Terms
from fila.domain.errors import Conflict, InvalidRequest
from fila.domain.money import InvalidAmount, Money, UnitPrice
from fila.domain.time import iso, parse_iso

PLAN_NAMESPACE = uuid5(NAMESPACE_URL, "https://fila.dev/plan")
ASSIGNMENT_NAMESPACE = uuid5(NAMESPACE_URL, "https://fila.dev/assignment")

SLUG = re.compile(r"[a-z0-9_-]{1,64}")   # ASCII only: a slug goes in URLs
LIMIT_FIELDS = ("requests_per_minute", "requests_per_hour", "requests_per_day", "tokens_per_minute")
CACHE_LAYERS = ("response", "conversation", "context")
DEFAULT_CACHE_TTLS = {"response": 3600, "conversation": 86400, "context": 30 * 86400}

# every field of a plan's terms, with its default; the Created event carries all of them
TERM_DEFAULTS: dict[str, Any] = {
    "name": None, "description": "", "monthly_price_minor": 0, "currency": "USD", "included_tokens": 0,
    "input_price_per_million": "0", "output_price_per_million": "0",
    "requests_per_minute": None, "requests_per_hour": None, "requests_per_day": None,
    "tokens_per_minute": None, "cache_ttls": DEFAULT_CACHE_TTLS, "cache_hit_billing": "full",
    "cache_hit_fraction": "1", "hard_cap": False,
}
EDITABLE = frozenset(TERM_DEFAULTS)


def plan_id_for(slug: str) -> UUID:
    return uuid5(PLAN_NAMESPACE, slug)


def assignment_id_for(api_key_id: str, sequence: int) -> UUID:
    return uuid5(ASSIGNMENT_NAMESPACE, f"{api_key_id}\x1f{sequence}")


def _non_negative_int(field: str, value: Any, *, nullable: bool = False) -> int | None:
    if value is None and nullable:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"'{field}' must be an integer", param=field)
    if value < 0:
        raise InvalidRequest(f"'{field}' must not be negative", param=field)
    return value


def validate_terms(terms: dict[str, Any]) -> dict[str, Any]:
    """Check and normalise plan terms; a bad one is an InvalidRequest naming the field."""
    unknown = set(terms) - EDITABLE
    if unknown:
        field = sorted(unknown)[0]
        raise InvalidRequest(f"unknown plan field '{field}'", param=field)
    out = dict(terms)
    if "name" in out and (not isinstance(out["name"], str) or not out["name"].strip()):
        raise InvalidRequest("'name' must be a non-empty string", param="name")
    if "description" in out and not isinstance(out["description"], str):
        raise InvalidRequest("'description' must be a string", param="description")
    for field in ("monthly_price_minor", "included_tokens"):
        if field in out:
            _non_negative_int(field, out[field])
    for field in LIMIT_FIELDS:
        if field in out:
            value = _non_negative_int(field, out[field], nullable=True)
            if value == 0:
                raise InvalidRequest(f"'{field}' must be at least 1 (null for no limit)", param=field)
    currency = out.get("currency", "USD")
    try:
        Money(0, currency)
    except (InvalidAmount, ValueError, TypeError):
        raise InvalidRequest("'currency' must be three upper-case letters, e.g. USD", param="currency") from None
    for field in ("input_price_per_million", "output_price_per_million"):
        if field in out:
            if not isinstance(out[field], (str, int)) or isinstance(out[field], bool):
                raise InvalidRequest(f"'{field}' must be a decimal string such as \"0.10\" (never a float)",
                                     param=field)
            try:
                out[field] = UnitPrice.parse(str(out[field]), currency).to_str()
            except (InvalidAmount, ValueError, TypeError) as error:
                raise InvalidRequest(f"'{field}' must be a non-negative decimal string such as \"0.10\" "
                                     f"(price per million tokens): {error}", param=field) from None
    if "cache_hit_billing" in out and out["cache_hit_billing"] not in CACHE_HIT_MODES:
        raise InvalidRequest(f"'cache_hit_billing' must be one of {', '.join(CACHE_HIT_MODES)}",
                             param="cache_hit_billing")
    if "cache_hit_fraction" in out:
        try:
            fraction = Decimal(str(out["cache_hit_fraction"]))
        except InvalidOperation:
            fraction = Decimal(-1)
        if isinstance(out["cache_hit_fraction"], float) or not fraction.is_finite() or not 0 <= fraction <= 1:
            raise InvalidRequest("'cache_hit_fraction' must be a decimal string between 0 and 1",
                                 param="cache_hit_fraction")
        out["cache_hit_fraction"] = str(fraction)
    if "cache_ttls" in out:
        ttls = out["cache_ttls"]
        if not isinstance(ttls, dict) or set(ttls) - set(CACHE_LAYERS):
            raise InvalidRequest(f"'cache_ttls' must be an object with keys among {', '.join(CACHE_LAYERS)}",
                                 param="cache_ttls")
        for layer, seconds in ttls.items():
            _non_negative_int(f"cache_ttls.{layer}", seconds)
        out["cache_ttls"] = dict(DEFAULT_CACHE_TTLS, **ttls)
    if "hard_cap" in out and not isinstance(out["hard_cap"], bool):
        raise InvalidRequest("'hard_cap' must be true or false", param="hard_cap")
    return out


class Plan(Aggregate):
    TOPIC = "fila:Plan"

    class Event(Aggregate.Event):
        pass

    class Created(Event, Aggregate.Created):
        TOPIC = "fila:Plan.Created"

    @event("Defined", topic="fila:Plan.Defined")
    def __init__(self, id: UUID, slug: str, terms: dict, at: str) -> None:
        self.slug = slug
        self.terms = dict(terms)
        self.active = True
        self.created_at = at
        self.updated_at = at
        self.deleted = False

    @classmethod
    def define(cls, slug: str, terms: dict[str, Any], at: datetime) -> Plan:
        if not isinstance(slug, str) or not SLUG.fullmatch(slug):
            raise InvalidRequest("'slug' must be 1-64 lower-case letters, digits, '-' or '_'", param="slug")
        clean = validate_terms(terms)
        if not clean.get("name"):
            raise InvalidRequest("'name' is required", param="name")
        full = {**TERM_DEFAULTS, **clean}
        return cls(id=plan_id_for(slug), slug=slug, terms=full, at=iso(at))

    def update(self, changes: dict[str, Any], at: datetime) -> dict[str, Any]:
        self._check_not_deleted()
        clean = validate_terms(changes)
        changed = {k: v for k, v in clean.items() if self.terms.get(k) != v}
        if changed:
            self._updated(changes=changed, at=iso(at))
        return changed

    @event("Updated", topic="fila:Plan.Updated")
    def _updated(self, changes: dict, at: str) -> None:
        self.terms = {**self.terms, **changes}
        self.updated_at = at

    def activate(self, at: datetime) -> None:
        self._check_not_deleted()
        if not self.active:
            self._activated(at=iso(at))

    @event("Activated", topic="fila:Plan.Activated")
    def _activated(self, at: str) -> None:
        self.active = True
        self.updated_at = at

    def deactivate(self, at: datetime) -> None:
        self._check_not_deleted()
        if self.active:
            self._deactivated(at=iso(at))

    @event("Deactivated", topic="fila:Plan.Deactivated")
    def _deactivated(self, at: str) -> None:
        self.active = False
        self.updated_at = at

    def delete(self, ever_assigned: bool, at: datetime) -> None:
        self._check_not_deleted()
        if ever_assigned:
            raise Conflict("a plan that was ever assigned cannot be deleted; deactivate it instead",
                           code="plan_in_use")
        self._deleted(at=iso(at))

    @event("Deleted", topic="fila:Plan.Deleted")
    def _deleted(self, at: str) -> None:
        self.deleted = True
        self.active = False
        self.updated_at = at

    def _check_not_deleted(self) -> None:
        if self.deleted:
            raise Conflict(f"plan '{self.slug}' was deleted", code="plan_deleted")


def terms_of(plan_id: str, slug: str, version: int, terms: dict[str, Any]) -> Terms:
    """The billing terms of one version of a plan."""
    currency = terms["currency"]
    return Terms(plan_id=plan_id, plan_slug=slug, plan_version=version,
                 monthly_price=Money(terms["monthly_price_minor"], currency),
                 included_tokens=terms["included_tokens"],
                 input_price=UnitPrice.parse(terms["input_price_per_million"], currency),
                 output_price=UnitPrice.parse(terms["output_price_per_million"], currency),
                 cache_hit_billing=terms["cache_hit_billing"],
                 cache_hit_fraction=Decimal(terms["cache_hit_fraction"]))


ACTIVE, SUSPENDED, CANCELLED = "active", "suspended", "cancelled"


class Assignment(Aggregate):
    TOPIC = "fila:Assignment"

    class Event(Aggregate.Event):
        pass

    class Created(Event, Aggregate.Created):
        TOPIC = "fila:Assignment.Created"

    @event("Assigned", topic="fila:Assignment.Assigned")
    def __init__(self, id: UUID, api_key_id: str, plan_id: str, starts_at: str, ends_at: str | None,
                 at: str) -> None:
        self.api_key_id = api_key_id
        self.plan_id = plan_id
        self.starts_at = starts_at
        self.ends_at = ends_at
        self.status = ACTIVE
        self.reason: str | None = None
        self.plan_history = [[plan_id, starts_at]]
        self.updated_at = at

    @classmethod
    def assign(cls, assignment_id: UUID, api_key_id: str, plan_id: str, starts_at: datetime,
               ends_at: datetime | None, at: datetime) -> Assignment:
        if ends_at is not None and ends_at <= starts_at:
            raise InvalidRequest("'ends_at' must be after 'starts_at'", param="ends_at")
        return cls(id=assignment_id, api_key_id=api_key_id, plan_id=plan_id, starts_at=iso(starts_at),
                   ends_at=iso(ends_at) if ends_at else None, at=iso(at))

    def suspend(self, reason: str, at: datetime) -> None:
        if self.status != ACTIVE:
            raise Conflict(f"only an active assignment can be suspended (it is {self.status})",
                           code="invalid_transition", param="status")
        self._suspended(reason=reason, at=iso(at))

    @event("Suspended", topic="fila:Assignment.Suspended")
    def _suspended(self, reason: str, at: str) -> None:
        self.status = SUSPENDED
        self.reason = reason
        self.updated_at = at

    def reactivate(self, at: datetime) -> None:
        if self.status == CANCELLED:
            raise Conflict("a cancelled assignment cannot be reactivated; create a new one",
                           code="invalid_transition", param="status")
        if self.status == ACTIVE:
            raise Conflict("the assignment is already active", code="invalid_transition", param="status")
        self._reactivated(at=iso(at))

    @event("Reactivated", topic="fila:Assignment.Reactivated")
    def _reactivated(self, at: str) -> None:
        self.status = ACTIVE
        self.reason = None
        self.updated_at = at

    def cancel(self, reason: str, at: datetime) -> None:
        if self.status == CANCELLED:
            raise Conflict("the assignment is already cancelled", code="invalid_transition", param="status")
        self._cancelled(reason=reason, at=iso(at))

    @event("Cancelled", topic="fila:Assignment.Cancelled")
    def _cancelled(self, reason: str, at: str) -> None:
        self.status = CANCELLED
        self.reason = reason
        self.updated_at = at

    def change_plan(self, plan_id: str, effective_at: datetime, at: datetime) -> None:
        if self.status == CANCELLED:
            raise Conflict("a cancelled assignment cannot change plan", code="invalid_transition", param="status")
        if plan_id == self.plan_id:
            raise Conflict("the assignment is already on that plan", code="same_plan", param="plan")
        if effective_at < parse_iso(self.plan_history[-1][1]):
            raise InvalidRequest("'effective_at' must not be before the last plan change", param="effective_at")
        self._plan_changed(from_plan_id=self.plan_id, to_plan_id=plan_id, effective_at=iso(effective_at),
                           at=iso(at))

    @event("PlanChanged", topic="fila:Assignment.PlanChanged")
    def _plan_changed(self, from_plan_id: str, to_plan_id: str, effective_at: str, at: str) -> None:
        self.plan_id = to_plan_id
        self.plan_history = [*self.plan_history, [to_plan_id, effective_at]]
        self.updated_at = at

    def update(self, ends_at: datetime | None, at: datetime) -> None:
        if self.status == CANCELLED:
            raise Conflict("a cancelled assignment cannot be changed", code="invalid_transition", param="status")
        if ends_at is not None and ends_at <= parse_iso(self.starts_at):
            raise InvalidRequest("'ends_at' must be after 'starts_at'", param="ends_at")
        self._updated(ends_at=iso(ends_at) if ends_at else None, at=iso(at))

    @event("Updated", topic="fila:Assignment.Updated")
    def _updated(self, ends_at: str | None, at: str) -> None:
        self.ends_at = ends_at
        self.updated_at = at
