"""Budget alerts: each threshold fires once per period (across many chat turns, settlements and
the beat scan), again in the next period, for soft and hard budgets; deliveries by e-mail
(locmem backend) and to a real local webhook server (JSON body, HMAC signature), retries, dead
letters, the admin pages and retry action; the beat tasks (period rollover releasing stale
reservations, the rollup); the budget API's alert fields.

Celery runs eagerly here on both lanes (the `eager_celery` fixture: with REDIS_URL set the
broker is Redis and nothing would consume); tests/test_celery_worker.py runs a real worker."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import threading
import time
from datetime import timedelta
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

import pytest
from django.urls import reverse
from django.utils import timezone

from agentplatform.celery import app as celery_app
from billing.alerts import check_budget_alerts
from billing.budgets import budget_create, budget_reserve, budget_settle, period_start
from billing.models import AlertDelivery, BudgetAlert, BudgetSpend, ModelPrice, UsageRecord, UsageRollup
from billing.tasks import budget_period_rollover_task, check_budget_alerts_task, rollup_usage_task
from conftest import Api, assert_error, orm
from governance.models import AuditLog

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("frozen_clock", "eager_celery")]

CHAT = "/api/v1/agents/{}/chat"
MODEL = "openai/gpt-4o-mini"
SECRET = "whsec-test-0123456789"


# --- a real webhook receiver ---------------------------------------------------------------


class Hook:
    """A local HTTP server recording each POST; answers the statuses given in turn (the last
    one repeats)."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = list(statuses)
        self.received: list[dict] = []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                hook.received.append({"headers": {k.lower(): v for k, v in self.headers.items()}, "body": body})
                status = hook.statuses.pop(0) if len(hook.statuses) > 1 else hook.statuses[0]
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts?token=abc"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hook_server():
    hooks: list[Hook] = []

    def start(*statuses: int) -> Hook:
        hook = Hook(list(statuses) or [200])
        hooks.append(hook)
        return hook

    yield start
    for hook in hooks:
        hook.close()


