"""The admin console: pages render, history is read-only, API-key secrets are shown once."""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from datetime import timedelta

import pytest
from django.contrib.admin.models import LogEntry
from django.contrib.auth import get_user_model
from django.contrib.messages import get_messages
from django.urls import reverse
from django.utils import timezone

from agents.models import Agent, AgentSkill, Document, Message, Run, Session, Skill
from governance.models import ApiKey
from governance.services import api_key_create

SECRET_RE = re.compile(r"ap_[0-9a-f]+_[A-Za-z0-9_-]+")


@dataclass
class Data:
    agent: Agent
    skill: Skill
    session: Session
    run: Run
    message: Message
    document: Document
    api_key: ApiKey


@pytest.fixture
def data(db) -> Data:
    skill = Skill.objects.create(name="clock", description="Tells the time.",
                                 parameters={"type": "object", "properties": {}})
    agent = Agent.objects.create(name="demo", model="local/demo", description="The demo agent.",
                                 system_prompt="You are helpful.")
    AgentSkill.objects.create(agent=agent, skill=skill, position=0)
    api_key, _ = api_key_create(name="ci", role=ApiKey.Role.CLIENT, agent_names=["demo"])
    session = Session.objects.create(agent=agent, api_key=api_key, title="First chat")
    run = Run.objects.create(agent=agent, session=session, api_key=api_key, started_at=timezone.now(),
                             transport=Run.Transport.REST, status=Run.Status.SUCCEEDED, model="local/demo",
                             total_tokens=12, latency_ms=40, request_id="req_abc", metadata={"k": "v"})
    message = Message.objects.create(session=session, run=run, role=Message.Role.USER, content="Hello there",
                                     created_at=timezone.now())
    Message.objects.create(session=session, run=run, role=Message.Role.ASSISTANT, content="",
                           tool_calls=[{"id": "call_1", "name": "clock", "arguments": "{}"}],
                           created_at=timezone.now())
    document = Document.objects.create(agent=agent, title="Handbook", content="Be kind.", source="wiki")
    return Data(agent, skill, session, run, message, document, api_key)


CHANGELISTS = ["agents_skill", "agents_agent", "agents_session", "agents_run", "agents_message",
               "agents_document", "governance_apikey"]


def change_url(obj) -> str:
    return reverse(f"admin:{obj._meta.app_label}_{obj._meta.model_name}_change", args=[obj.pk])


# --- Pages render ------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("name", CHANGELISTS)
def test_it_renders_changelists(admin_client, data, name):
    response = admin_client.get(reverse(f"admin:{name}_changelist"))
    assert response.status_code == 200
    assert response.context["cl"].result_count >= 1


@pytest.mark.django_db
@pytest.mark.parametrize("name", ["agents_skill", "agents_agent", "agents_document", "governance_apikey"])
def test_it_renders_add_pages(admin_client, data, name):
    assert admin_client.get(reverse(f"admin:{name}_add")).status_code == 200


@pytest.mark.django_db
@pytest.mark.parametrize("name", ["agents_session", "agents_run", "agents_message"])
def test_it_refuses_to_add_what_the_runtime_writes(admin_client, data, name):
    assert admin_client.get(reverse(f"admin:{name}_add")).status_code == 403


@pytest.mark.django_db
@pytest.mark.parametrize("attr", ["skill", "agent", "session", "run", "message", "document", "api_key"])
def test_it_renders_change_pages(admin_client, data, attr):
    response = admin_client.get(change_url(getattr(data, attr)))
    assert response.status_code == 200


@pytest.mark.django_db
def test_it_renders_the_index_with_the_platform_branding(admin_client, data):
    response = admin_client.get(reverse("admin:index"))
    assert response.status_code == 200
    assert b"Agent Platform" in response.content


# --- Access ------------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("name", CHANGELISTS)
def test_it_redirects_anonymous_users_to_login(client, data, name):
    response = client.get(reverse(f"admin:{name}_changelist"))
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("admin:login"))


@pytest.mark.django_db
def test_it_redirects_non_staff_users_to_login(client, data):
    user = get_user_model().objects.create_user("alice", password="pw-not-used")
    client.force_login(user)
    for name in CHANGELISTS:
        response = client.get(reverse(f"admin:{name}_changelist"))
        assert response.status_code == 302
        assert response["Location"].startswith(reverse("admin:login"))


