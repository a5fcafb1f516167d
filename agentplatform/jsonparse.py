"""The one strict JSON loader for everything a client sends (HTTP bodies, WebSocket frames).

Python's json module accepts more than JSON (RFC 8259) and more than the rest of the platform
can store or handle:
  * `NaN`, `Infinity`, `-Infinity` constants, and numbers such as `1e999` that overflow to
    inf: PostgreSQL's jsonb refuses them when the row is written, i.e. after the work was done;
  * lone surrogates (`"\\ud800"`): valid JSON escapes, but no UTF-8 encoder can write them
    (database, upstream HTTP, logs);
  * NUL characters (`"\\u0000"`): PostgreSQL's text and jsonb cannot hold them (SQLite can, so
    refusing them here keeps both databases answering alike);
  * nesting as deep as the C stack allows, then a RecursionError; code that walks the data
    recursively later fails the same way at a smaller depth.
`loads_strict` refuses all of them with one 400 `invalid_json`, so no later layer sees them.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from .errors import InvalidRequest

MAX_DEPTH = 64
# NUL, and surrogates: after decoding, a surrogate code point can only be a lone one (json
# joins valid pairs).
_REFUSED_CHARS = re.compile("[\x00\ud800-\udfff]")


class _Refused(ValueError):
    pass


def _refuse_constant(name: str) -> Any:
    raise _Refused(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise _Refused(f"the number {text[:40]} is too large")
    return value


def _check(data: Any) -> None:
    """Depth and strings, iteratively (no recursion limit however the data is shaped)."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            found = _REFUSED_CHARS.search(value) if "\x00" in value or not value.isascii() else None
            if found and found.group() == "\x00":
                raise _Refused("a string holds a NUL character (\\u0000)")
            if found:
                raise _Refused("a string holds a lone surrogate (\\ud800-\\udfff) that is not text")
        elif isinstance(value, (dict, list)):
            if depth > MAX_DEPTH:
                raise _Refused(f"nested deeper than {MAX_DEPTH} levels")
            if isinstance(value, dict):
                for key, item in value.items():
                    stack.append((key, depth))
                    stack.append((item, depth + 1))
            else:
                stack.extend((item, depth + 1) for item in value)


def loads_strict(data: bytes | bytearray | str) -> Any:
    """Decode UTF-8 JSON text; InvalidRequest `invalid_json` for anything the platform refuses."""
    try:
        text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
        value = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
        # A lone surrogate can only come from a \u escape (decoded UTF-8 has none; a str given
        # as such may), and nesting needs brackets: most bodies need no walk at all.
        if ("\\u" in text or text.count("{") + text.count("[") > MAX_DEPTH
                or (text is data and not text.isascii())):
            _check(value)
    except RecursionError:
        raise InvalidRequest(f"Malformed JSON: nested deeper than {MAX_DEPTH} levels.", code="invalid_json") from None
    except UnicodeDecodeError:
        raise InvalidRequest("Malformed JSON: not UTF-8 text.", code="invalid_json") from None
    except ValueError as exc:  # json.JSONDecodeError, _Refused, int() past its digit limit
        raise InvalidRequest(f"Malformed JSON: {exc}.", code="invalid_json") from None
    return value