def wait_until(check: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
    """Poll `check` (deliveries run on a background thread in eager mode) until it is truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def delivery_in(status: str, channel: str | None = None) -> Callable[[], list[AlertDelivery]]:
    def check() -> list[AlertDelivery]:
        rows = AlertDelivery.objects.filter(status=status)
        if channel:
            rows = rows.filter(channel=channel)
        return list(rows)

    return check


def fired(budget_id: int) -> list[tuple]:
    return list(BudgetAlert.objects.filter(budget_id=budget_id).order_by("period_start", "threshold")
                .values_list("period_start", "threshold"))


def audits(action: str) -> list[AuditLog]:
    return list(AuditLog.objects.filter(action=action).order_by("id"))


def spend(amount: str, *, at=None, agent_id: int | None = None) -> None:
    """Reserve and settle `amount` USD on the budgets that apply (the chat path's two calls)."""
    reservation = budget_reserve(key_id=None, agent_id=agent_id, amount=Decimal(amount), now=at)
    assert reservation is not None
    budget_settle(reservation=reservation, actual_usd=Decimal(amount))


# --- through the chat API ------------------------------------------------------------------


@pytest.fixture
async def priced_agent(make_agent, openai_settings):
    def setup():
        ModelPrice.objects.create(model=MODEL, input_per_1m=Decimal("100"), output_per_1m=Decimal("2000"),
                                  effective_from=timezone.now() - timedelta(seconds=1), source="test")
        return make_agent(name="echo", model=MODEL, max_tokens=20)

    return await orm(setup)


async def test_it_alerts_once_per_threshold_across_many_turns(priced_agent, make_key, settings, mailoutbox):
    settings.BUDGET_ALERT_EMAILS = ["finance@example.com"]
    key = await orm(make_key)
    api = Api(key)
    first = await api.post(CHAT.format("echo"), {"message": "how much is this"})
    cost = Decimal(first.json()["cost_usd"])
    assert cost > 0
    # Soft: turns keep being served past 100 %; each turn moves the spend by a quarter of the limit.
    budget = await orm(budget_create, scope="agent", agent_name="echo", period="month", limit_usd=cost * 4,
                       hard=False)

    seen = []
    for _ in range(8):
        response = await api.post(CHAT.format("echo"), {"message": "how much is this"})
        assert response.status_code == 200, response.text
        assert Decimal(response.json()["cost_usd"]) == cost
        seen.append([t for _, t in await orm(fired, budget.id)])

    assert seen == [[], [50], [50, 75], [50, 75, 90, 100], *[[50, 75, 90, 100]] * 4]
    alerts = await orm(lambda: list(BudgetAlert.objects.filter(budget=budget).order_by("threshold")))
    start = period_start("month", timezone.now())
    assert {a.period_start for a in alerts} == {start}
    assert [a.spent_usd for a in alerts] == [cost * 2, cost * 3, cost * 4, cost * 4]
    entries = await orm(audits, "budget.alert")
    assert [e.details["threshold"] for e in entries] == [50, 75, 90, 100]
    assert all(e.target == f"budget:{budget.id}" for e in entries)
    # One e-mail per alert, to the default recipients.
    sent = await orm(wait_until, lambda: len(delivery_in("sent", "email")()) == 4, what="4 e-mails")
    assert sent
    assert sorted(m.subject for m in mailoutbox) == sorted(
        f"Budget alert: agent 'echo' month reached {t} % of {cost * 4:.2f} USD" for t in (50, 75, 90, 100))
    assert all(m.to == ["finance@example.com"] for m in mailoutbox)


async def test_a_hard_budget_alerts_and_a_refused_turn_fires_nothing(priced_agent, make_key):
    key = await orm(make_key)
    api = Api(key)
    cost = Decimal((await api.post(CHAT.format("echo"), {"message": "hello"})).json()["cost_usd"])
    budget = await orm(budget_create, scope="global", period="day", limit_usd=Decimal("1"))
    start = period_start("day", timezone.now())
    # Earlier traffic spent just under half of the limit.
    await orm(BudgetSpend.objects.create, budget=budget, period_start=start, spent_usd=Decimal("0.5") - cost / 2)

    assert (await api.post(CHAT.format("echo"), {"message": "hello"})).status_code == 200
    assert await orm(fired, budget.id) == [(start, 50)]

    # Nearly all of it spent: the next turn's worst case does not fit, it is refused before the
    # model is called, and a refusal (nothing spent) fires nothing...
    await orm(lambda: BudgetSpend.objects.filter(budget=budget).update(spent_usd=Decimal("1") - cost / 2))
    assert_error(await api.post(CHAT.format("echo"), {"message": "hello"}), 402, "budget_exceeded")
    assert await orm(fired, budget.id) == [(start, 50)]
    # ...the scan fires the thresholds the spend has reached (not 100 %: a hard budget never
    # spends more than its worst cases leave room for).
    assert await orm(check_budget_alerts) == 2
    assert [t for _, t in await orm(fired, budget.id)] == [50, 75, 90]


# --- periods, the unique constraint, the scan --------------------------------------------------


def test_it_fires_again_in_the_next_period(make_agent):
    agent = make_agent(name="echo")
    budget = budget_create(scope="agent", agent_name="echo", period="day", limit_usd=Decimal("1"), hard=True,
                           alert_thresholds=[80, 50])
    yesterday = timezone.now() - timedelta(days=1)

    spend("0.6", at=yesterday, agent_id=agent.id)
    spend("0.1", at=yesterday, agent_id=agent.id)  # 70 %: nothing new
    spend("0.2", at=yesterday, agent_id=agent.id)  # 90 %: 80 fires
    spend("0.55", agent_id=agent.id)                # today: 50 fires again

    today, before = period_start("day", timezone.now()), period_start("day", yesterday)
    assert fired(budget.id) == [(before, 50), (before, 80), (today, 50)]


def test_it_fires_a_threshold_once_when_another_worker_fired_it_first(make_agent):
    agent = make_agent(name="echo")
    budget = budget_create(scope="global", period="month", limit_usd=Decimal("10"), hard=False)
    start = period_start("month", timezone.now())
    # The scan on another worker got to 50 % first (same budget, period and threshold).
    BudgetAlert.objects.create(budget=budget, period_start=start, threshold=50, spent_usd=Decimal("5"),
                               limit_usd=Decimal("10"))

    spend("8", agent_id=agent.id)  # crosses 50 and 75 in one settlement

    assert fired(budget.id) == [(start, 50), (start, 75)]
    assert [e.details["threshold"] for e in audits("budget.alert")] == [75]
    assert BudgetSpend.objects.get(budget=budget).spent_usd == Decimal("8")  # the settlement committed


def test_the_scan_fires_what_no_settlement_fired(make_agent):
    budget = budget_create(scope="global", period="week", limit_usd=Decimal("10"), hard=False)
    other = budget_create(scope="global", period="day", limit_usd=Decimal("10"))
    now = timezone.now()
    # Spend recorded without crossing anything in a settlement (e.g. the limit was lowered in the admin).
    BudgetSpend.objects.create(budget=budget, period_start=period_start("week", now), spent_usd=Decimal("8"))
    BudgetSpend.objects.create(budget=other, period_start=period_start("day", now), spent_usd=Decimal("1"))

    assert check_budget_alerts_task.delay().get() == 2
    assert check_budget_alerts() == 0  # once per period

    assert [t for _, t in fired(budget.id)] == [50, 75]
    assert fired(other.id) == []
    assert len(audits("budget.alert")) == 2


def test_disabled_budgets_do_not_alert(make_agent):
    agent = make_agent(name="echo")
    budget = budget_create(scope="global", period="day", limit_usd=Decimal("1"), hard=False)
    reservation = budget_reserve(key_id=None, agent_id=agent.id, amount=Decimal("0.9"))
    type(budget).objects.filter(pk=budget.pk).update(enabled=False)

    budget_settle(reservation=reservation, actual_usd=Decimal("0.9"))

    assert fired(budget.id) == []
    assert check_budget_alerts() == 0


# --- deliveries ------------------------------------------------------------------------------


def test_it_emails_the_budgets_own_recipients(make_agent, settings, mailoutbox):
    settings.BUDGET_ALERT_EMAILS = ["default@example.com"]
    settings.DEFAULT_FROM_EMAIL = "alerts@example.com"
    agent = make_agent(name="echo")
    budget = budget_create(scope="agent", agent_name="echo", period="month", limit_usd=Decimal("2"), hard=False,
                           alert_thresholds=[50], alert_emails=["a@example.com", "b@example.com"])

    spend("1.5", agent_id=agent.id)

    [delivery] = wait_until(delivery_in("sent"), what="the e-mail")
    assert (delivery.channel, delivery.attempts, delivery.last_error) == ("email", 1, "")
    assert delivery.delivered_at is not None
    [message] = mailoutbox
    assert message.to == ["a@example.com", "b@example.com"]
    assert message.from_email == "alerts@example.com"
    assert message.subject == "Budget alert: agent 'echo' month reached 50 % of 2.00 USD"
    assert "Spent:   1.50000000 USD of 2.00000000 USD (75.00 %)" in message.body
    assert "soft" in message.body


def test_it_posts_a_signed_json_alert_to_the_webhook(make_agent, settings, hook_server):
    hook = hook_server(204)
    settings.BUDGET_ALERT_WEBHOOK_SECRET = SECRET
    agent = make_agent(name="echo")
    budget = budget_create(scope="agent", agent_name="echo", period="day", limit_usd=Decimal("4"), hard=True,
                           alert_thresholds=[25], alert_webhook_url=hook.url, name="team echo")

    spend("1.25", agent_id=agent.id)

    [delivery] = wait_until(delivery_in("sent", "webhook"), what="the webhook")
    [request] = hook.received
    headers, body = request["headers"], request["body"]
    assert headers["content-type"] == "application/json"
    assert headers["x-agentplatform-event"] == "budget.alert"
    assert headers["x-agentplatform-delivery"] == str(delivery.id)
    expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(headers["x-agentplatform-signature"], expected)
    payload = json.loads(body)
    alert = BudgetAlert.objects.get()
    start = period_start("day", timezone.now())
    assert payload["type"] == "budget.alert"
    assert (payload["alert_id"], payload["delivery_id"], payload["attempt"]) == (alert.id, delivery.id, 1)
    assert (payload["threshold"], payload["spent_usd"], payload["limit_usd"], payload["percent"]) == \
        (25, "1.25000000", "4.00000000", "31.25")
    assert payload["period_start"] == start.isoformat()
    assert payload["period_end"] == (start + timedelta(days=1)).isoformat()
    assert payload["budget"] == {"id": budget.id, "name": "team echo", "scope": "agent", "period": "day",
                                 "hard": True, "key": None, "agent": "echo",
                                 "description": "team echo (agent 'echo' day)"}


def test_without_a_secret_the_webhook_is_not_signed(make_agent, settings, hook_server):
    hook = hook_server(200)
    settings.BUDGET_ALERT_WEBHOOK_URL = hook.url  # the default webhook
    settings.BUDGET_ALERT_WEBHOOK_SECRET = ""
    agent = make_agent(name="echo")
    budget = budget_create(scope="global", period="day", limit_usd=Decimal("1"), alert_thresholds=[10])

    spend("0.2", agent_id=agent.id)

    wait_until(delivery_in("sent", "webhook"), what="the webhook")
    assert "x-agentplatform-signature" not in hook.received[0]["headers"]


def test_a_failing_webhook_is_retried_then_dead_lettered(make_agent, settings, hook_server):
    hook = hook_server(500)
    settings.BUDGET_ALERT_MAX_RETRIES = 3
    agent = make_agent(name="echo")
    budget = budget_create(scope="global", period="day", limit_usd=Decimal("1"), alert_thresholds=[50],
                           alert_webhook_url=hook.url)

    spend("0.5", agent_id=agent.id)

    [delivery] = wait_until(delivery_in("dead"), what="the dead letter")
    assert len(hook.received) == 4  # the first attempt and 3 retries
    assert [json.loads(r["body"])["attempt"] for r in hook.received] == [1, 2, 3, 4]
    assert delivery.attempts == 4
    assert delivery.last_error.startswith("HTTP 500")
    assert delivery.delivered_at is None
    [entry] = audits("budget.alert.dead_letter")
    assert entry.outcome == "error" and entry.target == f"budget:{budget.id}"
    assert entry.details["delivery_id"] == delivery.id and entry.details["attempts"] == 4
    assert "token=abc" not in json.dumps(entry.details)  # the URL (it may carry a token) is not logged


def test_a_webhook_that_recovers_is_delivered_on_a_retry(make_agent, settings, hook_server):
    hook = hook_server(503, 502, 200)
    agent = make_agent(name="echo")
    budget = budget_create(scope="global", period="day", limit_usd=Decimal("1"), alert_thresholds=[50],
                           alert_webhook_url=hook.url)

    spend("0.5", agent_id=agent.id)

    [delivery] = wait_until(delivery_in("sent"), what="the delivery")
    assert delivery.attempts == 3 and delivery.last_error == ""
    assert len(hook.received) == 3
    assert audits("budget.alert.dead_letter") == []


def test_a_permanent_refusal_is_dead_at_once(make_agent, hook_server):
    hook = hook_server(410)
    agent = make_agent(name="echo")
    budget = budget_create(scope="global", period="day", limit_usd=Decimal("1"), alert_thresholds=[50],
                           alert_webhook_url=hook.url)

    spend("0.5", agent_id=agent.id)

    [delivery] = wait_until(delivery_in("dead"), what="the dead letter")
    assert delivery.attempts == 1 and len(hook.received) == 1
    assert audits("budget.alert.dead_letter")[0].details["permanent"] is True


def test_an_unreachable_webhook_is_dead_lettered(make_agent, settings):
    from conftest import free_port

    settings.BUDGET_ALERT_MAX_RETRIES = 1
    agent = make_agent(name="echo")
    budget = budget_create(scope="global", period="day", limit_usd=Decimal("1"), alert_thresholds=[50],
                           alert_webhook_url=f"http://127.0.0.1:{free_port()}/nobody")

    spend("0.5", agent_id=agent.id)

    [delivery] = wait_until(delivery_in("dead"), what="the dead letter")
    assert delivery.attempts == 2
    assert delivery.last_error.startswith("ConnectError")


# --- the admin -------------------------------------------------------------------------------


def test_the_admin_lists_alerts_and_retries_dead_deliveries(make_agent, admin_client, hook_server, settings):
    settings.BUDGET_ALERT_MAX_RETRIES = 0
    hook = hook_server(500, 200)
    agent = make_agent(name="echo")
    budget = budget_create(scope="agent", agent_name="echo", period="month", limit_usd=Decimal("1"),
                           alert_thresholds=[50, 90], alert_webhook_url=hook.url, name="echo monthly")
    spend("0.6", agent_id=agent.id)
    [dead] = wait_until(delivery_in("dead"), what="the dead letter")
    alert = BudgetAlert.objects.get()

    changelist = admin_client.get(reverse("admin:billing_budgetalert_changelist"))
    assert changelist.status_code == 200
    assert "echo monthly" in changelist.content.decode() and "50 %" in changelist.content.decode()
    assert "webhook: dead" in changelist.content.decode()
    link = reverse("admin:billing_budgetalert_change", args=[alert.pk])
    assert link in changelist.content.decode()
    by_threshold = {t: admin_client.get(reverse("admin:billing_budgetalert_changelist"), {"threshold": t})
                    for t in ("50", "90")}
    assert link in by_threshold["50"].content.decode() and link not in by_threshold["90"].content.decode()
    page = admin_client.get(reverse("admin:billing_budgetalert_change", args=[alert.pk])).content.decode()
    assert "HTTP 500" in page  # the deliveries inline
    assert admin_client.get(reverse("admin:billing_budgetalert_add")).status_code == 403
    dead_page = admin_client.get(reverse("admin:billing_alertdelivery_changelist"), {"status__exact": "dead"})
    assert dead_page.status_code == 200 and "HTTP 500" in dead_page.content.decode()

    response = admin_client.post(reverse("admin:billing_alertdelivery_changelist"),
                                 {"action": "retry_dead", "_selected_action": [dead.pk]}, follow=True)

    assert response.status_code == 200
    assert "1 dead delivery enqueued again" in response.content.decode()
    [sent] = wait_until(delivery_in("sent"), what="the retried delivery")
    assert sent.pk == dead.pk and sent.attempts == 1
    assert len(hook.received) == 2
    [entry] = audits("budget.alert.retried")
    assert entry.actor == "user:admin" and entry.details["previous_attempts"] == 1


def test_the_budget_admin_edits_alert_settings(make_agent, admin_client):
    make_agent(name="echo")
    budget = budget_create(scope="agent", agent_name="echo", period="month", limit_usd=Decimal("5"))
    url = reverse("admin:billing_budget_change", args=[budget.pk])
    form = {"name": "echo", "scope": "agent", "agent": budget.agent_id, "api_key": "", "period": "month",
            "limit_usd": "5", "hard": "on", "enabled": "on", "alert_thresholds": "90, 50, 50",
            "alert_emails": "ops@example.com, ops@example.com", "alert_webhook_url": "https://hooks.example.com/x",
            "spends-TOTAL_FORMS": "0", "spends-INITIAL_FORMS": "0", "spends-MIN_NUM_FORMS": "0",
            "spends-MAX_NUM_FORMS": "0"}
    page = admin_client.get(url).content.decode()
    assert "Alerts" in page and "50, 75, 90, 100" in page

    bad = admin_client.post(url, {**form, "alert_thresholds": "50, 2000", "alert_webhook_url": "ftp://x.example"})
    assert bad.status_code == 200 and "between 1 and 1000" in bad.content.decode()
    assert "An http(s) URL." in bad.content.decode()
    saved = admin_client.post(url, form)

    assert saved.status_code == 302, saved.content.decode()[:2000]
    budget.refresh_from_db()
    assert budget.alert_thresholds == [50, 90]
    assert budget.alert_emails == "ops@example.com"
    assert budget.alert_webhook_url == "https://hooks.example.com/x"
    entry = audits("budget.updated")[-1]
    assert entry.actor == "user:admin" and "alert_thresholds" in entry.details["changed"]
    assert "ops@example.com" not in json.dumps(entry.details)


# --- beat tasks ------------------------------------------------------------------------------


def test_rollover_releases_stale_reservations_of_past_periods(make_agent):
    budget = budget_create(scope="global", period="day", limit_usd=Decimal("10"))
    fresh = budget_create(scope="global", period="month", limit_usd=Decimal("10"))
    now = timezone.now()
    today, yesterday = period_start("day", now), period_start("day", now - timedelta(days=1))
    two_days_ago = period_start("day", now - timedelta(days=2))
    stale = BudgetSpend.objects.create(budget=budget, period_start=two_days_ago, spent_usd=Decimal("1"),
                                       reserved_usd=Decimal("0.75"))
    recent = BudgetSpend.objects.create(budget=budget, period_start=yesterday, reserved_usd=Decimal("0.5"))
    current = BudgetSpend.objects.create(budget=budget, period_start=today, reserved_usd=Decimal("0.25"))
    # Untouched for two hours (updated_at is auto_now: set it with update()).
    BudgetSpend.objects.filter(pk__in=[stale.pk, current.pk]).update(updated_at=now - timedelta(hours=2))

    result = budget_period_rollover_task.delay().get()

    assert result == {"created": 1, "released": 1}  # the month budget's row; the stale reservation
    assert BudgetSpend.objects.get(pk=stale.pk).reserved_usd == 0
    assert BudgetSpend.objects.get(pk=stale.pk).spent_usd == Decimal("1")
    assert BudgetSpend.objects.get(pk=recent.pk).reserved_usd == Decimal("0.5")  # a turn may still settle it
    assert BudgetSpend.objects.get(pk=current.pk).reserved_usd == Decimal("0.25")  # the current period
    assert BudgetSpend.objects.filter(budget=fresh, period_start=period_start("month", now)).exists()
    [entry] = audits("budget.reservations_released")
    assert entry.details["rows"] == [{"budget_id": budget.id, "period": "day", "period_start": two_days_ago.isoformat(),
                                      "released_usd": "0.75000000"}]
    assert budget_period_rollover_task.delay().get() == {"created": 0, "released": 0}
    assert len(audits("budget.reservations_released")) == 1


def test_rollup_task_rolls_up_yesterday(make_agent):
    agent = make_agent(name="echo")
    yesterday = timezone.now() - timedelta(days=1)
    UsageRecord.objects.create(created_at=yesterday, agent=agent, model=MODEL, prompt_tokens=10,
                               completion_tokens=5, cost_usd=Decimal("0.01"))

    assert rollup_usage_task.delay().get() >= 1

    row = UsageRollup.objects.get(day=yesterday.date())
    assert (row.model, row.calls, row.prompt_tokens, row.cost_usd) == (MODEL, 1, 10, Decimal("0.01"))


def test_every_beat_entry_names_a_registered_task(settings):
    celery_app.loader.import_default_modules()
    names = {entry["task"] for entry in settings.CELERY_BEAT_SCHEDULE.values()}

    assert {"billing.tasks.check_budget_alerts_task", "billing.tasks.budget_period_rollover_task",
            "billing.tasks.rollup_usage_task"} <= names
    assert names <= set(celery_app.tasks)


# --- the budget API --------------------------------------------------------------------------


async def test_the_budget_api_takes_and_returns_alert_settings(make_agent, make_key):
    await orm(make_agent, name="echo")
    admin = await orm(make_key, role="admin")
    client = await orm(make_key, agents=["echo"])
    api = Api(admin)

    created = await api.post("/api/v1/admin/budgets", {
        "scope": "agent", "agent": "echo", "period": "day", "limit_usd": "3", "hard": False,
        "alert_thresholds": [100, 25, 25, 80], "alert_emails": ["ops@example.com", "ops@example.com"],
        "alert_webhook_url": "https://hooks.example.com/budget?token=t0k3n"})

    assert created.status_code == 201, created.text
    body = created.json()
    assert body["alert_thresholds"] == [25, 80, 100]
    assert body["alert_emails"] == ["ops@example.com"]
    assert body["alert_webhook_url"] == "https://hooks.example.com/budget?token=t0k3n"
    listed = (await api.get("/api/v1/admin/budgets")).json()["results"]
    assert listed[0]["alert_emails"] == ["ops@example.com"]
    # A caller sees its budgets, not where their alerts go.
    mine = (await Api(client).get("/api/v1/budgets")).json()["budgets"]
    assert mine[0]["alert_thresholds"] == [25, 80, 100]
    assert "alert_emails" not in mine[0] and "alert_webhook_url" not in mine[0]
    entry = (await orm(audits, "budget.created"))[-1]
    assert "t0k3n" not in json.dumps(entry.details) and "ops@example.com" not in json.dumps(entry.details)


@pytest.mark.parametrize("field, value", [
    ("alert_thresholds", [0]),
    ("alert_thresholds", [1001]),
    ("alert_thresholds", ["lots"]),
    ("alert_thresholds", 50),
    ("alert_thresholds", [50.5]),
    ("alert_emails", ["not-an-address"]),
    ("alert_emails", "ops@example.com"),
    ("alert_webhook_url", "ftp://files.example.com/x"),
    ("alert_webhook_url", "not a url"),
])
async def test_the_budget_api_names_an_invalid_alert_field(make_key, field, value):
    admin = await orm(make_key, role="admin")

    response = await Api(admin).post("/api/v1/admin/budgets", {"scope": "global", "period": "day", "limit_usd": "1",
                                                               field: value})

    error = assert_error(response, 400)
    assert error["param"] in (field, f"{field}[0]"), error  # the field, or its first item


async def test_settling_without_crossing_a_threshold_writes_no_alert(priced_agent, make_key):
    """The common case: a turn on a budget far from its next threshold adds nothing."""
    key = await orm(make_key)
    budget = await orm(budget_create, scope="global", period="month", limit_usd=Decimal("1000"))

    responses = await asyncio.gather(*(Api(key).post(CHAT.format("echo"), {"message": "hi"}) for _ in range(5)))

    assert {r.status_code for r in responses} == {200}
    assert await orm(fired, budget.id) == []
    assert await orm(lambda: AlertDelivery.objects.count()) == 0
    assert await orm(lambda: BudgetSpend.objects.get(budget=budget).spent_usd) > 0
