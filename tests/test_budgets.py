"""Budgets: UTC periods, worst-case reservations, 402 before the model is called, settlement of
the actual cost, release on refusal, the admin and caller REST API, and the concurrency test
(120 requests, 30 at once, against a hard budget that fits a few dozen) in one process on the
test database and with two Daphne workers on PostgreSQL + Redis."""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from datetime import datetime, timedelta
from datetime import timezone as dt_timezone
from decimal import Decimal

import httpx
import pytest
from django.conf import settings as django_settings
from django.db import connection
from django.utils import timezone

from agentplatform.errors import PlatformError
from agents.models import Run
from billing.budgets import (
    budget_create,
    budget_release,
    budget_reserve,
    budget_settle,
    estimate_prompt_tokens,
    period_end,
    period_start,
    worst_case_cost,
)
from billing.models import Budget, BudgetSpend, ModelPrice
from conftest import Api, assert_error, orm
from governance.models import ApiKey
from governance.services import split_key

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("frozen_clock")]

CHAT = "/api/v1/agents/{}/chat"
MODEL = "openai/gpt-4o-mini"
# Dear output, cheap input: the actual cost of a capped reply is close to the worst case, so
# the budget really runs out during the burst.
INPUT_PER_1M = Decimal("100")
OUTPUT_PER_1M = Decimal("2000")
MAX_TOKENS = 20
# 30 words of 8 letters: the fake upstream counts 31 prompt tokens, we estimate more (bytes / 4).
LONG_MESSAGE = " ".join(["abcdefgh"] * 30)


def set_price(model: str = MODEL, input_per_1m: Decimal = INPUT_PER_1M, output_per_1m: Decimal = OUTPUT_PER_1M):
    # Newer than any seeded price, so it is the one that applies now.
    return ModelPrice.objects.create(model=model, input_per_1m=input_per_1m, output_per_1m=output_per_1m,
                                     effective_from=timezone.now() - timedelta(seconds=1), source="test")


def spend_of(budget_id: int) -> BudgetSpend:
    return BudgetSpend.objects.get(budget_id=budget_id)


def prefix_of(secret: str) -> str:
    return split_key(secret)


def request_worst_case(message: str = LONG_MESSAGE) -> Decimal:
    return worst_case_cost(models=[MODEL], prompt_tokens=estimate_prompt_tokens([{"role": "user", "content": message}]),
                           max_tokens=MAX_TOKENS)


# --- periods and the worst case --------------------------------------------------------------


def test_it_starts_periods_at_utc_boundaries():
    at = datetime(2026, 11, 26, 23, 30, tzinfo=dt_timezone(timedelta(hours=-5)))  # Friday 04:30 UTC

    assert period_start("day", at) == datetime(2026, 11, 27, tzinfo=dt_timezone.utc)
    assert period_start("week", at) == datetime(2026, 11, 23, tzinfo=dt_timezone.utc)  # Monday
    assert period_start("month", at) == datetime(2026, 11, 1, tzinfo=dt_timezone.utc)
    assert period_start("total", at) == period_start("total", datetime(2031, 1, 1, tzinfo=dt_timezone.utc))
    assert period_end("month", datetime(2026, 12, 31, 23, 59, tzinfo=dt_timezone.utc)) == \
        datetime(2027, 1, 1, tzinfo=dt_timezone.utc)
    assert period_end("week", at) == datetime(2026, 11, 30, tzinfo=dt_timezone.utc)
    assert period_end("total", at) is None


def test_it_estimates_prompt_tokens_from_bytes_with_a_margin():
    # 400 ASCII bytes → 100 tokens, + 4 for the message, × 1.1 → 115 (rounded up), + 32.
    assert estimate_prompt_tokens([{"role": "user", "content": "a" * 400}]) == 147
    # Non-Latin text counts by UTF-8 bytes: 100 three-byte characters are 75 tokens, not 25.
    assert estimate_prompt_tokens([{"role": "user", "content": "語" * 100}]) == \
        estimate_prompt_tokens([{"role": "user", "content": "a" * 300}])


