"""One chat input on every transport (agents.chat_input, agentplatform.jsonparse): REST, SSE, the
OpenAI-compatible endpoint and WebSocket frames refuse the same hostile input the same way —
a 400 (an `error` frame with status 400 on WebSocket) before the model is called, nothing stored —
and accept the same good input. Also: `done` only once the run is committed, and a run whose
transcript cannot be stored still leaves its run, usage and audit entry."""

from __future__ import annotations

import asyncio
import json

import pytest
from channels.testing import WebsocketCommunicator

from agents.models import Message, Run, Session
from billing.models import UsageRecord
from conftest import Api, orm, parse_sse
from governance.models import AuditLog

pytestmark = pytest.mark.django_db(transaction=True)

TRANSPORTS = ["rest", "sse", "openai", "websocket"]
WS_PATH = "/ws/agents/{}/chat/"


def envelope(transport: str, content: str, metadata: str = "{}") -> str:
    """A request body (or frame) carrying `content` and `metadata`, given as JSON text."""
    if transport == "rest":
        return f'{{"message": {content}, "metadata": {metadata}}}'
    if transport == "sse":
        return f'{{"message": {content}, "stream": true, "metadata": {metadata}}}'
    if transport == "openai":
        return f'{{"model": "demo", "messages": [{{"role": "user", "content": {content}}}], "metadata": {metadata}}}'
    return f'{{"type": "message", "content": {content}, "metadata": {metadata}}}'


async def send(transport: str, key: str, body: str) -> tuple[int, dict]:
    """(status, error or final event) for one request on `transport`."""
    if transport == "websocket":
        return await ws_turn(key, body)
    path = "/v1/chat/completions" if transport == "openai" else "/api/v1/agents/demo/chat"
    response = await Api(key).post(path, raw=body)
    if response.status_code != 200:
        assert response.headers["content-type"].startswith("application/json"), response.text[:300]
        return response.status_code, response.json()["error"]
    if transport == "sse":
        events = [e["data"] for e in parse_sse(response.text) if e.get("event")]
        return (200 if events[-1]["type"] == "done" else events[-1]["status"]), events[-1]
    return 200, response.json()


async def ws_turn(key: str, text: str) -> tuple[int, dict]:
    """Send one frame to agent demo's WebSocket: (status, its `error` frame) or (200, `done`)."""
    from agentplatform.asgi import application

    communicator = WebsocketCommunicator(application, WS_PATH.format("demo"),
                                         headers=[(b"host", b"testserver"), (b"authorization", f"Bearer {key}".encode())])
    connected, _ = await communicator.connect(timeout=5)
    assert connected
    try:
        assert (await communicator.receive_json_from(timeout=5))["type"] == "ready"
        await communicator.send_to(text_data=text)
        while True:
            frame = await communicator.receive_json_from(timeout=10)
            if frame["type"] == "error":
                return frame["status"], frame
            if frame["type"] == "done":
                return 200, frame
    finally:
        await communicator.disconnect(timeout=5)


@pytest.fixture
def demo(make_agent, make_key) -> str:
    make_agent(name="demo")
    return make_key()


def nothing_stored() -> bool:
    return not Run.objects.exists() and not UsageRecord.objects.exists() and not Message.objects.exists()


DEEP = '{"a": ' * 70 + "1" + "}" * 70

