"""Seed ModelPrice from billing/data/model_prices.json (list prices as of 2025).

Reversible: the reverse removes exactly the seeded rows (same model, effective_from, source).
Rows already present for a model at the seed's effective_from are left as they are."""

import json
from decimal import Decimal
from pathlib import Path

from django.db import migrations
from django.utils.dateparse import parse_datetime

DATA = Path(__file__).resolve().parent.parent / "data" / "model_prices.json"


def _seed():
    data = json.loads(DATA.read_text())
    return data["source"][:200], parse_datetime(data["effective_from"]), data["prices"]


def seed(apps, schema_editor):
    ModelPrice = apps.get_model("billing", "ModelPrice")
    source, effective_from, prices = _seed()
    for row in prices:
        ModelPrice.objects.get_or_create(
            model=row["model"], effective_from=effective_from,
            defaults={"input_per_1m": Decimal(row["input_per_1m"]), "output_per_1m": Decimal(row["output_per_1m"]),
                      "cached_input_per_1m": (Decimal(row["cached_input_per_1m"])
                                              if row.get("cached_input_per_1m") is not None else None),
                      "source": source})


def unseed(apps, schema_editor):
    ModelPrice = apps.get_model("billing", "ModelPrice")
    source, effective_from, prices = _seed()
    ModelPrice.objects.filter(model__in=[r["model"] for r in prices], effective_from=effective_from,
                              source=source).delete()


class Migration(migrations.Migration):
    dependencies = [("billing", "0001_prices_usage_budgets")]

    operations = [migrations.RunPython(seed, unseed)]
