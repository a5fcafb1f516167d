"""PII and secret masking: applied to audit details and logs always, and to the stored
transcripts of agents with `mask_transcripts` (agents/pipeline.py calls `mask_text`).

What is masked, and into what:

  e-mail addresses                                   -> [email]
  URL credentials  scheme://user:PASS@host           -> scheme://user:[redacted]@host
  JWTs             eyJ<header>.eyJ<payload>[.<sig>]  -> [token]
  our API keys     ap_<prefix>_<secret>              -> ap_<prefix>_[redacted]  (the prefix is not
                                                        secret and is what admins search for)
  provider keys    OpenAI/Anthropic sk-..., AWS access key ids (AKIA/ASIA/...), GitHub gh?_...,
                   Slack xox?-..., Google AIza..., Stripe sk_live_/rk_live_...
                                                     -> [secret]
  PEM private key blocks                             -> [secret]
  AWS secret access keys: a 40-char [A-Za-z0-9/+] token with both cases, on a line that says
                   "aws" or "secret" (a bare 40-char string is too ambiguous: git SHAs, ids)
                                                     -> [secret]
  Authorization    Bearer <token> / Basic <creds>    -> Bearer [redacted] / Basic [redacted]
  labelled secrets password=..., "api_key": "...", secret: ..., client_secret, private_key,
                   access_key ...                    -> <label>=[redacted] (any value)
                   token=..., authorization: ..., cookie: ...  -> the same, only when the value
                   looks like a secret (so `max_tokens=500` and `token: the` survive)
  card numbers     13-19 digits starting 2-6, contiguous or grouped like a card (4-4-4-4[-1..3],
                   4-6-4/5) with spaces or dashes, Luhn-valid  -> [card]
  phone numbers    +<country code>, an optional (area), digit groups: 8+ digits in all, separated
                   by single spaces, dots or dashes;
                   NANP (415) 555-2671 / 415-555-2671 / 1-800-555-0199 (consistent separators);
                   national numbers with a trunk 0 and separators, 9-12 digits in all
                   and one kind of separator (020 7946 0958, 06 12 34 56 78, 030/12345678)
                                                     -> [phone]

Deliberately NOT masked (documented false negatives, chosen to keep ordinary text intact):
bare digit runs without "+" (order numbers, ids, timestamps: 4155552671 is ambiguous), 7-digit
local numbers (555-1234), dates, times, years, amounts, versions, IP addresses, UUIDs, hex
digests, Luhn-failing or non-card-shaped long numbers, secrets in prose without a label
("my password is hunter2"). A card-shaped number that passes Luhn and starts with 2-6 is masked
even when it is an order number (one in ten random ones does).

Why hand-written regular expressions rather than a library: Presidio needs a spaCy model and
costs milliseconds per string; phonenumbers' matcher needs a region and is slow per log line;
neither knows our key format. These run in C, one pass per pattern, and skip a pass whose
trigger (e.g. "@", "eyJ", "ap_") is absent.

Properties: `mask_text` returns the very same object when nothing matched and is idempotent
(masking masked text changes nothing): placeholders contain no digits or key material, and
every pattern refuses to match a partial token next to a placeholder.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from functools import lru_cache
from typing import Any, Callable

EMAIL = "[email]"
PHONE = "[phone]"
CARD = "[card]"
TOKEN = "[token]"
SECRET = "[secret]"
REDACTED = "[redacted]"
_PLACEHOLDERS = (EMAIL, PHONE, CARD, TOKEN, SECRET, REDACTED)

# mask_data: nesting deeper than this (or a cycle) is replaced wholesale.
_MAX_DEPTH = 64

# --- patterns -----------------------------------------------------------------------------
# Every pattern starts only at the beginning of a run of the characters it consumes (a
# lookbehind), so a long base64 blob or digit run costs one attempt, not one per position.
# Those lookbehinds refuse "]" and the lookaheads "[": a placeholder next to a token must not
# make it match on a second pass when the character there the first time kept it from matching.

_PRIVATE_KEY = re.compile(
    r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.*?(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|\Z)", re.S)

_URL_PASSWORD = re.compile(r"(?<=://)([^\s:/@\[\]]+):([^\s/@\[\]]+)@")

_JWT = re.compile(r"(?<![A-Za-z0-9_\]-])eyJ[A-Za-z0-9_-]+\.eyJ[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)?(?![A-Za-z0-9_\[-])")

# Ours: ap_<12 hex>_<token_urlsafe>. A few more hex digits tolerated; the secret is anything
# key-shaped that follows (also a truncated one). Digits may precede it ("1ap_..." is a key
# glued to a number, as a phone pass would otherwise leave "[phone]ap_...").
_OUR_KEY = re.compile(r"(?<![A-Za-z_\]])ap_([0-9a-f]{8,32})_[A-Za-z0-9_-]+(?![A-Za-z0-9_-]|\[)")

# Other services' keys: (substrings one of which the key contains, pattern). Checking the
# substrings first keeps a pass that cannot match from scanning at all.
_AWS_ID_PREFIXES = ("AKIA", "ASIA", "AGPA", "AIDA", "AROA", "AIPA", "ANPA", "ANVA", "ABIA", "ACCA")
_PROVIDER_KEYS: tuple[tuple[tuple[str, ...], re.Pattern], ...] = (
    # OpenAI sk-, sk-proj-, sk-svcacct-; Anthropic sk-ant-
    (("sk-",), re.compile(r"(?<![A-Za-z0-9_\]-])sk-[A-Za-z0-9_-]{20,}(?![A-Za-z0-9_\[-])")),
    # AWS access key ids
    (_AWS_ID_PREFIXES,
     re.compile(rf"(?<![A-Za-z0-9\]])(?:{'|'.join(_AWS_ID_PREFIXES)})[A-Z0-9]{{16}}(?![A-Za-z0-9\[])")),
    # GitHub
    (("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"),
     re.compile(r"(?<![A-Za-z0-9_\]])(?:gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{22,})(?![A-Za-z0-9_\[])")),
    # Slack
    (("xox",), re.compile(r"(?<![A-Za-z0-9_\]-])xox[abposr]-[A-Za-z0-9-]{10,}(?![A-Za-z0-9_\[-])")),
    # Google
    (("AIza",), re.compile(r"(?<![A-Za-z0-9_\]-])AIza[A-Za-z0-9_-]{35}(?![A-Za-z0-9_\[-])")),
    # Stripe secret and restricted keys
    (("k_live_", "k_test_"), re.compile(r"(?<![A-Za-z0-9_\]])[sr]k_(?:live|test)_[A-Za-z0-9]{16,}(?![A-Za-z0-9_\[])")),
)

_TOKEN_CHARS = r"A-Za-z0-9._~+/-"
# Basic credentials are plain base64, which keeps "basic 2024-01-15T10:30" out.
_AUTH_SCHEME = re.compile(
    rf"(?<![A-Za-z0-9_\]])(?:(?i:(bearer))[ \t]+([{_TOKEN_CHARS}]+=*)(?![=\[{_TOKEN_CHARS}])"
    rf"|(?i:(basic))[ \t]+([A-Za-z0-9+/]+=*)(?![=\[{_TOKEN_CHARS}]))")

# AWS secret access keys have no prefix: a 40-char candidate counts only on a line that says
# "aws" or "secret" ([secret] placeholders included: an access key id masked just before is
# context too). Line-based rather than distance-based so masking elsewhere on the line, which
# only shortens it, never changes the verdict (idempotence).
_AWS_SECRET = re.compile(r"(?<![A-Za-z0-9/+=._\]-])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=_\[-]|\.[A-Za-z0-9])")
_AWS_CONTEXT = re.compile(r"(?i:aws|secret)")

# Labelled secrets. The label is matched by its last word (access_token, X-API-Key, apiKey,
# "client_secret": ...); a label running on (token_type, tokenizer, api_key_id) is no label.
_STRICT_LABELS = (r"password|passwd|passphrase|pwd|secret|credential"
                  r"|api[_-]?key|access[_-]?key|secret[_-]?key|private[_-]?key")
_LENIENT_LABELS = r"token|authorization|cookie"
_UNQUOTED = r"[^\s,;&\"'<>(){}\[\]]"
_LABEL = (rf"(?i:(?P<strict>{_STRICT_LABELS})|(?P<lenient>{_LENIENT_LABELS}))(?P<plural>s?)(?![A-Za-z0-9_-])"
          rf"(?P<sep>[\"']?[ \t]*[:=][ \t]*)")
_LABEL_ONLY = re.compile(_LABEL)
_LABELLED = re.compile(
    # The leading lookahead (every label's first letter) lets the engine skip most positions fast.
    rf"(?=[AaCcPpSsTt]){_LABEL}"
    rf"(?P<val>\"(?:[^\"\\\n]|\\.)*\"|'(?:[^'\\\n]|\\.)*'|{_UNQUOTED}+(?!{_UNQUOTED}|\[))")

_EMAIL = re.compile(
    r"(?<![A-Za-z0-9._%+\]-])[A-Za-z0-9._%+-]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*\.[A-Za-z]{2,24}")

# Cards: only card shapes, so long grouped numbers (invoices, IBAN-like ids) are not searched
# for a Luhn-valid window. "]" in the lookbehind: a digit run right after a placeholder was
# part of something else.
_CARD = re.compile(
    r"(?=[2-6])(?<![0-9A-Za-z_.+\-\]])"
    r"(?:[2-6][0-9]{12,18}"
    r"|[2-6][0-9]{3}(?P<s1>[ -])[0-9]{4}(?P=s1)[0-9]{4}(?P=s1)[0-9]{4}(?:(?P=s1)[0-9]{1,3})?"
    r"|[2-6][0-9]{3}(?P<s2>[ -])[0-9]{6}(?P=s2)[0-9]{4,5})"
    r"(?![0-9A-Za-z_\[])")

_PHONE_INTL = re.compile(
    # +CC, an optional (area) right after it, digit groups
    r"(?<![0-9A-Za-z_+\]])\+[1-9][0-9]{0,2}(?:[ .-]?\([0-9]{1,4}\))?(?:[ .-]?[0-9]{1,5}){1,7}")
_PHONE_NATIONAL = re.compile(
    # NANP with consistent separators, optional leading 1
    r"(?<![0-9A-Za-z_.+/:\-\]])(?:1[ .-]?)?"
    r"(?:\([2-9][0-9]{2}\)[ ]?[0-9]{3}[ .-]|[2-9][0-9]{2}(?P<s>[ .-])[0-9]{3}(?P=s))[0-9]{4}(?![0-9]|[.-][0-9])"
    # national with a trunk 0, one kind of separator throughout (so "01/15/2024 10" is no phone),
    # not the tail of a longer grouped number ("1000 0000 0000 0009")
    r"|(?<![0-9A-Za-z_.+/:\-\]])(?<![0-9][ ./-])"
    r"(?:\(0[0-9]{1,4}\)|0[0-9]{1,4})(?P<t>[ ./-])[0-9]{2,8}(?:(?P=t)[0-9]{2,8}){0,3}(?![0-9]|[ ./-][0-9])")


# --- replacements -------------------------------------------------------------------------


_NUMBER = re.compile(r"[+-]?[0-9][0-9_.,]*")


def _looks_secret(value: str, *, digits_only_ok: bool = True) -> bool:
    """A credential rather than a word: long enough and not plain prose (nor, where the label
    may be a count, `tokens=12345678`, all digits)."""
    if len(value) < 8 or (not digits_only_ok and _NUMBER.fullmatch(value)):
        return False
    if any(c.isdigit() for c in value) or any(c in "_~+/=" for c in value) or len(value) >= 20:
        return True
    # Mixed case past the first letter (camelCase, base64); "Authentication" is a word.
    return any(c.isupper() for c in value[1:]) and any(c.islower() for c in value)


def _has_placeholder(value: str) -> bool:
    return any(p in value for p in _PLACEHOLDERS)


def _url_password(m: re.Match) -> str:
    return f"{m.group(1)}:{REDACTED}@"


def _our_key(m: re.Match) -> str:
    return f"ap_{m.group(1)}_{REDACTED}"


def _auth_scheme(m: re.Match) -> str | None:
    scheme, token = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
    stripped = token.rstrip(".")  # a sentence's full stop is not part of the token
    if not _looks_secret(stripped, digits_only_ok=True):
        return None
    return f"{scheme} {REDACTED}{token[len(stripped):]}"


_NOT_SECRETS = frozenset({"bearer", "basic", "null", "none", "true", "false"})


def _labelled(m: re.Match) -> str | None:
    val = m.group("val")
    quote = val[0] if val[0] in "\"'" else ""
    inner = val[1:-1] if quote else val
    if not inner or _has_placeholder(inner) or inner.lower() in _NOT_SECRETS:
        return None
    if not quote and inner.endswith(":") and _LABEL_ONLY.match(m.string, m.start("val")):
        return None  # "pwd: api_key: <value>": the value is the next label's
    # "tokens: 500", "secrets: 3": plural labels are usually counts; "credentials" is not.
    count = bool(m.group("plural")) and (m.group("strict") or "").lower() != "credential"
    if (m.group("lenient") or count) and not _looks_secret(inner, digits_only_ok=not count):
        return None
    return m.group(0)[: m.start("val") - m.start()] + f"{quote}{REDACTED}{quote}"


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card(m: re.Match) -> str:
    digits = re.sub(r"[^0-9]", "", m.group(0))
    return CARD if _luhn(digits) else m.group(0)


def _phone(m: re.Match) -> str:
    text = m.group(0)
    n = sum(c.isdigit() for c in text)
    if text[0] == "+":
        return PHONE if n >= 8 else text
    if text[0] == "0" or text.startswith("(0"):
        return PHONE if 9 <= n <= 12 else text
    return PHONE  # NANP: the shape says it all


def _mask_aws_secrets(text: str) -> str:
    lines: dict[int, bool] = {}

    def repl(m: re.Match) -> str:
        tok = m.group(0)
        if not (any(c.isupper() for c in tok) and any(c.islower() for c in tok)):
            return tok  # hex digests, all-caps ids
        start = text.rfind("\n", 0, m.start()) + 1
        if start not in lines:
            end = text.find("\n", m.end())
            lines[start] = _AWS_CONTEXT.search(text, start, len(text) if end < 0 else end) is not None
        return SECRET if lines[start] else tok

    return _AWS_SECRET.sub(repl, text)


def _sub(pattern: re.Pattern, repl: str | Callable[[re.Match], str]) -> Callable[[str], str]:
    return lambda text: pattern.sub(repl, text)


def _sub_or_retry(pattern: re.Pattern, repl: Callable[[re.Match], str | None]) -> Callable[[str], str]:
    """Like `_sub`, but a match `repl` declines (None) is not consumed: the search resumes one
    character later, so "Basic Bearer <token>" or "token: secret: <value>" still finds the second."""

    def apply(text: str) -> str:
        out: list[str] = []
        done = pos = 0
        while (m := pattern.search(text, pos)) is not None:
            replacement = repl(m)
            if replacement is None:
                pos = m.start() + 1
                continue
            out += (text[done:m.start()], replacement)
            done = pos = m.end()
        if not out:
            return text
        out.append(text[done:])
        return "".join(out)

    return apply


def _mask_provider_keys(text: str) -> str:
    for needles, pattern in _PROVIDER_KEYS:
        if any(n in text for n in needles):
            text = pattern.sub(SECRET, text)
    return text


def _contains(*needles: str) -> Callable[[str], bool]:
    return lambda text: any(n in text for n in needles)


def _contains_word(*words: str) -> Callable[[str], bool]:
    """Case-insensitive `_contains` (words given in lower case)."""

    def check(text: str) -> bool:
        lowered = text.lower()
        return any(w in lowered for w in words)

    return check


def _has_digit(text: str) -> bool:
    return _DIGIT.search(text) is not None


def _labels_possible(text: str) -> bool:
    if "=" not in text and ":" not in text:
        return False
    lowered = text.lower()
    return any(w in lowered for w in _LABEL_WORDS)


_DIGIT = re.compile(r"[0-9]")
_LABEL_WORDS = ("pass", "pwd", "secret", "credential", "key", "token", "authorization", "cookie")

# (trigger, pass). A cheap trigger (a substring) skips a pass that cannot match. Order matters:
# specific formats first (so "Bearer ap_..." keeps its prefix and a JWT is one [token]), then
# the AWS pass (it treats the [secret]s before it as context, and nothing after it makes a
# [secret]), then labels (they skip values already masked), then e-mail before cards and
# phones (an address's digits belong to the address), cards before phones.
_PASSES: tuple[tuple[Callable[[str], bool], Callable[[str], str]], ...] = (
    (_contains("PRIVATE KEY-----"), _sub(_PRIVATE_KEY, SECRET)),
    (lambda t: "://" in t and "@" in t, _sub(_URL_PASSWORD, _url_password)),
    (_contains("eyJ"), _sub(_JWT, TOKEN)),
    (_contains("ap_"), _sub(_OUR_KEY, _our_key)),
    (lambda t: True, _mask_provider_keys),
    (_contains_word("bearer", "basic"), _sub_or_retry(_AUTH_SCHEME, _auth_scheme)),
    (_contains_word("aws", "secret"), _mask_aws_secrets),
    (_labels_possible, _sub_or_retry(_LABELLED, _labelled)),
    (_contains("@"), _sub(_EMAIL, EMAIL)),
    (_has_digit, _sub(_CARD, _card)),
    (_contains("+"), _sub(_PHONE_INTL, _phone)),
    (_has_digit, _sub(_PHONE_NATIONAL, _phone)),
)


# --- public API ---------------------------------------------------------------------------


def mask_text(text: str) -> str:
    """`text` with e-mail addresses, phone numbers, keys, tokens and card numbers masked.

    Returns the same object when there is nothing to mask; masking twice equals masking once.
    """
    if not isinstance(text, str) or len(text) < 6:
        return text  # nothing we mask is shorter (a@b.co)
    out = text
    for triggered, apply in _PASSES:
        if triggered(out):
            out = apply(out)
    return text if out == text else out


def mask_transcript_content(text: str) -> str:
    """A message's content as stored for agents with `mask_transcripts`."""
    return mask_text(text)


