"""OpenTelemetry traces: request → pipeline stages and the agent run → each model call → the
upstream HTTP request, and each tool call.

On when OTEL_EXPORTER_OTLP_ENDPOINT (or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) is set: `tracing_setup`
(AppConfig.ready, every process) installs the SDK's TracerProvider with a BatchSpanProcessor and
the OTLP/HTTP exporter, which read the standard OTEL_* variables themselves (headers, timeout,
OTEL_TRACES_SAMPLER, OTEL_RESOURCE_ATTRIBUTES; service.name from OTEL_SERVICE_NAME, default
`agent-platform`), and instruments the HTTP clients (httpx: skills and webhooks; aiohttp: the
OpenAI SDK's transport), which also send `traceparent` upstream. Off otherwise: no tracer
provider is installed and every helper here returns a shared no-op at the cost of one check.

Spans (names and attributes in README "Observability"):
  `POST /api/v1/agents/<str:name>/chat`  the HTTP request (SERVER; OpenTelemetry's ASGI
        middleware, `asgi()` below, pure async: no thread hop, and a streamed response's span
        lasts until its last byte; route templates as names, /health and /metrics left out).
        A WebSocket turn has its own root span, `websocket turn` (a connection lives for hours).
  `stage <Stage>.<hook>`  each pipeline stage's before / after / refused hook.
  `agent.run`   the run: the model-and-tools loop.
  `llm.call <model>`  each attempt: model, attempt, fallback, outcome, tokens, first token.
  `tool <name>`  each tool call.
Only async code that holds no `yield` makes a span current (`use`): the runtime's generators are
resumed from other tasks (an SSE stream's first event is read ahead in a task of its own), where
a context attached across a `yield` could not be detached. Children name their parent instead.

The Django instrumentation's middleware is sync-only (a thread hop per request under ASGI, and
its span ends when a streamed response starts): the ASGI middleware of the same project is used
for the request span instead, with Django's route templates as span names.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Any, Awaitable, Callable

logger = logging.getLogger("agentplatform.tracing")

TRACER_NAME = "agentplatform"


class _State:
    def __init__(self, provider: Any, instrumentors: list) -> None:
        from opentelemetry import trace

        self.provider = provider
        self.tracer = provider.get_tracer(TRACER_NAME)
        self.instrumentors = instrumentors
        self.trace = trace


_state: _State | None = None


def enabled() -> bool:
    return _state is not None


# --- setup ----------------------------------------------------------------------------------


def tracing_setup() -> bool:
    """Install the SDK's tracer provider and the OTLP exporter when settings say so (see the
    module docstring); True when tracing is on."""
    from django.conf import settings

    if _state is not None or not settings.OTEL_TRACES_ENABLED:
        return _state is not None
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": settings.OTEL_SERVICE_NAME}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    tracing_enable(provider)
    return True


def tracing_enable(provider: Any) -> None:
    """Trace with `provider` (tracing_setup's, or a test's with an in-memory exporter): our spans
    and the HTTP clients'. Does not install it globally."""
    global _state
    from opentelemetry.instrumentation.aiohttp_client import AioHttpClientInstrumentor
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

    tracing_disable()
    instrumentors = []
    for instrumentor in (HTTPXClientInstrumentor(), AioHttpClientInstrumentor()):
        try:
            instrumentor.instrument(tracer_provider=provider)
            instrumentors.append(instrumentor)
        except Exception:  # a client library missing or of a version it does not know
            logger.warning("Could not instrument %s", type(instrumentor).__name__, exc_info=True)
    _state = _State(provider, instrumentors)


def tracing_disable() -> None:
    global _state
    state, _state = _state, None
    for instrumentor in state.instrumentors if state else ():
        instrumentor.uninstrument()


# --- spans ----------------------------------------------------------------------------------


class _NoSpan:
    """What the helpers return when tracing is off."""

    __slots__ = ()

    def set_attribute(self, key: str, value: Any) -> None:
        pass

    def set_attributes(self, attributes: dict) -> None:
        pass

    def is_recording(self) -> bool:
        return False

    def end(self) -> None:
        pass


NO_SPAN = _NoSpan()
_NO_CONTEXT = nullcontext(NO_SPAN)


def _context(parent: Any) -> Any:
    if parent is None or parent is NO_SPAN:
        return None  # the current context
    return _state.trace.set_span_in_context(parent)


def span(name: str, attributes: dict | None = None, parent: Any = None) -> Any:
    """A context manager: a span, current inside the block (in code without `yield` only)."""
    state = _state
    if state is None:
        return _NO_CONTEXT
    return state.tracer.start_as_current_span(name, context=_context(parent), attributes=attributes)


