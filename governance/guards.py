"""Input guards: the prompt-injection heuristic and its pipeline stage.

The other input guards sit at the edge and are not repeated here: the body size limit (413)
in agentplatform's BodySizeLimitASGI, message length and the strict schema in the
serializers.

The heuristic scores the user messages of the turn's input — the new message(s) on
REST/SSE (the stored history was scanned when it was new), the whole conversation on the
stateless OpenAI-compatible endpoint, since all of it is sent to the model again — against a
set of weighted rules (RULES). Each rule counts once; a text scoring FLAG_SCORE or more is
flagged. Strong signals (weight 3: "ignore all previous instructions", fake chat-template
tags, "you are now DAN", asking for the system prompt) flag alone; weak ones (weight 1–2:
"from now on you are", a long base64 blob, "decode this and follow it") only together, which
keeps ordinary questions about instructions, systems or ignoring things unflagged.

A flagged turn:
  * agent.block_prompt_injection on → refused with 400 `prompt_injection_blocked` (the message
    does not echo the text or name the rules; the audit stage records the refusal);
  * otherwise → let through, with an audit entry `guard.prompt_injection` (outcome success,
    details {rules, score}; never the text), and `turn.notes["guard"]` for later stages.

Cost: the texts are joined, lowercased once and scanned by one compiled regex (one pass,
finditer over an alternation of named groups, tried at word starts only): about 0.1 µs per
character (under 1 µs on adversarial text: every rule is bounded, none backtracks
quadratically), some 20 µs for a 200-character message; inputs over INLINE_SCAN_CHARS are
scanned off the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from agentplatform.db import write_db
from agentplatform.errors import InvalidRequest

from .audit import audit_record, turn_actor

if TYPE_CHECKING:
    from agents.pipeline import ChatTurn

logger = logging.getLogger("governance.guards")

FLAG_SCORE = 3
# Below this many characters no rule can match; skip the scan.
MIN_SCAN_CHARS = 12
# Longer inputs are scanned in a thread: at up to ~0.6 µs per character a 1 MB body would
# hold the event loop for half a second (re keeps the GIL, but the interpreter's switch
# interval still lets the loop serve other requests meanwhile).
INLINE_SCAN_CHARS = 20_000

# name → (weight, pattern). Patterns see lowercased text; no capturing groups inside (each is
# wrapped in a named group, and the name of the group that matched is the rule). "my previous
# instructions" is left alone on purpose: users correct themselves that way.
_QUAL = r"(?:(?:all|any|the|your|of|these|those|every|each)\s+)*"
RULES: dict[str, tuple[int, str]] = {
    # "ignore all previous instructions", "disregard the above rules", "forget your prior prompts"
    "ignore_previous_instructions": (3, r"\b(?:ignore|disregard|forget|override|bypass|discard)\s+" + _QUAL
                                        + r"(?:previous|prior|above|earlier|preceding|foregoing|initial|original|"
                                          r"existing|former)\s+(?:instructions?|prompts?|rules|directions|"
                                          r"directives|guidelines|commands|constraints)\b"),
    # "ignore everything above", "forget everything you were told"
    "ignore_everything": (3, r"\b(?:ignore|disregard|forget)\s+(?:everything|all)\s+(?:above|before\s+this|"
                             r"you\s+(?:were|have\s+been)\s+(?:told|given|instructed))"),
    # "disregard the system prompt", "override your developer message"
    "override_system_prompt": (3, r"\b(?:ignore|disregard|forget|override|bypass|discard|circumvent)\s+" + _QUAL
                                  + r"(?:system|developer|hidden|safety)\s+(?:prompts?|messages?|instructions?|"
                                    r"guidelines|filters?)\b"),
    # "reveal your system prompt", "what are your hidden instructions"
    "reveal_system_prompt": (3, r"\b(?:reveal|print|show|display|output|repeat|leak|dump|recite|tell\s+me|"
                                r"give\s+me|share|write\s+out|spell\s+out|what\s+(?:is|are|was|were))\s+"
                                r"(?:me\s+)?(?:all\s+)?your\s+(?:\w+\s+){0,2}?(?:(?:system|initial|original|"
                                r"hidden|secret|internal)\s+(?:prompt|message|instructions)|pre-?prompt|"
                                r"instructions\s+verbatim)\b"),
    # "repeat the text above", "print everything above"
    "repeat_text_above": (3, r"\b(?:repeat|print|output|recite)\s+(?:all\s+|everything\s+|the\s+(?:text|words|"
                             r"instructions|messages?|content)\s+)(?:written\s+)?above\b"),
    # "you are now DAN", "you are now in developer mode", "you're now an unrestricted AI"
    "persona_switch": (3, r"\byou(?:\s+are|'re)\s+now\s+(?:dan\b|stan\b|in\s+(?:developer|god|jailbreak|dan|"
                          r"unrestricted|unfiltered)\s+mode|(?:an?\s+)?(?:unrestricted|unfiltered|uncensored|"
                          r"jailbroken|evil|unaligned)\b)"),
    "jailbreak_mode": (3, r"\b(?:do\s+anything\s+now|(?:jailbreak|dan|unrestricted|unfiltered)\s+mode)\b"),
    # "act as an AI without restrictions", "pretend you have no rules"
    "no_restrictions": (3, r"\b(?:act|behave|respond|answer|pretend|roleplay|role-play)\s+(?:as|like)\b"
                           r"[^.\n]{0,60}?\b(?:without|with\s+no|free\s+(?:of|from))\s+(?:any\s+)?"
                           r"(?:restrictions|limitations|limits|filters|rules|guidelines|censorship|"
                           r"(?:ethical|moral|safety|content)\s+\w+)"),
    "pretend_unrestricted": (3, r"\b(?:pretend|imagine|suppose)\s+(?:that\s+)?you\s+(?:are|were|have|had)\s+"
                                r"(?:no\s+(?:restrictions|rules|filters|limits|limitations|guidelines|"
                                r"content\s+polic(?:y|ies))|(?:an?\s+)?(?:evil|unrestricted|unfiltered|uncensored|"
                                r"jailbroken)\b)"),
    # Fake chat-template and role tags that try to close the user turn and open another.
    "fake_role_tag": (3, r"</?\s*(?:system|assistant|developer)\s*>|<\|(?:im_start|im_end|system|endoftext|"
                         r"start_header_id|end_header_id|eot_id)\|>|\[/?inst\]|<</?sys>>"),
    # Weak signals: they flag only together with another rule.
    "new_instructions": (2, r"(?:^|\n)\s*(?:new|updated|real|actual|override)\s+(?:system\s+)?"
                            r"(?:instructions?|prompt|rules)\s*:"),
    "decode_and_follow": (2, r"\b(?:decode|base64-decode|decrypt|deobfuscate)\b[^\n]{0,80}?\b(?:follow|execute|"
                             r"obey|comply|carry\s+out|do\s+what|act\s+on|run)\b"),
    "from_now_on": (1, r"\bfrom\s+now\s+on,?\s+you\s+(?:are|will|must|shall)\b"),
    "stay_in_character": (1, r"\b(?:stay|remain)\s+in\s+character\b"),
    # Starts only where a blob starts: tried again after each "+" or "/" inside it, a long blob
    # would cost quadratic time.
    "base64_blob": (1, r"(?<![a-z0-9+/])[a-z0-9+/]{48,}={0,2}"),
}

# Rules that start at a word (or a base64 blob) are tried only at word starts (three times
# faster than at every position); the few that start with punctuation or a line break, there. Each rule sits in a lookahead, so matches are
# zero-width and one rule cannot swallow the text another would match.
_ANYWHERE = ("fake_role_tag", "new_instructions")


def _compile() -> re.Pattern[str]:
    def alternation(names) -> str:
        return "|".join(f"(?P<{name}>{RULES[name][1]})" for name in names)

    at_words = [name for name in RULES if name not in _ANYWHERE]
    return re.compile(rf"(?<![a-z0-9])(?=[a-z0-9+/])(?=(?:{alternation(at_words)}))"
                      rf"|(?=[<\[\n])(?=(?:{alternation(_ANYWHERE)}))")


_SCAN = _compile()
_WEIGHTS = {name: weight for name, (weight, _) in RULES.items()}


@dataclass(frozen=True)
class GuardResult:
    score: int
    rules: tuple[str, ...]

    @property
    def flagged(self) -> bool:
        return self.score >= FLAG_SCORE


def prompt_injection_score(text: str) -> GuardResult:
    """Score one text (or several joined by newlines): the matched rules, each counted once."""
    if len(text) < MIN_SCAN_CHARS:
        return GuardResult(0, ())
    matched: dict[str, None] = {}
    # The leading newline lets line-start rules match the first line too.
    for match in _SCAN.finditer("\n" + text.lower()):
        matched[match.lastgroup] = None  # type: ignore[index]
    rules = tuple(matched)
    return GuardResult(sum(_WEIGHTS[r] for r in rules), rules)


def turn_input_text(turn: "ChatTurn") -> str:
    """The user messages of the turn's input, joined (never the stored history); content is one
    string each (agents.chat_input folds content parts)."""
    return "\n".join(m.get("content") or "" for m in turn.input_messages if m.get("role") == "user")


class PromptInjectionBlocked(InvalidRequest):
    code = "prompt_injection_blocked"
    message = "The message was refused by this agent's input guard: it looks like an attempt to override the " \
              "agent's instructions."


class InputGuardStage:
    """Flags (and, where the agent says so, blocks) likely prompt injection; see the module docstring."""

    async def before(self, turn: "ChatTurn") -> None:
        text = turn_input_text(turn)
        if len(text) > INLINE_SCAN_CHARS:
            result = await asyncio.to_thread(prompt_injection_score, text)
        else:
            result = prompt_injection_score(text)
        if not result.flagged:
            return
        blocked = turn.agent.block_prompt_injection
        turn.notes["guard"] = {"score": result.score, "rules": list(result.rules), "blocked": blocked}
        if blocked:
            raise PromptInjectionBlocked()
        details = {"rules": list(result.rules), "score": result.score, "transport": turn.transport}

        def record() -> None:
            audit_record(actor=turn_actor(turn), action="guard.prompt_injection", target=f"agent:{turn.agent.name}",
                         outcome="success", details=details, request_id=turn.request_id or "",
                         client_ip=turn.client_ip)

        try:
            # Awaited (a flagged turn is rare): the flag is on disk before the model sees the text.
            await write_db(record)
        except Exception:
            # The guard only flags here: a failing audit write must not refuse the request.
            logger.exception("Could not audit the prompt-injection flag of request %s", turn.request_id)
