"""The chat console's page and JSON endpoints with Django's test client: who may see them,
what they list, feedback on answers (stored and audited), CSRF on POST, and clear JSON errors.
The chat itself (WebSocket) is tested in test_console_browser.py in a real browser."""

from __future__ import annotations

import json
import re
import uuid
from datetime import timedelta
from decimal import Decimal

import pytest
from asgiref.sync import async_to_sync
from django.contrib.auth import get_user_model
from django.test import Client
from django.urls import NoReverseMatch, reverse
from django.utils import timezone

from agents.models import Agent, Message, Run, Session
from billing.models import UsageRecord
from conftest import PAGE_CSP, csp_directives
from conftest import error_body as json_error
from governance.models import AuditLog

SESSIONS = "/console/api/sessions"
FEEDBACK = "/console/api/feedback"


# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture
def staff(db):
    return get_user_model().objects.create_user("ops", password="pw-ops-12345", is_staff=True)


@pytest.fixture
def other_staff(db):
    return get_user_model().objects.create_user("other", password="pw-other-12345", is_staff=True)


@pytest.fixture
def staff_client(staff) -> Client:
    client = Client()
    client.force_login(staff)
    return client


@pytest.fixture
def agent(make_agent) -> Agent:
    return make_agent("helper", description="Helps.", skills=["calculator"])


def make_turn(agent: Agent, *, user=None, api_key=None, title: str = "A chat", ago: int = 0,
              question: str = "What is 6*7?", answer: str = "42", cost: str | None = "0.000123",
              feedback: int | None = None) -> tuple[Session, Run]:
    """A stored session with one turn shaped as the pipeline stores it (user message, a tool
    call and its result, the answer), its run and the run's usage record."""
    now = timezone.now() - timedelta(minutes=ago)
    session = Session.objects.create(agent=agent, user=user, api_key=api_key, title=title)
    Session.objects.filter(pk=session.pk).update(last_activity_at=now)
    run = Run.objects.create(agent=agent, session=session, status=Run.Status.SUCCEEDED, transport="websocket",
                             model="local/demo", prompt_tokens=20, completion_tokens=5, total_tokens=25,
                             latency_ms=12, started_at=now, finished_at=now, feedback=feedback)
    Message.objects.bulk_create([
        Message(session=session, run=run, role="user", content=question, created_at=now),
        Message(session=session, run=run, role="assistant", content="",
                tool_calls=[{"id": "call_1", "name": "calculator", "arguments": '{"expression": "6*7"}'}],
                created_at=now),
        Message(session=session, run=run, role="tool", content="42", tool_call_id="call_1", name="calculator",
                created_at=now),
        Message(session=session, run=run, role="assistant", content=answer, prompt_tokens=20, completion_tokens=5,
                created_at=now),
    ])
    if cost is not None:
        UsageRecord.objects.create(created_at=now, run=run, agent=agent, model="local/demo", prompt_tokens=20,
                                   completion_tokens=5, cost_usd=Decimal(cost))
    return session, run


def page_config(response) -> dict:
    match = re.search(r'<script id="console-config" type="application/json">(.*?)</script>',
                      response.content.decode(), re.S)
    assert match, "the page carries its data in a json_script block"
    return json.loads(match.group(1))


def post_json(client: Client, path: str, body, **extra):
    return client.post(path, data=json.dumps(body), content_type="application/json", **extra)


# --- the page -----------------------------------------------------------------------------


def test_it_sends_anonymous_visitors_to_the_admin_login(client, db):
    response = client.get("/console/")

    assert response.status_code == 302
    assert response["Location"] == f"{reverse('admin:login')}?next=/console/"


def test_it_sends_signed_in_users_who_are_not_staff_to_the_admin_login(client, django_user_model):
    client.force_login(django_user_model.objects.create_user("visitor", password="pw-visitor-123"))

    response = client.get("/console/helper/")

    assert response.status_code == 302
    assert response["Location"].startswith(reverse("admin:login"))


