"""Budgets that are never overspent: reserve the worst case before the model is called, settle
to the actual cost when the run is stored, release what a refused or lost turn reserved.

    before(turn)    the worst-case cost of the turn, when a budget applies (reads only);
    start(turn)     budget_reserve, inside the transaction that records the run as running (the
                    run row keeps the reservation, for agents.recovery's sweeper): the worst
                    case added to `reserved_usd` of every applicable budget's current period
                    (BudgetSpend row) — or 402 if a hard budget has no room for it, and then
                    nothing is reserved anywhere and no run is recorded.
    persist(turn)   budget_settle inside the run's transaction: reserved -= worst case,
                    spent += turn.cost_usd (set by the metering stage in `finished`).
    refused(turn)   a later stage refused the turn: budget_release (settle with 0 spent).
    after(turn)     the run's transaction did not commit the settlement (its write failed):
                    settle on its own, so no reservation is left behind.

Alerts. A settlement that moves a budget's spend across one of its alert thresholds (percent of
the limit) fires it in the same transaction (billing.alerts). The check compares the locked
row's spend before and after with the limit and thresholds the reservation read with the budgets
(Reservation.alert_limits): a settlement that crosses nothing costs no query and no join. Only
a crossing loads the budgets, and checks again against their current limit; what a limit changed
meanwhile hides, the beat task's scan (check_budget_alerts) fires within a minute.

Atomicity across workers: reserve and settle run in one transaction that locks the BudgetSpend
rows with SELECT ... FOR UPDATE (PostgreSQL; rows locked in id order, so two requests never
deadlock) or, on SQLite, in the IMMEDIATE transaction the settings configure (one writer at a
time). The check `spent + reserved + worst_case <= limit` and the reservation happen under that
lock, so any number of workers together never admit more than the limit can pay for.

Worst case of a turn: prompt tokens estimated as UTF-8 bytes / 4 (≥ the usual chars / 4, and an
upper bound for non-Latin text too) over the system prompt, the session history, the input and
the offered tools' schemas, plus a margin, × the input price; plus max_tokens × the output price;
the dearest of the agent's model and its fallbacks. A turn that offers tools may call the model
up to AGENT_MAX_STEPS times, each call paying the (growing) prompt again: it reserves that many
calls, each with the prompt grown by the previous calls' output.

Periods roll over at UTC boundaries: day (midnight), week (Monday), month (the 1st); `total`
has one period from a fixed epoch.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from datetime import timezone as dt_timezone
from decimal import ROUND_CEILING, Decimal
from typing import Any, Iterable

from django.conf import settings
from django.core.cache import cache
from django.db import DatabaseError, connection, transaction
from django.db.models import F, Q, QuerySet
from django.utils import timezone

from agentplatform.db import run_db, write_db
from agentplatform.errors import InvalidRequest, NotFound, PlatformError
from agentplatform.metrics import budget_settled

from .models import Budget, BudgetSpend

logger = logging.getLogger("billing.budgets")

CENT_FRACTION = Decimal("0.00000001")  # BudgetSpend's 8 decimal places
TOTAL_EPOCH = datetime(2000, 1, 1, tzinfo=dt_timezone.utc)
# Prompt estimate: bytes / 4, plus per message overhead (role, separators) and a fixed margin.
TOKENS_PER_MESSAGE = 4
PROMPT_MARGIN_TOKENS = 32
PROMPT_MARGIN_RATIO = Decimal("1.10")
# The enabled budgets, cached for the hot path; budget_create, budget_update and the admin drop
# the entry on commit, other changes take effect within this many seconds.
BUDGETS_CACHE_KEY = "billing:budgets"
BUDGETS_CACHE_SECONDS = 30
DEFAULT_ALERT_THRESHOLDS = [50, 75, 90, 100]
# PostgreSQL advisory lock key of the budget ledger ("budgetl" in ASCII): see budget_ledger_lock.
BUDGET_LEDGER_LOCK = 0x6275646765746C


class BudgetExceeded(PlatformError):
    http_status = 402
    code = "budget_exceeded"
    type = "budget_exceeded"
    message = "The budget has no room for this request."
    permanent = False


# --- periods ---------------------------------------------------------------------------------


def period_start(period: str, at: datetime) -> datetime:
    """Start (UTC) of the period of kind `period` that contains `at`."""
    at = at.astimezone(dt_timezone.utc)
    midnight = at.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == Budget.Period.DAY:
        return midnight
    if period == Budget.Period.WEEK:
        return midnight - timedelta(days=midnight.weekday())
    if period == Budget.Period.MONTH:
        return midnight.replace(day=1)
    if period == Budget.Period.TOTAL:
        return TOTAL_EPOCH
    raise ValueError(f"Unknown budget period {period!r}")


def period_end(period: str, at: datetime) -> datetime | None:
    """End (exclusive) of the period containing `at`; None for `total`."""
    start = period_start(period, at)
    if period == Budget.Period.DAY:
        return start + timedelta(days=1)
    if period == Budget.Period.WEEK:
        return start + timedelta(days=7)
    if period == Budget.Period.MONTH:
        return start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
    return None


# --- which budgets apply -------------------------------------------------------------------


def _enabled_budgets() -> list[dict]:
    rows = cache.get(BUDGETS_CACHE_KEY)
    if rows is None:
        rows = list(Budget.objects.filter(enabled=True).values("id", "scope", "api_key_id", "agent_id"))
        cache.set(BUDGETS_CACHE_KEY, rows, BUDGETS_CACHE_SECONDS)
    return rows


def _applies(row: dict, key_id: int | None, agent_id: int | None) -> bool:
    scope = row["scope"]
    if scope == Budget.Scope.GLOBAL:
        return True
    if scope == Budget.Scope.AGENT:
        return agent_id is not None and row["agent_id"] == agent_id
    if scope == Budget.Scope.KEY:
        return key_id is not None and row["api_key_id"] == key_id
    if scope == Budget.Scope.KEY_AGENT:
        return key_id is not None and row["api_key_id"] == key_id and row["agent_id"] == agent_id
    return False


def budgets_applying(*, key_id: int | None, agent_id: int | None) -> QuerySet[Budget]:
    """The enabled budgets that apply to calls of `agent_id` with `key_id` (read fresh)."""
    q = Q(scope=Budget.Scope.GLOBAL)
    if agent_id is not None:
        q |= Q(scope=Budget.Scope.AGENT, agent_id=agent_id)
    if key_id is not None:
        q |= Q(scope=Budget.Scope.KEY, api_key_id=key_id)
        if agent_id is not None:
            q |= Q(scope=Budget.Scope.KEY_AGENT, api_key_id=key_id, agent_id=agent_id)
    return Budget.objects.filter(q, enabled=True)



# --- worst case -------------------------------------------------------------------------------


def estimate_prompt_tokens(messages: Iterable[dict], tools: Iterable[Any] = ()) -> int:
    """An upper estimate of the prompt tokens: UTF-8 bytes / 4 rounded up, per message overhead,
    tool schemas, then a margin."""
    total = 0
    for m in messages:
        text = (m.get("content") or "") + (json.dumps(m["tool_calls"]) if m.get("tool_calls") else "")
        total += math.ceil(len(text.encode()) / 4) + TOKENS_PER_MESSAGE
    for tool in tools:
        schema = {"name": getattr(tool, "name", ""), "description": getattr(tool, "description", ""),
                  "parameters": getattr(tool, "parameters", {})}
        total += math.ceil(len(json.dumps(schema).encode()) / 4)
    return int((Decimal(total) * PROMPT_MARGIN_RATIO).to_integral_value(rounding=ROUND_CEILING)) + PROMPT_MARGIN_TOKENS


def worst_case_cost(*, models: Iterable[str], prompt_tokens: int, max_tokens: int, calls: int = 1,
                    at: datetime | None = None) -> Decimal:
    """The most `calls` model calls can cost: each call's prompt is the first one plus the output
    of the calls before it, each answers at most `max_tokens`; the dearest model counts."""
    from .pricing import call_cost, price_for

    at = at or timezone.now()
    worst = Decimal("0")
    for model in dict.fromkeys(models):
        price = price_for(model, at)
        cost = sum((call_cost(prompt_tokens + step * max_tokens, max_tokens, price) for step in range(calls)),
                   Decimal("0"))
        worst = max(worst, Decimal(cost))
    return worst.quantize(CENT_FRACTION, rounding=ROUND_CEILING)


# --- services ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reservation:
    spend_ids: tuple[int, ...]
    amount: Decimal
    # (spend row id, limit, alert thresholds) per budget, as read when reserving: settle checks
    # the thresholds without a query.
    alert_limits: tuple[tuple[int, Decimal, tuple[int, ...]], ...] = ()


def _describe(budget: Budget) -> str:
    if budget.scope == Budget.Scope.GLOBAL:
        owner = "global"
    elif budget.scope == Budget.Scope.AGENT:
        owner = f"agent {budget.agent.name!r}"
    elif budget.scope == Budget.Scope.KEY:
        owner = f"key {budget.api_key.prefix!r}"
    else:
        owner = f"key {budget.api_key.prefix!r} with agent {budget.agent.name!r}"
    return f"{budget.name + ' (' if budget.name else ''}{owner} {budget.period}{')' if budget.name else ''}"


def current_period_q(budgets: Iterable[Budget], now: datetime) -> Q:
    """Matches the rows (BudgetSpend, BudgetAlert) of each budget's period that contains `now`;
    no budgets match nothing."""
    q = Q(pk__in=[])
    for b in budgets:
        q |= Q(budget_id=b.id, period_start=period_start(b.period, now))
    return q


def current_spends(budgets: list[Budget], now: datetime) -> dict[int, BudgetSpend]:
    """Each budget's BudgetSpend row of its current period, by budget id (missing: nothing spent)."""
    if not budgets:
        return {}
    return {s.budget_id: s for s in BudgetSpend.objects.filter(current_period_q(budgets, now))}


