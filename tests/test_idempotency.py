"""Idempotency-Key: replays (JSON and SSE, byte for byte), 422 on another body, scoping per
API key, concurrent duplicates calling the model once (in one process and across two worker
processes), what is not stored, expiry and the purge, a client leaving mid-stream."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

import pytest
from django.utils import timezone

from agents.models import Run
from conftest import Api, assert_error, orm, parse_sse, post_and_hang_up
from governance.idempotency import idempotency_records_purge
from governance.models import ApiKey, IdempotencyRecord
from governance.tasks import idempotency_records_purge_task
from governance.services import split_key
from test_ratelimit import burst, start_workers  # noqa: F401  (a fixture)

pytestmark = pytest.mark.django_db(transaction=True)

CHAT = "/api/v1/agents/{}/chat"
COMPLETIONS = "/v1/chat/completions"


@pytest.fixture
def agents(make_agent):
    return {"demo": make_agent(name="demo"), "echo": make_agent(name="echo", model="openai/gpt-4o-mini")}


@pytest.fixture
def key(make_key) -> str:
    return make_key()


def idem(value: str = "key-1") -> dict:
    return {"Idempotency-Key": value}


async def records() -> list[IdempotencyRecord]:
    return await orm(lambda: list(IdempotencyRecord.objects.order_by("id")))


async def test_it_replays_a_json_answer(agents, key):
    api = Api(key)
    body = {"message": "hello once"}

    first = await api.post(CHAT.format("demo"), body, headers=idem())
    again = await api.post(CHAT.format("demo"), body, headers=idem())

    assert first.status_code == again.status_code == 200
    assert "Idempotent-Replayed" not in first.headers
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.content == first.content
    assert again.headers["content-type"] == first.headers["content-type"]
    assert await orm(Run.objects.count) == 1
    [record] = await records()
    assert record.state == "done" and record.status_code == 200
    assert record.expires_at - record.created_at == timedelta(hours=24)


async def test_it_replays_the_openai_endpoint(agents, key, openai_settings, fake_upstream):
    api = Api(key)
    body = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}

    first = await api.post(COMPLETIONS, body, headers=idem())
    again = await api.post(COMPLETIONS, body, headers=idem())

    assert first.status_code == 200
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json() == first.json()
    assert fake_upstream.stats()["requests"] == 1


@pytest.mark.parametrize("path, body", [
    (CHAT.format("echo"), {"message": "stream me [tokens:6]", "stream": True}),
    (COMPLETIONS, {"model": "echo", "stream": True, "stream_options": {"include_usage": True},
                   "messages": [{"role": "user", "content": "stream me [tokens:6]"}]}),
])
async def test_it_replays_a_stream_byte_for_byte(agents, key, openai_settings, fake_upstream, path, body):
    api = Api(key)

    first = await api.post(path, body, headers=idem())
    again = await api.post(path, body, headers=idem())

    assert first.status_code == again.status_code == 200
    assert again.headers["content-type"].startswith("text/event-stream")
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.headers["Cache-Control"] == "no-cache"
    assert again.content == first.content
    assert len([e for e in parse_sse(again.text) if "data" in e]) >= 6
    assert fake_upstream.stats()["requests"] == 1


async def test_it_refuses_the_same_key_with_another_body(agents, key):
    api = Api(key)
    assert (await api.post(CHAT.format("demo"), {"message": "one"}, headers=idem())).status_code == 200

    other = await api.post(CHAT.format("demo"), {"message": "two"}, headers=idem())
    other_path = await api.post(COMPLETIONS, {"model": "demo", "messages": [{"role": "user", "content": "one"}]},
                                headers=idem())

    assert_error(other, 422, "idempotency_key_reused")
    assert_error(other_path, 422, "idempotency_key_reused")
    assert await orm(Run.objects.count) == 1


async def test_it_scopes_keys_per_api_key(agents, make_key):
    one, two = await orm(make_key), await orm(make_key)
    body = {"message": "same words"}

    first = await Api(one).post(CHAT.format("demo"), body, headers=idem("shared"))
    second = await Api(two).post(CHAT.format("demo"), body, headers=idem("shared"))

    assert first.status_code == second.status_code == 200
    assert "Idempotent-Replayed" not in second.headers
    assert first.json()["id"] != second.json()["id"]
    assert await orm(Run.objects.count) == 2
    assert len(await records()) == 2


async def test_it_calls_the_model_once_for_concurrent_duplicates(agents, key, openai_settings, fake_upstream):
    api = Api(key)
    body = {"message": "slow one [latency:300]"}

    responses = await asyncio.gather(*(api.post(CHAT.format("echo"), body, headers=idem("dup")) for _ in range(5)))

    assert [r.status_code for r in responses] == [200] * 5
    assert fake_upstream.stats()["requests"] == 1
    assert len({r.content for r in responses}) == 1
    assert sorted(r.headers.get("Idempotent-Replayed", "") for r in responses) == ["", "true", "true", "true", "true"]
    assert await orm(Run.objects.count) == 1


async def test_it_answers_409_when_the_first_request_outlasts_the_wait(agents, key, openai_settings, fake_upstream,
                                                                      settings):
    settings.IDEMPOTENCY_WAIT_SECONDS = 0.3
    api = Api(key)
    body = {"message": "slow [latency:1200]"}

    first = asyncio.ensure_future(api.post(CHAT.format("echo"), body, headers=idem()))
    await asyncio.sleep(0.2)
    waiting = await api.post(CHAT.format("echo"), body, headers=idem())
    done = await first
    retried = await api.post(CHAT.format("echo"), body, headers=idem())

    error = assert_error(waiting, 409, "idempotency_in_progress")
    assert error["param"] == "Idempotency-Key"
    assert waiting.headers["Retry-After"] == "1"
    assert done.status_code == 200
    assert retried.headers["Idempotent-Replayed"] == "true" and retried.content == done.content
    assert fake_upstream.stats()["requests"] == 1


async def test_it_stores_no_failure_so_a_retry_can_succeed(agents, key, openai_settings, fake_upstream):
    openai_settings.CIRCUIT_FAILURE_THRESHOLD = 0  # these failures must reach the upstream every time
    api = Api(key)

    upstream_down = await api.post(CHAT.format("echo"), {"message": "x [fault:500]"}, headers=idem("a"))
    stream_refused = await api.post(CHAT.format("echo"), {"message": "x [fault:500]", "stream": True},
                                    headers=idem("b"))
    stream_cut = await api.post(CHAT.format("echo"), {"message": "x y z [fault:cut]", "stream": True},
                                headers=idem("e"))
    invalid = await api.post(CHAT.format("echo"), {"mesage": "typo"}, headers=idem("c"))
    unknown = await api.post(CHAT.format("nope"), {"message": "x"}, headers=idem("d"))

    assert upstream_down.status_code == 502
    assert stream_refused.status_code == 502  # failed before the model answered: no stream
    assert stream_cut.status_code == 200 and b"event: error" in stream_cut.content
    assert invalid.status_code == 400
    assert unknown.status_code == 404
    assert await records() == []
    retried = await api.post(CHAT.format("echo"), {"message": "x [fault:500]"}, headers=idem("a"))
    assert "Idempotent-Replayed" not in retried.headers


async def test_it_does_not_store_a_rate_limited_refusal(agents, key):
    await orm(lambda: ApiKey.objects.filter(prefix=split_key(key)).update(rate_limit_rpm=1))
    api = Api(key)
    assert (await api.post(CHAT.format("demo"), {"message": "first"})).status_code == 200

    refused = await api.post(CHAT.format("demo"), {"message": "second"}, headers=idem())

    assert_error(refused, 429, "rate_limited")
    assert await records() == []


async def test_it_validates_the_header(agents, key):
    api = Api(key)

    too_long = await api.post(CHAT.format("demo"), {"message": "x"}, headers=idem("k" * 256))
    empty = await api.post(CHAT.format("demo"), {"message": "x"}, headers=idem(""))
    longest = await api.post(CHAT.format("demo"), {"message": "x"}, headers=idem("k" * 255))

    assert_error(too_long, 400, "invalid_idempotency_key", param="Idempotency-Key")
    assert_error(empty, 400, "invalid_idempotency_key")
    assert longest.status_code == 200


async def test_it_expires_records_and_purges_them(agents, key):
    api = Api(key)
    body = {"message": "again tomorrow"}
    first = await api.post(CHAT.format("demo"), body, headers=idem())
    past = timezone.now() - timedelta(seconds=1)
    await orm(lambda: IdempotencyRecord.objects.update(expires_at=past))

    later = await api.post(CHAT.format("demo"), body, headers=idem())

    assert "Idempotent-Replayed" not in later.headers
    assert later.json()["id"] != first.json()["id"]
    [record] = await records()
    assert record.expires_at > timezone.now()
    assert await orm(idempotency_records_purge) == 0
    assert await orm(idempotency_records_purge, now=timezone.now() + timedelta(days=2)) == 1
    assert await records() == []


async def test_it_purges_expired_records_from_the_beat_task(agents, key):
    api = Api(key)
    await api.post(CHAT.format("demo"), {"message": "old"}, headers=idem())
    await orm(lambda: IdempotencyRecord.objects.update(expires_at=timezone.now() - timedelta(seconds=1)))

    # The task beat schedules (CELERY_BEAT_SCHEDULE), executed in this process.
    result = await orm(lambda: idempotency_records_purge_task.apply().get())

    assert result == 1
    assert await records() == []


async def test_it_releases_the_key_when_the_client_leaves_mid_stream(agents, key, openai_settings):
    """Drive the ASGI app by hand to hang up after the first chunk: httpx's ASGI transport
    always reads a body whole."""
    received = await post_and_hang_up(CHAT.format("echo"), {"message": "long [tokens:200] [gap:20]", "stream": True},
                                      key, headers={"Idempotency-Key": "leaving"}, leave_when=bool)
    assert received
    for _ in range(100):
        if not await records():
            break
        await asyncio.sleep(0.05)

    assert await records() == []
    retried = await Api(key).post(CHAT.format("echo"), {"message": "long [tokens:3]", "stream": True},
                                  headers=idem("leaving"))
    assert retried.status_code == 200 and "Idempotent-Replayed" not in retried.headers


@pytest.mark.redis
@pytest.mark.slow
async def test_it_calls_the_model_once_for_duplicates_on_two_workers(start_workers, fake_upstream):
    workers = start_workers(agents=[{"name": "echo", "model": "openai/gpt-4o-mini"}], keys=[{}])
    [key] = workers.keys

    for n, stream in enumerate((False, True)):
        fake_upstream.reset()
        body = {"model": "echo", "stream": stream, "messages": [{"role": "user", "content": "once [latency:300]"}]}
        responses = await burst(workers, key, 8, body=body, headers={"Idempotency-Key": f"mp-{n}"})

        assert [r.status_code for r in responses] == [200] * 8, workers.log_tail()
        assert fake_upstream.stats()["requests"] == 1
        assert len({r.content for r in responses}) == 1
        assert sum(r.headers.get("Idempotent-Replayed") == "true" for r in responses) == 7


def test_an_integrity_error_that_is_not_the_keys_is_raised_not_waited_out():
    """Only the (api_key, key) constraint means "in use": an insert refused for another reason
    (here: no such API key row) fails at once instead of waiting IDEMPOTENCY_WAIT_SECONDS for a
    record that will never appear."""
    from django.db import IntegrityError

    from governance.idempotency import _claim

    started = time.monotonic()
    with pytest.raises(IntegrityError):
        _claim(api_key_id=987_654_321, key="k-1", fingerprint="f")
    assert time.monotonic() - started < 5
