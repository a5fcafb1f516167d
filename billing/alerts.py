"""Budget alerts: each threshold (percent of a budget's limit) fires once per period, and is
delivered by e-mail and/or a webhook through Celery, with retries and a dead letter.

Firing.
    alerts_fire_on_settlement   called by budget_settle (billing.budgets) inside the settlement's
                                transaction, with the budget rows it locked whose spend just
                                crossed a threshold. The check itself is done there, without
                                I/O, so a settlement that crosses nothing costs nothing here.
    check_budget_alerts         the beat task's scan of every enabled budget's current period:
                                fires what no settlement fired (a limit lowered, thresholds
                                changed) and re-enqueues deliveries whose enqueue was lost.
Either way the BudgetAlert row is inserted in a savepoint: its unique constraint (budget, period,
threshold) makes the threshold fire once per period whichever worker or scan gets there first;
the loser's IntegrityError just means "already fired". The alert, its AlertDelivery rows and a
"budget.alert" audit entry commit together; the delivery tasks are enqueued on commit.

Lock order (as budget_settle): the audit chain's lock first, then budget rows, then alert rows.

Other notices (`notice_send`: an experiment's canary rolled back) use the same deliveries, to the
default recipients, with their own event name, subject, text and webhook body.

Delivering. One AlertDelivery per channel: `email` (the budget's alert_emails, else
BUDGET_ALERT_EMAILS; one message to all of them) and `webhook` (the budget's alert_webhook_url,
else BUDGET_ALERT_WEBHOOK_URL). billing.tasks runs `alert_delivery_attempt` and retries with
exponential backoff; after 1 + BUDGET_ALERT_MAX_RETRIES failed attempts (or at once on a
permanent failure: a 4xx other than 408/429) the delivery is `dead`, with the last error, and
audited ("budget.alert.dead_letter"). The admin's retry action re-enqueues dead deliveries.

Eager Celery (the embedded default) runs a task inside `.delay()`. Deliveries enqueued there go
to one background thread instead: an unreachable webhook retried eagerly must not hold the
database writer thread (settlements run in its group commit) or a request for a minute.

Webhook: POST of the JSON body `alert_payload` builds, `Content-Type: application/json`,
`X-AgentPlatform-Event: budget.alert`, `X-AgentPlatform-Delivery: <delivery id>` and, with
BUDGET_ALERT_WEBHOOK_SECRET set, `X-AgentPlatform-Signature: sha256=<hex HMAC-SHA256 of the raw
body with the secret>`. Any 2xx is success; redirects are not followed (agentplatform.webhooks:
one encoding, signature and backoff for every webhook).
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Callable, Iterable

import httpx
from django.conf import settings
from django.core.mail import send_mail
from django.db import IntegrityError, connections, transaction
from django.utils import timezone

from agentplatform.celery import task_enqueue
from agentplatform.webhooks import (
    DELIVERY_HEADER,
    EVENT_HEADER,
    SIGNATURE_HEADER,
    DeliveryFailed,
    retry_countdown,
    webhook_body,
    webhook_outcome,
    webhook_signature,
)
from governance.masking import mask_text

from .budgets import (
    _describe,
    alert_thresholds_of,
    current_period_q,
    period_end,
    period_start,
    thresholds_crossed,
    thresholds_reached,
)
from .models import AlertDelivery, Budget, BudgetAlert, BudgetSpend

logger = logging.getLogger("billing.alerts")

# A delivery never tried this long after it was made lost its enqueue (broker down at commit,
# a process gone before its eager thread ran it): the scan enqueues it again.
REQUEUE_AFTER = timedelta(minutes=10)
ERROR_MAX_CHARS = 500
USER_AGENT = "agent-platform-alerts/1"


# --- firing ----------------------------------------------------------------------------------


def alerts_fire_on_settlement(crossed: list[tuple[BudgetSpend, Decimal]]) -> list[BudgetAlert]:
    """Fire what a settlement crossed: (locked spend row, its spend before the settlement) per
    budget that seemed to cross a threshold by the limits read when reserving; checked again here
    against the budgets as they are now. Runs inside budget_settle's transaction, which holds the
    audit chain's lock."""
    budgets = Budget.objects.in_bulk([row.budget_id for row, _ in crossed])
    fired: list[BudgetAlert] = []
    for row, before in crossed:
        budget = budgets.get(row.budget_id)
        if budget is None or not budget.enabled:
            continue
        thresholds = thresholds_crossed(budget.limit_usd, alert_thresholds_of(budget), before, row.spent_usd)
        if thresholds:
            fired += _fire(budget, row.period_start, thresholds, row.spent_usd)
    return fired


