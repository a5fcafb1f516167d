"""Scopes that never widen: "all agents" and "all skills" are explicit states of a key, a key
whose agents are deleted may call none, cached key entries follow every change of their links,
and the admin API keeps at least one active admin key."""

from __future__ import annotations

import io
import threading
import time
from datetime import timedelta
from decimal import Decimal

import pytest
from django.core.management import call_command
from django.db import connection, connections, transaction
from django.db.migrations.executor import MigrationExecutor
from django.urls import reverse
from django.utils import timezone
from rest_framework.test import APIClient

from agents.models import Agent
from billing.budgets import budget_create
from conftest import Api, assert_error, orm
from governance.models import ApiKey, AuditLog
from governance.selectors import principal_for_key
from governance.services import api_key_revoke

KEYS = "/api/v1/admin/api-keys"


def api(secret: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    return client


def key_of(secret: str) -> ApiKey:
    return ApiKey.objects.get(prefix=secret.split("_")[1])


def agent_names(secret: str) -> list[str]:
    response = api(secret).get("/api/v1/agents")
    assert response.status_code == 200, response.content
    return [a["name"] for a in response.json()["results"]]


def delete_in_the_admin(admin_client, *agents: Agent) -> None:
    """The Django admin's "Delete selected agents" action, confirmed: a queryset delete."""
    response = admin_client.post(reverse("admin:agents_agent_changelist"),
                                 {"action": "delete_selected", "_selected_action": [a.pk for a in agents],
                                  "post": "yes"})
    assert response.status_code == 302, response.content[:500]
    assert not Agent.objects.filter(pk__in=[a.pk for a in agents]).exists()


# --- a key whose agents are gone may call none ------------------------------------------------


@pytest.mark.django_db(transaction=True)
async def test_it_gives_a_key_no_agent_once_the_admin_deleted_its_agents(make_agent, make_key, admin_client):
    demo = await orm(make_agent, name="demo")
    await orm(make_agent, name="other")
    limited = await orm(make_key, agents=["demo"])
    admin_key = await orm(make_key, role="admin")

    await orm(delete_in_the_admin, admin_client, demo)

    client = Api(limited)
    listed = await client.get("/api/v1/agents")
    assert listed.status_code == 200
    assert listed.json()["results"] == []
    assert (await client.get("/v1/models")).json()["data"] == []
    assert_error(await client.get("/api/v1/agents/other"), 404, "agent_not_found")
    assert_error(await client.post("/api/v1/agents/other/chat", {"message": "hi"}), 404, "agent_not_found")
    assert_error(await client.post("/v1/chat/completions",
                                   {"model": "other", "messages": [{"role": "user", "content": "hi"}]}), 404)
    shown = (await Api(admin_key).get(f"{KEYS}/{limited.split('_')[1]}")).json()
    assert (shown["all_agents"], shown["agents"]) == (False, [])
    assert await orm(lambda: key_of(limited).all_agents) is False


@pytest.mark.django_db(transaction=True)
async def test_it_forgets_a_cached_key_when_the_admin_deletes_its_agent(make_agent, make_key, admin_client):
    demo = await orm(make_agent, name="demo")
    await orm(make_agent, name="other")
    limited = await orm(make_key, agents=["demo", "other"])
    client = Api(limited)
    assert (await client.post("/api/v1/agents/demo/chat", {"message": "hi"})).status_code == 200  # cached now

    await orm(delete_in_the_admin, admin_client, demo)
    await orm(make_agent, name="demo")  # a new agent with the old name is not the key's

    assert_error(await client.post("/api/v1/agents/demo/chat", {"message": "hi"}), 404, "agent_not_found")
    assert [a["name"] for a in (await client.get("/api/v1/agents")).json()["results"]] == ["other"]
    assert (await client.post("/api/v1/agents/other/chat", {"message": "hi"})).status_code == 200


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("unlink", [
    pytest.param(lambda: Agent.objects.filter(name="demo").delete(), id="agent-queryset-delete"),
    pytest.param(lambda: Agent.objects.get(name="demo").delete(), id="agent-delete"),
    pytest.param(lambda: Agent.objects.get(name="demo").api_keys.clear(), id="reverse-clear"),
])
def test_it_forgets_a_cached_key_however_its_links_go(make_agent, make_key, unlink):
    make_agent(name="demo")
    make_agent(name="other")
    limited = make_key(agents=["demo", "other"])
    assert agent_names(limited) == ["demo", "other"]  # cached now

    unlink()
    if not Agent.objects.filter(name="demo").exists():
        make_agent(name="demo")

    assert agent_names(limited) == ["other"]
    assert api(limited).get("/api/v1/agents/demo").status_code == 404


@pytest.mark.django_db
def test_it_shows_a_key_no_budget_of_agents_it_may_not_call(make_agent, make_key, admin_client):
    demo = make_agent(name="demo")
    make_agent(name="other")
    budget_create(scope="agent", agent_name="other", period="month", limit_usd=Decimal("5"))
    everyone, limited = make_key(), make_key(agents=["demo"])

    delete_in_the_admin(admin_client, demo)

    assert [b["agent"] for b in api(everyone).get("/api/v1/budgets").json()["budgets"]] == ["other"]
    assert api(limited).get("/api/v1/budgets").json()["budgets"] == []


@pytest.mark.django_db(transaction=True)
def test_it_applies_an_admin_edit_of_a_key_on_the_very_next_request(make_agent, make_key, admin_client):
    make_agent(name="demo")
    other = make_agent(name="other")
    limited = make_key(agents=["demo"])
    key = key_of(limited)
    assert api(limited).get("/api/v1/agents/other").status_code == 404  # cached now
    url = reverse("admin:governance_apikey_change", args=[key.pk])
    form = {"name": key.name, "role": "client", "enabled": "on", "all_skills": "on", "allowed_skills": "[]",
            "rate_limit_rpm": "", "rate_limit_tpm": ""}

    assert admin_client.post(url, {**form, "all_agents": "on", "agents": []}).status_code == 302
    assert agent_names(limited) == ["demo", "other"]

    assert admin_client.post(url, {**form, "agents": [other.pk]}).status_code == 302
    assert agent_names(limited) == ["other"]
    assert api(limited).get("/api/v1/agents/demo").status_code == 404

    assert admin_client.post(url, {**form, "agents": []}).status_code == 302
    assert agent_names(limited) == []


@pytest.mark.django_db
def test_it_refuses_all_agents_with_a_list_in_the_admin(make_agent, make_key, admin_client):
    demo = make_agent(name="demo")
    key = key_of(make_key(agents=["demo"]))
    url = reverse("admin:governance_apikey_change", args=[key.pk])

    page = admin_client.post(url, {"name": key.name, "role": "client", "enabled": "on", "all_agents": "on",
                                   "agents": [demo.pk], "allowed_skills": "[]"})

    assert page.status_code == 200
    assert "agents" in page.context["adminform"].form.errors
    assert ApiKey.objects.get(pk=key.pk).all_agents is False


@pytest.mark.django_db
def test_it_creates_keys_for_all_agents_by_default_in_the_admin(admin_client):
    page = admin_client.get(reverse("admin:governance_apikey_add"))

    form = page.context["adminform"].form
    assert form["all_agents"].initial is True and form["all_skills"].initial is True


# --- the API says "all" or a list -------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("body, scope", [
    pytest.param({}, (True, [], True, []), id="neither-is-all"),
    pytest.param({"all_agents": True, "all_skills": True}, (True, [], True, []), id="all"),
    pytest.param({"agents": ["demo"], "allowed_skills": ["calculator"]}, (False, ["demo"], False, ["calculator"]),
                 id="lists"),
    pytest.param({"agents": [], "allowed_skills": []}, (False, [], False, []), id="empty-lists-are-none"),
    pytest.param({"all_agents": False, "all_skills": False}, (False, [], False, []), id="not-all-is-none"),
])
def test_it_creates_keys_with_an_explicit_scope(make_agent, make_key, body, scope):
    make_agent(name="demo", skills=["calculator"])
    admin = make_key("admin")

    response = api(admin).post(KEYS, {"name": "k", "role": "client", **body}, format="json")

    assert response.status_code == 201, response.content
    shown = response.json()
    assert (shown["all_agents"], shown["agents"], shown["all_skills"], shown["allowed_skills"]) == scope
    principal = principal_for_key(shown["key"])
    assert principal.agents == (None if scope[0] else frozenset(scope[1]))
    assert principal.skills == (None if scope[2] else frozenset(scope[3]))


