"""Attacks on today's changes: packed accumulators (opening version 2), the compiled BLAKE3 and
Merkle multiproof walk, acc_unpack, br_minmax and attn_pack's int16 fast paths.

* Width edges of every packed matrix (B, B + 1, the width's own extremes, first and last
  element) in the dense Llama, the tiny Mixtral (router, experts) and the LM head, per profile:
  each must be a Freivalds rejection of that matrix.
* Packed layouts: a trailing byte more or less, int8 / int64 (version 1) / bool relabels, 0-size,
  wrong ndim, non-arrays; Fortran-ordered and strided copies of honest bytes (the same numbers:
  accepted); version-1 containers; read-only and misaligned container arrays (in a forked child,
  so a crash in C shows as a failure instead of killing the run).
* The C and numpy routes (COMMITLLM_NATIVE=0) and threads > 1 give the same verdicts.
* merkle.verify_multiproof / verify_multiproof_rows against verify_multiproof_spec; b3_rows /
  b3_many against blake3-py; acc_unpack and minmax against numpy; attn_pack against the
  documented layouts (hypothesis).
"""

from __future__ import annotations

import json
import struct

import blake3
import numpy as np
import pytest
from forked import in_child
from accs import acc, set_acc
from advworld import World, assert_refused, assert_rejected, quantized
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from commitllm.verifier import container, merkle, native
from commitllm.verifier.commitment import leaf_digests, leaf_hashes
from commitllm.verifier.native.bridge import minmax
from commitllm.verifier.opening import (OPENING_MAGIC, OPENING_VERSION, _acc_matrix, acc_bound,
                                        acc_width, pack_acc, unpack_acc)

HAS_CORE = native.lib() is not None
needs_core = pytest.mark.skipif(not HAS_CORE, reason=f"no compiled core: {native.error()}")
CODE = {"qkv": "freivalds_qkv", "o": "freivalds_o", "gate_up": "freivalds_gate_up",
        "down": "freivalds_down", "router": "freivalds_router", "lm_head": "freivalds_lm_head"}
HYP = settings(max_examples=60, deadline=None,
               suppress_health_check=[HealthCheck.function_scoped_fixture,
                                      HealthCheck.too_slow])


def _copy(arrays: dict) -> dict:
    return {k: v.copy() for k, v in arrays.items()}


def _av(v) -> tuple:
    """A verdict as (accepted, reason)."""
    return v.accepted, v.reason


def _acc_names(arrays: dict, first_layer_only: bool = True) -> list[str]:
    """The opening's packed accumulator arrays (those of its first challenged layer, the
    K/V sample's and the LM head's when first_layer_only)."""
    names = sorted(n for n in arrays if _acc_matrix(n))
    if not first_layer_only:
        return names
    layers = sorted({int(n.split(".")[1]) for n in names if n != "z.lm"})
    return [n for n in names if n == "z.lm" or int(n.split(".")[1]) == layers[0]]


def _edge_values(cfg, prof, m: str) -> dict[str, int]:
    b, w = acc_bound(cfg, prof, m), acc_width(cfg, prof, m)
    top = 1 << (8 * w - 1)
    vals = {"B": b, "-B": -b, "B+1": b + 1, "-B-1": -b - 1, "max": top - 1, "min": -top}
    return {k: v for k, v in vals.items() if -top <= v < top}


def _set_value(arrays: dict, name: str, flat: int, value: int) -> bool:
    """arrays[name].flat[flat] := value (packed); False if it already held it."""
    z = acc(arrays, name)
    if int(z.flat[flat]) == value:
        return False
    z.flat[flat] = value
    set_acc(arrays, name, z)
    return True


# --- width edges, dense Llama -----------------------------------------------------------------

def _width_edges_rejected(w, c, meta, arrays, edge: str) -> int:
    """Set each packed matrix's first and last value to `edge` of its bound or width, one array
    at a time: each must be that matrix's Freivalds rejection. Returns how many were tried."""
    cfg, prof = w.qm.cfg, w.qm.profile
    tried = 0
    for name in _acc_names(arrays):
        m = _acc_matrix(name)
        vals = _edge_values(cfg, prof, m)
        if edge not in vals:
            continue
        for flat in (0, acc(arrays, name).size - 1):  # the first value and the decoder's tail
            a = _copy(arrays)
            if _set_value(a, name, flat, vals[edge]):
                assert_rejected(w.verify(w.served, c, meta, a), CODE[m])
                tried += 1
    return tried


@pytest.mark.parametrize("edge", ["B", "-B", "B+1", "-B-1", "max", "min"])
def test_width_edges_in_every_matrix_are_freivalds_rejections(world, opened, edge):
    """Each packed matrix (first layer, K/V sample, LM head) with one value set to an edge of
    its bound or of its width: the replay's bound or Freivalds check of that matrix rejects."""
    c, meta, arrays = opened
    assert _width_edges_rejected(world, c, meta, arrays, edge) >= 8


