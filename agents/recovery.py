"""Crash safety: a run whose worker died leaves nothing held and nothing unrecorded.

Every run is a `running` row from its start (agents.pipeline records it, with its budget
reservation, before the model is called) and carries a lease, `lease_expires_at`.

Leases. Each process keeps its live turns in `leases` (a registry: no I/O to track or untrack).
A daemon thread wakes every RUN_CHECKPOINT_SECONDS and, for each turn running longer than that,
renews its lease to now + RUN_LEASE_SECONDS and checkpoints what it has produced so far (the
calls it made and the text of the one in flight, priced offline by billing.metering, no I/O)
into the run row: one UPDATE per such run, group-committed with the other writes. Runs shorter
than the checkpoint interval (nearly all) cost nothing here.

Sweeper. `sweep_interrupted_runs()` ends every `running` run whose lease ran out: its worker is
gone (killed, crashed, its machine lost). For each, in one transaction:
  * the run becomes `interrupted` (a final state), error_code `interrupted`, with the tokens of
    its last checkpoint (or its prompt estimate when it died before the first one);
  * one usage record per checkpointed call, marked estimated where the tokens were counted
    offline (at least the prompt of the call it was making), priced as metering prices runs;
  * its reservation settled: spent += that cost, the rest released — every budget period,
    `total` included (billing.budgets.budget_settle);
  * an audit entry `run.interrupted`.
Lock order: the budget ledger's lock (billing.budgets.budget_ledger_lock) first, then the run
row with SKIP LOCKED, so a run being stored right now by a worker that
is alive after all is left to that worker. The worker's own final write updates the row only
while it is `running`, so a run is never settled twice.

Async runs (transport `task`, agents.runs) are not ended but queued again, with the same
settlement, audited `run.requeued`, and enqueued: up to RUN_MAX_ATTEMPTS starts in all, then
`interrupted` (and dead-lettered); one whose caller asked to cancel it ends `cancelled`. A
redelivered task that finds its run's lease run out sweeps it itself (`sweep_run`).

The sweeper runs when a process starts (agentplatform.asgi, Celery's worker_ready) and
periodically from the beat schedule (Celery beat in production; agentplatform.scheduler's
in-process beat on the embedded default).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from datetime import datetime, timedelta
from decimal import Decimal

from django.conf import settings
from django.db import close_old_connections, transaction
from django.utils import timezone

from .models import Run

logger = logging.getLogger("agents.recovery")

INTERRUPTED = "interrupted"
INTERRUPTED_MESSAGE = ("The worker running this run stopped before the run ended (its lease ran out); "
                       "its usage is estimated from the last checkpoint.")


def lease_deadline(now: datetime | None = None) -> datetime:
    return (now or timezone.now()) + timedelta(seconds=settings.RUN_LEASE_SECONDS)


def prompt_estimate(turn) -> int:
    """Offline estimate of the first call's prompt tokens (what a run that dies before its first
    checkpoint is charged at least): about 4 characters a token over the messages."""
    from agents.providers.base import estimate_tokens

    agent = turn.agent
    texts = [agent.system_prompt or ""] + [m.get("content") or "" for m in turn.input_messages]
    return sum(estimate_tokens(t) + 4 for t in texts)


# --- leases ------------------------------------------------------------------------------------


def _checkpoint(turn) -> dict:
    """What a live turn has produced so far, priced (no I/O; read from the turn's own objects)."""
    from billing.metering import NOTE, metered_calls

    prices = (turn.notes.get(NOTE) or {}).get("prices") or []
    calls = metered_calls(turn, prices, checkpoint=True) if turn.run is not None else []
    return {
        "prompt_tokens": turn.notes.get("_prompt_estimate", 0),
        "calls": [{"model": c.model, "prompt_tokens": c.prompt_tokens, "cached_prompt_tokens": c.cached_prompt_tokens,
                   "completion_tokens": c.completion_tokens, "cost_usd": str(c.cost_usd), "estimated": c.estimated,
                   "priced": c.priced} for c in calls],
        "at": timezone.now().isoformat(),
    }


class Leases:
    """The process's live turns and the thread that renews their leases."""

    def __init__(self) -> None:
        self._live: dict[uuid.UUID, object] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()

    def track(self, turn) -> None:
        turn.lease_renewed_at = time.monotonic()
        with self._lock:
            self._live[turn.run_id] = turn
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="run-leases", daemon=True)
                self._thread.start()

    def untrack(self, turn) -> None:
        with self._lock:
            self._live.pop(turn.run_id, None)

    def live(self) -> list:
        with self._lock:
            return list(self._live.values())

    def _loop(self) -> None:
        while True:
            self._wake.wait(max(0.05, settings.RUN_CHECKPOINT_SECONDS))
            self._wake.clear()
            try:
                self.renew_due()
            except Exception:  # never let the thread die: the next round tries again
                logger.exception("Renewing run leases failed")

    def renew_due(self, *, force: bool = False) -> int:
        """Renew the lease (and checkpoint) of every live turn older than the checkpoint interval;
        returns how many. Waits for the write to commit."""
        from agentplatform.db import _get_writer

        now_mono = time.monotonic()
        interval = settings.RUN_CHECKPOINT_SECONDS
        due = [t for t in self.live()
               if not getattr(t, "ended", False) and (force or now_mono - t.lease_renewed_at >= interval)]
        if not due:
            return 0
        updates = []
        for turn in due:
            try:
                updates.append((turn.run_id, _checkpoint(turn)))
            except Exception:
                logger.exception("Could not checkpoint run %s", turn.run_id)
        deadline = lease_deadline()

        def write() -> int:
            renewed = 0
            for run_id, checkpoint in updates:
                calls = checkpoint["calls"]
                renewed += Run.objects.filter(pk=run_id, status=Run.Status.RUNNING).update(
                    lease_expires_at=deadline, metadata={"checkpoint": checkpoint},
                    prompt_tokens=sum(c["prompt_tokens"] for c in calls),
                    completion_tokens=sum(c["completion_tokens"] for c in calls),
                    total_tokens=sum(c["prompt_tokens"] + c["completion_tokens"] for c in calls))
            return renewed

        _get_writer().submit(write).result(timeout=max(30.0, settings.RUN_LEASE_SECONDS))
        for turn in due:
            turn.lease_renewed_at = now_mono
        return len(updates)


