"""Daily usage rollups, and the one usage query that reads them (the dashboard, budget_report,
GET /api/v1/usage).

    rollup_day(day)              rebuild that UTC day's UsageRollup rows from UsageRecord, as a
                                 whole, in one transaction
    rollup_pending_days(now)     the beat task's job: every day from the last rolled-up day up to
                                 yesterday, yesterday always, and any older day found stale
    usage_summary(start, end, group_by, filters)
                                 totals and groups over [start, end), always exact

A rollup row holds one (day, agent, key, model): calls (usage records), tokens, cost, and
`requests` = the runs that START in that row: a run counts once, in the row of its first usage
record (the one metering writes with starts_run=True: its lowest id; records without a run are
not requests). The same rule applies to the usage records read directly (SUM of starts_run, no
per-record lookup), so every metric is a plain sum and the answer never depends on which days
are rolled up: totals and groups by day, agent and key give distinct runs exactly (a run has one
agent and one key); grouped or filtered by model, a run that fell back to a second model counts
under the model it started on; a run across midnight counts on the day it started (and not at
all in a range that starts after its first record). The flag is written with the record and
never changes, so a record written late never changes which record starts its run: a rolled-up
day whose record count still matches (below) still has the right `requests`. Cost, tokens and
calls are exact sums in every grouping.

Which days come from rollups. A whole UTC day inside [start, end) is read from its rollup rows
only while they still account for every record of that day: the rows' `calls` must equal the
day's UsageRecord count. That is checked per query with one COUNT over the created_at index per
block of consecutive rolled-up days (index-only, no table rows read), narrowed down by halving
when it differs. So a record that arrives late (a run still writing at midnight, a backfill)
makes its day fall back to UsageRecord at once, and the day is exact again once rebuilt
(rollup_pending_days rebuilds every day it finds stale). Everything else is read from
UsageRecord: partial days at the edges of the range, today, days without rollup rows (including
days with no usage, which cost one index probe). Usage records are never deleted; a deletion
balanced by a late insert within one checked block would go unnoticed.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from datetime import timezone as dt_timezone
from decimal import Decimal
from typing import Any, Iterable, Mapping, Sequence

from django.db import connection, transaction
from django.db.models import Count, Max, Min, Q, Sum
from django.db.models.functions import Coalesce, TruncDate
from django.utils import timezone

from .models import UsageRecord, UsageRollup

logger = logging.getLogger("billing.rollups")

DIMENSIONS = ("day", "agent", "model", "key")
METRICS = ("requests", "calls", "prompt_tokens", "completion_tokens", "cost_usd")
ONE_DAY = timedelta(days=1)
# pg_advisory_xact_lock(class, day): one rebuild of a day at a time across workers (two
# concurrent delete + insert of the same day would leave both sets of rows on PostgreSQL).
_ROLLUP_LOCK_CLASS = 0x5255  # "RU"

# Columns of the fine grain (what a rollup row keys on) in each source.
_FINE = ("agent_id", "api_key_id", "model")


def _midnight(day: date) -> datetime:
    return datetime.combine(day, time.min, tzinfo=dt_timezone.utc)


def _utc_day(moment: datetime) -> date:
    return moment.astimezone(dt_timezone.utc).date()


def _days(first: date, end: date) -> Iterable[date]:
    """first, first + 1, ..., end - 1."""
    day = first
    while day < end:
        yield day
        day += ONE_DAY


def _record_sums() -> dict:
    return {
        "requests": Count("id", filter=Q(starts_run=True)),
        "calls": Count("id"),
        "prompt_tokens": Coalesce(Sum("prompt_tokens"), 0),
        "completion_tokens": Coalesce(Sum("completion_tokens"), 0),
        "cost_usd": Coalesce(Sum("cost_usd"), Decimal("0")),
    }


def _rollup_sums() -> dict:
    return {
        "requests": Coalesce(Sum("requests"), 0),
        "calls": Coalesce(Sum("calls"), 0),
        "prompt_tokens": Coalesce(Sum("prompt_tokens"), 0),
        "completion_tokens": Coalesce(Sum("completion_tokens"), 0),
        "cost_usd": Coalesce(Sum("cost_usd"), Decimal("0")),
    }


# --- building ---------------------------------------------------------------------------------


@transaction.atomic
def rollup_day(day: date) -> int:
    """Rebuild the UsageRollup rows of one UTC day from its usage records (delete + insert in one
    transaction, so readers see the old rows or the new ones). Returns the rows written."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s, %s)", [_ROLLUP_LOCK_CLASS, day.toordinal()])
    start = _midnight(day)
    rows = list(UsageRecord.objects.filter(created_at__gte=start, created_at__lt=start + ONE_DAY).order_by()
                .values(*_FINE).annotate(**_record_sums()))
    built = [UsageRollup(day=day, agent_id=row["agent_id"], api_key_id=row["api_key_id"], model=row["model"],
                         requests=row["requests"], calls=row["calls"], prompt_tokens=row["prompt_tokens"],
                         completion_tokens=row["completion_tokens"], cost_usd=row["cost_usd"])
             for row in rows]
    UsageRollup.objects.filter(day=day).delete()
    UsageRollup.objects.bulk_create(built, batch_size=500)
    return len(built)


