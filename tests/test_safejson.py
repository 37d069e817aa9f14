"""verifier.safejson: bounded JSON for outside data. Each limit refused with its reason; honest
documents parse exactly as json.loads parses them."""

import json
import time

import pytest

from commitllm.verifier.safejson import JSONError, loads


@pytest.mark.parametrize("doc", [
    '{"a": [1, 2.5, {"b": "[[\\"[["}], "c": true, "d": null, "e": -1.5e-3}', "[]", "3", '"x"',
    '{"\\u00e9": "]]}}"}', '[' * 64 + ']' * 64, '[-9223372036854775808, 18446744073709551615]',
])
def test_honest_documents_parse_like_json(doc):
    assert loads(doc, max_bytes=10**6) == json.loads(doc)
    assert loads(doc.encode(), max_bytes=10**6) == json.loads(doc)


@pytest.mark.parametrize("doc,why", [
    ("[" * 65 + "]" * 65, "nested deeper"),
    ('{"a": 1, "a": 2}', "duplicate key"),
    ("[NaN]", "NaN"), ("[Infinity]", "Infinity"), ("[-Infinity]", "Infinity"),
    ("[1e999]", "not a finite float"), ("[" + "9" * 41 + "]", "number of 41"),
    ("[1." + "0" * 45 + "]", "number of"),
    (b"\xff\xfe", "not UTF-8"), ('{"a":', "not JSON"), ('"' + '\\"' * 1000, "not JSON"),
])
def test_refused_with_reason(doc, why):
    with pytest.raises(JSONError, match=why):
        loads(doc, max_bytes=10**6)


def test_size_checked_before_parsing():
    with pytest.raises(JSONError, match="10-byte limit"):
        loads("[" + "1," * 100 + "1]", max_bytes=10)


@pytest.mark.parametrize("doc", ["[" * 2_000_000, '"\\"' * 700_000, '"' * 2_000_000])
def test_hostile_structure_is_linear(doc):
    t = time.perf_counter()
    with pytest.raises(JSONError):
        loads(doc, max_bytes=10**8)
    # generous: ~0.2 s here; a quadratic scan of these 2 MB inputs would take minutes
    assert time.perf_counter() - t < 10


def test_uint_ids_takes_plain_ints_in_range_only():
    import enum

    from commitllm.verifier.safejson import uint_ids

    class E(enum.IntEnum):
        A = 1
    assert uint_ids([]) and uint_ids([0, 5, 2**32 - 1]) and uint_ids((3, 4))
    for bad in ([True], [1, False], [-1], [2**32], [1, 2.0], [1, None], [E.A], ["1"], "12",
                {1: 2}, None, [[1]]):
        assert not uint_ids(bad), bad
    assert uint_ids([7, 2**16], limit=2**16 + 1) and not uint_ids([2**16], limit=2**16)
