"""The request pipeline: every transport (REST, SSE, OpenAI-compatible, WebSocket, tasks) runs a
chat turn through here, so authorization, sessions, persistence and — as later issues add them —
rate limits, idempotency, budgets, metering and audit apply to all of them alike.

    turn = ChatTurn(...)
    await turn.prepare()          # authorize, load the session history; raises PlatformError
    async for event in turn.events():   # runtime events; persists the run when it ends
        ...

Stages (settings.AGENT_PIPELINE_STAGES, dotted paths to classes) hook in around the run,
each defining any of:
  `cache_keys(agent_name)` sync, no I/O: the shared-cache entries the stage reads on every
                        turn of that agent; fetched with the API key and the agent in their one
                        round trip (`principal_and_agent`) and handed over as `turn.agent.cached`
                        ({key: entry, or None for a miss});
  `async before(turn)`  may raise a PlatformError to refuse the turn before the model is
                        called (rate limit, budget, guard); may narrow `turn.skills` or add
                        `turn.response_headers`;
  `start(turn)`         sync, inside the transaction that records the run as `running` before
                        the model is called (the budget stage reserves here, so a reservation
                        never exists without the run that holds it); may raise a PlatformError;
                        a stage that locks rows here sets `turn.start_locks = True` in `before`
                        (the transaction then runs alone, not in a group commit);
  `finished(turn)`      sync, no I/O, when the run ends and before its last event is sent
                        (billing prices the run here so `done` carries its cost);
  `persist(turn)`       sync, inside the transaction that stores the run, so its rows (audit
                        entry, usage) commit or vanish with the run's own;
  `async after(turn)`   sees the finished (or failed, or cancelled) turn.
A turn refused in `before` or `start` is reported to each stage's `refused(turn, error)`.

Crash safety (agents.recovery): the run row exists from the start, `running`, with a lease its
worker renews (checkpointing what was produced) while it runs; a run whose worker died is ended
`interrupted` by the sweeper. The run's final write updates that row only while it is still
`running`: a run the sweeper ended meanwhile (a worker stalled past its lease) is not stored or
settled twice (`turn.swept`).
The transcript and run are written in one transaction, group-committed, after the model answered;
the run's last event (`done` or `error`) is yielded only once that transaction committed.
A run whose rows cannot be stored (a row the database refuses, a session deleted mid-run) is
stored again without its transcript (run, usage, audit entry), logged as an error; should that
fail too, the turn ends with a 500 `run_not_stored` error instead of `done`: never an answer
that nobody metered.

`input_messages` are validated and normalized by agents.chat_input: content is one string.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import AsyncIterator

from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.utils import timezone
from django.utils.module_loading import import_string

from agentplatform.cache import cache_get_many
from agentplatform.db import run_db, write_db
from agentplatform.errors import NotFound, PlatformError
from agentplatform.tracing import stage_hook
from governance.masking import mask_data, mask_text
from governance.principal import Principal
from governance.selectors import api_key_cache_key, api_key_entry, principal_from_entry
from governance.services import split_key

from .models import Message, Run, Session
from .runtime import AgentRun
from .streaming import with_turn_headers
from .selectors import (
    AgentSpec,
    agent_cache_key,
    agent_entry_from_db,
    agent_spec_from_entry,
    session_continues,
    session_history,
)

logger = logging.getLogger("agents.pipeline")

TRANSCRIPT_NOT_STORED = "transcript_not_stored"
STORE_FAILED = "run_not_stored"


class RunNotStored(PlatformError):
    code = STORE_FAILED
    message = "The answer could not be recorded, so it is not delivered; retry the request."


class RunNotQueued(PlatformError):
    """An async run's row is no longer `queued` when its worker picks it up (cancelled, or
    already taken by another delivery)."""

    http_status = 409
    code = "run_not_queued"
    message = "The run is no longer queued."


class RunAlreadyEnded(Exception):
    """The sweeper ended the run (its lease ran out) before its worker stored it."""


async def principal_and_agent(key: str | None, agent_name: str | None) -> tuple[Principal | None, AgentSpec | None]:
    """Resolve the caller's key and the agent in one cache round trip (no query when warm),
    with the entries the stages read on every turn (their `cache_keys`)."""
    prefix = split_key(key) if key else None
    keys = []
    staged: list[str] = []
    if prefix:
        keys.append(api_key_cache_key(prefix))
    if agent_name:
        keys.append(agent_cache_key(agent_name))
        staged = [k for cache_keys in _hooks("cache_keys") for k in cache_keys(agent_name)]
        keys += staged
    found = await cache_get_many(keys) if keys else {}
    key_entry = found.get(api_key_cache_key(prefix)) if prefix else None
    agent_entry = found.get(agent_cache_key(agent_name)) if agent_name else None
    if (prefix and key_entry is None) or (agent_name and agent_entry is None):
        key_entry, agent_entry = await run_db(_load_entries, prefix, key_entry, agent_name, agent_entry)
    principal = principal_from_entry(key_entry, key) if key and prefix else None
    agent = agent_spec_from_entry(agent_entry)
    if agent is not None and staged:
        agent = dataclasses.replace(agent, cached={k: found.get(k) for k in staged})
    return principal, agent


def _load_entries(prefix, key_entry, agent_name, agent_entry):
    if prefix and key_entry is None:
        key_entry = api_key_entry(prefix)
    if agent_name and agent_entry is None:
        agent_entry = agent_entry_from_db(agent_name)
    return key_entry, agent_entry


def authorize_agent(principal: Principal, agent: AgentSpec | None, name: str) -> AgentSpec:
    """The agent, if it exists, is enabled and this key may call it; 404 otherwise (also when the
    key may not see it: a client learns nothing about agents it is not given)."""
    if agent is None or not agent.enabled or not principal.may_use_agent(agent.name):
        raise NotFound(f"No agent named {name!r}.", code="agent_not_found", param="agent")
    return agent


@dataclass
class ChatTurn:
    principal: Principal | None
    agent: AgentSpec
    input_messages: list[dict]
    transport: str
    stream: bool
    request_id: str | None = None
    session_id: uuid.UUID | None = None
    # REST, SSE and WebSocket turns continue a stored session; OpenAI-compatible calls bring
    # their whole conversation and are stateless.
    use_session: bool = True
    metadata: dict = field(default_factory=dict)
    user_id: int | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    client_ip: str | None = None
    # Set by the pipeline and its stages:
    skills: tuple = ()
    # The experiment variant serving the turn (experiments.stages sets both, and `agent` to the
    # variant's configuration): stored on the run, its usage and audit entry, returned to the client.
    variant: str = ""
    experiment_id: int | None = None
    response_headers: dict = field(default_factory=dict)
    # What stages want to remember between before/persist/after (keyed by stage).
    notes: dict = field(default_factory=dict)
    # The run's cost in USD (Decimal) and its tokens as billed, set by the billing stage when
    # the run ends.
    cost_usd: object = None
    billed_usage: dict | None = None
    # True once the runtime's last event arrived: what remains is storing the run, which a
    # cancel must not cut short.
    ended: bool = False
    # Set when the run could only be stored without its transcript, or not at all.
    store_error: str = ""
    # A prepared turn whose events nobody starts reading within this many seconds (a streaming
    # client that left before the first frame) is finished as cancelled, so what its stages
    # hold (budget reservations) is released and the run is still recorded.
    start_timeout: float = 10.0
    # An async run: `run_id` names its `queued` row, which the start moves to `running`.
    queued: bool = False
    # An async run started again (its worker died, an admin retried it): an earlier attempt's
    # usage records already count it as a request, so this attempt's do not (billing.metering).
    counted_before: bool = False
    # Set in `before` by a stage whose `start` locks rows (see the module doc).
    start_locks: bool = False
    # The open budget reservation, as stored on the run row for the sweeper (set in `start`).
    reservation: dict = field(default_factory=dict)
    # True once the run row is recorded as running; `swept` when the sweeper ended it first.
    recorded: bool = False
    swept: bool = False
    lease_renewed_at: float = 0.0
    _started: bool = False
    _watchdog: object = None
    run_id: uuid.UUID = field(default_factory=uuid.uuid4)
    started_at: datetime | None = None
    session_exists: bool = False
    run: AgentRun | None = None
    status: str = Run.Status.RUNNING
    latency_ms: int = 0
    _t0: float = 0.0

    async def prepare(self) -> None:
        self._t0 = time.perf_counter()
        self.started_at = timezone.now()
        history: list[dict] = []
        if self.use_session:
            if self.session_id is None:
                self.session_id = uuid.uuid4()
            else:
                history = await run_db(self._load_session)
        # A skill the key may not use is never offered to the model.
        principal = self.principal
        self.skills = tuple(s for s in self.agent.skills if principal is None or principal.may_use_skill(s.name))
        try:
            for before in _hooks("before"):
                await before(self)
            await self._record_start()
        except PlatformError as exc:
            for refused in _hooks("refused"):
                await refused(self, exc)
            raise
        messages = [{"role": "system", "content": self.agent.system_prompt}] if self.agent.system_prompt else []
        messages += history
        messages += self.input_messages
        self.run = AgentRun(agent=self.agent, messages=messages, stream=self.stream, request_id=self.request_id,
                            temperature=self.temperature, max_tokens=self.max_tokens, skills=self.skills)
        self._watchdog = asyncio.get_running_loop().call_later(self.start_timeout, self._abandon_if_unstarted)

    async def _record_start(self) -> None:
        """Record the run as running (with what `start` hooks do) before the model is called."""
        from .recovery import leases

        # Row locks (budget reservations) are taken in a transaction of their own: in a group
        # commit they would be held while the batch waits for other jobs' locks.
        await (run_db(self._start_row) if self.start_locks else write_db(self._start_row))
        self.recorded = True
        leases.track(self)

    def _start_row(self) -> None:
        from .recovery import lease_deadline, prompt_estimate

        self.notes["_prompt_estimate"] = prompt_estimate(self)
        with transaction.atomic():
            for start in _hooks("start"):
                start(self)
            fields = {
                "status": Run.Status.RUNNING, "transport": self.transport, "model": self.agent.model,
                "api_key_id": self.principal.key_id if self.principal else None,
                "request_id": self.request_id or "", "started_at": self.started_at,
                "lease_expires_at": lease_deadline(), "reservation": self.reservation,
                "variant": self.variant[:100], "experiment_id": self.experiment_id,
                "metadata": {"checkpoint": {"prompt_tokens": self.notes["_prompt_estimate"]}},
            }
            if self.queued:
                if not Run.objects.filter(pk=self.run_id, status=Run.Status.QUEUED,
                                          cancel_requested=False).update(**fields, attempts=F("attempts") + 1):
                    raise RunNotQueued()
            else:
                Run.objects.create(id=self.run_id, agent_id=self.agent.id, **fields)

    def _abandon_if_unstarted(self) -> None:
        if not self._started:
            self._started = True
            self.status = Run.Status.CANCELLED
            self._abandoned = asyncio.ensure_future(self._abandon())

    async def _abandon(self) -> None:
        self.latency_ms = int((time.perf_counter() - self._t0) * 1000)
        await asyncio.shield(self._finish())

    def _load_session(self) -> list[dict]:
        session = Session.objects.filter(pk=self.session_id).first()
        if session is None:
            return []  # a client-chosen id: created with the run
        if not session_continues(session, agent_id=self.agent.id, principal=self.principal, user_id=self.user_id):
            raise NotFound("No such session for this agent.", code="session_not_found", param="session_id")
        self.session_exists = True
        return session_history(session=session, limit=settings.AGENT_HISTORY_LIMIT)

    async def events(self) -> AsyncIterator[dict]:
        assert self.run is not None, "prepare() first"
        if self._started:
            return  # abandoned before anyone read it: already finished as cancelled
        self._started = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        last: dict | None = None
        try:
            async for event in self.run.events():
                if event["type"] in ("done", "error"):
                    if event["type"] == "error":
                        self.status = Run.Status.FAILED
                    self.latency_ms = int((time.perf_counter() - self._t0) * 1000)
                    self.ended = True
                    self._run_finished()
                    last = event  # sent once the run is stored (below)
                    continue
                yield event
            if self.status == Run.Status.RUNNING:
                self.status = Run.Status.SUCCEEDED
        except BaseException:
            # The consumer went away (client disconnect, cancel) or something broke: keep and
            # meter what was produced all the same.
            if self.status == Run.Status.RUNNING:
                self.status = Run.Status.CANCELLED
            raise
        finally:
            if not self.ended:
                self.latency_ms = int((time.perf_counter() - self._t0) * 1000)
            # Shielded: a cancelled request must not lose its run record halfway.
            await asyncio.shield(self._finish())
        if self.store_error == STORE_FAILED:
            error = RunNotStored()
            self.run.error = error
            last = {"type": "error", "code": error.code, "message": error.message, "status": error.http_status}
        if last is not None:
            yield last

    def _run_finished(self) -> None:
        if self.notes.get("_finished"):
            return
        self.notes["_finished"] = True
        for finished in _hooks("finished"):
            try:
                finished(self)
            except Exception:
                logger.exception("Pipeline stage %s failed when run %s ended", _owner(finished), self.run_id)

    async def _finish(self) -> None:
        from .recovery import leases

        self._run_finished()  # a run cut short (client gone) is priced too
        try:
            await write_db(self._persist)
        except RunAlreadyEnded:
            self.swept = True
            self.store_error = "run_interrupted"
            logger.warning("Run %s ended after the sweeper had ended it as interrupted (its lease of %s s ran "
                           "out); its estimated usage stands", self.run_id, settings.RUN_LEASE_SECONDS)
        except Exception:
            logger.exception("Could not store run %s with its transcript; storing it without", self.run_id)
            self.store_error = TRANSCRIPT_NOT_STORED  # the stages' rows say so too (audit details)
            try:
                await write_db(lambda: self._persist(transcript=False))
            except Exception:
                self.store_error = STORE_FAILED
                logger.exception("Could not store run %s at all: its usage is NOT metered", self.run_id)
        leases.untrack(self)
        for after in _hooks("after"):
            try:
                await after(self)
            except Exception:
                logger.exception("Pipeline stage %s failed after run %s", _owner(after), self.run_id)

    def _persist(self, transcript: bool = True) -> None:
        """The run, its transcript and the stages' rows (usage, audit) in one transaction;
        without `transcript`, the run alone (no session, messages or client metadata) with the
        stages' rows: what a run whose transcript the database refused still owes."""
        run = self.run
        assert run is not None
        now = timezone.now()
        error = run.error
        # Agents set to mask transcripts store messages, titles, tool arguments and metadata masked.
        masked = self.agent.mask_transcripts
        clean = mask_text if masked else _same
        client_metadata = (mask_data(self.metadata) if masked else self.metadata) if transcript else {}
        with transaction.atomic():  # alone, or a savepoint inside write_db's group commit
            session = None
            if self.use_session and transcript:
                if self.session_exists:
                    session = Session(pk=self.session_id)
                    if not Session.objects.filter(pk=self.session_id).update(last_activity_at=now):
                        raise Session.DoesNotExist(f"Session {self.session_id} was deleted during the run.")
                else:
                    session, _ = Session.objects.get_or_create(
                        pk=self.session_id,
                        defaults={"agent_id": self.agent.id, "api_key_id": self.principal.key_id if self.principal else None,
                                  "user_id": self.user_id, "title": session_title(self.input_messages, clean),
                                  "metadata": client_metadata, "last_activity_at": now})
            ended = Run.objects.filter(pk=self.run_id, status=Run.Status.RUNNING).update(
                session=session, lease_expires_at=None, reservation={},
                variant=self.variant[:100], experiment_id=self.experiment_id,
                output=clean(run.output if self.status == Run.Status.SUCCEEDED else run.partial_output)
                if self.transport == Run.Transport.TASK else "",
                status=self.status, model=_model_of(run),
                prompt_tokens=run.usage.prompt_tokens, completion_tokens=run.usage.completion_tokens,
                total_tokens=run.usage.total_tokens, steps=run.steps, latency_ms=self.latency_ms,
                error_code=error.code if error else "", error_message=error.message if error else "",
                finished_at=now,
                metadata={**({"client": client_metadata} if client_metadata else {}),
                          **({} if transcript else {"transcript_stored": False}),
                          "calls": [{"model": c.model, "prompt_tokens": c.usage.prompt_tokens,
                                     "completion_tokens": c.usage.completion_tokens, "ok": c.ok,
                                     "error": c.error_code, "latency_ms": c.latency_ms,
                                     "estimated": not c.usage.reported} for c in run.calls]},
            )
            if not ended:
                raise RunAlreadyEnded(self.run_id)
            if session is not None:
                rows = [Message(session=session, run_id=self.run_id, role=m["role"],
                                content=clean(m.get("content") or ""), created_at=self.started_at)
                        for m in self.input_messages]
                produced = list(run.produced)
                partial = run.partial_output[len(run.output):] if self.status != Run.Status.SUCCEEDED else ""
                if partial:
                    produced.append({"role": "assistant", "content": partial})
                for index, m in enumerate(produced):
                    is_last = index == len(produced) - 1
                    rows.append(Message(
                        session=session, run_id=self.run_id, role=m["role"], content=clean(m.get("content") or ""),
                        tool_calls=(mask_data(m.get("tool_calls") or []) if self.agent.mask_transcripts
                                    else m.get("tool_calls") or []), tool_call_id=m.get("tool_call_id", ""),
                        name=m.get("name", ""), created_at=now,
                        prompt_tokens=run.usage.prompt_tokens if is_last else 0,
                        completion_tokens=run.usage.completion_tokens if is_last else 0))
                Message.objects.bulk_create(rows)
            for persist in _hooks("persist"):
                persist(self)

    def result(self) -> dict:
        run = self.run
        assert run is not None
        return {
            "id": str(self.run_id),
            "session_id": str(self.session_id) if self.session_id else None,
            "agent": self.agent.name,
            "model": run.model,
            "output": run.output,
            "tool_calls": run.tool_calls,
            "usage": run.usage.as_dict(),
            "cost_usd": str(self.cost_usd) if self.cost_usd is not None else None,
            "latency_ms": self.latency_ms,
            "variant": self.variant or None,
        }


