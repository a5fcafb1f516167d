"""A run that ends before any model answered (cancelled while the model is still silent, or
failed) is stored with the model it was calling, so the console and the admin can show it."""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager

import pytest
from channels.testing import WebsocketCommunicator

from agents.models import Run
from conftest import Api, assert_error, orm

pytestmark = pytest.mark.django_db(transaction=True)

PATH = "/ws/agents/{}/chat/"
# The fake upstream fails any request for a model whose name says so: `hang` never answers.
HANGING = "openai/fault-hang-model"
FAILING = "openai/fault-500-model"


@asynccontextmanager
async def ws(agent: str, key: str):
    from agentplatform.asgi import application

    communicator = WebsocketCommunicator(application, PATH.format(agent),
                                         headers=[(b"host", b"testserver"),
                                                  (b"authorization", f"Bearer {key}".encode())])
    assert (await communicator.connect(timeout=5))[0]
    try:
        assert (await communicator.receive_json_from(timeout=5))["type"] == "ready"
        yield communicator
    finally:
        await communicator.disconnect(timeout=10)


async def turn_frames(communicator) -> list[dict]:
    frames = []
    while not frames or frames[-1]["type"] not in ("done", "error"):
        frames.append(await communicator.receive_json_from(timeout=10))
    return frames


async def requested(fake_upstream, model: str) -> None:
    """Until the fake upstream has received a call for `model` (its name without the provider)."""
    deadline = time.monotonic() + 5
    while fake_upstream.stats()["by_model"].get(model.split("/", 1)[1], 0) < 1:
        assert time.monotonic() < deadline, fake_upstream.stats()
        await asyncio.sleep(0.01)


async def cancelled_run(agent: str, key: str, fake_upstream, in_flight: str) -> tuple[list[dict], Run]:
    async with ws(agent, key) as c:
        await c.send_json_to({"type": "message", "content": "hello?"})
        start = await c.receive_json_from(timeout=5)
        assert start["type"] == "start", start
        await requested(fake_upstream, in_flight)
        await c.send_json_to({"type": "cancel"})
        frames = await turn_frames(c)
    return frames, await orm(Run.objects.get, pk=start["run_id"])


async def test_a_run_cancelled_before_its_first_token_keeps_the_agents_model(make_agent, make_key,
                                                                             openai_settings, fake_upstream):
    await orm(make_agent, name="silent", model=HANGING)
    key = await orm(make_key)

    frames, run = await cancelled_run("silent", key, fake_upstream, HANGING)

    assert frames[-1]["type"] == "done" and frames[-1]["cancelled"] is True
    assert not [f for f in frames if f["type"] == "delta"]
    assert run.status == Run.Status.CANCELLED and run.completion_tokens == 0
    assert run.model == HANGING


async def test_a_run_cancelled_while_its_fallback_is_silent_keeps_the_fallback(make_agent, make_key,
                                                                               openai_settings, fake_upstream):
    await orm(make_agent, name="falling", model=FAILING, fallback_models=[HANGING])
    key = await orm(make_key)

    frames, run = await cancelled_run("falling", key, fake_upstream, HANGING)

    assert frames[-1]["type"] == "done" and frames[-1]["cancelled"] is True
    assert run.status == Run.Status.CANCELLED
    assert run.model == HANGING
    assert [(c["model"], c["ok"]) for c in run.metadata["calls"]] == [(FAILING, False)] * 3  # retried twice


async def test_a_run_whose_every_model_failed_keeps_the_last_one_called(make_agent, make_key, openai_settings):
    other = "openai/fault-502-other"
    await orm(make_agent, name="broken", model=FAILING, fallback_models=[other])
    key = await orm(make_key)

    response = await Api(key).post("/api/v1/agents/broken/chat", {"message": "hello"})

    assert_error(response, 502)
    run = await orm(Run.objects.get)
    assert run.status == Run.Status.FAILED and run.model == other