@pytest.mark.django_db
@pytest.mark.parametrize("body, param", [
    pytest.param({"all_agents": True, "agents": ["demo"]}, "agents", id="all-and-agents"),
    pytest.param({"all_skills": True, "allowed_skills": ["calculator"]}, "allowed_skills", id="all-and-skills"),
    pytest.param({"all_agents": "yes please"}, "all_agents", id="not-a-bool"),
])
def test_it_refuses_all_with_a_list(make_agent, make_key, body, param):
    make_agent(name="demo", skills=["calculator"])
    admin = make_key("admin")
    target = key_of(make_key(agents=["demo"]))

    assert_error(api(admin).post(KEYS, {"name": "k", "role": "client", **body}, format="json"), 400, param=param)
    assert_error(api(admin).patch(f"{KEYS}/{target.prefix}", body, format="json"), 400, param=param)
    assert ApiKey.objects.count() == 2
    target.refresh_from_db()
    assert (target.all_agents, target.all_skills) == (False, True)
    assert list(target.agents.values_list("name", flat=True)) == ["demo"]


@pytest.mark.django_db
def test_it_offers_a_key_with_no_skills_none(make_agent, make_key):
    """allowed_skills [] with all_skills false is none, as agents are: such a key may not give
    an agent any skill."""
    make_agent(name="demo", skills=["calculator"])
    admin = make_key("admin")
    developer = make_key("developer")
    prefix = key_of(developer).prefix
    agent = {"name": "new", "model": "local/demo", "skills": ["calculator"]}

    body = api(admin).patch(f"{KEYS}/{prefix}", {"allowed_skills": []}, format="json").json()
    assert (body["all_skills"], body["allowed_skills"]) == (False, [])
    assert_error(api(developer).post("/api/v1/agents", agent, format="json"), 403, "skill_not_allowed")

    body = api(admin).patch(f"{KEYS}/{prefix}", {"all_skills": True}, format="json").json()
    assert (body["all_skills"], body["allowed_skills"]) == (True, [])
    assert api(developer).post("/api/v1/agents", agent, format="json").status_code == 201