def _model_of(run: AgentRun) -> str:
    """The model that answered; for a run that ended before any answered (cancelled, failed),
    the one it was calling (the last that failed, or was skipped with its circuit open)."""
    return run.model or run.model_in_flight or run.agent.model


def _same(text: str) -> str:
    return text


def session_title(messages: list[dict], clean=_same) -> str:
    for m in messages:
        if m.get("role") == "user":
            # Masked before it is cut, so a secret split at the cut cannot slip through.
            text = " ".join(clean(m.get("content") or "").split())
            return text[:80] + ("…" if len(text) > 80 else "")
    return ""


_HOOKS = ("cache_keys", "before", "start", "refused", "finished", "persist", "after")
_stage_cache: tuple[tuple[str, ...], dict[str, list]] | None = None


def _owner(hook) -> str:
    return type(hook.__self__).__name__


def _hooks(name: str) -> list:
    """The stages' `name` hooks (bound methods), in AGENT_PIPELINE_STAGES order."""
    global _stage_cache
    paths = tuple(settings.AGENT_PIPELINE_STAGES)
    if _stage_cache is None or _stage_cache[0] != paths:
        stages = [import_string(p)() for p in paths]
        _stage_cache = (paths, {hook: [stage_hook(s, hook) for s in stages if hasattr(s, hook)] for hook in _HOOKS})
    return _stage_cache[1][name]


async def chat_complete(turn: ChatTurn) -> dict:
    """Run a prepared turn to the end; raise its error if the model failed."""
    async for _ in turn.events():
        pass
    if turn.run.error is not None:
        raise with_turn_headers(turn, turn.run.error)
    return turn.result()
