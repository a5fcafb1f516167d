"""Metering: exact Decimal costs per model call, stored as UsageRecords with the run, and
`cost_usd` in every response — batch, stream, tool loop, fallback, disconnect, unknown model."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from datetime import timezone as dt_timezone
from decimal import Decimal

import pytest
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from agents.models import Run
from billing.models import ModelPrice, UsageRecord
from billing.pricing import Price, call_cost, price_for
from conftest import ROOT, Api, orm, parse_sse, post_and_hang_up

pytestmark = pytest.mark.django_db(transaction=True)

CHAT = "/api/v1/agents/{}/chat"
# Newer than the seeded list prices (billing/data/model_prices.json), which are still in the test
# database until the first transactional test flushes it: a test's own price must win either way.
# One second newer, so that it is in force on any date the seeds are (a fixed later date is not
# in force on a clock set before it).
EFFECTIVE = parse_datetime(json.loads((ROOT / "billing" / "data" / "model_prices.json").read_text())
                           ["effective_from"]) + timedelta(seconds=1)


@pytest.fixture
def key(make_key) -> str:
    return make_key()


def price(model: str = "openai/gpt-4o-mini", input_per_1m: str = "1.5", output_per_1m: str = "2") -> ModelPrice:
    return ModelPrice.objects.create(model=model, input_per_1m=Decimal(input_per_1m),
                                     output_per_1m=Decimal(output_per_1m), effective_from=EFFECTIVE)


def expected(prompt: int, completion: int, input_per_1m: str = "1.5", output_per_1m: str = "2") -> Decimal:
    return ((prompt * Decimal(input_per_1m) + completion * Decimal(output_per_1m)) / Decimal(1_000_000)).quantize(
        Decimal("0.00000001"))


def records() -> list[UsageRecord]:
    return list(UsageRecord.objects.order_by("id"))


def seed_migration(name: str):
    """A data migration's module, its seed() run on the current models (a transactional test
    flushes what the migrations seeded, so tests that need it seed it again)."""
    import importlib

    from django.apps import apps

    migration = importlib.import_module(f"billing.migrations.{name}")
    migration.seed(apps, None)
    return migration


def seed_demo_price() -> None:
    seed_migration("0005_seed_demo_price")


# --- arithmetic ---------------------------------------------------------------------------


def test_it_prices_one_token_exactly():
    p = Price(model="m", input_per_1m=Decimal("0.15"), output_per_1m=Decimal("0.60"))
    assert call_cost(1, 0, p) == Decimal("0.00000015")
    assert call_cost(0, 1, p) == Decimal("0.00000060")
    assert str(call_cost(1, 1, p)) == "0.00000075"


def test_it_sums_large_counts_without_float_error():
    p = Price(model="m", input_per_1m=Decimal("2.50"), output_per_1m=Decimal("10.00"))
    assert call_cost(1_234_567, 1_234_567, p) == Decimal("15.43208750")
    assert call_cost(1_234_567, 0, Price(model="m", input_per_1m=Decimal("0.15"), output_per_1m=Decimal("0"))) \
        == Decimal("0.18518505")  # 0.18518505 exactly: 1234567 × 0.15 = 185185.05


def test_it_rounds_half_up_at_eight_places():
    p = Price(model="m", input_per_1m=Decimal("0.005"), output_per_1m=Decimal("0.001"))
    assert call_cost(1, 0, p) == Decimal("0.00000001")  # 0.000000005 → up
    assert call_cost(0, 4, p) == Decimal("0.00000000")  # 0.000000004 → down


def test_it_prices_cached_prompt_tokens_at_the_cached_price():
    p = Price(model="m", input_per_1m=Decimal("2"), output_per_1m=Decimal("8"), cached_input_per_1m=Decimal("0.5"))
    assert call_cost(1000, 100, p, cached_prompt_tokens=400) == Decimal("0.00220000")  # 600×2 + 400×0.5 + 100×8
    assert call_cost(1000, 0, Price(model="m", input_per_1m=Decimal("2"), output_per_1m=Decimal("8")),
                     cached_prompt_tokens=400) == Decimal("0.00200000")


def test_it_finds_the_newest_price_in_force_and_flags_unknown_models(db, settings):
    settings.BILLING_DEFAULT_INPUT_PER_1M = Decimal("7")
    settings.BILLING_DEFAULT_OUTPUT_PER_1M = Decimal("9")
    now = timezone.now()
    ModelPrice.objects.create(model="x/m", input_per_1m=1, output_per_1m=1, effective_from=now - timedelta(days=9))
    ModelPrice.objects.create(model="x/m", input_per_1m=2, output_per_1m=2, effective_from=now - timedelta(days=1))
    ModelPrice.objects.create(model="x/m", input_per_1m=3, output_per_1m=3, effective_from=now + timedelta(days=1))
    assert price_for("x/m", now).input_per_1m == 2
    assert price_for("x/m", now - timedelta(days=5)).input_per_1m == 1
    unknown = price_for("x/other", now)
    assert (unknown.input_per_1m, unknown.output_per_1m, unknown.priced) == (Decimal("7"), Decimal("9"), False)
    # A save drops the cached rows at once.
    ModelPrice.objects.create(model="x/other", input_per_1m=4, output_per_1m=4, effective_from=now - timedelta(days=1))
    assert price_for("x/other", now).priced is True


def test_it_seeds_list_prices_reversibly(db):
    """The data migration's functions, run on the current models (a transactional test flushes
    the seeded rows, so the test seeds them again)."""
    import importlib

    from django.apps import apps

    migration = importlib.import_module("billing.migrations.0002_seed_model_prices")
    ModelPrice.objects.all().delete()
    migration.seed(apps, None)
    migration.seed(apps, None)  # twice: no duplicates
    assert ModelPrice.objects.count() == len(json.loads(migration.DATA.read_text())["prices"])
    assert price_for("openai/gpt-4o-mini").input_per_1m == Decimal("0.15")
    assert price_for("anthropic/claude-sonnet-4").output_per_1m == Decimal("15")
    local = price_for("local/demo")
    assert (local.input_per_1m, local.output_per_1m, local.priced) == (0, 0, True)
    migration.unseed(apps, None)
    assert not ModelPrice.objects.exists()


def test_it_seeds_a_demo_price_for_the_demo_model_labelled_as_such_reversibly(db):
    ModelPrice.objects.all().delete()
    list_prices = seed_migration("0002_seed_model_prices")
    seed_migration("0005_seed_demo_price")
    demo = seed_migration("0005_seed_demo_price")  # twice: no duplicates

    [row] = ModelPrice.objects.filter(model="local/demo")
    assert (row.input_per_1m, row.output_per_1m, row.cached_input_per_1m) == (Decimal("2"), Decimal("8"), None)
    assert row.source.startswith("DEMO PRICE, not a real cost")  # what the admin's price list shows
    assert row.effective_from == datetime(2025, 1, 1, tzinfo=dt_timezone.utc)
    priced = price_for("local/demo")
    assert (priced.input_per_1m, priced.output_per_1m, priced.priced) == (Decimal("2"), Decimal("8"), True)
    other = price_for("local/other")  # every other local model stays free
    assert (other.input_per_1m, other.output_per_1m, other.priced) == (0, 0, True)

    from django.apps import apps

    demo.unseed(apps, None)
    assert not ModelPrice.objects.filter(model="local/demo").exists()
    assert ModelPrice.objects.count() == len(json.loads(list_prices.DATA.read_text())["prices"])


def test_the_demo_price_leaves_an_admins_own_price_alone(db):
    ModelPrice.objects.filter(model="local/demo").delete()
    mine = ModelPrice.objects.create(model="local/demo", input_per_1m=0, output_per_1m=0, source="admin",
                                     effective_from=datetime(2025, 1, 1, tzinfo=dt_timezone.utc))
    seed_demo_price()

    assert list(ModelPrice.objects.filter(model="local/demo")) == [mine]
    assert price_for("local/demo").output_per_1m == 0


# --- metering through the pipeline --------------------------------------------------------


async def test_it_meters_a_local_batch_request_at_zero_cost(make_agent, key):
    # Any local model but the demo's (which has a demo price): no row of its own, so local/* (0).
    await orm(make_agent, name="free", model="local/free")
    body = (await Api(key).post(CHAT.format("free"), {"message": "hello there"})).json()

    assert body["cost_usd"] == "0.00000000"
    [record] = await orm(records)
    assert record.model == "local/free" and record.cost_usd == 0 and record.priced
    assert record.prompt_tokens == body["usage"]["prompt_tokens"]
    assert str(record.run_id) == body["id"] and str(record.session_id) == body["session_id"]


async def test_the_demo_model_costs_its_demo_price_so_budgets_show_spend(make_agent, key):
    from billing.budgets import budget_create

    await orm(seed_demo_price)
    await orm(make_agent, name="demo")  # local/demo, as seed_demo's agents
    budget = await orm(budget_create, scope="global", period="month", limit_usd=Decimal("1"))
    body = (await Api(key).post(CHAT.format("demo"), {"message": "hello there"})).json()

    cost = Decimal(body["cost_usd"])
    assert cost == expected(body["usage"]["prompt_tokens"], body["usage"]["completion_tokens"], "2", "8") > 0
    [record] = await orm(records)
    assert record.model == "local/demo" and record.cost_usd == cost and record.priced
    [shown] = (await Api(key).get("/api/v1/budgets")).json()["budgets"]
    assert shown["id"] == budget.id and Decimal(shown["spent_usd"]) == cost


async def test_it_meters_an_openai_call_at_its_exact_price(make_agent, key, openai_settings):
    await orm(price)
    await orm(make_agent, name="gpt", model="openai/gpt-4o-mini")
    response = await Api(key).post(CHAT.format("gpt"), {"message": "hello world"})
    body = response.json()

    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}  # "Echo: hello world"
    assert body["cost_usd"] == "0.00001050"  # 3 × 1.5 + 3 × 2 per 1M
    [record] = await orm(records)
    assert record.cost_usd == Decimal("0.00001050")
    assert (record.prompt_tokens, record.completion_tokens, record.estimated, record.priced) == (3, 3, False, True)
    assert record.request_id == response.headers["X-Request-ID"]
    run = await orm(Run.objects.get)
    assert record.api_key_id == run.api_key_id and record.agent_id == run.agent_id


async def test_it_puts_the_cost_in_the_streams_done_event(make_agent, key, openai_settings):
    await orm(price)
    await orm(make_agent, name="gpt", model="openai/gpt-4o-mini")
    response = await Api(key).post(CHAT.format("gpt"), {"message": "one two three [tokens:5]", "stream": True})
    done = [e["data"] for e in parse_sse(response.text) if e.get("event") == "done"][0]

    usage = done["usage"]
    assert done["cost_usd"] == str(expected(usage["prompt_tokens"], usage["completion_tokens"]))
    [record] = await orm(records)
    assert record.completion_tokens == 5 and not record.estimated  # the upstream reported it (include_usage)
    assert record.cost_usd == Decimal(done["cost_usd"])


async def test_it_meters_an_openai_compatible_stream(make_agent, key, openai_settings):
    await orm(price)
    await orm(make_agent, name="gpt", model="openai/gpt-4o-mini")
    response = await Api(key).post("/v1/chat/completions", {
        "model": "gpt", "stream": True, "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": "a b c [tokens:4]"}]})
    chunks = [json.loads(line[6:]) for line in response.text.split("\n") if line.startswith("data: {")]
    usage = chunks[-1]["usage"]

    [record] = await orm(records)
    assert (record.prompt_tokens, record.completion_tokens) == (usage["prompt_tokens"], usage["completion_tokens"])
    assert record.cost_usd == expected(usage["prompt_tokens"], 4)


async def test_it_records_each_call_of_a_tool_loop(make_agent, key, openai_settings):
    await orm(price)
    await orm(make_agent, name="gpt", model="openai/gpt-4o-mini", skills=["calculator"])
    body = (await Api(key).post(CHAT.format("gpt"), {"message": 'add [call:calculator {"expression": "2+2"}]'})).json()

    stored = await orm(records)
    assert len(stored) == 2
    assert sum(r.prompt_tokens for r in stored) == body["usage"]["prompt_tokens"]
    assert sum(r.cost_usd for r in stored) == Decimal(body["cost_usd"])
    assert Decimal(body["cost_usd"]) == sum(expected(r.prompt_tokens, r.completion_tokens) for r in stored)
    assert {r.run_id for r in stored} == {Run.objects.model._meta.pk.to_python(body["id"])}


async def test_it_records_the_failed_call_and_the_fallback(make_agent, key, openai_settings):
    await orm(price)
    await orm(make_agent, name="gpt", model="openai/fault-500-primary", fallback_models=["openai/gpt-4o-mini"])
    body = (await Api(key).post(CHAT.format("gpt"), {"message": "hello world"})).json()

    *failed_calls, answered = await orm(records)
    assert len(failed_calls) == 3  # one call and two retries (LLM_MAX_RETRIES)
    for failed in failed_calls:
        assert failed.model == "openai/fault-500-primary" and failed.cost_usd == 0 and failed.prompt_tokens == 0
        assert not failed.priced  # no price for that model: the default applied, flagged
    assert answered.model == "openai/gpt-4o-mini" and answered.cost_usd == Decimal("0.00001050")
    assert body["cost_usd"] == "0.00001050"


def starts_by_run() -> dict:
    """run id → its records' starts_run flags, in record id order."""
    out: dict = {}
    for record in records():
        out.setdefault(record.run_id, []).append(record.starts_run)
    return out