# --- Agents ------------------------------------------------------------------------------


def agent_form(agent: Agent, **overrides) -> dict:
    form = {
        "name": agent.name, "description": agent.description, "enabled": "on" if agent.enabled else "",
        "model": agent.model, "temperature": agent.temperature, "max_tokens": agent.max_tokens,
        "timeout_seconds": agent.timeout_seconds, "fallback_models": "[]", "system_prompt": agent.system_prompt,
        "metadata": "{}",
        "agent_skills-TOTAL_FORMS": "0", "agent_skills-INITIAL_FORMS": "0",
        "agent_skills-MIN_NUM_FORMS": "0", "agent_skills-MAX_NUM_FORMS": "1000",
    }
    links = list(agent.agent_skills.all())
    form["agent_skills-TOTAL_FORMS"] = form["agent_skills-INITIAL_FORMS"] = str(len(links))
    for i, link in enumerate(links):
        form.update({f"agent_skills-{i}-id": link.pk, f"agent_skills-{i}-agent": agent.pk,
                     f"agent_skills-{i}-skill": link.skill_id, f"agent_skills-{i}-position": link.position})
    form.update(overrides)
    return {k: v for k, v in form.items() if v != ""}


@pytest.mark.django_db
def test_it_shows_json_fields_indented(admin_client, data):
    data.agent.fallback_models = ["openai/gpt-4o-mini"]
    data.agent.save()
    response = admin_client.get(change_url(data.agent))
    assert '[\n  &quot;openai/gpt-4o-mini&quot;\n]' in response.content.decode()


@pytest.mark.django_db
def test_it_saves_an_agent_with_a_valid_fallback(admin_client, data):
    response = admin_client.post(change_url(data.agent),
                                 agent_form(data.agent, fallback_models='["openai/gpt-4o-mini"]', metadata=""))
    assert response.status_code == 302
    data.agent.refresh_from_db()
    assert data.agent.fallback_models == ["openai/gpt-4o-mini"]
    # An empty JSON box means the field's default, not NULL.
    assert data.agent.metadata == {}


@pytest.mark.django_db
def test_it_refuses_a_bad_fallback_model(admin_client, data):
    response = admin_client.post(change_url(data.agent),
                                 agent_form(data.agent, fallback_models='["not a model"]', max_tokens=99))
    assert response.status_code == 200
    errors = response.context["adminform"].form.errors
    assert "fallback_models" in errors
    assert "provider/model-name" in errors["fallback_models"][0]
    data.agent.refresh_from_db()
    assert data.agent.fallback_models == []
    assert data.agent.max_tokens == 1024


@pytest.mark.django_db
def test_it_orders_and_adds_skills_inline(admin_client, data):
    second = Skill.objects.create(name="search")
    form = agent_form(data.agent)
    form.update({"agent_skills-TOTAL_FORMS": "2", "agent_skills-1-agent": data.agent.pk,
                 "agent_skills-1-skill": second.pk, "agent_skills-1-position": "0",
                 "agent_skills-0-position": "5"})
    assert admin_client.post(change_url(data.agent), form).status_code == 302
    assert [link.skill.name for link in data.agent.agent_skills.all()] == ["search", "clock"]


@pytest.mark.django_db
def test_it_links_an_agent_to_its_documents_and_runs(admin_client, data):
    page = admin_client.get(change_url(data.agent)).content.decode()
    assert f"{reverse('admin:agents_document_changelist')}?agent__id__exact={data.agent.pk}" in page
    assert "1 document<" in page
    assert f"{reverse('admin:agents_run_changelist')}?agent__id__exact={data.agent.pk}" in page
    assert "1 in the last 24 hours" in page
    runs = admin_client.get(reverse("admin:agents_run_changelist"), {"agent__id__exact": data.agent.pk})
    assert list(runs.context["cl"].result_list) == [data.run]