def _locked_spends(budgets: list[Budget], now: datetime) -> dict[int, BudgetSpend]:
    """The current BudgetSpend row of each budget, created if needed, locked until the end of
    the caller's transaction."""
    for b in budgets:
        # get_or_create retries the get when a concurrent insert won (unique budget+period).
        BudgetSpend.objects.get_or_create(budget_id=b.id, period_start=period_start(b.period, now))
    rows = BudgetSpend.objects.select_for_update().filter(current_period_q(budgets, now)).order_by("id")
    return {row.budget_id: row for row in rows}


def budget_reserve(*, key_id: int | None, agent_id: int | None, amount: Decimal,
                   now: datetime | None = None) -> Reservation | None:
    """Reserve `amount` USD on every enabled budget that applies; None when none applies.
    Raises BudgetExceeded (and reserves nothing) when a hard budget has no room for it."""
    if not any(_applies(row, key_id, agent_id) for row in _enabled_budgets()):
        return None
    now = now or timezone.now()
    with transaction.atomic():
        budgets = list(budgets_applying(key_id=key_id, agent_id=agent_id).select_related("api_key", "agent"))
        if not budgets:
            return None
        spends = _locked_spends(budgets, now)
        for budget in budgets:
            if not budget.hard:
                continue
            spend = spends[budget.id]
            remaining = budget.limit_usd - spend.spent_usd - spend.reserved_usd
            if amount > remaining:
                remaining = max(remaining, Decimal("0"))
                raise BudgetExceeded(
                    f"The {_describe(budget)} budget has {remaining:.6f} USD left of {budget.limit_usd:.6f} USD; "
                    f"this request may cost up to {amount:.6f} USD.",
                    details={"budget_id": budget.id, "scope": budget.scope, "period": budget.period,
                             "limit_usd": str(budget.limit_usd), "remaining_usd": str(remaining),
                             "required_usd": str(amount)})
        ids = tuple(spend.id for spend in spends.values())
        BudgetSpend.objects.filter(id__in=ids).update(reserved_usd=F("reserved_usd") + amount, updated_at=now)
    limits = tuple((spends[b.id].id, b.limit_usd, tuple(alert_thresholds_of(b))) for b in budgets)
    return Reservation(spend_ids=ids, amount=amount, alert_limits=limits)