def _fire(budget: Budget, start: datetime, thresholds: Iterable[int], spent: Decimal) -> list[BudgetAlert]:
    """Insert the alerts not fired yet, their deliveries and audit entries; enqueue on commit.
    Call inside a transaction that took the audit chain's lock first (see the module doc)."""
    from governance.audit import audit_record

    fired: list[BudgetAlert] = []
    deliveries: list[AlertDelivery] = []
    for threshold in sorted(thresholds):
        try:
            with transaction.atomic():  # a savepoint: a duplicate rolls back alone
                alert = BudgetAlert.objects.create(budget=budget, period_start=start, threshold=threshold,
                                                   spent_usd=spent, limit_usd=budget.limit_usd)
        except IntegrityError:
            # Fired already, by another settlement or the scan: the unique constraint. Any
            # other failure (the budget deleted meanwhile) is not "already fired".
            if BudgetAlert.objects.filter(budget=budget, period_start=start, threshold=threshold).exists():
                continue
            raise
        made = AlertDelivery.objects.bulk_create(
            [AlertDelivery(alert=alert, channel=channel, target=target) for channel, target in _targets(budget)])
        audit_record(actor="system", action="budget.alert", target=f"budget:{budget.id}",
                     details={"alert_id": alert.id, "threshold": threshold, "period": budget.period,
                              "period_start": start.isoformat(), "spent_usd": str(spent),
                              "limit_usd": str(budget.limit_usd), "hard": budget.hard,
                              "deliveries": [d.channel for d in made]})
        fired.append(alert)
        deliveries += made
    if deliveries:
        jobs = [(d.id, d.channel) for d in deliveries]
        transaction.on_commit(lambda: alert_deliveries_enqueue(jobs))
    return fired


def _targets(budget: Budget) -> list[tuple[str, str]]:
    out = []
    emails = budget.alert_emails.strip() or ", ".join(settings.BUDGET_ALERT_EMAILS)
    if emails:
        out.append((AlertDelivery.Channel.EMAIL, emails))
    webhook = budget.alert_webhook_url.strip() or settings.BUDGET_ALERT_WEBHOOK_URL
    if webhook:
        out.append((AlertDelivery.Channel.WEBHOOK, webhook))
    return out


def check_budget_alerts(now: datetime | None = None) -> int:
    """Fire every threshold an enabled budget's current-period spend has reached and no alert
    records yet; enqueue again deliveries never tried (lost enqueues). Returns alerts fired."""
    from .budgets import budget_ledger_lock

    now = now or timezone.now()
    budgets = list(Budget.objects.filter(enabled=True).order_by("id"))
    fired = 0
    if budgets:
        starts = {b.id: period_start(b.period, now) for b in budgets}
        current = current_period_q(budgets, now)
        spends = {s.budget_id: s.spent_usd for s in BudgetSpend.objects.filter(current).only("budget_id", "spent_usd")}
        done = set(BudgetAlert.objects.filter(current).values_list("budget_id", "threshold"))
        for budget in budgets:
            thresholds = alert_thresholds_of(budget)
            spent = spends.get(budget.id, Decimal("0"))
            missing = [t for t in thresholds_reached(budget.limit_usd, thresholds, spent) if (budget.id, t) not in done]
            if not missing:
                continue
            with transaction.atomic():
                budget_ledger_lock()
                # The spend as of now, under the ledger's lock (settlements take it too).
                spent = BudgetSpend.objects.filter(budget_id=budget.id, period_start=starts[budget.id]) \
                    .values_list("spent_usd", flat=True).first() or Decimal("0")
                reached = set(thresholds_reached(budget.limit_usd, thresholds, spent))
                fired += len(_fire(budget, starts[budget.id], [t for t in missing if t in reached], spent))
    lost = list(AlertDelivery.objects.filter(status=AlertDelivery.Status.PENDING, attempts=0,
                                             created_at__lt=now - REQUEUE_AFTER).values_list("id", "channel"))
    if lost:
        logger.warning("Enqueueing %d alert deliveries again (never tried)", len(lost))
        alert_deliveries_enqueue(lost)
    return fired


