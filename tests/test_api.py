"""The REST API, endpoint by endpoint: agents, chat (JSON and SSE), sessions, dynamic agents,
fallbacks, health, metrics and the API docs. Requests go through the real ASGI application;
the `openai` provider talks to the fake upstream."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta
from decimal import Decimal

import pytest
from django.conf import settings as django_settings
from django.db import connections
from django.utils import timezone

from agents.models import Agent, AgentSkill, Message, Run, Session, Skill
from billing.budgets import budget_create
from billing.models import BudgetSpend, ModelPrice, UsageRecord
from conftest import Api, assert_error, orm, parse_sse
from governance.models import ApiKey
from governance.services import api_key_revoke

pytestmark = pytest.mark.django_db(transaction=True)

CHAT = "/api/v1/agents/{}/chat"

@pytest.fixture
def agents(make_agent):
    """Two enabled agents (one with the calculator) and a disabled one."""
    return {
        "demo": make_agent(name="demo", description="The demo agent.", system_prompt="Be brief."),
        "calc": make_agent(name="calc", description="Does arithmetic.", skills=["calculator"]),
        "off": make_agent(name="off", description="Switched off.", enabled=False),
    }


@pytest.fixture
def key(make_key) -> str:
    return make_key()


async def messages_of(session_id) -> list[Message]:
    return await orm(lambda: list(Message.objects.filter(session_id=session_id).order_by("created_at", "id")))


def _price(model: str) -> ModelPrice:
    # Newer than any seeded price, so it is the one in force.
    return ModelPrice.objects.create(model=model, input_per_1m=Decimal("1.5"), output_per_1m=Decimal("2"),
                                     effective_from=timezone.now() - timedelta(seconds=1))


def events_of(text: str) -> list[dict]:
    """The SSE events (not comments), each checked to carry its own type in its data."""
    events = [e for e in parse_sse(text) if "event" in e]
    for e in events:
        assert e["data"]["type"] == e["event"]
    return events


# --- agents -------------------------------------------------------------------------------


async def test_it_lists_enabled_agents_with_pagination(agents, key):
    response = await Api(key).get("/api/v1/agents")

    assert response.status_code == 200
    body = response.json()
    assert body["count"] == 2
    assert [a["name"] for a in body["results"]] == ["calc", "demo"]
    calc = body["results"][0]
    assert calc["model"] == "local/demo"
    assert calc["description"] == "Does arithmetic."
    assert [s["name"] for s in calc["skills"]] == ["calculator"]
    assert calc["skills"][0]["parameters"]["required"] == ["expression"]
    assert "system_prompt" not in calc

    page = (await Api(key).get("/api/v1/agents", params={"limit": 1})).json()
    assert page["count"] == 2
    assert [a["name"] for a in page["results"]] == ["calc"]
    assert page["next"] and page["previous"] is None


async def test_it_lists_only_the_agents_a_key_may_use(agents, make_key):
    limited = await orm(make_key, agents=["demo", "off"])

    body = (await Api(limited).get("/api/v1/agents")).json()

    assert body["count"] == 1
    assert [a["name"] for a in body["results"]] == ["demo"]


@pytest.mark.parametrize("q, names", [("calc", ["calc"]), ("ARITH", ["calc"]), ("agent", ["demo"]),
                                      ("off", []), ("nothing", [])])
async def test_it_filters_agents_by_name_or_description(agents, key, q, names):
    body = (await Api(key).get("/api/v1/agents", params={"q": q})).json()

    assert [a["name"] for a in body["results"]] == names
    assert body["count"] == len(names)


async def test_it_needs_a_key_to_list_agents(agents):
    assert_error(await Api().get("/api/v1/agents"), 401, "invalid_api_key")


async def test_it_shows_an_agent(agents, make_key):
    developer = await orm(make_key, role="developer")
    response = await Api(developer).get("/api/v1/agents/demo")

    assert response.status_code == 200
    body = response.json()
    assert body["name"] == "demo"
    assert body["system_prompt"] == "Be brief."
    assert body["metadata"] == {}
    assert body["fallback_models"] == []
    assert body["skills"] == []


async def test_it_keeps_the_system_prompt_from_client_keys(agents, key):
    response = await Api(key).get("/api/v1/agents/demo")

    assert response.status_code == 200
    body = response.json()
    assert body["name"] == "demo"
    assert "system_prompt" not in body and "metadata" not in body


@pytest.mark.parametrize("name", ["nope", "off", "calc"])
async def test_it_hides_unknown_disabled_and_forbidden_agents(agents, make_key, name):
    limited = await orm(make_key, agents=["demo"])

    for path in (f"/api/v1/agents/{name}", f"/api/v1/agents/{name}/health"):
        assert_error(await Api(limited).get(path), 404, "agent_not_found")
    assert_error(await Api(limited).post(CHAT.format(name), {"message": "hi"}), 404, "agent_not_found")


async def test_it_reports_a_local_agent_healthy(agents, key):
    response = await Api(key).get("/api/v1/agents/calc/health")

    assert response.status_code == 200
    assert response.json() == {"agent": "calc", "status": "ok", "skills": ["calculator"],
                               "models": [{"model": "local/demo", "available": True, "detail": "ok",
                                           "circuit": {"state": "closed", "failures": 0, "retry_at": None}}]}


async def test_it_reports_an_agent_unavailable_without_its_providers_key(make_agent, key, settings):
    settings.OPENAI_API_KEY = ""
    await orm(make_agent, name="gpt", model="openai/gpt-4o-mini")

    response = await Api(key).get("/api/v1/agents/gpt/health")

    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable"
    assert body["models"][0]["available"] is False
    assert "no API key" in body["models"][0]["detail"]


async def test_it_reports_an_agent_degraded_when_only_a_fallback_can_answer(make_agent, key, settings):
    settings.OPENAI_API_KEY = ""
    await orm(make_agent, name="gpt", model="openai/gpt-4o-mini", fallback_models=["local/demo"])

    response = await Api(key).get("/api/v1/agents/gpt/health")

    assert response.status_code == 200
    assert response.json()["status"] == "degraded"
    assert [m["available"] for m in response.json()["models"]] == [False, True]


# --- chat: JSON ---------------------------------------------------------------------------


async def test_it_answers_a_chat_message_and_stores_the_run(agents, key):
    response = await Api(key).post(CHAT.format("demo"), {"message": "Hello there", "metadata": {"ticket": 7}})

    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"id", "session_id", "agent", "model", "output", "tool_calls", "usage", "cost_usd", "latency_ms",
                         "variant"}
    assert body["variant"] is None  # no experiment runs on the agent
    assert body["agent"] == "demo"
    assert body["model"] == "local/demo"
    assert body["output"] == "You said: Hello there"
    assert body["tool_calls"] == []
    usage = body["usage"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] == 4
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert isinstance(body["latency_ms"], int)
    assert response.headers["X-Request-ID"]

    run = await orm(Run.objects.get, pk=body["id"])
    assert run.status == Run.Status.SUCCEEDED
    assert run.transport == Run.Transport.REST
    assert run.model == "local/demo"
    assert run.total_tokens == usage["total_tokens"]
    assert run.steps == 1
    assert run.request_id == response.headers["X-Request-ID"]
    assert str(run.session_id) == body["session_id"]
    assert run.metadata["client"] == {"ticket": 7}
    session = await orm(Session.objects.select_related("api_key").get, pk=body["session_id"])
    assert session.title == "Hello there"
    assert session.api_key.name.startswith("client-")
    stored = await messages_of(body["session_id"])
    assert [(m.role, m.content) for m in stored] == [("user", "Hello there"), ("assistant", "You said: Hello there")]
    assert stored[1].completion_tokens == 4 and stored[1].prompt_tokens == usage["prompt_tokens"]
    assert all(str(m.run_id) == body["id"] for m in stored)


async def test_it_uses_the_callers_request_id(agents, key):
    response = await Api(key).post(CHAT.format("demo"), {"message": "hi"}, headers={"X-Request-ID": "trace-42"})

    assert response.headers["X-Request-ID"] == "trace-42"
    assert (await orm(Run.objects.get, pk=response.json()["id"])).request_id == "trace-42"


async def test_it_continues_a_session_with_its_history(make_agent, key, openai_settings, fake_upstream):
    await orm(make_agent, name="gpt", model="openai/gpt-4o-mini", system_prompt="Be brief.")
    api = Api(key)

    first = (await api.post(CHAT.format("gpt"), {"message": "my name is Ada"})).json()
    second = (await api.post(CHAT.format("gpt"), {"message": "what is my name",
                                                  "session_id": first["session_id"]})).json()

    assert first["output"] == "Echo: my name is Ada"
    assert second["output"] == "Echo: what is my name"
    assert second["session_id"] == first["session_id"]
    # The fake counts words of every message sent: the second call carried the first exchange.
    # system (2+1) + user (4+1) = 8; then + assistant (5+1) + user (4+1) = 19.
    assert first["usage"]["prompt_tokens"] == 8
    assert second["usage"]["prompt_tokens"] == 19
    stored = await messages_of(first["session_id"])
    assert [m.role for m in stored] == ["user", "assistant", "user", "assistant"]
    assert await orm(Run.objects.filter(session_id=first["session_id"]).count) == 2
    assert fake_upstream.stats()["requests"] == 2


async def test_it_creates_a_session_with_a_client_chosen_id(agents, key):
    chosen = uuid.uuid4()

    response = await Api(key).post(CHAT.format("demo"), {"message": "hi", "session_id": str(chosen)})

    assert response.status_code == 200
    assert response.json()["session_id"] == str(chosen)
    session = await orm(Session.objects.get, pk=chosen)
    assert session.agent_id == agents["demo"].id
    assert await orm(Message.objects.filter(session=session).count) == 2


async def test_it_refuses_a_session_of_another_key(agents, make_key):
    owner, other = await orm(make_key), await orm(make_key)
    session_id = (await Api(owner).post(CHAT.format("demo"), {"message": "mine"})).json()["session_id"]

    response = await Api(other).post(CHAT.format("demo"), {"message": "let me in", "session_id": session_id})

    assert_error(response, 404, "session_not_found", param="session_id")
    assert await orm(Message.objects.filter(session_id=session_id).count) == 2


async def test_it_refuses_a_session_of_another_agent(agents, key):
    session_id = (await Api(key).post(CHAT.format("demo"), {"message": "hi"})).json()["session_id"]

    response = await Api(key).post(CHAT.format("calc"), {"message": "hi", "session_id": session_id})

    assert_error(response, 404, "session_not_found")


async def test_it_accepts_a_list_of_messages(agents, key):
    body = {"messages": [{"role": "user", "content": "first"}, {"role": "assistant", "content": "noted"},
                         {"role": "user", "content": "second"}]}

    response = await Api(key).post(CHAT.format("demo"), body)

    assert response.status_code == 200
    assert response.json()["output"] == "You said: second"
    stored = await messages_of(response.json()["session_id"])
    assert [(m.role, m.content) for m in stored] == [
        ("user", "first"), ("assistant", "noted"), ("user", "second"), ("assistant", "You said: second")]


async def test_it_refuses_requests_without_a_valid_key(agents, make_key):
    revoked, expired = await orm(make_key), await orm(make_key, expires_at=timezone.now() - timedelta(minutes=1))
    await orm(lambda: api_key_revoke(api_key=ApiKey.objects.get(prefix=revoked.split("_")[1])))
    valid = await orm(make_key)
    wrong_secret = valid[: -4] + ("AAAA" if not valid.endswith("AAAA") else "BBBB")

    for presented in (None, "not-a-key", "ap_123456789abc_nosuchsecret", wrong_secret, revoked, expired):
        response = await Api(presented).post(CHAT.format("demo"), {"message": "hi"})
        assert_error(response, 401, "invalid_api_key")
        assert response.json()["error"]["type"] == "authentication_error"
    assert await orm(Run.objects.count) == 0
    # X-API-Key works as well as the bearer header.
    response = await Api().post(CHAT.format("demo"), {"message": "hi"}, headers={"X-API-Key": valid})
    assert response.status_code == 200


@pytest.mark.parametrize("raw, code, param", [
    pytest.param("{not json", "invalid_json", None, id="malformed-json"),
    pytest.param("[1, 2]", "invalid_json", None, id="not-an-object"),
    pytest.param('{"message": "hi", "colour": "red"}', "invalid_field", "colour", id="unknown-field"),
    pytest.param('{"message": "hi", "messages": [{"role": "user", "content": "hi"}]}', "invalid_field", "message",
                 id="message-and-messages"),
    pytest.param("{}", "invalid_field", "message", id="no-message"),
    pytest.param('{"message": ""}', "invalid_field", "message", id="empty-message"),
    pytest.param('{"messages": []}', "invalid_field", "messages", id="empty-messages"),
    pytest.param('{"messages": [{"role": "assistant", "content": "hi"}]}', "invalid_field", "messages",
                 id="last-not-from-user"),
    pytest.param('{"messages": [{"role": "robot", "content": "hi"}]}', "invalid_field", "messages[0].role",
                 id="bad-role"),
    pytest.param('{"message": "hi", "session_id": "not-a-uuid"}', "invalid_field", "session_id", id="bad-session-id"),
    pytest.param('{"message": "hi", "stream": "often"}', "invalid_field", "stream", id="bad-stream"),
])
async def test_it_refuses_invalid_chat_bodies(agents, key, raw, code, param):
    response = await Api(key).post(CHAT.format("demo"), raw=raw)

    error = assert_error(response, 400, code, param=param)
    assert error["type"] == "invalid_request_error"
    assert await orm(Run.objects.count) == 0


async def test_it_refuses_messages_over_the_length_limit(agents, key, settings):
    settings.MAX_MESSAGE_CHARS = 10

    assert (await Api(key).post(CHAT.format("demo"), {"message": "x" * 10})).status_code == 200
    assert_error(await Api(key).post(CHAT.format("demo"), {"message": "x" * 11}), 400, "invalid_field",
                 param="message")
    too_long = {"messages": [{"role": "user", "content": "x" * 11}]}
    error = assert_error(await Api(key).post(CHAT.format("demo"), too_long), 400, "invalid_field")
    assert "Longer than 10 characters" in error["message"]


async def test_it_names_the_message_that_is_too_long(agents, key, settings):
    settings.MAX_MESSAGE_CHARS = 10
    too_long = {"messages": [{"role": "user", "content": "ok"}, {"role": "assistant", "content": "ok"},
                             {"role": "user", "content": "x" * 11}]}

    response = await Api(key).post(CHAT.format("demo"), too_long)

    assert_error(response, 400, "invalid_field", param="messages[2].content")


async def test_it_refuses_bodies_that_are_not_json(agents, key):
    response = await Api(key).post(CHAT.format("demo"), raw="message=hi", content_type="text/plain")

    assert_error(response, 415, "unsupported_media_type")


async def test_it_refuses_bodies_over_the_size_limit(agents, key, settings):
    body = json.dumps({"message": "x" * (settings.MAX_REQUEST_BYTES + 1)})

    response = await Api(key).post(CHAT.format("demo"), raw=body)

    assert response.status_code == 413
    error = response.json()["error"]
    assert error["code"] == "request_too_large"
    assert {"type", "code", "message", "request_id"} <= set(error)
    assert await orm(Run.objects.count) == 0


async def test_it_names_the_request_of_a_too_large_body(agents, key, settings):
    body = json.dumps({"message": "x" * (settings.MAX_REQUEST_BYTES + 1)})

    response = await Api(key).post(CHAT.format("demo"), raw=body, headers={"X-Request-ID": "big-1"})

    assert_error(response, 413, "request_too_large")


async def test_it_refuses_other_methods_on_chat(agents, key):
    for method in ("GET", "PUT", "DELETE"):
        assert_error(await Api(key).request(method, CHAT.format("demo")), 405, "method_not_allowed")


@pytest.mark.parametrize("path", ["/api/v1/nothing-here", "/v1/nope", "/nothing"])
async def test_it_answers_unknown_routes_with_json(key, path):
    error = assert_error(await Api(key).get(path), 404, "route_not_found")
    assert path in error["message"]


# --- chat: server-sent events -------------------------------------------------------------


async def test_it_streams_a_chat_as_server_sent_events(agents, key):
    response = await Api(key).post(CHAT.format("demo"), {"message": "stream this please", "stream": True})

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    events = events_of(response.text)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-2:] == ["usage", "done"]
    assert set(kinds[1:-2]) == {"delta"} and len(kinds) - 3 == 5  # one delta per word
    deltas = "".join(e["data"]["content"] for e in events if e["event"] == "delta")
    start, usage, done = events[0]["data"], events[-2]["data"], events[-1]["data"]
    assert deltas == done["output"] == "You said: stream this please"
    assert done["usage"] == {k: usage[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
    assert done["id"] == start["run_id"] and done["session_id"] == start["session_id"]
    assert done["agent"] == "demo" and done["model"] == "local/demo"

    run = await orm(Run.objects.get, pk=start["run_id"])
    assert run.status == Run.Status.SUCCEEDED
    assert run.transport == Run.Transport.SSE
    assert run.total_tokens == usage["total_tokens"]
    stored = await messages_of(start["session_id"])
    assert [(m.role, m.content) for m in stored][-1] == ("assistant", "You said: stream this please")


async def test_it_streams_tool_calls_and_their_results(agents, key):
    response = await Api(key).post(CHAT.format("calc"), {"message": "what is 6*7?", "stream": True})

    events = events_of(response.text)
    kinds = [e["event"] for e in events]
    assert kinds[:3] == ["start", "tool_call", "tool_result"]
    call, result = events[1]["data"], events[2]["data"]
    assert call["name"] == "calculator" and json.loads(call["arguments"]) == {"expression": "6*7"}
    assert result == {"type": "tool_result", "id": call["id"], "name": "calculator", "content": "42",
                      "is_error": False}
    done = events[-1]["data"]
    assert done["output"].endswith("42")
    assert done["tool_calls"] == [{"id": call["id"], "name": "calculator", "arguments": call["arguments"],
                                   "result": "42", "is_error": False}]
    run = await orm(Run.objects.get, pk=done["id"])
    assert run.steps == 2
    stored = await messages_of(done["session_id"])
    assert [m.role for m in stored] == ["user", "assistant", "tool", "assistant"]
    assert stored[1].tool_calls[0]["name"] == "calculator"
    assert stored[2].tool_call_id == call["id"] and stored[2].content == "42"


@pytest.mark.parametrize("fault", ["cut", "cut-clean", "cut-event"])
async def test_it_ends_a_cut_stream_with_an_error_event_and_bills_it(make_agent, key, openai_settings, fake_upstream,
                                                                    fault):
    """Connection closed mid-body, body ended without a finish reason or [DONE], last event cut
    mid-JSON: an `upstream_stream_cut` error, never `done`; the run is failed, keeps what was
    streamed, and is metered (estimated) and charged. Deltas were sent: no fallback."""
    await orm(_price, "openai/gpt-4o-mini")
    await orm(make_agent, name="gpt", model="openai/gpt-4o-mini", fallback_models=["openai/other-model"])
    budget = await orm(budget_create, scope="global", period="day", limit_usd=Decimal("5"))

    response = await Api(key).post(CHAT.format("gpt"), {"message": f"tell me a long story [fault:{fault}]",
                                                        "stream": True})

    assert response.status_code == 200  # the stream had started
    events = events_of(response.text)
    assert [e["event"] for e in events] == ["start", "delta", "delta", "error"]
    assert "".join(e["data"]["content"] for e in events[1:3]) == "Echo: tell "
    error = events[-1]["data"]
    assert (error["code"], error["status"]) == ("upstream_stream_cut", 502) and error["message"]
    assert error["run_id"] == events[0]["data"]["run_id"] and "retry_after" not in error
    run = await orm(Run.objects.get, pk=events[0]["data"]["run_id"])
    assert (run.status, run.error_code) == (Run.Status.FAILED, "upstream_stream_cut")
    # What was streamed before the break is kept in the transcript.
    stored = await messages_of(run.session_id)
    assert (stored[-1].role, stored[-1].content) == ("assistant", "Echo: tell ")
    [record] = await orm(lambda: list(UsageRecord.objects.filter(run_id=run.id)))
    assert record.estimated and record.model == "openai/gpt-4o-mini"
    assert record.completion_tokens == 3 and record.prompt_tokens > 0  # "Echo: tell " counted offline
    assert record.cost_usd > 0 and run.total_tokens == record.prompt_tokens + record.completion_tokens
    spend = await orm(BudgetSpend.objects.get, budget_id=budget.id)
    assert (spend.spent_usd, spend.reserved_usd) == (record.cost_usd, Decimal("0"))
    assert fake_upstream.stats()["by_model"] == {"gpt-4o-mini": 1}


async def test_a_stream_cut_before_its_first_token_falls_back(make_agent, key, openai_settings, fake_upstream):
    await orm(make_agent, name="gpt", model="openai/fault-cut-model", fallback_models=["openai/good-model"])

    response = await Api(key).post(CHAT.format("gpt"), {"message": "hi [cut-after:1]", "stream": True})

    assert response.status_code == 200
    events = events_of(response.text)
    assert [e["event"] for e in events] == ["start", "delta", "delta", "usage", "done"]
    done = events[-1]["data"]
    assert (done["output"], done["model"]) == ("Echo: hi", "openai/good-model")
    run = await orm(Run.objects.get, pk=done["id"])
    assert run.status == Run.Status.SUCCEEDED
    assert [(c["model"], c["ok"], c["error"]) for c in run.metadata["calls"]] == [
        ("openai/fault-cut-model", False, "upstream_stream_cut")] * 3 + [("openai/good-model", True, "")]
    # Retried (LLM_MAX_RETRIES) before the fallback: nothing had reached the client.
    *cuts, answered = await orm(lambda: list(UsageRecord.objects.filter(run_id=run.id).order_by("id")))
    assert len(cuts) == 3
    for cut in cuts:
        assert cut.estimated and cut.completion_tokens == 0 and cut.prompt_tokens > 0  # it read the prompt
    assert not answered.estimated
    assert fake_upstream.stats()["by_model"] == {"fault-cut-model": 3, "good-model": 1}


async def test_a_stream_cut_after_its_finish_reason_is_a_whole_answer(make_agent, key, openai_settings):
    """Only [DONE] and the usage chunk are lost: the answer stands, its usage estimated."""
    await orm(make_agent, name="gpt", model="openai/fault-cut-after-finish")

    response = await Api(key).post(CHAT.format("gpt"), {"message": "all of it", "stream": True})

    done = events_of(response.text)[-1]
    assert done["event"] == "done" and done["data"]["output"] == "Echo: all of it"
    assert done["data"]["finish_reason"] == "stop"
    run = await orm(Run.objects.get, pk=done["data"]["id"])
    assert run.status == Run.Status.SUCCEEDED
    [record] = await orm(lambda: list(UsageRecord.objects.filter(run_id=run.id)))
    assert record.estimated


async def test_a_stream_that_fails_before_the_model_answers_is_a_json_error(make_agent, key, openai_settings,
                                                                           fake_upstream):
    """Every model failed before producing anything: the stream never started, so the answer is
    the error's own status and JSON body (with Retry-After), as without `stream`."""
    await orm(make_agent, name="gpt", model="openai/gpt-4o-mini", fallback_models=["openai/gpt-4o"])

    response = await Api(key).post(CHAT.format("gpt"), {"message": "hi [fault:429] [retry-after:30]",
                                                        "stream": True})

    assert_error(response, 503, "upstream_rate_limited")
    assert response.headers["Retry-After"] == "30"
    run = await orm(Run.objects.get, agent__name="gpt")
    assert (run.status, run.transport, run.steps) == (Run.Status.FAILED, Run.Transport.SSE, 2)
    assert fake_upstream.stats()["requests"] == 2


