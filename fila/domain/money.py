"""Money, unit prices and the one rounding rule.

Rules (copied into the README):

- **Money is never a float.** An amount is an ``int`` of minor units (cents) plus an ISO-4217
  style currency code of three upper-case letters. Every currency is treated as having
  **2 minor digits** (``Money(1234, "USD").format() == "12.34 USD"``); currencies with 0 or 3
  minor digits (JPY, KWD) are not special-cased. Amounts may be negative (credits, corrections).
- **No mixed currencies.** ``+``, ``-`` and ``<``/``<=``/``>``/``>=`` between two currencies raise
  ``CurrencyMismatch``. ``Money.from_decimal`` refuses floats and any precision finer than one
  minor unit (``"0.001"`` is an error, not a silent rounding).
- **Unit prices are per 1,000,000 tokens**, kept as an exact ``Decimal`` in major units with at
  most **6 decimal places** (micro-units per million tokens). They are parsed from decimal
  strings ("0.10"); floats, negatives, NaN and infinities are refused. ``UnitPrice.cost(tokens)``
  is exact: ``tokens * per_million / 1_000_000`` with no rounding at all.
- **The one rounding rule.** Exact ``Decimal`` amounts are summed per invoice line, and each line
  is rounded **once**, half-up (``ROUND_HALF_UP``: ties go away from zero, so 0.005 -> 0.01 and
  -0.005 -> -0.01) to minor units by ``round_line``. A prorated amount (an exact rational,
  ``Money.prorate``) is rounded by the same rule, once. The invoice total is the sum of the
  rounded lines; it is never rounded again and never recomputed from unrounded parts.

Exact arithmetic uses ``EXACT``, a decimal context that raises ``decimal.Inexact`` instead of
silently losing digits, so a sum that does not fit is an error, not a wrong bill.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from decimal import (
    ROUND_HALF_UP,
    Context,
    Decimal,
    DivisionByZero,
    Inexact,
    InvalidOperation,
    Overflow,
)

from fila.domain.errors import FilaError

__all__ = [
    "EXACT",
    "MINOR_DIGITS",
    "PRICE_DECIMAL_PLACES",
    "CurrencyMismatch",
    "InvalidAmount",
    "Money",
    "UnitPrice",
    "round_half_up_ratio",
    "round_line",
    "round_minor",
    "round_units",
]

MINOR_DIGITS = 2
PRICE_DECIMAL_PLACES = 6
TOKENS_PER_PRICE_UNIT = 1_000_000
# ``UnitPrice.micro`` costs are in units of 10**-COST_DIGITS major units (6: TOKENS_PER_PRICE_UNIT
# is 10**6); one minor unit is MINOR_UNIT of them
COST_DIGITS = PRICE_DECIMAL_PLACES + 6
MINOR_UNIT = 10 ** (COST_DIGITS - MINOR_DIGITS)

#: exact arithmetic: raises rather than rounding (100 significant digits is far beyond any bill)
EXACT = Context(prec=100, traps=[Inexact, InvalidOperation, Overflow, DivisionByZero])
_ROUNDING = Context(prec=100, rounding=ROUND_HALF_UP, traps=[InvalidOperation, Overflow])
_MINOR_QUANTUM = Decimal(1).scaleb(-MINOR_DIGITS)
_PRICE_UNIT = Decimal(TOKENS_PER_PRICE_UNIT)
_CURRENCY_RE = re.compile(r"[A-Z]{3}")


class InvalidAmount(FilaError, ValueError):
    """An amount, price or currency that the money rules refuse."""

    code = "invalid_amount"


class CurrencyMismatch(FilaError, ValueError):
    """Two amounts in different currencies were combined."""

    code = "currency_mismatch"


def _check_currency(currency: object) -> str:
    if not isinstance(currency, str) or not _CURRENCY_RE.fullmatch(currency):
        raise InvalidAmount(f"currency must be 3 upper-case letters, got {currency!r}")
    return currency


def _to_decimal(value: object, what: str) -> Decimal:
    """Decimal from a Decimal, int or decimal string; floats and non-finite values are refused."""
    if isinstance(value, bool) or isinstance(value, float):
        raise InvalidAmount(f"{what} must be a Decimal or a decimal string, not {type(value).__name__}")
    if isinstance(value, (Decimal, int)):
        result = Decimal(value)
    elif isinstance(value, str):
        try:
            result = Decimal(value.strip())
        except InvalidOperation:
            raise InvalidAmount(f"{what} is not a decimal number: {value!r}") from None
    else:
        raise InvalidAmount(f"{what} must be a Decimal or a decimal string, not {type(value).__name__}")
    if not result.is_finite():
        raise InvalidAmount(f"{what} must be finite, got {value!r}")
    return result


def _has_at_most_places(value: Decimal, places: int) -> bool:
    """True when ``value`` has no non-zero digit beyond ``places`` decimal places (exact)."""
    _, digits, exponent = value.as_tuple()
    assert isinstance(exponent, int)  # finite
    extra = -exponent - places
    return extra <= 0 or not any(digits[-extra:])


def round_half_up_ratio(numerator: int, denominator: int) -> int:
    """``numerator / denominator`` rounded half-up (ties away from zero) to an int, exactly."""
    if denominator <= 0:
        raise ValueError("denominator must be positive")
    quotient, remainder = divmod(abs(numerator), denominator)
    if 2 * remainder >= denominator:
        quotient += 1
    return quotient if numerator >= 0 else -quotient


@dataclass(frozen=True, slots=True)
class Money:
    """An amount of money in integer minor units of one currency."""

    amount_minor: int
    currency: str = "USD"

    def __post_init__(self) -> None:
        if isinstance(self.amount_minor, bool) or not isinstance(self.amount_minor, int):
            raise InvalidAmount(f"amount_minor must be an int, got {self.amount_minor!r}")
        _check_currency(self.currency)

    @classmethod
    def zero(cls, currency: str = "USD") -> Money:
        return cls(0, currency)

    @classmethod
    def from_decimal(cls, value: Decimal | str, currency: str = "USD") -> Money:
        """Exact conversion from major units; refuses floats and sub-minor precision."""
        amount = _to_decimal(value, "amount")
        if not _has_at_most_places(amount, MINOR_DIGITS):
            raise InvalidAmount(f"{value!r} has more precision than {MINOR_DIGITS} minor digits")
        return cls(int(amount.scaleb(MINOR_DIGITS, context=EXACT)), currency)

    def _same(self, other: object) -> Money:
        if not isinstance(other, Money):
            return NotImplemented  # type: ignore[return-value]
        if other.currency != self.currency:
            raise CurrencyMismatch(f"cannot combine {self.currency} with {other.currency}")
        return other

    def __add__(self, other: Money) -> Money:
        o = self._same(other)
        if o is NotImplemented:
            return NotImplemented
        return Money(self.amount_minor + o.amount_minor, self.currency)

    def __sub__(self, other: Money) -> Money:
        o = self._same(other)
        if o is NotImplemented:
            return NotImplemented
        return Money(self.amount_minor - o.amount_minor, self.currency)

    def __neg__(self) -> Money:
        return Money(-self.amount_minor, self.currency)

    def __lt__(self, other: Money) -> bool:
        o = self._same(other)
        return NotImplemented if o is NotImplemented else self.amount_minor < o.amount_minor

    def __le__(self, other: Money) -> bool:
        o = self._same(other)
        return NotImplemented if o is NotImplemented else self.amount_minor <= o.amount_minor

    def __gt__(self, other: Money) -> bool:
        o = self._same(other)
        return NotImplemented if o is NotImplemented else self.amount_minor > o.amount_minor

    def __ge__(self, other: Money) -> bool:
        o = self._same(other)
        return NotImplemented if o is NotImplemented else self.amount_minor >= o.amount_minor

    def to_decimal(self) -> Decimal:
        """The amount in major units, exactly (``Money(1234).to_decimal() == Decimal("12.34")``)."""
        return Decimal(self.amount_minor).scaleb(-MINOR_DIGITS, context=EXACT)

    def format(self) -> str:
        """``"12.34 USD"``; always 2 decimals, ``"-0.05 USD"`` for negatives."""
        return f"{self.to_decimal():.{MINOR_DIGITS}f} {self.currency}"

    def prorate(self, part: int, whole: int) -> Money:
        """``self * part / whole`` computed exactly and rounded once, half-up, to minor units."""
        if whole <= 0 or not 0 <= part <= whole:
            raise ValueError(f"proration needs 0 <= part <= whole and whole > 0, got {part}/{whole}")
        return Money(round_half_up_ratio(self.amount_minor * part, whole), self.currency)

    def __str__(self) -> str:
        return self.format()


@dataclass(frozen=True, slots=True)
class UnitPrice:
    """A price per 1,000,000 tokens in major units (``Decimal``, <= 6 decimal places, >= 0).

    ``UnitPrice("0.10")`` and ``UnitPrice(Decimal("0.10"))`` are the same price; the stored
    value is canonical (``per_million`` equals ``Decimal(self.to_str())``).
    """

    per_million: Decimal
    currency: str = "USD"
    # the price in units of 10**-PRICE_DECIMAL_PLACES per million tokens (exact): the cost of t
    # tokens is ``t * micro`` units of 10**-COST_DIGITS major units
    micro: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        value = _to_decimal(self.per_million, "unit price")
        if value < 0:
            raise InvalidAmount(f"unit price must not be negative, got {self.per_million!r}")
        if not _has_at_most_places(value, PRICE_DECIMAL_PLACES):
            raise InvalidAmount(
                f"unit price {self.per_million!r} has more than {PRICE_DECIMAL_PLACES} decimal places"
            )
        _check_currency(self.currency)
        object.__setattr__(self, "per_million", Decimal(_canonical(value)))
        object.__setattr__(self, "micro", int(self.per_million.scaleb(PRICE_DECIMAL_PLACES)))

    @classmethod
    def parse(cls, text: str, currency: str = "USD") -> UnitPrice:
        """Parse a decimal string such as ``"0.10"``; anything but a ``str`` is refused."""
        if not isinstance(text, str):
            raise InvalidAmount(f"unit price must be given as a decimal string, got {text!r}")
        return cls(_to_decimal(text, "unit price"), currency)

    def to_str(self) -> str:
        """Canonical text: at least 2 and at most 6 decimals, no exponent (``"0.10"``, ``"0.000125"``)."""
        return _canonical(self.per_million)

    def cost(self, tokens: int) -> Decimal:
        """Exact cost in major units of ``tokens`` tokens; never rounded."""
        if type(tokens) is not int or tokens < 0:     # bool is not an int here
            raise ValueError(f"tokens must be a non-negative int, got {tokens!r}")
        return EXACT.divide(EXACT.multiply(Decimal(tokens), self.per_million), _PRICE_UNIT)

    def __str__(self) -> str:
        return f"{self.to_str()} {self.currency} per 1M tokens"


def _canonical(value: Decimal) -> str:
    if value == 0:
        value = Decimal(0)  # drop the sign of -0
    text = f"{value.quantize(Decimal(1).scaleb(-PRICE_DECIMAL_PLACES), context=EXACT):f}"
    whole, _, frac = text.partition(".")
    frac = frac.rstrip("0").ljust(MINOR_DIGITS, "0")
    return f"{whole}.{frac}"


def round_line(amount: Decimal, currency: str = "USD") -> Money:
    """THE rounding rule: one exact line amount (major units) -> Money, half-up to minor units."""
    return Money(round_minor(_to_decimal(amount, "line amount")), currency)


def round_units(units: int) -> int:
    """``round_minor(units x 10**-COST_DIGITS)`` for ``units`` >= 0: half-up, in integers."""
    return (units + MINOR_UNIT // 2) // MINOR_UNIT


def round_minor(amount: Decimal) -> int:
    """``round_line(amount).amount_minor`` for a finite ``Decimal`` (no checks: the billing hot path)."""
    rounded = amount.quantize(_MINOR_QUANTUM, rounding=ROUND_HALF_UP, context=_ROUNDING)
    return int(rounded.scaleb(MINOR_DIGITS, context=EXACT))