def test_plus_two_to_the_width_is_the_same_bytes(world, opened):
    """z + 2^(8w) has the honest bytes (the format cannot say it): accepted, and it is honest;
    z + 2^(8w-1) with the low bytes sent (a sign flip) is a Freivalds rejection."""
    c, meta, arrays = opened
    for name in _acc_names(arrays):
        w = arrays[name].shape[-1]
        if w == 8:
            continue
        a = _copy(arrays)
        z = acc(a, name)
        z.flat[0] += 1 << (8 * w)
        set_acc(a, name, z, wrap=True)
        assert np.array_equal(a[name], arrays[name])
        z.flat[0] += 1 << (8 * w - 1)
        set_acc(a, name, z, wrap=True)
        assert_rejected(world.verify(world.served, c, meta, a), CODE[_acc_matrix(name)])


def test_random_packed_bytes_are_rejected_never_raise(world, opened):
    """Random bytes in each packed array (same dtype and shape): a clean rejection."""
    c, meta, arrays = opened
    rng = np.random.default_rng(11)
    for name in _acc_names(arrays, first_layer_only=False):
        a = _copy(arrays)
        a[name] = rng.integers(0, 256, arrays[name].shape, dtype=np.uint8)
        v = world.verify(world.served, c, meta, a)
        assert_refused(v)
        assert v.reason == CODE[_acc_matrix(name)], (name, v.reason, v.detail)


def test_rows_swapped_between_positions_and_layers(world, opened):
    """Two positions' packed rows swapped, or one layer's matrix given as another's."""
    c, meta, arrays = opened
    names = _acc_names(arrays, first_layer_only=False)
    for name in names:
        if arrays[name].shape[0] < 2:
            continue
        a = _copy(arrays)
        a[name] = np.ascontiguousarray(a[name][[1, 0] + list(range(2, a[name].shape[0]))])
        if np.array_equal(a[name], arrays[name]):
            continue  # (the same token at both positions: layer 0's qkv rows are equal)
        assert_rejected(world.verify(world.served, c, meta, a), CODE[_acc_matrix(name)])
    layers = sorted({int(n.split(".")[1]) for n in names if n.startswith("z.") and n != "z.lm"})
    if len(layers) >= 2:
        a = _copy(arrays)
        lo, hi = layers[0], layers[1]
        a[f"z.{lo}.down"], a[f"z.{hi}.down"] = arrays[f"z.{hi}.down"], arrays[f"z.{lo}.down"]
        assert_rejected(world.verify(world.served, c, meta, a), "freivalds_down")


# --- packed layouts -----------------------------------------------------------------------------

LAYOUTS = {
    "extra_byte": lambda a: np.concatenate([a, a[..., -1:]], axis=-1),
    "sign_byte_more": lambda a: np.concatenate(
        [a, np.where(a[..., -1:] >= 128, 255, 0).astype(np.uint8)], axis=-1),
    "missing_byte": lambda a: np.ascontiguousarray(a[..., :-1]),
    "int8": lambda a: a.view(np.int8),
    "bool": lambda a: (a % 2).astype(bool),
    "int64_v1": lambda a: unpack_acc(a),
    "uint64": lambda a: unpack_acc(a).view(np.uint64),
    "float64": lambda a: unpack_acc(a).astype(np.float64),
    "zero_rows": lambda a: a[:0],
    "flat": lambda a: a.reshape(a.shape[0], -1),
    "extra_dim": lambda a: a[..., None],
    "0d": lambda a: np.asarray(a.reshape(-1)[0]),
    "list": lambda a: a.tolist(),
    "bytes": lambda a: a.tobytes(),
    "one_row_more": lambda a: np.concatenate([a, a[:1]]),
    "transposed": lambda a: np.ascontiguousarray(np.swapaxes(a, 0, 1)),
}


@pytest.mark.parametrize("how", sorted(LAYOUTS))
def test_packed_layouts_other_than_the_keys(world, opened, how):
    """Every accumulator array (first layer, K/V sample, LM head) in a layout the key does not
    imply: opening_type, before anything decodes it."""
    c, meta, arrays = opened
    n = 0
    for name in _acc_names(arrays):
        a = _copy(arrays)
        a[name] = LAYOUTS[how](arrays[name])
        if isinstance(a[name], np.ndarray) and a[name].shape == arrays[name].shape \
                and a[name].dtype == arrays[name].dtype:
            continue  # (a square transpose, say: the same layout)
        assert_rejected(world.verify(world.served, c, meta, a), "opening_type")
        n += 1
    assert n >= 3


def _strided(a: np.ndarray) -> np.ndarray:
    """The same values as a, as a view whose last axis has stride 2."""
    big = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
    big[..., ::2] = a
    return big[..., ::2]


@pytest.mark.parametrize("how", ["fortran", "strided", "readonly"])
def test_equivalent_layouts_of_honest_bytes_verify_the_same(world, opened, how):
    """The honest numbers in another memory layout are the honest opening: accepted on the
    compiled route (acc_unpack copies), and a tampered one in that layout still rejected."""
    c, meta, arrays = opened

    def relayout(x):
        if how == "fortran":
            return np.asfortranarray(x)
        if how == "strided":
            return _strided(x)
        y = x.copy()
        y.flags.writeable = False
        return y
    a = {k: relayout(v) if _acc_matrix(k) or k.startswith("kv.") and k[-2:] in (".k", ".v")
         else v.copy() for k, v in arrays.items()}
    v = world.verify(world.served, c, meta, a)
    assert v.accepted, (v.reason, v.detail)
    name = _acc_names(arrays)[0]
    z = acc(arrays, name)
    z.flat[-1] += 1
    a[name] = relayout(pack_acc(z, arrays[name].shape[-1]))
    assert_rejected(world.verify(world.served, c, meta, a), CODE[_acc_matrix(name)])