def test_it_renders_the_console_for_staff_with_enabled_agents_only(staff_client, agent, make_agent):
    make_agent("retired", enabled=False)

    response = staff_client.get("/console/")

    assert response.status_code == 200
    html = response.content.decode()
    config = page_config(response)
    assert [a["name"] for a in config["agents"]] == ["helper"]
    assert config["agents"][0] == {"name": "helper", "description": "Helps.", "model": "local/demo",
                                   "skills": ["calculator"]}
    assert config["agent"] is None
    assert config["wsPath"] == "/ws/agents/{name}/chat/"
    assert config["api"] == {"sessions": SESSIONS, "feedback": FEEDBACK}
    assert config["csrfToken"]
    assert response["Cache-Control"].startswith("max-age=0")  # never cached: it carries a CSRF token
    # Works offline: every script and stylesheet is served by us, and no script is inline.
    assert '<script src="/static/console/console.js" defer></script>' in html
    assert 'href="/static/console/console.css"' in html
    assert not re.search(r'(src|href)="(https?:)?//', html)
    scripts = re.findall(r"<script([^>]*)>", html)
    assert all("src=" in attrs or 'type="application/json"' in attrs for attrs in scripts), scripts


def test_the_console_page_allows_its_own_files_and_websocket_only(staff_client, agent, settings):
    settings.ALLOWED_HOSTS = ["agents.example.com"]

    response = staff_client.get("/console/helper/", HTTP_HOST="agents.example.com:8443")

    assert response.status_code == 200
    assert csp_directives(response["Content-Security-Policy"]) == {
        **PAGE_CSP,
        "connect-src": ["'self'", "ws://agents.example.com:8443", "wss://agents.example.com:8443"]}


def test_the_consoles_json_and_the_api_carry_no_page_policy(staff_client, agent, make_key):
    assert "Content-Security-Policy" not in staff_client.get("/console/api/agents")
    assert "Content-Security-Policy" not in staff_client.get("/api/v1/agents", HTTP_AUTHORIZATION=f"Bearer {make_key()}")


def test_it_keeps_markup_out_of_the_pages_data(staff_client, make_agent):
    make_agent("tricky", description="</script><script>alert(1)</script>")

    response = staff_client.get("/console/")

    assert "<script>alert(1)" not in response.content.decode()
    assert page_config(response)["agents"][0]["description"] == "</script><script>alert(1)</script>"


def test_it_preselects_the_agent_named_in_the_url(staff_client, agent):
    response = staff_client.get("/console/helper/")

    assert response.status_code == 200
    assert page_config(response)["agent"] == "helper"
    assert '<option value="helper" selected>' in response.content.decode()


def test_it_sends_an_unknown_or_disabled_agent_back_to_the_console_with_a_warning(staff_client, make_agent):
    make_agent("retired", enabled=False)

    for name in ("nobody", "retired"):
        response = staff_client.get(f"/console/{name}/", follow=True)

        assert response.redirect_chain == [("/console/", 302)]
        assert f"no enabled agent named &#x27;{name}&#x27;" in response.content.decode()


def test_the_admin_links_to_the_console_and_the_cost_dashboard(staff_client):
    response = staff_client.get("/admin/")

    html = response.content.decode()
    assert response.status_code == 200
    assert '<a href="/console/">Chat console</a>' in html
    try:
        dashboard = reverse("billing_dashboard")
    except NoReverseMatch:  # the dashboard is another issue's; the admin must work without it
        assert "Cost dashboard" not in html
    else:
        assert f'<a href="{dashboard}">Cost dashboard</a>' in html


# --- who may use the endpoints ------------------------------------------------------------


@pytest.mark.parametrize("path", ["/console/api/agents", SESSIONS, f"{SESSIONS}/{uuid.UUID(int=1)}"])
def test_it_refuses_the_endpoints_to_anonymous_callers_and_api_keys(client, make_key, path):
    json_error(client.get(path), 401, "not_authenticated")
    json_error(client.get(path, HTTP_AUTHORIZATION=f"Bearer {make_key('admin')}"), 401, "not_authenticated")
    json_error(post_json(client, FEEDBACK, {"run_id": str(uuid.uuid4()), "value": 1}), 401, "not_authenticated")