def _default_targets() -> list[tuple[str, str]]:
    out = []
    if settings.BUDGET_ALERT_EMAILS:
        out.append((AlertDelivery.Channel.EMAIL, ", ".join(settings.BUDGET_ALERT_EMAILS)))
    if settings.BUDGET_ALERT_WEBHOOK_URL:
        out.append((AlertDelivery.Channel.WEBHOOK, settings.BUDGET_ALERT_WEBHOOK_URL))
    return out


def notice_send(*, event: str, subject: str, text: str, body: dict) -> list[AlertDelivery]:
    """An operational notice that is not a budget's (e.g. "experiment.rolled_back"), sent through
    the alerts' channels: BUDGET_ALERT_EMAILS and BUDGET_ALERT_WEBHOOK_URL (signed with
    BUDGET_ALERT_WEBHOOK_SECRET), with the same retries, dead letters and admin retry. The webhook
    POSTs `body` plus type, delivery_id, attempt and sent_at. Call inside the transaction of the
    change it reports: the deliveries are enqueued once it commits."""
    made = AlertDelivery.objects.bulk_create([
        AlertDelivery(alert=None, event=event, channel=channel, target=target,
                      payload={"subject": subject, "text": text, "body": body})
        for channel, target in _default_targets()])
    if made:
        jobs = [(d.id, d.channel) for d in made]
        transaction.on_commit(lambda: alert_deliveries_enqueue(jobs))
    return made


# --- enqueueing ------------------------------------------------------------------------------


def alert_deliveries_enqueue(jobs: list[tuple[int, str]]) -> None:
    """Hand (delivery id, channel) pairs to their Celery tasks; never raises (the scan enqueues
    again what was lost)."""
    from .tasks import deliver_alert_email_task, deliver_alert_webhook_task

    tasks = {AlertDelivery.Channel.EMAIL: deliver_alert_email_task,
             AlertDelivery.Channel.WEBHOOK: deliver_alert_webhook_task}
    for delivery_id, channel in jobs:
        task = tasks[channel]
        try:
            if task.app.conf.task_always_eager:
                _eager_runner().submit(lambda task=task, delivery_id=delivery_id: task.apply(args=[delivery_id]))
            else:
                task_enqueue(task, args=[delivery_id])
        except Exception:
            logger.exception("Could not enqueue alert delivery %s", delivery_id)


class _EagerRunner:
    """One daemon thread running eager deliveries in order, each with a fresh connection."""

    def __init__(self) -> None:
        self.jobs: queue.SimpleQueue[Callable[[], object]] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._loop, name="alert-deliveries", daemon=True)
        self.thread.start()

    def submit(self, job: Callable[[], object]) -> None:
        self.jobs.put(job)

    def _loop(self) -> None:
        while True:
            job = self.jobs.get()
            try:
                job()
            except Exception:
                logger.exception("Eager alert delivery failed")
            finally:
                connections.close_all()


_runner: _EagerRunner | None = None
_runner_lock = threading.Lock()


def _eager_runner() -> _EagerRunner:
    global _runner
    with _runner_lock:
        if _runner is None or not _runner.thread.is_alive():
            _runner = _EagerRunner()
    return _runner


# --- delivering ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Attempt:
    status: str  # "sent", "retry", "dead" or "skipped" (no such delivery, or not pending)
    attempts: int = 0
    error: str = ""


def alert_retry_countdown(attempts: int) -> float:
    """Seconds before the next attempt after `attempts` failed ones: backoff × 2^(attempts-1)."""
    return retry_countdown(attempts, base=settings.BUDGET_ALERT_RETRY_BACKOFF_SECONDS)


