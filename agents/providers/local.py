"""`local`: the built-in offline model. Deterministic, no network, no key.

It is the demo model: it answers with a short echo of the message, and when the message asks
for something one of the offered skills does (arithmetic → calculator, "time" → current_time,
"search"/"docs" → knowledge_search, a URL → http_fetch) it calls that skill first and then
answers with the skill's result. Streams word by word.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from typing import AsyncIterator

from .base import Completion, ModelCall, Provider, TextDelta, ToolCall, Usage, estimate_tokens

_ARITH = re.compile(r"(?<![\w.])(?:\d+(?:\.\d+)?|\()[\d\s.+\-*/%()^]*[\d)](?![\w.])")
_URL = re.compile(r"https?://[^\s'\"<>]+")


def _text(message: dict) -> str:
    return message.get("content") or ""  # one string: agents.chat_input folds content parts


def _tool_names(tools: list[dict] | None) -> set[str]:
    return {t.get("function", {}).get("name") for t in tools or []}


def _tool_name(messages: list[dict], call_id: str | None) -> str | None:
    """The skill a tool result answers, from the assistant message that made the call."""
    for message in reversed(messages):
        for call in message.get("tool_calls") or []:
            if call.get("id") == call_id:
                return (call.get("function") or {}).get("name")
    return None


def _choose_tool(text: str, tools: set[str]) -> tuple[str, dict] | None:
    lowered = text.lower()
    if "calculator" in tools:
        match = _ARITH.search(text)
        if match and re.search(r"[+\-*/%^]", match.group(0)):
            return "calculator", {"expression": match.group(0).strip().replace("^", "**")}
    if "current_time" in tools and re.search(r"\b(time|date|today|clock)\b", lowered):
        return "current_time", {}
    if "http_fetch" in tools:
        url = _URL.search(text)
        if url:
            return "http_fetch", {"url": url.group(0).rstrip(".,;)")}
    if "knowledge_search" in tools and re.search(r"\b(search|docs?|documentation|knowledge|find)\b", lowered):
        query = re.sub(r"\b(search|the|docs?|documentation|knowledge|for|find|about|please)\b", " ", lowered)
        return "knowledge_search", {"query": " ".join(query.split()) or text}
    return None


class LocalProvider(Provider):
    name = "local"
    # Pause between streamed words, so streaming is visible in the console; 0 in tests/bench.
    word_gap_seconds = 0.0

    def _answer(self, call: ModelCall) -> Completion:
        messages = call.messages
        prompt_tokens = sum(estimate_tokens(_text(m)) + 1 for m in messages)
        last = messages[-1] if messages else {"role": "user", "content": ""}
        if last.get("role") == "tool":
            name = last.get("name") or _tool_name(messages, last.get("tool_call_id")) or "a skill"
            reply = f"I used {name}: {_text(last)[:500]}"
        else:
            user_text = _text(last).strip()
            choice = _choose_tool(user_text, _tool_names(call.tools))
            if choice is not None:
                name, arguments = choice
                args = json.dumps(arguments)
                return Completion(
                    tool_calls=[ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", name=name, arguments=args)],
                    usage=Usage(prompt_tokens, estimate_tokens(args)),
                    finish_reason="tool_calls",
                    model=f"local/{call.model}",
                )
            reply = f"You said: {user_text}" if user_text else "Hello! I am the offline demo model."
        words = reply.split(" ")
        if call.max_tokens:
            words = words[: call.max_tokens]
        content = " ".join(words)
        return Completion(content=content, usage=Usage(prompt_tokens, len(words)),
                          finish_reason="stop", model=f"local/{call.model}")

    async def complete(self, call: ModelCall) -> Completion:
        return self._answer(call)

    async def stream(self, call: ModelCall) -> AsyncIterator[TextDelta | Completion]:
        completion = self._answer(call)
        if completion.content:
            words = completion.content.split(" ")
            for index, word in enumerate(words):
                yield TextDelta(word if index == len(words) - 1 else word + " ")
                if self.word_gap_seconds:
                    await asyncio.sleep(self.word_gap_seconds)
        yield completion