@pytest.mark.django_db
def test_it_searches_and_filters_agents(admin_client, data):
    Agent.objects.create(name="support", model="openai/gpt-4o-mini", system_prompt="Answer tickets.",
                         enabled=False)
    url = reverse("admin:agents_agent_changelist")

    def names(**params):
        response = admin_client.get(url, params)
        assert response.status_code == 200
        return [a.name for a in response.context["cl"].result_list]

    assert names(q="tickets") == ["support"]
    assert names(q="gpt-4o") == ["support"]
    assert names(q="helpful") == ["demo"]
    assert names(enabled__exact="0") == ["support"]
    assert names(model="local/demo") == ["demo"]
    assert names(q="nothing-matches") == []


@pytest.mark.django_db
def test_it_enables_and_disables_agents(admin_client, data):
    url = reverse("admin:agents_agent_changelist")
    admin_client.post(url, {"action": "disable_selected", "_selected_action": [data.agent.pk]})
    data.agent.refresh_from_db()
    assert data.agent.enabled is False
    admin_client.post(url, {"action": "enable_selected", "_selected_action": [data.agent.pk]})
    data.agent.refresh_from_db()
    assert data.agent.enabled is True


@pytest.mark.django_db
def test_it_lists_agents_without_a_query_per_row(admin_client, django_assert_max_num_queries):
    skills = [Skill.objects.create(name=f"skill-{i}") for i in range(3)]
    for i in range(30):
        agent = Agent.objects.create(name=f"agent-{i:02d}", model="local/demo")
        for position, skill in enumerate(skills):
            AgentSkill.objects.create(agent=agent, skill=skill, position=position)
    with django_assert_max_num_queries(12):
        response = admin_client.get(reverse("admin:agents_agent_changelist"))
    assert response.status_code == 200
    assert "skill-0, skill-1, skill-2" in response.content.decode()


@pytest.mark.django_db
def test_it_counts_skill_agents(admin_client, data):
    response = admin_client.get(reverse("admin:agents_skill_changelist"))
    assert response.context["cl"].result_list[0].agent_count == 1


@pytest.mark.django_db
def test_it_saves_the_default_for_an_empty_json_box(admin_client, data):
    response = admin_client.post(reverse("admin:agents_skill_add"),
                                 {"name": "echo", "kind": "builtin", "enabled": "on", "parameters": "", "config": ""})
    assert response.status_code == 302
    assert Skill.objects.get(name="echo").parameters == {}


# --- Sessions, runs, messages ------------------------------------------------------------


@pytest.mark.django_db
def test_it_shows_a_session_with_its_messages_and_owner(admin_client, data):
    listing = admin_client.get(reverse("admin:agents_session_changelist"))
    row = listing.context["cl"].result_list[0]
    assert row.message_count == 2
    assert f"key {data.api_key.prefix}" in listing.content.decode()
    page = admin_client.get(change_url(data.session)).content.decode()
    assert "Hello there" in page
    assert "call_1" in page
    by_id = admin_client.get(reverse("admin:agents_session_changelist"), {"q": str(data.session.pk)[:13]})
    assert list(by_id.context["cl"].result_list) == [data.session]


@pytest.mark.django_db
def test_it_shows_the_latest_messages_of_a_long_session_inline(admin_client, data):
    start = timezone.now()
    Message.objects.bulk_create(
        Message(session=data.session, role=Message.Role.USER, content=f"note-{i:03d}",
                created_at=start + timedelta(seconds=i))
        for i in range(120)
    )
    page = admin_client.get(change_url(data.session)).content.decode()
    assert "note-119" in page and "note-020" in page
    assert "note-019" not in page and "Hello there" not in page
    assert "122 messages" in page


@pytest.mark.django_db
def test_it_edits_only_session_metadata(admin_client, data):
    messages = list(data.session.messages.all())
    form = {"title": "Renamed", "metadata": '{"team": "support"}',
            "messages-TOTAL_FORMS": str(len(messages)), "messages-INITIAL_FORMS": str(len(messages)),
            "messages-MIN_NUM_FORMS": "0", "messages-MAX_NUM_FORMS": "1000"}
    for i, message in enumerate(messages):
        form.update({f"messages-{i}-id": message.pk, f"messages-{i}-session": data.session.pk})
    response = admin_client.post(change_url(data.session), form)
    assert response.status_code == 302
    data.session.refresh_from_db()
    assert data.session.metadata == {"team": "support"}
    assert data.session.title == "First chat"
    assert data.session.messages.count() == 2