HOSTILE = [
    # (content JSON, metadata JSON, code)
    ("NaN", "{}", "invalid_json"),
    ('"hi"', '{"x": NaN}', "invalid_json"),
    ('"hi"', '{"x": Infinity}', "invalid_json"),
    ('"hi"', '{"x": [-Infinity]}', "invalid_json"),
    ('"hi"', '{"x": 1e999}', "invalid_json"),
    ('"hi"', DEEP, "invalid_json"),
    ('"\\ud800 lone"', "{}", "invalid_json"),
    ('"hi"', '{"k\\udfff": 1}', "invalid_json"),
    ('[{"type": "text", "text": 5}]', "{}", "invalid_field"),
    ('[{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]', "{}", "invalid_field"),
    ('"a\\u0000b"', "{}", "invalid_json"),
    ('"hi"', '{"x": "a\\u0000"}', "invalid_json"),
    ('"hi"', "[1]", "invalid_field"),
    ("[]", "{}", None),  # REST and WebSocket need text; OpenAI takes an empty message
    ('""', "{}", None),
]


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("content,metadata,code", HOSTILE)
async def test_it_refuses_hostile_input_before_the_model_on_every_transport(demo, transport, content, metadata,
                                                                            code):
    status, error = await send(transport, demo, envelope(transport, content, metadata))

    if code is None and transport == "openai":
        assert status == 200
        return
    assert status == 400, error
    if code is not None:
        assert error["code"] == code, error
    assert error["message"]
    assert await orm(nothing_stored)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_it_names_the_bad_content_part(demo, transport):
    _, error = await send(transport, demo, envelope(transport, '[{"type": "text", "text": "ok"}, {"text": []}]'))

    assert error["code"] == "invalid_field" and error["param"].endswith("[1].text"), error


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_it_answers_content_parts_as_one_text(demo, transport):
    status, answer = await send(transport, demo, envelope(transport, '[{"type": "text", "text": "What is"}, '
                                                                     '{"type": "text", "text": "6 * 7?"}]'))

    assert status == 200, answer
    output = answer["choices"][0]["message"]["content"] if transport == "openai" else answer["output"]
    assert "What is\n6 * 7?" in output  # the offline model echoes it


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_it_measures_the_metadata_cap_one_way(demo, transport):
    # 16,384 bytes of compact UTF-8 JSON: {"x":"é…é"} with 8,188 two-byte characters.
    at_cap = json.dumps({"x": "é" * 8188}, ensure_ascii=False)
    over = json.dumps({"x": "é" * 8189})  # \u00e9 escapes: the same data, so the same size

    status, answer = await send(transport, demo, envelope(transport, '"hi"', at_cap))
    assert status == 200, answer
    status, error = await send(transport, demo, envelope(transport, '"hi"', over))
    assert status == 400 and error["code"] == "invalid_field" and error["param"] == "metadata", error


@pytest.mark.parametrize("text", [DEEP, '[' * 5000 + ']' * 5000, '{"type": NaN}', '"\\ud800"'])
async def test_it_refuses_hostile_frames_before_authentication(demo, text):
    from agentplatform.asgi import application

    communicator = WebsocketCommunicator(application, WS_PATH.format("demo"), headers=[(b"host", b"testserver")])
    connected, _ = await communicator.connect(timeout=5)
    assert connected
    try:
        await communicator.send_to(text_data=text)
        frame = await communicator.receive_json_from(timeout=5)
        assert frame["type"] == "error" and frame["code"] == "invalid_json" and frame["status"] == 400, frame
        # The connection still takes its auth frame.
        await communicator.send_json_to({"type": "auth", "key": demo})
        assert (await communicator.receive_json_from(timeout=5))["type"] == "ready"
    finally:
        await communicator.disconnect(timeout=5)


async def test_it_refuses_deep_json_on_rest_with_400_not_500(demo):
    for path, body in [("/api/v1/agents/demo/chat", '{"message": "hi", "metadata": ' + "[" * 100_000 + "]" * 100_000 + "}"),
                       ("/v1/chat/completions", "[" * 100_000 + "]" * 100_000)]:
        response = await Api(demo).post(path, raw=body)
        assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json", response.text[:300]


# --- done only once the run is stored -------------------------------------------------------------


async def _asgi_stream(path: str, body: dict, key: str, on_chunk) -> None:
    """Call the ASGI app directly, awaiting on_chunk(bytes) as each body chunk is sent: the app
    waits for it, so what on_chunk sees of the database is what a client reading that chunk sees."""
    from agentplatform.asgi import application

    raw = json.dumps(body).encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"host", b"testserver"), (b"content-type", b"application/json"),
                         (b"authorization", f"Bearer {key}".encode()), (b"content-length", str(len(raw)).encode())],
             "client": ("127.0.0.1", 5000), "server": ("testserver", 80)}
    sent = False

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await asyncio.sleep(3600)

    async def send(message):
        if message["type"] == "http.response.body" and message.get("body"):
            await on_chunk(message["body"])

    await asyncio.wait_for(application(scope, receive, send), timeout=30)


