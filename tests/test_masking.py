"""PII and secret masking (governance.masking): planted secrets never survive, ordinary text is
left alone, masking is idempotent; mask_data, the logging filter, and masked transcripts."""

from __future__ import annotations

import copy
import io
import logging
import string
from collections import namedtuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agents.models import Message
from conftest import Api, orm
from governance.masking import MaskingFilter, mask_data, mask_text, mask_transcript_content

PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ALNUM = string.ascii_letters + string.digits
B64URL = ALNUM + "-_"
HEX = "0123456789abcdef"


def digits(n_min: int, n_max: int | None = None) -> st.SearchStrategy[str]:
    return st.text("0123456789", min_size=n_min, max_size=n_max if n_max is not None else n_min)


# --- planted secrets ----------------------------------------------------------------------

emails = st.builds(
    lambda first, rest, label, tld: f"{first}{rest}@{label}.{tld}",
    st.sampled_from(ALNUM), st.text(ALNUM + "._+-", max_size=15),
    st.text(string.ascii_lowercase + string.digits, min_size=2, max_size=12),
    st.sampled_from(["com", "org", "de", "co.uk", "io", "example"]))


@st.composite
def phones(draw) -> str:
    kind = draw(st.sampled_from(["intl", "e164", "nanp", "trunk"]))
    if kind == "nanp":
        area, exchange, line = draw(st.from_regex(r"[2-9][0-9]{2}", fullmatch=True)), draw(digits(3)), draw(digits(4))
        shape = draw(st.sampled_from(["({a}) {e}-{l}", "{a}-{e}-{l}", "{a}.{e}.{l}", "{a} {e} {l}", "1-{a}-{e}-{l}"]))
        return shape.format(a=area, e=exchange, l=line)
    if kind == "trunk":
        sep = draw(st.sampled_from([" ", "-", ".", "/"]))
        area = "0" + draw(digits(1, 3))
        groups = [area]
        while sum(map(len, groups)) < 9:  # ends with 9-12 digits
            groups.append(draw(digits(2, 4)))
        return sep.join(groups)
    cc = draw(st.from_regex(r"[1-9][0-9]{0,2}", fullmatch=True))
    national = draw(digits(8 - len(cc) + 1, 15 - len(cc)))
    if kind == "e164":
        return f"+{cc}{national}"
    sep = draw(st.sampled_from([" ", "-", "."]))
    parts, i = [], 0
    while i < len(national):
        size = draw(st.integers(2, 4))
        parts.append(national[i:i + size])
        i += size
    return f"+{cc}{sep}" + sep.join(parts)


openai_keys = st.builds(lambda kind, body: f"sk-{kind}{body}", st.sampled_from(["", "proj-", "svcacct-", "ant-api03-"]),
                        st.text(B64URL, min_size=20, max_size=80))
our_keys = st.builds(lambda prefix, secret: f"ap_{prefix}_{secret}", st.text(HEX, min_size=12, max_size=12),
                     st.text(B64URL, min_size=43, max_size=43))
aws_key_ids = st.builds(lambda kind, body: kind + body, st.sampled_from(["AKIA", "ASIA"]),
                        st.text(string.ascii_uppercase + string.digits, min_size=16, max_size=16))
aws_secrets = st.text(ALNUM + "/+", min_size=40, max_size=40).filter(
    lambda s: any(c.isupper() for c in s) and any(c.islower() for c in s))
bearer_tokens = st.builds(lambda a, d, b: a + d + b, st.text(B64URL + ".~+/", min_size=6, max_size=40),
                          st.sampled_from(string.digits), st.text(B64URL, min_size=1, max_size=40))
jwts = st.builds(lambda h, p, s: f"eyJ{h}.eyJ{p}.{s}", st.text(B64URL, min_size=10, max_size=40),
                 st.text(B64URL, min_size=10, max_size=120), st.text(B64URL, min_size=16, max_size=86))


def luhn_check_digit(body: str) -> str:
    total = 0
    for i, ch in enumerate(reversed(body)):
        d = int(ch)
        if i % 2 == 0:  # every second digit from the right, counting the check digit as first
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return str((10 - total % 10) % 10)


@st.composite
def cards(draw) -> str:
    length = draw(st.integers(13, 19))
    body = draw(st.sampled_from("23456")) + draw(digits(length - 2))
    number = body + luhn_check_digit(body)
    if length >= 16 and draw(st.booleans()):
        sep = draw(st.sampled_from([" ", "-"]))
        return sep.join(number[i:i + 4] for i in range(0, length, 4))
    return number


