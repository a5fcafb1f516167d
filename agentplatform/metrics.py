"""The platform's Prometheus metrics: the one place they are defined and updated.

Every instrumentation point elsewhere is one call into this module (`llm_call_ended(...)`,
`stream_opened(...)`, ...), so the code it sits in stays readable and merges stay easy. The
turn-level figures come from `MetricsStage`, a pipeline stage (AGENT_PIPELINE_STAGES) whose
`after` and `refused` hooks see every turn of every transport end; it also writes the turn's
log line (`agentplatform.turn`, see agentplatform.logs).

Cost on the hot path: an update is an in-memory write — a float under a lock in one process,
or, in multiprocess mode, a write into a memory-mapped file (no system call, no I/O wait; the
file grows, rarely, by a page). Collecting happens only when /metrics is scraped.

Several processes (PROMETHEUS_MULTIPROC_DIR). prometheus_client's multiprocess mode: each process
writes its values to its own files in that directory and /metrics (on any process) adds them up,
so the answer is the host's, whichever worker serves it. The directory must exist, be writable,
be shared by every process of the host (web and Celery workers), and be emptied when the
deployment (re)starts — not while it runs. Unset: each process reports its own registry (the
embedded default, one process). Counters and histograms are summed; gauges say how: streams in
flight are summed over live processes (`livesum`: a process that exits takes its streams away),
budget ratios and circuit states are the most recent value any process wrote (`mostrecent`).
django-prometheus' families (django_http_*) are counters and histograms and are summed like ours;
its only gauges (migrations) are off (PROMETHEUS_EXPORT_MIGRATIONS unset), so all of it is kept.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import threading
import time
from decimal import Decimal
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess

from . import tracing

logger = logging.getLogger("agentplatform.turn")

# Seconds: a chat turn takes from tens of milliseconds (cached, local) to minutes (tool loops).
TURN_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
FIRST_TOKEN_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
TASK_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0)

AGENT_REQUESTS = Counter("agent_requests_total", "Chat turns that reached the pipeline, by how they ended "
                         "(succeeded, failed, cancelled, or refused: rate limit, budget, guard, flag).",
                         ["agent", "transport", "status", "variant"])
AGENT_LATENCY = Histogram("agent_request_latency_seconds", "Chat turn duration, from the pipeline's start to "
                          "the run stored (refused turns: to the refusal).", ["agent", "transport"],
                          buckets=TURN_BUCKETS)
LLM_FIRST_TOKEN = Histogram("llm_time_to_first_token_seconds", "Time from a model call's start to its first "
                            "answer: the first streamed part, or the whole answer of a call that is not "
                            "streamed.", ["agent", "model"], buckets=FIRST_TOKEN_BUCKETS)
LLM_CALLS = Counter("llm_calls_total", "Model calls (every attempt: retries and fallbacks included) by outcome: "
                    "ok, or the error code (upstream_error, upstream_timeout, upstream_rate_limited, timeout, ...); "
                    "circuit_open counts models skipped without a call.", ["model", "outcome"])
LLM_TOKENS = Counter("llm_tokens_total", "Tokens billed, by kind (prompt, completion).", ["agent", "model", "kind"])
LLM_COST = Counter("llm_cost_usd_total", "USD billed (the metering stage's prices).", ["agent", "model"])
RATE_LIMITED = Counter("rate_limited_total", "Turns refused by a rate limit (scope: key or agent).", ["scope"])
BUDGET_BLOCKED = Counter("budget_blocked_total", "Turns refused because a hard budget had no room (402).")
BUDGET_SPENT_RATIO = Gauge("budget_spent_ratio", "Spent / limit of a budget's current period, at its last "
                           "settlement (budget: the budget's id).", ["budget"], multiprocess_mode="mostrecent")
CIRCUIT_STATE = Gauge("circuit_state", "A model's circuit breaker as last seen: 0 closed, 1 half-open, 2 open.",
                      ["provider", "model"], multiprocess_mode="mostrecent")
ACTIVE_STREAMS = Gauge("active_streams", "Streams being sent now: SSE responses and WebSocket connections.",
                       ["transport"], multiprocess_mode="livesum")
IDEMPOTENT_REPLAYS = Counter("idempotent_replays_total", "Answers replayed for a retried Idempotency-Key "
                             "(the model is not called).")
CELERY_TASKS = Counter("celery_tasks_total", "Celery tasks run, by task and final state (success, failure, "
                       "retry).", ["task", "state"])
CELERY_TASK_DURATION = Histogram("celery_task_duration_seconds", "Celery task run time.", ["task"],
                                 buckets=TASK_BUCKETS)

REDIS_UNAVAILABLE = Counter("redis_unavailable_total", "Redis calls that failed (each starts or extends an outage: "
                            "agentplatform.cache), by component: cache, rate_limit, circuit, channel_layer, "
                            "broker.", ["component"])
RATE_LIMIT_UNCHECKED = Counter("rate_limit_unchecked_total", "Turns whose rate limits could not be checked "
                               "(Redis unavailable), by RATE_LIMIT_FAIL_MODE: open (let through) or closed "
                               "(refused with 503).", ["mode"])

CIRCUIT_VALUES = {"closed": 0, "half_open": 1, "open": 2}


def _multiproc_dir() -> str:
    # prometheus_client itself decides multiprocess mode from this variable when it is imported;
    # settings.PROMETHEUS_MULTIPROC_DIR reads (and checks) the same one.
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")


def _mark_dead() -> None:
    """A process that exits takes its live gauges (streams in flight) with it."""
    try:
        multiprocess.mark_process_dead(os.getpid(), _multiproc_dir())
    except OSError:
        pass


if _multiproc_dir():
    atexit.register(_mark_dead)


# --- exposition -----------------------------------------------------------------------------


def metrics_text() -> bytes:
    """The host's metrics in the Prometheus text format (reads the multiprocess files: call it
    off the event loop)."""
    path = _multiproc_dir()
    if path:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=path)
    else:
        registry = REGISTRY
    return generate_latest(registry)


_port_server: Any = None


def metrics_port_serve(port: int, host: str = "0.0.0.0") -> bool:
    """Serve metrics_text(), unauthenticated, on `port` (a private port: METRICS_PORT), in a daemon
    thread. Every worker process of a host calls it: the socket is opened with SO_REUSEPORT, so
    they share the port and whichever answers gives the host's figures (multiprocess mode).
    False when the port cannot be had (logged)."""
    global _port_server
    if _port_server is not None:
        return True
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from prometheus_client import CONTENT_TYPE_LATEST

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            if self.path.split("?", 1)[0] not in ("/metrics", "/"):
                self.send_error(404)
                return
            body = metrics_text()
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE_LATEST)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # scrapes are not worth a log line
            pass

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        allow_reuse_address = True
        allow_reuse_port = True

    try:
        _port_server = Server((host, port), Handler)
    except OSError:
        logger.warning("METRICS_PORT %s could not be opened; metrics stay on /metrics only", port, exc_info=True)
        return False
    threading.Thread(target=_port_server.serve_forever, name="metrics-port", daemon=True).start()
    return True


# --- instrumentation points -----------------------------------------------------------------


def llm_call_skipped(*, model: str, outcome: str) -> None:
    """A model not called (its circuit open): counted under its outcome, `circuit_open`."""
    LLM_CALLS.labels(model, outcome).inc()


class LlmCall:
    """One model call (an attempt) as the runtime makes it: its metrics and its span.

        observed = LlmCall(agent=..., model=..., attempt=1, fallback=False, parent=run_span)
        with observed.current(): ...await the provider...   # HTTP client spans nest under it
        observed.first_part()        # the first streamed part (or the whole answer) arrived
        observed.ended(error, usage)
    """

    __slots__ = ("agent", "model", "started", "first", "span")

    def __init__(self, *, agent: str, model: str, attempt: int, fallback: bool, parent: Any = None) -> None:
        self.agent, self.model = agent, model
        self.started = time.perf_counter()
        self.first = False
        self.span = tracing.start(f"llm.call {model}", {
            "gen_ai.request.model": model, "gen_ai.agent.name": agent, "llm.attempt": attempt,
            "llm.fallback": fallback}, parent) if tracing.enabled() else tracing.NO_SPAN

    def current(self) -> Any:
        return tracing.use(self.span)

    def first_part(self) -> None:
        if not self.first:
            self.first = True
            seconds = time.perf_counter() - self.started
            LLM_FIRST_TOKEN.labels(self.agent, self.model).observe(seconds)
            self.span.set_attribute("llm.first_token_ms", int(seconds * 1000))

    def ended(self, error: Any = None, usage: Any = None) -> None:
        if error is None:
            outcome = "ok"
        elif isinstance(error, (asyncio.CancelledError, GeneratorExit)):
            outcome = "cancelled"
        else:
            outcome = getattr(error, "code", "") or "error"
        LLM_CALLS.labels(self.model, outcome).inc()
        span = self.span
        if span is tracing.NO_SPAN:
            return
        span.set_attribute("llm.outcome", outcome)
        if usage is not None:
            span.set_attributes({"gen_ai.usage.input_tokens": usage.prompt_tokens,
                                 "gen_ai.usage.output_tokens": usage.completion_tokens})
        if outcome not in ("ok", "cancelled"):
            tracing.fail(span, outcome, str(getattr(error, "message", "") or ""))
        span.end()


def llm_usage(*, agent: str, calls: Any) -> None:
    """A finished turn's billed calls (billing.metering's MeteredCall: model, tokens, cost)."""
    for call in calls:
        if call.prompt_tokens:
            LLM_TOKENS.labels(agent, call.model, "prompt").inc(call.prompt_tokens)
        if call.completion_tokens:
            LLM_TOKENS.labels(agent, call.model, "completion").inc(call.completion_tokens)
        if call.cost_usd:
            LLM_COST.labels(agent, call.model).inc(float(call.cost_usd))


def redis_unavailable(component: str) -> None:
    REDIS_UNAVAILABLE.labels(component).inc()


def rate_limit_unchecked(mode: str) -> None:
    RATE_LIMIT_UNCHECKED.labels(mode).inc()


def circuit_seen(name: str, state: str) -> None:
    """The circuit of `name` ("provider/model") is in `state` (closed, half_open, open)."""
    provider, _, model = name.partition("/")
    CIRCUIT_STATE.labels(provider, model).set(CIRCUIT_VALUES.get(state, 0))


def budget_settled(*, budget_id: int, spent: Decimal, limit: Decimal) -> None:
    if limit > 0:
        BUDGET_SPENT_RATIO.labels(str(budget_id)).set(float(spent / limit))


def stream_opened(transport: str) -> None:
    ACTIVE_STREAMS.labels(transport).inc()


def stream_closed(transport: str) -> None:
    ACTIVE_STREAMS.labels(transport).dec()


def idempotent_replayed() -> None:
    IDEMPOTENT_REPLAYS.inc()


# --- Celery ---------------------------------------------------------------------------------

_task_started: dict[str, float] = {}


def celery_signals_connect() -> None:
    """Count and time every task run in this process (workers; the web process in eager mode)."""
    from celery import signals

    signals.task_prerun.connect(_task_prerun, weak=False, dispatch_uid="agentplatform.metrics.prerun")
    signals.task_postrun.connect(_task_postrun, weak=False, dispatch_uid="agentplatform.metrics.postrun")


def _task_prerun(task_id: str | None = None, task: Any = None, **kwargs: Any) -> None:
    if task_id:
        _task_started[task_id] = time.perf_counter()


def _task_postrun(task_id: str | None = None, task: Any = None, state: str | None = None, **kwargs: Any) -> None:
    name = getattr(task, "name", None) or "unknown"
    started = _task_started.pop(task_id, None) if task_id else None
    CELERY_TASKS.labels(name, (state or "unknown").lower()).inc()
    if started is not None:
        CELERY_TASK_DURATION.labels(name).observe(time.perf_counter() - started)


# --- the pipeline stage ---------------------------------------------------------------------

_REFUSED = "refused"


def _variant(turn: Any) -> str:
    return str(getattr(turn, "variant", "") or "")


class MetricsStage:
    """Counts every turn once, when it ends (`after`) or is refused (`refused`), and writes its
    log line. No I/O. Listed first in AGENT_PIPELINE_STAGES so that its `before` starts the
    clock a refused turn is timed by."""

    NOTE = "agentplatform.metrics"

    async def before(self, turn: Any) -> None:
        turn.notes[self.NOTE] = time.perf_counter()

    async def after(self, turn: Any) -> None:
        status = str(turn.status)
        agent, transport = turn.agent.name, str(turn.transport)
        AGENT_REQUESTS.labels(agent, transport, status, _variant(turn)).inc()
        AGENT_LATENCY.labels(agent, transport).observe(turn.latency_ms / 1000)
        run = turn.run
        error = run.error if run is not None else None
        usage = turn.billed_usage or (run.usage.as_dict() if run is not None else {})
        _turn_log(turn, status=status, latency_ms=turn.latency_ms, error=error, usage=usage,
                  model=(run.model or run.model_in_flight) if run is not None else "")

    async def refused(self, turn: Any, error: Any) -> None:
        agent, transport = turn.agent.name, str(turn.transport)
        started = turn.notes.get(self.NOTE)
        seconds = time.perf_counter() - started if started is not None else 0.0
        AGENT_REQUESTS.labels(agent, transport, _REFUSED, _variant(turn)).inc()
        AGENT_LATENCY.labels(agent, transport).observe(seconds)
        code = getattr(error, "code", "")
        if code == "rate_limited":
            RATE_LIMITED.labels(str((getattr(error, "details", None) or {}).get("scope") or "unknown")).inc()
        elif code == "budget_exceeded":
            BUDGET_BLOCKED.inc()
        _turn_log(turn, status=_REFUSED, latency_ms=int(seconds * 1000), error=error, usage={}, model="")


def _turn_log(turn: Any, *, status: str, latency_ms: int, error: Any, usage: dict, model: str) -> None:
    """The turn's one log line: who, which agent, how it ended, what it cost (agentplatform.logs
    puts the fields in the JSON object; the text format shows the message)."""
    if not logger.isEnabledFor(logging.INFO):
        return
    principal = turn.principal
    cost = turn.cost_usd
    fields = {
        "request_id": turn.request_id or "", "key_prefix": principal.prefix if principal else "",
        "agent": turn.agent.name, "run_id": str(turn.run_id), "transport": str(turn.transport),
        "status": status, "latency_ms": latency_ms, "model": model,
        "prompt_tokens": int(usage.get("prompt_tokens") or 0),
        "completion_tokens": int(usage.get("completion_tokens") or 0),
        "cost_usd": str(cost) if cost is not None else None,
        "variant": _variant(turn),
    }
    if error is not None:
        fields["error_code"] = getattr(error, "code", "") or type(error).__name__
    logger.info("turn %s %s %s %s in %d ms, %d+%d tokens, %s USD%s", fields["run_id"], fields["agent"],
                fields["transport"], status, latency_ms, fields["prompt_tokens"], fields["completion_tokens"],
                fields["cost_usd"] or "0", f" ({fields['error_code']})" if error is not None else "",
                extra=fields)