def budget_ledger_lock() -> None:
    """Take the budget ledger's lock for the rest of the transaction (PostgreSQL; SQLite's
    IMMEDIATE transactions already serialize writers). Every transaction that changes spend rows
    of several budgets together takes it before the first row: settlements, the rollover's
    release, the alert scan's firing.

    Why: settlements run inside write_db's group commit, several turns' settlements in one
    transaction, each locking its budgets' rows (by id). Two workers' batches that lock rows 3
    then 5 and 5 then 3 (turns in another order) deadlock. The lock makes batches that settle
    take their rows one batch after the other; they wait no longer than they would anyway for a
    row both touch (a global budget's row is in every settlement). Batches without budgets never
    take it. (Until the audit chain was sequenced off the request path, the chain's lock, held
    by every audited transaction, gave this order.)"""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [BUDGET_LEDGER_LOCK])


def budget_settle(*, reservation: Reservation, actual_usd: Decimal | None) -> None:
    """Turn a reservation into spend: reserved -= the reservation, spent += the actual cost."""
    actual = Decimal(actual_usd or 0).quantize(CENT_FRACTION, rounding=ROUND_CEILING)
    with transaction.atomic():
        # Lock order: the ledger, then budget rows by id (budget_ledger_lock). Reservations lock
        # only budget rows and wait for nothing else while holding them.
        budget_ledger_lock()
        rows = list(BudgetSpend.objects.select_for_update().filter(id__in=reservation.spend_ids).order_by("id"))
        limits = {spend_id: (limit, thresholds) for spend_id, limit, thresholds in reservation.alert_limits}
        crossed = []
        for row in rows:
            spent_before = row.spent_usd
            # Never below zero, whatever a bad hand edit did to the row meanwhile.
            row.reserved_usd = max(row.reserved_usd - reservation.amount, Decimal("0"))
            row.spent_usd = row.spent_usd + actual
            row.save(update_fields=["reserved_usd", "spent_usd", "updated_at"])
            known = limits.get(row.id)
            if known:
                budget_settled(budget_id=row.budget_id, spent=row.spent_usd, limit=known[0])
            if actual > 0 and known and thresholds_crossed(*known, spent_before, row.spent_usd):
                crossed.append((row, spent_before))
        if crossed:
            # Rare (a few times per budget and period): only then does alerting touch the database.
            from .alerts import alerts_fire_on_settlement

            alerts_fire_on_settlement(crossed)