@pytest.mark.django_db
def test_it_audits_the_scope(make_agent, make_key):
    make_agent(name="demo")
    admin = make_key("admin")
    prefix = key_of(make_key()).prefix

    api(admin).patch(f"{KEYS}/{prefix}", {"agents": ["demo"]}, format="json")

    entry = AuditLog.objects.filter(action="api_key.updated").latest("id")
    assert entry.details["changed"]["all_agents"] == {"from": True, "to": False}
    assert entry.details["changed"]["agents"] == {"from": [], "to": ["demo"]}


# --- the data migration ---------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_it_maps_existing_keys_to_explicit_scopes(make_agent):
    make_agent(name="demo")
    executor = MigrationExecutor(connection)
    before, after = [("governance", "0004_apikey_all_agents_all_skills")], [("governance",
                                                                               "0005_apikey_scopes_from_links")]
    try:
        executor.migrate(before)
        old = executor.loader.project_state(before).apps
        OldKey = old.get_model("governance", "ApiKey")
        OldKey.objects.create(name="all", prefix="p1", secret_hash="x", allowed_skills=[])
        limited = OldKey.objects.create(name="limited", prefix="p2", secret_hash="x", allowed_skills=["calculator"])
        limited.agents.add(old.get_model("agents", "Agent").objects.get(name="demo"))

        MigrationExecutor(connection).migrate(after)

        assert dict(ApiKey.objects.values_list("prefix", "all_agents")) == {"p1": True, "p2": False}
        assert dict(ApiKey.objects.values_list("prefix", "all_skills")) == {"p1": True, "p2": False}

        # Back again would read a key restricted to nothing as a key for everything: refused.
        ApiKey.objects.get(prefix="p2").agents.clear()
        with pytest.raises(RuntimeError, match="p2"):
            MigrationExecutor(connection).migrate(before)
    finally:
        call_command("migrate", verbosity=0)


# --- the last active admin key --------------------------------------------------------------

TAKE_AWAY = [
    pytest.param("patch", {"role": "developer"}, id="demote"),
    pytest.param("patch", {"enabled": False}, id="disable"),
    pytest.param("patch", {"expires_at": "2000-01-01T00:00:00Z"}, id="expire"),
    pytest.param("revoke", None, id="revoke"),
]


def take_away(secret: str, prefix: str, how: str, body: dict | None):
    if how == "revoke":
        return api(secret).post(f"{KEYS}/{prefix}/revoke", {}, format="json")
    return api(secret).patch(f"{KEYS}/{prefix}", body, format="json")


def still_admin(secret: str) -> bool:
    return api(secret).get(KEYS).status_code == 200