@lru_cache(maxsize=1024)
def _sensitive_key(key: str) -> bool:
    """Keys whose whole value is a secret: password, client_secret, accessToken, X-API-Key...
    Plural counts (`max_tokens`, `tokens`) and ids (`api_key_id`, `key_prefix`) are not."""
    name = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", key).lower().replace("-", "_").replace(" ", "_")
    return name.endswith(("password", "passwd", "passphrase", "pwd", "secret", "token", "apikey", "api_key",
                          "access_key", "secret_key", "private_key", "authorization", "cookie", "credentials",
                          "credential"))


def mask_data(value: Any) -> Any:
    """A masked copy of `value`: strings masked (mask_text) in dicts, lists, tuples and sets at
    any depth; the values of secret-named keys replaced by "[redacted]"; keys and non-strings
    kept. The input is never changed."""
    return _mask_data(value, 0)


def _mask_data(value: Any, depth: int) -> Any:
    if isinstance(value, str):
        return mask_text(value)
    if depth >= _MAX_DEPTH:
        return REDACTED if isinstance(value, (Mapping, list, tuple, set, frozenset)) else value
    if isinstance(value, Mapping):
        return {k: (REDACTED if isinstance(k, str) and _sensitive_key(k) and _redactable(v)
                    else _mask_data(v, depth + 1))
                for k, v in value.items()}
    if isinstance(value, list):
        return [_mask_data(v, depth + 1) for v in value]
    if isinstance(value, tuple):
        items = [_mask_data(v, depth + 1) for v in value]
        return type(value)._make(items) if hasattr(value, "_fields") else tuple(items)
    if isinstance(value, (set, frozenset)):
        items = (_mask_data(v, depth + 1) for v in value)
        return frozenset(items) if isinstance(value, frozenset) else set(items)
    return value