# (label, strategy of (text to plant, secret substring that must not survive))
PLANTS = {
    "email": emails.map(lambda e: (e, e)),
    "phone": phones().map(lambda p: (p, p)),
    "openai": openai_keys.map(lambda k: (k, k)),
    "ours": our_keys.map(lambda k: (k, k[len("ap_0123456789ab_"):])),  # the prefix is kept
    "aws_id": aws_key_ids.map(lambda k: (k, k)),
    "aws_secret": st.tuples(st.sampled_from(["aws_secret_access_key = {}", "AWS secret {}", "aws: {}",
                                             '"SecretAccessKey": "{}"']), aws_secrets)
                    .map(lambda t: (t[0].format(t[1]), t[1])),
    "bearer": st.tuples(st.sampled_from(["Bearer", "bearer", "Authorization: Bearer"]), bearer_tokens)
                .map(lambda t: (f"{t[0]} {t[1]}", t[1])),
    "jwt": jwts.map(lambda j: (j, j)),
    "card": cards().map(lambda c: (c, c)),
    "labelled": st.tuples(st.sampled_from(["password={}", "api_key: {}", '"client_secret": "{}"', "token={}",
                                           "X-API-Key: {}", "access_token={}&page=2"]),
                          st.text(ALNUM, min_size=10, max_size=30).filter(lambda v: any(c.isdigit() for c in v)))
                   .map(lambda t: (t[0].format(t[1]), t[1])),
}

# What stands between a plant and the random text around it: the plant is a token of its own.
separators = st.sampled_from([" ", "\n", ", ", "; ", " | ", " (", ") ", ": ", "\t"])
surrounding = st.text(max_size=60)


@st.composite
def texts_with_plants(draw) -> tuple[str, list[str], str]:
    """(text, the secrets planted in it, the text with the plants left out)."""
    parts, secrets, background = [draw(surrounding)], [], []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(sorted(PLANTS)))
        planted, secret = draw(PLANTS[kind])
        before, after, more = draw(separators), draw(separators), draw(surrounding)
        # "5 030 1234 5678 9" reads as one long number, and is not masked as a phone.
        if before == " " and parts[-1][-1:].isdigit():
            before = ", "
        if after == " " and more[:1].isdigit():
            after = ", "
        parts += [before, planted, after, more]
        # What the masker keeps of a plant (a label, "Bearer", our key's prefix) stays around.
        background += [before, planted.replace(secret, "\x00"), after, more]
        secrets.append(secret)
    return "".join(parts), secrets, parts[0] + "".join(background)


@PROPERTY
@given(texts_with_plants())
def test_it_never_lets_a_planted_secret_survive(case):
    text, secrets, background = case

    masked = mask_text(text)

    for secret in secrets:
        if secret in background:
            continue  # the random text around it happens to spell it too ("0000000000")
        assert secret not in masked


@pytest.mark.parametrize("plant", sorted(PLANTS))
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_it_masks_every_kind_of_secret(plant, data):
    planted, secret = data.draw(PLANTS[plant])

    masked = mask_text(f"see {planted} here")

    assert secret not in masked
    assert masked.startswith("see ") and masked.endswith(" here")