async def test_a_stream_error_after_a_tool_step_carries_status_and_retry_after(make_agent, key, openai_settings):
    await orm(make_agent, name="gpt", model="openai/gpt-4o-mini", skills=["calculator"])

    response = await Api(key).post(CHAT.format("gpt"), {
        "message": '[call:calculator {"expression": "6*7"}] [fault-step:2] [fault:429] [retry-after:30]',
        "stream": True})

    assert response.status_code == 200  # the model had answered (a tool call)
    events = events_of(response.text)
    assert [e["event"] for e in events] == ["start", "tool_call", "tool_result", "error"]
    error = events[-1]["data"]
    assert (error["code"], error["status"], error["retry_after"]) == ("upstream_rate_limited", 503, 30)


async def test_it_names_the_request_in_a_stream_error_event(make_agent, key, openai_settings):
    await orm(make_agent, name="gpt", model="openai/gpt-4o-mini")

    response = await Api(key).post(CHAT.format("gpt"), {"message": "tell me a long story [fault:cut]",
                                                        "stream": True})

    error = events_of(response.text)[-1]["data"]
    assert error["request_id"] == response.headers["X-Request-ID"]


async def test_it_streams_through_djangos_async_test_client(agents, key):
    """Django's own async test client can read a stream too (it closes the response with the
    sync response.close(), inside the event loop)."""
    from django.test import AsyncClient

    response = await AsyncClient().post(CHAT.format("demo"), {"message": "hi", "stream": True},
                                        content_type="application/json", headers={"Authorization": f"Bearer {key}"})
    body = b"".join([chunk async for chunk in response.streaming_content])

    assert b"event: done" in body


