"""Prices per model and the cost arithmetic: exact Decimal, never float.

    price_for(model, at)        the price of `model` at `at` (sync; cached)
    price_from(prices, model, at)  the same over rows already loaded (no I/O: the metering stage)
    call_cost(prompt_tokens, completion_tokens, price, cached_prompt_tokens=0) -> Decimal
    model_price_upsert(...)     the admin API's write (same model + effective_from → update)

Lookup: the newest ModelPrice of the model with effective_from <= at; else the newest row of
the provider's wildcard ("local/*"); else the default price from settings
(BILLING_DEFAULT_INPUT_PER_1M / BILLING_DEFAULT_OUTPUT_PER_1M) with `priced=False`, so a record
made with it is flagged.

All rows live in one cache entry ("prices:all"): one round trip per turn, however many models
it calls. Saving or deleting a ModelPrice drops the entry (signals below); a TTL bounds how long
rows written around the ORM (a data migration, a raw UPDATE) can stay unseen.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal

from django.conf import settings
from django.core.cache import cache
from django.db import transaction
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver
from django.utils import timezone

from .models import ModelPrice

PRICES_CACHE_KEY = "prices:all"
PRICES_CACHE_SECONDS = 300
MILLION = Decimal(1_000_000)
# UsageRecord.cost_usd has 8 decimal places: costs are rounded there, half up, per call.
COST_QUANTUM = Decimal("0.00000001")


# Models on our own hardware: free unless a row says otherwise (the seed has "local/*" too, but
# a database without the seed, e.g. a flushed test database, must not bill them at the default).
# local/demo has such a row: a labelled demo price (migration 0005), so the demo shows figures.
FREE_PROVIDERS = ("local",)


class Usd(Decimal):
    """A Decimal whose str() is plain notation ("0.00000075", never "7.5E-7"): costs go into
    responses as str(cost). Arithmetic on it gives plain Decimals."""

    def __str__(self) -> str:
        return format(self, "f")

    def __repr__(self) -> str:
        return f"Usd('{self}')"


@dataclass(frozen=True)
class Price:
    """USD per 1M tokens. `priced` is False for the default price of an unknown model."""

    model: str
    input_per_1m: Decimal
    output_per_1m: Decimal
    cached_input_per_1m: Decimal | None = None
    priced: bool = True


def call_cost(prompt_tokens: int, completion_tokens: int, price: Price, cached_prompt_tokens: int = 0) -> Decimal:
    """USD of one model call, exact, quantized to 8 decimal places (ROUND_HALF_UP).

    cost = (prompt − cached) × input + cached × cached_input + completion × output, all / 1M.
    Cached prompt tokens are part of prompt_tokens (as OpenAI reports them) and cost the cached
    input price (the input price when the model has none). The sum is exact (Decimal with 28
    significant digits holds any token count times any price here) and rounded once, at the end.
    """
    cached = min(max(int(cached_prompt_tokens), 0), int(prompt_tokens))
    cached_price = price.cached_input_per_1m if price.cached_input_per_1m is not None else price.input_per_1m
    micro = ((int(prompt_tokens) - cached) * price.input_per_1m + cached * cached_price
             + int(completion_tokens) * price.output_per_1m)
    return Usd((micro / MILLION).quantize(COST_QUANTUM, rounding=ROUND_HALF_UP))


def default_price(model: str) -> Price:
    return Price(model=model, input_per_1m=Decimal(settings.BILLING_DEFAULT_INPUT_PER_1M),
                 output_per_1m=Decimal(settings.BILLING_DEFAULT_OUTPUT_PER_1M), priced=False)


def prices_load() -> list[dict]:
    """Every price row (cached as one entry), newest first per model."""
    rows = cache.get(PRICES_CACHE_KEY)
    if rows is None:
        rows = list(ModelPrice.objects.order_by("model", "-effective_from").values(
            "model", "input_per_1m", "output_per_1m", "cached_input_per_1m", "effective_from"))
        cache.set(PRICES_CACHE_KEY, rows, PRICES_CACHE_SECONDS)
    return rows


def price_from(prices: list[dict], model: str, at: datetime) -> Price:
    """The price of `model` at `at` among `prices` (rows as prices_load returns them). No I/O."""
    wildcard = model.split("/", 1)[0] + "/*" if "/" in model else None
    best: dict[str, dict] = {}
    for row in prices:
        name = row["model"]
        if name not in (model, wildcard) or row["effective_from"] > at:
            continue
        if name not in best or row["effective_from"] > best[name]["effective_from"]:
            best[name] = row
    row = best.get(model) or (best.get(wildcard) if wildcard else None)
    if row is None:
        if wildcard and wildcard[:-2] in FREE_PROVIDERS:
            return Price(model=model, input_per_1m=Decimal("0"), output_per_1m=Decimal("0"))
        return default_price(model)
    return Price(model=model, input_per_1m=row["input_per_1m"], output_per_1m=row["output_per_1m"],
                 cached_input_per_1m=row["cached_input_per_1m"])


def price_for(model: str, at: datetime | None = None) -> Price:
    """The price of `model` at `at` (default now): newest row not in the future, else default."""
    return price_from(prices_load(), model, at or timezone.now())


@transaction.atomic
def model_price_upsert(*, model: str, input_per_1m: Decimal, output_per_1m: Decimal,
                       cached_input_per_1m: Decimal | None = None, effective_from: datetime | None = None,
                       source: str = "api", actor: str = "system", request_id: str = "") -> tuple[ModelPrice, bool]:
    """Create the price of `model` from `effective_from` (default now), or update the row with the
    same model and effective_from. Returns (row, created); audited with the change."""
    from governance.audit import audit_record

    effective_from = effective_from or timezone.now()
    row, created = ModelPrice.objects.select_for_update().update_or_create(
        model=model, effective_from=effective_from,
        defaults={"input_per_1m": input_per_1m, "output_per_1m": output_per_1m,
                  "cached_input_per_1m": cached_input_per_1m, "source": source})
    audit_record(actor=actor, action="model_price.create" if created else "model_price.update", target=model,
                 details={"input_per_1m": str(input_per_1m), "output_per_1m": str(output_per_1m),
                          "cached_input_per_1m": None if cached_input_per_1m is None else str(cached_input_per_1m),
                          "effective_from": effective_from.isoformat()},
                 request_id=request_id)
    return row, created


@receiver(post_save, sender=ModelPrice)
@receiver(post_delete, sender=ModelPrice)
def _prices_changed(**kwargs) -> None:
    # After commit: a reader between the delete and the commit would re-cache the old rows.
    transaction.on_commit(lambda: cache.delete(PRICES_CACHE_KEY))
    cache.delete(PRICES_CACHE_KEY)