def _redactable(value: Any) -> bool:
    # None, flags and empty strings say nothing secret and help reading ("password": null).
    return value is not None and not isinstance(value, bool) and not (isinstance(value, str) and not value)


_TRACEBACK_FORMATTER = logging.Formatter()


class MaskingFilter(logging.Filter):
    """Masks log records' messages, arguments, tracebacks and stack info.

    A record with arguments is rendered first (`getMessage()`) and, when the rendered text
    needed masking, replaced by the masked text with no arguments: masking arguments one by
    one could break `%d` or miss what an object's `__str__` prints. Records without anything
    to mask keep their template and arguments. Never raises: logging must not break.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            _mask_record(record)
        except Exception:
            # Fail closed: a record the masker chokes on is not printed as it is.
            try:
                record.msg, record.args = "[log message withheld: masking failed]", ()
                record.exc_info, record.exc_text, record.stack_info = None, None, None
            except Exception:
                pass
        return True


def _mask_record(record: logging.LogRecord) -> None:
    if record.args:
        try:
            rendered = record.getMessage()
        except Exception:
            # A broken format string: logging will report it, printing msg and args. Make sure
            # what it prints is masked, and leave the failure itself to logging.
            if isinstance(record.msg, str):
                record.msg = mask_text(record.msg)
            record.args = mask_data(record.args)
        else:
            masked = mask_text(rendered)
            if masked is not rendered:
                record.msg, record.args = masked, ()
    elif isinstance(record.msg, str):
        record.msg = mask_text(record.msg)
    elif record.msg is not None:
        rendered = str(record.msg)
        masked = mask_text(rendered)
        if masked is not rendered:
            record.msg = masked
    if record.exc_info and not record.exc_text:
        # Formatters render the traceback after filters ran; render it now so it is masked.
        record.exc_text = _TRACEBACK_FORMATTER.formatException(record.exc_info)
    if record.exc_text:
        record.exc_text = mask_text(record.exc_text)
    if record.stack_info:
        record.stack_info = mask_text(record.stack_info)