async def test_it_sends_heartbeats_while_the_model_is_silent(make_agent, key, openai_settings):
    openai_settings.SSE_HEARTBEAT_SECONDS = 0.05
    await orm(make_agent, name="gpt", model="openai/gpt-4o-mini")

    response = await Api(key).post(CHAT.format("gpt"), {"message": "slow one [latency:300]", "stream": True})

    blocks = parse_sse(response.text)
    first_delta = next(i for i, b in enumerate(blocks) if b.get("event") == "delta")
    heartbeats = [i for i, b in enumerate(blocks) if b.get("comment") == "heartbeat"]
    assert heartbeats and heartbeats[0] < first_delta
    assert ": heartbeat\n\n" in response.text
    assert blocks[-1]["event"] == "done" and blocks[-1]["data"]["output"] == "Echo: slow one"


async def test_it_reports_the_latency_of_a_json_answer(make_agent, key, openai_settings):
    await orm(make_agent, name="gpt", model="openai/gpt-4o-mini")

    body = (await Api(key).post(CHAT.format("gpt"), {"message": "slow [latency:200]"})).json()

    assert body["latency_ms"] >= 200
    assert (await orm(Run.objects.get, pk=body["id"])).latency_ms >= 200


async def test_it_reports_the_latency_in_the_done_event(make_agent, key, openai_settings):
    await orm(make_agent, name="gpt", model="openai/gpt-4o-mini")

    response = await Api(key).post(CHAT.format("gpt"), {"message": "slow [latency:200]", "stream": True})

    done = events_of(response.text)[-1]["data"]
    assert done["latency_ms"] >= 200


