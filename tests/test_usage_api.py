"""The prices admin API (admin role, upsert, decimal strings) and GET /api/v1/usage (totals,
grouping, scoping: a key sees its own usage, an admin key all)."""

from __future__ import annotations

import uuid
from datetime import datetime
from datetime import timezone as dt_timezone
from decimal import Decimal

import pytest
import time_machine

from agents.models import Agent
from billing.models import ModelPrice, UsageRecord
from conftest import Api, assert_error, orm
from governance.models import ApiKey

pytestmark = pytest.mark.django_db(transaction=True)

PRICES = "/api/v1/admin/prices"
USAGE = "/api/v1/usage"


# --- prices -------------------------------------------------------------------------------


async def test_it_upserts_a_price_for_admin_keys(make_key):
    admin = await orm(make_key, "admin")
    api = Api(admin)
    body = {"model": "openai/x", "input_per_1m": "0.15", "output_per_1m": "0.6",
            "effective_from": "2025-01-01T00:00:00Z"}
    created = await api.post(PRICES, body)
    assert created.status_code == 201, created.text
    assert created.json()["input_per_1m"] == "0.150000" and created.json()["cached_input_per_1m"] is None

    updated = await api.post(PRICES, {**body, "output_per_1m": "0.8", "cached_input_per_1m": "0.075"})
    assert updated.status_code == 200
    assert updated.json()["id"] == created.json()["id"]
    row = await orm(ModelPrice.objects.get, model="openai/x")
    assert (row.output_per_1m, row.cached_input_per_1m) == (Decimal("0.8"), Decimal("0.075"))

    now = await api.post(PRICES, {"model": "openai/x", "input_per_1m": "1", "output_per_1m": "2"})
    assert now.status_code == 201  # no effective_from: from now on, a new row
    listed = (await api.get(PRICES, params={"model": "openai/x"})).json()["data"]
    assert [p["input_per_1m"] for p in listed] == ["1.000000", "0.150000"]


async def test_it_names_the_bad_field_of_a_price(make_key):
    api = Api(await orm(make_key, "admin"))
    assert_error(await api.post(PRICES, {"model": "openai/x", "input_per_1m": "-1", "output_per_1m": "1"}),
                 400, param="input_per_1m")
    assert_error(await api.post(PRICES, {"model": "openai/x", "input_per_1m": "1"}), 400, param="output_per_1m")
    assert_error(await api.post(PRICES, {"model": "openai/x", "input_per_1m": "abc", "output_per_1m": "1"}),
                 400, param="input_per_1m")


async def test_it_keeps_prices_to_admin_keys(make_key):
    for role in ("client", "developer"):
        key = await orm(make_key, role)
        assert_error(await Api(key).get(PRICES), 403)
        assert_error(await Api(key).post(PRICES, {"model": "m", "input_per_1m": "1", "output_per_1m": "1"}), 403)
    assert_error(await Api().get(PRICES), 401)


# --- usage --------------------------------------------------------------------------------


def _usage(key_secret: str, agent: Agent, model: str, day: int, cost: str, *, run=None, prompt=10, completion=5):
    api_key = ApiKey.objects.get(prefix=key_secret.split("_")[1])
    return UsageRecord.objects.create(
        created_at=datetime(2025, 3, day, 12, tzinfo=dt_timezone.utc), api_key=api_key, agent=agent, model=model,
        prompt_tokens=prompt, completion_tokens=completion, cost_usd=Decimal(cost), request_id=str(run or uuid.uuid4()))


@pytest.fixture
def usage(make_key, make_agent):
    """Two keys, two agents, March 2025: alice 3 records (2 runs), bob 1."""
    from agents.models import Run

    alice, bob, admin = make_key(), make_key(), make_key("admin")
    one, two = make_agent(name="one"), make_agent(name="two")

    def run(key_secret, agent):
        return Run.objects.create(agent=agent, api_key=ApiKey.objects.get(prefix=key_secret.split("_")[1]),
                                  started_at=datetime(2025, 3, 1, tzinfo=dt_timezone.utc))

    r1, r2, r3 = run(alice, one), run(alice, two), run(bob, one)
    for record, r in [(_usage(alice, one, "openai/a", 1, "0.00000015"), r1),
                      (_usage(alice, one, "openai/b", 1, "0.10000000"), r1),
                      (_usage(alice, two, "openai/a", 2, "1.5"), r2),
                      (_usage(bob, one, "openai/a", 2, "2"), r3)]:
        record.starts_run = not UsageRecord.objects.filter(run=r).exists()  # the run's first record
        record.run = r
        record.save()
    return {"alice": alice, "bob": bob, "admin": admin}