def test_version_one_containers_and_int64_accumulators(world, opened):
    """A version-1 container is refused by the loader (ContainerVersionError), whatever it
    holds; version-1 content (int64 accumulators) in a version-2 container is opening_type."""
    c, meta, arrays = opened
    v1 = {k: unpack_acc(x) if _acc_matrix(k) else x for k, x in arrays.items()}
    for ver in (0, 1, 3, 2**32 - 1):
        for content in (arrays, v1):
            data = container.dumps(OPENING_MAGIC, ver, meta, content)
            with pytest.raises(container.ContainerVersionError):
                container.loads(data, OPENING_MAGIC, OPENING_VERSION, len(data))
    data = container.dumps(OPENING_MAGIC, OPENING_VERSION, meta, v1)
    m2, a2 = container.loads(data, OPENING_MAGIC, OPENING_VERSION, len(data))
    assert_rejected(world.verify(world.served, c, m2, a2), "opening_type")


def test_container_arrays_read_only_verify(world, opened):
    """Arrays straight from container.loads (read-only views of the bytes): honest accepted,
    one flipped accumulator byte rejected."""
    c, meta, arrays = opened
    data = container.dumps(OPENING_MAGIC, OPENING_VERSION, meta, arrays)
    m2, a2 = container.loads(data, OPENING_MAGIC, OPENING_VERSION, len(data))
    assert not a2["z.lm"].flags.writeable
    v = world.verify(world.served, c, m2, a2)
    assert v.accepted, (v.reason, v.detail)
    bad = dict(a2)
    z = a2["z.lm"].copy()
    z[0, 0, 0] ^= 1
    bad["z.lm"] = z
    assert_rejected(world.verify(world.served, c, m2, bad), "freivalds_lm_head")


def _misaligned(data: bytes, shift: int) -> bytes:
    """The container with every tensor's bytes moved `shift` bytes on (a pad before them) and
    the header rewritten to say so: what a provider can send (offsets are its to choose)."""
    head = len(OPENING_MAGIC) + 4
    (n,) = struct.unpack("<Q", data[head:head + 8])
    table = json.loads(data[head + 8:head + 8 + n])
    for name, info in table.items():
        if name != "__metadata__":
            info["data_offsets"] = [o + shift for o in info["data_offsets"]]
    hdr = json.dumps(table).encode()
    return data[:head] + struct.pack("<Q", len(hdr)) + hdr + b"\0" * shift + data[head + 8 + n:]


def test_misaligned_container_arrays_never_crash(world, opened):
    """Tensor offsets chosen so int16 / fp32 / int64 arrays start at odd or unaligned addresses
    (pads of 1 to 7 bytes): the container accepts them (safetensors offsets are the sender's),
    and every compiled routine then reads unaligned pointers. The honest opening must verify, a
    K value at the dtype's minimum reject with opening_range, and nothing may crash (checked
    in a forked child)."""
    c, meta, arrays = opened
    honest = container.dumps(OPENING_MAGIC, OPENING_VERSION, meta, arrays)
    kname = next(k for k in sorted(arrays) if k.endswith(".k"))
    variants = []
    for shift in range(1, 8):
        data = _misaligned(honest, shift)
        m2, a2 = container.loads(data, OPENING_MAGIC, OPENING_VERSION, len(data))
        if any(not x.flags.aligned for x in a2.values()):
            variants.append((data, m2, a2))
    assert len(variants) >= 3, "nothing misaligned: vacuous"

    def child():
        for data, m2, a2 in variants:
            if not world.verify(world.served, c, m2, a2).accepted:
                return 1
            raw = bytearray(data)
            x = a2[kname]
            at = x.__array_interface__["data"][0] - np.frombuffer(data, np.uint8).ctypes.data
            lo = int(np.iinfo(x.dtype).min).to_bytes(x.itemsize, "little", signed=True)
            raw[at + x.nbytes - x.itemsize:at + x.nbytes] = lo
            m3, a3 = container.loads(bytes(raw), OPENING_MAGIC, OPENING_VERSION, len(raw))
            v = world.verify(world.served, c, m3, a3)
            if v.accepted or v.reason != "opening_range":
                return 2
        return 0
    assert in_child(child, timeout=120.0) == 0


# --- K/V range (br_minmax) ----------------------------------------------------------------------

