"""Scopes that never widen: cached key entries follow every change of their links."""

from __future__ import annotations

import pytest
from django.urls import reverse
from rest_framework.test import APIClient

from agents.models import Agent
from conftest import Api, assert_error, orm

def api(secret: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    return client


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


# --- cached key entries follow their links -----------------------------------------------------


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
