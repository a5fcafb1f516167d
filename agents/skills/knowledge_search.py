"""knowledge_search: search the calling agent's Documents.

PostgreSQL: full-text search (title weighted A, content B, websearch syntax, ranked).
Other databases (the embedded SQLite): every query word of 3+ characters is matched with
icontains and documents are scored in Python, title hits counting triple; documents
matching more distinct words rank first. Optional config: {"language": "english"}, the
PostgreSQL text search configuration.

Models are imported inside the functions: agents.skills.base is imported by modules that
load before the app registry is ready, and importing it runs this package.
"""

from __future__ import annotations

import heapq
import re
from dataclasses import dataclass
from functools import reduce
from operator import or_

from django.db import connection
from django.db.models import Q

from agentplatform.db import run_db
from agents.skills.base import SkillContext, SkillError

DEFAULT_LIMIT = 3
MAX_LIMIT = 10
MAX_QUERY_CHARS = 500
MAX_QUERY_WORDS = 12  # bounds the OR of icontains scans on SQLite
SNIPPET_CHARS = 500
SNIPPET_LEAD = 150  # context kept before the first hit
TITLE_WEIGHT = 3
_LANGUAGE_RE = re.compile(r"^[a-z_]{1,63}$")
_WORD_RE = re.compile(r"\w+")


@dataclass(frozen=True)
class Hit:
    title: str
    source: str
    snippet: str


def query_words(query: str) -> list[str]:
    """Lowercase words of 3+ characters, deduplicated, in order."""
    words = [w for w in _WORD_RE.findall(query.lower()) if len(w) >= 3]
    return list(dict.fromkeys(words))[:MAX_QUERY_WORDS]


def snippet(content: str, words: list[str]) -> str:
    """Up to SNIPPET_CHARS of content around the first hit of any word (the start if none)."""
    lowered = content.lower()
    positions = [p for p in (lowered.find(w) for w in words) if p >= 0]
    if not positions:
        # Stemmed matches on PostgreSQL ("running" for "runs"): try a word's first letters.
        positions = [p for p in (lowered.find(w[:4]) for w in words if len(w) >= 4) if p >= 0]
    start = max(0, min(positions) - SNIPPET_LEAD) if positions else 0
    end = start + SNIPPET_CHARS
    text = " ".join(content[start:end].split())
    return ("..." if start > 0 else "") + text + ("..." if end < len(content) else "")


def _search_postgresql(*, agent_id: int, query: str, words: list[str], limit: int, language: str) -> list[Hit]:
    from django.contrib.postgres.search import SearchQuery, SearchRank, SearchVector

    from agents.models import Document

    vector = SearchVector("title", weight="A", config=language) + SearchVector("content", weight="B", config=language)
    search_query = SearchQuery(query, search_type="websearch", config=language)
    # Filter on the match (@@), not on rank > 0: ts_rank ignores negations ("running -bikes")
    # and phrases, so a positive rank alone would let excluded documents through.
    documents = (Document.objects.filter(agent_id=agent_id)
                 .annotate(search=vector, rank=SearchRank(vector, search_query))
                 .filter(search=search_query, rank__gt=0)
                 .order_by("-rank", "id")
                 .only("title", "content", "source")[:limit])
    return [Hit(d.title, d.source, snippet(d.content, words)) for d in documents]


def _search_fallback(*, agent_id: int, words: list[str], limit: int) -> list[Hit]:
    from agents.models import Document

    if not words:
        return []
    match = reduce(or_, (Q(content__icontains=w) | Q(title__icontains=w) for w in words))
    documents = Document.objects.filter(match, agent_id=agent_id).only("title", "content", "source")
    best: list[tuple[tuple[int, int, int], Hit]] = []
    # Stream and keep the top `limit`: memory stays flat however many documents match.
    for document in documents.order_by("id").iterator(chunk_size=200):
        title, content = document.title.lower(), document.content.lower()
        counts = [(title.count(w), content.count(w)) for w in words]
        distinct = sum(1 for t, c in counts if t or c)
        if not distinct:
            continue  # icontains is ASCII-only case-insensitive on SQLite; Python lower() is not
        weighted = sum(TITLE_WEIGHT * t + c for t, c in counts)
        key = (distinct, weighted, -document.id)  # ties: older document first
        hit = Hit(document.title, document.source, snippet(document.content, words))
        if len(best) < limit:
            heapq.heappush(best, (key, hit))
        elif key > best[0][0]:
            heapq.heapreplace(best, (key, hit))
    return [hit for _, hit in sorted(best, key=lambda item: item[0], reverse=True)]


def documents_matching(*, agent_id: int, query: str, limit: int = DEFAULT_LIMIT,
                       language: str = "english") -> list[Hit]:
    """The agent's best-matching documents, best first (sync: runs ORM queries)."""
    words = query_words(query)
    if connection.vendor == "postgresql":
        return _search_postgresql(agent_id=agent_id, query=query, words=words, limit=limit, language=language)
    return _search_fallback(agent_id=agent_id, words=words, limit=limit)


def format_hits(hits: list[Hit]) -> str:
    if not hits:
        return "No documents matched."
    blocks = []
    for number, hit in enumerate(hits, start=1):
        heading = f"[{number}] {hit.title}" + (f" ({hit.source})" if hit.source else "")
        blocks.append(f"{heading}\n{hit.snippet}")
    return "\n\n".join(blocks)


def _limit(value: object) -> int:
    if value is None:
        return DEFAULT_LIMIT
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)  # models sometimes send numbers as strings
    if isinstance(value, bool) or not isinstance(value, int):
        raise SkillError(f"limit must be an integer from 1 to {MAX_LIMIT}")
    return max(1, min(value, MAX_LIMIT))


class KnowledgeSearch:
    name = "knowledge_search"
    description = (
        "Search this agent's knowledge base (its documents) and return the best matches "
        "with their titles, sources and a snippet of the text."
    )
    parameters = {
        "type": "object",
        "properties": {
            "query": {"type": "string", "description": "What to look for, in a few keywords.",
                      "maxLength": MAX_QUERY_CHARS},
            "limit": {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": DEFAULT_LIMIT,
                      "description": "How many documents to return."},
        },
        "required": ["query"],
        "additionalProperties": False,
    }

    async def run(self, arguments: dict, *, config: dict, context: SkillContext) -> str:
        query = arguments.get("query")
        if not isinstance(query, str) or not query.strip():
            raise SkillError("query must be a non-empty string")
        if len(query) > MAX_QUERY_CHARS:
            raise SkillError(f"query is longer than {MAX_QUERY_CHARS} characters")
        limit = _limit(arguments.get("limit"))
        language = config.get("language", "english")
        if not isinstance(language, str) or not _LANGUAGE_RE.match(language):
            raise SkillError("skill misconfigured: language must be a text search configuration name")
        hits = await run_db(documents_matching, agent_id=context.agent_id, query=query.strip(), limit=limit,
                            language=language)
        return format_hits(hits)