@pytest.mark.parametrize("text, expected", [
    ("mail bob.smith+tag@mail.example.co.uk now", "mail [email] now"),
    ("call +1 (415) 555-2671 or +44 20 7946 0958", "call [phone] or [phone]"),
    ("call 415-555-2671, (415) 555 2671 or 1-800-555-0199", "call [phone], [phone] or [phone]"),
    ("ring 020 7946 0958 or 06 12 34 56 78 or 030/12345678", "ring [phone] or [phone] or [phone]"),
    ("pay with 4111 1111 1111 1111 or 378282246310005", "pay with [card] or [card]"),
    ("key sk-proj-abcDEF1234567890abcdefGHIJ ok", "key [secret] ok"),
    ("presented ap_0123456789ab_Xy3-abcdefghijklmnopqrstuvwxyz0123456789abcd",
     "presented ap_0123456789ab_[redacted]"),
    ("Authorization: Bearer ap_0123456789ab_Xy3abcdefghijklmnop", "Authorization: Bearer ap_0123456789ab_[redacted]"),
    ("Authorization: Bearer abc.def-ghi_123456.", "Authorization: Bearer [redacted]."),
    ("Authorization: Basic dXNlcjpwYXNzd29yZA==", "Authorization: Basic [redacted]"),
    ("AKIAIOSFODNN7EXAMPLE wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "[secret] [secret]"),
    ("jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
     "jwt [token]"),
    ('password=hunter2 {"api_key": "abc"} apiKey: \'xyz\'',
     'password=[redacted] {"api_key": "[redacted]"} apiKey: \'[redacted]\''),
    ("access_token=abcd1234efgh&page=2", "access_token=[redacted]&page=2"),
    ("postgres://app:s3cr3t@db.example.com:5432/app", "postgres://app:[redacted]@db.example.com:5432/app"),
    ("-----BEGIN RSA PRIVATE KEY-----\nMIIEow\nIBAAK\n-----END RSA PRIVATE KEY----- after", "[secret] after"),
])
def test_it_masks_known_formats(text, expected):
    assert mask_text(text) == expected


# --- ordinary text ------------------------------------------------------------------------

WORDS = ("the agent answered quickly and the user asked again about shipping weather invoices meetings "
         "report summary deploy release database cache worker queue latency budget model answer "
         "Monday Paris Berlin Tokyo Ada Lovelace tomorrow please thanks hello review basic").split()


@st.composite
def luhn_failing_orders(draw) -> str:
    length = draw(st.integers(13, 19))
    body = draw(digits(length - 1))
    wrong = str((int(luhn_check_digit(body)) + draw(st.integers(1, 9))) % 10)
    number = body + wrong
    if length == 16 and draw(st.booleans()):
        return " ".join(number[i:i + 4] for i in range(0, 16, 4))
    return number


ints = st.integers
ordinary_chunks = st.one_of(
    st.sampled_from(WORDS),
    st.builds("in {}".format, ints(1900, 2099)),
    st.builds("on {:04d}-{:02d}-{:02d}".format, ints(1900, 2099), ints(1, 12), ints(1, 28)),
    st.builds("on {:02d}.{:02d}.{:04d}".format, ints(1, 28), ints(1, 12), ints(1900, 2099)),
    st.builds("on {:02d}/{:02d}/{:04d}".format, ints(1, 12), ints(1, 28), ints(1900, 2099)),
    st.builds("at {:02d}:{:02d}".format, ints(0, 23), ints(0, 59)),
    st.builds("at {:02d}:{:02d}:{:02d}".format, ints(0, 23), ints(0, 59), ints(0, 59)),
    st.builds("{:04d}-{:02d}-{:02d}T{:02d}:{:02d}:00Z".format, ints(1970, 2099), ints(1, 12), ints(1, 28),
              ints(0, 23), ints(0, 59)),
    st.builds("costs ${:,}.{:02d}".format, ints(0, 10**9), ints(0, 99)),
    st.builds("costs {},{:02d} €".format, ints(0, 99999), ints(0, 99)),
    st.builds("version v{}.{}.{}".format, ints(0, 30), ints(0, 99), ints(0, 999)),
    st.builds("{} items".format, ints(0, 10**6)),
    st.builds("{}.{}%".format, ints(0, 100), ints(0, 9)),
    st.builds("host {}.{}.{}.{}".format, ints(0, 255), ints(0, 255), ints(0, 255), ints(0, 255)),
    st.builds("port {}".format, ints(1, 65535)),
    st.builds("max_tokens={}".format, ints(1, 10**6)),
    st.builds("prompt_tokens: {}".format, ints(0, 10**6)),
    st.builds("order {}".format, luhn_failing_orders()),
    st.builds("order ORD-{}-{:06d}".format, ints(2000, 2099), ints(0, 999999)),
    st.builds("invoice #{}".format, ints(0, 10**12)),
    st.uuids().map("id {}".format),
    st.text(HEX, min_size=40, max_size=40).map("commit {}".format),
    st.builds("HTTP {}".format, st.sampled_from([200, 201, 400, 401, 404, 429, 500])),
)
ordinary_texts = st.lists(st.tuples(ordinary_chunks, st.sampled_from([" ", ", ", ". ", "\n", "; "])),
                          min_size=1, max_size=25).map(lambda parts: "".join(c + s for c, s in parts))


@PROPERTY
@given(ordinary_texts)
def test_it_leaves_ordinary_text_alone(text):
    assert mask_text(text) is text


@PROPERTY
@given(st.text(max_size=200))
def test_it_leaves_random_text_without_digits_or_at_signs_alone(text):
    # Every masked format carries a digit, an "@", a "=" / ":" label or a key prefix; text with
    # none of them is returned as it came.
    text = "".join(c for c in text if not c.isdigit() and c not in "@:=")
    if "eyJ" in text or "sk-" in text or "PRIVATE KEY" in text or "://" in text:
        return
    assert mask_text(text) == text


def test_it_returns_the_same_object_when_there_is_nothing_to_mask():
    text = "Order 1234567890123 shipped on 2024-01-15 at 10:30 for $1,234.56 (v1.2.3)."

    assert mask_text(text) is text
    assert mask_transcript_content(text) is text


# --- idempotence --------------------------------------------------------------------------

digit_soup = st.text("0123456789 +-.()/:@aZ_=[]", max_size=80)
# Pieces of the formats, shuffled together: labels after labels, placeholders next to digits...
fragments = st.lists(st.sampled_from([
    "password", "PWD", "api_key", "token", "tokens", "secret", "Bearer", "basic", "aws", ":", "=", ": ", " ", "\n",
    '"', "'", "[redacted]", "[secret]", "[phone]", "[card]", "[email]", "ap_0123456789ab_", "sk-", "AKIA", "eyJ",
    "abcDEF123456", "0", "12", "415", "555-2671", "+1", "4111", "1111", "-", ".", "@", "x.com", "://", "(", ")",
    "[", "]", "/", "_", "AbCdEfGhIjKlMnOpQrStUvWxYz0123456789AbCd", "eyJab.eyJcd.ef", "dXNlcjpw==", "\t",
]), max_size=30).map("".join)


@PROPERTY
@given(st.one_of(texts_with_plants().map(lambda case: case[0]), ordinary_texts, digit_soup, fragments,
                 st.text(max_size=120)))
def test_it_masks_idempotently(text):
    once = mask_text(text)

    assert mask_text(once) == once


# --- mask_data ----------------------------------------------------------------------------

Pair = namedtuple("Pair", "left right")


def test_it_masks_nested_data_without_mutating_it():
    data = {
        "user": {"email": "ada@example.com", "phones": ["+44 20 7946 0958", 42, None]},
        "password": "hunter2",
        "accessToken": "abc",
        "X-API-Key": "ap_0123456789ab_secret",
        "credentials": {"user": "ada"},
        "max_tokens": 500,
        "prompt_tokens": 12,
        "api_key_prefix": "0123456789ab",
        "client_secret": None,
        "pair": Pair("ok", "card 4111111111111111"),
        "tags": ("a@b.io", 1.5, True),
        "ids": {"run_id": "550e8400-e29b-41d4-a716-446655440000"},
    }
    before = copy.deepcopy(data)

    masked = mask_data(data)

    assert data == before
    assert masked == {
        "user": {"email": "[email]", "phones": ["[phone]", 42, None]},
        "password": "[redacted]",
        "accessToken": "[redacted]",
        "X-API-Key": "[redacted]",
        "credentials": "[redacted]",
        "max_tokens": 500,
        "prompt_tokens": 12,
        "api_key_prefix": "0123456789ab",
        "client_secret": None,
        "pair": Pair("ok", "card [card]"),
        "tags": ("[email]", 1.5, True),
        "ids": {"run_id": "550e8400-e29b-41d4-a716-446655440000"},
    }
    assert type(masked["pair"]) is Pair


def test_it_masks_a_plain_string_and_leaves_other_values_alone():
    thing = object()

    assert mask_data("mail ada@example.com") == "mail [email]"
    assert mask_data(thing) is thing
    assert mask_data(17) == 17
    assert mask_data(None) is None


def test_it_survives_cyclic_data():
    data: dict = {"email": "ada@example.com"}
    data["self"] = data

    masked = mask_data(data)

    assert masked["email"] == "[email]"
    assert masked["self"]["email"] == "[email]"


json_like = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=30),
              texts_with_plants().map(lambda case: case[0])),
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(st.sampled_from(["a", "email", "password", "note", "token", "n"]),
                                               children, max_size=4)),
    max_leaves=12)