@pytest.mark.django_db
@pytest.mark.parametrize("how, body", TAKE_AWAY)
def test_it_keeps_the_last_active_admin_key(make_key, how, body):
    admin = make_key("admin")
    before = ApiKey.objects.values().get(pk=key_of(admin).pk)

    error = assert_error(take_away(admin, key_of(admin).prefix, how, body), 409, "last_admin_key")

    assert "manage.py create_api_key" in error["message"]
    after = ApiKey.objects.values().get(pk=key_of(admin).pk)
    assert {k: v for k, v in after.items() if k != "last_used_at"} == {
        k: v for k, v in before.items() if k != "last_used_at"}
    assert not AuditLog.objects.filter(action__in=["api_key.updated", "api_key.revoked"]).exists()
    assert still_admin(admin)


@pytest.mark.django_db
@pytest.mark.parametrize("how, body", TAKE_AWAY)
def test_it_lets_an_admin_key_go_while_another_is_active(make_key, how, body):
    admin = make_key("admin")
    other = make_key("admin")

    response = take_away(admin, key_of(admin).prefix, how, body)

    assert response.status_code == 200, response.content
    assert not still_admin(admin)
    assert still_admin(other)
    # Now `other` is the last one.
    assert_error(take_away(other, key_of(other).prefix, how, body), 409, "last_admin_key")


@pytest.mark.django_db
@pytest.mark.parametrize("state", ["disabled", "expired", "revoked", "developer"])
def test_it_counts_only_active_admin_keys(make_key, state):
    admin = make_key("admin")
    other = key_of(make_key("admin"))
    match state:
        case "disabled":
            other.enabled = False
        case "expired":
            other.expires_at = timezone.now() - timedelta(seconds=1)
        case "revoked":
            other.revoked_at = timezone.now()
        case "developer":
            other.role = ApiKey.Role.DEVELOPER
    other.save()

    assert_error(take_away(admin, key_of(admin).prefix, "revoke", None), 409, "last_admin_key")


@pytest.mark.django_db
def test_it_still_changes_the_last_admin_key_in_ways_that_keep_it(make_key):
    admin = make_key("admin")
    prefix = key_of(admin).prefix
    later = (timezone.now() + timedelta(days=30)).isoformat()

    response = api(admin).patch(f"{KEYS}/{prefix}", {"name": "ops", "expires_at": later, "rate_limit_rpm": 100},
                                format="json")

    assert response.status_code == 200, response.content
    assert response.json()["status"] == "active"
    assert api(admin).post(f"{KEYS}/{prefix}/rotate", {"grace_seconds": 0}, format="json").status_code == 200


@pytest.mark.django_db
def test_it_leaves_staff_and_create_api_key_as_the_way_back_in(make_key, admin_client):
    admin = make_key("admin")

    admin_client.post(reverse("admin:governance_apikey_changelist"),
                      {"action": "revoke_selected", "_selected_action": [key_of(admin).pk]})
    assert key_of(admin).revoked_at is not None

    out = io.StringIO()
    call_command("create_api_key", "--name", "again", "--role", "admin", stdout=out)
    secret = out.getvalue().splitlines()[1]
    assert still_admin(secret)


@pytest.mark.django_db(transaction=True)
def test_it_lets_only_one_of_two_admin_keys_go_at_once(make_key):
    """Two requests that each revoke an admin key, with two admin keys: the second waits for the
    first's locks, then sees what it committed and refuses (on SQLite, IMMEDIATE transactions
    serialize writers)."""
    if connection.vendor != "postgresql":
        pytest.skip("row locks: PostgreSQL (the production lane)")
    first, second = make_key("admin"), make_key("admin")
    result: dict = {}

    def second_revokes_itself() -> None:
        try:
            result["response"] = take_away(second, key_of(second).prefix, "revoke", None)
        finally:
            connections.close_all()

    with transaction.atomic():
        # The first key's own revocation, in flight: its transaction holds its locks to the commit.
        api_key_revoke(api_key=key_of(first), protect_last_admin=True, actor="key:first")
        thread = threading.Thread(target=second_revokes_itself)
        thread.start()
        deadline = time.monotonic() + 10
        with connection.cursor() as cursor:
            while thread.is_alive() and time.monotonic() < deadline:
                cursor.execute("SELECT pg_stat_clear_snapshot()")
                cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                               "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()")
                if cursor.fetchone()[0]:
                    break
                time.sleep(0.02)
    thread.join(10)

    assert_error(result["response"], 409, "last_admin_key")
    assert key_of(first).revoked_at is not None
    assert key_of(second).revoked_at is None
    assert still_admin(second)