def alert_delivery_attempt(*, delivery_id: int) -> Attempt:
    """Try a pending delivery once and record the outcome: sent, failed (retry later), or dead
    (out of retries, or a permanent failure: audited as a dead letter)."""
    from governance.audit import audit_record

    delivery = (AlertDelivery.objects.select_related("alert__budget__api_key", "alert__budget__agent")
                .filter(pk=delivery_id).first())
    if delivery is None or delivery.status != AlertDelivery.Status.PENDING:
        return Attempt("skipped")  # a duplicate enqueue, or sent/dead already
    attempts = delivery.attempts + 1
    # No transaction is held during the I/O: on SQLite that would stop every other writer.
    try:
        if delivery.channel == AlertDelivery.Channel.EMAIL:
            _send_email(delivery)
        else:
            _post_webhook(delivery, attempts)
    except DeliveryFailed as exc:
        error = mask_text(str(exc))[:ERROR_MAX_CHARS]
        now = timezone.now()
        if exc.permanent or attempts > settings.BUDGET_ALERT_MAX_RETRIES:
            with transaction.atomic():
                changed = AlertDelivery.objects.filter(pk=delivery_id, status=AlertDelivery.Status.PENDING).update(
                    status=AlertDelivery.Status.DEAD, attempts=attempts, last_error=error, updated_at=now)
                if changed:
                    audit_record(actor="system", action=f"{delivery.event}.dead_letter",
                                 target=f"budget:{delivery.alert.budget_id}" if delivery.alert_id
                                 else f"notice:{delivery.event}", outcome="error",
                                 details={"alert_id": delivery.alert_id, "delivery_id": delivery_id,
                                          "channel": delivery.channel, "attempts": attempts, "error": error,
                                          "permanent": exc.permanent})
            logger.warning("Alert delivery %s (%s) is dead after %d attempts", delivery_id, delivery.channel,
                           attempts)
            return Attempt("dead", attempts, error)
        AlertDelivery.objects.filter(pk=delivery_id, status=AlertDelivery.Status.PENDING).update(
            attempts=attempts, last_error=error, updated_at=now)
        logger.info("Alert delivery %s (%s) failed, attempt %d", delivery_id, delivery.channel, attempts)
        return Attempt("retry", attempts, error)
    now = timezone.now()
    AlertDelivery.objects.filter(pk=delivery_id, status=AlertDelivery.Status.PENDING).update(
        status=AlertDelivery.Status.SENT, attempts=attempts, last_error="", delivered_at=now, updated_at=now)
    return Attempt("sent", attempts)


def _money(value: Decimal) -> str:
    return f"{value:.8f}"


def _percent(spent: Decimal, limit: Decimal) -> str | None:
    return f"{spent * 100 / limit:.2f}" if limit > 0 else None


def alert_payload(alert: BudgetAlert, *, delivery_id: int | None = None, attempt: int = 1) -> dict:
    """The webhook's JSON body (and the facts the e-mail states)."""
    budget = alert.budget
    end = period_end(budget.period, alert.period_start)
    return {
        "type": "budget.alert",
        "alert_id": alert.id,
        "delivery_id": delivery_id,
        "attempt": attempt,
        "sent_at": timezone.now().isoformat(),
        "created_at": alert.created_at.isoformat(),
        "threshold": alert.threshold,
        "spent_usd": _money(alert.spent_usd),
        "limit_usd": _money(alert.limit_usd),
        "percent": _percent(alert.spent_usd, alert.limit_usd),
        "period_start": alert.period_start.isoformat(),
        "period_end": end.isoformat() if end else None,
        "budget": {"id": budget.id, "name": budget.name, "scope": budget.scope, "period": budget.period,
                   "hard": budget.hard, "key": budget.api_key.prefix if budget.api_key_id else None,
                   "agent": budget.agent.name if budget.agent_id else None,
                   "description": _describe(budget)},
    }


def _notice_payload(delivery: AlertDelivery, attempt: int) -> dict:
    return {"type": delivery.event, **(delivery.payload.get("body") or {}), "delivery_id": delivery.id,
            "attempt": attempt, "sent_at": timezone.now().isoformat()}


