"""The write API for agents: POST /api/v1/agents, PATCH and DELETE /api/v1/agents/{name}, for
developer and admin keys. Requests go through the real ASGI application; changes must reach
the next chat request at once (dynamic agents) and name the key in the audit log."""

from __future__ import annotations

import json

import pytest

from agents.models import Agent, Run, Session
from conftest import Api, assert_error, orm
from governance.models import ApiKey, AuditLog

pytestmark = pytest.mark.django_db(transaction=True)

AGENTS = "/api/v1/agents"
AGENT = "/api/v1/agents/{}"
CHAT = "/api/v1/agents/{}/chat"


@pytest.fixture
def demo(make_agent):
    return make_agent(name="demo", description="The demo agent.", system_prompt="Be brief.")


@pytest.fixture
async def developer(make_key) -> str:
    return await orm(make_key, role="developer")


async def request(method: str, path: str, key: str | None, body=None):
    kwargs = {} if body is None else {"content": json.dumps(body), "headers": {"Content-Type": "application/json"}}
    return await Api(key).request(method, path, **kwargs)


# --- create -------------------------------------------------------------------------------


async def test_it_creates_an_agent(developer):
    response = await request("POST", AGENTS, developer, {
        "name": "writer", "model": "local/demo", "description": "Writes.", "system_prompt": "Be kind.",
        "temperature": 0.2, "max_tokens": 300, "timeout_seconds": 30, "metadata": {"team": "docs"},
        "skills": ["calculator"], "fallback_models": ["local/other"]})

    assert response.status_code == 201, response.text
    body = response.json()
    assert body == (await Api(developer).get(AGENT.format("writer"))).json()
    assert body["system_prompt"] == "Be kind." and body["metadata"] == {"team": "docs"}
    assert body["temperature"] == 0.2 and body["max_tokens"] == 300 and body["timeout_seconds"] == 30
    assert body["fallback_models"] == ["local/other"]
    assert [s["name"] for s in body["skills"]] == ["calculator"]
    agent = await orm(Agent.objects.get, name="writer")
    assert agent.enabled and agent.description == "Writes."

    chat = await Api(developer).post(CHAT.format("writer"), {"message": "hi"})
    assert chat.json()["output"] == "You said: hi"


async def test_it_lets_admin_keys_create_agents(make_key):
    admin = await orm(make_key, role="admin")

    response = await request("POST", AGENTS, admin, {"name": "minimal", "model": "local/demo"})

    assert response.status_code == 201, response.text
    assert response.json()["temperature"] == 0.7  # the model's defaults for what is not given


async def test_it_refuses_a_duplicate_name(demo, developer):
    error = assert_error(await request("POST", AGENTS, developer, {"name": "demo", "model": "local/other"}),
                         409, "agent_exists", param="name")

    assert "demo" in error["message"]
    assert (await orm(Agent.objects.get, name="demo")).model == "local/demo"


async def test_it_refuses_the_name_of_a_disabled_agent(make_agent, developer):
    await orm(make_agent, name="off", enabled=False)

    assert_error(await request("POST", AGENTS, developer, {"name": "off", "model": "local/demo"}),
                 409, "agent_exists")


async def test_it_names_the_bad_field(developer):
    error = assert_error(await request("POST", AGENTS, developer, {"name": "bad", "model": "no-slash"}),
                         400, "invalid_agent", param="model")

    assert error["details"] and error["details"][0].startswith("model:")
    assert not await orm(Agent.objects.filter(name="bad").exists)


async def test_it_lists_every_problem(developer):
    error = assert_error(await request("POST", AGENTS, developer, {
        "name": "bad", "model": "local/demo", "temperature": "hot", "skills": ["no-such-skill"], "colour": "red"}),
        400, "invalid_agent", param="temperature")  # the first problem, in the body's order

    assert len(error["details"]) == 3
    assert any(d.startswith("temperature:") for d in error["details"])
    assert any(d.startswith("skills:") and "no-such-skill" in d for d in error["details"])