@pytest.mark.django_db
def test_it_keeps_runs_read_only(admin_client, data):
    listing = admin_client.get(reverse("admin:agents_run_changelist"))
    assert listing.status_code == 200
    assert reverse("admin:agents_run_add") not in listing.content.decode()
    assert listing.context["has_add_permission"] is False

    response = admin_client.post(change_url(data.run), {"status": "failed", "transport": "rest"})
    assert response.status_code == 403
    data.run.refresh_from_db()
    assert data.run.status == Run.Status.SUCCEEDED

    page = admin_client.get(change_url(data.run))
    assert page.status_code == 200
    assert b'name="_save"' not in page.content


@pytest.mark.django_db
def test_it_lets_only_superusers_delete_runs(client, data):
    from django.contrib.auth.models import Permission

    staff = get_user_model().objects.create_user("bob", password="pw-not-used", is_staff=True)
    staff.user_permissions.add(*Permission.objects.filter(codename__in=["view_run", "delete_run"]))
    client.force_login(staff)
    assert client.get(change_url(data.run)).status_code == 200
    delete_url = reverse("admin:agents_run_delete", args=[data.run.pk])
    assert client.post(delete_url, {"post": "yes"}).status_code == 403
    assert Run.objects.filter(pk=data.run.pk).exists()


@pytest.mark.django_db
def test_it_refuses_to_change_messages(admin_client, data):
    response = admin_client.post(change_url(data.message), {"role": "system", "content": "edited"})
    assert response.status_code == 403
    data.message.refresh_from_db()
    assert data.message.content == "Hello there"


@pytest.mark.django_db
def test_it_searches_runs_by_exact_values(admin_client, data):
    other = Run.objects.create(agent=data.agent, started_at=timezone.now() - timedelta(hours=1),
                               transport=Run.Transport.SSE, request_id="req_other")
    url = reverse("admin:agents_run_changelist")

    def found(q):
        return list(admin_client.get(url, {"q": q}).context["cl"].result_list)

    assert found(str(data.run.pk)) == [data.run]
    assert found("req_other") == [other]
    assert found(data.api_key.prefix) == [data.run]
    assert found("req_") == []
    response = admin_client.get(url, {"transport__exact": "sse"})
    assert list(response.context["cl"].result_list) == [other]


@pytest.mark.django_db
def test_it_searches_and_filters_messages(admin_client, data):
    url = reverse("admin:agents_message_changelist")
    assert list(admin_client.get(url, {"q": "hello"}).context["cl"].result_list) == [data.message]
    assert len(admin_client.get(url, {"role__exact": "assistant"}).context["cl"].result_list) == 1
    by_session = admin_client.get(url, {"session__id__exact": str(data.session.pk)})
    assert len(by_session.context["cl"].result_list) == 2


# --- API keys ----------------------------------------------------------------------------


@pytest.mark.django_db
def test_it_creates_an_api_key_and_shows_its_secret_once(admin_client, data, admin_user, caplog):
    caplog.set_level(logging.DEBUG)
    response = admin_client.post(reverse("admin:governance_apikey_add"),
                                 {"name": "billing bot", "role": "developer", "agents": [data.agent.pk]},
                                 follow=True)
    assert response.status_code == 200

    shown = [str(m) for m in response.context["messages"]]
    secrets_shown = [s for m in shown for s in SECRET_RE.findall(m)]
    assert len(secrets_shown) == 1
    secret = secrets_shown[0]
    assert response.content.decode().count(secret) == 1
    assert any("Copy it now: it will not be shown again" in m for m in shown)

    key = ApiKey.objects.get(name="billing bot")
    assert key.role == "developer"
    assert key.created_by == admin_user
    assert (key.all_agents, list(key.agents.all())) == (False, [data.agent])
    assert key.secret_hash == hashlib.sha256(secret.encode()).hexdigest()
    for field in ApiKey._meta.concrete_fields:
        assert secret not in str(getattr(key, field.attname))
    for entry in LogEntry.objects.all():
        assert secret not in entry.object_repr and secret not in entry.change_message
    assert secret not in caplog.text

    # Never again: not on the next page, not on the key's own page.
    again = admin_client.get(reverse("admin:governance_apikey_changelist"))
    assert secret not in again.content.decode()
    page = admin_client.get(change_url(key)).content.decode()
    assert secret not in page
    assert key.secret_hash not in page
    assert key.prefix in page