def test_it_refuses_the_endpoints_to_users_who_are_not_staff(client, django_user_model):
    client.force_login(django_user_model.objects.create_user("visitor", password="pw-visitor-123"))

    json_error(client.get("/console/api/agents"), 403, "staff_only")
    json_error(client.get(SESSIONS), 403, "staff_only")
    json_error(post_json(client, FEEDBACK, {"run_id": str(uuid.uuid4()), "value": 1}), 403, "staff_only")


def test_it_lists_enabled_agents(staff_client, agent, make_agent):
    make_agent("retired", enabled=False)

    response = staff_client.get("/console/api/agents")

    assert response.status_code == 200
    assert response.json() == {"data": [{"name": "helper", "description": "Helps.", "model": "local/demo",
                                         "skills": ["calculator"]}]}


# --- sessions -----------------------------------------------------------------------------


def test_it_lists_only_the_users_own_sessions_newest_first(staff_client, staff, other_staff, agent, make_agent,
                                                          make_key):
    from governance.models import ApiKey

    older, _ = make_turn(agent, user=staff, title="Older", ago=30)
    newer, _ = make_turn(agent, user=staff, title="Newer", ago=1)
    make_turn(agent, user=other_staff, title="Someone else's")
    make_key("client")
    make_turn(agent, api_key=ApiKey.objects.get(), title="An API key's")
    make_turn(make_agent("other-agent"), user=staff, title="Another agent")

    response = staff_client.get(SESSIONS, {"agent": "helper"})

    assert response.status_code == 200
    body = response.json()
    assert body["count"] == 2
    assert [s["title"] for s in body["results"]] == ["Newer", "Older"]
    first = body["results"][0]
    assert first["id"] == str(newer.id)
    assert first["agent"] == "helper"
    assert first["message_count"] == 4
    assert {"created_at", "last_activity_at"} <= set(first)
    every = staff_client.get(SESSIONS).json()
    assert {s["title"] for s in every["results"]} == {"Newer", "Older", "Another agent"}


def test_it_pages_the_session_list(staff_client, staff, agent):
    for n in range(3):
        make_turn(agent, user=staff, title=f"chat {n}", ago=n)

    first = staff_client.get(SESSIONS, {"agent": "helper", "limit": 2}).json()
    second = staff_client.get(SESSIONS, {"agent": "helper", "limit": 2, "offset": 2}).json()

    assert first["count"] == 3
    assert [s["title"] for s in first["results"]] == ["chat 0", "chat 1"]
    assert first["next"]
    assert [s["title"] for s in second["results"]] == ["chat 2"]
    assert second["next"] is None


def test_it_reopens_a_session_with_its_messages_tool_calls_usage_cost_and_feedback(staff_client, staff, agent):
    session, run = make_turn(agent, user=staff, feedback=-1)

    response = staff_client.get(f"{SESSIONS}/{session.id}")

    assert response.status_code == 200
    body = response.json()
    assert body["id"] == str(session.id)
    assert body["title"] == "A chat"
    assert body["truncated"] is False
    assert [(m["role"], m["content"]) for m in body["messages"]] == [
        ("user", "What is 6*7?"), ("assistant", ""), ("tool", "42"), ("assistant", "42")]
    assert body["messages"][1]["tool_calls"] == [{"id": "call_1", "name": "calculator",
                                                  "arguments": '{"expression": "6*7"}'}]
    assert body["messages"][2]["name"] == "calculator"
    assert {m["run_id"] for m in body["messages"]} == {str(run.id)}
    assert body["runs"] == [{
        "id": str(run.id), "status": "succeeded", "model": "local/demo", "transport": "websocket",
        "usage": {"prompt_tokens": 20, "completion_tokens": 5, "total_tokens": 25},
        "cost_usd": "0.00012300", "latency_ms": 12, "error": None, "feedback": -1,
        "started_at": body["runs"][0]["started_at"]}]


