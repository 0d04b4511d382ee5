"""The bill of one cycle (fila.domain.billing)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import given, settings, strategies as st

from fila.domain.billing import CycleBill, Line, Terms, Usage
from fila.domain.cycles import Period
from fila.domain.money import CurrencyMismatch, InvalidAmount, Money, UnitPrice

APRIL = Period(datetime(2024, 4, 1, tzinfo=UTC), datetime(2024, 5, 1, tzinfo=UTC))  # 30 days
HALFWAY = datetime(2024, 4, 16, tzinfo=UTC)


def terms(slug: str = "basic", *, version: int = 1, monthly: int = 1000, included: int = 1000,
          input_price: str = "2.00", output_price: str = "4.00", cache: str = "full",
          fraction: str = "1", currency: str = "USD") -> Terms:
    return Terms(f"plan-{slug}", slug, version, Money(monthly, currency), included,
                 UnitPrice.parse(input_price, currency), UnitPrice.parse(output_price, currency),
                 cache, Decimal(fraction))


BASIC = terms()
PRO = terms("pro", monthly=3000, included=3000, input_price="1.00", output_price="2.00")


def at(day: int, hour: int = 0) -> datetime:
    return datetime(2024, 4, day, hour, tzinfo=UTC)


def usage(n: int, when: datetime, input_tokens: int, output_tokens: int, cache_hit: bool = False) -> Usage:
    return Usage(f"e{n}", when, input_tokens, output_tokens, cache_hit)


def bill_with(t: Terms = BASIC, period: Period = APRIL) -> CycleBill:
    bill = CycleBill(period, t.currency)
    bill.set_terms(t, period.start)
    return bill


def kinds(bill: CycleBill) -> list[tuple[str, int, int]]:
    return [(line.kind, line.quantity, line.amount.amount_minor) for line in bill.lines()]


# -- single plan ---------------------------------------------------------------------------------

def test_within_the_allowance_the_bill_is_the_monthly_price() -> None:
    bill = bill_with()
    bill.add(usage(1, at(2), 400, 300), BASIC)
    bill.add(usage(2, at(3), 200, 100), BASIC)
    assert kinds(bill) == [("base", 1, 1000)]
    assert bill.total() == Money(1000)
    assert (bill.requests, bill.input_tokens, bill.output_tokens, bill.included_used) == (2, 600, 400, 1000)
    assert bill.included_tokens == 1000 and bill.included_remaining == 0
    assert bill.lines()[0].description == "basic v1 base fee 2024-04-01 00:00 to 2024-05-01 00:00 UTC"


def test_input_consumes_the_allowance_before_output_and_requests_in_order() -> None:
    bill = bill_with()
    first = bill.add(usage(1, at(2), 700, 100), BASIC)
    second = bill.add(usage(2, at(3), 150, 500), BASIC)
    assert (first.included_input_tokens, first.included_output_tokens) == (700, 100)
    assert (second.included_input_tokens, second.included_output_tokens) == (150, 50)
    assert (second.overage_input_tokens, second.overage_output_tokens) == (0, 450)
    assert second.overage_output_cost == Decimal("0.0018")  # 450 x 4.00 / 1M
    assert (second.included_used, second.included_remaining) == (1000, 0)
    third = bill.add(usage(3, at(4), 1000, 1000), BASIC)
    assert (third.overage_input_tokens, third.overage_output_tokens) == (1000, 1000)
    assert (bill.overage_input_tokens, bill.overage_output_tokens) == (1000, 1450)
    # output 1450 x 4.00/1M = 0.0058 -> 0.01; input 1000 x 2.00/1M = 0.002 -> 0.00 (lines in first-seen order)
    assert kinds(bill) == [("base", 1, 1000), ("overage_output", 1450, 1), ("overage_input", 1000, 0)]
    assert third.total == bill.total() == Money(1001)


def test_an_allowance_split_inside_a_request() -> None:
    bill = bill_with()
    out = bill.add(usage(1, at(2), 1200, 300), BASIC)
    assert (out.included_input_tokens, out.included_output_tokens) == (1000, 0)
    assert (out.overage_input_tokens, out.overage_output_tokens) == (200, 300)
    assert out.overage_input_cost == Decimal("0.0004") and out.overage_output_cost == Decimal("0.0012")


def test_each_line_is_rounded_once_not_per_request() -> None:
    t = terms(included=0, input_price="2.50", output_price="4.00")
    bill = bill_with(t)
    for n in range(2):  # 2 x 1000 x 2.50/1M = 0.005 -> 0.01 (half-up); per request: 0.0025 -> 0.00 each
        bill.add(usage(n, at(2), 1000, 0), t)
    for n in range(3):  # 3 x 1000 x 4.00/1M = 0.012 -> 0.01; per request 0.004 -> 0.00 each
        bill.add(usage(10 + n, at(3), 0, 1000), t)
    assert kinds(bill) == [("base", 1, 1000), ("overage_input", 2000, 1), ("overage_output", 3000, 1)]
    assert bill.total() == Money(1002)


def test_a_plan_edit_never_reprices_past_requests() -> None:
    v1 = terms(included=0)
    bill = bill_with(v1)
    bill.add(usage(1, at(2), 1_000_000, 0), v1)
    v2 = terms(version=2, included=0, input_price="3.00")  # edited plan, in force from now on
    bill.add(usage(2, at(20), 1_000_000, 0), v2)
    assert kinds(bill) == [("base", 1, 1000), ("overage_input", 1_000_000, 200), ("overage_input", 1_000_000, 300)]
    descriptions = [line.description for line in bill.lines()[1:]]
    assert descriptions == ["basic v1 input overage at 2.00 USD per 1M tokens",
                            "basic v2 input overage at 3.00 USD per 1M tokens"]


# -- cache hits ----------------------------------------------------------------------------------

@pytest.mark.parametrize("mode, fraction, billable", [
    ("full", "1", (1001, 501)), ("free", "1", (0, 0)), ("fraction", "0.5", (500, 250)),
    ("fraction", "0.1", (100, 50)), ("fraction", "0", (0, 0)), ("fraction", "1", (1001, 501)),
])
def test_cache_hit_billing_modes(mode: str, fraction: str, billable: tuple[int, int]) -> None:
    t = terms(included=0, cache=mode, fraction=fraction)
    bill = bill_with(t)
    out = bill.add(usage(1, at(2), 1001, 501, cache_hit=True), t)
    assert (out.billable_input_tokens, out.billable_output_tokens) == billable
    assert (bill.billable_input_tokens, bill.billable_output_tokens) == billable
    assert (bill.input_tokens, bill.output_tokens, bill.cache_hits) == (1001, 501, 1)
    miss = bill.add(usage(2, at(2), 1001, 501), t)  # a miss is always billed in full
    assert (miss.billable_input_tokens, miss.billable_output_tokens) == (1001, 501)


def test_fractional_cache_hits_round_down_per_request() -> None:
    t = terms(included=0, cache="fraction", fraction="0.5", input_price="1000000", output_price="0")
    bill = bill_with(t)
    for n in range(4):  # 3 tokens x 0.5 = 1.5 -> 1 per request, so 4 tokens, not 6
        bill.add(usage(n, at(2), 3, 0, cache_hit=True), t)
    assert bill.billable_input_tokens == 4 and bill.input_tokens == 12
    assert kinds(bill)[1] == ("overage_input", 4, 400)


def test_terms_validation() -> None:
    with pytest.raises(ValueError):
        terms(cache="sometimes")
    with pytest.raises(ValueError):
        terms(cache="fraction", fraction="1.5")
    with pytest.raises(ValueError):
        terms(cache="fraction", fraction="-0.1")
    with pytest.raises(ValueError):
        terms(monthly=-1)
    with pytest.raises(ValueError):
        terms(included=-1)
    with pytest.raises(InvalidAmount):
        terms(input_price="-1")
    with pytest.raises(CurrencyMismatch):
        replace(BASIC, input_price=UnitPrice.parse("1", "EUR"))
    with pytest.raises(ValueError):
        replace(BASIC, cache_hit_fraction=0.5)  # a float


# -- proration on a mid-cycle plan change --------------------------------------------------------

def test_upgrade_halfway_through_a_30_day_cycle() -> None:
    bill = bill_with(BASIC)
    before = bill.add(usage(1, at(10), 900, 300), BASIC)  # allowance 1000 as known now
    assert (before.overage_input_tokens, before.overage_output_tokens) == (0, 200)
    bill.set_terms(PRO, HALFWAY)
    assert bill.included_tokens == 2000  # 1000 x 1/2 + 3000 x 1/2
    after = bill.add(usage(2, at(20), 800, 400), PRO)  # 1000 used, 1000 left
    assert (after.included_input_tokens, after.included_output_tokens) == (800, 200)
    assert (after.overage_input_tokens, after.overage_output_tokens) == (0, 200)
    lines = bill.lines()
    assert [(l.kind, l.amount.amount_minor) for l in lines] == [
        ("base", 500), ("base", 1500), ("overage_output", 0), ("overage_output", 0)]
    assert "prorated 1296000/2592000 s" in lines[0].description
    assert lines[1].description.startswith("pro v1 base fee 2024-04-16 00:00 to 2024-05-01 00:00 UTC")
    assert bill.total() == Money(2000)
    assert [(p, t.plan_slug) for p, t in bill.segments()] == [
        (Period(APRIL.start, HALFWAY), "basic"), (Period(HALFWAY, APRIL.end), "pro")]


def test_proration_rounds_each_base_line_once() -> None:
    bill = bill_with(terms(monthly=1000, included=1000))
    bill.set_terms(terms("pro", monthly=2000, included=1001), at(11))  # 10 days of 30, then 20
    # 10.00 x 1/3 = 3.333.. -> 3.33 ; 20.00 x 2/3 = 13.333.. -> 13.33
    assert [line.amount.amount_minor for line in bill.lines()] == [333, 1333]
    assert bill.included_tokens == (1000 * 10 + 1001 * 20) // 30  # 1000.66.. -> 1000 (rounded down)


def test_a_downgrade_lowers_the_remaining_allowance_but_keeps_what_was_included() -> None:
    bill = bill_with(PRO)
    bill.add(usage(1, at(5), 2500, 0), PRO)
    bill.set_terms(BASIC, HALFWAY)
    assert bill.included_tokens == 2000 and bill.included_used == 2500 and bill.included_remaining == 0
    out = bill.add(usage(2, at(20), 100, 100), BASIC)
    assert (out.overage_input_tokens, out.overage_output_tokens) == (100, 100)
    assert bill.overage_input_tokens == 100  # the first request's 2500 stay included


def test_set_terms_rules() -> None:
    bill = CycleBill(APRIL)
    with pytest.raises(ValueError):
        bill.add(usage(1, at(2), 1, 1), BASIC)  # no terms yet
    with pytest.raises(ValueError):
        bill.set_terms(BASIC, at(2))  # first terms must cover the cycle start
    bill.set_terms(BASIC, APRIL.start - timedelta(days=40))  # earlier: clamped to the cycle start
    bill.set_terms(BASIC, at(5))  # same terms again: no segment
    assert len(bill.segments()) == 1
    bill.set_terms(PRO, at(10))
    bill.set_terms(terms("max", monthly=9000), at(10))  # same instant: the last one wins
    assert [t.plan_slug for _, t in bill.segments()] == ["basic", "max"]
    bill.set_terms(BASIC, at(10))  # ... and merges back into the previous segment
    assert [t.plan_slug for _, t in bill.segments()] == ["basic"]
    bill.set_terms(PRO, at(12))
    with pytest.raises(ValueError):
        bill.set_terms(BASIC, at(11))  # out of time order
    with pytest.raises(ValueError):
        bill.set_terms(BASIC, APRIL.end)  # belongs to the next cycle
    with pytest.raises(CurrencyMismatch):
        bill.set_terms(terms(currency="EUR"), at(20))
    with pytest.raises(ValueError):
        bill.set_terms(BASIC, datetime(2024, 4, 20))  # naive


def test_usage_outside_the_cycle_or_in_another_currency_is_refused() -> None:
    bill = bill_with()
    with pytest.raises(ValueError):
        bill.add(usage(1, APRIL.end, 1, 1), BASIC)
    with pytest.raises(ValueError):
        bill.add(usage(1, APRIL.start - timedelta(microseconds=1), 1, 1), BASIC)
    with pytest.raises(CurrencyMismatch):
        bill.add(usage(1, at(2), 1, 1), terms(currency="EUR"))
    with pytest.raises(ValueError):
        Usage("e1", datetime(2024, 4, 2), 1, 1)
    with pytest.raises(ValueError):
        Usage("e1", at(2), -1, 1)


# -- adjustments ---------------------------------------------------------------------------------

def test_adjustment_lines() -> None:
    bill = bill_with()
    bill.adjust(Money(-250), "credit: upstream outage 2024-04-03", APRIL.end + timedelta(days=3))
    bill.adjust(Money(99), "late usage correction", at(30))
    assert bill.lines()[1:] == [Line("adjustment", "credit: upstream outage 2024-04-03", 1, Money(-250)),
                                Line("adjustment", "late usage correction", 1, Money(99))]
    assert bill.total() == Money(1000 - 250 + 99)
    with pytest.raises(CurrencyMismatch):
        bill.adjust(Money(1, "EUR"), "wrong currency", at(3))
    with pytest.raises(ValueError):
        bill.adjust(Money(1), "  ", at(3))


# -- state ---------------------------------------------------------------------------------------

def assert_json_native(value: object) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            assert type(key) is str
            assert_json_native(item)
    elif isinstance(value, list):
        for item in value:
            assert_json_native(item)
    else:
        assert type(value) in (str, int), value


def test_state_is_json_native_and_round_trips() -> None:
    bill = bill_with(terms(cache="fraction", fraction="0.25"))
    bill.add(usage(1, at(2), 5000, 700, cache_hit=True), bill.segments()[0][1])
    bill.set_terms(PRO, HALFWAY)
    bill.add(usage(2, at(20), 3000, 900), PRO)
    bill.adjust(Money(-5), "goodwill", at(21))
    state = bill.to_state()
    assert_json_native(state)
    again = CycleBill.from_state(json.loads(json.dumps(state)))
    assert again.to_state() == state
    assert again.lines() == bill.lines() and again.total() == bill.total()
    with pytest.raises(ValueError):
        CycleBill.from_state({**state, "version": 99})


# -- properties ----------------------------------------------------------------------------------

prices = st.integers(0, 50_000_000).map(lambda micro: UnitPrice(Decimal(micro).scaleb(-6)))
plans = st.builds(
    lambda monthly, included, inp, out, mode, fraction: Terms(
        "plan-p", "p", 1, Money(monthly), included, inp, out, mode, fraction),
    st.integers(0, 10**6), st.integers(0, 50_000), prices, prices, st.sampled_from(["full", "free", "fraction"]),
    st.decimals(min_value=0, max_value=1, places=3),
)
moments = st.integers(0, APRIL.microseconds - 1).map(lambda us: APRIL.start + timedelta(microseconds=us))
requests = st.lists(st.tuples(moments, st.integers(0, 20_000), st.integers(0, 20_000), st.booleans()), max_size=40)


def half_up_cents(amount: Fraction) -> int:
    return math.floor(amount * 100 + Fraction(1, 2))


def recompute_total(t: Terms, reqs: list[tuple[datetime, int, int, bool]]) -> tuple[int, int, int]:
    """Independent recomputation: sort, flatten to (input, output) billable tokens, prefix sums."""
    factor = {"full": Fraction(1), "free": Fraction(0), "fraction": Fraction(t.cache_hit_fraction)}
    flat: list[tuple[str, int]] = []
    for _, inp, out, hit in sorted(reqs, key=lambda r: r[0]):
        f = factor[t.cache_hit_billing] if hit else Fraction(1)
        flat += [("in", math.floor(inp * f)), ("out", math.floor(out * f))]
    prefix, over = 0, {"in": 0, "out": 0}
    for kind, n in flat:  # tokens [prefix, prefix + n) of the cycle; those past the allowance are overage
        over[kind] += max(0, prefix + n - max(prefix, t.included_tokens))
        prefix += n
    cents_in = half_up_cents(over["in"] * Fraction(t.input_price.per_million) / 10**6)
    cents_out = half_up_cents(over["out"] * Fraction(t.output_price.per_million) / 10**6)
    return t.monthly_price.amount_minor + cents_in + cents_out, over["in"], over["out"]


@settings(max_examples=300)
@given(plans, requests)
def test_total_equals_an_independent_recomputation(t: Terms, reqs) -> None:
    bill = bill_with(t)
    for n, (when, inp, out, hit) in enumerate(sorted(reqs, key=lambda r: r[0])):
        bill.add(Usage(f"e{n}", when, inp, out, hit), t)
    total, over_in, over_out = recompute_total(t, reqs)
    assert bill.total() == Money(total)
    assert (bill.overage_input_tokens, bill.overage_output_tokens) == (over_in, over_out)
    assert bill.included_used + over_in + over_out == bill.billable_input_tokens + bill.billable_output_tokens
    assert bill.requests == len(reqs)


events = st.lists(st.one_of(
    st.tuples(st.just("usage"), st.integers(0, 20_000), st.integers(0, 20_000), st.booleans()),
    st.tuples(st.just("adjust"), st.integers(-500, 500)),
    st.tuples(st.just("plan"), plans),
), max_size=30)


def apply(bill: CycleBill, n: int, event: tuple, clock: list[datetime]) -> None:
    """Feed one event; time moves forward one hour per event so plan changes stay in order."""
    clock[0] += timedelta(hours=1)
    if event[0] == "usage":
        _, inp, out, hit = event
        bill.add(Usage(f"e{n}", clock[0], inp, out, hit), bill.segments()[-1][1])
    elif event[0] == "adjust":
        bill.adjust(Money(event[1]), f"adjustment {n}", clock[0])
    else:
        bill.set_terms(replace(event[1], plan_version=n + 1), clock[0])


@settings(max_examples=200)
@given(plans, events, st.data())
def test_resuming_from_state_gives_the_same_bill(first: Terms, evs, data) -> None:
    split = data.draw(st.integers(0, len(evs)))
    whole, whole_clock = bill_with(first), [APRIL.start]
    for n, ev in enumerate(evs):
        apply(whole, n, ev, whole_clock)
    resumed, clock = bill_with(first), [APRIL.start]
    for n, ev in enumerate(evs[:split]):
        apply(resumed, n, ev, clock)
    resumed = CycleBill.from_state(json.loads(json.dumps(resumed.to_state())))
    for n, ev in enumerate(evs[split:], start=split):
        apply(resumed, n, ev, clock)
    assert resumed.lines() == whole.lines()
    assert resumed.total() == whole.total()
    assert resumed.to_state() == whole.to_state()


runs = st.lists(st.tuples(st.integers(0, 5_000), st.integers(0, 5_000), st.booleans()), max_size=60)


@settings(max_examples=300)
@given(plans, runs, runs, st.integers(0, 60_000))
def test_tally_many_leaves_the_bill_tally_leaves_one_by_one(t: Terms, before, run, used) -> None:
    other = replace(t, plan_version=2, input_price=UnitPrice(t.input_price.per_million + 1))
    one, many = bill_with(t), bill_with(t)
    for bill in (one, many):            # the same history first: lines already there, part of the allowance used
        for n, (inp, out, hit) in enumerate(before):
            bill.tally(APRIL.start + timedelta(hours=n), inp, out, hit, other if n % 3 else t)
    for n, (inp, out, hit) in enumerate(run):
        one.tally(HALFWAY + timedelta(seconds=n), inp, out, hit, t)
    many.tally_many(run, t)
    assert many.to_state() == one.to_state()
    assert many.lines() == one.lines() and many.total() == one.total()


@settings(max_examples=200)
@given(plans, requests)
def test_running_total_after_each_request_equals_the_sum_of_the_settled_lines(t: Terms, reqs) -> None:
    """The running total (integer cost units, no Decimal per request) and the lines (exact Decimal
    costs, rounded once each) agree after every request, and after a round trip through the state."""
    bill = bill_with(t)
    for n, (when, inp, out, hit) in enumerate(sorted(reqs, key=lambda r: r[0])):
        bill.tally(when, inp, out, hit, t)
        running = bill.total_minor
        assert running == sum(line.amount.amount_minor for line in bill.lines()), n
        restored = CycleBill.from_state(bill.to_state())
        assert restored.total_minor == running