async def test_it_needs_a_name_and_a_model(developer):
    error = assert_error(await request("POST", AGENTS, developer, {"description": "nameless"}), 400, param="name")

    assert error["details"] == ["name: required", "model: required"]


async def test_it_needs_a_json_object(developer):
    assert_error(await request("POST", AGENTS, developer, [{"name": "x", "model": "local/demo"}]),
                 400, "invalid_agent")


# --- update -------------------------------------------------------------------------------


async def test_it_changes_only_the_given_fields(demo, developer):
    response = await request("PATCH", AGENT.format("demo"), developer, {"system_prompt": "Be long.",
                                                                        "max_tokens": 99})

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["system_prompt"] == "Be long." and body["max_tokens"] == 99
    assert body["description"] == "The demo agent." and body["model"] == "local/demo"
    agent = await orm(Agent.objects.get, name="demo")
    assert (agent.system_prompt, agent.max_tokens, agent.description) == ("Be long.", 99, "The demo agent.")


async def test_it_uses_a_changed_model_at_the_next_chat(make_agent, developer, openai_settings, fake_upstream):
    await orm(make_agent, name="demo", model="openai/gpt-4o-mini")
    api = Api(developer)
    assert (await api.post(CHAT.format("demo"), {"message": "hi"})).json()["model"] == "openai/gpt-4o-mini"
    calls = fake_upstream.stats()["requests"]

    response = await request("PATCH", AGENT.format("demo"), developer, {"model": "local/demo"})
    assert response.status_code == 200, response.text

    chat = (await api.post(CHAT.format("demo"), {"message": "hi again"})).json()
    assert chat["output"] == "You said: hi again"
    assert chat["model"] == "local/demo"
    assert fake_upstream.stats()["requests"] == calls  # the upstream was not asked again


async def test_it_uses_changed_skills_at_the_next_chat(demo, developer):
    api = Api(developer)
    assert (await api.post(CHAT.format("demo"), {"message": "what is 6*7?"})).json()["tool_calls"] == []

    response = await request("PATCH", AGENT.format("demo"), developer, {"skills": ["calculator"]})
    assert response.status_code == 200, response.text
    assert [s["name"] for s in response.json()["skills"]] == ["calculator"]

    body = (await api.post(CHAT.format("demo"), {"message": "what is 6*7?"})).json()
    assert [(c["name"], c["result"]) for c in body["tool_calls"]] == [("calculator", "42")]

    response = await request("PATCH", AGENT.format("demo"), developer, {"skills": []})
    assert response.json()["skills"] == []
    assert (await api.post(CHAT.format("demo"), {"message": "what is 6*7?"})).json()["tool_calls"] == []


async def test_it_audits_the_change_with_the_key_as_actor(demo, developer):
    prefix = await orm(lambda: ApiKey.objects.get(role="developer").prefix)

    await request("PATCH", AGENT.format("demo"), developer, {"system_prompt": "Audited."})

    entries = await orm(lambda: list(AuditLog.objects.filter(action="config.agent.updated", target="agent:demo")))
    assert [e.actor for e in entries] == [f"key:{prefix}"]
    assert "system_prompt" in json.dumps(entries[0].details)


async def test_it_refuses_to_rename(demo, developer):
    assert_error(await request("PATCH", AGENT.format("demo"), developer, {"name": "other"}),
                 400, "rename_not_allowed", param="name")

    response = await request("PATCH", AGENT.format("demo"), developer, {"name": "demo", "description": "Same."})
    assert response.status_code == 200, response.text


async def test_it_validates_a_patch(demo, developer):
    assert_error(await request("PATCH", AGENT.format("demo"), developer, {"temperature": 5}),
                 400, "invalid_agent", param="temperature")

    assert (await orm(Agent.objects.get, name="demo")).temperature == 0.7


async def test_it_answers_404_for_an_unknown_agent(developer):
    assert_error(await request("PATCH", AGENT.format("nope"), developer, {"description": "x"}),
                 404, "agent_not_found")
    assert_error(await request("DELETE", AGENT.format("nope"), developer), 404, "agent_not_found")
    assert not await orm(Agent.objects.filter(name="nope").exists)