def _strings_in(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings_in(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings_in(v)


@PROPERTY
@given(json_like)
def test_it_masks_every_string_in_data_and_never_mutates_it(data):
    before = copy.deepcopy(data)

    masked = mask_data(data)

    assert data == before
    for s in _strings_in(masked):
        assert mask_text(s) == s
    assert mask_data(masked) == masked


# --- the logging filter -------------------------------------------------------------------


@pytest.fixture
def captured():
    """A logger whose handler masks, like settings.LOGGING's console handler; yields (logger, output)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    handler.addFilter(MaskingFilter())
    logger = logging.getLogger("tests.masking")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield logger, stream
    logger.removeHandler(handler)
    logger.propagate = True


def test_it_masks_log_messages_and_percent_args(captured):
    logger, out = captured

    logger.info("user ada@example.com logged in")
    logger.info("user %s paid %d times with %s", "ada@example.com", 3, "4111 1111 1111 1111")
    logger.warning("key %r rejected", "ap_0123456789ab_Xy3abcdefghijklmnop")

    assert out.getvalue().splitlines() == [
        "INFO user [email] logged in",
        "INFO user [email] paid 3 times with [card]",
        "WARNING key 'ap_0123456789ab_[redacted]' rejected",
    ]


def test_it_masks_dict_args(captured):
    logger, out = captured

    logger.info("%(who)s called %(phone)s (%(n)d)", {"who": "ada@example.com", "phone": "+1 415 555 2671", "n": 2})

    assert out.getvalue() == "INFO [email] called [phone] (2)\n"


def test_it_keeps_the_template_of_a_record_with_nothing_to_mask():
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "served %s in %d ms", ("run 42", 17), None)

    assert MaskingFilter().filter(record) is True
    assert (record.msg, record.args) == ("served %s in %d ms", ("run 42", 17))


def test_it_masks_tracebacks(captured):
    logger, out = captured

    try:
        raise ValueError("no account for ada@example.com")
    except ValueError:
        logger.exception("lookup failed for %s", "ada@example.com")

    text = out.getvalue()
    assert "ada@example.com" not in text
    assert "ValueError: no account for [email]" in text
    assert text.startswith("ERROR lookup failed for [email]\nTraceback")


def test_it_masks_non_string_messages(captured):
    logger, out = captured

    logger.info({"email": "ada@example.com"})

    assert out.getvalue() == "INFO {'email': '[email]'}\n"


def test_it_never_breaks_logging_on_a_bad_format_string(captured, capsys):
    logger, out = captured
    email = "ada" + "@example.com"  # not spelled out: logging's error report prints this source line
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "%d apples for %s", ("many", email), None)

    assert MaskingFilter().filter(record) is True
    assert record.args == ("many", "[email]")

    # Logging reports the broken record itself, on stderr (straight to our handler: pytest's
    # capturing handler would turn the report into an error).
    logger.handlers[0].handle(logger.makeRecord("x", logging.INFO, __file__, 1, "%d apples for %s",
                                                ("many", email), None))

    assert "ada@example.com" not in capsys.readouterr().err
    assert out.getvalue() == ""


# --- transcripts --------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("masked", [True, False])
async def test_it_stores_masked_transcripts_when_the_agent_asks(masked, make_agent, make_key):
    await orm(make_agent, name="demo", mask_transcripts=masked)
    key = await orm(make_key)

    response = await Api(key).post("/api/v1/agents/demo/chat", {"message": "mail me at ada@example.com"})

    assert response.status_code == 200
    stored = await orm(lambda: list(Message.objects.filter(session_id=response.json()["session_id"])
                                    .order_by("created_at", "id").values_list("role", "content")))
    email = "[email]" if masked else "ada@example.com"
    assert stored[0] == ("user", f"mail me at {email}")
    assert stored[-1][0] == "assistant" and email in stored[-1][1]


@pytest.mark.django_db(transaction=True)
async def test_it_masks_the_title_and_tool_arguments_of_masked_transcripts(make_agent, make_key):
    from agents.models import Session

    await orm(make_agent, name="demo", mask_transcripts=True, skills=["http_fetch"])
    key = await orm(make_key)

    # The offline model calls http_fetch with the URL, which carries a password.
    response = await Api(key).post("/api/v1/agents/demo/chat",
                                   {"message": "fetch https://bob:hunter2secret@example.com/x please"})

    assert response.status_code == 200
    session_id = response.json()["session_id"]
    title = await orm(lambda: Session.objects.get(pk=session_id).title)
    calls = await orm(lambda: [m.tool_calls for m in Message.objects.filter(session_id=session_id) if m.tool_calls])
    assert "hunter2secret" not in title
    assert calls and "hunter2secret" not in str(calls)