def test_it_takes_the_dearest_of_the_model_and_its_fallbacks(db):
    set_price("openai/cheap", Decimal("1"), Decimal("2"))
    set_price("openai/dear", Decimal("10"), Decimal("30"))

    cheap = worst_case_cost(models=["openai/cheap"], prompt_tokens=1000, max_tokens=500)
    both = worst_case_cost(models=["openai/cheap", "openai/dear"], prompt_tokens=1000, max_tokens=500)

    assert cheap == Decimal("0.002")  # 1000 × 1/1M + 500 × 2/1M
    assert both == Decimal("0.025")   # 1000 × 10/1M + 500 × 30/1M
    # Three calls of a tool loop: the prompt grows by each earlier answer.
    assert worst_case_cost(models=["openai/cheap"], prompt_tokens=1000, max_tokens=500, calls=3) == \
        Decimal("0.001") + Decimal("0.0015") + Decimal("0.002") + 3 * Decimal("0.001")


# --- reserve, settle, release (services) ---------------------------------------------------


def test_it_reserves_on_every_applicable_budget_and_settles_exactly(make_agent, make_key):
    agent = make_agent(name="echo", model=MODEL)
    key_id = ApiKey.objects.get(prefix=prefix_of(make_key())).id
    other_agent = make_agent(name="other")
    glob = budget_create(scope="global", period="month", limit_usd=Decimal("10"))
    mine = budget_create(scope="agent", agent_name="echo", period="day", limit_usd=Decimal("1"), hard=False)
    theirs = budget_create(scope="agent", agent_name=other_agent.name, period="day", limit_usd=Decimal("1"))

    reservation = budget_reserve(key_id=key_id, agent_id=agent.id, amount=Decimal("0.25"))

    assert reservation is not None and reservation.amount == Decimal("0.25")
    assert spend_of(glob.id).reserved_usd == Decimal("0.25")
    assert spend_of(mine.id).reserved_usd == Decimal("0.25")
    assert not BudgetSpend.objects.filter(budget=theirs).exists()

    budget_settle(reservation=reservation, actual_usd=Decimal("0.12345678"))

    for budget in (glob, mine):
        spend = spend_of(budget.id)
        assert (spend.reserved_usd, spend.spent_usd) == (Decimal("0"), Decimal("0.12345678"))
    assert spend_of(glob.id).period_start == period_start("month", timezone.now())


def test_it_refuses_what_a_hard_budget_cannot_pay_and_reserves_nothing(make_agent, make_key):
    agent = make_agent(name="echo", model=MODEL)
    secret = make_key()
    key_id = ApiKey.objects.get(prefix=prefix_of(secret)).id
    soft = budget_create(scope="global", period="total", limit_usd=Decimal("0.01"), hard=False)
    hard = budget_create(scope="key", key_prefix=prefix_of(secret), period="week", limit_usd=Decimal("1"))
    budget_reserve(key_id=key_id, agent_id=agent.id, amount=Decimal("0.6"))  # soft goes over: fine

    with pytest.raises(PlatformError) as refused:
        budget_reserve(key_id=key_id, agent_id=agent.id, amount=Decimal("0.5"))

    error = refused.value
    assert (error.http_status, error.type, error.code) == (402, "budget_exceeded", "budget_exceeded")
    assert f"key {prefix_of(secret)!r}" in error.message and "0.400000 USD left" in error.message
    assert spend_of(hard.id).reserved_usd == Decimal("0.6")
    assert spend_of(soft.id).reserved_usd == Decimal("0.6")
    # Exactly what is left still fits.
    assert budget_reserve(key_id=key_id, agent_id=agent.id, amount=Decimal("0.4")) is not None