def test_it_reports_a_cancelled_runs_tokens_as_metered_and_an_unmetered_runs_as_stored(staff_client, staff,
                                                                                      agent):
    session, cancelled = make_turn(agent, user=staff, cost=None)
    Run.objects.filter(pk=cancelled.pk).update(status="cancelled", prompt_tokens=0, completion_tokens=0,
                                               total_tokens=0)
    # The call cut short is estimated by metering: that is what was billed.
    UsageRecord.objects.create(created_at=timezone.now(), run=cancelled, agent=agent, model="local/demo",
                               prompt_tokens=30, completion_tokens=7, cost_usd=Decimal("0.0001"), estimated=True)
    _, unmetered = make_turn(agent, user=staff, cost=None)
    Message.objects.filter(run=unmetered).update(session=session)
    Run.objects.filter(pk=unmetered.pk).update(session=session)

    runs = {r["id"]: r for r in staff_client.get(f"{SESSIONS}/{session.id}").json()["runs"]}

    assert runs[str(cancelled.id)]["status"] == "cancelled"
    assert runs[str(cancelled.id)]["usage"] == {"prompt_tokens": 30, "completion_tokens": 7, "total_tokens": 37}
    assert runs[str(cancelled.id)]["cost_usd"] == "0.00010000"
    assert runs[str(unmetered.id)]["usage"] == {"prompt_tokens": 20, "completion_tokens": 5, "total_tokens": 25}
    assert runs[str(unmetered.id)]["cost_usd"] is None


def test_it_does_not_open_another_users_session(staff_client, other_staff, agent):
    session, _ = make_turn(agent, user=other_staff)

    json_error(staff_client.get(f"{SESSIONS}/{session.id}"), 404, "session_not_found")
    json_error(staff_client.get(f"{SESSIONS}/{uuid.uuid4()}"), 404, "session_not_found")
    json_error(staff_client.get(f"{SESSIONS}/not-a-uuid"), 404)


# --- feedback -----------------------------------------------------------------------------


def test_it_records_thumbs_up_down_and_clear_on_an_answer_and_audits_each(staff_client, staff, agent):
    _, run = make_turn(agent, user=staff)

    up = post_json(staff_client, FEEDBACK, {"run_id": str(run.id), "value": 1})

    assert up.status_code == 200
    assert up.json()["run_id"] == str(run.id)
    assert up.json()["feedback"] == 1
    run.refresh_from_db()
    assert run.feedback == 1
    assert run.feedback_at is not None

    down = post_json(staff_client, FEEDBACK, {"run_id": str(run.id), "value": -1})
    assert down.json()["feedback"] == -1
    cleared = post_json(staff_client, FEEDBACK, {"run_id": str(run.id), "value": None})
    assert cleared.json() == {"run_id": str(run.id), "feedback": None, "feedback_at": None}
    run.refresh_from_db()
    assert (run.feedback, run.feedback_at) == (None, None)

    entries = list(AuditLog.objects.filter(action="run.feedback").order_by("id"))
    assert [(e.actor, e.target, e.details["value"], e.details["previous"]) for e in entries] == [
        ("user:ops", f"run:{run.id}", 1, None), ("user:ops", f"run:{run.id}", -1, 1),
        ("user:ops", f"run:{run.id}", None, -1)]
    assert entries[0].request_id == up["X-Request-ID"]


def test_it_refuses_feedback_on_runs_that_are_not_in_the_users_sessions(staff_client, other_staff, agent):
    _, theirs = make_turn(agent, user=other_staff)

    json_error(post_json(staff_client, FEEDBACK, {"run_id": str(theirs.id), "value": 1}), 404, "run_not_found",
               param="run_id")
    json_error(post_json(staff_client, FEEDBACK, {"run_id": str(uuid.uuid4()), "value": 1}), 404, "run_not_found")
    theirs.refresh_from_db()
    assert theirs.feedback is None
    assert not AuditLog.objects.filter(action="run.feedback").exists()