# --- sessions -----------------------------------------------------------------------------


async def test_it_creates_lists_shows_and_deletes_sessions(agents, key):
    api = Api(key)
    chosen = str(uuid.uuid4())

    created = await api.post("/api/v1/sessions", {"agent": "demo", "id": chosen, "title": "Planning",
                                                  "metadata": {"team": "a"}})
    assert created.status_code == 201
    assert created.json()["id"] == chosen
    assert created.json()["agent"] == "demo"
    assert created.json()["message_count"] == 0
    chat = await api.post(CHAT.format("demo"), {"message": "hello", "session_id": chosen})
    assert chat.status_code == 200

    listed = (await api.get("/api/v1/sessions")).json()
    assert listed["count"] == 1
    assert listed["results"][0]["id"] == chosen
    assert listed["results"][0]["title"] == "Planning"
    assert listed["results"][0]["message_count"] == 2

    detail = await api.get(f"/api/v1/sessions/{chosen}")
    assert detail.status_code == 200
    assert [(m["role"], m["content"]) for m in detail.json()["messages"]] == [
        ("user", "hello"), ("assistant", "You said: hello")]
    assert detail.json()["messages"][1]["run"] == chat.json()["id"]
    assert detail.json()["metadata"] == {"team": "a"}

    deleted = await api.delete(f"/api/v1/sessions/{chosen}")
    assert deleted.status_code == 204
    assert_error(await api.get(f"/api/v1/sessions/{chosen}"), 404, "session_not_found")
    assert_error(await api.delete(f"/api/v1/sessions/{chosen}"), 404, "session_not_found")
    assert await orm(Message.objects.count) == 0
    assert await orm(Run.objects.filter(pk=chat.json()["id"]).exists)  # runs are the usage history


