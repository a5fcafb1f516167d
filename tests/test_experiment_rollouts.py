"""Canary rollouts (ramped, rolled back by themselves when the candidate fails through the fake
upstream: audited and alerted through the budget alerts' channels) and shadow traffic (answered in
the background, stored beside the live run, never billed to the caller's key or budget, never
making the caller wait). The canary's step function is driven directly at chosen instants: no
test waits for the schedule or depends on the time of day."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections import Counter
from datetime import timedelta
from decimal import Decimal

import pytest
import time_machine
from django.core import mail
from django.utils import timezone

from agents.models import Run
from billing.budgets import budget_create
from billing.models import AlertDelivery, BudgetSpend, ModelPrice, UsageRecord
from conftest import Api, orm
from experiments.canary import canaries_advance, canary_step
from experiments.models import Experiment, ShadowRun
from governance.models import AuditLog
from governance.services import split_key
from test_alerts import Hook, wait_until

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("eager_celery")]

EXPERIMENTS = "/api/v1/admin/experiments"
CHAT = "/api/v1/agents/{}/chat"
SECRET = "whsec-canary-0123456789"


@pytest.fixture(autouse=True)
def _shadows_settle():
    """No shadow run may still be answering on the background loop when the data is flushed."""
    yield
    deadline = time.monotonic() + 20
    while ShadowRun.objects.filter(status=ShadowRun.Status.QUEUED).exists():
        assert time.monotonic() < deadline, "a shadow run was still running after its test"
        time.sleep(0.05)


@pytest.fixture
def hook():
    receiver = Hook([200])
    yield receiver
    receiver.close()


@pytest.fixture
async def admin(make_key) -> str:
    return await orm(make_key, role="admin")


def _price(model: str, input_per_1m: str, output_per_1m: str) -> None:
    ModelPrice.objects.create(model=model, input_per_1m=Decimal(input_per_1m), output_per_1m=Decimal(output_per_1m),
                              effective_from=timezone.now() - timedelta(days=1))


async def canary(admin: str, candidate_model: str, **fields) -> dict:
    response = await Api(admin).post(EXPERIMENTS, {
        "name": "new-model-canary", "agent": "gate", "mode": "canary", "status": "running",
        "canary_steps": [50, 100], "canary_min_sample": 5, "canary_interval_minutes": 60,
        "variants": [{"name": "control", "weight": 100, "is_control": True},
                     {"name": "candidate", "weight": 0, "model": candidate_model}], **fields})
    assert response.status_code == 201, response.text
    return response.json()


async def traffic(key: str, n: int) -> Counter:
    served: Counter = Counter()
    api = Api(key)
    for i in range(n):
        response = await api.post(CHAT.format("gate"), {"message": f"question {i}"})
        served[(response.headers.get("X-Agent-Variant"), response.status_code)] += 1
    return served


# --- canary -------------------------------------------------------------------------------------


async def test_a_failing_canary_is_rolled_back_audited_and_alerted(make_agent, make_key, admin, openai_settings,
                                                                   hook):
    openai_settings.BUDGET_ALERT_WEBHOOK_URL = hook.url
    openai_settings.BUDGET_ALERT_WEBHOOK_SECRET = SECRET
    openai_settings.BUDGET_ALERT_EMAILS = ["ops@example.com"]
    await orm(make_agent, name="gate", model="openai/stable-model", max_retries=0)
    made = await canary(admin, "openai/fault-500-candidate")
    assert made["canary"]["state"] == "ramping" and [v["weight"] for v in made["variants"]] == [50, 50]
    key = await orm(make_key)

    served = await traffic(key, 30)

    # The candidate fails (its upstream's 500, then its open circuit's 503), the control answers.
    assert served[("candidate", 502)] + served[("candidate", 503)] >= 5 and served[("control", 200)] >= 5, served
    assert set(served) <= {("candidate", 502), ("candidate", 503), ("control", 200)}, served
    experiment = await orm(Experiment.objects.get, pk=made["id"])
    assert await orm(canary_step, experiment_id=experiment.id,
                     now=experiment.canary_next_at - timedelta(seconds=1)) == "not_due"

    outcome = await orm(canary_step, experiment_id=experiment.id, now=experiment.canary_next_at + timedelta(seconds=1))

    assert outcome == "rolled_back"
    body = (await Api(admin).get(f"{EXPERIMENTS}/{made['id']}")).json()
    assert body["status"] == "finished" and body["canary"]["state"] == "rolled_back"
    assert {v["name"]: v["weight"] for v in body["variants"]} == {"control": 100, "candidate": 0}
    entry = await orm(AuditLog.objects.get, action="experiment.canary.rolled_back")
    assert entry.outcome == "error" and entry.target == "experiment:new-model-canary"
    assert entry.details["candidate_figures"]["error_rate"] == 1.0 and entry.details["control_figures"]["errors"] == 0
    assert "error rate" in entry.details["reason"] and entry.details["share"] == 50
    # The alert: the budget alerts' channels (signed webhook and e-mail), with their retries.
    [webhook] = await orm(wait_until, lambda: list(AlertDelivery.objects.filter(channel="webhook", status="sent")),
                          what="the webhook delivery")
    assert webhook.event == "experiment.rolled_back" and webhook.alert_id is None
    received = hook.received[0]
    expected = "sha256=" + hmac.new(SECRET.encode(), received["body"], hashlib.sha256).hexdigest()
    assert received["headers"]["x-agentplatform-signature"] == expected
    assert received["headers"]["x-agentplatform-event"] == "experiment.rolled_back"
    payload = json.loads(received["body"])
    assert payload["type"] == "experiment.rolled_back" and payload["experiment"] == "new-model-canary"
    await orm(wait_until, lambda: mail.outbox, what="the e-mail")
    assert mail.outbox[0].subject.startswith("Canary rolled back: new-model-canary")
    # Rolled back: every caller is served the agent as it is again.
    assert set(await traffic(key, 5)) == {(None, 200)}


def test_a_notice_delivery_is_listed_and_retried_in_the_admin(admin_client, settings):
    from billing.alerts import notice_send

    settings.BUDGET_ALERT_EMAILS = ["ops@example.com"]
    [delivery] = notice_send(event="experiment.rolled_back", subject="Canary rolled back", text="Details.",
                             body={"experiment": "x"})
    AlertDelivery.objects.filter(pk=delivery.pk).update(status="dead", attempts=6)

    page = admin_client.get("/admin/billing/alertdelivery/?event=experiment.rolled_back")
    assert page.status_code == 200 and "experiment.rolled_back" in page.content.decode()
    assert admin_client.get(f"/admin/billing/alertdelivery/{delivery.pk}/change/").status_code == 200
    admin_client.post("/admin/billing/alertdelivery/", {"action": "retry_dead", "_selected_action": [delivery.pk]})
    assert AuditLog.objects.filter(action="experiment.rolled_back.retried", target="notice:experiment.rolled_back").exists()


async def test_a_healthy_canary_ramps_step_by_step_to_completion(make_agent, make_key, admin, openai_settings):
    await orm(make_agent, name="gate", model="openai/stable-model")
    made = await canary(admin, "openai/new-model", canary_steps=[20, 60, 100])
    key = await orm(make_key)

    async def at_next_step(then_send: int = 0) -> tuple[str, Experiment]:
        """Travel to just past the experiment's next step (the clock ticking from there), decide
        it, then send traffic in the new step."""
        experiment = await orm(Experiment.objects.get, pk=made["id"])
        with time_machine.travel(experiment.canary_next_at + timedelta(seconds=1), tick=True):
            outcome = await orm(canary_step, experiment_id=experiment.id)
            if then_send:
                await traffic(key, then_send)
        return outcome, await orm(Experiment.objects.get, pk=made["id"])

    assert (await at_next_step())[0] == "waiting"  # no candidate traffic in this step yet
    served = await traffic(key, 80)
    assert served[("candidate", 200)] >= 5, served
    outcome, experiment = await at_next_step(then_send=30)
    assert outcome == "advanced" and experiment.canary_step == 1
    assert await orm(lambda: dict(experiment.variants.values_list("name", "weight"))) == {"control": 40,
                                                                                       "candidate": 60}
    outcome, experiment = await at_next_step(then_send=8)
    assert outcome == "advanced" and experiment.canary_step == 2
    assert (await at_next_step())[0] == "completed"
    actions = await orm(lambda: list(AuditLog.objects.filter(action__startswith="experiment.canary")
                                     .order_by("id").values_list("action", "details__new_share")))
    assert actions == [("experiment.canary.advanced", 60), ("experiment.canary.advanced", 100),
                       ("experiment.canary.completed", None)]


async def test_the_beat_task_steps_only_due_canaries(make_agent, make_key, admin, openai_settings):
    await orm(make_agent, name="gate", model="openai/stable-model")
    made = await canary(admin, "openai/new-model")
    await traffic(await orm(make_key), 30)
    experiment = await orm(Experiment.objects.get, pk=made["id"])

    assert await orm(canaries_advance, now=experiment.canary_next_at - timedelta(seconds=1)) == 0
    assert await orm(canaries_advance, now=experiment.canary_next_at) == 1
    assert (await orm(Experiment.objects.get, pk=made["id"])).canary_step == 1


async def test_a_slow_canary_is_rolled_back_on_p95_latency(make_agent, make_key, admin, openai_settings):
    await orm(make_agent, name="gate", model="openai/stable-model")
    made = await canary(admin, "openai/slow-model", canary_max_p95_ratio=3.0)
    api = Api(await orm(make_key))
    # The fake upstream delays what the message asks: the candidate's callers ask for 300 ms.
    from experiments.assignment import assign

    sent = Counter()
    i = 0
    while min(sent["candidate"], sent["control"]) < 6:
        session = f"00000000-0000-4000-8000-{i:012d}"
        variant = assign(made["id"], f"session:{session}", [("control", 50), ("candidate", 50)])
        delay = "[latency:300]" if variant == "candidate" else ""
        response = await api.post(CHAT.format("gate"), {"message": f"hi {delay}", "session_id": session})
        assert response.headers["X-Agent-Variant"] == variant
        sent[variant] += 1
        i += 1
    experiment = await orm(Experiment.objects.get, pk=made["id"])

    assert await orm(canary_step, experiment_id=experiment.id,
                     now=experiment.canary_next_at + timedelta(seconds=1)) == "rolled_back"
    entry = await orm(AuditLog.objects.get, action="experiment.canary.rolled_back")
    assert "p95 latency" in entry.details["reason"]


# --- shadow traffic -----------------------------------------------------------------------------


async def shadowed(admin: str, shadow_model: str) -> dict:
    response = await Api(admin).post(EXPERIMENTS, {
        "name": "shadow-test", "agent": "gate", "status": "running", "shadow_variant": "shadow",
        "shadow_percent": 100,
        "variants": [{"name": "control", "weight": 100, "is_control": True},
                     {"name": "shadow", "weight": 0, "model": shadow_model, "system_prompt": "Shadow prompt."}]})
    assert response.status_code == 201, response.text
    return response.json()


async def test_shadow_runs_are_stored_beside_the_live_run_and_not_billed_to_the_caller(
        make_agent, make_key, admin, openai_settings, fake_upstream):
    await orm(_price, "openai/live-model", "1", "2")
    await orm(_price, "openai/shadow-model", "100", "200")
    await orm(make_agent, name="gate", model="openai/live-model")
    made = await shadowed(admin, "openai/shadow-model")
    key = await orm(make_key)
    await orm(budget_create, scope="key", key_prefix=split_key(key), period="month", limit_usd=Decimal("5"))

    live = (await Api(key).post(CHAT.format("gate"), {"message": "Hello [tokens:3]"})).json()

    assert live["variant"] == "control" and live["output"] == "w1 w2 w3"
    shadow = await orm(wait_until, lambda: ShadowRun.objects.filter(status="succeeded").first(), what="the shadow run")
    assert str(shadow.live_run_id) == live["id"] and shadow.variant == "shadow"
    assert shadow.output == "w1 w2 w3" and shadow.model == "openai/shadow-model" and shadow.latency_ms is not None
    assert shadow.messages[0] == {"role": "system", "content": "Shadow prompt."}
    assert shadow.cost_usd > Decimal(live["cost_usd"]) > 0
    # Metered apart: the caller's usage and budget hold the live run only.
    records = await orm(lambda: list(UsageRecord.objects.values_list("run_id", "model", "cost_usd")))
    assert [(str(r), m) for r, m, _ in records] == [(live["id"], "openai/live-model")]
    spent = await orm(lambda: sum(s.spent_usd for s in BudgetSpend.objects.all()))
    assert spent == Decimal(live["cost_usd"])
    assert await orm(Run.objects.count) == 1
    assert fake_upstream.stats()["by_model"] == {"live-model": 1, "shadow-model": 1}
    results = (await Api(admin).get(f"{EXPERIMENTS}/{made['id']}/results")).json()
    assert results["shadow"] == [{"variant": "shadow", "runs": 1, "cost_usd": f"{shadow.cost_usd:.8f}",
                                  "prompt_tokens": shadow.prompt_tokens, "completion_tokens": 3}]


async def test_a_slow_shadow_never_makes_the_caller_wait(make_agent, make_key, admin, openai_settings):
    await orm(make_agent, name="gate", model="openai/live-model", timeout_seconds=2)
    await shadowed(admin, "openai/fault-hang-shadow")  # never answers: ends at the agent's 2 s deadline
    api = Api(await orm(make_key))

    started = time.monotonic()
    live = await api.post(CHAT.format("gate"), {"message": "hi"})
    elapsed = time.monotonic() - started

    assert live.status_code == 200 and elapsed < 1.5, elapsed
    assert await orm(lambda: ShadowRun.objects.get().status) == "queued"  # still waiting on its model
    failed = await orm(wait_until, lambda: ShadowRun.objects.filter(status="failed").first(), what="the timeout")
    assert failed.error_code and failed.latency_ms >= 1900


async def test_shadow_traffic_stops_at_the_daily_cap(make_agent, make_key, admin, openai_settings):
    openai_settings.EXPERIMENT_SHADOW_DAILY_LIMIT_USD = Decimal("0")
    await orm(make_agent, name="gate", model="openai/live-model")
    await shadowed(admin, "openai/shadow-model")

    assert (await Api(await orm(make_key)).post(CHAT.format("gate"), {"message": "hi"})).status_code == 200

    skipped = await orm(wait_until, lambda: ShadowRun.objects.filter(status="skipped").first(), what="the skip")
    assert skipped.error_code == "shadow_limit_reached" and skipped.cost_usd == 0


async def test_a_masking_agents_shadow_is_stored_masked(make_agent, make_key, admin, openai_settings, fake_upstream):
    await orm(make_agent, name="gate", model="openai/live-model", mask_transcripts=True)
    await shadowed(admin, "openai/shadow-model")

    await Api(await orm(make_key)).post(CHAT.format("gate"), {"message": "Mail jane.doe@example.com please"})

    shadow = await orm(wait_until, lambda: ShadowRun.objects.filter(status="succeeded").first(), what="the shadow run")
    assert "jane.doe@example.com" not in json.dumps(shadow.messages) + shadow.output
    assert fake_upstream.stats()["by_model"]["shadow-model"] == 1  # the model saw the conversation as sent