def test_it_releases_a_reservation_unspent(make_agent):
    agent = make_agent(name="echo")
    budget = budget_create(scope="agent", agent_name="echo", period="day", limit_usd=Decimal("1"))
    reservation = budget_reserve(key_id=None, agent_id=agent.id, amount=Decimal("0.7"))

    budget_release(reservation=reservation)

    spend = spend_of(budget.id)
    assert (spend.reserved_usd, spend.spent_usd) == (Decimal("0"), Decimal("0"))
    assert budget_reserve(key_id=None, agent_id=agent.id, amount=Decimal("1")) is not None


def test_it_reserves_nothing_without_budgets(make_agent):
    agent = make_agent(name="echo")
    assert budget_reserve(key_id=None, agent_id=agent.id, amount=Decimal("5")) is None
    assert not BudgetSpend.objects.exists()


# --- through the chat API -------------------------------------------------------------------


@pytest.fixture
async def priced_agent(make_agent, openai_settings):
    await orm(set_price)
    return await orm(make_agent, name="echo", model=MODEL, max_tokens=MAX_TOKENS)


async def test_it_answers_402_before_the_model_is_called(priced_agent, make_key, fake_upstream):
    key = await orm(make_key)
    worst = await orm(request_worst_case)
    budget = await orm(budget_create, scope="global", period="day", limit_usd=worst / 2)

    response = await Api(key).post(CHAT.format("echo"), {"message": LONG_MESSAGE})

    error = assert_error(response, 402, "budget_exceeded")
    assert error["type"] == "budget_exceeded"
    assert "global day" in error["message"]
    assert error["details"]["required_usd"] == str(worst)
    assert fake_upstream.stats()["requests"] == 0
    # The refused reservation rolled back whole (the period's row included).
    assert not await orm(BudgetSpend.objects.filter(budget_id=budget.id).exists)


async def test_it_settles_a_run_to_its_actual_cost(priced_agent, make_key, fake_upstream):
    key = await orm(make_key)
    budget = await orm(budget_create, scope="agent", agent_name="echo", period="month", limit_usd=Decimal("5"))

    response = await Api(key).post(CHAT.format("echo"), {"message": LONG_MESSAGE})

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["cost_usd"] is not None, "the metering stage prices the run"
    spend = await orm(spend_of, budget.id)
    assert spend.reserved_usd == Decimal("0")
    assert spend.spent_usd == Decimal(body["cost_usd"]) > 0
    assert spend.spent_usd <= await orm(request_worst_case)
    assert fake_upstream.stats()["requests"] == 1


class RefusingStage:
    """A later stage that refuses every turn (as a guard would)."""

    async def before(self, turn):
        raise PlatformError("Refused by a later stage.", code="refused_later", http_status=403)


async def test_it_releases_the_reservation_when_a_later_stage_refuses(priced_agent, make_key, fake_upstream,
                                                                   settings):
    settings.AGENT_PIPELINE_STAGES = [*settings.AGENT_PIPELINE_STAGES, f"{__name__}.RefusingStage"]
    key = await orm(make_key)
    budget = await orm(budget_create, scope="global", period="day", limit_usd=Decimal("5"))

    response = await Api(key).post(CHAT.format("echo"), {"message": LONG_MESSAGE})

    assert_error(response, 403, "refused_later")
    # Reservations are made after every stage's `before` (in the run's start): a refusal there
    # reserves nothing at all, and records no run.
    spends = await orm(lambda: list(BudgetSpend.objects.filter(budget_id=budget.id)
                                    .values_list("reserved_usd", "spent_usd")))
    assert all(row == (Decimal("0"), Decimal("0")) for row in spends)
    assert await orm(lambda: Run.objects.count()) == 0
    assert fake_upstream.stats()["requests"] == 0


async def test_it_settles_a_failed_run(make_agent, make_key, openai_settings, fake_upstream):
    await orm(set_price, "openai/fault-500")
    await orm(make_agent, name="broken", model="openai/fault-500", max_tokens=MAX_TOKENS)
    key = await orm(make_key)
    budget = await orm(budget_create, scope="global", period="day", limit_usd=Decimal("5"))

    response = await Api(key).post(CHAT.format("broken"), {"message": "hello"})

    assert response.status_code >= 500
    spend = await orm(spend_of, budget.id)
    assert spend.reserved_usd == Decimal("0")


