"""The fake OpenAI upstream, driven through the real openai SDK and httpx (no database)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from agentplatform.testing.fake_openai import FakeOpenAIServer

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


@pytest.fixture(scope="module")
def server() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer() as fake:
        yield fake


@pytest.fixture
def client(server: FakeOpenAIServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=5) as sdk:
        yield sdk


def user(content: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]


def test_it_echoes_the_last_user_message_with_usage(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="fake-model",
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "  hello \n  world  [latency:1] "},
        ],
    )

    assert completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-")
    assert completion.model == "fake-model"
    choice = completion.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == "Echo: hello world"
    assert choice.message.tool_calls is None
    assert choice.finish_reason == "stop"
    # "Be brief." = 2 words, the user message 3 (the directive counts), + 1 per message.
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (7, 3)
    assert completion.usage.total_tokens == 10


def test_it_replies_with_n_words_and_caps_with_max_tokens(client: openai.OpenAI) -> None:
    words = client.chat.completions.create(model="m", messages=user("[tokens:5]"))
    capped = client.chat.completions.create(model="m", messages=user("[tokens:5]"), max_tokens=2)
    echo_capped = client.chat.completions.create(model="m", messages=user("one two three"), max_tokens=3)

    assert words.choices[0].message.content == "w1 w2 w3 w4 w5"
    assert words.usage is not None and words.usage.completion_tokens == 5
    assert capped.choices[0].message.content == "w1 w2"
    assert capped.choices[0].finish_reason == "length"
    assert echo_capped.choices[0].message.content == "Echo: one two"


def test_it_streams_one_delta_per_token_then_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="fake-model",
        messages=user("streams are fun"),
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)

    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].delta.content == ""
    deltas = [c.choices[0].delta.content for c in chunks[1:-2]]
    assert deltas == ["Echo: ", "streams ", "are ", "fun"]
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (4, 4)


def test_it_streams_without_usage_chunk_unless_asked(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model="m", messages=user("[tokens:3]"), stream=True))

    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "w1 w2 w3"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks)


def test_it_calls_a_tool_without_streaming(client: openai.OpenAI) -> None:
    args = {"city": "Paris [FR]", "days": 3, "nested": {"units": ["C", "F"]}}
    completion = client.chat.completions.create(
        model="fake-model",
        messages=user(f"What is the weather? [call:get_weather {json.dumps(args)}]"),
        tools=[WEATHER_TOOL],
    )

    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert choice.message.tool_calls is not None and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.id.startswith("call_")
    assert call.type == "function"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == args
    assert completion.usage is not None
    assert completion.usage.completion_tokens == len(call.function.arguments.split()) + 1


def test_it_calls_a_tool_with_empty_arguments(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(model="m", messages=user("[call:get_weather]"), tools=[WEATHER_TOOL])

    assert completion.choices[0].message.tool_calls is not None
    assert completion.choices[0].message.tool_calls[0].function.arguments == "{}"


async def test_it_streams_a_tool_call_like_openai(server: FakeOpenAIServer) -> None:
    args = {"city": "Lyon", "note": "a ] inside"}
    async with openai.AsyncOpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=5) as sdk:
        stream = await sdk.chat.completions.create(
            model="fake-model",
            messages=user(f"[call:get_weather {json.dumps(args)}]"),
            tools=[WEATHER_TOOL],
            stream=True,
        )
        chunks = [chunk async for chunk in stream]

        # The SDK's own accumulator must rebuild the call from our deltas (its helper
        # only takes strict tools).
        strict_tool = {"type": "function", "function": {**WEATHER_TOOL["function"], "strict": True}}
        async with sdk.chat.completions.stream(
            model="fake-model", messages=user(f"[call:get_weather {json.dumps(args)}]"), tools=[strict_tool]
        ) as helper:
            final = await helper.get_final_completion()

    calls = [c.choices[0].delta.tool_calls for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    first = calls[0][0]
    assert first.function is not None
    assert (first.index, first.type, first.function.name, first.function.arguments) == (0, "function", "get_weather", "")
    assert first.id is not None and first.id.startswith("call_")
    fragments = [c[0].function.arguments for c in calls[1:]]
    assert len(fragments) >= 2
    assert json.loads("".join(fragments)) == args
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    call = final.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == args
    assert call.function.parsed_arguments == args
    assert final.choices[0].finish_reason == "tool_calls"


def test_it_streams_parallel_tool_calls(client: openai.OpenAI) -> None:
    time_tool = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
    chunks = list(
        client.chat.completions.create(
            model="m",
            messages=user('[call:get_weather {"city": "Oslo"}] and [call:get_time]'),
            tools=[WEATHER_TOOL, time_tool],
            stream=True,
        )
    )

    calls: dict[int, dict[str, str]] = {}
    for chunk in chunks:
        for delta in chunk.choices[0].delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"name": "", "arguments": ""})
            assert delta.function is not None
            call["name"] += delta.function.name or ""
            call["arguments"] += delta.function.arguments or ""
    assert calls == {
        0: {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
        1: {"name": "get_time", "arguments": "{}"},
    }


def test_it_replies_empty_for_zero_tokens_and_refuses_tools_when_told(client: openai.OpenAI) -> None:
    empty = client.chat.completions.create(model="m", messages=user("[tokens:0]"))
    refused = client.chat.completions.create(
        model="m", messages=user("[call:get_weather]"), tools=[WEATHER_TOOL], tool_choice="none"
    )

    assert empty.choices[0].message.content == ""
    assert empty.usage is not None and empty.usage.completion_tokens == 0
    assert refused.choices[0].message.tool_calls is None
    assert refused.choices[0].message.content == "Tool calls are disabled by tool_choice=none."


def test_it_explains_when_the_tool_is_not_offered(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="m", messages=user("[call:launch_rockets]"), tools=[WEATHER_TOOL]
    )

    assert completion.choices[0].finish_reason == "stop"
    assert completion.choices[0].message.tool_calls is None
    assert completion.choices[0].message.content == "Tool launch_rockets is not offered (offered: get_weather)."


def test_it_echoes_a_tool_result(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="m",
        messages=[
            {"role": "user", "content": "[call:get_weather]"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny " + "x" * 300},
        ],
        tools=[WEATHER_TOOL],
    )

    content = completion.choices[0].message.content
    assert content == "Tool result: " + ("sunny " + "x" * 300)[:200]


def test_it_raises_rate_limit_with_retry_after(client: openai.OpenAI) -> None:
    with pytest.raises(openai.RateLimitError) as by_directive:
        client.chat.completions.create(model="m", messages=user("hi [fault:429]"))
    with pytest.raises(openai.RateLimitError) as by_model:
        client.chat.completions.create(model="primary-fault-429", messages=user("hi [retry-after:7]"))

    assert by_directive.value.status_code == 429
    assert by_directive.value.response.headers["retry-after"] == "1"
    assert by_directive.value.code == "rate_limit_exceeded"
    assert by_model.value.response.headers["retry-after"] == "7"


def test_it_fails_only_the_first_requests_with_fault_times(server: FakeOpenAIServer, client: openai.OpenAI) -> None:
    server.reset()
    ask = user("once [fault:503] [fault-times:2] [retry-after-ms:250]")
    failures = []
    for _ in range(2):
        with pytest.raises(openai.InternalServerError) as failed:
            client.chat.completions.create(model="m", messages=ask)
        failures.append(failed.value)
    recovered = client.chat.completions.create(model="m", messages=ask)
    with pytest.raises(openai.InternalServerError):  # counted per model and message
        client.chat.completions.create(model="n", messages=ask)

    assert [f.status_code for f in failures] == [503, 503]
    assert failures[0].response.headers["retry-after-ms"] == "250"
    assert recovered.choices[0].message.content == "Echo: once"
    server.reset()  # forgets the counts
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="m", messages=ask)


def test_it_fails_one_model_while_its_fallback_answers(client: openai.OpenAI) -> None:
    with pytest.raises(openai.InternalServerError) as failed:
        client.chat.completions.create(model="primary-fault-500", messages=user("hi"))
    fallback = client.chat.completions.create(model="fallback", messages=user("hi"))

    assert failed.value.status_code == 500
    assert failed.value.type == "server_error"
    assert fallback.choices[0].message.content == "Echo: hi"


def test_it_raises_the_sdk_error_for_each_status(client: openai.OpenAI) -> None:
    for directive, error in [
        ("[fault:400]", openai.BadRequestError),
        ("[fault:401]", openai.AuthenticationError),
        ("[fault:503]", openai.InternalServerError),
    ]:
        with pytest.raises(error):
            client.chat.completions.create(model="m", messages=user(directive))


def test_it_hangs_until_the_client_times_out(server: FakeOpenAIServer) -> None:
    with openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=0.5) as sdk:
        started = time.monotonic()
        with pytest.raises(openai.APITimeoutError):
            sdk.chat.completions.create(model="fake-model-fault-hang", messages=user("hi"))

    assert 0.4 < time.monotonic() - started < 3


def test_it_cuts_a_stream_before_it_finishes(client: openai.OpenAI) -> None:
    received: list[str] = []
    finish_reasons: list[str | None] = []
    with pytest.raises((openai.APIError, httpx.HTTPError)):
        for chunk in client.chat.completions.create(model="m", messages=user("[tokens:20] [fault:cut]"), stream=True):
            if chunk.choices:
                received.append(chunk.choices[0].delta.content or "")
                finish_reasons.append(chunk.choices[0].finish_reason)

    assert "".join(received) == "w1 w2 "
    assert finish_reasons == [None, None, None]


def _raw_stream(server: FakeOpenAIServer, content: str, model: str = "m") -> tuple[bytes, type | None]:
    """The body of a streamed chat completion as received, and the error that ended it (if any)."""
    received: list[bytes] = []
    try:
        with httpx.stream("POST", f"{server.base_url}/chat/completions", timeout=5,
                          json={"model": model, "messages": user(content), "stream": True}) as response:
            for part in response.iter_raw():
                received.append(part)
    except httpx.HTTPError as exc:
        return b"".join(received), type(exc)
    return b"".join(received), None


def test_it_cuts_a_stream_in_four_ways(server: FakeOpenAIServer) -> None:
    reset, reset_error = _raw_stream(server, "[tokens:5] [fault:cut]")
    clean, clean_error = _raw_stream(server, "[tokens:5] [fault:cut-clean]")
    event, event_error = _raw_stream(server, "[tokens:5] [fault:cut-event]")
    finished, finished_error = _raw_stream(server, "[tokens:5]", model="m-fault-cut-after-finish")

    # The role chunk and two deltas, then: the connection closes mid-body ...
    assert reset_error is httpx.RemoteProtocolError and reset.count(b"\n\n") == 3
    # ... the body ends properly, without a finish chunk or [DONE] ...
    assert clean_error is None and clean.count(b"\n\n") == 3 and b"[DONE]" not in clean
    assert b'"finish_reason":null' in clean and b'"finish_reason":"stop"' not in clean
    # ... half of the next event follows, mid-JSON, then the body ends ...
    assert event_error is None and event.count(b"\n\n") == 3
    tail = event.rsplit(b"\n\n", 1)[1]
    assert tail.startswith(b"data: {") and b"\n" not in tail
    with pytest.raises(ValueError):
        json.loads(tail[len(b"data: "):])
    # ... or everything up to the finish chunk arrives, then the connection closes before [DONE].
    assert finished_error is httpx.RemoteProtocolError and b'"finish_reason":"stop"' in finished
    assert b"[DONE]" not in finished


def test_it_cuts_after_the_chunks_asked_for(server: FakeOpenAIServer) -> None:
    body, _ = _raw_stream(server, "[tokens:5] [cut-after:1] [fault:cut-clean]")
    assert body.count(b"\n\n") == 1 and b'"role":"assistant"' in body and b"w1" not in body


def test_it_fails_only_the_step_asked_for(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(model="m", messages=user("[fault-step:2] [fault:429] hi"))
    assert first.choices[0].message.content == "Echo: hi"
    after_tool = [*user("[fault-step:2] [fault:429] hi"),
                  {"role": "assistant", "content": None, "tool_calls": [
                      {"id": "call_1", "type": "function", "function": {"name": "t", "arguments": "{}"}}]},
                  {"role": "tool", "tool_call_id": "call_1", "content": "42"}]
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="m", messages=after_tool)


def test_it_cuts_a_response_body(client: openai.OpenAI) -> None:
    with pytest.raises(openai.APIConnectionError):
        client.chat.completions.create(model="m-fault-cut", messages=user("hi"))


def test_it_spaces_stream_chunks_with_gap(client: openai.OpenAI) -> None:
    started = time.monotonic()
    chunks = list(client.chat.completions.create(model="m", messages=user("[tokens:3] [gap:40]"), stream=True))

    # role + 3 tokens + finish + [DONE] = 5 gaps of 40 ms.
    assert len(chunks) == 5
    assert time.monotonic() - started >= 0.19


def test_it_counts_requests_in_stats(server: FakeOpenAIServer, client: openai.OpenAI) -> None:
    server.reset()
    client.chat.completions.create(model="a", messages=user("hi"))
    client.chat.completions.create(model="a", messages=user("hi"))
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="b-fault-429", messages=user("hi"))
    list(client.chat.completions.create(model="c", messages=user("hi"), stream=True))

    over_http = httpx.get(f"{server.url}/_stats").json()
    assert server.stats() == over_http == {"requests": 4, "by_model": {"a": 2, "b-fault-429": 1, "c": 1}}
    assert httpx.post(f"{server.url}/_reset").status_code == 200
    assert server.stats() == {"requests": 0, "by_model": {}}


def test_it_lists_models_and_answers_health(server: FakeOpenAIServer, client: openai.OpenAI) -> None:
    models = client.models.list()

    assert "fake-model" in [m.id for m in models.data]
    health = httpx.get(f"{server.url}/health")
    assert (health.status_code, health.json()) == (200, {"status": "ok"})


def test_it_returns_openai_shaped_errors(server: FakeOpenAIServer) -> None:
    with httpx.Client(base_url=server.url) as http:
        missing = http.post("/v1/nope", json={})
        malformed = http.post(
            "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
        )
        no_messages = http.post("/v1/chat/completions", json={"model": "m"})

    for response, status in [(missing, 404), (malformed, 400), (no_messages, 400)]:
        assert response.status_code == status
        error = response.json()["error"]
        assert set(error) >= {"message", "type", "code"}
        assert error["type"] == "invalid_request_error"


def test_it_reads_chunked_bodies_from_httpx(server: FakeOpenAIServer) -> None:
    body = json.dumps({"model": "m", "messages": user("chunked body")}).encode()

    def pieces() -> Iterator[bytes]:  # an iterator body makes httpx send Transfer-Encoding: chunked
        yield body[:10]
        yield body[10:]

    response = httpx.post(f"{server.base_url}/chat/completions", content=pieces())

    assert response.json()["choices"][0]["message"]["content"] == "Echo: chunked body"


def test_it_keeps_the_connection_alive_across_requests(server: FakeOpenAIServer) -> None:
    plain = json.dumps({"model": "m", "messages": user("one")}).encode()
    streamed = json.dumps({"model": "m", "messages": user("two"), "stream": True}).encode()
    chunked = json.dumps({"model": "m", "messages": user("three")}).encode()
    requests = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%b" % (len(plain), plain)
        + b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%b" % (len(streamed), streamed)
        + b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"%x\r\n%b\r\n%x\r\n%b\r\n0\r\n\r\n" % (5, chunked[:5], len(chunked) - 5, chunked[5:])
        + b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )

    # Pipelined on one socket: every answer must come back on it, in order, then EOF.
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(requests)
        received = b""
        while data := sock.recv(65536):
            received += data

    assert received.count(b"HTTP/1.1 200 OK") == 4
    markers = [b"Echo: one", b'"content":"two"', b"data: [DONE]", b"Echo: three", b'{"status":"ok"}']
    positions = [received.index(marker) for marker in markers]
    assert positions == sorted(positions)
    assert received.endswith(b'{"status":"ok"}')


def test_it_stops_while_a_request_hangs() -> None:
    fake = FakeOpenAIServer().start()
    http = httpx.Client(timeout=10)
    try:
        with pytest.raises(httpx.HTTPError):
            # Hangs until stop() closes the connection from a timer thread.
            threading.Timer(0.3, fake.stop).start()
            http.post(f"{fake.base_url}/chat/completions", json={"model": "fault-hang", "messages": user("x")})
    finally:
        http.close()
        fake.stop()


def test_it_runs_from_the_command_line() -> None:
    command = [sys.executable, "-m", "agentplatform.testing.fake_openai", "--port", "0", "--tokens", "4"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as process:
        try:
            assert process.stdout is not None
            line = process.stdout.readline().strip()
            assert line.startswith("fake-openai listening on http://127.0.0.1:")
            base_url = line.rsplit(" ", 1)[1]
            with openai.OpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=5) as sdk:
                completion = sdk.chat.completions.create(model="m", messages=user("ignored"))
            assert completion.choices[0].message.content == "w1 w2 w3 w4"
        finally:
            process.terminate()
        # SIGTERM is a clean shutdown, not a crash.
        assert process.wait(timeout=10) == 0