def rollup_pending_days(now: datetime | None = None) -> int:
    """Roll up what is due; returns the number of days rebuilt. Days: from the last rolled-up
    day (or the oldest usage) up to yesterday; yesterday always (runs that were still writing at
    midnight); and any older day whose rollup no longer matches its records (late writes,
    backfills, a day that had no usage when it was rolled up). Today is never rolled up: queries
    read it from UsageRecord."""
    now = now or timezone.now()
    yesterday = _utc_day(now) - ONE_DAY
    last = UsageRollup.objects.aggregate(last=Max("day"))["last"]
    if last is None:
        oldest = UsageRecord.objects.aggregate(oldest=Min("created_at"))["oldest"]
        first = _utc_day(oldest) if oldest is not None else yesterday
    else:
        first = min(last, yesterday)
    due = set(_days(first, yesterday + ONE_DAY)) | {yesterday}
    earliest = UsageRollup.objects.aggregate(first=Min("day"))["first"]
    if earliest is not None and earliest < first:
        due.update(_stale_days(earliest, first, _calls_by_day(earliest, first)))
    for day in sorted(due):
        rows = rollup_day(day)
        logger.info("Rolled up usage of %s: %d rows", day, rows)
    return len(due)


# --- which days can be read from rollups --------------------------------------------------------


def _calls_by_day(first: date, end: date) -> dict[date, int]:
    rows = (UsageRollup.objects.filter(day__gte=first, day__lt=end).order_by()
            .values("day").annotate(calls=Sum("calls")))
    return {row["day"]: row["calls"] for row in rows}


def _record_count(first: date, end: date) -> int:
    return UsageRecord.objects.filter(created_at__gte=_midnight(first), created_at__lt=_midnight(end)).count()