async def test_it_refuses_to_create_a_session_twice_or_for_an_unknown_agent(agents, make_key):
    key = await orm(make_key, agents=["demo"])
    api = Api(key)
    chosen = str(uuid.uuid4())

    assert (await api.post("/api/v1/sessions", {"agent": "demo", "id": chosen})).status_code == 201
    assert_error(await api.post("/api/v1/sessions", {"agent": "demo", "id": chosen}), 409, "session_exists",
                 param="id")
    for name in ("nope", "off", "calc"):
        assert_error(await api.post("/api/v1/sessions", {"agent": name}), 404, "agent_not_found")
    assert_error(await api.post("/api/v1/sessions", {"agent": "demo", "owner": "me"}), 400, param="owner")
    assert_error(await api.post("/api/v1/sessions", {}), 400, param="agent")
    assert await orm(Session.objects.count) == 1


async def test_it_filters_sessions_by_agent(agents, key):
    api = Api(key)
    await api.post("/api/v1/sessions", {"agent": "demo"})
    await api.post("/api/v1/sessions", {"agent": "calc"})

    listed = (await api.get("/api/v1/sessions", params={"agent": "calc"})).json()

    assert [s["agent"] for s in listed["results"]] == ["calc"]


async def test_it_keeps_sessions_private_to_their_key_except_for_admins(agents, make_key):
    owner, other, admin = await orm(make_key), await orm(make_key), await orm(make_key, role="admin")
    session_id = (await Api(owner).post(CHAT.format("demo"), {"message": "secret plans"})).json()["session_id"]
    path = f"/api/v1/sessions/{session_id}"

    assert (await Api(other).get("/api/v1/sessions")).json()["count"] == 0
    assert_error(await Api(other).get(path), 404, "session_not_found")
    assert_error(await Api(other).delete(path), 404, "session_not_found")
    assert await orm(Session.objects.filter(pk=session_id).exists)

    assert (await Api(admin).get("/api/v1/sessions")).json()["count"] == 1
    detail = await Api(admin).get(path)
    assert detail.status_code == 200
    assert detail.json()["messages"][0]["content"] == "secret plans"