async def test_it_marks_the_first_record_of_each_run_as_its_start(make_agent, key, openai_settings):
    """starts_run: True on exactly one record per run, its first (lowest id) — the record that
    counts the run as a request in usage figures — for a tool loop and for a run that fell back
    to a second model mid tool loop."""
    await orm(price)
    await orm(make_agent, name="calc", model="openai/gpt-4o-mini", skills=["calculator"])
    await orm(make_agent, name="fb", model="openai/fault-500-primary", fallback_models=["openai/gpt-4o-mini"],
              skills=["calculator"])
    ask = {"message": 'add [call:calculator {"expression": "2+2"}] [call:calculator {"expression": "3*3"}]'}
    loop = (await Api(key).post(CHAT.format("calc"), ask)).json()
    fallback = (await Api(key).post(CHAT.format("fb"), ask)).json()
    single = (await Api(key).post(CHAT.format("calc"), {"message": "hello world"})).json()

    flags = await orm(starts_by_run)
    pk = Run.objects.model._meta.pk.to_python
    assert set(flags) == {pk(loop["id"]), pk(fallback["id"]), pk(single["id"])}
    assert flags[pk(loop["id"])] == [True, False]  # the tool calls, then the answer
    # the failed call and its two retries, the fallback's two
    assert flags[pk(fallback["id"])] == [True, False, False, False, False]
    assert flags[pk(single["id"])] == [True]


