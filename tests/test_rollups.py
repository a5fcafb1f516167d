"""Daily usage rollups (billing.rollups): a day rebuilt as a whole, the days the beat task rolls
up, and usage_summary answering the same whether days are rolled up or not — including days
that got records after their rollup was built."""

from __future__ import annotations

import uuid
from collections import defaultdict
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from datetime import timezone as dt_timezone
from decimal import Decimal

import pytest
from django.utils import timezone

from agents.models import Agent, Run
from billing.models import UsageRecord, UsageRollup
from billing.rollups import rollup_day, rollup_pending_days, usage_plan, usage_summary
from governance.models import ApiKey
from governance.services import api_key_create

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("frozen_clock")]

UTC = dt_timezone.utc


def at(day: date, hour: int = 12, minute: int = 0, second: int = 0) -> datetime:
    return datetime.combine(day, time(hour, minute, second), tzinfo=UTC)


@dataclass
class World:
    today: date
    one: Agent
    two: Agent
    alice: ApiKey
    bob: ApiKey

    def day(self, offset: int) -> date:
        return self.today + timedelta(days=offset)

    def run(self, agent: Agent, key: ApiKey) -> Run:
        return Run.objects.create(agent=agent, api_key=key, transport=Run.Transport.REST,
                                  started_at=timezone.now(), status=Run.Status.SUCCEEDED)

    def record(self, when: datetime, agent: Agent | None, key: ApiKey | None, model: str, cost: str,
               run: Run | None = None, prompt: int = 100, completion: int = 10) -> UsageRecord:
        # As metering writes them: the run's first record (created first) starts it.
        starts_run = run is not None and not UsageRecord.objects.filter(run=run).exists()
        return UsageRecord.objects.create(created_at=when, agent=agent, api_key=key, model=model, run=run,
                                          prompt_tokens=prompt, completion_tokens=completion,
                                          cost_usd=Decimal(cost), request_id=str(uuid.uuid4()),
                                          starts_run=starts_run)


@pytest.fixture
def world(db) -> World:
    """Four UTC days of usage ending today: two agents, two keys, three models; a run that fell
    back to a second model, a run across midnight, a record without a run."""
    today = timezone.now().astimezone(UTC).date()
    one = Agent.objects.create(name="one", model="m/a")
    two = Agent.objects.create(name="two", model="m/b")
    alice, _ = api_key_create(name="alice", role="client")
    bob, _ = api_key_create(name="bob", role="client")
    w = World(today, one, two, alice, bob)

    r = w.run(one, alice)
    w.record(at(w.day(-3), 9), one, alice, "m/a", "0.0125", r, 1000, 200)
    w.record(at(w.day(-3), 9, 1), one, alice, "m/a", "0.0025", r, 300, 20)  # a tool-loop step
    fallback = w.run(one, bob)
    w.record(at(w.day(-3), 15), one, bob, "m/a", "0", fallback, 0, 0)  # failed before any output
    w.record(at(w.day(-3), 15, 0, 2), one, bob, "m/b", "0.5", fallback, 2000, 400)
    midnight = w.run(two, alice)
    w.record(at(w.day(-2), 23, 59, 59), two, alice, "m/c", "1.25", midnight, 5000, 600)
    w.record(at(w.day(-1), 0, 0, 1), two, alice, "m/c", "0.75", midnight, 5600, 300)
    for hour in (1, 5, 23):
        w.record(at(w.day(-1), hour), two, bob, "m/b", "0.1", w.run(two, bob), 400, 40)
    w.record(at(w.day(-1), 7), None, None, "m/a", "0.3")  # deleted agent and key, no run
    w.record(at(w.day(0), 0), one, alice, "m/a", "2", w.run(one, alice), 10, 10)
    return w


