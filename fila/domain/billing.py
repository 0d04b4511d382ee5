"""The bill of one billing cycle, accumulated request by request.

``CycleBill`` serves the projection (incremental, resumed via ``to_state``) and the auditor (replay
of raw events) alike. A bill depends only on the order of calls (event order), never on a clock.

- **Terms.** The plan in force for an interval. ``set_terms`` is first called at or before the
  cycle start; later calls are mid-cycle plan changes, in time order, before the cycle end (the
  terms already in force: no-op; two at the same instant: the last wins). A plan edit never
  rewrites the past: the caller passes to ``add`` the terms in force at that request.
- **Cache hits.** Billable tokens of a hit = tokens x 1 ("full"), 0 ("free") or ``cache_hit_fraction``
  ("fraction"), rounded down per request, for input and output separately; raw counts kept apart.
- **Included allowance.** Consumed in request (call) order; within a request, input tokens before
  output tokens. Tokens beyond it are overage, priced at that request's terms.
- **Proration.** Plan changes split the cycle into segments; each bills a base line of
  ``monthly_price x segment_us / cycle_us``, exact, rounded once (half-up). The effective allowance
  is ``floor(sum(included_tokens x segment_us) / cycle_us)`` over the segments known so far, the last
  running to the cycle end (no change: the plan's full ``included_tokens``).
- **Allowance at the time of a request.** A request may consume ``max(0, allowance_now - used)``:
  the effective allowance as known when it is added, minus tokens already counted as included.
  Nothing is re-priced: an upgrade raises the remaining allowance from then on; a downgrade lowers
  it (possibly to zero) from then on, and tokens already counted as included stay included.
- **Lines and total.** Overage lines are grouped by (input|output, plan, version, price); each is
  the exact ``Decimal`` sum of its per-request costs, rounded once (``round_line``). Adjustments
  (late corrections, any sign) are lines too. The total is the sum of the rounded lines.
  Idempotency is the caller's job: the same entry added twice is billed twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from math import gcd
from typing import Any

from fila.domain.cycles import Period, ensure_utc
from fila.domain.money import COST_DIGITS, EXACT, CurrencyMismatch, Money, UnitPrice, round_line, round_minor, round_units

CACHE_HIT_MODES = ("full", "free", "fraction")
STATE_VERSION = 1
_COUNTERS = ("requests", "cache_hits", "input_tokens", "output_tokens", "billable_input_tokens",  # CycleBill ints
             "billable_output_tokens", "included_used", "overage_input_tokens", "overage_output_tokens")


def _count(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what} must be a non-negative int, got {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class Terms:
    """The plan terms in force for some interval (overage prices are per million tokens)."""

    plan_id: str
    plan_slug: str
    plan_version: int
    monthly_price: Money
    included_tokens: int
    input_price: UnitPrice
    output_price: UnitPrice
    cache_hit_billing: str  # "full" | "free" | "fraction"
    cache_hit_fraction: Decimal = Decimal(1)  # used when "fraction", 0..1

    def __post_init__(self) -> None:
        if not self.plan_id or not self.plan_slug:
            raise ValueError("plan_id and plan_slug must not be empty")
        _count(self.plan_version, "plan_version")
        _count(self.included_tokens, "included_tokens")
        if self.monthly_price.amount_minor < 0:
            raise ValueError(f"monthly price must not be negative, got {self.monthly_price}")
        if {self.input_price.currency, self.output_price.currency} != {self.currency}:
            raise CurrencyMismatch("monthly and overage prices must share one currency")
        if self.cache_hit_billing not in CACHE_HIT_MODES:
            raise ValueError(f"cache_hit_billing must be one of {CACHE_HIT_MODES}, got {self.cache_hit_billing!r}")
        fraction = self.cache_hit_fraction
        if not isinstance(fraction, Decimal) or not fraction.is_finite() or not 0 <= fraction <= 1:
            raise ValueError(f"cache_hit_fraction must be a Decimal in [0, 1], got {fraction!r}")

    @property
    def currency(self) -> str:
        return self.monthly_price.currency

    def billable(self, tokens: int, cache_hit: bool) -> int:
        """Tokens billed for ``tokens`` raw tokens of one request (cache-hit rule, rounded down)."""
        if not cache_hit or self.cache_hit_billing == "full":
            return tokens
        if self.cache_hit_billing == "free":
            return 0
        numerator, denominator = self.cache_hit_fraction.as_integer_ratio()
        return tokens * numerator // denominator

    def to_dict(self) -> dict[str, Any]:
        return {
            "plan_id": self.plan_id, "plan_slug": self.plan_slug, "plan_version": self.plan_version,
            "monthly_price_minor": self.monthly_price.amount_minor, "currency": self.currency,
            "included_tokens": self.included_tokens, "input_price": self.input_price.to_str(),
            "output_price": self.output_price.to_str(), "cache_hit_billing": self.cache_hit_billing,
            "cache_hit_fraction": str(self.cache_hit_fraction),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Terms:
        cur = d["currency"]
        return cls(
            d["plan_id"], d["plan_slug"], d["plan_version"], Money(d["monthly_price_minor"], cur),
            d["included_tokens"], UnitPrice.parse(d["input_price"], cur), UnitPrice.parse(d["output_price"], cur),
            d["cache_hit_billing"], Decimal(d["cache_hit_fraction"]),
        )


@dataclass(frozen=True, slots=True)
class Usage:
    """One recorded request (a ledger entry)."""

    entry_id: str
    at: datetime
    input_tokens: int
    output_tokens: int
    cache_hit: bool = False

    def __post_init__(self) -> None:
        if not self.entry_id:
            raise ValueError("entry_id must not be empty")
        object.__setattr__(self, "at", ensure_utc(self.at, "usage.at"))
        _count(self.input_tokens, "input_tokens")
        _count(self.output_tokens, "output_tokens")


@dataclass(frozen=True, slots=True)
class Line:
    """One invoice line; ``kind`` is "base", "overage_input", "overage_output" or "adjustment"."""

    kind: str
    description: str
    quantity: int  # tokens for overage lines, 1 otherwise
    amount: Money


@dataclass(frozen=True, slots=True)
class UsageOutcome:
    """What ``CycleBill.add`` did with one request (costs exact, major units), then running totals."""

    entry_id: str
    billable_input_tokens: int
    billable_output_tokens: int
    included_input_tokens: int
    included_output_tokens: int
    overage_input_tokens: int
    overage_output_tokens: int
    overage_input_cost: Decimal
    overage_output_cost: Decimal
    included_used: int  # running: allowance consumed so far in the cycle
    included_remaining: int  # running: allowance left, as known now
    total: Money  # running: the bill total after this request


@dataclass(slots=True)
class _Overage:
    """One overage line. Requests add tokens to ``pending``; ``settle`` folds them into ``cost``.

    ``cost`` is the exact ``Decimal`` sum of the per-request costs, digit for digit (its exponent
    too, as ``str`` shows it): the sum of ``price.cost(t)`` over requests equals ``price.cost(sum t)``
    (exact and linear) and its exponent is the least of the terms', which is that of
    ``price.cost(gcd of the t)`` (a cost's exponent grows with the trailing zeros of ``t x price``).
    """

    kind: str
    description: str
    tokens: int = 0
    cost: Decimal = Decimal(0)   # settled: the exact sum of the costs of the tokens not pending
    rounded: int = 0             # round_line(cost) in minor units, kept with cost
    price: UnitPrice | None = None  # the price of the pending tokens
    pending: int = 0             # tokens added since the last settle
    pending_gcd: int = 0         # gcd of those requests' token counts (fixes the sum's exponent)
    # the exact cost, pending tokens included, in units of 10**-COST_DIGITS major units (None: a
    # cost restored from a state with more digits than that, kept by ``settle`` alone); with it,
    # ``rounded`` is current after every charge, with no Decimal work per request
    units: int | None = 0

    def settle(self) -> int:
        """Bring ``cost`` and ``rounded`` up to date; the change of ``rounded``."""
        if not self.pending:
            return 0
        price, pending = self.price, self.pending
        assert price is not None
        if pending == self.pending_gcd:   # one request: the plain running sum
            cost = EXACT.add(self.cost, price.cost(pending))
        else:
            exponent = min(self.cost.as_tuple().exponent, price.cost(self.pending_gcd).as_tuple().exponent)
            cost = EXACT.add(self.cost, price.cost(pending)).quantize(Decimal(1).scaleb(exponent), context=EXACT)
        self.cost, self.pending, self.pending_gcd = cost, 0, 0
        rounded = round_minor(cost)
        change, self.rounded = rounded - self.rounded, rounded
        return change


@dataclass(slots=True)
class _Derived:
    """What the segments determine, computed once per change of terms (``add`` is the hot path)."""

    segments: list[tuple[Period, Terms]]
    included_tokens: int
    base_minor: int


class CycleBill:
    """Running bill of one cycle; see the module docstring for the rules."""

    def __init__(self, period: Period, currency: str = "USD") -> None:
        self.period = period
        self.currency = Money.zero(currency).currency
        self._segments: list[tuple[datetime, Terms]] = []  # (start, terms), starts increasing
        self._overage: dict[str, _Overage] = {}
        self._adjustments: list[tuple[Money, str, datetime]] = []
        self.requests = self.cache_hits = self.input_tokens = self.output_tokens = 0
        self.billable_input_tokens = self.billable_output_tokens = self.included_used = 0
        self.overage_input_tokens = self.overage_output_tokens = 0
        # caches: the segments' figures (None: recompute), the sums of the rounded lines, line keys
        self._derived: _Derived | None = None
        self._overage_minor = 0   # the rounded overage lines, as of the last settle
        self._adjustments_minor = 0
        self._unsettled: list[_Overage] = []   # lines with pending tokens
        self._line_keys: dict[tuple[str, str, int, Decimal], _Overage] = {}

    def set_terms(self, terms: Terms, effective_at: datetime) -> None:
        """Terms in force from ``effective_at`` (clamped to the cycle start) to the cycle end."""
        self._check_currency(terms.currency)
        at = max(ensure_utc(effective_at, "effective_at"), self.period.start)
        if not self._segments:
            if at != self.period.start:
                raise ValueError(f"the first terms must be in force at the cycle start {self.period.start}")
        elif at >= self.period.end:
            raise ValueError(f"{at.isoformat()} is not before the cycle end: it belongs to a later cycle")
        elif at < self._segments[-1][0]:
            raise ValueError(f"plan changes must come in time order: {at.isoformat()} is before the last one")
        elif terms == self._segments[-1][1]:
            return
        elif at == self._segments[-1][0]:  # same instant: the last call wins
            self._segments.pop()
            self._derived = None
            if self._segments and self._segments[-1][1] == terms:
                return
        self._segments.append((at, terms))
        self._derived = None

    def add(self, usage: Usage, terms: Terms) -> UsageOutcome:
        """Bill one request under ``terms``, the terms in force at ``usage.at``."""
        bill_in, bill_out, inc_in, inc_out, remaining = self.tally(
            usage.at, usage.input_tokens, usage.output_tokens, usage.cache_hit, terms)
        over_in, over_out = bill_in - inc_in, bill_out - inc_out
        return UsageOutcome(
            usage.entry_id, bill_in, bill_out, inc_in, inc_out, over_in, over_out,
            terms.input_price.cost(over_in), terms.output_price.cost(over_out),
            self.included_used, remaining - inc_in - inc_out, self.total(),
        )

    def tally(self, at: datetime, input_tokens: int, output_tokens: int, cache_hit: bool,
              terms: Terms) -> tuple[int, int, int, int, int]:
        """``add`` without making the ``Usage`` nor the outcome (the billing view's hot path).

        The caller vouches for what ``Usage`` checks: ``at`` is UTC, the counts non-negative ints.
        Returns the billable and included tokens (input, output) and the allowance left before.
        """
        if not self.period.start <= at < self.period.end:
            raise ValueError(f"usage at {at.isoformat()} is outside the cycle {self.period}")
        if not self._segments:
            raise ValueError("no terms in force: call set_terms first")
        self._check_currency(terms.currency)
        bill_in = terms.billable(input_tokens, cache_hit)
        bill_out = terms.billable(output_tokens, cache_hit)
        remaining = max(0, (self._derived or self._figures()).included_tokens - self.included_used)
        inc_in = min(bill_in, remaining)
        inc_out = min(bill_out, remaining - inc_in)
        over_in, over_out = bill_in - inc_in, bill_out - inc_out
        if over_in:
            self._charge("overage_input", terms, terms.input_price, over_in)
        if over_out:
            self._charge("overage_output", terms, terms.output_price, over_out)
        self.requests += 1   # the _COUNTERS
        self.cache_hits += int(cache_hit)
        self.input_tokens += input_tokens
        self.output_tokens += output_tokens
        self.billable_input_tokens += bill_in
        self.billable_output_tokens += bill_out
        self.included_used += inc_in + inc_out
        self.overage_input_tokens += over_in
        self.overage_output_tokens += over_out
        return bill_in, bill_out, inc_in, inc_out, remaining

    def tally_many(self, requests: Sequence[tuple[int, int, bool]], terms: Terms) -> None:
        """``tally`` of each ``(input_tokens, output_tokens, cache_hit)`` in order, under one ``terms``.

        The bill ends exactly as after the calls one by one (lines, their order and exact costs,
        counters), for a fraction of the work: the allowance is consumed request by request, and
        each overage line takes the run's tokens at once (its cost is linear; ``_Overage`` keeps
        the gcd that fixes the exponent). The caller vouches for what ``tally`` checks per request
        (each time inside the cycle, the counts non-negative ints). Raises ``ValueError`` before
        changing anything when ``tally`` would refuse every one of them (no terms, another currency).
        """
        if not self._segments:
            raise ValueError("no terms in force: call set_terms first")
        self._check_currency(terms.currency)
        billable = terms.billable
        remaining = max(0, (self._derived or self._figures()).included_tokens - self.included_used)
        hits = raw_in = raw_out = bill_in = bill_out = included = over_in = over_out = 0
        gcd_in = gcd_out = 0
        first_in = first_out = -1
        for k, (input_tokens, output_tokens, cache_hit) in enumerate(requests):
            raw_in += input_tokens
            raw_out += output_tokens
            if cache_hit:
                hits += 1
                b_in, b_out = billable(input_tokens, True), billable(output_tokens, True)
            else:                  # billable(tokens, False) is the tokens themselves
                b_in, b_out = input_tokens, output_tokens
            bill_in += b_in
            bill_out += b_out
            if remaining:          # as tally: input first, then output, from what is left
                inc = b_in if b_in < remaining else remaining
                remaining -= inc
                b_in -= inc
                included += inc
                inc = b_out if b_out < remaining else remaining
                remaining -= inc
                b_out -= inc
                included += inc
            if b_in:
                over_in += b_in
                gcd_in = gcd(gcd_in, b_in)
                if first_in < 0:
                    first_in = k
            if b_out:
                over_out += b_out
                gcd_out = gcd(gcd_out, b_out)
                if first_out < 0:
                    first_out = k
        # the lines in the order tally would have charged them first (input before output in a request)
        for first, kind, price, tokens, divisor in sorted(
                ((first_in, "overage_input", terms.input_price, over_in, gcd_in),
                 (first_out, "overage_output", terms.output_price, over_out, gcd_out)), key=lambda c: c[:2]):
            if first >= 0:
                self._charge(kind, terms, price, tokens, divisor)
        self.requests += len(requests)   # the _COUNTERS
        self.cache_hits += hits
        self.input_tokens += raw_in
        self.output_tokens += raw_out
        self.billable_input_tokens += bill_in
        self.billable_output_tokens += bill_out
        self.included_used += included
        self.overage_input_tokens += over_in
        self.overage_output_tokens += over_out

    def adjust(self, amount: Money, reason: str, at: datetime) -> None:
        """A late correction line (a credit if negative); ``at`` may fall after the cycle end."""
        self._check_currency(amount.currency)
        if not reason.strip():
            raise ValueError("an adjustment needs a reason")
        self._adjustments.append((amount, reason, ensure_utc(at, "adjustment at")))
        self._adjustments_minor += amount.amount_minor

    def _figures(self) -> _Derived:
        derived = self._derived
        if derived is None:
            ends = [start for start, _ in self._segments[1:]] + [self.period.end]
            segments = [(Period(start, end), terms) for (start, terms), end in zip(self._segments, ends)]
            cycle_us = self.period.microseconds
            weighted = sum(t.included_tokens * p.microseconds for p, t in segments)
            base = sum(t.monthly_price.prorate(p.microseconds, cycle_us).amount_minor for p, t in segments)
            derived = self._derived = _Derived(segments, weighted // cycle_us, base)
        return derived

    def segments(self) -> list[tuple[Period, Terms]]:
        """The plan segments as known now (the last one runs to the cycle end)."""
        return list(self._figures().segments)

    @property
    def included_tokens(self) -> int:
        """Effective allowance as known now: ``floor(sum(included x segment_us) / cycle_us)``."""
        return self._figures().included_tokens

    @property
    def included_remaining(self) -> int:
        return max(0, self.included_tokens - self.included_used)

    def lines(self) -> list[Line]:
        """Base lines per segment, then overage lines (first-seen order), then adjustments."""
        result = []
        for seg, terms in self.segments():
            share = "" if seg == self.period else f", prorated {seg.seconds}/{self.period.seconds} s"
            when = f"{seg.start:%Y-%m-%d %H:%M} to {seg.end:%Y-%m-%d %H:%M} UTC{share}"
            amount = terms.monthly_price.prorate(seg.microseconds, self.period.microseconds)
            result.append(Line("base", f"{terms.plan_slug} v{terms.plan_version} base fee {when}", 1, amount))
        self._settle()
        for o in self._overage.values():
            result.append(Line(o.kind, o.description, o.tokens, round_line(o.cost, self.currency)))
        result.extend(Line("adjustment", reason, 1, amount) for amount, reason, _ in self._adjustments)
        return result

    def total(self) -> Money:
        """The sum of the rounded lines (kept as the lines change: the same sum as over ``lines()``)."""
        return Money(self.total_minor, self.currency)

    @property
    def total_minor(self) -> int:
        """``total().amount_minor``, without making the Money (a running total per request is cheap)."""
        if self._unsettled and any(acc.units is None for acc in self._unsettled):
            self._settle()
        return self._figures().base_minor + self._overage_minor + self._adjustments_minor

    def to_state(self) -> dict[str, Any]:
        """JSON-native running state (str/int/list/dict only) to store in a projection row."""
        self._settle()
        return {
            "version": STATE_VERSION, "currency": self.currency,
            "period": [self.period.start.isoformat(), self.period.end.isoformat()],
            "segments": [[start.isoformat(), terms.to_dict()] for start, terms in self._segments],
            "counters": {name: getattr(self, name) for name in _COUNTERS},
            "overage": [[key, o.kind, o.description, o.tokens, str(o.cost)] for key, o in self._overage.items()],
            "adjustments": [[a.amount_minor, reason, at.isoformat()] for a, reason, at in self._adjustments],
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> CycleBill:
        """The bill ``to_state`` described, ready to take more calls."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported CycleBill state version {state.get('version')!r}")
        bill = cls(Period(*(datetime.fromisoformat(text) for text in state["period"])), state["currency"])
        bill._segments = [(ensure_utc(datetime.fromisoformat(s)), Terms.from_dict(t)) for s, t in state["segments"]]
        for name in _COUNTERS:
            setattr(bill, name, _count(state["counters"][name], name))
        for key, kind, text, tokens, cost in state["overage"]:
            line = _Overage(kind, text, _count(tokens, "overage tokens"), Decimal(cost))
            line.rounded = round_minor(line.cost)
            units = line.cost.scaleb(COST_DIGITS)
            line.units = int(units) if units == units.to_integral_value() else None
            bill._overage[key] = line
            bill._overage_minor += line.rounded
        for minor, reason, at in state["adjustments"]:
            bill._adjustments.append((Money(minor, bill.currency), reason, ensure_utc(datetime.fromisoformat(at))))
            bill._adjustments_minor += minor
        return bill

    def _check_currency(self, currency: str) -> None:
        if currency != self.currency:
            raise CurrencyMismatch(f"a {self.currency} bill cannot take {currency} amounts")

    def _charge(self, kind: str, terms: Terms, price: UnitPrice, tokens: int, divisor: int | None = None) -> None:
        """Add ``tokens`` (> 0) overage tokens to their line; their cost is summed at the next settle.

        ``divisor``: when ``tokens`` is the sum of several requests' tokens, the gcd of those (the
        same line state as charging them one by one)."""
        key = (kind, terms.plan_id, terms.plan_version, price.per_million)
        acc = self._line_keys.get(key)
        if acc is None:
            name = f"{kind}|{terms.plan_id}|{terms.plan_version}|{price.to_str()}"
            acc = self._overage.get(name)
            if acc is None:
                acc = self._overage[name] = _Overage(
                    kind, f"{terms.plan_slug} v{terms.plan_version} {kind.removeprefix('overage_')} overage at {price}")
            self._line_keys[key] = acc
        if not acc.pending:
            self._unsettled.append(acc)
            acc.price = price
        elif acc.price is not price:   # pending tokens share one price object (and so one exponent)
            self._overage_minor += acc.settle()
            acc.price = price
        acc.tokens += tokens
        acc.pending += tokens
        acc.pending_gcd = gcd(acc.pending_gcd, tokens if divisor is None else divisor)
        if acc.units is not None:     # the rounded line, now (settle finds it already right)
            acc.units += tokens * price.micro
            rounded = round_units(acc.units)
            self._overage_minor += rounded - acc.rounded
            acc.rounded = rounded

    def _settle(self) -> None:
        """Sum the pending tokens' costs into their lines (exactly as request by request)."""
        for acc in self._unsettled:
            self._overage_minor += acc.settle()
        self._unsettled.clear()