@pytest.mark.parametrize("which", ["k", "v", "embed"])
def test_kv_and_embedding_values_at_the_integer_extremes(pworld, popened, which):
    """K/V (or embedding) values just outside +-qmax and at the dtype's extremes (int16 -32768,
    32767 beyond qmax 32639; int8 -128) at the first, a middle and the last element, in
    C-contiguous and strided arrays: opening_range; at exactly -qmax (in range, but not
    committed): merkle_kv / merkle_embedding."""
    c, meta, arrays = popened
    prof = pworld.key.meta["profile"]
    if which == "embed":
        name, q, code = "embed.q", prof["head_qmax"], "merkle_embedding"
    else:
        name = next(k for k in sorted(arrays) if k.startswith("kv.") and k.endswith("." + which))
        q, code = prof["kv_qmax"], "merkle_kv"
    x = arrays[name]
    info = np.iinfo(x.dtype)
    outside = sorted({v for v in (-q - 1, q + 1, info.min, info.max)
                      if info.min <= v <= info.max and abs(v) > q})
    assert info.min in outside
    for value in outside:
        for flat in (0, x.size // 2, x.size - 1):
            for strided in (False, True):
                a = _copy(arrays)
                y = x.copy()
                y.flat[flat] = value
                a[name] = _strided(y) if strided else y
                assert_rejected(pworld.verify(pworld.served, c, meta, a), "opening_range")
    flat = int(np.flatnonzero(x.reshape(-1) != -q)[-1])
    a = _copy(arrays)
    a[name] = x.copy()
    a[name].flat[flat] = -q
    assert_rejected(pworld.verify(pworld.served, c, meta, a), code)


@HYP
@given(st.sampled_from([np.int8, np.int16]), st.integers(1, 700), st.integers(0, 2**32 - 1),
       st.sampled_from(["c", "strided", "neg"]))
def test_minmax_equals_numpy(dtype, n, seed, layout):
    """br_minmax (one pass, compiled) against numpy's min and max, extremes included."""
    rng = np.random.default_rng(seed)
    info = np.iinfo(dtype)
    x = rng.integers(info.min, info.max, n, dtype=dtype, endpoint=True)
    if n > 2:
        x[rng.integers(n)] = info.min if seed % 3 == 0 else x[0]
        x[rng.integers(n)] = info.max if seed % 5 == 0 else x[0]
    if layout == "strided":
        x = np.repeat(x, 2)[::2]
    elif layout == "neg":
        x = x[::-1]
    assert minmax(x) == (int(x.min()), int(x.max()))
    assert minmax(x.reshape(1, -1)) == (int(x.min()), int(x.max()))


# --- width edges per profile, and MoE -----------------------------------------------------------

def test_each_profile_s_widths_and_width_extremes(pworld, popened):
    """The opening's packed widths are the key's (acc_width), and each matrix's width extremes
    (2^(8w-1) - 1 and -2^(8w-1)) are rejected under every profile (the LM head's 6 bytes at
    w8a16, 4 at a8)."""
    c, meta, arrays = popened
    cfg, prof = pworld.qm.cfg, pworld.qm.profile
    for name in _acc_names(arrays, first_layer_only=False):
        assert arrays[name].shape[-1] == acc_width(cfg, prof, _acc_matrix(name)), name
    for name in _acc_names(arrays):
        m = _acc_matrix(name)
        vals = _edge_values(cfg, prof, m)
        for edge in ("max", "min"):
            a = _copy(arrays)
            assert _set_value(a, name, a[name].size // a[name].shape[-1] - 1, vals[edge])
            assert_rejected(pworld.verify(pworld.served, c, meta, a), CODE[m])


@pytest.fixture(scope="module")
def moe(tiny_mixtral):
    """The tiny Mixtral (4 experts, 2 per token) and an honest full-tier opening of it."""
    w = World(quantized(tiny_mixtral))
    c = w.challenge(w.served, "full")
    meta, arrays = w.open(w.served, c)
    assert w.verify(w.served, c, meta, arrays).accepted
    return w, c, meta, arrays


@pytest.mark.parametrize("edge", ["B", "B+1", "-B-1", "max", "min"])
def test_moe_router_and_expert_width_edges(moe, edge):
    """Router and each selected expert slot's gate_up / down at the bound's and the width's
    edges, first and last element: that matrix's Freivalds rejection."""
    w, c, meta, arrays = moe
    assert _width_edges_rejected(w, c, meta, arrays, edge) >= 6


def test_moe_expert_slots_swapped_or_duplicated(moe):
    """The two selected experts' accumulators swapped, or slot 0's sent for both: the expert of
    the other slot checks them with its own secret row (freivalds_gate_up / _down)."""
    w, c, meta, arrays = moe
    layer = sorted({int(n.split(".")[1]) for n in _acc_names(arrays) if n != "z.lm"})[0]
    for m in ("gate_up", "down"):
        name = f"z.{layer}.{m}"
        for idx in ([1, 0], [0, 0], [1, 1]):
            a = _copy(arrays)
            a[name] = np.ascontiguousarray(arrays[name][:, idx])
            if np.array_equal(a[name], arrays[name]):
                continue
            v = w.verify(w.served, c, meta, a)
            want = "freivalds_gate_up" if m == "gate_up" else "freivalds_down"
            assert_rejected(v, want)


def test_moe_packed_layouts(moe):
    """An expert array with one slot too many or too few, the slots flattened, or int64: the
    key's shape [n, k, N, w] decides (opening_type)."""
    w, c, meta, arrays = moe
    layer = sorted({int(n.split(".")[1]) for n in _acc_names(arrays) if n != "z.lm"})[0]
    x = arrays[f"z.{layer}.gate_up"]
    for bad in (np.concatenate([x, x[:, :1]], axis=1), x[:, :1], x.reshape(x.shape[0], -1,
                                                                            x.shape[-1]),
                unpack_acc(x), x[..., :-1]):
        a = _copy(arrays)
        a[f"z.{layer}.gate_up"] = np.ascontiguousarray(bad)
        assert_rejected(w.verify(w.served, c, meta, a), "opening_type")


# --- routes: compiled against numpy, one thread against several ---------------------------------

def _tampers(arrays: dict) -> list[tuple[str, dict]]:
    out = []
    for name in _acc_names(arrays):
        a = _copy(arrays)
        z = acc(a, name)
        z.flat[-1] += 1
        set_acc(a, name, z)
        out.append((name, a))
    a = _copy(arrays)
    k = next(n for n in sorted(a) if n.endswith(".k"))
    a[k].flat[-1] = np.iinfo(a[k].dtype).min
    out.append((k, a))
    a = _copy(arrays)
    pr = next(n for n in sorted(a) if n.startswith("resid.") and n.endswith(".proof")
              and a[n].shape[0])
    a[pr][0, 0] ^= 1
    out.append((pr, a))
    return out


@needs_core
def test_numpy_route_and_threads_give_the_compiled_verdicts(world, opened, monkeypatch):
    """The honest opening and one tamper per packed array, a K extreme and a proof bit: the
    same verdict (accepted, reason) on the compiled route, with threads=2, and with the
    compiled core off (COMMITLLM_NATIVE=0: numpy acc decode, Python BLAKE3 and walk)."""
    c, meta, arrays = opened
    cases = [("honest", _copy(arrays))] + _tampers(arrays)

    def verdicts(**kw):
        return [(n, *_av(world.verify(world.served, c, meta, _copy(a), **kw))) for n, a in cases]
    fast = verdicts()
    assert fast[0][1] is True and all(not ok for _, ok, _ in fast[1:]), fast
    assert verdicts(threads=2) == fast
    monkeypatch.setenv("COMMITLLM_NATIVE", "0")
    assert native.lib() is None
    assert verdicts() == fast


@needs_core
def test_each_profile_s_routes_agree(pworld, popened, monkeypatch):
    """Under every profile (int8 K/V and 4-byte accumulators at a8, int16 and 5 / 6 bytes
    otherwise): honest and tampered openings give the same verdicts compiled and in numpy."""
    c, meta, arrays = popened
    cases = [("honest", _copy(arrays))] + _tampers(arrays)

    def verdicts():
        return [(n, *_av(pworld.verify(pworld.served, c, meta, _copy(a)))) for n, a in cases]
    fast = verdicts()
    assert fast[0][1] is True and all(not ok for _, ok, _ in fast[1:]), fast
    monkeypatch.setenv("COMMITLLM_NATIVE", "0")
    assert verdicts() == fast


@needs_core
def test_deep_tier_routes_agree(world, monkeypatch):
    """The deep tier (every position and layer: the longest packed arrays, K/V packs of
    several blocks): honest accepted and the last layer's down accumulator bumped at its last
    value rejected, compiled and in numpy alike."""
    c = world.challenge(world.served, "deep")
    meta, arrays = world.open(world.served, c)
    last = max(int(n.split(".")[1]) for n in arrays if n.startswith("z.") and n != "z.lm"
               and _acc_matrix(n))
    bad = _copy(arrays)
    z = acc(bad, f"z.{last}.down")
    z.flat[-1] -= 1
    set_acc(bad, f"z.{last}.down", z)

    def verdicts():
        return [_av(world.verify(world.served, c, meta, _copy(a))) for a in (arrays, bad)]
    fast = verdicts()
    assert fast == [(True, None), (False, "freivalds_down")]
    monkeypatch.setenv("COMMITLLM_NATIVE", "0")
    assert verdicts() == fast


@needs_core
def test_moe_routes_and_threads_agree(moe, monkeypatch):
    """The Mixtral opening, honest and with one value bumped in the router and in each expert
    matrix: the same verdicts compiled, with threads=2, and with the compiled core off."""
    w, c, meta, arrays = moe
    cases = [("honest", _copy(arrays))] + _tampers(arrays)

    def verdicts(**kw):
        return [(n, *_av(w.verify(w.served, c, meta, _copy(a), **kw))) for n, a in cases]
    fast = verdicts()
    assert fast[0][1] is True and all(not ok for _, ok, _ in fast[1:]), fast
    assert {r for _, _, r in fast} >= {"freivalds_router", "freivalds_gate_up",
                                       "freivalds_down"}
    assert verdicts(threads=2) == fast
    monkeypatch.setenv("COMMITLLM_NATIVE", "0")
    assert verdicts() == fast


@needs_core
@HYP
@given(st.integers(1, 8), st.lists(st.integers(0, 9), min_size=0, max_size=3),
       st.integers(0, 2**32 - 1), st.sampled_from(["c", "fortran", "slice", "reverse"]))
def test_acc_unpack_equals_numpy_and_python(w, shape, seed, layout):
    """native.acc_unpack and the numpy decoder against Python's int.from_bytes(signed) for
    random bytes, any shape (0-size and 1-D included) and layout."""
    rng = np.random.default_rng(seed)
    b = rng.integers(0, 256, (*shape, w), dtype=np.uint8)
    if seed % 4 == 0 and b.size:
        b[..., -1] = 0x80 if seed % 8 == 0 else 0x7F  # sign-bit edges
    if layout == "fortran":
        b = np.asfortranarray(b)
    elif layout == "slice" and b.ndim > 1 and b.shape[0] > 1:
        b = b[1:]
    elif layout == "reverse":
        b = b[::-1]
    want = np.array([int.from_bytes(bytes(r), "little", signed=True)
                     for r in b.reshape(-1, w).tolist()], np.int64).reshape(b.shape[:-1])
    got = native.acc_unpack(b)
    assert got is not None and got.dtype == np.int64 and got.shape == b.shape[:-1]
    assert np.array_equal(got, want)
    assert np.array_equal(unpack_acc(b), want)
    assert np.array_equal(pack_acc(want, w), np.ascontiguousarray(b))
    saved = native.lib
    try:
        native.lib = lambda: None
        assert np.array_equal(unpack_acc(b), want)
    finally:
        native.lib = saved


# --- BLAKE3 and attn_pack -----------------------------------------------------------------------

@needs_core
@HYP
@given(st.integers(1, 40), st.lists(st.integers(0, 1300), min_size=1, max_size=8),
       st.integers(0, 2**32 - 1), st.integers(1, 3), st.integers(0, 7))
def test_b3_rows_equals_blake3(n, widths, seed, step, skew):
    """b3_rows over random segments (widths 0..1300, up to 8, unaligned starts, row strides)
    and b3_many over their concatenation: blake3-py's digests of each row's bytes."""
    rng = np.random.default_rng(seed)
    segs = []
    for wd in widths:
        big = rng.integers(0, 256, (n * step, wd + skew + 1), dtype=np.uint8)
        segs.append(big[::step, skew:skew + wd])
    want = [blake3.blake3(b"".join(s[i].tobytes() for s in segs)).digest() for i in range(n)]
    assert merkle.digests(native.b3_rows(segs)) == want
    cat = np.concatenate(segs, axis=1)
    assert merkle.digests(native.b3_many(cat)) == want
    assert merkle.digests(native.b3_many(cat, n_threads=2)) == want


@needs_core
def test_b3_many_split_over_threads(monkeypatch):
    """Batches split over threads at every split size: the same digests."""
    rng = np.random.default_rng(5)
    rows = rng.integers(0, 256, (53, 2100), dtype=np.uint8)
    want = [blake3.blake3(r.tobytes()).digest() for r in rows]
    monkeypatch.setattr(native, "B3_SPLIT_BYTES", 1)
    for t in (2, 3, 4, 5, 16):
        assert merkle.digests(native.b3_many(rows, n_threads=t)) == want


LEAF_DTYPES = ["<i2", ">i2", "|i1", "<f4", ">f4", "<i8"]


@needs_core
@HYP
@given(st.integers(8, 40), st.lists(st.tuples(st.sampled_from(LEAF_DTYPES), st.integers(0, 70),
                                             st.sampled_from(["c", "fortran", "strided"])),
                                   min_size=1, max_size=4), st.integers(0, 2**32 - 1))
def test_leaf_digests_equal_the_python_route(n, parts, seed):
    """commitment.leaf_digests (the compiled core hashing rows where they lie) against
    leaf_hashes' Python route for random arrays of any byte order, width and (non-negative)
    layout: the same leaves."""
    rng = np.random.default_rng(seed)
    arrays = []
    for dt, width, layout in parts:
        x = rng.integers(-120, 120, (n, 2, width)).astype(dt)
        if layout == "fortran":
            x = np.asfortranarray(x)
        elif layout == "strided":
            x = np.repeat(x, 2, axis=0)[::2]
        arrays.append(x)
    pos = sorted(rng.choice(10**6, n, replace=False).tolist())
    fast = merkle.digests(leaf_digests(b"kv", 7, pos, arrays))
    saved = merkle._core
    try:
        merkle._core = lambda: None
        assert leaf_hashes(b"kv", 7, pos, arrays) == fast
    finally:
        merkle._core = saved


def _keys_ref(x: np.ndarray) -> np.ndarray:
    g, s, d = x.shape
    dp, nkb = d + d % 2, -(-s // 16)
    full = np.zeros((g, nkb * 16, dp), np.int16)
    full[:, :s, :d] = x
    return full.reshape(g, nkb, 16, dp // 2, 2).transpose(0, 1, 3, 2, 4)


def _vals_ref(x: np.ndarray) -> np.ndarray:
    g, s, d = x.shape
    dv, nvp = -(-d // 32) * 32, -(-s // 2)
    full = np.zeros((g, nvp * 2, dv), np.int16)
    full[:, :s, :d] = x
    return full.reshape(g, nvp, 2, dv).transpose(0, 1, 3, 2)


@needs_core
@HYP
@given(st.sampled_from([np.int8, np.int16]), st.integers(1, 3), st.integers(1, 3),
       st.sampled_from([1, 2, 15, 16, 17, 31, 32, 33, 48]),
       st.sampled_from([1, 2, 3, 8, 24, 31, 32, 33, 64]), st.integers(0, 2**32 - 1))
def test_attn_pack_equals_the_documented_layouts(dtype, b, h, s, d, seed):
    """pack_keys / pack_values (the int16 whole-block fast paths and the general loops) on the
    cache's [B, S, H, d] layout and on [G, S, d]: the documented layouts, zeros past S and d,
    the dtype's extremes included."""
    rng = np.random.default_rng(seed)
    info = np.iinfo(dtype)
    x = rng.integers(info.min, info.max, (b, s, h, d), dtype=dtype, endpoint=True)
    x.flat[0], x.flat[-1] = info.min, info.max
    g = np.ascontiguousarray(x.transpose(0, 2, 1, 3)).reshape(b * h, s, d)
    for src in (x, g, np.repeat(x, 2, axis=-1)[..., ::2]):  # (the last: dims 2 apart)
        assert np.array_equal(native.pack_keys(src), _keys_ref(g))
        assert np.array_equal(native.pack_values(src), _vals_ref(g))


# --- Merkle multiproofs: compiled walk against the spec -----------------------------------------

def _tree(n: int, salt: int = 0):
    leaves = [blake3.blake3(struct.pack("<QQ", salt, i)).digest() for i in range(n)]
    return leaves, merkle.MerkleTree(leaves)


def _rows_args(known: dict):
    items = sorted(known.items())
    idx = np.array([i for i, _ in items], np.int64)
    return idx, np.frombuffer(b"".join(h for _, h in items), np.uint8).reshape(-1, 32)


@needs_core
@HYP
@given(st.integers(8, 300), st.data())
def test_multiproof_routes_agree_on_honest_and_tampered(n, data):
    """Random trees and leaf sets (>= 8: the compiled walk), honest proofs and one tamper each
    (a flipped bit in a leaf, proof hash or root; a hash dropped, added or duplicated; a leaf
    moved): verify_multiproof and verify_multiproof_rows give the spec's answer."""
    leaves, tree = _tree(n, n)
    k = data.draw(st.integers(8, n))
    idx = sorted(data.draw(st.lists(st.integers(0, n - 1), min_size=k, max_size=k,
                                    unique=True)))
    known = {i: leaves[i] for i in idx}
    proof = merkle.multiproof(tree, idx)
    cases = [(known, proof, tree.root)]
    j = data.draw(st.integers(0, 10**6))
    bit = 1 << (j % 8)
    lf = dict(known)
    i0 = idx[j % len(idx)]
    lf[i0] = bytes([lf[i0][0] ^ bit]) + lf[i0][1:]
    cases.append((lf, proof, tree.root))
    cases.append((known, proof, bytes([tree.root[0] ^ bit]) + tree.root[1:]))
    if proof:
        p = list(proof)
        q = j % len(p)
        p[q] = p[q][:5] + bytes([p[q][5] ^ bit]) + p[q][6:]
        cases += [(known, p, tree.root), (known, proof[:-1], tree.root),
                  (known, proof[1:], tree.root), (known, proof + proof[-1:], tree.root)]
        if len(proof) > 1:
            cases.append((known, proof[::-1], tree.root))
    cases.append((known, proof + [tree.root], tree.root))
    free = sorted(set(range(n)) - set(idx))
    if free:
        mv = dict(known)
        mv[free[j % len(free)]] = mv.pop(i0)
        cases.append((mv, proof, tree.root))
    for kn, pr, root in cases:
        want = merkle.verify_multiproof_spec(kn, n, pr, root)
        assert merkle.verify_multiproof(kn, n, pr, root) == want
        assert merkle.verify_multiproof_rows(*_rows_args(kn), n, pr, root) == want
        # the proof as the opening's rows (what the verifier passes): the same answer
        rows = np.frombuffer(b"".join(pr), np.uint8).reshape(-1, 32)
        assert merkle.verify_multiproof_rows(*_rows_args(kn), n, rows, root) == want
    assert merkle.verify_multiproof_spec(known, n, proof, tree.root) is True
    assert sum(merkle.verify_multiproof_spec(kn, n, pr, r) for kn, pr, r in cases) == 1


def test_multiproof_edge_shapes():
    """A tree of one leaf (no proof, or one hash too many), n = 0, a leaf at index n or -1, a
    proof hash of 31 or 33 bytes, unsorted rows: every route agrees with the spec."""
    leaves, tree = _tree(1)
    for route in (merkle.verify_multiproof, merkle.verify_multiproof_spec):
        assert route({0: leaves[0]}, 1, [], tree.root) is True
        assert route({0: leaves[0]}, 1, [leaves[0]], tree.root) is False
        assert route({0: leaves[0]}, 0, [], tree.root) is False
        assert route({}, 1, [], tree.root) is False
    leaves, tree = _tree(16)
    idx = list(range(0, 16, 2))
    known = {i: leaves[i] for i in idx}
    proof = merkle.multiproof(tree, idx)
    bad = [(known | {16: leaves[0]}, proof), (known | {-1: leaves[0]}, proof),
           (known, proof[:-1] + [proof[-1] + b"\0"]), (known, proof[:-1] + [proof[-1][:31]]),
           (known, proof + [b""])]
    for kn, pr in bad:
        want = merkle.verify_multiproof_spec(kn, 16, pr, tree.root)
        assert want is False
        assert merkle.verify_multiproof(kn, 16, pr, tree.root) is False
    i, h = _rows_args(known)
    perm = np.random.default_rng(0).permutation(len(i))
    assert merkle.verify_multiproof_rows(i[perm], h[perm], 16, proof, tree.root) is True
    assert merkle.verify_multiproof_rows(i[perm], h[::-1], 16, proof, tree.root) is False
    # proof rows: honest on both routes (the spec's for an unsorted or small leaf set), and
    # rows that are not 32-byte hashes refused
    rows = np.frombuffer(b"".join(proof), np.uint8).reshape(-1, 32)
    assert merkle.verify_multiproof_rows(i, h, 16, rows, tree.root) is True
    assert merkle.verify_multiproof_rows(i[perm], h[perm], 16, rows, tree.root) is True
    for bad_rows in (rows.astype(np.int16), rows.reshape(-1, 16), rows.reshape(-1)):
        assert merkle.verify_multiproof_rows(i, h, 16, bad_rows, tree.root) is False
    small = {k: known[k] for k in idx[:2]}
    sp = merkle.multiproof(tree, idx[:2])
    assert merkle.verify_multiproof_rows(*_rows_args(small), 16,
                                         np.frombuffer(b"".join(sp), np.uint8).reshape(-1, 32),
                                         tree.root) is True


def _top_block(n: int):
    """The 8 last leaves of an n-leaf tree (n a multiple of 8), their hashes, a proof of random
    siblings along their one path up and the root they imply (the spec's walk for one node)."""
    rng = np.random.default_rng(n % 1000)
    hs = [rng.bytes(32) for _ in range(8)]
    known = {n - 8 + k: hs[k] for k in range(8)}
    lvl = hs
    while len(lvl) > 1:
        lvl = [merkle.node_hash(lvl[i], lvl[i + 1]) for i in range(0, len(lvl), 2)]
    i, width, h, proof = (n - 8) // 8, -(-n // 8), lvl[0], []
    while width > 1:
        if i % 2 or i + 1 < width:
            p = rng.bytes(32)
            proof.append(p)
            h = merkle.node_hash(p, h) if i % 2 else merkle.node_hash(h, p)
        i, width = i // 2, (width + 1) // 2
    return known, proof, h


@needs_core
@pytest.mark.parametrize("n", [2**40, 2**62, 2**63 - 8])
def test_multiproof_in_huge_trees_routes_agree(n):
    """8 leaves at the right edge of a tree of n leaves (depth up to 63, indices near 2^63): the
    compiled walk (uint64 widths) rebuilds the root the spec rebuilds, and refuses a
    proof one hash short."""
    known, proof, root = _top_block(n)
    assert merkle.verify_multiproof_spec(known, n, proof, root) is True
    assert merkle.verify_multiproof(known, n, proof, root) is True
    assert merkle.verify_multiproof_rows(*_rows_args(known), n, proof, root) is True
    assert merkle.verify_multiproof(known, n, proof[:-1], root) is False
    assert merkle.verify_multiproof(known, n + 1, proof, root) is \
        merkle.verify_multiproof_spec(known, n + 1, proof, root)


@pytest.mark.parametrize("n", [2**63, 2**63 + 8, 2**64])
def test_multiproof_with_indices_beyond_int64_routes_agree(n):
    """Trees of 2^63 .. 2^64 leaves (the spec allows up to 2^64): 8 leaves at indices >= 2^63.
    verify_multiproof must give the spec's answer, not raise (found by this file: it packed the
    indices as int64 for the compiled walk before checking they fit; they now take the spec)."""
    known, proof, root = _top_block(n)
    want = merkle.verify_multiproof_spec(known, n, proof, root)
    assert want is True
    try:
        got = merkle.verify_multiproof(known, n, proof, root)
    except OverflowError as e:
        pytest.fail(f"verify_multiproof raised where the spec answers {want}: {e!r}")
    assert got == want


def test_negative_row_strides_verify_as_on_the_numpy_route(world, opened, monkeypatch):
    """Honest K/V arrays handed to verify() as views with negative row strides (the same
    numbers, e.g. a caller's x[::-1][::-1]): the Python route (COMMITLLM_NATIVE=0) accepts,
    and the compiled route must give the same verdict instead of rejecting the honest
    opening with opening_malformed (found by this file: _le_bytes passed such views to
    b3_rows, which refuses them, and attn_pack raised on them; both now copy first)."""
    c, meta, arrays = opened
    a = {k: np.ascontiguousarray(v[::-1])[::-1] if k.startswith("kv.") and k[-2:] in (".k", ".v")
         else v.copy() for k, v in arrays.items()}
    with monkeypatch.context() as mp:
        mp.setenv("COMMITLLM_NATIVE", "0")
        slow = world.verify(world.served, c, meta, a)
    assert slow.accepted, (slow.reason, slow.detail)
    fast = world.verify(world.served, c, meta, a)
    assert (fast.accepted, fast.reason) == (slow.accepted, slow.reason), fast.detail


@needs_core
def test_leaf_digests_of_negative_row_strides_minimal():
    """The minimal form of the above: commitment.leaf_digests of an int16 [8, 2, 4] array
    viewed with a negative row stride raises ValueError on the compiled route; the Python
    route hashes it."""
    k = np.arange(64, dtype=np.int16).reshape(8, 2, 4)[::-1]
    saved = merkle._core
    try:
        merkle._core = lambda: None
        want = leaf_hashes(b"kv", 0, range(8), [k])
    finally:
        merkle._core = saved
    try:
        got = merkle.digests(leaf_digests(b"kv", 0, range(8), [k]))
    except ValueError as e:
        pytest.fail(f"compiled leaf_digests raised where the Python route hashes: {e}")
    assert got == want
