"""The OpenAI-compatible provider's own SSE parsing (agents/providers/openai_compat.py).

Streams come from the fake upstream where it can produce them, and from a tiny scripted HTTP
server for the wire-format variations it does not (CRLF and CR line ends, comments, multi-line
data, events split at every byte, error events inside a 200 stream, bad JSON)."""

from __future__ import annotations

import asyncio
import json

import pytest

from agents.providers.base import Completion, ModelCall, ProviderError, ProviderStreamCut, ProviderTimeout, TextDelta
from agents.providers.openai_compat import OpenAICompatibleProvider, SSEDecoder


def _call(text: str, **fields) -> ModelCall:
    return ModelCall(model=fields.pop("model", "fake-model"), messages=[{"role": "user", "content": text}], **fields)


async def _run(provider: OpenAICompatibleProvider, call: ModelCall) -> tuple[list[str], Completion]:
    deltas: list[str] = []
    completion = None
    async for part in provider.stream(call):
        if isinstance(part, TextDelta):
            deltas.append(part.content)
        else:
            completion = part
    assert completion is not None
    return deltas, completion


@pytest.fixture
async def fake_provider(fake_upstream):
    provider = OpenAICompatibleProvider("openai", api_key="sk-test", base_url=fake_upstream.base_url)
    yield provider
    await provider.aclose()


# --- against the fake upstream ------------------------------------------------------------------


async def test_it_streams_text_usage_and_finish_reason(fake_provider):
    deltas, completion = await _run(fake_provider, _call("[tokens:5]"))
    assert deltas == ["w1 ", "w2 ", "w3 ", "w4 ", "w5"]
    assert completion.content == "w1 w2 w3 w4 w5"
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (2, 5)
    assert completion.usage.reported
    assert completion.finish_reason == "stop" and completion.model == "fake-model"


async def test_it_reports_a_length_finish(fake_provider):
    _, completion = await _run(fake_provider, _call("[tokens:10]", max_tokens=3))
    assert completion.content == "w1 w2 w3" and completion.finish_reason == "length"


async def test_it_merges_streamed_parallel_tool_calls_by_index(fake_provider):
    tools = [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}} for n in ("a", "b")]
    deltas, completion = await _run(fake_provider, _call(
        '[call:a {"city": "Zürich", "note": "a long ] bracket"}] [call:b]', tools=tools))
    assert deltas == []
    assert completion.finish_reason == "tool_calls"
    assert [tc.name for tc in completion.tool_calls] == ["a", "b"]
    assert json.loads(completion.tool_calls[0].arguments) == {"city": "Zürich", "note": "a long ] bracket"}
    assert json.loads(completion.tool_calls[1].arguments) == {}
    assert all(tc.id.startswith("call_") for tc in completion.tool_calls)


@pytest.mark.parametrize(("fault", "code"), [
    ("429", "upstream_rate_limited"), ("500", "upstream_error"), ("401", "upstream_error"),
    ("cut", "upstream_stream_cut"),
])
async def test_it_maps_upstream_failures(fake_provider, fault, code):
    with pytest.raises(ProviderError) as caught:
        await _run(fake_provider, _call(f"[tokens:20] [fault:{fault}]"))
    assert caught.value.code == code
    if fault == "429":
        assert caught.value.retry_after == 1 and caught.value.headers == {"Retry-After": "1"}
        assert caught.value.http_status == 503
        assert caught.value.usage is None  # refused: it cost nothing
    if fault == "401":
        assert caught.value.permanent and caught.value.upstream_status == 401


@pytest.mark.parametrize("fault", ["cut", "cut-clean", "cut-event"])
@pytest.mark.parametrize("gap", [0, 5])
async def test_a_cut_stream_fails_after_its_first_deltas(fake_provider, fault, gap):
    """A connection closed mid-body, a body that ends without a finish chunk or [DONE], a last
    event cut off mid-JSON: each is an error, never an answer, and costs what it produced."""
    deltas: list[str] = []
    with pytest.raises(ProviderStreamCut) as caught:
        async for part in fake_provider.stream(_call(f"[tokens:20] [gap:{gap}] [fault:{fault}]")):
            deltas.append(part.content)
    assert deltas == ["w1 ", "w2 "]
    error = caught.value
    assert (error.code, error.http_status, error.permanent) == ("upstream_stream_cut", 502, False)
    assert not error.usage.reported and error.usage.completion_tokens == 2  # "w1 w2 ", estimated
    assert error.usage.prompt_tokens > 0