def _stale_days(first: date, end: date, calls: Mapping[date, int]) -> list[date]:
    """Days in [first, end) whose records number differently from their rollup's calls: one
    COUNT for the whole block, halved where it differs (log2(days) counts per stale day)."""
    expected = sum(n for day, n in calls.items() if first <= day < end)
    if _record_count(first, end) == expected:
        return []
    if end - first == ONE_DAY:
        return [first]
    middle = first + timedelta(days=(end - first).days // 2)
    return _stale_days(first, middle, calls) + _stale_days(middle, end, calls)


@dataclass(frozen=True)
class UsagePlan:
    """Where the usage of [start, end) is read from: whole days from rollups (`rolled`, as
    [first, end) day blocks) and the rest from UsageRecord (`raw`, as datetime intervals)."""

    start: datetime
    end: datetime
    rolled: tuple[tuple[date, date], ...]
    raw: tuple[tuple[datetime, datetime], ...]
    stale: tuple[date, ...] = ()

    @property
    def rolled_days(self) -> int:
        return sum((end - first).days for first, end in self.rolled)


def _blocks(days: Iterable[date]) -> list[tuple[date, date]]:
    """Sorted days → maximal [first, end) runs of consecutive days."""
    blocks: list[list[date]] = []
    for day in sorted(days):
        if blocks and blocks[-1][1] == day:
            blocks[-1][1] = day + ONE_DAY
        else:
            blocks.append([day, day + ONE_DAY])
    return [(first, end) for first, end in blocks]


def usage_plan(start: datetime, end: datetime, *, checked: dict[date, bool] | None = None) -> UsagePlan:
    """Decide which days of [start, end) are read from rollups (see the module doc). `checked`
    (day → rollup still good) carries what earlier plans of the same report found, so that
    overlapping ranges (the dashboard's and its budgets' periods) count each day's records once;
    it is updated with this plan's findings."""
    checked = {} if checked is None else checked
    first_full = _utc_day(start) if start == _midnight(_utc_day(start)) else _utc_day(start) + ONE_DAY
    end_full = _utc_day(end)
    good: list[date] = []
    stale: list[date] = []
    if first_full < end_full:
        calls = _calls_by_day(first_full, end_full)
        unknown = [day for day in calls if day not in checked]
        for first, last in _blocks(unknown):
            bad = set(_stale_days(first, last, calls))
            checked.update((day, day not in bad) for day in _days(first, last))
        for day in sorted(calls):
            (good if checked[day] else stale).append(day)
    rolled = _blocks(good)
    raw: list[tuple[datetime, datetime]] = []
    cursor = start
    for first, last in rolled:
        if _midnight(first) > cursor:
            raw.append((cursor, _midnight(first)))
        cursor = _midnight(last)
    if cursor < end:
        raw.append((cursor, end))
    if stale:
        logger.info("Usage rollups of %s are stale; reading those days from usage records",
                    ", ".join(day.isoformat() for day in stale))
    return UsagePlan(start=start, end=end, rolled=tuple(rolled), raw=tuple(raw), stale=tuple(stale))


# --- the query ---------------------------------------------------------------------------------


def _empty() -> dict:
    return {"requests": 0, "calls": 0, "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": Decimal("0")}


def _add(into: dict, row: Mapping[str, Any]) -> None:
    for metric in METRICS:
        into[metric] += row[metric] or 0


@dataclass
class UsageQuery:
    """The usage of [start, end) under `filters`, answered from rollups for the whole rolled-up
    days the plan trusts and from UsageRecord for the rest. One query object serves several
    groupings (the dashboard's) with one plan and one read of the raw part.

    filters: agent (name), model, key (prefix), agent_id, key_id (ids; key_id also restricts a
    non-admin caller to its own key). Names that match nothing give empty results."""

    start: datetime
    end: datetime
    filters: Mapping[str, Any] = field(default_factory=dict)
    plan: UsagePlan | None = None
    # Raw parts already read by other queries of the same report: (interval, filters) → rows.
    raw_cache: dict | None = None

    def __post_init__(self) -> None:
        if self.plan is None:
            self.plan = usage_plan(self.start, self.end)
        self._raw_rows: list[dict] | None = None
        self._where = self._resolve(self.filters)

    @staticmethod
    def _resolve(filters: Mapping[str, Any]) -> dict | None:
        """Filters as id/column conditions valid on both tables; None: nothing can match."""
        from agents.models import Agent
        from governance.models import ApiKey

        where: dict[str, Any] = {}
        agent_ids = {filters["agent_id"]} if filters.get("agent_id") is not None else set()
        if filters.get("agent"):
            agent_ids.add(Agent.objects.filter(name=filters["agent"]).values_list("id", flat=True).first())
        key_ids = {filters["key_id"]} if filters.get("key_id") is not None else set()
        if filters.get("key"):
            key_ids.add(ApiKey.objects.filter(prefix=filters["key"]).values_list("id", flat=True).first())
        for column, ids in (("agent_id", agent_ids), ("api_key_id", key_ids)):
            if None in ids or len(ids) > 1:
                return None  # an unknown name, or two filters that contradict each other
            if ids:
                where[column] = ids.pop()
        if filters.get("model"):
            where["model"] = filters["model"]
        return where

    # The raw part at the rollup's grain: (day, agent_id, api_key_id, model) rows.
    def _raw(self) -> list[dict]:
        if self._raw_rows is None:
            self._raw_rows = []
            cache = self.raw_cache if self.raw_cache is not None else {}
            for lo, hi in self.plan.raw:
                key = (lo, hi, tuple(sorted(self._where.items())))
                if key not in cache:
                    cache[key] = self._read_raw(lo, hi)
                self._raw_rows.extend(cache[key])
        return self._raw_rows

    def _read_raw(self, lo: datetime, hi: datetime) -> list[dict]:
        records = UsageRecord.objects.filter(created_at__gte=lo, created_at__lt=hi, **self._where).order_by()
        if _utc_day(lo) == _utc_day(hi - timedelta(microseconds=1)):
            day = _utc_day(lo)
            return [{"day": day, **row} for row in records.values(*_FINE).annotate(**_record_sums())]
        return list(records.annotate(day=TruncDate("created_at", tzinfo=dt_timezone.utc))
                    .values("day", *_FINE).annotate(**_record_sums()))

    def summary(self, group_by: str | Sequence[str] | None = None) -> dict:
        """{"total": {requests, calls, prompt_tokens, completion_tokens, cost_usd (Decimal)},
        "groups": [{<dimension>: value, ..., same metrics}]} sorted by the group values. Group
        values: day → ISO date, agent → name, key → prefix, model → model (None when the agent
        or key was deleted)."""
        dims = _dimensions(group_by)
        if self._where is None:
            return {"total": _empty(), "groups": []}
        columns = [{"day": "day", "agent": "agent_id", "key": "api_key_id", "model": "model"}[d] for d in dims]
        merged: dict[tuple, dict] = defaultdict(_empty)
        if self.plan.rolled:
            in_blocks = Q()
            for first, end in self.plan.rolled:
                in_blocks |= Q(day__gte=first, day__lt=end)
            rows = (UsageRollup.objects.filter(in_blocks, **self._where).order_by()
                    .values(*columns).annotate(**_rollup_sums()))
            for row in rows:
                _add(merged[tuple(row[c] for c in columns)], row)
        for row in self._raw():
            _add(merged[tuple(row[c] for c in columns)], row)

        total = _empty()
        for metrics in merged.values():
            _add(total, metrics)
        labels = _labels(dims, merged)
        groups = []
        for key, metrics in merged.items():
            group = {dim: labels[dim](value) for dim, value in zip(dims, key)}
            groups.append({**group, **metrics})
        groups.sort(key=lambda g: tuple((g[d] is None, g[d] or "") for d in dims))
        return {"total": total, "groups": groups if dims else []}


def _dimensions(group_by: str | Sequence[str] | None) -> tuple[str, ...]:
    if not group_by:
        return ()
    dims = (group_by,) if isinstance(group_by, str) else tuple(group_by)
    unknown = [d for d in dims if d not in DIMENSIONS]
    if unknown or len(set(dims)) != len(dims):
        raise ValueError(f"group_by takes distinct dimensions among {', '.join(DIMENSIONS)}; got {group_by!r}")
    return dims


def _labels(dims: Sequence[str], merged: Mapping[tuple, dict]) -> dict:
    """Functions turning stored values into what callers show: ids → names and prefixes."""
    from agents.models import Agent
    from governance.models import ApiKey

    labels: dict = {"model": lambda v: v, "day": lambda v: v.isoformat() if v is not None else None}
    for dim, model, attr in (("agent", Agent, "name"), ("key", ApiKey, "prefix")):
        if dim in dims:
            position = dims.index(dim)
            ids = {key[position] for key in merged if key[position] is not None}
            names = dict(model.objects.filter(id__in=ids).values_list("id", attr)) if ids else {}
            labels[dim] = names.get
    return labels


def usage_summary(*, start: datetime, end: datetime, group_by: str | Sequence[str] | None = None,
                  filters: Mapping[str, Any] | None = None) -> dict:
    """Totals and groups of the usage in [start, end) (see UsageQuery.summary)."""
    return UsageQuery(start=start, end=end, filters=filters or {}).summary(group_by)