async def test_it_totals_the_callers_own_usage(usage):
    body = (await Api(usage["alice"]).get(USAGE, params={"from": "2025-03-01", "to": "2025-03-31"})).json()
    assert body["total"] == {"requests": 2, "prompt_tokens": 30, "completion_tokens": 15, "cost_usd": "1.60000015"}

    # Another key's prefix finds nothing for a non-admin key.
    bob_prefix = usage["bob"].split("_")[1]
    body = (await Api(usage["alice"]).get(USAGE, params={"from": "2025-03-01", "to": "2025-03-31",
                                                          "key": bob_prefix})).json()
    assert body["total"]["requests"] == 0 and body["total"]["cost_usd"] == "0.00000000"


async def test_it_shows_admin_keys_all_usage_and_filters_by_key(usage):
    api = Api(usage["admin"])
    params = {"from": "2025-03-01", "to": "2025-03-31"}
    body = (await api.get(USAGE, params=params)).json()
    assert body["total"]["requests"] == 3 and body["total"]["cost_usd"] == "3.60000015"
    bob = (await api.get(USAGE, params={**params, "key": usage["bob"].split("_")[1]})).json()
    assert bob["total"] == {"requests": 1, "prompt_tokens": 10, "completion_tokens": 5, "cost_usd": "2.00000000"}


async def test_it_groups_usage(usage):
    api = Api(usage["admin"])
    params = {"from": "2025-03-01T00:00:00Z", "to": "2025-04-01T00:00:00Z"}
    by_day = (await api.get(USAGE, params={**params, "group_by": "day"})).json()["groups"]
    assert [(g["day"], g["requests"], g["cost_usd"]) for g in by_day] == [
        ("2025-03-01", 1, "0.10000015"), ("2025-03-02", 2, "3.50000000")]
    by_model = (await api.get(USAGE, params={**params, "group_by": "model"})).json()["groups"]
    # Alice's first run fell back from openai/a to openai/b: it counts under the model it started on.
    assert [(g["model"], g["requests"], g["cost_usd"]) for g in by_model] == [
        ("openai/a", 3, "3.50000015"), ("openai/b", 0, "0.10000000")]
    by_agent = (await api.get(USAGE, params={**params, "group_by": "agent", "model": "openai/a"})).json()["groups"]
    assert [(g["agent"], g["cost_usd"]) for g in by_agent] == [("one", "2.00000015"), ("two", "1.50000000")]
    by_key = (await Api(usage["alice"]).get(USAGE, params={**params, "group_by": "key"})).json()["groups"]
    assert [g["key"] for g in by_key] == [usage["alice"].split("_")[1]]


async def test_it_defaults_to_this_month_and_validates(usage):
    # The month the request is made in, UTC: the fixture's March 2025 until its last second...
    with time_machine.travel(datetime(2025, 3, 31, 23, 59, 59, tzinfo=dt_timezone.utc), tick=False):
        body = (await Api(usage["admin"]).get(USAGE)).json()
    assert (body["from"], body["to"]) == ("2025-03-01T00:00:00+00:00", "2025-04-01T00:00:00+00:00")
    assert body["total"]["requests"] == 3 and body["total"]["cost_usd"] == "3.60000015"
    # ...then April, without it (and December's month ends in the next year).
    with time_machine.travel(datetime(2025, 4, 1, 0, 0, 1, tzinfo=dt_timezone.utc), tick=False):
        body = (await Api(usage["admin"]).get(USAGE)).json()
    assert (body["from"], body["to"]) == ("2025-04-01T00:00:00+00:00", "2025-05-01T00:00:00+00:00")
    assert body["total"]["requests"] == 0
    with time_machine.travel(datetime(2025, 12, 31, 12, tzinfo=dt_timezone.utc), tick=False):
        body = (await Api(usage["admin"]).get(USAGE)).json()
    assert (body["from"], body["to"]) == ("2025-12-01T00:00:00+00:00", "2026-01-01T00:00:00+00:00")
    assert_error(await Api(usage["admin"]).get(USAGE, params={"from": "yesterday"}), 400, param="from")
    assert_error(await Api(usage["admin"]).get(USAGE, params={"group_by": "week"}), 400, param="group_by")
    assert_error(await Api().get(USAGE), 401)


# --- usage from the daily rollups ------------------------------------------------------------


def _at(day: int, hour: int, minute: int = 0) -> datetime:
    return datetime(2025, 3, day, hour, minute, tzinfo=dt_timezone.utc)


