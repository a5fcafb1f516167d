"""The runtime loop (model ↔ tools, step bound, fallbacks, history, cancellation), driven
through the chat API with real upstreams: the fake OpenAI server, and for the behaviours it
cannot script (a model that never stops calling tools, or calls one it was not offered) a
small stub upstream defined here."""

from __future__ import annotations

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from agents.models import Message, Run
from conftest import Api, orm, parse_sse, post_and_hang_up

pytestmark = pytest.mark.django_db(transaction=True)

CHAT = "/api/v1/agents/{}/chat"


@pytest.fixture
def key(make_key) -> str:
    return make_key()


async def messages_of(session_id) -> list[Message]:
    return await orm(lambda: list(Message.objects.filter(session_id=session_id).order_by("created_at", "id")))


# --- a stub upstream for models the fake cannot play ---------------------------------------


class _StubHandler(BaseHTTPRequestHandler):
    """Chat Completions, non-streaming. The model name picks the behaviour:
    `loop`: call the first offered tool whenever tools are offered, else answer;
    `ghost`: after a user message call `no_such_tool`; after a tool result, quote it."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def do_POST(self) -> None:
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(payload)
        messages, tools = payload["messages"], payload.get("tools") or []
        message: dict = {"role": "assistant", "content": None}
        finish = "tool_calls"
        if payload["model"] == "loop" and tools:
            call = (tools[0]["function"]["name"], json.dumps({"expression": "1+1"}))
        elif payload["model"] == "ghost" and messages[-1]["role"] == "user":
            call = ("no_such_tool", "{}")
        else:
            call, finish = None, "stop"
            message["content"] = f"Final answer after {len(messages)} messages: {messages[-1].get('content')}"
        if call:
            message["tool_calls"] = [{"id": f"call_{len(self.server.requests)}", "type": "function",
                                      "function": {"name": call[0], "arguments": call[1]}}]
        body = json.dumps({"id": "chatcmpl-stub", "object": "chat.completion", "created": 0,
                           "model": payload["model"],
                           "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                           "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def stub_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StubHandler)
    server.daemon_threads = True
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
async def stub_provider(settings, stub_server):
    """An extra OpenAI-compatible provider `stub` (LLM_PROVIDERS) pointed at the stub server."""
    stub_server.requests.clear()
    settings.LLM_PROVIDERS = {"stub": {"base_url": f"http://127.0.0.1:{stub_server.server_port}/v1",
                                       "api_key": "sk-stub"}}
    yield stub_server
    from agents.providers import provider_for

    provider, _ = provider_for("stub/any")
    await provider.aclose()


# --- the tool loop ------------------------------------------------------------------------


async def test_it_runs_the_tool_the_model_calls_and_returns_its_answer(make_agent, key, openai_settings,
                                                                       fake_upstream):
    await orm(make_agent, name="gpt", model="openai/gpt-4o-mini", skills=["calculator"])

    response = await Api(key).post(CHAT.format("gpt"), {"message": 'add [call:calculator {"expression": "2+2"}]'})

    assert response.status_code == 200
    body = response.json()
    assert body["output"] == "Tool result: 4"
    [call] = body["tool_calls"]
    assert call["name"] == "calculator"
    assert json.loads(call["arguments"]) == {"expression": "2+2"}
    assert call["result"] == "4" and call["is_error"] is False
    assert fake_upstream.stats()["requests"] == 2
    run = await orm(Run.objects.get, pk=body["id"])
    assert run.steps == 2 and run.status == Run.Status.SUCCEEDED
    # Usage adds up both model calls.
    assert run.total_tokens == sum(c["prompt_tokens"] + c["completion_tokens"] for c in run.metadata["calls"])
    stored = await messages_of(body["session_id"])
    assert [(m.role, m.content) for m in stored] == [
        ("user", 'add [call:calculator {"expression": "2+2"}]'), ("assistant", ""), ("tool", "4"),
        ("assistant", "Tool result: 4")]
    assert stored[1].tool_calls == [{"id": call["id"], "name": "calculator", "arguments": call["arguments"]}]
    assert stored[2].tool_call_id == call["id"] and stored[2].name == "calculator"


async def test_it_streams_a_tool_call_assembled_from_fragments(make_agent, key, openai_settings):
    await orm(make_agent, name="gpt", model="openai/gpt-4o-mini", skills=["calculator"])

    response = await Api(key).post(CHAT.format("gpt"), {
        "message": '[call:calculator {"expression": "(1 + 2) * 14"}]', "stream": True})

    events = [e for e in parse_sse(response.text) if "event" in e]
    kinds = [e["event"] for e in events]
    assert kinds[:3] == ["start", "tool_call", "tool_result"]
    assert json.loads(events[1]["data"]["arguments"]) == {"expression": "(1 + 2) * 14"}
    assert events[2]["data"]["content"] == "42"
    assert events[-1]["event"] == "done" and events[-1]["data"]["output"] == "Tool result: 42"


async def test_it_runs_parallel_tool_calls(make_agent, key, openai_settings):
    await orm(make_agent, name="gpt", model="openai/gpt-4o-mini", skills=["calculator"])

    body = (await Api(key).post(CHAT.format("gpt"), {
        "message": '[call:calculator {"expression": "2+2"}] [call:calculator {"expression": "3*3"}]'})).json()

    assert [(c["name"], c["result"]) for c in body["tool_calls"]] == [("calculator", "4"), ("calculator", "9")]
    assert body["output"] == "Tool result: 9"  # the fake quotes the last tool result
    stored = await messages_of(body["session_id"])
    assert [m.role for m in stored] == ["user", "assistant", "tool", "tool", "assistant"]


async def test_it_answers_a_skill_error_as_the_tools_result(make_agent, key, openai_settings):
    await orm(make_agent, name="gpt", model="openai/gpt-4o-mini", skills=["calculator"])

    body = (await Api(key).post(CHAT.format("gpt"), {
        "message": '[call:calculator {"expression": "1/0"}]'})).json()

    [call] = body["tool_calls"]
    assert call["is_error"] is True and call["result"].startswith("error:")
    assert body["output"].startswith("Tool result: error:")


async def test_it_bounds_the_steps_and_makes_the_last_call_without_tools(make_agent, key, settings, stub_provider):
    settings.AGENT_MAX_STEPS = 3
    await orm(make_agent, name="looper", model="stub/loop", skills=["calculator"])

    response = await Api(key).post(CHAT.format("looper"), {"message": "never stop"})

    assert response.status_code == 200
    body = response.json()
    assert len(body["tool_calls"]) == 2
    assert body["output"] == "Final answer after 5 messages: 2"
    assert [bool(r.get("tools")) for r in stub_provider.requests] == [True, True, False]
    run = await orm(Run.objects.get, pk=body["id"])
    assert run.steps == 3 and run.status == Run.Status.SUCCEEDED
    assert run.total_tokens == 3 * 15


async def test_it_answers_without_tools_when_one_step_is_allowed(make_agent, key, openai_settings):
    openai_settings.AGENT_MAX_STEPS = 1
    await orm(make_agent, name="gpt", model="openai/gpt-4o-mini", skills=["calculator"])

    body = (await Api(key).post(CHAT.format("gpt"), {"message": '[call:calculator {"expression": "2+2"}]'})).json()

    # The fake answers with text when the tool it was asked to call is not offered.
    assert body["output"] == "Tool calculator is not offered (offered: none)."
    assert body["tool_calls"] == []
    assert (await orm(Run.objects.get, pk=body["id"])).steps == 1


async def test_it_answers_an_unknown_tool_with_an_error_result(make_agent, key, stub_provider):
    await orm(make_agent, name="ghost", model="stub/ghost", skills=["calculator"])

    response = await Api(key).post(CHAT.format("ghost"), {"message": "call something"})

    assert response.status_code == 200
    body = response.json()
    [call] = body["tool_calls"]
    assert call["name"] == "no_such_tool" and call["is_error"] is True
    assert "no skill named 'no_such_tool'" in call["result"]
    # The model read the error as the tool's answer and went on.
    assert body["output"].startswith("Final answer after 3 messages: error: no skill named")
    assert (await orm(Run.objects.get, pk=body["id"])).status == Run.Status.SUCCEEDED


# --- fallbacks in a stream, history --------------------------------------------------------


async def test_it_falls_back_in_a_stream_before_anything_was_sent(make_agent, key, openai_settings):
    await orm(make_agent, name="gpt", model="openai/fault-503-primary", fallback_models=["openai/backup"])

    response = await Api(key).post(CHAT.format("gpt"), {"message": "hi there", "stream": True})

    events = [e for e in parse_sse(response.text) if "event" in e]
    assert "error" not in [e["event"] for e in events]
    done = events[-1]["data"]
    assert done["model"] == "openai/backup" and done["output"] == "Echo: hi there"
    # The primary's 503 was retried (LLM_MAX_RETRIES, 2) before the backup answered.
    assert (await orm(Run.objects.get, pk=done["id"])).steps == 4


async def test_it_sends_only_the_latest_history(make_agent, key, openai_settings):
    openai_settings.AGENT_HISTORY_LIMIT = 2
    await orm(make_agent, name="gpt", model="openai/gpt-4o-mini")
    api = Api(key)

    first = (await api.post(CHAT.format("gpt"), {"message": "a b"})).json()
    session = {"session_id": first["session_id"]}
    second = (await api.post(CHAT.format("gpt"), {"message": "c", **session})).json()
    third = (await api.post(CHAT.format("gpt"), {"message": "d", **session})).json()

    # Fake's prompt tokens: words + 1 per message sent.
    assert first["usage"]["prompt_tokens"] == 3          # "a b"
    assert second["usage"]["prompt_tokens"] == 3 + 4 + 2  # "a b", "Echo: a b", "c"
    assert third["usage"]["prompt_tokens"] == 2 + 3 + 2   # "c", "Echo: c", "d": the first turn is out
    assert len(await messages_of(first["session_id"])) == 6


# --- cancellation -------------------------------------------------------------------------


async def test_it_keeps_a_cancelled_run_when_the_client_goes_away(make_agent, key, openai_settings, fake_upstream):
    """Drive the ASGI app directly so the client can hang up mid-stream, as a browser does."""
    await orm(make_agent, name="gpt", model="openai/gpt-4o-mini")
    received = await post_and_hang_up(CHAT.format("gpt"), {"message": "a long one [gap:50] [tokens:200]", "stream": True},
                                      key, leave_when=lambda got: got.count(b"event: delta") >= 3)

    text = received.decode()
    assert "event: done" not in text
    start = parse_sse(text)[0]["data"]
    run = await orm(Run.objects.get, pk=start["run_id"])
    assert run.status == Run.Status.CANCELLED
    assert run.finished_at is not None
    stored = await messages_of(start["session_id"])
    assert [m.role for m in stored] == ["user", "assistant"]
    assert stored[1].content.startswith("w1 w2 w3")  # what had been produced is kept


async def test_it_keeps_a_cancelled_run_when_the_client_leaves_before_the_model_answered(
        make_agent, key, openai_settings, fake_upstream):
    """The stream waits for the model's first event before it starts: a client that leaves
    meanwhile has received nothing, and its run is stored as cancelled all the same."""
    await orm(make_agent, name="gpt", model="openai/gpt-4o-mini")
    received = await post_and_hang_up(CHAT.format("gpt"), {"message": "slow [latency:3000]", "stream": True},
                                      key, leave_when=lambda got: False, leave_after=0.3)

    assert received == b""
    run = await orm(Run.objects.get, agent__name="gpt")
    assert (run.status, run.transport) == (Run.Status.CANCELLED, Run.Transport.SSE)
    assert fake_upstream.stats()["requests"] == 1


async def test_it_finishes_a_prepared_turn_nobody_reads_as_cancelled(make_agent, make_key):
    # A streaming client that leaves before the first frame: the view prepared the turn (stages
    # reserved what they reserve) but nobody iterates its events.
    from agents.models import Run
    from agents.pipeline import ChatTurn, principal_and_agent

    await orm(make_agent, name="quiet", model="local/demo")
    key = await orm(make_key)
    principal, agent = await principal_and_agent(key, "quiet")
    turn = ChatTurn(principal=principal, agent=agent, input_messages=[{"role": "user", "content": "hi"}],
                    transport="sse", stream=True, request_id="req_abandoned", start_timeout=0.05)
    await turn.prepare()

    for _ in range(100):
        await asyncio.sleep(0.05)
        runs = await orm(lambda: list(Run.objects.filter(request_id="req_abandoned")))
        if runs and runs[0].status != "running":  # recorded running from the start, then ended
            break
    assert [r.status for r in runs] == ["cancelled"]
    assert [event async for event in turn.events()] == []