def expected(start: datetime, end: datetime, dims: tuple[str, ...] = (), **filters) -> dict:
    """The documented answer computed in Python from the records: sums, and requests = the runs
    whose first record (lowest id, over all of the run's records) is among those counted."""
    firsts: dict[int, int] = {}
    for record_id, run_id in UsageRecord.objects.filter(run__isnull=False).order_by("id").values_list("id", "run_id"):
        firsts.setdefault(run_id, record_id)
    groups: dict[tuple, dict] = defaultdict(lambda: {"requests": 0, "calls": 0, "prompt_tokens": 0,
                                                      "completion_tokens": 0, "cost_usd": Decimal("0")})
    for r in UsageRecord.objects.select_related("agent", "api_key").filter(created_at__gte=start,
                                                                            created_at__lt=end):
        values = {"day": r.created_at.astimezone(UTC).date().isoformat(),
                  "agent": r.agent.name if r.agent else None, "model": r.model,
                  "key": r.api_key.prefix if r.api_key else None}
        if any(values[name] != value for name, value in filters.items()):
            continue
        g = groups[tuple(values[d] for d in dims)]
        if r.run_id and firsts[r.run_id] == r.id:
            g["requests"] += 1
        g["calls"] += 1
        g["prompt_tokens"] += r.prompt_tokens
        g["completion_tokens"] += r.completion_tokens
        g["cost_usd"] += r.cost_usd
    out = []
    for key, g in groups.items():
        out.append({**dict(zip(dims, key)), **g})
    total = {"requests": sum(g["requests"] for g in out), "calls": sum(g["calls"] for g in out),
             "prompt_tokens": sum(g["prompt_tokens"] for g in out),
             "completion_tokens": sum(g["completion_tokens"] for g in out),
             "cost_usd": sum((g["cost_usd"] for g in out), Decimal("0"))}
    out.sort(key=lambda g: tuple((g[d] is None, g[d] or "") for d in dims))
    return {"total": total, "groups": out if dims else []}


GROUPINGS = [(), ("day",), ("agent",), ("model",), ("key",), ("key", "agent"), ("day", "model")]


def answers(w: World, start: datetime, end: datetime) -> list:
    filters = [{}, {"agent": "one"}, {"model": "m/b"}, {"key": w.bob.prefix}]
    return [(dims, f, usage_summary(start=start, end=end, group_by=dims, filters=f))
            for dims in GROUPINGS for f in filters]


def assert_exact(w: World, start: datetime, end: datetime) -> None:
    for dims, filters, answer in answers(w, start, end):
        assert answer == expected(start, end, dims, **filters), (dims, filters)


def test_it_answers_the_same_from_records_and_from_rollups(world):
    start, end = at(world.day(-3), 0), at(world.day(1), 0)
    before = answers(world, start, end)
    assert usage_plan(start, end).rolled == ()
    assert_exact(world, start, end)

    assert rollup_pending_days() == 3  # the three days before today
    plan = usage_plan(start, end)
    assert plan.rolled == ((world.day(-3), world.day(0)),)
    assert plan.raw == ((at(world.day(0), 0), end),)  # today from the records
    assert answers(world, start, end) == before
    assert_exact(world, start, end)

    total = usage_summary(start=start, end=end)["total"]
    assert total["cost_usd"] == Decimal("5.115") and total["calls"] == 11
    # Each run once: the fallback run under its first model, the run across midnight on its first day.
    assert total["requests"] == 7
    by_model = {g["model"]: g["requests"] for g in usage_summary(start=start, end=end, group_by="model")["groups"]}
    assert by_model == {"m/a": 3, "m/b": 3, "m/c": 1}
    by_day = [g["requests"] for g in usage_summary(start=start, end=end, group_by="day")["groups"]]
    assert by_day == [2, 1, 3, 1]


def test_a_rolled_up_day_is_one_row_per_agent_key_and_model(world):
    assert rollup_day(world.day(-3)) == 3
    rows = {(r.agent_id, r.api_key_id, r.model): r for r in UsageRollup.objects.filter(day=world.day(-3))}
    first = rows[(world.one.id, world.alice.id, "m/a")]
    assert (first.requests, first.calls, first.prompt_tokens, first.completion_tokens, first.cost_usd) == \
        (1, 2, 1300, 220, Decimal("0.0150"))
    # The fallback run started on m/a: its request is in that row, its m/b row has calls only.
    assert [(rows[(world.one.id, world.bob.id, m)].requests, rows[(world.one.id, world.bob.id, m)].calls)
            for m in ("m/a", "m/b")] == [(1, 1), (0, 1)]

    # Rebuilt as a whole: the same rows again, not twice as many.
    assert rollup_day(world.day(-3)) == 3
    assert UsageRollup.objects.filter(day=world.day(-3)).count() == 3
    assert rollup_day(world.day(-10)) == 0


