"""Money, unit prices and the one rounding rule (fila.domain.money)."""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction
import math

import pytest
from hypothesis import given, strategies as st

from fila.domain.errors import FilaError
from fila.domain.money import (
    CurrencyMismatch,
    InvalidAmount,
    Money,
    UnitPrice,
    round_half_up_ratio,
    round_line,
)


# -- Money -------------------------------------------------------------------------------------

def test_format_has_two_minor_digits_for_every_currency() -> None:
    assert Money(1234).format() == "12.34 USD"
    assert Money(5, "EUR").format() == "0.05 EUR"
    assert Money(-5, "JPY").format() == "-0.05 JPY"
    assert Money(100).format() == "1.00 USD"
    assert str(Money.zero("GBP")) == "0.00 GBP"


def test_to_decimal_is_exact_major_units() -> None:
    assert Money(1234).to_decimal() == Decimal("12.34")
    assert Money(-1).to_decimal() == Decimal("-0.01")


def test_add_and_sub_in_one_currency() -> None:
    assert Money(150) + Money(275) == Money(425)
    assert Money(150) - Money(275) == Money(-125)
    assert -Money(3, "EUR") == Money(-3, "EUR")
    assert sum([Money(1), Money(2)], Money.zero()) == Money(3)


@pytest.mark.parametrize("op", [
    lambda a, b: a + b, lambda a, b: a - b, lambda a, b: a < b,
    lambda a, b: a <= b, lambda a, b: a > b, lambda a, b: a >= b,
])
def test_mixed_currencies_are_refused(op) -> None:
    with pytest.raises(CurrencyMismatch):
        op(Money(1, "USD"), Money(1, "EUR"))


def test_currency_mismatch_is_a_value_error_and_a_fila_error() -> None:
    assert issubclass(CurrencyMismatch, ValueError) and issubclass(CurrencyMismatch, FilaError)
    assert issubclass(InvalidAmount, ValueError) and issubclass(InvalidAmount, FilaError)


def test_equality_includes_currency() -> None:
    assert Money(1, "USD") != Money(1, "EUR")
    assert Money(1, "USD") == Money(1)


def test_comparisons() -> None:
    assert Money(1) < Money(2) <= Money(2) and Money(3) > Money(2) >= Money(2)
    assert max([Money(5), Money(9), Money(1)]) == Money(9)


@pytest.mark.parametrize("currency", ["usd", "US", "USDX", "U1D", "", 840, None])
def test_currency_must_be_three_upper_letters(currency) -> None:
    with pytest.raises(InvalidAmount):
        Money(1, currency)


@pytest.mark.parametrize("amount", [1.0, 0.5, True, "1", Decimal("1")])
def test_amount_minor_must_be_an_int(amount) -> None:
    with pytest.raises(InvalidAmount):
        Money(amount)


def test_money_is_frozen() -> None:
    with pytest.raises(AttributeError):
        Money(1).amount_minor = 2  # type: ignore[misc]


@pytest.mark.parametrize("value, minor", [
    ("12.34", 1234), ("12.3", 1230), ("12.340", 1234), ("-0.01", -1), (Decimal("7"), 700), ("0", 0),
])
def test_from_decimal(value, minor) -> None:
    assert Money.from_decimal(value, "EUR") == Money(minor, "EUR")


@pytest.mark.parametrize("value", ["0.001", "12.345", Decimal("0.005"), 1.5, "NaN", "Infinity", "abc", None])
def test_from_decimal_refuses_floats_and_sub_minor_precision(value) -> None:
    with pytest.raises(InvalidAmount):
        Money.from_decimal(value)


@given(st.integers(min_value=-10**15, max_value=10**15))
def test_decimal_round_trip(minor: int) -> None:
    money = Money(minor, "EUR")
    assert Money.from_decimal(money.to_decimal(), "EUR") == money
    assert Money.from_decimal(money.format().split()[0], "EUR") == money


# -- UnitPrice ---------------------------------------------------------------------------------

@pytest.mark.parametrize("text, canonical", [
    ("0.10", "0.10"), ("0.1", "0.10"), ("2", "2.00"), ("0.000125", "0.000125"), ("1E+3", "1000.00"),
    ("15.500000", "15.50"), ("0.0000010", "0.000001"), ("0", "0.00"), ("-0", "0.00"), (" 3.5 ", "3.50"),
])
def test_unit_price_parses_decimal_strings_to_a_canonical_form(text, canonical) -> None:
    price = UnitPrice.parse(text)
    assert price.to_str() == canonical
    assert price.per_million == Decimal(canonical)
    assert UnitPrice.parse(price.to_str()) == price