def alert_thresholds_of(budget: Budget) -> list[int]:
    """The budget's alert thresholds (percent, ascending); empty or malformed: the defaults."""
    raw = budget.alert_thresholds
    if isinstance(raw, list):
        valid = sorted({t for t in raw if isinstance(t, int) and not isinstance(t, bool) and 0 < t <= 1000})
        if valid:
            return valid
    return DEFAULT_ALERT_THRESHOLDS


def thresholds_reached(limit: Decimal, thresholds: Iterable[int], spent: Decimal) -> list[int]:
    """The thresholds (percent of `limit`) a spend of `spent` has reached; none before any spend."""
    if spent <= 0:
        return []
    return [t for t in thresholds if spent * 100 >= limit * t]


def thresholds_crossed(limit: Decimal, thresholds: Iterable[int], before: Decimal, after: Decimal) -> list[int]:
    """The thresholds reached at `after` but not at `before` (no I/O: the settle path's check)."""
    reached_before = set(thresholds_reached(limit, thresholds, before))
    return [t for t in thresholds_reached(limit, thresholds, after) if t not in reached_before]


def budget_release(*, reservation: Reservation) -> None:
    """Give a reservation back unspent (the turn never ran)."""
    budget_settle(reservation=reservation, actual_usd=Decimal("0"))