@pytest.fixture
def runs(make_key, make_agent):
    """March 2025: a run that falls back from openai/a to openai/b on the 10th, a run across
    midnight from the 10th to the 11th, a one-call run on the 11th, a record without a run."""
    from agents.models import Run

    alice, admin = make_key(), make_key("admin")
    agent = make_agent(name="fb")
    api_key = ApiKey.objects.get(prefix=alice.split("_")[1])

    def record(when, model, cost, run=None):
        # As metering writes them: the run's first record (created first) starts it.
        starts_run = run is not None and not UsageRecord.objects.filter(run=run).exists()
        return UsageRecord.objects.create(created_at=when, api_key=api_key, agent=agent, model=model, run=run,
                                          prompt_tokens=100, completion_tokens=10, cost_usd=Decimal(cost),
                                          request_id=str(uuid.uuid4()), starts_run=starts_run)

    def run(started):
        return Run.objects.create(agent=agent, api_key=api_key, started_at=started)

    fallback, night, single = run(_at(10, 9)), run(_at(10, 23)), run(_at(11, 8))
    record(_at(10, 9), "openai/a", "0", fallback)  # failed upstream, billed nothing
    record(_at(10, 9, 1), "openai/b", "0.5", fallback)
    record(_at(10, 23, 59), "openai/a", "0.25", night)
    record(_at(11, 0, 1), "openai/a", "0.25", night)
    record(_at(11, 8), "openai/b", "1", single)
    record(_at(11, 9), "openai/a", "0.125")
    return {"alice": alice, "admin": admin, "record": record, "run": run}


async def _all_groupings(api: Api, params: dict) -> dict:
    out = {}
    for group_by in (None, "day", "agent", "model", "key"):
        response = await api.get(USAGE, params={**params, **({"group_by": group_by} if group_by else {})})
        assert response.status_code == 200, response.text
        out[group_by] = response.json()
    return out


async def test_a_run_that_fell_back_to_another_model_is_one_request(runs):
    api = Api(runs["alice"])
    body = (await api.get(USAGE, params={"from": "2025-03-10", "to": "2025-03-10"})).json()
    # Day 10: the fallback run (two models) and the run that started before midnight.
    assert body["total"] == {"requests": 2, "prompt_tokens": 300, "completion_tokens": 30, "cost_usd": "0.75000000"}
    body = (await api.get(USAGE, params={"from": "2025-03-01", "to": "2025-03-31", "group_by": "day"})).json()
    assert body["total"]["requests"] == 3  # three runs; the record without a run is no request
    assert [(g["day"], g["requests"], g["cost_usd"]) for g in body["groups"]] == [
        ("2025-03-10", 2, "0.75000000"), ("2025-03-11", 1, "1.37500000")]
    by_model = (await api.get(USAGE, params={"from": "2025-03-01", "to": "2025-03-31", "group_by": "model"})).json()
    assert [(g["model"], g["requests"]) for g in by_model["groups"]] == [("openai/a", 2), ("openai/b", 1)]
    assert sum(g["requests"] for g in by_model["groups"]) == 3


async def test_rolled_up_days_answer_the_same_as_records(runs):
    from billing.rollups import rollup_day, usage_plan

    api = Api(runs["admin"])
    params = {"from": "2025-03-01", "to": "2025-03-31"}
    before = await _all_groupings(api, params)
    await orm(rollup_day, datetime(2025, 3, 10).date())  # the 10th from rollups, the 11th from records
    plan = await orm(usage_plan, _at(1, 0), datetime(2025, 4, 1, tzinfo=dt_timezone.utc))
    assert plan.rolled_days == 1 and plan.stale == ()
    assert await _all_groupings(api, params) == before
    await orm(rollup_day, datetime(2025, 3, 11).date())
    assert await _all_groupings(api, params) == before
    assert before[None]["total"]["requests"] == 3


async def test_a_late_record_after_the_rollup_stays_exact(runs):
    from billing.rollups import rollup_day, usage_plan

    api = Api(runs["admin"])
    params = {"from": "2025-03-10", "to": "2025-03-11", "group_by": "day"}
    for day in (10, 11):
        await orm(rollup_day, datetime(2025, 3, day).date())
    assert (await api.get(USAGE, params=params)).json()["total"]["requests"] == 3

    # Late writes into the rolled-up 10th: a new run, and another call of the run across midnight.
    late_run = await orm(runs["run"], _at(10, 12))
    await orm(runs["record"], _at(10, 12), "openai/b", "2", late_run)
    from agents.models import Run

    night = await orm(lambda: Run.objects.get(started_at=_at(10, 23)))
    await orm(runs["record"], _at(10, 23, 30), "openai/b", "0.5", night)
    plan = await orm(usage_plan, _at(10, 0), _at(12, 0))
    assert plan.stale == (datetime(2025, 3, 10).date(),)
    body = (await api.get(USAGE, params=params)).json()
    assert body["total"]["requests"] == 4 and body["total"]["cost_usd"] == "4.62500000"
    assert [(g["day"], g["requests"], g["cost_usd"]) for g in body["groups"]] == [
        ("2025-03-10", 3, "3.25000000"), ("2025-03-11", 1, "1.37500000")]
    # Rebuilt: the same answer from rollups alone.
    await orm(rollup_day, datetime(2025, 3, 10).date())
    assert (await orm(usage_plan, _at(10, 0), _at(12, 0))).raw == ()
    assert (await api.get(USAGE, params=params)).json() == body
