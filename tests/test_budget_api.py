"""The budgets admin REST API beyond create: one budget with its current period, PATCH of what
may change (audited, seen by the chat path at once), DELETE that disables, list filters, and
the JSON errors (403, 404, 400 naming the field) of each."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest
from django.core.cache import cache
from django.utils import timezone

from billing.budgets import BUDGETS_CACHE_KEY, _enabled_budgets, budget_create, period_start
from billing.models import Budget, BudgetSpend, ModelPrice
from conftest import Api, assert_error, orm
from governance.models import AuditLog
from governance.services import split_key

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("frozen_clock")]

BUDGETS = "/api/v1/admin/budgets"
CHAT = "/api/v1/agents/{}/chat"


def one(budget_id) -> str:
    return f"{BUDGETS}/{budget_id}"


async def patch(api: Api, path: str, body) -> object:
    return await api.request("PATCH", path, json=body)


@pytest.fixture
async def admin(make_key) -> str:
    return await orm(make_key, role="admin")


def _global_budget(limit: str = "10", **kwargs) -> Budget:
    return budget_create(scope="global", period="month", limit_usd=Decimal(limit), **kwargs)


# --- GET one ----------------------------------------------------------------------------------


async def test_it_shows_one_budget_with_its_current_period(admin):
    budget = await orm(_global_budget, "8", name="all", alert_emails=["ops@example.com"])
    await orm(BudgetSpend.objects.create, budget=budget, period_start=period_start("month", timezone.now()),
              spent_usd=Decimal("2"), reserved_usd=Decimal("1"))

    response = await Api(admin).get(one(budget.id))

    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["id"], body["name"], body["scope"], body["period"]) == (budget.id, "all", "global", "month")
    assert (body["limit_usd"], body["spent_usd"], body["reserved_usd"], body["remaining_usd"]) == \
        ("8.00000000", "2.00000000", "1.00000000", "5.00000000")
    assert body["percent_used"] == 25.0
    assert body["alert_emails"] == ["ops@example.com"] and body["enabled"] is True
    assert body["period_start"].startswith(period_start("month", timezone.now()).date().isoformat())


async def test_it_answers_404_for_an_unknown_budget(admin):
    api = Api(admin)

    for method in ("GET", "PATCH", "DELETE"):
        kwargs = {"json": {"limit_usd": "1"}} if method == "PATCH" else {}
        assert_error(await api.request(method, one(999999), **kwargs), 404, "budget_not_found")
    assert_error(await api.get(f"{BUDGETS}/abc"), 404)


async def test_it_refuses_the_budget_api_to_other_roles(make_key):
    budget = await orm(_global_budget)
    developer = Api(await orm(make_key, role="developer"))

    assert_error(await developer.get(one(budget.id)), 403)
    assert_error(await patch(developer, one(budget.id), {"limit_usd": "99"}), 403)
    assert_error(await developer.delete(one(budget.id)), 403)
    assert_error(await Api().get(one(budget.id)), 401)
    stored = await orm(Budget.objects.get, pk=budget.id)
    assert stored.limit_usd == Decimal("10") and stored.enabled


# --- PATCH --------------------------------------------------------------------------------------


async def test_it_changes_a_budget_and_audits_it_with_the_key_as_actor(admin):
    budget = await orm(_global_budget, alert_webhook_url="https://hooks.example.com/t/secret-token")

    response = await patch(Api(admin), one(budget.id), {
        "limit_usd": "25.5", "hard": False, "name": "monthly cap", "alert_thresholds": [90, 50, 90],
        "alert_emails": ["a@example.com", "a@example.com", "b@example.com"], "alert_webhook_url": ""})

    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["limit_usd"], body["hard"], body["name"]) == ("25.50000000", False, "monthly cap")
    assert body["alert_thresholds"] == [50, 90] and body["alert_emails"] == ["a@example.com", "b@example.com"]
    assert body["alert_webhook_url"] == "" and body["scope"] == "global" and body["period"] == "month"
    stored = await orm(Budget.objects.get, pk=budget.id)
    assert (stored.limit_usd, stored.hard, stored.alert_emails) == (Decimal("25.5"), False,
                                                                    "a@example.com, b@example.com")
    entry = await orm(lambda: AuditLog.objects.filter(action="budget.updated").get())
    assert entry.actor == f"key:{split_key(admin)}" and entry.target == f"budget:{budget.id}"
    changed = entry.details["changed"]
    assert changed["limit_usd"] == {"from": "10.00000000", "to": "25.50000000"}
    assert changed["hard"] == {"from": True, "to": False}
    # Recipients and the webhook URL (it may carry a token) are never logged.
    assert "secret-token" not in str(entry.details) and "a@example.com" not in str(entry.details)
    assert changed["alert_webhook_url"] == "changed"


async def test_an_unchanged_patch_writes_no_audit_entry(admin):
    budget = await orm(_global_budget)

    response = await patch(Api(admin), one(budget.id), {"limit_usd": "10.000", "hard": True})

    assert response.status_code == 200, response.text
    assert not await orm(lambda: AuditLog.objects.filter(action="budget.updated").exists())


@pytest.mark.parametrize("field, value", [("scope", "agent"), ("period", "day"), ("key", "abc"),
                                          ("agent", "echo")])
async def test_it_refuses_to_change_what_a_budget_is_for(admin, field, value):
    budget = await orm(_global_budget)

    response = await patch(Api(admin), one(budget.id), {field: value, "limit_usd": "99"})

    error = assert_error(response, 400, param=field)
    assert "cannot be changed" in error["message"]
    assert (await orm(Budget.objects.get, pk=budget.id)).limit_usd == Decimal("10")


@pytest.mark.parametrize("body, param", [
    ({"limit_usd": "-1"}, "limit_usd"),
    ({"limit_usd": "lots"}, "limit_usd"),
    ({"limit_usd": None}, "limit_usd"),
    ({"hard": "maybe"}, "hard"),
    ({"enabled": None}, "enabled"),
    ({"alert_thresholds": [0]}, "alert_thresholds[0]"),
    ({"alert_thresholds": "50"}, "alert_thresholds"),
    ({"alert_emails": ["ok@example.com", "not an address"]}, "alert_emails[1]"),
    ({"alert_webhook_url": "ftp://example.com/x"}, "alert_webhook_url"),
    ({"name": "x" * 101}, "name"),
    ({"colour": "red"}, "colour"),
    ({"spent_usd": "0"}, "spent_usd"),
])
async def test_it_names_the_invalid_field_of_a_patch(admin, body, param):
    budget = await orm(_global_budget)

    response = await patch(Api(admin), one(budget.id), body)

    assert_error(response, 400, param=param)
    stored = await orm(Budget.objects.get, pk=budget.id)
    assert (stored.limit_usd, stored.hard, stored.enabled) == (Decimal("10"), True, True)


async def test_it_answers_a_malformed_patch_body_with_a_json_error(admin):
    budget = await orm(_global_budget)
    api = Api(admin)

    assert_error(await patch(api, one(budget.id), ["limit_usd", "1"]), 400)
    assert_error(await api.request("PATCH", one(budget.id), content=b"{not json",
                                   headers={"Content-Type": "application/json"}), 400)


async def test_the_chat_path_sees_a_patch_at_once(admin, make_agent, make_key):
    await orm(make_agent, name="echo")  # local/demo: answers offline
    await orm(ModelPrice.objects.create, model="local/demo", input_per_1m=Decimal("1000"),
              output_per_1m=Decimal("1000"), effective_from=timezone.now() - timedelta(seconds=1), source="test")
    client = Api(await orm(make_key))
    budget = await orm(_global_budget, "0")
    assert await orm(_enabled_budgets)  # cached: the hot path would keep reading this entry
    assert_error(await client.post(CHAT.format("echo"), {"message": "hi"}), 402, "budget_exceeded")

    assert (await patch(Api(admin), one(budget.id), {"enabled": False})).status_code == 200

    assert await orm(cache.get, BUDGETS_CACHE_KEY) is None
    response = await client.post(CHAT.format("echo"), {"message": "hi"})
    assert response.status_code == 200, response.text

    assert (await patch(Api(admin), one(budget.id), {"enabled": True})).status_code == 200
    assert_error(await client.post(CHAT.format("echo"), {"message": "hi"}), 402, "budget_exceeded")


# --- DELETE ------------------------------------------------------------------------------------


async def test_delete_disables_the_budget_and_keeps_its_spend(admin):
    budget = await orm(_global_budget)
    await orm(BudgetSpend.objects.create, budget=budget, period_start=period_start("month", timezone.now()),
              spent_usd=Decimal("3"))
    api = Api(admin)

    response = await api.delete(one(budget.id))

    assert response.status_code == 204 and response.content == b""
    stored = await orm(Budget.objects.get, pk=budget.id)
    assert stored.enabled is False
    assert await orm(lambda: BudgetSpend.objects.get(budget=budget).spent_usd) == Decimal("3")
    body = (await api.get(one(budget.id))).json()
    assert body["enabled"] is False and body["spent_usd"] == "3.00000000"
    entry = await orm(lambda: AuditLog.objects.filter(action="budget.disabled").get())
    assert entry.actor == f"key:{split_key(admin)}" and entry.details["changed"]["enabled"] == \
        {"from": True, "to": False}
    # Again: the same answer, nothing more to audit.
    assert (await api.delete(one(budget.id))).status_code == 204
    assert await orm(AuditLog.objects.filter(action="budget.disabled").count) == 1


# --- list filters ------------------------------------------------------------------------------


async def test_it_filters_and_pages_the_budget_list(admin, make_agent, make_key):
    await orm(make_agent, name="echo")
    await orm(make_agent, name="other")
    client = await orm(make_key)
    monthly = await orm(_global_budget)
    daily = await orm(budget_create, scope="global", period="day", limit_usd=Decimal("1"))
    echo = await orm(budget_create, scope="agent", agent_name="echo", period="day", limit_usd=Decimal("1"))
    await orm(budget_create, scope="agent", agent_name="other", period="week", limit_usd=Decimal("1"))
    keyed = await orm(budget_create, scope="key", key_prefix=split_key(client), period="total",
                      limit_usd=Decimal("1"))
    await orm(Budget.objects.filter(pk=daily.id).update, enabled=False)
    api = Api(admin)

    async def ids(**params) -> list[int]:
        response = await api.get(BUDGETS, params=params)
        assert response.status_code == 200, response.text
        return [b["id"] for b in response.json()["results"]]

    assert await ids(scope="global") == [monthly.id, daily.id]
    assert await ids(period="day") == [echo.id, daily.id]  # by scope, then id
    assert await ids(enabled="false") == [daily.id]
    assert daily.id not in await ids(enabled="true") and len(await ids(enabled="true")) == 4
    assert await ids(agent="echo") == [echo.id]
    assert await ids(key=split_key(client)) == [keyed.id]
    assert await ids(scope="agent", period="week", agent="echo") == []
    page = (await api.get(BUDGETS, params={"limit": 2, "offset": 1})).json()
    assert page["count"] == 5 and len(page["results"]) == 2 and page["next"] and page["previous"]
    assert_error(await api.get(BUDGETS, params={"scope": "galaxy"}), 400, param="scope")
    assert_error(await api.get(BUDGETS, params={"enabled": "perhaps"}), 400, param="enabled")