@transaction.atomic
def budget_create(*, scope: str, period: str, limit_usd: Decimal, hard: bool = True, key_prefix: str | None = None,
                  agent_name: str | None = None, alert_thresholds: list[int] | None = None, name: str = "",
                  alert_emails: list[str] | None = None, alert_webhook_url: str = "",
                  actor: str = "system", request_id: str = "", client_ip: str | None = None) -> Budget:
    """Create a budget; key/agent must match the scope (both for key_agent, neither for global).
    Alerts go to `alert_emails` / `alert_webhook_url`, else to the BUDGET_ALERT_* settings."""
    from agents.models import Agent
    from governance.audit import audit_record
    from governance.models import ApiKey

    if scope not in Budget.Scope.values:
        raise InvalidRequest(f"scope must be one of {', '.join(Budget.Scope.values)}.", param="scope")
    if period not in Budget.Period.values:
        raise InvalidRequest(f"period must be one of {', '.join(Budget.Period.values)}.", param="period")
    if limit_usd < 0:
        raise InvalidRequest("limit_usd must not be negative.", param="limit_usd")
    needs_key = scope in (Budget.Scope.KEY, Budget.Scope.KEY_AGENT)
    needs_agent = scope in (Budget.Scope.AGENT, Budget.Scope.KEY_AGENT)
    for field, needed, value in (("key", needs_key, key_prefix), ("agent", needs_agent, agent_name)):
        if needed and not value:
            raise InvalidRequest(f"A {scope} budget needs `{field}`.", param=field)
        if not needed and value:
            raise InvalidRequest(f"A {scope} budget takes no `{field}`.", param=field)
    api_key = agent = None
    if needs_key:
        api_key = ApiKey.objects.filter(prefix=key_prefix).first()
        if api_key is None:
            raise NotFound(f"No API key with prefix {key_prefix!r}.", code="api_key_not_found", param="key")
    if needs_agent:
        agent = Agent.objects.filter(name=agent_name).first()
        if agent is None:
            raise NotFound(f"No agent named {agent_name!r}.", code="agent_not_found", param="agent")
    thresholds = DEFAULT_ALERT_THRESHOLDS if alert_thresholds is None else _checked_thresholds(alert_thresholds)
    emails = _checked_emails(alert_emails)
    _check_webhook_url(alert_webhook_url)
    alert_emails_text = ", ".join(emails)
    budget = Budget.objects.create(name=name, scope=scope, period=period, limit_usd=limit_usd, hard=hard,
                                   api_key=api_key, agent=agent, alert_thresholds=list(thresholds),
                                   alert_emails=alert_emails_text, alert_webhook_url=alert_webhook_url)
    # Neither the addresses nor the webhook URL (it may carry a token) go into the log.
    audit_record(actor=actor, action="budget.created", target=f"budget:{budget.id}",
                 details={"scope": scope, "period": period, "limit_usd": str(limit_usd), "hard": hard,
                          "key": key_prefix, "agent": agent_name, "alert_thresholds": list(thresholds),
                          "alert_emails": len(emails), "alert_webhook": bool(alert_webhook_url)},
                 request_id=request_id, client_ip=client_ip)
    transaction.on_commit(lambda: cache.delete(BUDGETS_CACHE_KEY))
    return budget


def _checked_thresholds(alert_thresholds: list[int]) -> list[int]:
    thresholds = sorted(set(alert_thresholds))
    if any(not isinstance(t, int) or isinstance(t, bool) or t <= 0 or t > 1000 for t in thresholds):
        raise InvalidRequest("alert_thresholds are whole percentages between 1 and 1000.", param="alert_thresholds")
    return thresholds


def _checked_emails(alert_emails: Iterable[str] | None) -> list[str]:
    from django.core.exceptions import ValidationError
    from django.core.validators import validate_email

    emails = list(dict.fromkeys(e.strip() for e in alert_emails or () if e.strip()))
    try:
        for address in emails:
            validate_email(address)
    except ValidationError:
        raise InvalidRequest("alert_emails must be e-mail addresses.", param="alert_emails") from None
    if len(", ".join(emails)) > Budget._meta.get_field("alert_emails").max_length:
        raise InvalidRequest("alert_emails is too long.", param="alert_emails")
    return emails


def _check_webhook_url(alert_webhook_url: str) -> None:
    from django.core.exceptions import ValidationError
    from django.core.validators import URLValidator

    if not alert_webhook_url:
        return
    if len(alert_webhook_url) > Budget._meta.get_field("alert_webhook_url").max_length:
        raise InvalidRequest("alert_webhook_url is too long.", param="alert_webhook_url")
    try:
        URLValidator(schemes=["http", "https"])(alert_webhook_url)
    except ValidationError:
        raise InvalidRequest("alert_webhook_url must be an http(s) URL.", param="alert_webhook_url") from None


# What budget_update may change; what it refuses by name (create another budget instead).
BUDGET_UPDATABLE_FIELDS = frozenset({"name", "limit_usd", "hard", "enabled", "alert_thresholds", "alert_emails",
                                     "alert_webhook_url"})
BUDGET_IMMUTABLE_FIELDS = ("scope", "key", "agent", "period")