async def test_it_answers_malformed_session_ids_with_a_json_404(key):
    assert_error(await Api(key).get("/api/v1/sessions/not-a-uuid"), 404)


# --- dynamic agents -----------------------------------------------------------------------


async def test_it_uses_an_agents_new_settings_without_a_restart(agents, make_key, openai_settings):
    api = Api(await orm(make_key, role="developer"))
    assert (await api.post(CHAT.format("demo"), {"message": "hi"})).json()["output"] == "You said: hi"
    assert (await api.get("/api/v1/agents/demo")).json()["system_prompt"] == "Be brief."

    def edit():
        agent = Agent.objects.get(name="demo")
        agent.model = "openai/gpt-4o-mini"
        agent.system_prompt = "Be verbose."
        agent.save()

    await orm(edit)

    body = (await api.post(CHAT.format("demo"), {"message": "hi"})).json()
    assert body["output"] == "Echo: hi"
    assert body["model"] == "openai/gpt-4o-mini"
    assert (await api.get("/api/v1/agents/demo")).json()["system_prompt"] == "Be verbose."


async def test_it_offers_a_skill_added_to_an_agent(agents, key):
    api = Api(key)
    assert (await api.post(CHAT.format("demo"), {"message": "what is 2+3?"})).json()["tool_calls"] == []

    await orm(lambda: AgentSkill.objects.create(agent=Agent.objects.get(name="demo"),
                                                skill=Skill.objects.get(name="calculator")))

    body = (await api.post(CHAT.format("demo"), {"message": "what is 2+3?"})).json()
    assert [(c["name"], c["result"]) for c in body["tool_calls"]] == [("calculator", "5")]


