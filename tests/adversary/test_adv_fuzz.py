"""Bounded fuzzing (hypothesis, derandomized: the same examples on every run) of everything a
provider sends: the opening's arrays and meta, its container bytes, the receipt JSON (raw, and
re-sealed by a provider that recomputes every hash), and the challenge it answers. Every input
that is not what an honest provider and this verifier produced yields a Verdict that rejects with
a reason code, or a ContainerError at parse time; nothing raises out of verify().

ADVERSARY_FUZZ_EXAMPLES raises the bound (e.g. 1000), ADVERSARY_FUZZ_RANDOM=1 draws fresh examples.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from advworld import assert_refused, assert_rejected, edited, json_paths, resealed
from commitllm.verifier import container
from commitllm.verifier.opening import OPENING_MAGIC, OPENING_VERSION
from commitllm.verifier.verify import Verdict
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

FUZZ = settings(max_examples=int(os.environ.get("ADVERSARY_FUZZ_EXAMPLES", "100")),
                deadline=None, derandomize=os.environ.get("ADVERSARY_FUZZ_RANDOM") is None,
                database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DTYPES = [np.float32, np.float64, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint64]
OPS = ["delete", "retype", "drop-row", "add-row", "flatten", "empty", "element"]
JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                 max_size=3),
    max_leaves=6)
# manifest fields no check reads: a re-sealed receipt may change them and still pass
# the only fields a re-sealed edit may change and still pass: top_k and top_p of a greedy receipt
# (the chat world's), which the greedy policy never reads (their types and domain are checked)
UNBOUND = {("manifest", "sampling", "top_k"), ("manifest", "sampling", "top_p")}


def _mutate(arrays, name, op, dtype, idx, value):
    a, out = arrays[name], dict(arrays)
    if op == "delete":
        del out[name]
    elif op == "retype":
        out[name] = a.astype(dtype)
    elif op == "drop-row":
        out[name] = a[:-1]
    elif op == "add-row":
        out[name] = np.concatenate([a, a[-1:]]) if a.ndim else a.reshape(1)
    elif op == "flatten":
        out[name] = a.reshape(-1)
    elif op == "empty":
        out[name] = np.zeros((0,) + a.shape[1:], a.dtype)
    elif op == "element":
        b = a.copy().reshape(-1)
        if b.size:
            b[idx % b.size] = np.array(value).astype(b.dtype) if b.dtype.kind == "f" else value % 97
        out[name] = b.reshape(a.shape)
    return out


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and np.array_equal(a[k], b[k])
        for k in a)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # a huge float into f32
@FUZZ
@given(data=st.data(), op=st.sampled_from(OPS), dtype=st.sampled_from(DTYPES),
       idx=st.integers(0, 2**20),
       value=st.one_of(st.integers(-2**62, 2**62), st.floats(allow_nan=True,
                                                              allow_infinity=True)))
def test_fuzz_opening_arrays(world, opened, data, op, dtype, idx, value):
    c, meta, arrays = opened
    name = data.draw(st.sampled_from(sorted(arrays)))
    bad = _mutate(arrays, name, op, dtype, idx, value)
    assume(not _same(bad, arrays))
    assert_refused(world.verify(world.served, c, meta, bad))


@FUZZ
@given(junk=st.dictionaries(st.text(min_size=1, max_size=12),
                            st.sampled_from([np.zeros(2, np.int64), np.ones((2, 32), np.uint8)]),
                            max_size=3))
def test_extra_arrays_are_refused(world, opened, junk):
    """Unknown arrays beside a valid opening: rejected (opening_type), never ignored."""
    c, meta, arrays = opened
    extra = {k: v for k, v in junk.items() if k not in arrays}
    v = world.verify(world.served, c, meta, {**arrays, **extra})
    assert isinstance(v, Verdict)
    if extra:
        assert_rejected(v, "opening_type")
    else:
        assert v.accepted


@FUZZ
@given(key=st.sampled_from(["receipt_id", "challenge_mac", "seed", "salt"]),
       value=st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.text(max_size=70),
                       st.floats(allow_nan=True), st.lists(st.integers(), max_size=3)),
       delete=st.booleans())
def test_fuzz_opening_meta(world, opened, key, value, delete):
    c, meta, arrays = opened
    bad = {k: v for k, v in meta.items() if k != key} if delete else dict(meta, **{key: value})
    assume(bad != meta)
    assert_refused(world.verify(world.served, c, bad, arrays))


@pytest.fixture(scope="module")
def opening_bytes(opened):
    _, meta, arrays = opened
    return container.dumps(OPENING_MAGIC, OPENING_VERSION, meta, arrays)


@FUZZ
@given(cut=st.integers(0, 2**31), truncate=st.booleans(),
       flips=st.lists(st.tuples(st.integers(0, 2**31), st.integers(1, 255)), max_size=3))
def test_fuzz_opening_bytes(world, opened, opening_bytes, cut, flips, truncate):
    c, meta0, arrays0 = opened
    data = bytearray(opening_bytes)
    if truncate:
        data = data[:cut % len(data)]
    for pos, x in flips:
        if data:
            data[pos % len(data)] ^= x
    try:
        meta, arrays = container.loads(bytes(data), OPENING_MAGIC, OPENING_VERSION, 1 << 30)
    except container.ContainerError:
        return
    assume(not (meta == meta0 and _same(arrays, arrays0)))  # e.g. a flipped header space
    assert_refused(world.verify(world.served, c, meta, arrays))


@FUZZ
@given(data=st.data(), value=JSONISH, delete=st.booleans(), reseal=st.booleans())
def test_fuzz_receipt(chat_world, data, value, delete, reseal):
    """Edit one field of the chat world's receipt (the tokenizer binds request and text), raw or
    re-sealed; the verifier challenges what it got and the provider relabels its honest opening."""
    w = chat_world
    honest = w.served.receipt
    path = data.draw(st.sampled_from(json_paths(honest)))
    bad = edited(honest, path, value, delete)
    assume(bad != honest)
    if reseal:
        bad = resealed(bad)  # restores version and hashes: the edit may vanish
        assume(bad is not None and bad != honest)
    try:
        c = w.challenge(bad, "routine")
    except (KeyError, TypeError, ValueError, AttributeError, IndexError):
        c = w.challenge(w.served, "routine")  # the verifier could not even derive one
    meta, arrays = w.open(w.served, w.challenge(w.served, "routine"))
    rid = bad.get("receipt_id") if isinstance(bad.get("receipt_id"), str) else "x"
    v = w.verify(bad, c, dict(meta, receipt_id=rid, challenge_mac=c["mac"]), arrays)
    assert isinstance(v, Verdict)
    if v.accepted:
        assert reseal and any(path[:len(u)] == u for u in UNBOUND), (path, value)
    else:
        assert v.reason


@FUZZ
@given(data=st.data(), value=JSONISH, delete=st.booleans())
def test_fuzz_challenge(world, opened, data, value, delete):
    c, meta, arrays = opened
    bad = edited(c, data.draw(st.sampled_from(json_paths(c))), value, delete)
    assume(bad != c)
    assert_refused(world.verify(world.served, bad, meta, arrays))
