"""Budget periods turning over (the hourly beat task): the new period's BudgetSpend rows, and
reservations stuck in past periods released.

A reservation is settled or released by the turn that made it (billing.budgets). A worker that
dies between reserve and settle leaves its `reserved_usd` behind; in the current period that
only lowers the room left until the period ends, but nothing will ever settle it. Once a past
period's row has not been touched for BUDGET_STALE_RESERVATION_SECONDS (longer than any turn
runs), what it still holds reserved belongs to no live turn: it is set to zero and audited
("budget.reservations_released"). A settlement arriving later still only lowers
reserved_usd to zero, never below.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from .budgets import budget_ledger_lock, current_period_q, period_start
from .models import Budget, BudgetSpend


@dataclass(frozen=True)
class Rollover:
    created: int
    released: int


def budget_period_rollover(*, now: datetime | None = None) -> Rollover:
    """Create the current period's spend row of every enabled budget; release stale reservations
    of past periods. Returns how many rows were created and released."""
    now = now or timezone.now()
    return Rollover(created=_create_current_rows(now), released=_release_stale(now))


def _create_current_rows(now: datetime) -> int:
    budgets = list(Budget.objects.filter(enabled=True).only("id", "period"))
    if not budgets:
        return 0
    starts = {b.id: period_start(b.period, now) for b in budgets}
    existing = set(BudgetSpend.objects.filter(current_period_q(budgets, now)).values_list("budget_id", flat=True))
    created = 0
    for budget_id, start in starts.items():
        if budget_id in existing:
            continue
        # One short transaction per row (autocommit): a multi-row insert could wait on a
        # reservation's concurrent insert of one row while holding another it wants.
        _, made = BudgetSpend.objects.get_or_create(budget_id=budget_id, period_start=start)
        created += made
    return created


def _release_stale(now: datetime) -> int:
    from governance.audit import audit_record

    cutoff = now - timedelta(seconds=settings.BUDGET_STALE_RESERVATION_SECONDS)
    candidates = BudgetSpend.objects.filter(reserved_usd__gt=0, updated_at__lt=cutoff).select_related("budget")
    stale = [row.id for row in candidates if row.period_start < period_start(row.budget.period, now)]
    if not stale:
        return 0
    with transaction.atomic():
        budget_ledger_lock()  # the order budget_settle takes: ledger, then budget rows by id
        rows = list(BudgetSpend.objects.select_for_update(of=("self",)).select_related("budget")
                    .filter(id__in=stale, reserved_usd__gt=0, updated_at__lt=cutoff).order_by("id"))
        released = []
        for row in rows:
            released.append({"budget_id": row.budget_id, "period": row.budget.period,
                             "period_start": row.period_start.isoformat(), "released_usd": str(row.reserved_usd)})
            row.reserved_usd = 0
            row.save(update_fields=["reserved_usd", "updated_at"])
        if released:
            audit_record(actor="system", action="budget.reservations_released", target="budgets",
                         details={"rows": released, "stale_after_seconds": settings.BUDGET_STALE_RESERVATION_SECONDS})
    return len(released)
