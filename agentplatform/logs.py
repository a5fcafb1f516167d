"""Log records: their context (request id, trace id) and the JSON format (LOG_FORMAT=json).

settings.LOGGING wires it: every handler's records pass `ContextFilter` (adds `request_id` from
the request being served, and `trace_id`/`span_id` when tracing is on) and governance's
`MaskingFilter` (PII and secrets in messages, arguments and tracebacks), then one of two
formatters: text (a terminal's default) or `JsonFormatter` (python-json-logger: one JSON object a
line, `timestamp` in ISO 8601 UTC, `level`, `logger`, `message`, the context, and the fields a
caller passes in `extra` — the turn line, agentplatform.metrics, carries key prefix, agent, run
id, transport, status, latency, tokens and cost). Every string value of the object is masked
too (a caller's `extra` never bypasses the masking), and values JSON cannot hold are written as
their (masked) text.
"""

from __future__ import annotations

import contextvars
import logging
from typing import Any

from pythonjsonlogger.json import JsonFormatter as _JsonFormatter

# The id of the request (or WebSocket turn) this code is serving; set by RequestIdMiddleware.
request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")


def trace_ids() -> tuple[str, str]:
    """The current span's trace and span id (hex), or empty strings when nothing is traced."""
    from . import tracing

    if not tracing.enabled():
        return "", ""
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return "", ""
    return format(context.trace_id, "032x"), format(context.span_id, "016x")


class ContextFilter(logging.Filter):
    """Adds `request_id`, `trace_id` and `span_id` to every record (a value the caller passed in
    `extra` wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "request_id", ""):
            record.request_id = request_id_var.get()
        if not hasattr(record, "trace_id"):
            record.trace_id, record.span_id = trace_ids()
        return True


_PLAIN = (str, int, float, bool, type(None))
# Fields whose values our code or the operator's configuration makes, never a caller's input:
# not masked (masking every field of every line was ~8% of a chat request's CPU). The request id
# is not among them (a caller's X-Request-ID may be, say, a phone number), nor is the path.
_OWN_FIELDS = frozenset({"level", "logger", "key_prefix", "run_id", "agent", "transport", "status", "model",
                         "variant", "cost_usd", "error_code", "trace_id", "span_id"})


class JsonFormatter(_JsonFormatter):
    """One JSON object a line (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if not args:
            kwargs.setdefault("fmt", "%(levelname)s %(name)s %(message)s")
        kwargs.setdefault("rename_fields", {"levelname": "level", "name": "logger"})
        kwargs.setdefault("timestamp", True)
        super().__init__(*args, **kwargs)

    def process_log_record(self, log_data: dict[str, Any]) -> dict[str, Any]:
        from governance.masking import mask_text

        out = {}
        # The turn line's message is made of _OWN_FIELDS only (agentplatform.metrics._turn_log).
        own_message = log_data.get("logger") == "agentplatform.turn"
        for key, value in log_data.items():
            if key == "timestamp" or value is None or isinstance(value, (int, float, bool)):
                out[key] = value
            elif key in ("trace_id", "span_id") and not value:
                continue  # not traced: no empty fields
            elif key in _OWN_FIELDS or (own_message and key == "message"):
                out[key] = value
            else:
                out[key] = mask_text(value if isinstance(value, str) else str(value))
        return out