@pytest.mark.parametrize("path,body,final", [
    ("/api/v1/agents/demo/chat", {"message": "What is 6 * 7?", "stream": True}, b"event: done"),
    ("/v1/chat/completions", {"model": "demo", "stream": True,
                              "messages": [{"role": "user", "content": "What is 6 * 7?"}]}, b'"finish_reason":"stop"'),
])
async def test_it_sends_the_last_event_only_once_the_run_is_stored(demo, path, body, final):
    seen = []

    async def on_chunk(chunk: bytes) -> None:
        if final in chunk:
            seen.append(await orm(lambda: list(Run.objects.values_list("status", flat=True))))

    await _asgi_stream(path, body, demo, on_chunk)

    assert seen == [[Run.Status.SUCCEEDED]]


# --- a run whose transcript cannot be stored ------------------------------------------------------


async def test_a_run_whose_session_vanished_keeps_its_run_usage_and_audit_entry(make_agent, make_key,
                                                                                 openai_settings, caplog):
    from agentplatform.asgi import application

    await orm(make_agent, name="gpt", model="openai/gpt-4o-mini")
    key = await orm(make_key)
    first = await Api(key).post("/api/v1/agents/gpt/chat", {"message": "hello"})
    session_id = first.json()["session_id"]

    communicator = WebsocketCommunicator(application, WS_PATH.format("gpt"),
                                         headers=[(b"host", b"testserver"), (b"authorization", f"Bearer {key}".encode())])
    assert (await communicator.connect(timeout=5))[0]
    try:
        assert (await communicator.receive_json_from(timeout=5))["type"] == "ready"
        await communicator.send_json_to({"type": "message", "content": "slowly [tokens:10] [gap:30]",
                                         "session_id": session_id})
        start = await communicator.receive_json_from(timeout=5)
        assert (await communicator.receive_json_from(timeout=5))["type"] == "delta"
        # Deleted while the model answers (DELETE /api/v1/sessions/{id} from another client).
        assert (await Api(key).delete(f"/api/v1/sessions/{session_id}")).status_code == 204
        frames = []
        while not frames or frames[-1]["type"] not in ("done", "error"):
            frames.append(await communicator.receive_json_from(timeout=10))
    finally:
        await communicator.disconnect(timeout=5)

    done = frames[-1]
    assert done["type"] == "done" and done["usage"]["completion_tokens"] == 10, done
    run = await orm(Run.objects.get, pk=start["run_id"])
    assert run.status == Run.Status.SUCCEEDED and run.session_id is None
    assert run.metadata["transcript_stored"] is False
    usage = await orm(lambda: list(UsageRecord.objects.filter(run_id=run.id).values_list("completion_tokens",
                                                                                         flat=True)))
    assert usage == [10]
    audit = await orm(lambda: AuditLog.objects.filter(action="request.served",
                                                      details__run_id=str(run.id)).get().details)
    assert audit["store_error"] == "transcript_not_stored"
    assert not await orm(Session.objects.filter(pk=session_id).exists)
    assert any("Could not store run" in r.getMessage() and r.levelname == "ERROR" for r in caplog.records)


# --- masked agents mask metadata too ---------------------------------------------------------------


async def test_a_masking_agent_masks_session_and_run_metadata(make_agent, make_key):
    await orm(make_agent, name="private", mask_transcripts=True)
    key = await orm(make_key)

    response = await Api(key).post("/api/v1/agents/private/chat", {
        "message": "hi", "metadata": {"email": "ada@example.com", "note": "card 4111 1111 1111 1111",
                                      "token": "sk-abcdefghijklmnopqrstuvwxyz012345"}})

    assert response.status_code == 200
    body = response.json()
    stored = json.dumps([await orm(lambda: Session.objects.get(pk=body["session_id"]).metadata),
                         await orm(lambda: Run.objects.get(pk=body["id"]).metadata["client"])])
    for secret in ("ada@example.com", "4111 1111 1111 1111", "sk-abcdefghijklmnopqrstuvwxyz012345"):
        assert secret not in stored, stored
    assert "[email]" in stored


# --- the schema documents what the validator accepts -------------------------------------------------


def test_the_documented_fields_are_the_accepted_ones():
    from agents import chat_input
    from agents.openai_views import ChatCompletionRequestSerializer
    from agents.serializers import ChatRequestSerializer

    assert set(ChatRequestSerializer().fields) == chat_input.REST_FIELDS
    assert set(ChatCompletionRequestSerializer().fields) == chat_input.OPENAI_FIELDS