@pytest.mark.django_db
def test_it_refuses_a_new_key_that_has_already_expired(admin_client, data):
    past = timezone.now() - timedelta(days=1)
    response = admin_client.post(reverse("admin:governance_apikey_add"),
                                 {"name": "late", "role": "client",
                                  "expires_at_0": past.strftime("%Y-%m-%d"), "expires_at_1": past.strftime("%H:%M:%S")})
    assert response.status_code == 200
    assert "expires_at" in response.context["adminform"].form.errors
    assert not ApiKey.objects.filter(name="late").exists()
    assert not list(get_messages(response.wsgi_request))


@pytest.mark.django_db
def test_it_edits_a_key_but_not_its_secret(admin_client, data):
    before = ApiKey.objects.get(pk=data.api_key.pk)
    response = admin_client.post(change_url(data.api_key),
                                 {"name": "renamed", "role": "admin", "agents": [], "prefix": "evil",
                                  "secret_hash": "0" * 64})
    assert response.status_code == 302
    key = ApiKey.objects.get(pk=data.api_key.pk)
    assert (key.name, key.role, key.enabled) == ("renamed", "admin", False)
    assert (key.all_agents, list(key.agents.all())) == (False, [])  # no box ticked, none selected: no agent
    assert (key.prefix, key.secret_hash) == (before.prefix, before.secret_hash)


@pytest.mark.django_db
def test_it_revokes_selected_keys(admin_client, data):
    other, _ = api_key_create(name="other", role=ApiKey.Role.CLIENT)
    url = reverse("admin:governance_apikey_changelist")
    response = admin_client.post(url, {"action": "revoke_selected", "_selected_action": [data.api_key.pk]},
                                 follow=True)
    assert response.status_code == 200
    data.api_key.refresh_from_db()
    other.refresh_from_db()
    assert data.api_key.revoked_at is not None
    assert data.api_key.enabled is True
    assert other.revoked_at is None
    assert "Revoked 1 key." in [str(m) for m in response.context["messages"]]

    revoked = admin_client.get(url, {"status": "revoked"}).context["cl"].result_list
    assert list(revoked) == [data.api_key]
    active = admin_client.get(url, {"status": "active"}).context["cl"].result_list
    assert list(active) == [other]


def test_the_price_list_labels_the_demo_models_price_as_a_demo_price(admin_client, db):
    import importlib

    from django.apps import apps

    # What migration 0005 seeded (a transactional test elsewhere may have flushed it).
    importlib.import_module("billing.migrations.0005_seed_demo_price").seed(apps, None)

    html = admin_client.get("/admin/billing/modelprice/", {"q": "local/demo"}).content.decode()

    assert "local/demo" in html
    assert "DEMO PRICE, not a real cost: local/demo runs offline for free." in html


@pytest.mark.django_db
def test_it_shows_each_models_circuit_on_the_agent_pages(admin_client, settings):
    from asgiref.sync import async_to_sync

    from agentplatform.circuit import circuit_failure

    settings.CIRCUIT_FAILURE_THRESHOLD = 2
    agent = Agent.objects.create(name="flaky", model="openai/admin-circuit-primary",
                                 fallback_models=["openai/admin-circuit-fallback"])
    Agent.objects.create(name="steady", model="local/demo")
    for _ in range(2):
        async_to_sync(circuit_failure)("openai/admin-circuit-primary")

    listing = admin_client.get(reverse("admin:agents_agent_changelist")).content.decode()
    page = admin_client.get(change_url(agent)).content.decode()

    assert re.search(r"<strong[^>]*>open</strong>: openai/admin-circuit-primary", listing)
    assert listing.count(">closed<") >= 1  # the steady agent
    assert re.search(r"<code>openai/admin-circuit-primary</code>: <strong>open</strong> \(failures: 2, retry_at: ", page)
    assert "<code>openai/admin-circuit-fallback</code>: <strong>closed</strong>" in page