async def test_it_serves_an_agent_created_after_its_name_was_refused(agents, key):
    api = Api(key)
    assert_error(await api.post(CHAT.format("newbie"), {"message": "hi"}), 404, "agent_not_found")
    assert_error(await api.get("/api/v1/agents/newbie"), 404)

    await orm(lambda: Agent.objects.create(name="newbie", model="local/demo"))

    assert (await api.post(CHAT.format("newbie"), {"message": "hi"})).status_code == 200
    assert (await api.get("/api/v1/agents/newbie")).status_code == 200


async def test_it_stops_serving_a_disabled_agent_at_once(agents, key):
    api = Api(key)
    assert (await api.post(CHAT.format("demo"), {"message": "hi"})).status_code == 200

    def disable():
        agent = Agent.objects.get(name="demo")
        agent.enabled = False
        agent.save()

    await orm(disable)

    assert_error(await api.post(CHAT.format("demo"), {"message": "hi"}), 404, "agent_not_found")
    assert_error(await api.get("/api/v1/agents/demo"), 404)
    assert [a["name"] for a in (await api.get("/api/v1/agents")).json()["results"]] == ["calc"]


# --- upstream failures and fallbacks ------------------------------------------------------


@pytest.mark.parametrize("fault", ["500", "cut"])  # cut: half the body, then the connection closes
async def test_it_falls_back_to_the_next_model(make_agent, key, openai_settings, fake_upstream, fault):
    await orm(make_agent, name="gpt", model=f"openai/fault-{fault}-model", fallback_models=["openai/good-model"])

    response = await Api(key).post(CHAT.format("gpt"), {"message": "hi"})

    assert response.status_code == 200
    body = response.json()
    assert body["model"] == "openai/good-model"
    assert body["output"] == "Echo: hi"
    run = await orm(Run.objects.get, pk=body["id"])
    assert run.status == Run.Status.SUCCEEDED
    assert run.steps == 4
    assert run.model == "openai/good-model"
    # The failure was retried twice (LLM_MAX_RETRIES) on the same model before the fallback.
    assert [(c["model"], c["ok"]) for c in run.metadata["calls"]] == [
        (f"openai/fault-{fault}-model", False)] * 3 + [("openai/good-model", True)]
    assert fake_upstream.stats()["by_model"] == {f"fault-{fault}-model": 3, "good-model": 1}


