"""Property: whatever body or frame a client sends to any of the four chat transports, it gets
either a 4xx JSON error before the model is called (nothing stored, no usage), or an answer
whose run, usage record and audit entry are stored. Never a 500, never a free answer."""

from __future__ import annotations

import asyncio
import json

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from agents.models import Run
from billing.models import UsageRecord
from conftest import Api, parse_sse
from test_chat_input import ws_turn
from governance.models import AuditLog

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

ODD_TEXT = st.sampled_from(["\ud800", "\udfff x", "a\x00b", "é" * 3, "", " ", "What is 6 * 7?", "[tokens:2]",
                            "x" * 200, "\u202e", "{}", "NaN"])
TEXT = st.one_of(st.text(max_size=30), ODD_TEXT)
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                    st.floats(allow_nan=True, allow_infinity=True), TEXT)
JSON = st.recursive(SCALARS, lambda children: st.lists(children, max_size=4)
                    | st.dictionaries(TEXT, children, max_size=4), max_leaves=12)
PART = st.one_of(st.fixed_dictionaries({"type": st.just("text"), "text": st.one_of(TEXT, JSON)}), JSON)
CONTENT = st.one_of(TEXT, st.lists(PART, max_size=3), JSON)
MESSAGE = st.fixed_dictionaries({}, optional={"role": st.one_of(st.sampled_from(
    ["user", "system", "assistant", "developer", "tool", "bot"]), JSON), "content": CONTENT,
    "name": st.one_of(TEXT, JSON), "tool_call_id": st.one_of(TEXT, JSON), "tool_calls": JSON})
SESSION = st.one_of(st.none(), st.uuids().map(str), TEXT, JSON)


def body(transport: str):
    common = {"metadata": st.one_of(st.dictionaries(TEXT, JSON, max_size=3), JSON), "bogus": JSON}
    if transport in ("rest", "sse"):
        fields = {"message": CONTENT, "messages": st.one_of(st.lists(MESSAGE, max_size=3), JSON),
                  "session_id": SESSION, **common}
        required = {"stream": st.one_of(st.just(transport == "sse"), JSON)}
    elif transport == "openai":
        fields = {"messages": st.one_of(st.lists(MESSAGE, min_size=1, max_size=3), JSON),
                  "temperature": JSON, "max_tokens": JSON, "stream_options": JSON, "user": JSON,
                  "stream": st.booleans(), **common}
        required = {"model": st.one_of(st.just("demo"), JSON)}
    else:
        fields = {"content": CONTENT, "session_id": SESSION, "idempotency_key": st.one_of(TEXT, JSON), **common}
        required = {"type": st.one_of(st.just("message"), JSON)}
    return st.fixed_dictionaries(required, optional=fields)


def good(transport: str):
    """Bodies close to valid ones, so that answers are explored as much as refusals."""
    meta = st.dictionaries(st.text(max_size=5), SCALARS, max_size=2)
    if transport in ("rest", "sse"):
        return st.fixed_dictionaries({"message": TEXT, "stream": st.just(transport == "sse")},
                                     optional={"metadata": meta, "session_id": st.none()})
    if transport == "openai":
        return st.fixed_dictionaries({"model": st.just("demo"), "messages": st.lists(
            st.fixed_dictionaries({"role": st.just("user"), "content": CONTENT}), min_size=1, max_size=2)},
            optional={"metadata": meta, "stream": st.booleans(), "temperature": st.floats(0, 2)})
    parts = st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}), min_size=1, max_size=2)
    return st.fixed_dictionaries({"type": st.just("message"), "content": st.one_of(TEXT, parts)},
                                 optional={"metadata": meta})


def dumps(value) -> str:
    # allow_nan: the NaN/Infinity tokens Python's json writes and accepts, which we must not
    return json.dumps(value, allow_nan=True)


async def _http(transport: str, key: str, text: str) -> tuple[int, dict | None, str | None]:
    path = "/v1/chat/completions" if transport == "openai" else "/api/v1/agents/demo/chat"
    response = await Api(key).post(path, raw=text)
    assert response.status_code < 500, response.text[:500]
    if response.status_code != 200:
        assert response.headers["content-type"].startswith("application/json")
        error = response.json()["error"]
        assert error["code"] and error["message"] and "request_id" in error
        return response.status_code, error, None
    if response.headers["content-type"].startswith("text/event-stream"):
        if transport == "openai":
            chunks = [e["data"] for e in parse_sse(response.text) if e.get("data") not in (None, "", "[DONE]")]
            assert all("error" not in c for c in chunks), chunks
            return 200, None, "chatcmpl-" + chunks[0]["id"].split("-", 1)[1]
        events = [e["data"] for e in parse_sse(response.text) if e.get("event")]
        assert events[-1]["type"] == "done", events[-1]
        return 200, None, events[-1]["run_id"]
    answer = response.json()
    return 200, None, answer["id"]


async def _ws(key: str, text: str) -> tuple[int, dict | None, str | None]:
    status, frame = await ws_turn(key, text)
    if frame["type"] == "error":
        assert 400 <= status < 500, frame
        return status, frame, None
    return 200, None, frame["run_id"]


def _run_id(value: str) -> str:
    # An OpenAI completion id is chatcmpl-<run id hex>.
    import uuid

    return str(uuid.UUID(value.split("-", 1)[1])) if value.startswith("chatcmpl-") else value


@pytest.fixture
def demo_key(make_agent, make_key) -> str:
    make_agent(name="demo")
    return make_key(rate_limit_rpm=1_000_000, rate_limit_tpm=1_000_000_000)


@pytest.mark.parametrize("transport", ["rest", "sse", "openai", "websocket"])
def test_any_body_is_a_4xx_before_the_model_or_a_stored_and_metered_answer(demo_key, transport):
    outcomes: list[str] = []

    @settings(max_examples=60, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(st.one_of(body(transport), good(transport)))
    def check(value):
        text = dumps(value)
        runs_before, usage_before = Run.objects.count(), UsageRecord.objects.count()
        send = _ws(demo_key, text) if transport == "websocket" else _http(transport, demo_key, text)
        status, error, run_id = asyncio.run(send)
        event("refused" if error is not None else "answered")
        outcomes.append("refused" if error is not None else "answered")
        if error is not None:
            assert 400 <= status < 500
            assert (Run.objects.count(), UsageRecord.objects.count()) == (runs_before, usage_before), error
            return
        run_id = _run_id(run_id)
        run = Run.objects.get(pk=run_id)
        assert run.status == Run.Status.SUCCEEDED
        assert UsageRecord.objects.filter(run_id=run_id).exists()
        assert AuditLog.objects.filter(action="request.served", details__run_id=run_id).exists()

    check()
    # Both sides were explored: refusals and answers.
    assert outcomes.count("refused") >= 5 and outcomes.count("answered") >= 5, outcomes