async def test_it_meters_a_failed_run(make_agent, key, openai_settings):
    await orm(price)
    await orm(make_agent, name="gpt", model="openai/gpt-4o-mini")
    response = await Api(key).post(CHAT.format("gpt"), {"message": "boom [fault:500]"})

    assert response.status_code >= 500
    first, *retries = await orm(records)  # one record per attempt: the call and its two retries
    assert len(retries) == 2 and first.starts_run and not any(r.starts_run for r in retries)
    for record in (first, *retries):
        assert record.cost_usd == 0 and record.run_id is not None


async def test_it_prices_an_unknown_model_at_the_default_and_flags_it(make_agent, key, openai_settings, settings):
    settings.BILLING_DEFAULT_INPUT_PER_1M = Decimal("10")
    settings.BILLING_DEFAULT_OUTPUT_PER_1M = Decimal("30")
    await orm(make_agent, name="gpt", model="openai/brand-new")
    body = (await Api(key).post(CHAT.format("gpt"), {"message": "hello world"})).json()

    assert body["cost_usd"] == "0.00012000"  # 3 × 10 + 3 × 30 per 1M
    [record] = await orm(records)
    assert record.priced is False and record.cost_usd == Decimal("0.00012")


async def test_it_meters_a_stream_the_client_left(make_agent, key, openai_settings):
    """The client hangs up mid-stream (as in test_runtime): the run is cancelled, its tokens so far
    are counted offline and billed, marked estimated."""
    await orm(price)
    await orm(make_agent, name="gpt", model="openai/gpt-4o-mini")
    await post_and_hang_up(CHAT.format("gpt"), {"message": "a long one [gap:50] [tokens:200]", "stream": True}, key,
                           leave_when=lambda got: got.count(b"event: delta") >= 3)

    run = await orm(Run.objects.get)
    assert run.status == Run.Status.CANCELLED
    [record] = await orm(records)
    assert record.run_id == run.id and record.estimated and record.starts_run
    assert 3 <= record.completion_tokens < 200 and record.prompt_tokens > 0
    assert record.cost_usd == expected(record.prompt_tokens, record.completion_tokens) > 0
