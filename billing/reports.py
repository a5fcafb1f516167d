"""Budgets against their spend, for the cost dashboard and `manage.py budget_report`.

A budget's row: its current period (UTC), limit, spent and reserved (the BudgetSpend row the
pipeline settles into, so what the budget enforces), remaining, % used (spent / limit) and the
projected end-of-period spend, linear: spent / the elapsed fraction of the period (none for
`total` budgets, which have no end). Its burn-down: the cumulative spend of the usage records in
the budget's scope per day of the period (per hour for daily budgets), with the limit and the
projection line.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from datetime import timezone as dt_timezone
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, Iterable, Mapping, Sequence

from django.db.models import Sum
from django.db.models.functions import TruncHour
from django.utils import timezone

from .budgets import TOTAL_EPOCH, budget_status, current_spends, period_end, period_start
from .models import Budget, UsageRecord
from .rollups import METRICS, UsagePlan, UsageQuery, usage_plan

EIGHT_PLACES = Decimal("0.00000001")


def money(value: Decimal | int | None) -> str:
    """A USD amount as the API writes it: a decimal string with 8 places."""
    return format(Decimal(value or 0).quantize(EIGHT_PLACES, rounding=ROUND_HALF_UP), "f")


def percent(value: Decimal | None) -> str | None:
    return None if value is None else format(value.quantize(Decimal("0.1"), rounding=ROUND_HALF_UP), "f")


def csv_safe(value: Any) -> Any:
    """A cell a spreadsheet will not run as a formula (names are free text)."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def to_csv(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow([csv_safe(v) for v in row])
    return out.getvalue()


class Plans(dict):
    """The usage queries of one report (a dashboard page, a budget_report run): plans by
    (start, end), which days' rollups were checked, and the raw parts read, so that the budgets
    and the page's range, which overlap, count each day's records and read today's once."""

    def __init__(self) -> None:
        super().__init__()
        self.checked: dict = {}
        self.raw: dict = {}

    def query(self, start: datetime, end: datetime, filters: Mapping[str, Any]) -> UsageQuery:
        plan: UsagePlan | None = self.get((start, end))
        if plan is None:
            plan = self[(start, end)] = usage_plan(start, end, checked=self.checked)
        return UsageQuery(start=start, end=end, filters=filters, plan=plan, raw_cache=self.raw)


@dataclass
class BudgetRow:
    budget: Budget
    period_start: datetime
    period_end: datetime | None
    now: datetime
    spent_usd: Decimal
    reserved_usd: Decimal
    remaining_usd: Decimal
    groups: list[dict] = field(default_factory=list)

    @property
    def limit_usd(self) -> Decimal:
        return self.budget.limit_usd

    @property
    def label(self) -> str:
        return self.budget.name or describe(self.budget)

    @property
    def last_day(self) -> date | None:
        """The period's last day (UTC), included: period_end is exclusive, the midnight after it."""
        return None if self.period_end is None else (self.period_end - timedelta(days=1)).date()

    @property
    def elapsed(self) -> float | None:
        """Fraction of the period gone by (None for `total`)."""
        if self.period_end is None:
            return None
        span = (self.period_end - self.period_start).total_seconds()
        return min(max((self.now - self.period_start).total_seconds() / span, 0.0), 1.0)

    @property
    def used_pct(self) -> Decimal | None:
        if self.limit_usd <= 0:
            return None
        return self.spent_usd * 100 / self.limit_usd

    @property
    def projected_usd(self) -> Decimal | None:
        """Linear: spent / elapsed fraction of the period."""
        elapsed = self.elapsed
        if not elapsed:
            return None
        return (self.spent_usd / Decimal(repr(elapsed))).quantize(EIGHT_PLACES, rounding=ROUND_HALF_UP)

    @property
    def projected_pct(self) -> Decimal | None:
        projected = self.projected_usd
        if projected is None or self.limit_usd <= 0:
            return None
        return projected * 100 / self.limit_usd

    @property
    def status(self) -> str:
        """exceeded (spent reached the limit), at_risk (the projection passes it), ok."""
        if self.limit_usd <= 0 or self.spent_usd >= self.limit_usd:
            return "exceeded"
        projected = self.projected_usd
        if projected is not None and projected > self.limit_usd:
            return "at_risk"
        return "ok"

    def as_dict(self) -> dict:
        b = self.budget
        return {
            "id": b.id, "budget": self.label, "name": b.name, "scope": b.scope,
            "agent": b.agent.name if b.agent_id else None, "key": b.api_key.prefix if b.api_key_id else None,
            "period": b.period, "hard": b.hard,
            "period_start": self.period_start.isoformat(),
            "period_end": self.period_end.isoformat() if self.period_end else None,
            "limit_usd": money(self.limit_usd), "spent_usd": money(self.spent_usd),
            "reserved_usd": money(self.reserved_usd), "remaining_usd": money(self.remaining_usd),
            "used_pct": percent(self.used_pct),
            "elapsed_pct": percent(Decimal(repr(self.elapsed * 100))) if self.elapsed is not None else None,
            "projected_usd": money(self.projected_usd) if self.projected_usd is not None else None,
            "projected_pct": percent(self.projected_pct), "status": self.status,
        }