def _post_webhook(delivery: AlertDelivery, attempt: int) -> None:
    payload = (alert_payload(delivery.alert, delivery_id=delivery.id, attempt=attempt) if delivery.alert_id
               else _notice_payload(delivery, attempt))
    body = webhook_body(payload)
    headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT,
               EVENT_HEADER: delivery.event, DELIVERY_HEADER: str(delivery.id)}
    if settings.BUDGET_ALERT_WEBHOOK_SECRET:
        headers[SIGNATURE_HEADER] = webhook_signature(body, settings.BUDGET_ALERT_WEBHOOK_SECRET)
    try:
        response = httpx.post(delivery.target, content=body, headers=headers,
                              timeout=settings.BUDGET_ALERT_WEBHOOK_TIMEOUT, follow_redirects=False)
    except httpx.InvalidURL:
        raise DeliveryFailed("InvalidURL: the webhook URL is not valid.", permanent=True) from None
    except httpx.HTTPError as exc:
        # The message, never the URL (it may carry a token).
        raise DeliveryFailed(f"{type(exc).__name__}: {exc}") from None
    webhook_outcome(response.status_code, response.text)


def _send_email(delivery: AlertDelivery) -> None:
    if delivery.alert_id is None:
        _send_notice_email(delivery)
        return
    alert = delivery.alert
    budget = alert.budget
    recipients = [a.strip() for a in delivery.target.split(",") if a.strip()]
    if not recipients:
        raise DeliveryFailed("No recipients.", permanent=True)
    facts = alert_payload(alert, delivery_id=delivery.id)
    describe = facts["budget"]["description"]
    percent = f" ({facts['percent']} %)" if facts["percent"] else ""
    kind = ("hard: requests that do not fit are refused" if budget.hard
            else "soft: requests are not refused, only reported")
    subject = f"Budget alert: {describe} reached {alert.threshold} % of {alert.limit_usd:.2f} USD"
    body = "\n".join([
        f"The {describe} budget has reached {alert.threshold} % of its limit.",
        "",
        f"Spent:   {facts['spent_usd']} USD of {facts['limit_usd']} USD{percent}",
        f"Period:  {budget.period}, from {facts['period_start']}"
        + (f" to {facts['period_end']}" if facts["period_end"] else "") + " (UTC)",
        f"Budget:  {kind}",
        f"Alert:   #{alert.id}, fired {facts['created_at']}",
        "",
        "Each threshold is reported once per period.",
    ])
    try:
        send_mail(subject, body, settings.DEFAULT_FROM_EMAIL, recipients, fail_silently=False)
    except Exception as exc:  # SMTP errors, refused recipients, connection failures
        raise DeliveryFailed(f"{type(exc).__name__}: {exc}") from None


def _send_notice_email(delivery: AlertDelivery) -> None:
    recipients = [a.strip() for a in delivery.target.split(",") if a.strip()]
    if not recipients:
        raise DeliveryFailed("No recipients.", permanent=True)
    try:
        send_mail(delivery.payload.get("subject") or delivery.event, delivery.payload.get("text") or "",
                  settings.DEFAULT_FROM_EMAIL, recipients, fail_silently=False)
    except Exception as exc:  # SMTP errors, refused recipients, connection failures
        raise DeliveryFailed(f"{type(exc).__name__}: {exc}") from None


def alert_deliveries_retry(*, ids: Iterable[int], actor: str) -> int:
    """Send dead deliveries again from their first attempt (the admin's retry action)."""
    from governance.audit import audit_record

    with transaction.atomic():
        dead = list(AlertDelivery.objects.select_for_update().filter(id__in=list(ids),
                                                                     status=AlertDelivery.Status.DEAD))
        if not dead:
            return 0
        AlertDelivery.objects.filter(id__in=[d.id for d in dead]).update(
            status=AlertDelivery.Status.PENDING, attempts=0, updated_at=timezone.now())
        for delivery in dead:
            audit_record(actor=actor, action=f"{delivery.event}.retried",
                         target=f"alert:{delivery.alert_id}" if delivery.alert_id else f"notice:{delivery.event}",
                         details={"delivery_id": delivery.id, "channel": delivery.channel,
                                  "previous_attempts": delivery.attempts})
        jobs = [(d.id, d.channel) for d in dead]
        transaction.on_commit(lambda: alert_deliveries_enqueue(jobs))
    return len(dead)
