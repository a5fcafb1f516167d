"""Async runs: queued by `POST /api/v1/agents/{name}/runs`, executed by a Celery worker through
the one pipeline (agents.pipeline.ChatTurn, transport "task": the key's scopes, guards, flags,
rate limits, budgets, metering and audit apply as to every other transport), polled with
`GET /api/v1/runs/{id}`, reported to an optional callback URL.

Lifecycle of a Run row (transport `task`):

    queued ──(a worker's ChatTurn.prepare)──> running ──> succeeded | failed | cancelled
      │                                          │
      └──(cancel)──> cancelled                   └──(its worker died: lease ran out)──> queued again,
                                                    or interrupted after RUN_MAX_ATTEMPTS starts

Creating (`async_run_create`, one transaction): the session (a new id is created now, so the run
is listed under it at once; an existing one must be the caller's, as for chat), the `queued` row
with the validated request in `input`; its execution is enqueued once that commits. A lost
enqueue (broker down) leaves the row queued: `runs_requeue_lost` (beat, every minute) enqueues
again what has waited RUN_REQUEUE_AFTER_SECONDS without being started.

Executing (`run_execute`, what `agents.tasks.execute_run_task` runs; at least once, so idempotent):
  * the row decides: missing or finished → nothing; `running` with a live lease → another delivery
    runs it, left alone; `running` with a lease that ran out → its worker died: the dead attempt
    is settled as the sweeper settles it (agents.recovery) and the run queued again right here;
  * the key is resolved again by its id: revoked, disabled, expired or deleted since → failed
    (`api_key_inactive`); the agent must still exist and be allowed to the key;
  * `ChatTurn(..., run_id=<the row>, queued=True)`: prepare() moves the row from queued to running
    (and refuses, `run_not_queued`, if another delivery or a cancel got there first); a refusal by
    a stage (rate limit, budget, guard, flag) ends the run `failed` with that error's code: no
    automatic retry, the pipeline's own retries and fallbacks have had their turn within the run;
  * while it runs, the row is read every RUN_CANCEL_POLL_SECONDS (one primary-key query a second
    per running async run by default): `cancel_requested` cancels the turn (ChatTurn stores it
    cancelled, what was produced metered), within that interval.
Celery acknowledges late (settings) and the run's lease is renewed by agents.recovery, so a
worker that dies mid-run is redelivered — by the broker, or by the sweeper, which queues a dead
`task` run again instead of ending it — and the run completes once.

After a run ends (`run_ended`, in the transaction of its final write: AsyncRunStage): a failed or
interrupted run becomes a DeadLetter (masked context; the admin's retry queues it again); a
succeeded or cancelled one drops its `input` (its messages are in the session transcript, masked
as the agent says); the callback is enqueued once that commits.

Callbacks: `POST <callback_url>` with the run as `GET /api/v1/runs/{id}` shows it, signed as budget
alerts are (agentplatform.webhooks, RUN_CALLBACK_SECRET), through the outbound guard
(agents.skills.outbound: public addresses only, checked when the run is created and again when
it connects); retried with backoff, RUN_CALLBACK_MAX_RETRIES times, then a DeadLetter.

On the embedded default (Celery eager) the same coroutines run on agentplatform.background's
loop in the web process, without waiting: the API is the same.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Iterable

import httpx
from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Case, Q, Value, When
from django.utils import timezone

from agentplatform.background import background_submit
from agentplatform.celery import task_enqueue
from agentplatform.db import run_db
from agentplatform.errors import AuthenticationFailed, Conflict, InvalidRequest, NotFound, PlatformError
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
from governance.audit import audit_record
from governance.masking import mask_data, mask_text
from governance.permissions import owned_by_key
from governance.principal import Principal
from governance.selectors import principal_for_key_id

from .chat_input import MAX_CALLBACK_URL_CHARS, ChatInput
from .models import DeadLetter, Run, Session
from .recovery import sweep_run
from .pipeline import ChatTurn, RunNotQueued, authorize_agent, principal_and_agent, session_title
from .selectors import AgentSpec, run_usage, runs_with_usage, session_continues, usd_text
from .skills.base import SkillError
from .skills.outbound import HostUnresolved, http_url, outbound_stream, public_url_check
from .tasks import deliver_run_callback_task, execute_run_task

logger = logging.getLogger("agents.runs")

RUN_TASK = DeadLetter.Task.RUN.value
CALLBACK_TASK = DeadLetter.Task.CALLBACK.value
CALLBACK_EVENT = "run.completed"
USER_AGENT = "agent-platform-runs/1"
ERROR_MAX_CHARS = 500
KEY_INACTIVE = "api_key_inactive"


# --- creating ----------------------------------------------------------------------------------


async def callback_url_check(url: str) -> None:
    """400 for a callback URL whose host is not at a public address (the outbound guard's rule)."""
    try:
        async with asyncio.timeout(settings.RUN_CALLBACK_TIMEOUT):
            await public_url_check(httpx.URL(url))
    except SkillError as exc:
        raise InvalidRequest(f"callback_url: {exc}.", code="invalid_field", param="callback_url") from None
    except TimeoutError:
        raise InvalidRequest("callback_url: its host could not be resolved in time.", code="invalid_field",
                             param="callback_url") from None


def async_run_create(*, principal: Principal, agent: AgentSpec, data: ChatInput, request_id: str = "",
                     client_ip: str | None = None) -> Run:
    """The queued run (and its session when new), its execution enqueued on commit."""
    now = timezone.now()
    clean = mask_text if agent.mask_transcripts else _same
    client_metadata = mask_data(data.metadata) if agent.mask_transcripts else data.metadata
    session_id = data.session_id or uuid.uuid4()
    with transaction.atomic():
        session = Session.objects.filter(pk=session_id).first()
        if session is None:
            try:
                with transaction.atomic():
                    session = Session.objects.create(
                        id=session_id, agent_id=agent.id, api_key_id=principal.key_id, metadata=client_metadata,
                        title=session_title(data.messages, clean), last_activity_at=now)
            except IntegrityError:
                session = Session.objects.filter(pk=session_id).first()  # created meanwhile
                if session is None:
                    raise
        if not session_continues(session, agent_id=agent.id, principal=principal):
            raise NotFound("No such session for this agent.", code="session_not_found", param="session_id")
        run = Run.objects.create(
            agent_id=agent.id, session=session, api_key_id=principal.key_id, status=Run.Status.QUEUED,
            transport=Run.Transport.TASK, model=agent.model, request_id=(request_id or "")[:128], started_at=now,
            queued_at=now, enqueued_at=now, callback_url=data.callback_url or "",
            callback_status=Run.CallbackStatus.PENDING if data.callback_url else Run.CallbackStatus.NONE,
            input={"messages": data.messages, "metadata": data.metadata, "client_ip": client_ip},
            metadata={"client": client_metadata} if client_metadata else {})
        transaction.on_commit(lambda: run_enqueue(run.id))
    return run


# --- enqueueing ----------------------------------------------------------------------------------


def _eager() -> bool:
    return bool(execute_run_task.app.conf.task_always_eager)


def run_enqueue(run_id: uuid.UUID) -> None:
    """Hand the run to a worker (eager: to this process's background loop); never raises — a
    run whose enqueue is lost stays queued and runs_requeue_lost enqueues it again."""
    try:
        if _eager():
            background_submit(run_execute(run_id))
        else:
            task_enqueue(execute_run_task, args=[str(run_id)])
    except Exception:
        logger.exception("Could not enqueue run %s (it stays queued and is enqueued again later)", run_id)


def run_callback_enqueue(run_id: uuid.UUID) -> None:
    try:
        if _eager():
            background_submit(_deliver_eagerly(run_id))
        else:
            task_enqueue(deliver_run_callback_task, args=[str(run_id)])
    except Exception:
        logger.exception("Could not enqueue the callback of run %s (enqueued again later)", run_id)


def runs_requeue_lost(*, now: datetime | None = None, limit: int = 500) -> int:
    """Enqueue again the runs queued for RUN_REQUEUE_AFTER_SECONDS without a worker starting them,
    and the callbacks of ended runs never tried as long (lost enqueues: the broker was down, the
    process died before its eager loop ran them). Returns how many. A duplicate costs nothing:
    the task finds the run no longer queued (or the callback no longer pending)."""
    now = now or timezone.now()
    cutoff = now - timedelta(seconds=settings.RUN_REQUEUE_AFTER_SECONDS)
    runs = list(Run.objects.filter(status=Run.Status.QUEUED, enqueued_at__lt=cutoff)
                .values_list("id", flat=True)[:limit])
    callbacks = list(Run.objects.filter(callback_status=Run.CallbackStatus.PENDING, finished_at__lt=cutoff,
                                        callback_attempts=0, status__in=Run.FINAL_STATUSES)
                     .filter(Q(enqueued_at__lt=cutoff) | Q(enqueued_at__isnull=True))
                     .values_list("id", flat=True)[:limit])
    if runs or callbacks:
        Run.objects.filter(id__in=runs + callbacks).update(enqueued_at=now)
        logger.warning("Enqueueing again %d queued run(s) and %d callback(s) never started", len(runs),
                       len(callbacks))
    for run_id in runs:
        run_enqueue(run_id)
    for run_id in callbacks:
        run_callback_enqueue(run_id)
    return len(runs) + len(callbacks)


# --- cancelling ----------------------------------------------------------------------------------


class RunNotCancellable(Conflict):
    code = "run_not_cancellable"


def run_cancel(*, run_id: uuid.UUID, principal: Principal, request_id: str = "", client_ip: str | None = None) -> Run:
    """Cancel a run of the caller's (an admin key: any): a queued one at once, a running one by
    asking its worker (it stops within RUN_CANCEL_POLL_SECONDS). A cancelled run: nothing again.
    Audited `run.cancelled` / `run.cancel_requested`."""
    with transaction.atomic():
        run = _visible_runs(principal).select_for_update().filter(pk=run_id).first()
        if run is None:
            raise NotFound("No such run.", code="run_not_found")
        if run.status == Run.Status.CANCELLED or (run.status == Run.Status.RUNNING and run.cancel_requested):
            return run
        if run.transport != Run.Transport.TASK:
            raise RunNotCancellable("Only async runs (POST /api/v1/agents/{name}/runs) can be cancelled here; "
                                    "a streamed run stops when its client disconnects.")
        if run.status not in (Run.Status.QUEUED, Run.Status.RUNNING):
            raise RunNotCancellable(f"The run has ended ({run.status}).")
        now = timezone.now()
        if run.status == Run.Status.QUEUED:
            Run.objects.filter(pk=run.pk).update(status=Run.Status.CANCELLED, cancel_requested=True, finished_at=now,
                                                 latency_ms=0)
            action = "run.cancelled"
        else:
            Run.objects.filter(pk=run.pk).update(cancel_requested=True)
            action = "run.cancel_requested"
        audit_record(actor=principal.actor, action=action, target=f"run:{run.pk}", request_id=request_id,
                     client_ip=client_ip, details={"agent_id": run.agent_id, "status": run.status})
        if action == "run.cancelled":
            run_ended(run.pk)
        run.refresh_from_db()
    return run


# --- executing -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Job:
    id: uuid.UUID
    api_key_id: int | None
    agent_name: str
    session_id: uuid.UUID | None
    request_id: str
    messages: list
    metadata: dict
    client_ip: str | None
    attempts: int


async def run_execute(run_id: uuid.UUID) -> str:
    """Execute a queued run (see the module doc); returns what happened, for the task's log."""
    job = await run_db(_job_for, run_id)
    if isinstance(job, str):
        return job
    principal = await run_db(principal_for_key_id, job.api_key_id) if job.api_key_id else None
    agent = None
    error: PlatformError | None = None
    if principal is None:
        error = AuthenticationFailed("The API key that queued this run was revoked, disabled, deleted or expired "
                                     "before the run started.", code=KEY_INACTIVE)
    else:
        _, spec = await principal_and_agent(None, job.agent_name)
        try:
            agent = authorize_agent(principal, spec, job.agent_name)
        except NotFound as exc:
            error = exc
    if error is None:
        turn = ChatTurn(principal=principal, agent=agent, input_messages=job.messages, transport=Run.Transport.TASK,
                        stream=False, request_id=job.request_id or None, session_id=job.session_id,
                        metadata=job.metadata, client_ip=job.client_ip, run_id=job.id, queued=True,
                        counted_before=job.attempts > 0)
        try:
            await turn.prepare()
        except RunNotQueued:
            return "not queued: taken by another delivery, or cancelled"
        except PlatformError as exc:
            error = exc
    if error is not None:
        await run_db(_refused, run_id, error)
        return f"failed: {error.code}"
    await _run_until_done(turn, run_id)
    if turn.swept:
        return "interrupted: the sweeper ended it first"
    return turn.status  # what follows its end was done with it (AsyncRunStage)


def _job_for(run_id: uuid.UUID) -> _Job | str:
    now = timezone.now()
    run = Run.objects.select_related("agent").filter(pk=run_id).first()
    if run is None:
        return "missing"
    if run.status == Run.Status.RUNNING:
        if run.lease_expires_at is None or run.lease_expires_at > now:
            return "running elsewhere (its lease is live)"
        # Its worker died (this is the redelivery): settle that attempt and queue the run again.
        sweep_run(run.id, now=now, enqueue=False)
        run = Run.objects.select_related("agent").get(pk=run_id)
    if run.status != Run.Status.QUEUED:
        return f"ended already ({run.status})"
    if run.cancel_requested:  # a cancel that raced the start
        if Run.objects.filter(pk=run.pk, status=Run.Status.QUEUED).update(status=Run.Status.CANCELLED,
                                                                          finished_at=now, latency_ms=0):
            run_ended(run.pk)
        return "cancelled"
    data = run.input or {}
    return _Job(id=run.id, api_key_id=run.api_key_id, agent_name=run.agent.name, session_id=run.session_id,
                request_id=run.request_id, messages=list(data.get("messages") or []),
                metadata=dict(data.get("metadata") or {}), client_ip=data.get("client_ip"), attempts=run.attempts)


def _refused(run_id: uuid.UUID, error: PlatformError) -> None:
    """A run refused before it started (key, agent, a stage): failed with that error."""
    with transaction.atomic():
        ended = Run.objects.filter(pk=run_id, status=Run.Status.QUEUED).update(
            status=Run.Status.FAILED, error_code=error.code[:64], error_message=error.message, latency_ms=0,
            finished_at=timezone.now())
        if ended:
            run_ended(run_id)
    logger.info("Async run %s refused at execution: %s", run_id, error.code)


async def _run_until_done(turn: ChatTurn, run_id: uuid.UUID) -> None:
    """Read the turn to its end, reading the row every RUN_CANCEL_POLL_SECONDS: a cancel request
    cancels the turn (which stores the run cancelled)."""

    async def consume() -> None:
        async for _ in turn.events():
            pass

    consumer = asyncio.ensure_future(consume())
    try:
        while not consumer.done():
            await asyncio.wait({consumer}, timeout=settings.RUN_CANCEL_POLL_SECONDS)
            if consumer.done() or turn.ended:
                break
            if await run_db(_cancel_requested, run_id):
                logger.info("Async run %s: cancel requested, cancelling its turn", run_id)
                consumer.cancel()
                break
        await asyncio.wait({consumer})
    except asyncio.CancelledError:  # the worker is going away: the turn stores what it has
        consumer.cancel()
        await asyncio.wait({consumer})
        raise
    if not consumer.cancelled() and consumer.exception() is not None:
        raise consumer.exception()


def _cancel_requested(run_id: uuid.UUID) -> bool:
    return Run.objects.filter(pk=run_id, cancel_requested=True).exists()


# --- after a run ended -----------------------------------------------------------------------------


class AsyncRunStage:
    """Pipeline stage (AGENT_PIPELINE_STAGES): an async run's follow-up (run_ended) commits with
    the run's final write, so a run is never seen failed without its dead letter, nor ended
    without its callback enqueued. Other transports: nothing."""

    def persist(self, turn: ChatTurn) -> None:
        if turn.transport == Run.Transport.TASK:
            run_ended(turn.run_id)



def run_ended(run_id: uuid.UUID) -> None:
    """What follows a run's end (any path: the worker, a refusal, a cancel, the sweeper): a failed
    or interrupted run is dead-lettered, a succeeded or cancelled one drops its input, the callback
    is enqueued on commit. Call inside the transaction that ended it, or after it committed."""
    with transaction.atomic():
        run = Run.objects.select_related("agent", "api_key").filter(pk=run_id).first()
        if run is None or run.status not in Run.FINAL_STATUSES or run.transport != Run.Transport.TASK:
            return
        if run.status in (Run.Status.FAILED, Run.Status.INTERRUPTED):
            _dead_letter(run, task=RUN_TASK, error_code=run.error_code, error_message=run.error_message,
                         attempts=run.attempts)
        elif run.input:
            Run.objects.filter(pk=run.pk).update(input={})
        if run.callback_url and run.callback_status == Run.CallbackStatus.PENDING:
            Run.objects.filter(pk=run.pk).update(enqueued_at=timezone.now())
            transaction.on_commit(lambda: run_callback_enqueue(run_id))


def _masked_url(url: str) -> str:
    """A callback URL as dead letters show it: without its query (a token often hides there)."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        return ""
    return str(parsed.copy_with(query=None, fragment=None))


def _dead_letter(run: Run, *, task: str, error_code: str, error_message: str, attempts: int) -> DeadLetter | None:
    """One open (not retried) dead letter per run and task."""
    if DeadLetter.objects.filter(run_id=run.pk, task=task, retried_at__isnull=True).exists():
        return None
    data = run.input or {}
    context = mask_data({
        "agent": run.agent.name, "api_key": run.api_key.prefix if run.api_key_id else None,
        "session_id": str(run.session_id) if run.session_id else None, "request_id": run.request_id,
        "status": run.status, "model": run.model, "messages": data.get("messages") or [],
        "metadata": data.get("metadata") or {}, "callback_url": _masked_url(run.callback_url) or None,
    })
    letter = DeadLetter.objects.create(run=run, task=task, context=context, error_code=error_code[:64],
                                       error_message=mask_text(error_message)[:ERROR_MAX_CHARS], attempts=attempts)
    logger.warning("Dead letter %s: %s of run %s failed (%s) after %d attempt(s)", letter.pk, task, run.pk,
                   error_code, attempts)
    return letter


# --- callbacks ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Attempt:
    status: str  # "sent", "retry", "dead" or "skipped" (no callback pending, or the run is not over)
    attempts: int = 0
    error: str = ""


def callback_retry_countdown(attempts: int) -> float:
    return retry_countdown(attempts, base=settings.RUN_CALLBACK_RETRY_BACKOFF_SECONDS)


async def run_callback_attempt(run_id: uuid.UUID) -> Attempt:
    """POST the finished run to its callback URL once and record the outcome: sent, failed (retry
    later) or dead (out of retries, or refused for good: a DeadLetter)."""
    job = await run_db(_callback_job, run_id)
    if job is None:
        return Attempt("skipped")
    url, payload, attempts = job
    payload = {"type": CALLBACK_EVENT, "attempt": attempts, "sent_at": timezone.now().isoformat(), **payload}
    body = webhook_body(payload)
    headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT, EVENT_HEADER: CALLBACK_EVENT,
               DELIVERY_HEADER: str(run_id)}
    if settings.RUN_CALLBACK_SECRET:
        headers[SIGNATURE_HEADER] = webhook_signature(body, settings.RUN_CALLBACK_SECRET)
    timeout = settings.RUN_CALLBACK_TIMEOUT
    try:
        try:
            target = http_url(url, max_chars=MAX_CALLBACK_URL_CHARS, what="callback_url")
            async with asyncio.timeout(timeout):
                async with outbound_stream("POST", target, timeout=timeout, headers=headers, content=body) as response:
                    text = await _head_of(response)
        except HostUnresolved as exc:  # DNS may answer again
            raise DeliveryFailed(str(exc)) from None
        except SkillError as exc:  # not at a public address (any more), or not a URL: for good
            raise DeliveryFailed(str(exc), permanent=True) from None
        except (TimeoutError, httpx.TimeoutException):
            raise DeliveryFailed(f"timed out after {timeout:g} s") from None
        except httpx.HTTPError as exc:
            # The message, never the URL (it may carry a token).
            raise DeliveryFailed(f"{type(exc).__name__}: {exc}") from None
        webhook_outcome(response.status_code, text)
    except DeliveryFailed as exc:
        return await run_db(_callback_failed, run_id, attempts, mask_text(str(exc))[:ERROR_MAX_CHARS], exc.permanent)
    await run_db(_callback_sent, run_id, attempts)
    return Attempt("sent", attempts)


async def _head_of(response: httpx.Response, limit: int = 200) -> str:
    """The start of an answer's body, for the error message (never read whole: it may be huge)."""
    head = b""
    async for chunk in response.aiter_bytes():
        head += chunk
        if len(head) >= limit:
            break
    return head[:limit].decode("utf-8", errors="replace")


def _callback_job(run_id: uuid.UUID) -> tuple[str, dict, int] | None:
    run = (runs_with_usage(Run.objects.select_related("agent"))
           .filter(pk=run_id, callback_status=Run.CallbackStatus.PENDING, status__in=Run.FINAL_STATUSES).first())
    if run is None or not run.callback_url:
        return None
    return run.callback_url, run_payload(run), run.callback_attempts + 1


def _callback_sent(run_id: uuid.UUID, attempts: int) -> None:
    now = timezone.now()
    Run.objects.filter(pk=run_id, callback_status=Run.CallbackStatus.PENDING).update(
        callback_status=Run.CallbackStatus.SENT, callback_attempts=attempts, callback_error="",
        callback_delivered_at=now)


def _callback_failed(run_id: uuid.UUID, attempts: int, error: str, permanent: bool) -> Attempt:
    if not permanent and attempts <= settings.RUN_CALLBACK_MAX_RETRIES:
        Run.objects.filter(pk=run_id, callback_status=Run.CallbackStatus.PENDING).update(
            callback_attempts=attempts, callback_error=error)
        logger.info("Callback of run %s failed, attempt %d: %s", run_id, attempts, error)
        return Attempt("retry", attempts, error)
    with transaction.atomic():
        changed = Run.objects.filter(pk=run_id, callback_status=Run.CallbackStatus.PENDING).update(
            callback_status=Run.CallbackStatus.DEAD, callback_attempts=attempts, callback_error=error)
        if changed:
            run = Run.objects.select_related("agent", "api_key").get(pk=run_id)
            _dead_letter(run, task=CALLBACK_TASK, error_code="callback_failed", error_message=error, attempts=attempts)
    return Attempt("dead", attempts, error)


async def _deliver_eagerly(run_id: uuid.UUID) -> str:
    """The embedded default's callback: attempts with their backoff, on the background loop."""
    while True:
        attempt = await run_callback_attempt(run_id)
        if attempt.status != "retry":
            return attempt.status
        await asyncio.sleep(callback_retry_countdown(attempt.attempts))


# --- dead letters ----------------------------------------------------------------------------------


def dead_letters_retry(*, ids: Iterable[int], actor: str) -> int:
    """Run dead letters again (the admin's action): a run is queued again (a new attempt in the same
    session; its earlier usage stays billed), a callback is sent again from its first attempt.
    Letters retried already are left alone. Audited `run.retried` / `run.callback.retried`."""
    now = timezone.now()
    retried = 0
    with transaction.atomic():
        letters = list(DeadLetter.objects.select_for_update().filter(id__in=list(ids), retried_at__isnull=True))
        for letter in letters:
            if letter.task == RUN_TASK:
                done = Run.objects.filter(pk=letter.run_id, status__in=(Run.Status.FAILED, Run.Status.INTERRUPTED)) \
                    .update(status=Run.Status.QUEUED, error_code="", error_message="", finished_at=None,
                            cancel_requested=False, lease_expires_at=None, reservation={}, enqueued_at=now,
                            output="", callback_attempts=0, callback_error="", callback_delivered_at=None,
                            callback_status=_pending_if_url())
                action, enqueue = "run.retried", run_enqueue
            else:
                done = Run.objects.filter(pk=letter.run_id, callback_status=Run.CallbackStatus.DEAD).update(
                    callback_status=Run.CallbackStatus.PENDING, callback_attempts=0, callback_error="",
                    enqueued_at=now)
                action, enqueue = "run.callback.retried", run_callback_enqueue
            DeadLetter.objects.filter(pk=letter.pk).update(retried_at=now, retried_by=actor[:200])
            if not done:
                continue  # the run changed meanwhile (retried through another letter): marked, not run
            audit_record(actor=actor, action=action, target=f"run:{letter.run_id}",
                         details={"dead_letter_id": letter.pk, "error_code": letter.error_code,
                                  "previous_attempts": letter.attempts})
            transaction.on_commit(lambda run_id=letter.run_id, enqueue=enqueue: enqueue(run_id))
            retried += 1
    return retried


def _pending_if_url() -> Case:
    return Case(When(callback_url="", then=Value(Run.CallbackStatus.NONE)), default=Value(Run.CallbackStatus.PENDING))


# --- reads ------------------------------------------------------------------------------------------


def _visible_runs(principal: Principal):
    return owned_by_key(Run.objects.all(), principal)


def run_payload(run: Run) -> dict:
    """A run as the API shows it (GET /api/v1/runs/{id}, lists, callbacks). `run` is annotated by
    selectors.runs_with_usage and has its agent loaded."""
    final = run.status in Run.FINAL_STATUSES
    client = (run.metadata or {}).get("client")
    if client is None:
        client = (run.input or {}).get("metadata") or {}
    callback = None
    if run.callback_url:
        callback = {"status": run.callback_status or None, "attempts": run.callback_attempts,
                    "delivered_at": run.callback_delivered_at.isoformat() if run.callback_delivered_at else None,
                    "error": run.callback_error or None}
    return {
        "id": str(run.id), "object": "run", "agent": run.agent.name,
        "session_id": str(run.session_id) if run.session_id else None,
        "status": run.status, "transport": run.transport, "model": run.model,
        "output": run.output if final else "",
        "usage": run_usage(run), "cost_usd": usd_text(getattr(run, "cost_usd", None)),
        "error": {"code": run.error_code, "message": run.error_message} if run.error_code else None,
        "metadata": client, "attempts": run.attempts, "cancel_requested": run.cancel_requested,
        "queued_at": run.queued_at.isoformat() if run.queued_at else None,
        "started_at": run.started_at.isoformat() if run.status != Run.Status.QUEUED else None,
        "finished_at": run.finished_at.isoformat() if run.finished_at else None,
        "latency_ms": run.latency_ms, "callback": callback, "variant": run.variant or None,
        "feedback": run.feedback,
    }


def _same(text: str) -> str:
    return text