async def test_a_stream_cut_after_its_finish_reason_is_a_whole_answer(fake_provider):
    """Only the trailer (the usage chunk, [DONE]) is lost: the answer stands, its usage estimated
    (the openai SDK, too, accepts a stream that ends without [DONE])."""
    deltas, completion = await _run(fake_provider, _call("[tokens:5] [gap:5] [fault:cut-after-finish]"))
    assert deltas == ["w1 ", "w2 ", "w3 ", "w4 ", "w5"]
    assert completion.content == "w1 w2 w3 w4 w5" and completion.finish_reason == "stop"
    assert not completion.usage.reported and completion.usage.completion_tokens == 4


async def test_it_times_out_an_upstream_that_never_answers(fake_provider):
    with pytest.raises(ProviderTimeout):
        await _run(fake_provider, _call("[fault:hang]", timeout=0.3))


async def test_it_times_out_a_stream_that_goes_quiet(fake_provider):
    deltas: list[str] = []
    with pytest.raises(ProviderTimeout):
        async for part in fake_provider.stream(_call("[tokens:3] [gap:1000]", timeout=0.3)):
            deltas.append(part.content)
    assert deltas == []  # the headers and the role chunk came at once: the 1 s gap after them timed out


async def test_it_keeps_using_the_connection_pool_after_a_consumer_leaves(fake_provider, fake_upstream):
    fake_upstream.reset()
    stream = fake_provider.stream(_call("[tokens:200] [gap:20]"))
    assert isinstance(await anext(stream), TextDelta)
    await stream.aclose()
    _, completion = await _run(fake_provider, _call("[tokens:2]"))
    assert completion.content == "w1 w2"
    assert fake_upstream.stats()["requests"] == 2


# --- a scripted upstream for the wire format ------------------------------------------------------