leases = Leases()


# --- the sweeper ---------------------------------------------------------------------------------


def sweep_interrupted_runs(*, now: datetime | None = None, limit: int = 500) -> int:
    """End every running run whose lease ran out (see the module doc); returns how many."""
    now = now or timezone.now()
    ids = list(Run.objects.filter(status=Run.Status.RUNNING, lease_expires_at__lt=now)
               .order_by("lease_expires_at").values_list("id", flat=True)[:limit])
    swept = 0
    for run_id in ids:
        try:
            swept += _sweep_one(run_id, now)
        except Exception:
            logger.exception("Could not end interrupted run %s", run_id)
    if swept:
        logger.warning("Ended %d run(s) whose worker stopped (lease of %s s ran out) as interrupted",
                       swept, settings.RUN_LEASE_SECONDS)
    return swept


def sweep_run(run_id, *, now: datetime | None = None, enqueue: bool = True) -> int:
    """Sweep one run now if its lease ran out (a redelivered async run's task finds its dead
    attempt); `enqueue=False`: the caller runs it itself once it is queued again."""
    return _sweep_one(run_id, now or timezone.now(), enqueue=enqueue)


def _sweep_one(run_id, now: datetime, *, enqueue: bool = True) -> int:
    from billing.budgets import Reservation, budget_ledger_lock, budget_settle
    from billing.models import UsageRecord
    from billing.pricing import call_cost, price_for
    from governance.audit import audit_record

    with transaction.atomic():
        # The budget ledger first, as every settlement takes it, then the run row with SKIP
        # LOCKED: a run its (live) worker is storing right now holds its row, and is left to it.
        budget_ledger_lock()
        run = (Run.objects.select_for_update(skip_locked=True)
               .filter(pk=run_id, status=Run.Status.RUNNING, lease_expires_at__lt=now).first())
        if run is None:
            return 0  # ended meanwhile, renewed, or being stored by its (live) worker right now
        checkpoint = (run.metadata or {}).get("checkpoint") or {}
        calls = list(checkpoint.get("calls") or [])
        if not calls:
            # Died before its first checkpoint: at least the prompt of the call it was making.
            prompt = int(checkpoint.get("prompt_tokens") or 0)
            price = price_for(run.model, run.started_at)
            calls = [{"model": run.model, "prompt_tokens": prompt, "cached_prompt_tokens": 0, "completion_tokens": 0,
                      "cost_usd": str(call_cost(prompt, 0, price)), "estimated": True, "priced": price.priced}]
        cost = sum((Decimal(c["cost_usd"]) for c in calls), Decimal("0"))
        UsageRecord.objects.bulk_create([
            UsageRecord(created_at=run.started_at, run_id=run.id, api_key_id=run.api_key_id, agent_id=run.agent_id,
                        model=c["model"], session_id=None, request_id=run.request_id, variant=run.variant,
                        prompt_tokens=c["prompt_tokens"], cached_prompt_tokens=c.get("cached_prompt_tokens", 0),
                        completion_tokens=c["completion_tokens"], cost_usd=Decimal(c["cost_usd"]),
                        estimated=bool(c.get("estimated", True)), priced=bool(c.get("priced", True)),
                        # An async run's later attempt: its first attempt's records counted it.
                        starts_run=index == 0 and run.attempts <= 1)
            for index, c in enumerate(calls)])
        reservation = run.reservation or {}
        if reservation.get("spend_ids"):
            budget_settle(reservation=Reservation(spend_ids=tuple(reservation["spend_ids"]),
                                                  amount=Decimal(reservation["amount"])), actual_usd=cost)
        prompt = sum(c["prompt_tokens"] for c in calls)
        completion = sum(c["completion_tokens"] for c in calls)
        ended = {"lease_expires_at": None, "reservation": {}, "prompt_tokens": prompt, "completion_tokens": completion,
                 "total_tokens": prompt + completion, "steps": len(calls)}
        details = {"agent_id": run.agent_id, "transport": run.transport, "model": run.model,
                   "lease_expired_at": run.lease_expires_at.isoformat() if run.lease_expires_at else None,
                   "prompt_tokens": prompt, "completion_tokens": completion, "cost_usd": str(cost),
                   "released_usd": str(max(Decimal(reservation.get("amount") or 0) - cost, Decimal("0")))
                   if reservation else "0", "estimated": True}
        task = run.transport == Run.Transport.TASK
        if task and not run.cancel_requested and run.attempts < settings.RUN_MAX_ATTEMPTS:
            # An async run is queued again (its usage so far stands): it still completes, once.
            Run.objects.filter(pk=run.id).update(
                status=Run.Status.QUEUED, enqueued_at=now, **ended,
                metadata={**(run.metadata or {}), "interrupted_attempts": run.attempts})
            audit_record(actor="system", action="run.requeued", target=f"run:{run.id}", outcome="error",
                         request_id=run.request_id, details={**details, "attempts": run.attempts})
            if enqueue:
                from .runs import run_enqueue

                transaction.on_commit(lambda: run_enqueue(run.id))
            return 1
        cancelled = task and run.cancel_requested  # its caller asked to cancel it: nothing to run again
        Run.objects.filter(pk=run.id).update(
            status=Run.Status.CANCELLED if cancelled else Run.Status.INTERRUPTED,
            error_code="" if cancelled else INTERRUPTED, error_message="" if cancelled else INTERRUPTED_MESSAGE,
            finished_at=now, latency_ms=max(0, int((now - run.started_at).total_seconds() * 1000)), **ended,
            metadata={**(run.metadata or {}), "interrupted": True, "estimated": True})
        audit_record(actor="system", action="run.interrupted", target=f"run:{run.id}", outcome="error",
                     request_id=run.request_id, details=details)
        if task:
            from .runs import run_ended

            run_ended(run.id)  # dead-lettered after its last attempt; its callback enqueued
    return 1


def sweep_on_startup() -> None:
    """Sweep once in the background when a process starts (never delays or breaks start-up);
    RUN_SWEEP_ON_START=false turns it off."""
    if not settings.RUN_SWEEP_ON_START:
        return

    def sweep() -> None:
        try:
            sweep_interrupted_runs()
        except Exception:
            logger.exception("The start-up sweep of interrupted runs failed")
        finally:
            close_old_connections()

    threading.Thread(target=sweep, name="run-sweeper", daemon=True).start()