@pytest.mark.parametrize("body, param", [
    ({"value": 1}, "run_id"),
    ({"run_id": "RUN"}, "value"),
    ({"run_id": "RUN", "value": 2}, "value"),
    ({"run_id": "RUN", "value": 0}, "value"),
    ({"run_id": "RUN", "value": "up"}, "value"),
    ({"run_id": "RUN", "value": True}, "value"),
    ({"run_id": "RUN", "value": 1.0}, "value"),
    ({"run_id": "RUN", "value": [1]}, "value"),
    ({"run_id": "not-a-uuid", "value": 1}, "run_id"),
    ({"run_id": 12, "value": 1}, "run_id"),
    ({"run_id": "RUN", "value": 1, "comment": "nice"}, "comment"),
])
def test_it_rejects_bad_feedback_with_the_field_named(staff_client, staff, agent, body, param):
    _, run = make_turn(agent, user=staff)
    body = {k: (str(run.id) if v == "RUN" else v) for k, v in body.items()}

    json_error(post_json(staff_client, FEEDBACK, body), 400, "invalid_field", param=param)
    run.refresh_from_db()
    assert run.feedback is None


def test_it_rejects_feedback_bodies_that_are_not_a_json_object(staff_client, staff):
    json_error(staff_client.post(FEEDBACK, data="{not json", content_type="application/json"), 400, "invalid_json")
    json_error(post_json(staff_client, FEEDBACK, [1, 2]), 400, "invalid_request")
    json_error(staff_client.post(FEEDBACK, data="run_id=x", content_type="application/x-www-form-urlencoded"),
               415, "unsupported_media_type")
    json_error(staff_client.get(FEEDBACK), 405, "method_not_allowed")


def test_it_enforces_csrf_on_feedback_for_the_session(staff, agent):
    _, run = make_turn(agent, user=staff)
    client = Client(enforce_csrf_checks=True)
    client.force_login(staff)
    token = page_config(client.get("/console/"))["csrfToken"]

    refused = post_json(client, FEEDBACK, {"run_id": str(run.id), "value": 1})
    json_error(refused, 403, "csrf_failed")
    run.refresh_from_db()
    assert run.feedback is None

    accepted = post_json(client, FEEDBACK, {"run_id": str(run.id), "value": 1}, HTTP_X_CSRFTOKEN=token)
    assert accepted.status_code == 200, accepted.content
    run.refresh_from_db()
    assert run.feedback == 1


# --- a turn the way the WebSocket consumer runs it ----------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_staff_users_pipeline_turn_shows_up_in_the_console(staff_client, staff, make_agent):
    """A turn run through the one pipeline for a staff user (as the WebSocket consumer does for
    the console) is listed, reopens with its tool call, usage and cost, and takes feedback."""
    from agents.pipeline import ChatTurn, chat_complete
    from agents.selectors import agent_spec
    from billing.pricing import model_price_upsert

    make_agent("calc", skills=["calculator"])
    model_price_upsert(model="local/demo", input_per_1m=Decimal("100"), output_per_1m=Decimal("200"),
                       effective_from=timezone.now() - timedelta(days=1))
    spec = agent_spec("calc")

    async def chat() -> dict:
        turn = ChatTurn(principal=None, agent=spec, input_messages=[{"role": "user", "content": "6*7?"}],
                        transport="websocket", stream=True, user_id=staff.id)
        await turn.prepare()
        return await chat_complete(turn)

    result = async_to_sync(chat)()

    listed = staff_client.get(SESSIONS, {"agent": "calc"}).json()["results"]
    assert [s["id"] for s in listed] == [result["session_id"]]
    detail = staff_client.get(f"{SESSIONS}/{result['session_id']}").json()
    assert [m["role"] for m in detail["messages"]] == ["user", "assistant", "tool", "assistant"]
    assert detail["messages"][1]["tool_calls"][0]["name"] == "calculator"
    assert detail["messages"][-1]["content"] == result["output"]
    run = detail["runs"][0]
    assert run["id"] == result["id"]
    assert run["usage"] == result["usage"]
    assert Decimal(run["cost_usd"]) == Decimal(result["cost_usd"]) > 0
    assert post_json(staff_client, FEEDBACK, {"run_id": result["id"], "value": 1}).json()["feedback"] == 1
