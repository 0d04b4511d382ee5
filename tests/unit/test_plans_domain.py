"""Plan and Assignment rules (fila.domain.plans), plan_in_force and terms_of: no store, no server."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from uuid import uuid4

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fila.domain.errors import Conflict, InvalidRequest
from fila.domain.money import Money, UnitPrice
from fila.domain.plans import (
    ACTIVE, CANCELLED, LIMIT_FIELDS, SUSPENDED, TERM_DEFAULTS, Assignment, Plan, assignment_id_for, plan_id_for,
    terms_of, validate_terms,
)
from fila.projections.planbook import AssignmentRecord
from fila.services.admission import plan_in_force

T0 = datetime(2026, 1, 15, 12, 0, tzinfo=UTC)


def plan(slug: str = "basic", **terms: object) -> Plan:
    return Plan.define(slug, {"name": "Basic", **terms}, T0)


def assignment(starts_at: datetime = T0, ends_at: datetime | None = None) -> Assignment:
    return Assignment.assign(assignment_id_for("key-1", 0), "key-1", str(plan_id_for("basic")), starts_at,
                             ends_at, T0)


def field_of(error: pytest.ExceptionInfo) -> str | None:
    return error.value.param


# -- plans -----------------------------------------------------------------------------------------


def test_define_fills_every_term_and_derives_the_id_from_the_slug() -> None:
    p = plan(monthly_price_minor=1900, requests_per_minute=60)
    assert p.id == plan_id_for("basic") and p.slug == "basic" and p.active and not p.deleted
    assert set(p.terms) == set(TERM_DEFAULTS)
    assert p.terms["monthly_price_minor"] == 1900 and p.terms["requests_per_minute"] == 60
    assert p.terms["requests_per_hour"] is None and p.terms["hard_cap"] is False
    assert plan().id == plan("basic").id != plan("pro").id      # one slug, one id: duplicates collide


@pytest.mark.parametrize("slug", ["", "Basic", "has space", "dot.ted", "x" * 65, "ünï", None, 7])
def test_slug_format(slug: object) -> None:
    with pytest.raises(InvalidRequest) as error:
        Plan.define(slug, {"name": "x"}, T0)  # type: ignore[arg-type]
    assert field_of(error) == "slug"


@pytest.mark.parametrize("slug", ["a", "free", "pro-2026", "team_b", "x" * 64, "0"])
def test_good_slugs(slug: str) -> None:
    assert Plan.define(slug, {"name": "x"}, T0).slug == slug


def test_name_is_required() -> None:
    with pytest.raises(InvalidRequest) as error:
        Plan.define("nameless", {}, T0)
    assert field_of(error) == "name"


@pytest.mark.parametrize(("field", "value"), [
    ("monthly_price_minor", -1), ("included_tokens", -5), ("requests_per_minute", -1),
    ("requests_per_hour", -100), ("requests_per_day", -1), ("tokens_per_minute", -1),
    ("input_price_per_million", "-0.10"), ("output_price_per_million", "-1"), ("cache_ttls", {"response": -1}),
])
def test_negative_prices_and_limits_are_refused_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(InvalidRequest) as error:
        plan(**{field: value})
    assert field_of(error) in (field, f"cache_ttls.{next(iter(value))}" if isinstance(value, dict) else field)


@pytest.mark.parametrize("field", LIMIT_FIELDS)
def test_a_zero_limit_is_refused_null_means_unlimited(field: str) -> None:
    with pytest.raises(InvalidRequest) as error:
        plan(**{field: 0})
    assert field_of(error) == field and "null" in error.value.message
    assert plan(**{field: None}).terms[field] is None
    assert plan(**{field: 1}).terms[field] == 1


@pytest.mark.parametrize(("field", "value"), [
    ("monthly_price_minor", 19.0), ("monthly_price_minor", 19.5), ("input_price_per_million", 0.1),
    ("output_price_per_million", 1.0), ("cache_hit_fraction", 0.5), ("included_tokens", 1e6),
    ("monthly_price_minor", True), ("requests_per_minute", "60"),
])
def test_floats_and_other_wrong_types_are_refused(field: str, value: object) -> None:
    with pytest.raises(InvalidRequest) as error:
        plan(**{field: value})
    assert field_of(error) == field


def test_prices_are_decimal_strings_normalised() -> None:
    p = plan(input_price_per_million="0.1", output_price_per_million=2, cache_hit_fraction="0.50")
    assert p.terms["input_price_per_million"] == "0.10" and p.terms["output_price_per_million"] == "2.00"
    assert Decimal(p.terms["cache_hit_fraction"]) == Decimal("0.5")


def test_unknown_terms_are_refused_naming_the_field() -> None:
    with pytest.raises(InvalidRequest) as error:
        plan(colour="blue")
    assert field_of(error) == "colour"
    with pytest.raises(InvalidRequest) as error:
        validate_terms({"slug": "renamed"})        # the slug is not a term: it can never change
    assert field_of(error) == "slug"


@given(field=st.sampled_from(["monthly_price_minor", "included_tokens", *LIMIT_FIELDS]),
       value=st.integers(max_value=-1))
def test_any_negative_integer_term_is_refused_naming_it(field: str, value: int) -> None:
    with pytest.raises(InvalidRequest) as error:
        validate_terms({field: value})
    assert field_of(error) == field


def test_update_records_only_what_changed() -> None:
    p = plan(monthly_price_minor=1900, requests_per_minute=60, input_price_per_million="0.20")
    p.collect_events()
    changed = p.update({"monthly_price_minor": 1900, "requests_per_minute": 120,
                        "input_price_per_million": "0.2"}, T0 + timedelta(days=1))
    assert changed == {"requests_per_minute": 120}
    events = p.collect_events()
    assert len(events) == 1 and type(events[0]).__name__ == "Updated"
    assert events[0].changes == {"requests_per_minute": 120}
    assert p.version == 2 and p.terms["requests_per_minute"] == 120 and p.terms["monthly_price_minor"] == 1900
    assert p.update({"requests_per_minute": 120}, T0) == {} and p.collect_events() == []
    with pytest.raises(InvalidRequest) as error:
        p.update({"requests_per_minute": -1}, T0)
    assert field_of(error) == "requests_per_minute" and p.terms["requests_per_minute"] == 120


def test_activate_and_deactivate_record_only_real_changes() -> None:
    p = plan()
    p.collect_events()
    p.activate(T0)
    assert p.collect_events() == []
    p.deactivate(T0)
    p.deactivate(T0)
    assert [type(e).__name__ for e in p.collect_events()] == ["Deactivated"] and not p.active
    p.activate(T0)
    assert p.active


def test_delete_is_refused_when_ever_assigned() -> None:
    p = plan()
    with pytest.raises(Conflict) as error:
        p.delete(ever_assigned=True, at=T0)
    assert error.value.code == "plan_in_use" and "deactivate" in error.value.message
    assert not p.deleted
    p.delete(ever_assigned=False, at=T0)
    assert p.deleted and not p.active


@pytest.mark.parametrize("change", [
    lambda p: p.update({"included_tokens": 1}, T0), lambda p: p.activate(T0), lambda p: p.deactivate(T0),
    lambda p: p.delete(False, T0),
])
def test_a_deleted_plan_refuses_changes(change) -> None:
    p = plan()
    p.delete(ever_assigned=False, at=T0)
    p.collect_events()
    with pytest.raises(Conflict) as error:
        change(p)
    assert error.value.code == "plan_deleted" and p.collect_events() == []


# -- terms_of --------------------------------------------------------------------------------------


def test_terms_of_builds_billing_terms_of_a_version() -> None:
    p = plan(monthly_price_minor=1900, currency="EUR", included_tokens=2_000_000, input_price_per_million="0.20",
             output_price_per_million="0.80", cache_hit_billing="fraction", cache_hit_fraction="0.25")
    terms = terms_of(str(p.id), p.slug, 3, p.terms)
    assert terms.plan_id == str(p.id) and terms.plan_slug == "basic" and terms.plan_version == 3
    assert terms.monthly_price == Money(1900, "EUR") and terms.included_tokens == 2_000_000
    assert terms.input_price == UnitPrice.parse("0.20", "EUR") and terms.output_price == UnitPrice.parse("0.8", "EUR")
    assert terms.cache_hit_billing == "fraction" and terms.cache_hit_fraction == Decimal("0.25")
    assert terms.billable(1000, cache_hit=True) == 250 and terms.billable(1000, cache_hit=False) == 1000
    assert terms_of(str(p.id), p.slug, 1, plan().terms).monthly_price == Money(0, "USD")


# -- assignments -------------------------------------------------------------------------------------


def test_assign_and_the_end_must_follow_the_start() -> None:
    a = assignment(ends_at=T0 + timedelta(days=30))
    assert a.status == ACTIVE and a.plan_history == [[a.plan_id, a.starts_at]]
    for end in (T0, T0 - timedelta(seconds=1)):
        with pytest.raises(InvalidRequest) as error:
            assignment(ends_at=end)
        assert field_of(error) == "ends_at"
    with pytest.raises(InvalidRequest) as error:
        a.update(T0 - timedelta(days=1), T0)
    assert field_of(error) == "ends_at"
    a.update(None, T0)
    assert a.ends_at is None


def test_suspend_reactivate_cancel_transitions() -> None:
    a = assignment()
    a.suspend("unpaid", T0)
    assert a.status == SUSPENDED and a.reason == "unpaid"
    with pytest.raises(Conflict) as error:
        a.suspend("again", T0)
    assert error.value.code == "invalid_transition" and field_of(error) == "status"
    a.reactivate(T0)
    assert a.status == ACTIVE and a.reason is None
    with pytest.raises(Conflict):
        a.reactivate(T0)                     # already active
    a.suspend("again", T0)
    a.cancel("closed", T0)
    assert a.status == CANCELLED and a.reason == "closed"
    with pytest.raises(Conflict):
        a.cancel("twice", T0)
    assert [type(e).__name__ for e in a.collect_events()] == [
        "Assigned", "Suspended", "Reactivated", "Suspended", "Cancelled"]


def test_a_cancelled_assignment_cannot_be_reactivated_or_changed() -> None:
    a = assignment()
    a.cancel("gone", T0)
    a.collect_events()
    for change in (lambda: a.reactivate(T0), lambda: a.change_plan(str(uuid4()), T0, T0),
                   lambda: a.update(None, T0), lambda: a.suspend("x", T0)):
        with pytest.raises(Conflict) as error:
            change()
        assert field_of(error) == "status"
    assert a.status == CANCELLED and a.collect_events() == []


def test_change_plan_rules() -> None:
    a = assignment()
    with pytest.raises(Conflict) as error:
        a.change_plan(a.plan_id, T0 + timedelta(days=1), T0)
    assert error.value.code == "same_plan" and field_of(error) == "plan"
    pro, team = str(plan_id_for("pro")), str(plan_id_for("team"))
    a.change_plan(pro, T0 + timedelta(days=10), T0)
    assert a.plan_id == pro and [p for p, _ in a.plan_history] == [str(plan_id_for("basic")), pro]
    with pytest.raises(InvalidRequest) as error:
        a.change_plan(team, T0 + timedelta(days=9), T0)       # before the last change
    assert field_of(error) == "effective_at"
    a.suspend("x", T0)
    a.change_plan(team, T0 + timedelta(days=10), T0)          # a suspended assignment may change plan
    assert a.plan_id == team


def test_plan_in_force_follows_the_effective_times() -> None:
    basic, pro = str(plan_id_for("basic")), str(plan_id_for("pro"))
    later = T0 + timedelta(days=10)
    record = AssignmentRecord(id="a", api_key_id="k", plan_id=pro, starts_at=T0.isoformat(), ends_at=None,
                              status=ACTIVE, created_at=T0.isoformat(), updated_at=T0.isoformat(), version=2,
                              plan_history=[[basic, T0.isoformat()], [pro, later.isoformat()]])
    assert plan_in_force(record, T0) == basic
    assert plan_in_force(record, later - timedelta(microseconds=1)) == basic   # a future change is not in force
    assert plan_in_force(record, later) == pro
    assert plan_in_force(record, later + timedelta(days=100)) == pro
    assert plan_in_force(record, T0 - timedelta(days=1)) == basic              # before the start: the first plan


def test_assignment_ids_are_deterministic_per_key_and_sequence() -> None:
    assert assignment_id_for("k", 0) == assignment_id_for("k", 0)
    assert len({assignment_id_for("k", 0), assignment_id_for("k", 1), assignment_id_for("j", 0)}) == 3