def test_a_day_that_got_records_after_its_rollup_is_read_from_the_records(world):
    start, end = at(world.day(-3), 0), at(world.day(0), 0)
    rollup_pending_days()
    world.record(at(world.day(-2), 23, 59, 59, ), world.one, world.alice, "m/a", "0.04")  # a late write

    plan = usage_plan(start, end)
    assert plan.stale == (world.day(-2),)
    assert plan.rolled == ((world.day(-3), world.day(-2)), (world.day(-1), world.day(0)))
    assert_exact(world, start, end)

    # The beat task finds and rebuilds it; then every day is read from rollups again.
    assert rollup_pending_days() == 2  # yesterday, as always, and the stale day
    plan = usage_plan(start, end)
    assert plan.stale == () and plan.rolled == ((world.day(-3), world.day(0)),) and plan.raw == ()
    assert_exact(world, start, end)


def test_a_day_without_rollup_rows_is_read_from_the_records_and_rolled_up_later(world):
    rollup_pending_days()
    UsageRollup.objects.filter(day=world.day(-2)).delete()  # e.g. it had no usage when rolled up
    start, end = at(world.day(-3), 0), at(world.day(0), 0)
    assert usage_plan(start, end).raw == ((at(world.day(-2), 0), at(world.day(-1), 0)),)
    assert_exact(world, start, end)

    assert rollup_pending_days() == 2
    assert UsageRollup.objects.filter(day=world.day(-2)).count() == 1


def test_it_rolls_up_to_yesterday_and_always_yesterday_again(world):
    assert rollup_pending_days() == 3
    assert not UsageRollup.objects.filter(day=world.today).exists()
    assert rollup_pending_days() == 1  # yesterday: runs still writing at midnight
    # Two days later: yesterday (now the last rolled-up day), today and the day after.
    later = at(world.day(2), 0, 5)
    assert rollup_pending_days(now=later) == 3
    assert UsageRollup.objects.filter(day=world.today).count() == 1


def test_it_cuts_partial_days_at_the_edges(world):
    rollup_pending_days()
    start, end = at(world.day(-3), 12), at(world.day(-1), 3)
    plan = usage_plan(start, end)
    assert plan.rolled == ((world.day(-2), world.day(-1)),)
    assert plan.raw == ((start, at(world.day(-2), 0)), (at(world.day(-1), 0), end))
    assert_exact(world, start, end)


def test_filters_that_match_nothing_give_nothing(world):
    start, end = at(world.day(-3), 0), at(world.day(1), 0)
    rollup_pending_days()
    for filters in ({"agent": "nobody"}, {"key": "nokey"}, {"model": "m/zzz"},
                    {"key": world.alice.prefix, "key_id": world.bob.id}):
        answer = usage_summary(start=start, end=end, group_by="agent", filters=filters)
        assert answer["groups"] == [] and answer["total"]["calls"] == 0, filters
    own = usage_summary(start=start, end=end, filters={"key_id": world.bob.id})["total"]
    assert own == expected(start, end, key=world.bob.prefix)["total"]
    with pytest.raises(ValueError):
        usage_summary(start=start, end=end, group_by="week")


def test_the_migration_marks_each_runs_first_record_as_its_start(world):
    """billing/0004's backfill on existing records: one UPDATE sets starts_run on each run's
    lowest-id record, which gives back the same answers."""
    import importlib
    from types import SimpleNamespace

    from django.apps import apps
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    marked = set(UsageRecord.objects.filter(starts_run=True).values_list("id", flat=True))
    firsts: dict = {}
    for record_id, run_id in UsageRecord.objects.filter(run__isnull=False).order_by("id").values_list("id", "run_id"):
        firsts.setdefault(run_id, record_id)
    assert marked == set(firsts.values()) and len(marked) < UsageRecord.objects.filter(run__isnull=False).count()
    UsageRecord.objects.update(starts_run=False)

    migration = importlib.import_module("billing.migrations.0004_usagerecord_starts_run")
    with CaptureQueriesContext(connection) as queries:
        migration.mark_run_starts(apps, SimpleNamespace(connection=connection))
    assert len(queries) == 1 and queries[0]["sql"].upper().startswith("UPDATE")
    assert set(UsageRecord.objects.filter(starts_run=True).values_list("id", flat=True)) == marked
    assert_exact(world, at(world.day(-3), 0), at(world.day(1), 0))
