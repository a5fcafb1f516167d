"""The OpenAI-compatible endpoint (/v1/chat/completions, /v1/models) as raw JSON and SSE: the
wire format OpenAI clients expect, with an agent's name as the model."""

from __future__ import annotations

import httpx
import openai
import pytest

from agents.models import Run, Session
from billing.models import UsageRecord
from conftest import Api, assert_error, orm, parse_sse

pytestmark = pytest.mark.django_db(transaction=True)

COMPLETIONS = "/v1/chat/completions"


@pytest.fixture
def agents(make_agent):
    return {
        "demo": make_agent(name="demo", description="The demo agent."),
        "calc": make_agent(name="calc", skills=["calculator"]),
        "off": make_agent(name="off", enabled=False),
    }


@pytest.fixture
def key(make_key) -> str:
    return make_key()


def chunks_of(text: str) -> list:
    """The `data:` payloads of an OpenAI stream: chunk objects, then the literal [DONE]."""
    blocks = [b for b in parse_sse(text) if "data" in b]
    assert all(b["event"] is None for b in blocks), "OpenAI streams carry no event names"
    return [b["data"] for b in blocks]


async def test_it_answers_in_the_chat_completion_shape(agents, key):
    response = await Api(key).post(COMPLETIONS, {"model": "demo", "messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]})

    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["model"] == "demo"
    assert isinstance(body["created"], int)
    assert len(body["choices"]) == 1
    choice = body["choices"][0]
    assert choice["index"] == 0
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == "You said: Hello there"
    assert choice["finish_reason"] == "stop"
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0

    run = await orm(Run.objects.get)
    assert run.transport == Run.Transport.OPENAI
    assert run.session_id is None  # the client brings the whole conversation
    assert body["id"] == f"chatcmpl-{run.id.hex}"
    assert run.total_tokens == usage["total_tokens"]


async def test_it_runs_the_agents_tools_for_the_client(agents, key):
    body = (await Api(key).post(COMPLETIONS, {"model": "calc", "messages": [
        {"role": "user", "content": "what is 6*7?"}]})).json()

    assert body["choices"][0]["message"]["content"].endswith("42")
    assert "tool_calls" not in body["choices"][0]["message"]
    assert (await orm(Run.objects.get)).steps == 2


async def test_it_accepts_content_parts_and_ignores_client_tools(agents, key):
    response = await Api(key).post(COMPLETIONS, {
        "model": "demo", "messages": [{"role": "user", "content": [{"type": "text", "text": "parts work"}]}],
        "tools": [{"type": "function", "function": {"name": "theirs", "parameters": {}}}], "top_p": 0.5,
        "temperature": 0.1, "max_tokens": 50, "user": "u-1"})

    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == "You said: parts work"


async def test_it_streams_chunks_then_done(agents, key):
    response = await Api(key).post(COMPLETIONS, {"model": "demo", "stream": True, "messages": [
        {"role": "user", "content": "one two three"}]})

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    chunks = chunks_of(response.text)
    assert chunks[-1] == "[DONE]"
    objects = chunks[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "demo" for c in objects)
    assert len({c["id"] for c in objects}) == 1
    assert objects[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in objects)
    assert text == "You said: one two three"
    assert objects[-1]["choices"][0]["finish_reason"] == "stop"
    assert objects[-1]["choices"][0]["delta"] == {}
    assert all(c["choices"] and "usage" not in c for c in objects)


async def test_it_adds_a_usage_chunk_when_asked(agents, key):
    response = await Api(key).post(COMPLETIONS, {"model": "demo", "stream": True,
                                                 "stream_options": {"include_usage": True},
                                                 "messages": [{"role": "user", "content": "count me"}]})

    chunks = chunks_of(response.text)
    assert chunks[-1] == "[DONE]"
    final = chunks[-2]
    assert final["choices"] == []
    usage = final["usage"]
    assert usage["completion_tokens"] == 4  # "You said: count me", word by word
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    run = await orm(Run.objects.get)
    assert run.total_tokens == usage["total_tokens"]
    assert run.status == Run.Status.SUCCEEDED


@pytest.fixture
async def client(key):
    """The real openai SDK on the ASGI app (no retries: each test sees one request's answer)."""
    from agentplatform.asgi import application

    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=application), timeout=30)
    async with openai.AsyncOpenAI(base_url="http://testserver/v1", api_key=key, max_retries=0,
                                  http_client=http) as sdk:
        yield sdk