# --- REST ----------------------------------------------------------------------------------


async def test_it_creates_and_lists_budgets_for_admins(make_agent, make_key):
    await orm(make_agent, name="echo")
    admin = await orm(make_key, role="admin")
    client = await orm(make_key)
    api = Api(admin)

    created = await api.post("/api/v1/admin/budgets", {"scope": "key_agent", "key": prefix_of(client), "agent": "echo",
                                                       "period": "week", "limit_usd": "12.5", "hard": False})

    assert created.status_code == 201, created.text
    body = created.json()
    assert body["scope"] == "key_agent" and body["key"] == prefix_of(client) and body["agent"] == "echo"
    assert (body["limit_usd"], body["spent_usd"], body["remaining_usd"]) == ("12.50000000", "0.00000000",
                                                                           "12.50000000")
    assert body["hard"] is False and body["alert_thresholds"] == [50, 75, 90, 100]
    stored = await orm(Budget.objects.get, pk=body["id"])
    assert stored.limit_usd == Decimal("12.5")

    listed = (await api.get("/api/v1/admin/budgets")).json()
    assert [b["id"] for b in listed["results"]] == [body["id"]]


@pytest.mark.parametrize("body, param", [
    ({"scope": "key", "period": "day", "limit_usd": "1"}, "key"),
    ({"scope": "agent", "period": "day", "limit_usd": "1"}, "agent"),
    ({"scope": "global", "agent": "echo", "period": "day", "limit_usd": "1"}, "agent"),
    ({"scope": "galaxy", "period": "day", "limit_usd": "1"}, "scope"),
    ({"scope": "global", "period": "year", "limit_usd": "1"}, "period"),
    ({"scope": "global", "period": "day", "limit_usd": "-1"}, "limit_usd"),
    ({"scope": "global", "period": "day", "limit_usd": "lots"}, "limit_usd"),
])
async def test_it_names_the_invalid_field(make_agent, make_key, body, param):
    await orm(make_agent, name="echo")
    admin = await orm(make_key, role="admin")

    response = await Api(admin).post("/api/v1/admin/budgets", body)

    assert_error(response, 400, param=param)
    assert await orm(Budget.objects.count) == 0


async def test_it_refuses_budget_admin_to_other_roles(make_key):
    developer = await orm(make_key, role="developer")

    response = await Api(developer).post("/api/v1/admin/budgets",
                                         {"scope": "global", "period": "day", "limit_usd": "1"})

    assert_error(response, 403)
    assert_error(await Api(developer).get("/api/v1/admin/budgets"), 403)


async def test_it_shows_a_key_the_budgets_that_apply_to_it(priced_agent, make_key):
    key = await orm(make_key, agents=["echo"])
    other = await orm(make_key)
    glob = await orm(budget_create, scope="global", period="month", limit_usd=Decimal("5"))
    mine = await orm(budget_create, scope="key", key_prefix=prefix_of(key), period="day", limit_usd=Decimal("2"))
    await orm(budget_create, scope="key", key_prefix=prefix_of(other), period="day", limit_usd=Decimal("2"))
    response = await Api(key).post(CHAT.format("echo"), {"message": LONG_MESSAGE})
    cost = Decimal(response.json()["cost_usd"])

    body = (await Api(key).get("/api/v1/budgets")).json()

    by_id = {b["id"]: b for b in body["budgets"]}
    assert set(by_id) == {glob.id, mine.id}
    assert by_id[mine.id]["limit_usd"] == "2.00000000"
    assert Decimal(by_id[mine.id]["spent_usd"]) == cost
    assert by_id[mine.id]["reserved_usd"] == "0.00000000"
    assert Decimal(by_id[mine.id]["remaining_usd"]) == Decimal("2") - cost
    assert by_id[glob.id]["period"] == "month"


# --- concurrency ---------------------------------------------------------------------------

TOTAL_REQUESTS = 120
AT_ONCE = 30


