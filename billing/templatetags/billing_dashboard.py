"""Number formats of the cost dashboard: USD with 6 places (costs per call are fractions of a
cent), counts with thousands separators, percentages with one place."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

from django import template

register = template.Library()


def _decimal(value) -> Decimal | None:
    if value is None or value == "":
        return None
    try:
        return Decimal(str(value))
    except (InvalidOperation, ValueError):
        return None


@register.filter
def usd(value) -> str:
    number = _decimal(value)
    return "—" if number is None else f"{number:,.6f}"


@register.filter
def usd_short(value) -> str:
    """Headline amounts: cents from 1 USD up, 6 places below."""
    number = _decimal(value)
    if number is None:
        return "—"
    return f"{number:,.2f}" if abs(number) >= 1 else f"{number:,.6f}"


@register.filter
def count(value) -> str:
    number = _decimal(value)
    return "—" if number is None else f"{int(number):,}"


@register.filter
def pct(value) -> str:
    number = _decimal(value)
    return "—" if number is None else f"{number:,.1f} %"


@register.filter
def meter(value) -> str:
    """A percentage for <meter value>: a plain number, capped to 0..100."""
    number = _decimal(value)
    if number is None:
        return "0"
    return format(min(max(number, Decimal("0")), Decimal("100")), "f")