async def test_it_answers_502_when_every_model_fails(make_agent, key, openai_settings):
    await orm(make_agent, name="gpt", model="openai/fault-500-a", fallback_models=["openai/fault-503-b"])

    response = await Api(key).post(CHAT.format("gpt"), {"message": "hi"})

    error = assert_error(response, 502, "upstream_error")
    assert error["type"] == "api_error"
    run = await orm(Run.objects.get, agent__name="gpt")
    assert run.status == Run.Status.FAILED
    assert run.steps == 6  # each model: one call and two retries
    assert run.error_code == "upstream_error"
    assert run.error_message == error["message"]


async def test_it_maps_an_upstream_rate_limit(make_agent, key, openai_settings):
    await orm(make_agent, name="gpt", model="openai/gpt-4o-mini")

    response = await Api(key).post(CHAT.format("gpt"), {"message": "hi [fault:429] [retry-after:30]"})

    # Our upstream limits us, not the caller: 503 with the upstream's Retry-After (longer than
    # LLM_RETRY_MAX_WAIT_SECONDS, so not waited out here).
    assert_error(response, 503, "upstream_rate_limited")
    assert response.headers["Retry-After"] == "30"
    assert (await orm(Run.objects.get, agent__name="gpt")).status == Run.Status.FAILED


async def test_it_times_out_a_silent_upstream(make_agent, key, openai_settings):
    await orm(make_agent, name="gpt", model="openai/gpt-4o-mini", timeout_seconds=1)

    response = await Api(key).post(CHAT.format("gpt"), {"message": "hi [fault:hang]"})

    assert_error(response, 504, "timeout")
    run = await orm(Run.objects.get, agent__name="gpt")
    assert run.status == Run.Status.FAILED and run.error_code == "timeout"


async def test_it_says_when_a_provider_has_no_key(make_agent, key, settings):
    settings.OPENAI_API_KEY = ""
    await orm(make_agent, name="gpt", model="openai/gpt-4o-mini")

    assert_error(await Api(key).post(CHAT.format("gpt"), {"message": "hi"}), 502, "provider_not_configured")


# --- health, metrics, docs ----------------------------------------------------------------


async def test_it_answers_liveness_without_a_key():
    response = await Api().get("/health")

    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_it_answers_readiness_with_each_dependency():
    response = await Api().get("/health/ready")

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "ok"
    assert set(body["checks"]) == {"database", "cache", "channel_layer", "broker", "circuits"}
    assert all(c["status"] == "ok" for c in body["checks"].values())
    assert body["checks"]["circuits"]["open"] == []
    assert body["checks"]["database"]["detail"] in ("sqlite", "postgresql")


def _pool_connections_in_use() -> int:
    stats = connections["default"].pool.get_stats()
    return stats["pool_size"] - stats["pool_available"]


@pytest.mark.skipif(not django_settings.DATABASES["default"]["ENGINE"].endswith("postgresql"),
                    reason="the connection pool exists on PostgreSQL only")
async def test_it_returns_the_readiness_checks_connection_to_the_pool():
    before = await orm(_pool_connections_in_use)

    assert (await Api().get("/health/ready")).status_code == 200

    assert await orm(_pool_connections_in_use) == before


async def test_it_guards_metrics(key, make_key, settings):
    admin = await orm(make_key, role="admin")
    settings.METRICS_TOKEN = "metrics-secret"

    assert_error(await Api().get("/metrics"), 401)
    assert_error(await Api("ap_123456789abc_wrong").get("/metrics"), 401)
    assert_error(await Api(key).get("/metrics"), 403, "permission_denied")
    for presented in (admin, "metrics-secret"):
        response = await Api(presented).get("/metrics")
        assert response.status_code == 200
        assert "django_http_requests" in response.text


async def test_it_serves_the_openapi_schema_to_keys(key):
    response = await Api(key).get("/api/schema/", params={"format": "json"})

    assert response.status_code == 200
    schema = response.json()
    assert schema["openapi"].startswith("3.")
    assert "/api/v1/agents/{name}/chat" in schema["paths"]
    assert "/v1/chat/completions" in schema["paths"]

    anonymous = await Api().get("/api/schema/", params={"format": "json"})
    assert anonymous.status_code in (401, 403)
    assert set(anonymous.json()["error"]) >= {"type", "code", "message", "request_id"}


def test_it_serves_the_api_docs_to_staff_without_a_cdn(admin_client, client):
    response = admin_client.get("/api/docs/")

    assert response.status_code == 200
    html = response.content.decode()
    assert "swagger" in html.lower()
    assert "cdn.jsdelivr" not in html and "unpkg" not in html
    assert client.get("/api/docs/").status_code == 302  # others are sent to the admin login