def _chunk(content: str | None = None, *, finish: str | None = None, usage: dict | None = None) -> dict:
    delta = {} if content is None else {"content": content}
    chunk = {"id": "c1", "object": "chat.completion.chunk", "model": "scripted",
             "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    if usage is not None:
        chunk = {**chunk, "choices": [], "usage": usage}
    return chunk


def _event(payload: dict | str, newline: bytes = b"\n") -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return b"data: " + data.encode() + newline + newline


class Scripted:
    """An HTTP/1.1 server that answers every request with a 200 SSE body made of `pieces`,
    each written (and flushed) on its own, `gap` seconds apart; `forever` repeats the last
    piece until the client hangs up, which `hung_up` records."""

    def __init__(self) -> None:
        self.pieces: list[bytes] = []
        self.gap = 0.0
        self.forever = False
        self.requests: list[tuple[str, dict]] = []
        self.hung_up = asyncio.Event()
        self.server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length"))
        self.requests.append((head.decode("latin-1"), json.loads(await reader.readexactly(length))))
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n")
        try:
            for piece in self.pieces:
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(self.gap)
            while self.forever and not reader.at_eof():
                writer.write(self.pieces[-1])
                await writer.drain()
                await asyncio.sleep(self.gap)
            if self.forever:
                self.hung_up.set()
        except ConnectionError:
            self.hung_up.set()
        finally:
            writer.close()

    async def __aenter__(self) -> "Scripted":
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/v1"


@pytest.fixture
async def scripted():
    async with Scripted() as server:
        provider = OpenAICompatibleProvider("openai", api_key="sk-test", base_url=server.base_url)
        yield server, provider
        await provider.aclose()


USAGE = {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"], ids=["lf", "crlf", "cr"])
async def test_it_reads_any_line_ending_split_at_every_byte(scripted, newline):
    server, provider = scripted
    body = (b": keep-alive" + newline + newline + _event(_chunk("Grüß "), newline)
            + b"event: message" + newline + b"id: 3" + newline + b"retry: 10" + newline
            + _event(_chunk("dich"), newline) + b"data:" + newline + newline
            + _event(_chunk(finish="stop"), newline) + _event(_chunk(usage=USAGE), newline)
            + b"data: [DONE]" + newline + newline)
    server.pieces = [body[i:i + 1] for i in range(len(body))]  # "Grüß" split inside its UTF-8 bytes too
    deltas, completion = await _run(provider, _call("hi"))
    assert deltas == ["Grüß ", "dich"]
    assert completion.content == "Grüß dich" and completion.model == "scripted"
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (7, 2)


async def test_it_joins_multi_line_data(scripted):
    server, provider = scripted
    chunk = json.dumps(_chunk("one"), indent=1)  # JSON over several data: lines
    server.pieces = [b"".join(b"data: " + line.encode() + b"\n" for line in chunk.splitlines()) + b"\n",
                     b"data:" + json.dumps(_chunk(finish="stop")).encode() + b"\n\n"]  # no space after the colon
    deltas, completion = await _run(provider, _call("hi"))
    assert deltas == ["one"] and completion.finish_reason == "stop"
    assert not completion.usage.reported  # no usage chunk: estimated


async def test_it_sends_the_sdks_request(scripted):
    server, provider = scripted
    server.pieces = [b"data: [DONE]\n\n"]
    await _run(provider, _call("hi", temperature=0.5, max_tokens=9))
    head, body = server.requests[0]
    assert head.startswith("POST /v1/chat/completions HTTP/1.1\r\n")
    assert "authorization: bearer sk-test" in head.lower() and "x-stainless-lang" in head.lower()
    assert body == {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.5,
                    "max_tokens": 9, "stream": True, "stream_options": {"include_usage": True}}


async def test_it_stops_at_done_and_ignores_what_follows(scripted):
    server, provider = scripted
    server.pieces = [_event(_chunk("a")) + b"data: [DONE]\n\n" + _event(_chunk("after"))]
    deltas, completion = await _run(provider, _call("hi"))
    assert deltas == ["a"] and completion.content == "a"


async def test_it_raises_an_error_event_inside_a_200_stream(scripted):
    server, provider = scripted
    server.pieces = [_event(_chunk("partial ")),
                     _event({"error": {"message": "The server overloaded mid-stream.", "type": "server_error"}})]
    deltas: list[str] = []
    with pytest.raises(ProviderError) as caught:
        async for part in provider.stream(_call("hi")):
            deltas.append(part.content)
    assert deltas == ["partial "]
    assert caught.value.code == "upstream_error"
    assert "The server overloaded mid-stream." in caught.value.message


@pytest.mark.parametrize("payload", ["{not json", "[1, 2]", json.dumps({"choices": [{"delta": {"content": 5}}]})])
async def test_it_rejects_an_event_that_is_not_a_chunk(scripted, payload):
    server, provider = scripted
    server.pieces = [_event(payload)]
    with pytest.raises(ProviderError) as caught:
        await _run(provider, _call("hi"))
    assert caught.value.code == "upstream_bad_response"


async def test_a_stream_that_ends_without_finish_reason_or_done_is_cut(scripted):
    server, provider = scripted
    server.pieces = [_event(_chunk("x")) + b"data: " + json.dumps(_chunk("unfinished")).encode()]  # no blank line
    deltas: list[str] = []
    with pytest.raises(ProviderStreamCut) as caught:
        async for part in provider.stream(_call("hi")):
            deltas.append(part.content)
    assert deltas == ["x"]  # the unfinished event is dropped
    assert caught.value.code == "upstream_stream_cut" and caught.value.usage.completion_tokens == 1


@pytest.mark.parametrize("ending", [_event(_chunk(finish="stop")), b"data: [DONE]\n\n"], ids=["finish", "done"])
async def test_a_stream_with_a_finish_reason_or_done_is_whole(scripted, ending):
    server, provider = scripted
    server.pieces = [_event(_chunk("x")) + ending]  # then the connection closes
    deltas, completion = await _run(provider, _call("hi"))
    assert deltas == ["x"] and completion.content == "x" and completion.finish_reason == "stop"


async def test_a_consumer_that_stops_reading_hangs_up_on_the_upstream(scripted):
    server, provider = scripted
    server.pieces, server.gap, server.forever = [_event(_chunk("tick "))], 0.01, True
    stream = provider.stream(_call("hi"))
    assert (await anext(stream)).content == "tick "
    await stream.aclose()
    await asyncio.wait_for(server.hung_up.wait(), 5)


async def test_a_cancelled_consumer_hangs_up_on_the_upstream(scripted):
    server, provider = scripted
    server.pieces, server.gap, server.forever = [_event(_chunk("tick "))], 0.01, True
    got: list[str] = []

    async def consume() -> None:
        async for part in provider.stream(_call("hi")):
            got.append(part.content)

    task = asyncio.create_task(consume())
    while len(got) < 3:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(server.hung_up.wait(), 5)


# --- the decoder alone ----------------------------------------------------------------------------


def test_the_decoder_handles_a_crlf_split_between_reads():
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r") == []
    assert decoder.feed(b"\ndata: b\r") == []
    assert decoder.feed(b"\n\r") == [b"a\nb"]  # one event of two data lines, not two events
    assert decoder.feed(b"\n") == []


def test_the_decoder_skips_comments_other_fields_and_empty_data():
    decoder = SSEDecoder()
    assert decoder.feed(b":hb\n\nevent: ping\n\nid: 1\nretry: 5\n\ndata\n\ndata:  x\n\n") == [b" x"]
