"""Seed the demo price of local/demo from billing/data/model_prices.json ("demo").

The offline demo model costs nothing to run, so a new install's dashboard, budgets and alerts
showed $0 everywhere. It gets a small price instead, labelled in its `source` as a demo price,
from the seed's effective_from. Reversible: the reverse removes exactly that row. A row already
present for local/demo at that instant (an admin's) is left as it is."""

import json
from decimal import Decimal
from pathlib import Path

from django.db import migrations
from django.utils.dateparse import parse_datetime

DATA = Path(__file__).resolve().parent.parent / "data" / "model_prices.json"


def _seed():
    data = json.loads(DATA.read_text())
    return data["demo"]["source"][:200], parse_datetime(data["effective_from"]), data["demo"]["prices"]


def seed(apps, schema_editor):
    ModelPrice = apps.get_model("billing", "ModelPrice")
    source, effective_from, prices = _seed()
    for row in prices:
        cached = row.get("cached_input_per_1m")
        ModelPrice.objects.get_or_create(
            model=row["model"], effective_from=effective_from,
            defaults={"input_per_1m": Decimal(row["input_per_1m"]), "output_per_1m": Decimal(row["output_per_1m"]),
                      "cached_input_per_1m": Decimal(cached) if cached is not None else None, "source": source})


def unseed(apps, schema_editor):
    ModelPrice = apps.get_model("billing", "ModelPrice")
    source, effective_from, prices = _seed()
    ModelPrice.objects.filter(model__in=[r["model"] for r in prices], effective_from=effective_from,
                              source=source).delete()


class Migration(migrations.Migration):
    dependencies = [("billing", "0004_usagerecord_starts_run")]

    operations = [migrations.RunPython(seed, unseed)]