def test_unit_price_from_decimal_equals_parsed() -> None:
    assert UnitPrice(Decimal("0.10")) == UnitPrice.parse("0.1") == UnitPrice("0.100")
    assert UnitPrice.parse("0.10", "EUR").currency == "EUR"
    assert str(UnitPrice.parse("0.10")) == "0.10 USD per 1M tokens"


@pytest.mark.parametrize("bad", ["-0.10", "-1", "0.0000001", "0.1234567", "NaN", "sNaN", "Infinity", "-Infinity",
                                 "", "ten", "1,5"])
def test_unit_price_refuses_negative_nan_and_more_than_six_places(bad) -> None:
    with pytest.raises(InvalidAmount):
        UnitPrice.parse(bad)


@pytest.mark.parametrize("bad", [0.1, 1.0, True])
def test_unit_price_refuses_floats(bad) -> None:
    with pytest.raises(InvalidAmount):
        UnitPrice(bad)
    with pytest.raises(InvalidAmount):
        UnitPrice.parse(bad)


def test_unit_price_refuses_bad_currency() -> None:
    with pytest.raises(InvalidAmount):
        UnitPrice.parse("1.00", "usd")


@pytest.mark.parametrize("price, tokens, cost", [
    ("0.10", 1_000_000, "0.10"), ("0.10", 1, "0.0000001"), ("0.000001", 1, "0.000000000001"),
    ("0.15", 333, "0.00004995"), ("2.50", 0, "0"), ("60", 123_456_789, "7407.40734"),
])
def test_cost_is_exact(price, tokens, cost) -> None:
    assert UnitPrice.parse(price).cost(tokens) == Decimal(cost)


def test_cost_refuses_negative_or_non_int_tokens() -> None:
    with pytest.raises(ValueError):
        UnitPrice.parse("1").cost(-1)
    with pytest.raises(ValueError):
        UnitPrice.parse("1").cost(1.0)  # type: ignore[arg-type]


@given(st.integers(min_value=0, max_value=10**12), st.integers(min_value=0, max_value=10**12))
def test_cost_matches_exact_rational(tokens: int, micro_per_million: int) -> None:
    price = UnitPrice(Decimal(micro_per_million).scaleb(-6))
    assert Fraction(price.cost(tokens)) == Fraction(tokens * micro_per_million, 10**12)


# -- round_line: half-up, once -------------------------------------------------------------------

@pytest.mark.parametrize("amount, minor", [
    ("0.005", 1), ("0.0049999", 0), ("0.015", 2), ("0.025", 3), ("2.675", 268), ("0.0050000001", 1),
    ("1", 100), ("1.994999", 199), ("1.995", 200), ("-0.005", -1), ("-0.004", 0), ("0", 0),
    ("123456789012345678.125", 12345678901234567813),
])
def test_round_line_is_half_up(amount, minor) -> None:
    assert round_line(Decimal(amount)) == Money(minor)


def test_round_line_keeps_currency_and_refuses_floats() -> None:
    assert round_line(Decimal("0.125"), "EUR") == Money(13, "EUR")
    with pytest.raises(InvalidAmount):
        round_line(0.125)  # type: ignore[arg-type]


@given(st.decimals(min_value=0, max_value=10**9, places=8, allow_nan=False, allow_infinity=False))
def test_round_line_matches_floor_of_x_plus_half(amount: Decimal) -> None:
    expected = math.floor(Fraction(amount) * 100 + Fraction(1, 2))
    assert round_line(amount).amount_minor == expected


@given(st.integers(min_value=-10**12, max_value=10**12))
def test_round_line_sends_exact_ties_away_from_zero(cents: int) -> None:
    tie = Decimal(cents).scaleb(-2) + (Decimal("0.005") if cents >= 0 else Decimal("-0.005"))
    assert round_line(tie).amount_minor == cents + (1 if cents >= 0 else -1)


@pytest.mark.parametrize("numerator, denominator, expected", [
    (1, 2, 1), (1, 3, 0), (2, 3, 1), (5, 2, 3), (-1, 2, -1), (-1, 3, 0), (10, 5, 2), (0, 7, 0),
])
def test_round_half_up_ratio(numerator, denominator, expected) -> None:
    assert round_half_up_ratio(numerator, denominator) == expected


def test_prorate_rounds_the_exact_ratio_once() -> None:
    assert Money(1000).prorate(1, 2) == Money(500)
    assert Money(1000).prorate(1, 3) == Money(333)
    assert Money(1000).prorate(2, 3) == Money(667)
    assert Money(1).prorate(1, 2) == Money(1)  # 0.5 cent rounds up
    assert Money(999, "EUR").prorate(7, 7) == Money(999, "EUR")
    with pytest.raises(ValueError):
        Money(1000).prorate(3, 2)
    with pytest.raises(ValueError):
        Money(1000).prorate(0, 0)