def describe(budget: Budget) -> str:
    """'global', 'agent assistant', 'key ap3f9a', 'key ap3f9a × agent assistant'."""
    if budget.scope == Budget.Scope.GLOBAL:
        return "global"
    if budget.scope == Budget.Scope.AGENT:
        return f"agent {budget.agent.name if budget.agent_id else '?'}"
    key = budget.api_key.prefix if budget.api_key_id else "?"
    if budget.scope == Budget.Scope.KEY:
        return f"key {key}"
    return f"key {key} × agent {budget.agent.name if budget.agent_id else '?'}"


def budget_filters(budget: Budget) -> dict:
    """The usage a budget counts, as usage-query filters."""
    filters: dict = {}
    if budget.scope in (Budget.Scope.AGENT, Budget.Scope.KEY_AGENT):
        filters["agent_id"] = budget.agent_id
    if budget.scope in (Budget.Scope.KEY, Budget.Scope.KEY_AGENT):
        filters["key_id"] = budget.api_key_id
    return filters


def budget_rows(*, now: datetime | None = None, period: str | None = None) -> list[BudgetRow]:
    """Every enabled budget (of kind `period`, when given) in its current period."""
    now = now or timezone.now()
    budgets = Budget.objects.filter(enabled=True).select_related("agent", "api_key").order_by("scope", "id")
    if period:
        budgets = budgets.filter(period=period)
    budgets = list(budgets)
    spends = current_spends(budgets, now)
    rows = []
    for b in budgets:
        status = budget_status(b, spends.get(b.id))
        rows.append(BudgetRow(budget=b, period_start=period_start(b.period, now), period_end=period_end(b.period, now),
                              now=now, **status))
    return rows


def burndown(row: BudgetRow, *, plans: Plans, range_start: datetime | None = None,
             range_end: datetime | None = None) -> dict:
    """Points of the budget's period: labels, the cumulative spend at the end of each point (None
    for points still to come), the projection line (0 at the period start, the projected spend
    at its end) and the limit. Daily budgets get hourly points; `total` budgets show the
    dashboard's range (cumulative from their first usage)."""
    now = row.now
    today_end = _midnight(now.astimezone(dt_timezone.utc).date()) + timedelta(days=1)
    filters = budget_filters(row.budget)
    if row.budget.period == Budget.Period.DAY:
        edges = [row.period_start + timedelta(hours=h) for h in range(25)]
        spend = _hourly(row.period_start, min(now, row.period_end), filters)
        labels = [f"{e:%H:00}" for e in edges[1:]]
        steps = [spend.get(e, Decimal("0")) for e in edges[:-1]]
    else:
        if row.period_end is None:
            start = range_start or today_end - timedelta(days=30)
            stop = min(range_end or today_end, today_end)
            base = plans.query(TOTAL_EPOCH, start, filters).summary()["total"]["cost_usd"] if start > TOTAL_EPOCH \
                else Decimal("0")
            last = range_end or today_end
        else:
            # Through the end of today (no record is dated later): today's raw part is the
            # same interval as the page's, read once.
            stop = min(today_end, row.period_end)
            start, last, base = row.period_start, row.period_end, Decimal("0")
        groups = plans.query(start, stop, filters).summary("day")["groups"] if stop > start else []
        by_day = {g["day"]: g["cost_usd"] for g in groups}
        edges = [start + timedelta(days=d) for d in range((last - start).days + 1)]
        labels = [e.date().isoformat() for e in edges[:-1]]
        steps = [by_day.get(e.date().isoformat(), Decimal("0")) for e in edges[:-1]]
        if steps:
            steps[0] += base
    cumulative: list[str | None] = []
    running = Decimal("0")
    for left, step in zip(edges[:-1], steps):
        running += step
        cumulative.append(money(running) if left <= now else None)
    projection: list[str] | None = None
    projected = row.projected_usd
    if projected is not None:
        span = (row.period_end - row.period_start).total_seconds()
        projection = [money(projected * Decimal(repr((e - row.period_start).total_seconds() / span)))
                      for e in edges[1:]]
    return {"labels": labels, "cumulative": cumulative, "projection": projection, "limit": money(row.limit_usd),
            "unit": "hour" if row.budget.period == Budget.Period.DAY else "day"}


def _midnight(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=dt_timezone.utc)


def _hourly(start: datetime, end: datetime, filters: Mapping[str, Any]) -> dict[datetime, Decimal]:
    """Spend per hour of one day, straight from the usage records (one day: a short index range)."""
    records = UsageRecord.objects.filter(created_at__gte=start, created_at__lt=end).order_by()
    if filters.get("agent_id") is not None:
        records = records.filter(agent_id=filters["agent_id"])
    if filters.get("key_id") is not None:
        records = records.filter(api_key_id=filters["key_id"])
    rows = records.annotate(hour=TruncHour("created_at", tzinfo=dt_timezone.utc)).values("hour").annotate(
        cost=Sum("cost_usd"))
    return {row["hour"]: row["cost"] or Decimal("0") for row in rows}


def metrics_of(row: Mapping[str, Any]) -> dict:
    """A usage group's metrics as the API writes them (cost as a decimal string)."""
    return {m: (money(row[m]) if m == "cost_usd" else row[m]) for m in METRICS}