class Streamed:
    """What an SDK client received from one streamed completion: its text and the finish
    reasons seen, up to the error the SDK raised, if it raised."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.finish_reasons: list = []

    async def run(self, client: openai.AsyncOpenAI, content: str, model: str = "gpt") -> "Streamed":
        stream = await client.chat.completions.create(model=model, stream=True,
                                                      messages=[{"role": "user", "content": content}])
        async with stream:
            async for chunk in stream:
                for choice in chunk.choices:
                    self.text.append(choice.delta.content or "")
                    self.finish_reasons.append(choice.finish_reason)
        return self


async def test_it_streams_an_upstream_failure_as_an_error_then_done(make_agent, key, openai_settings):
    await orm(make_agent, name="gpt", model="openai/gpt-4o-mini")

    response = await Api(key).post(COMPLETIONS, {"model": "gpt", "stream": True, "messages": [
        {"role": "user", "content": "a story [fault:cut]"}]})

    chunks = chunks_of(response.text)
    assert chunks[-1] == "[DONE]"
    error = chunks[-2]["error"]
    assert error["code"] == "upstream_stream_cut" and error["message"] and error["request_id"]
    assert error["status"] == 502 and error["type"] == "api_error"
    assert not any(c.get("choices") and c["choices"][0]["finish_reason"] for c in chunks[:-2])
    assert (await orm(Run.objects.get)).status == Run.Status.FAILED


@pytest.mark.parametrize("fault", ["cut", "cut-clean", "cut-event"])
async def test_the_sdk_raises_on_a_cut_stream(make_agent, key, openai_settings, fault, client):
    await orm(make_agent, name="gpt", model="openai/gpt-4o-mini")

    seen = Streamed()
    with pytest.raises(openai.APIError) as caught:
        await seen.run(client, f"a long story [fault:{fault}]")

    assert caught.value.code == "upstream_stream_cut" and caught.value.body["status"] == 502
    assert "".join(seen.text) == "Echo: a " and "stop" not in seen.finish_reasons
    run = await orm(Run.objects.get)
    assert (run.status, run.error_code, run.transport) == (Run.Status.FAILED, "upstream_stream_cut", "openai")
    [record] = await orm(lambda: list(UsageRecord.objects.filter(run_id=run.id)))
    assert record.estimated and record.completion_tokens > 0


async def test_the_sdk_gets_the_fallbacks_answer_when_a_stream_is_cut_before_its_first_token(
        make_agent, key, openai_settings, fake_upstream, client):
    # The role chunk, then the body ends: no finish reason, no [DONE], no token either.
    await orm(make_agent, name="gpt", model="openai/fault-cut-clean-model", fallback_models=["openai/good-model"])

    seen = await Streamed().run(client, "hi [cut-after:1]")

    assert "".join(seen.text) == "Echo: hi" and seen.finish_reasons[-1] == "stop"
    # Retried (LLM_MAX_RETRIES) before the fallback: nothing had reached the client.
    assert fake_upstream.stats()["by_model"] == {"fault-cut-clean-model": 3, "good-model": 1}


async def test_a_stream_every_model_refused_is_an_http_error_with_retry_after(make_agent, key, openai_settings,
                                                                             fake_upstream, client):
    """No role chunk before the model answered: a 429 from the upstream on every model is our
    503 with Retry-After, a real HTTP status the SDK raises (and would retry), not a 200 stream."""
    await orm(make_agent, name="gpt", model="openai/gpt-4o-mini", fallback_models=["openai/gpt-4o"])

    seen = Streamed()
    with pytest.raises(openai.InternalServerError) as caught:
        await seen.run(client, "hi [fault:429] [retry-after:30]")

    assert caught.value.status_code == 503 and caught.value.code == "upstream_rate_limited"
    assert caught.value.response.headers["Retry-After"] == "30"
    assert caught.value.response.headers["content-type"].startswith("application/json")
    assert seen.text == []
    assert (await orm(Run.objects.get)).status == Run.Status.FAILED
    assert fake_upstream.stats()["requests"] == 2


async def test_a_slow_model_gets_heartbeats_and_no_role_chunk_until_it_answers(make_agent, key, openai_settings):
    """The stream waits for the model at most SSE_HEARTBEAT_SECONDS before it starts: then
    heartbeats keep it open, the role chunk still waits for the model, and a failure is an
    error event (here the first data the client gets)."""
    openai_settings.SSE_HEARTBEAT_SECONDS = 0.05
    await orm(make_agent, name="gpt", model="openai/gpt-4o-mini")

    slow = await Api(key).post(COMPLETIONS, {"model": "gpt", "stream": True, "messages": [
        {"role": "user", "content": "slow one [latency:300]"}]})
    failing = await Api(key).post(COMPLETIONS, {"model": "gpt", "stream": True, "messages": [
        {"role": "user", "content": "slow one [latency:300] [fault:500]"}]})

    blocks = parse_sse(slow.text)
    assert slow.status_code == 200 and blocks[0] == {"comment": "heartbeat"}
    first_data = next(b["data"] for b in blocks if "data" in b)
    assert first_data["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert failing.status_code == 200 and parse_sse(failing.text)[0] == {"comment": "heartbeat"}
    assert [b["data"]["error"]["code"] for b in parse_sse(failing.text) if "data" in b and b["data"] != "[DONE]"] \
        == ["upstream_error"]


async def test_a_stream_error_after_the_model_answered_carries_status_and_retry_after(make_agent, key,
                                                                                     openai_settings, client):
    await orm(make_agent, name="gpt", model="openai/gpt-4o-mini", skills=["calculator"])

    response = await Api(key).post(COMPLETIONS, {"model": "gpt", "stream": True, "messages": [{
        "role": "user",
        "content": '[call:calculator {"expression": "6*7"}] [fault-step:2] [fault:429] [retry-after:30]'}]})

    assert response.status_code == 200
    chunks = chunks_of(response.text)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}  # the tool step answered
    error = chunks[-2]["error"]
    assert (error["code"], error["status"], error["retry_after"]) == ("upstream_rate_limited", 503, 30)
    with pytest.raises(openai.APIError) as caught:
        await Streamed().run(client, '[call:calculator {"expression": "6*7"}] [fault-step:2] [fault:429] '
                                       '[retry-after:30]')
    assert caught.value.code == "upstream_rate_limited" and caught.value.body["retry_after"] == 30


async def test_it_answers_upstream_failures_in_openais_error_shape(make_agent, key, openai_settings):
    await orm(make_agent, name="gpt", model="openai/gpt-4o-mini")

    response = await Api(key).post(COMPLETIONS, {"model": "gpt", "messages": [
        {"role": "user", "content": "hi [fault:429]"}]})

    assert_error(response, 503, "upstream_rate_limited")
    assert response.headers["Retry-After"] == "1"


@pytest.mark.parametrize("model", ["nope", "off", "calc"])
async def test_it_answers_model_not_found_for_agents_it_cannot_use(agents, make_key, model):
    limited = await orm(make_key, agents=["demo"])

    response = await Api(limited).post(COMPLETIONS, {"model": model, "messages": [
        {"role": "user", "content": "hi"}]})

    error = assert_error(response, 404, "model_not_found", param="model")
    assert error["type"] == "not_found_error"
    assert model in error["message"]


async def test_it_needs_a_valid_key(agents):
    for presented in (None, "ap_123456789abc_wrong"):
        response = await Api(presented).post(COMPLETIONS, {"model": "demo", "messages": [
            {"role": "user", "content": "hi"}]})
        assert_error(response, 401, "invalid_api_key")


@pytest.mark.parametrize("body, param", [
    ({"model": "demo"}, "messages"),
    ({"model": "demo", "messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "model"),
    ({"model": "demo", "messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ({"model": "demo", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"model": "demo", "messages": ["hi"]}, "messages[0]"),
    ({"model": "demo", "messages": [{"role": "user", "content": "hi"}], "temperature": 3}, "temperature"),
    ({"model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
    ({"model": "demo", "messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, "stream"),
    ({"model": "demo", "messages": [{"role": "user", "content": "hi"}], "stream_options": 1}, "stream_options"),
    ({"model": "demo", "messages": [{"role": "user", "content": "hi"}], "colour": "red"}, "colour"),
], ids=["no-messages", "empty-messages", "no-model", "bad-role", "bad-content", "message-not-object",
        "temperature-3", "max-tokens-0", "bad-stream", "bad-stream-options", "unknown-field"])
async def test_it_refuses_invalid_bodies_naming_the_field(agents, key, body, param):
    response = await Api(key).post(COMPLETIONS, body)

    error = assert_error(response, 400, "invalid_field", param=param)
    assert error["type"] == "invalid_request_error"
    assert await orm(Run.objects.count) == 0


async def test_it_refuses_malformed_json(agents, key):
    assert_error(await Api(key).post(COMPLETIONS, raw="{oops"), 400, "invalid_json")


async def test_it_refuses_messages_over_the_length_limit(agents, key, settings):
    settings.MAX_MESSAGE_CHARS = 5

    response = await Api(key).post(COMPLETIONS, {"model": "demo", "messages": [
        {"role": "user", "content": "too long"}]})

    assert_error(response, 400, "invalid_field", param="messages[0].content")


async def test_it_lists_the_models_a_key_may_use(agents, make_key):
    everyone, limited = await orm(make_key), await orm(make_key, agents=["calc", "off"])

    listed = (await Api(everyone).get("/v1/models")).json()
    assert listed["object"] == "list"
    assert [m["id"] for m in listed["data"]] == ["calc", "demo"]
    model = listed["data"][1]
    assert model["object"] == "model" and model["owned_by"] and isinstance(model["created"], int)
    assert model["description"] == "The demo agent."

    assert [m["id"] for m in (await Api(limited).get("/v1/models")).json()["data"]] == ["calc"]
    assert_error(await Api().get("/v1/models"), 401)


async def test_it_shows_one_model(agents, make_key):
    limited = await orm(make_key, agents=["demo"])

    response = await Api(limited).get("/v1/models/demo")
    assert response.status_code == 200
    assert response.json()["id"] == "demo" and response.json()["object"] == "model"

    for name in ("calc", "off", "nope"):
        assert_error(await Api(limited).get(f"/v1/models/{name}"), 404, "model_not_found", param="model")


async def test_it_ignores_the_agents_session_store(agents, key):
    """Stateless: the same conversation twice gives two runs, no session, no transcript."""
    body = {"model": "demo", "messages": [{"role": "user", "content": "hi"}]}

    for _ in range(2):
        assert (await Api(key).post(COMPLETIONS, body)).status_code == 200

    assert await orm(lambda: list(Run.objects.values_list("session_id", flat=True))) == [None, None]
    assert await orm(Session.objects.count) == 0


async def test_it_passes_max_tokens_down_to_the_model(make_agent, key, openai_settings):
    await orm(make_agent, name="gpt", model="openai/gpt-4o-mini")

    body = (await Api(key).post(COMPLETIONS, {"model": "gpt", "max_tokens": 2, "messages": [
        {"role": "user", "content": "[tokens:10]"}]})).json()

    assert body["choices"][0]["message"]["content"] == "w1 w2"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 2