def start(name: str, attributes: dict | None = None, parent: Any = None) -> Any:
    """A span that is not made current: end it with end() (or span.end())."""
    state = _state
    if state is None:
        return NO_SPAN
    return state.tracer.start_span(name, context=_context(parent), attributes=attributes)


def use(span_: Any) -> Any:
    """Make `span_` current for a block (without ending it), e.g. around an awaited call whose
    HTTP client span should be its child."""
    state = _state
    if state is None or span_ is NO_SPAN:
        return _NO_CONTEXT
    return state.trace.use_span(span_, end_on_exit=False)


def fail(span_: Any, code: str, message: str = "") -> None:
    """Mark `span_` failed with an error code (no traceback: ours are expected failures)."""
    if span_ is NO_SPAN or _state is None:
        return
    from opentelemetry.trace import Status, StatusCode

    span_.set_attribute("error.type", code)
    span_.set_status(Status(StatusCode.ERROR, message[:200] or code))


async def traced(awaitable: Awaitable, name: str, attributes: dict | None = None, parent: Any = None) -> Any:
    """Await `awaitable` inside a span that is current meanwhile (e.g. a task's whole body)."""
    with span(name, attributes, parent):
        return await awaitable


def traced_task(coro: Awaitable, name: str, attributes: dict | None = None) -> Awaitable:
    """`coro` inside a span when tracing is on; `coro` itself (no wrapper) when it is off."""
    return coro if _state is None else traced(coro, name, attributes)


def tool_call(awaitable: Awaitable, *, name: str, call_id: str, parent: Any) -> Awaitable:
    """`awaitable` (a tool call) in a span `tool <name>` recording its result's is_error; as it
    is when tracing is off."""
    return awaitable if _state is None else _tool_call(awaitable, name, call_id, parent)


async def _tool_call(awaitable: Awaitable, name: str, call_id: str, parent: Any) -> Any:
    with span(f"tool {name}", {"gen_ai.tool.name": name, "gen_ai.tool.call.id": call_id}, parent) as s:
        result = await awaitable
        is_error = bool(getattr(result, "is_error", False))
        s.set_attribute("tool.is_error", is_error)
        if is_error:
            fail(s, "tool_error")
        return result


# --- pipeline stages ------------------------------------------------------------------------


class _TracedHook:
    """A stage's async hook in a span `stage <Stage>.<hook>`; the bound method itself when
    tracing is off. `__self__` is the stage, as for the bound method (the pipeline names the
    stage of a failing hook by it)."""

    __slots__ = ("hook", "__self__", "name")

    def __init__(self, hook: Callable, name: str) -> None:
        self.hook = hook
        self.__self__ = hook.__self__
        self.name = f"stage {type(hook.__self__).__name__}.{name}"

    def __call__(self, *args: Any) -> Awaitable:
        if _state is None:
            return self.hook(*args)
        return traced(self.hook(*args), self.name)


_TRACED_HOOKS = frozenset({"before", "after", "refused"})


def stage_hook(stage: Any, name: str) -> Callable:
    """The pipeline's view of `stage`'s hook `name`: traced when it is async (before, after,
    refused); the sync ones (finished, persist: no I/O, or inside a shared group commit) as
    they are."""
    hook = getattr(stage, name)
    return _TracedHook(hook, name) if name in _TRACED_HOOKS else hook


# --- the ASGI app ---------------------------------------------------------------------------

_EXCLUDED = "/health,/metrics,/static/"


def _span_details(scope: dict) -> tuple[str, dict]:
    """`METHOD /route/<template>` (Django's route, so agent names and ids stay out of span names)."""
    from django.urls import Resolver404, resolve

    method = scope.get("method", "HTTP")
    try:
        match = resolve(scope.get("path", ""))
    except Resolver404:
        return method, {}
    route = getattr(match, "route", "") or ""
    if not route:
        return method, {}
    return f"{method} /{route}", {"http.route": f"/{route}"}


class TracedASGI:
    """OpenTelemetry's ASGI middleware around `app` while tracing is on (HTTP only); `app` as it
    is otherwise."""

    def __init__(self, app: Callable) -> None:
        self.app = app
        self._traced: Any = None
        self._for: Any = None

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        state = _state
        if state is None:
            return await self.app(scope, receive, send)
        if self._for is not state:
            from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

            self._traced = OpenTelemetryMiddleware(self.app, excluded_urls=_EXCLUDED, tracer_provider=state.provider,
                                                   default_span_details=_span_details,
                                                   exclude_spans=["receive", "send"])
            self._for = state
        return await self._traced(scope, receive, send)