@transaction.atomic
def budget_update(*, budget_id: int, fields: dict[str, Any], actor: str = "system", request_id: str = "",
                  client_ip: str | None = None, action: str = "budget.updated") -> Budget:
    """Change a budget's name, limit_usd, hard, enabled, alert_thresholds, alert_emails or
    alert_webhook_url (validated as budget_create does). Its scope, key, agent and period are
    fixed (400 naming the field), unknown fields are refused. Audited with what changed (only
    whether the recipients / webhook changed: they are not logged); the hot path sees it at once."""
    for field in BUDGET_IMMUTABLE_FIELDS:
        if field in fields:
            raise InvalidRequest(f"A budget's {field} cannot be changed; create another budget instead.",
                                 code="immutable_field", param=field)
    unknown = sorted(set(fields) - BUDGET_UPDATABLE_FIELDS)
    if unknown:
        raise InvalidRequest(f"Unknown field: {unknown[0]}.", code="invalid_field", param=unknown[0])
    budget = Budget.objects.select_for_update().filter(pk=budget_id).first()
    if budget is None:
        raise NotFound(f"No budget with id {budget_id}.", code="budget_not_found", param="id")
    values: dict[str, Any] = {}
    for field, value in fields.items():
        if field == "name":
            if not isinstance(value, str) or len(value) > Budget._meta.get_field("name").max_length:
                raise InvalidRequest("name is a text of 100 characters at most.", param="name")
        elif field == "limit_usd":
            try:
                value = Decimal(value) if not isinstance(value, (bool, float)) else Decimal(str(value))
            except (ArithmeticError, TypeError, ValueError):
                raise InvalidRequest("limit_usd must be a decimal amount.", param="limit_usd") from None
            if not value.is_finite() or value < 0:
                raise InvalidRequest("limit_usd must not be negative.", param="limit_usd")
        elif field in ("hard", "enabled"):
            if not isinstance(value, bool):
                raise InvalidRequest(f"{field} must be true or false.", param=field)
        elif field == "alert_thresholds":
            if not isinstance(value, list):
                raise InvalidRequest("alert_thresholds is a list of percentages.", param="alert_thresholds")
            value = _checked_thresholds(value)
        elif field == "alert_emails":
            if not isinstance(value, list) or not all(isinstance(e, str) for e in value):
                raise InvalidRequest("alert_emails is a list of e-mail addresses.", param="alert_emails")
            value = ", ".join(_checked_emails(value))
        elif field == "alert_webhook_url":
            if not isinstance(value, str):
                raise InvalidRequest("alert_webhook_url must be an http(s) URL.", param="alert_webhook_url")
            _check_webhook_url(value)
        values[field] = value
    changed: dict[str, Any] = {}
    for field, value in values.items():
        before = getattr(budget, field)
        if before == value:
            continue
        setattr(budget, field, value)
        if field in ("alert_emails", "alert_webhook_url"):
            # The addresses and the URL (it may carry a token) are not logged: only that they changed.
            changed[field] = "changed"
        elif field == "limit_usd":
            changed[field] = {"from": str(before), "to": str(value)}
        else:
            changed[field] = {"from": before, "to": value}
    if changed:
        budget.save(update_fields=list(changed))
        from governance.audit import audit_record

        audit_record(actor=actor, action=action, target=f"budget:{budget.id}",
                     details={"changed": changed, "scope": budget.scope, "period": budget.period},
                     request_id=request_id, client_ip=client_ip)
        transaction.on_commit(lambda: cache.delete(BUDGETS_CACHE_KEY))
    return budget


def budget_disable(*, budget_id: int, actor: str = "system", request_id: str = "",
                   client_ip: str | None = None) -> Budget:
    """Stop enforcing a budget (its spend history stays); disabling a disabled one changes nothing."""
    return budget_update(budget_id=budget_id, fields={"enabled": False}, actor=actor, request_id=request_id,
                         client_ip=client_ip, action="budget.disabled")


def budget_status(budget: Budget, spend: BudgetSpend | None) -> dict:
    spent = spend.spent_usd if spend else Decimal("0")
    reserved = spend.reserved_usd if spend else Decimal("0")
    return {"spent_usd": spent, "reserved_usd": reserved,
            "remaining_usd": max(budget.limit_usd - spent - reserved, Decimal("0"))}


def budgets_for_key(*, key_id: int, now: datetime | None = None) -> list[tuple[Budget, dict, datetime]]:
    """The enabled budgets that apply to a key (global, its key ones, agent ones of the agents it
    may call, its key+agent ones) with their current period's spend."""
    from agents.models import Agent
    from governance.models import ApiKey

    now = now or timezone.now()
    api_key = ApiKey.objects.get(id=key_id)
    agents = Agent.objects.all() if api_key.all_agents else api_key.agents.all()
    agent_ids = list(agents.values_list("id", flat=True))
    q = (Q(scope=Budget.Scope.GLOBAL) | Q(scope=Budget.Scope.AGENT, agent_id__in=agent_ids)
         | Q(scope__in=[Budget.Scope.KEY, Budget.Scope.KEY_AGENT], api_key_id=key_id))
    budgets = list(Budget.objects.filter(q, enabled=True).select_related("api_key", "agent").order_by("scope", "id"))
    spends = current_spends(budgets, now)
    return [(b, budget_status(b, spends.get(b.id)), period_start(b.period, now)) for b in budgets]