async def test_it_re_enables_a_disabled_agent(make_agent, developer):
    await orm(make_agent, name="off", enabled=False)

    response = await request("PATCH", AGENT.format("off"), developer, {"enabled": True})

    assert response.status_code == 200, response.text
    assert (await Api(developer).get(AGENT.format("off"))).status_code == 200


# --- delete -------------------------------------------------------------------------------


async def test_it_disables_an_agent_and_keeps_its_history(demo, developer):
    api = Api(developer)
    session_id = (await api.post(CHAT.format("demo"), {"message": "hi"})).json()["session_id"]

    response = await request("DELETE", AGENT.format("demo"), developer)

    assert response.status_code == 204
    assert_error(await api.get(AGENT.format("demo")), 404, "agent_not_found")
    assert_error(await api.post(CHAT.format("demo"), {"message": "hi"}), 404, "agent_not_found")
    assert not (await orm(Agent.objects.get, name="demo")).enabled
    assert await orm(Session.objects.filter(pk=session_id).exists)
    assert await orm(Run.objects.filter(agent__name="demo").count) == 1
    assert (await request("DELETE", AGENT.format("demo"), developer)).status_code == 204


# --- who may ------------------------------------------------------------------------------


@pytest.mark.parametrize("method, path, body", [
    ("POST", AGENTS, {"name": "new", "model": "local/demo"}),
    ("PATCH", AGENT.format("demo"), {"description": "x"}),
    ("DELETE", AGENT.format("demo"), None),
])
async def test_it_refuses_client_keys(demo, make_key, method, path, body):
    client = await orm(make_key, role="client")

    assert_error(await request(method, path, client, body), 403, "permission_denied")
    agent = await orm(Agent.objects.get, name="demo")
    assert agent.enabled and agent.description == "The demo agent."
    assert not await orm(Agent.objects.filter(name="new").exists)


@pytest.mark.parametrize("method, path, body", [
    ("POST", AGENTS, {"name": "new", "model": "local/demo"}),
    ("PATCH", AGENT.format("demo"), {"description": "x"}),
    ("DELETE", AGENT.format("demo"), None),
])
async def test_it_needs_a_key(demo, method, path, body):
    assert_error(await request(method, path, None, body), 401, "invalid_api_key")


async def test_it_keeps_restricted_keys_to_their_agents(demo, make_agent, make_key):
    await orm(make_agent, name="other")
    limited = await orm(make_key, role="developer", agents=["demo"])

    assert_error(await request("POST", AGENTS, limited, {"name": "new", "model": "local/demo"}),
                 403, "agent_not_allowed")
    assert_error(await request("PATCH", AGENT.format("other"), limited, {"description": "x"}),
                 403, "agent_not_allowed")
    assert_error(await request("DELETE", AGENT.format("other"), limited), 403, "agent_not_allowed")

    response = await request("PATCH", AGENT.format("demo"), limited, {"description": "Mine."})
    assert response.status_code == 200, response.text
    assert (await request("DELETE", AGENT.format("demo"), limited)).status_code == 204


async def test_a_key_limited_to_some_skills_may_not_hand_agents_other_skills(demo, make_agent, make_key):
    await orm(make_agent, name="tools", skills=["calculator", "current_time", "http_fetch"])
    limited = await orm(make_key, role="developer", allowed_skills=["calculator"])

    created = await request("POST", AGENTS, limited, {"name": "w", "model": "local/demo",
                                                      "skills": ["calculator", "http_fetch"]})
    patched = await request("PATCH", AGENT.format("demo"), limited, {"skills": ["current_time"]})
    allowed = await request("PATCH", AGENT.format("demo"), limited, {"skills": ["calculator"]})

    error = assert_error(created, 403, "skill_not_allowed", param="skills")
    assert "http_fetch" in error["message"] and "calculator" not in error["message"]
    assert_error(patched, 403, "skill_not_allowed", param="skills")
    assert not await orm(Agent.objects.filter(name="w").exists)
    assert allowed.status_code == 200, allowed.text
    assert [s["name"] for s in allowed.json()["skills"]] == ["calculator"]