def _figures(statuses: list[int], spent: Decimal, limit: Decimal, where: str) -> str:
    admitted, refused = statuses.count(200), statuses.count(402)
    line = (f"budget concurrency ({where}): {TOTAL_REQUESTS} requests, {AT_ONCE} at once: admitted {admitted}, "
            f"refused {refused} (402), settled spend {spent} USD of limit {limit} USD")
    print("\n" + line)
    return line


async def test_it_never_overspends_under_concurrency(priced_agent, make_key, fake_upstream):
    key = await orm(make_key)
    worst = await orm(request_worst_case)
    limit = (worst * 30).quantize(Decimal("0.00000001"))
    budget = await orm(budget_create, scope="agent", agent_name="echo", period="day", limit_usd=limit)
    api = Api(key)
    gate = asyncio.Semaphore(AT_ONCE)

    async def one() -> int:
        async with gate:
            response = await api.post(CHAT.format("echo"), {"message": LONG_MESSAGE})
            if response.status_code == 402:
                assert_error(response, 402, "budget_exceeded")
            return response.status_code

    statuses = await asyncio.gather(*(one() for _ in range(TOTAL_REQUESTS)))

    spend = await orm(spend_of, budget.id)
    line = _figures(list(statuses), spend.spent_usd, limit, connection.vendor)
    assert set(statuses) <= {200, 402}, line
    assert spend.reserved_usd == 0, line
    assert spend.spent_usd <= limit, line
    assert statuses.count(200) >= 30 and statuses.count(402) > 0, line
    # Refused requests never reached the model.
    assert fake_upstream.stats()["requests"] == statuses.count(200), line


@pytest.fixture
def two_workers(request):
    if connection.vendor != "postgresql" or not os.environ.get("DATABASE_URL", "").startswith("postgres") \
            or not django_settings.REDIS_URL:
        pytest.skip("two-worker budget test needs DATABASE_URL=postgres://... (shared by the workers) and REDIS_URL")
    return request.getfixturevalue("start_workers")


@pytest.mark.redis
@pytest.mark.postgres
@pytest.mark.slow
async def test_it_never_overspends_across_two_workers(two_workers, fake_upstream, openai_settings):
    workers = two_workers(agents=[{"name": "echo", "model": MODEL, "max_tokens": MAX_TOKENS}], keys=[{}])
    await orm(set_price)
    worst = await orm(request_worst_case)
    limit = (worst * 30).quantize(Decimal("0.00000001"))
    # `total`: the servers keep their own clocks, and a daily budget would turn over at midnight.
    budget = await orm(budget_create, scope="global", period="total", limit_usd=limit)
    fake_upstream.reset()
    gate = asyncio.Semaphore(AT_ONCE)
    key = workers.keys[0]

    async with httpx.AsyncClient(timeout=60) as client:
        async def one(i: int) -> int:
            async with gate:
                response = await client.post(f"{workers.urls[i % 2]}{CHAT.format('echo')}", json={"message": LONG_MESSAGE},
                                             headers={"Authorization": f"Bearer {key}"})
                return i % 2, response.status_code

        results = await asyncio.gather(*(one(i) for i in range(TOTAL_REQUESTS)))

    statuses = [status for _, status in results]
    spend = await orm(spend_of, budget.id)
    per_worker = [sum(1 for w, status in results if w == n and status == 200) for n in (0, 1)]
    line = _figures(statuses, spend.spent_usd, limit, f"two daphne workers, PostgreSQL + Redis; "
                                                      f"admitted per worker {per_worker}")
    assert set(statuses) <= {200, 402}, f"{line}; statuses {sorted(Counter(statuses).items())}\n{workers.log_tail()}"
    assert spend.reserved_usd == 0, line
    assert spend.spent_usd <= limit, line
    assert statuses.count(200) >= 30 and statuses.count(402) > 0, line
    assert all(per_worker), line
    assert fake_upstream.stats()["requests"] == statuses.count(200), line


from test_ratelimit import start_workers  # noqa: E402,F401  (the fixture, shared with the rate-limit tests)