# --- the pipeline stage --------------------------------------------------------------------------


NOTE = "budget"


class BudgetStage:
    """Reserve before the model call, settle with the run, release when refused (see module doc)."""

    async def before(self, turn) -> None:
        key_id = turn.principal.key_id if turn.principal else None
        amount = await run_db(self._worst_case, turn, key_id)
        if amount is not None:
            # Reserved in `start`, in the transaction that records the run as running: the run
            # row names its reservation, so the sweeper can settle it if this worker dies.
            turn.notes[NOTE] = {"amount": amount, "reservation": None, "settled": False}
            turn.start_locks = True

    @staticmethod
    def _worst_case(turn, key_id: int | None) -> Decimal | None:
        if not any(_applies(row, key_id, turn.agent.id) for row in _enabled_budgets()):
            return None  # the common case costs one cache read, no query
        return turn_worst_case(turn)

    def start(self, turn) -> None:
        note = turn.notes.get(NOTE)
        if not note:
            return
        key_id = turn.principal.key_id if turn.principal else None
        reservation = budget_reserve(key_id=key_id, agent_id=turn.agent.id, amount=note["amount"])
        if reservation is None:
            turn.notes.pop(NOTE, None)
            return
        turn.reservation = {"spend_ids": list(reservation.spend_ids), "amount": str(reservation.amount)}
        # Held only once the start commits: a start that rolls back reserved nothing.
        transaction.on_commit(lambda: note.update(reservation=reservation))

    def persist(self, turn) -> None:
        note = turn.notes.get(NOTE)
        if not note or note["settled"] or note["reservation"] is None:
            return
        budget_settle(reservation=note["reservation"], actual_usd=turn.cost_usd)
        # Marked only once the run's transaction commits: rolled back, `after` settles on its own.
        transaction.on_commit(lambda: note.update(settled=True))

    async def after(self, turn) -> None:
        note = turn.notes.get(NOTE)
        if not note or note["settled"] or note["reservation"] is None:
            return
        if turn.swept:
            return  # the sweeper ended the run and settled its reservation
        await self._settle_alone(turn, note, turn.cost_usd)

    async def refused(self, turn, error) -> None:
        note = turn.notes.get(NOTE)
        if not note or note["settled"] or note["reservation"] is None:
            return  # refused before (or by) this stage: nothing was reserved
        await self._settle_alone(turn, note, Decimal("0"))

    @staticmethod
    async def _settle_alone(turn, note: dict, actual: Decimal | None) -> None:
        from agents.models import Run

        def settle() -> None:
            with transaction.atomic():
                budget_settle(reservation=note["reservation"], actual_usd=actual)
                # The run row no longer holds it: a sweeper ending that run settles nothing.
                Run.objects.filter(pk=turn.run_id, status=Run.Status.RUNNING).update(reservation={})

        try:
            await write_db(settle)
            note["settled"] = True
        except DatabaseError:
            logger.exception("Could not settle the budget reservation of run %s", turn.run_id)


def turn_worst_case(turn) -> Decimal:
    """The most this turn can cost (sync: reads the session history and prices)."""
    from agents.selectors import session_history

    agent = turn.agent
    messages: list[dict] = [{"role": "system", "content": agent.system_prompt}] if agent.system_prompt else []
    if turn.use_session and turn.session_exists:
        from agents.models import Session

        messages += session_history(session=Session(pk=turn.session_id), limit=settings.AGENT_HISTORY_LIMIT)
    messages += turn.input_messages
    tools = tuple(turn.skills)
    calls = settings.AGENT_MAX_STEPS if tools else 1
    return worst_case_cost(models=[agent.model, *agent.fallback_models],
                           prompt_tokens=estimate_prompt_tokens(messages, tools),
                           max_tokens=turn.max_tokens or agent.max_tokens, calls=calls)
