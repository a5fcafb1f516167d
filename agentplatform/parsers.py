"""DRF's request parser, on the platform's one JSON rule (agentplatform.jsonparse)."""

from __future__ import annotations

from typing import Any

from rest_framework.parsers import JSONParser

from .jsonparse import loads_strict


class StrictJSONParser(JSONParser):
    """application/json bodies through loads_strict: no NaN/Infinity, no number overflowing
    to inf, no lone surrogates, nesting at most 64 deep; each a 400 `invalid_json`."""

    def parse(self, stream: Any, media_type: str | None = None, parser_context: dict | None = None) -> Any:
        return loads_strict(stream.read())
