"""agentplatform.jsonparse.loads_strict: the one JSON loader for client input."""

import pytest

from agentplatform.errors import InvalidRequest
from agentplatform.jsonparse import MAX_DEPTH, loads_strict


def refused(data) -> str:
    with pytest.raises(InvalidRequest) as info:
        loads_strict(data)
    assert info.value.code == "invalid_json" and info.value.http_status == 400
    return info.value.message


def test_it_loads_plain_json_from_bytes_and_str():
    body = '{"a": [1, 2.5, -3e10, true, null, "h\\u00e9llo \\ud83d\\ude00"], "b": {"c": "ü"}}'
    expected = {"a": [1, 2.5, -3e10, True, None, "héllo \U0001F600"], "b": {"c": "ü"}}
    assert loads_strict(body) == expected
    assert loads_strict(body.encode()) == expected
    assert loads_strict(bytearray(body.encode())) == expected
    assert loads_strict("[1, 2]") == [1, 2]  # any top-level value: callers decide what they need
    assert loads_strict(str(2**63)) == 2**63  # big integers are for the fields to bound


@pytest.mark.parametrize("text", ["NaN", "Infinity", "-Infinity", '{"t": NaN}', '{"m": {"x": [1, Infinity]}}',
                                  '[-Infinity]'])
def test_it_refuses_non_finite_constants(text):
    assert "not a JSON number" in refused(text)


@pytest.mark.parametrize("text", ["1e999", "-1e999", '{"metadata": 1e999}', '[1.5e400]'])
def test_it_refuses_numbers_that_overflow_to_infinity(text):
    assert "too large" in refused(text)


def test_it_accepts_the_deepest_allowed_nesting_and_refuses_one_more():
    assert loads_strict("[" * MAX_DEPTH + "]" * MAX_DEPTH) is not None
    deep_objects = '{"a":' * MAX_DEPTH + "1" + "}" * MAX_DEPTH
    assert loads_strict(deep_objects) is not None
    assert "nested deeper than 64" in refused("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1))
    assert "nested deeper than 64" in refused('{"a":' * (MAX_DEPTH + 1) + "1" + "}" * (MAX_DEPTH + 1))


@pytest.mark.parametrize("depth", [1_000, 100_000, 500_000])
def test_it_refuses_very_deep_input_without_a_recursion_error(depth):
    assert "nested deeper than 64" in refused("[" * depth + "]" * depth)
    assert "nested deeper than 64" in refused(("[" * depth).encode())


@pytest.mark.parametrize("text", ['"\\ud800"', '{"content": "a\\udfffb"}', '{"\\ud800": 1}', '["ok", ["\\udc00"]]'])
def test_it_refuses_lone_surrogates_in_values_and_keys(text):
    assert "lone surrogate" in refused(text)


@pytest.mark.parametrize("text", ['"\\u0000"', '{"title": "a\\u0000b"}', '{"\\u0000": 1}', '[["ok", "\\u0000"]]'])
def test_it_refuses_nul_characters_which_postgresql_cannot_store(text):
    assert "NUL character" in refused(text)


def test_it_refuses_a_lone_surrogate_in_a_str_argument():
    assert "lone surrogate" in refused('"\ud800"')


@pytest.mark.parametrize("data", [b"{not json", b"", b"\xff\xfe{}", "{'a': 1}", b'{"a": 1,}', "1" * 5000])
def test_it_refuses_malformed_input(data):
    assert refused(data).startswith("Malformed JSON: ")
