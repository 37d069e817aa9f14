"""Typed, bounded openings: every opened array's dtype (byte order included), shape and range
come from the key (config and profile) and the challenge, never from the opening's header.
verifier/opened.py; codes opening_type, opening_range, opening_mismatch. Every profile."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from advcheats import kv_beyond_qmax
from advworld import Provider, assert_rejected
from commitllm.engine.exact.model import ExactModel
from commitllm.verifier import challenge as ch
from commitllm.verifier.opening import PlanError, plan, unpack_acc


def _copy(arrays: dict) -> dict:
    return {k: v.copy() for k, v in arrays.items()}


def test_honest_full_tier_accepted(pworld, popened):
    c, meta, arrays = popened
    v = pworld.verify(pworld.served, c, meta, _copy(arrays))
    assert v.accepted, (v.reason, v.detail)
    assert any(x["check"] == "types" and x["ok"] for x in v.checks)


def test_honest_routine_and_deep_accepted(pworld):
    for tier in ("routine", "deep"):
        v = pworld.audit(pworld.served, tier=tier)
        assert v.accepted, (tier, v.reason, v.detail)


def test_a8_embedding_rows_read_as_uint8(profile_worlds, tiny_llama, pworld):
    """The provider computes with its int8 embedding rows read as uint8 (other numbers, the
    same bytes: the Merkle leaves verify) and commits that run consistently. ACCEPTED before
    the dtype came from the key."""
    if pworld.key.meta["profile"]["head_qmax"] > 127:
        pytest.skip("int16 embedding rows: the container has no uint16 to relabel them as")
    w = pworld
    model = ExactModel(w.qm)
    model.embed_q = torch.from_numpy(w.qm.embed.q.view(np.uint8))
    p = Provider(model)
    s = w.serve(p)
    assert s.output != w.served.output  # a different answer: the cheat matters
    c = w.challenge(s, "full")
    meta, arrays = w.open(s, c, p)
    arrays["embed.q"] = arrays["embed.q"].view(np.uint8)
    assert_rejected(w.verify(s, c, meta, arrays), "opening_type")


def test_kv_value_beyond_qmax_committed_at_an_unsampled_row(pworld):
    """The provider's engine stores K[0] of the last layer with one value at -(kv_qmax + 1), a
    value no quantization produces, and attends over it: receipt, trees and re-execution all
    agree, and the row is in every challenge's horizon but outside this challenge's K/V sample,
    so no derivation replays it. ACCEPTED (every profile) before K/V values were range-checked."""
    s, c, meta, arrays = kv_beyond_qmax(pworld)
    assert_rejected(pworld.verify(s, c, meta, arrays), "opening_range")


KV_EDITS = {
    "k-beyond-qmax": lambda a, l, q: a[f"kv.{l}.k"].__setitem__((0, 0, 0), q + 1),
    "v-beyond-minus-qmax": lambda a, l, q: a[f"kv.{l}.v"].__setitem__((1, 0, 0), -q - 1),
    "sk-zero": lambda a, l, q: a[f"kv.{l}.sk"].__setitem__((0, 0), 0.0),
    "sk-negative": lambda a, l, q: a[f"kv.{l}.sk"].__setitem__((0, 0), -a[f"kv.{l}.sk"][0, 0]),
    "sk-subnormal": lambda a, l, q: a[f"kv.{l}.sk"].__setitem__((0, 0), 1e-40),
    "sk-above-fp32-max-over-qmax": lambda a, l, q: a[f"kv.{l}.sk"].__setitem__((0, 0), 3e38),
    "sv-nan": lambda a, l, q: a[f"kv.{l}.sv"].__setitem__((0, 0), np.nan),
    "sv-inf": lambda a, l, q: a[f"kv.{l}.sv"].__setitem__((0, 0), np.inf),
    "resid-inf": lambda a, l, q: a[f"resid.{l}.rows"].__setitem__((0, 0), np.inf),
    "resid-nan": lambda a, l, q: a[f"resid.{l}.rows"].__setitem__((0, 0), np.nan),
    "embed-beyond-qmax": lambda a, l, q: a["embed.q"].__setitem__(
        (0, 0), np.iinfo(a["embed.q"].dtype).min),
    "embed-scale-nan": lambda a, l, q: a["embed.s"].__setitem__(0, np.nan),
}


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("edit", sorted(KV_EDITS))
def test_value_out_of_range(pworld, popened, edit):
    """A value outside what the profile allows, at a row no check replays (row 0 of the K/V
    sample's horizon need not be sampled): rejected by its range, before any proof."""
    c, meta, arrays = popened
    arrays = _copy(arrays)
    l = c["layers"][-1]
    q = pworld.key.meta["profile"]["kv_qmax"]
    if edit.startswith("k-") and q + 1 > np.iinfo(arrays[f"kv.{l}.k"].dtype).max:
        pytest.skip("int8 K/V cannot hold kv_qmax + 1 (127 is int8's top)")
    KV_EDITS[edit](arrays, l, q)
    if edit == "embed-beyond-qmax" and pworld.key.meta["profile"]["head_qmax"] >= -int(
            np.iinfo(arrays["embed.q"].dtype).min):
        pytest.skip("the dtype's minimum is within the range")
    assert_rejected(pworld.verify(pworld.served, c, meta, arrays), "opening_range")


def _relabelled(a: np.ndarray, how: str) -> np.ndarray:
    if how == "big-endian":
        if a.dtype.itemsize == 1:
            pytest.skip("one-byte values have no byte order")
        return a.astype(a.dtype.newbyteorder(">"))
    if how == "unsigned":  # (packed accumulators are bytes already: read as signed bytes)
        if a.dtype.kind == "i":
            return a.view(a.dtype.str.replace("i", "u"))
        return a.view(np.int8) if a.dtype == np.uint8 else a.view(np.uint32)
    if how == "v1-int64":  # packed accumulators sent as version 1 did: their values as int64
        return unpack_acc(a)
    if how == "wider":  # the same numbers in a wider type (other bytes, or a float of them)
        return a.astype({1: np.int16, 2: np.int32, 4: np.float64, 8: np.float64}[a.dtype.itemsize]
                        if a.dtype.kind in "iu" else np.float64)
    raise AssertionError(how)


RELABEL = [(n, h) for n in ("resid.0.rows", "kv.{l}.k", "kv.{l}.sk", "embed.q", "embed.ids",
                            "z.lm.pos")
           for h in ("big-endian", "unsigned", "wider")]
RELABEL += [(n, h) for n in ("z.{l}.o", "zq.{l}.qkv", "z.lm") for h in ("unsigned", "wider",
                                                                        "v1-int64")]


@pytest.mark.parametrize("name, how", RELABEL, ids=[f"{n}-{h}" for n, h in RELABEL])
def test_dtype_other_than_the_keys(pworld, popened, name, how):
    c, meta, arrays = popened
    arrays = _copy(arrays)
    name = name.format(l=c["layers"][-1])
    arrays[name] = _relabelled(arrays[name], how)
    assert_rejected(pworld.verify(pworld.served, c, meta, arrays), "opening_type")


SHAPES = {
    "resid-flat": lambda a, l: a.__setitem__(f"resid.{l}.rows", a[f"resid.{l}.rows"].reshape(-1)),
    "kv-heads-merged": lambda a, l: a.__setitem__(f"kv.{l}.k", a[f"kv.{l}.k"].reshape(
        a[f"kv.{l}.k"].shape[0], -1)),
    "z-extra-column": lambda a, l: a.__setitem__(f"z.{l}.qkv", np.pad(a[f"z.{l}.qkv"],
                                                                      ((0, 0), (0, 1), (0, 0)))),
    "z-byte-dropped": lambda a, l: a.__setitem__(f"z.{l}.down", a[f"z.{l}.down"][..., :-1]),
    "z-byte-added": lambda a, l: a.__setitem__("z.lm", np.pad(a["z.lm"], ((0, 0), (0, 0), (0, 1)))),
    "z-bytes-flat": lambda a, l: a.__setitem__(f"z.{l}.o", a[f"z.{l}.o"].reshape(
        a[f"z.{l}.o"].shape[0], -1)),
    "lm-row-dropped": lambda a, l: a.__setitem__("z.lm", a["z.lm"][:-1]),
    "proof-not-32": lambda a, l: a.__setitem__(f"kv.{l}.proof", np.zeros((1, 31), np.uint8)),
    "proof-huge": lambda a, l: a.__setitem__(f"resid.{l}.proof", np.zeros((10**5, 32), np.uint8)),
    "layer-roots-short": lambda a, l: a.__setitem__("kv.layer_roots", a["kv.layer_roots"][:-1]),
    "extra-array": lambda a, l: a.__setitem__("kv.99.k", a[f"kv.{l}.k"]),
    "extra-unused-name": lambda a, l: a.__setitem__("notes", np.zeros(3, np.uint8)),
    "missing-array": lambda a, l: a.pop(f"kv.{l}.sv"),
    "missing-embed-proof": lambda a, l: a.pop("embed.proof"),
    "not-an-array": lambda a, l: a.__setitem__(f"z.{l}.down", a[f"z.{l}.down"].tolist()),
}


@pytest.mark.parametrize("edit", sorted(SHAPES))
def test_shape_or_name_set_other_than_the_keys(pworld, popened, edit):
    c, meta, arrays = popened
    arrays = _copy(arrays)
    SHAPES[edit](arrays, c["layers"][-1])
    assert_rejected(pworld.verify(pworld.served, c, meta, arrays), "opening_type")


POSITIONS = {
    "unsorted": lambda p: p[::-1],
    "duplicated": lambda p: np.concatenate([p[:1], p[:-1]]),
    "out-of-range": lambda p: np.concatenate([p[:-1], [10**6]]),
    "negative": lambda p: np.concatenate([[-1], p[1:]]),
}


@pytest.mark.parametrize("edit", sorted(POSITIONS))
def test_opened_positions_not_the_challenged_ones(pworld, popened, edit):
    c, meta, arrays = popened
    arrays = _copy(arrays)
    l = c["layers"][0]
    arrays[f"resid.{l + 1}.pos"] = POSITIONS[edit](arrays[f"resid.{l + 1}.pos"]).astype(np.int64)
    assert_rejected(pworld.verify(pworld.served, c, meta, arrays), "opening_mismatch")


def _resigned(w, c: dict, **fields) -> dict:
    """The challenge with fields replaced and a valid MAC (what the verifier would have to
    issue: a malformed challenge must be refused even when it is authentic)."""
    body = {k: v for k, v in c.items() if k != "mac"} | fields
    return body | {"mac": ch._mac(w.key.secret, body)}


CHALLENGES = {
    "positions-unsorted": lambda c, n: {"positions": c["positions"][::-1]},
    "positions-duplicated": lambda c, n: {"positions": c["positions"][:1] + c["positions"]},
    "position-beyond-trace": lambda c, n: {"positions": c["positions"] + [n]},
    "position-bool": lambda c, n: {"positions": [True] + c["positions"][1:]},
    "layer-beyond-model": lambda c, n: {"layers": c["layers"] + [99]},
    "layers-huge": lambda c, n: {"layers": list(range(10**6))},
    "kv-sample-beyond-horizon": lambda c, n: {"kv_sample": {**c["kv_sample"], str(
        c["layers"][0]): [10**9]}},
    "kv-sample-unknown-layer": lambda c, n: {"kv_sample": {**c["kv_sample"], "7": [0]}},
    "decode-positions-altered": lambda c, n: {"decode_positions": []},
    "unknown-field": lambda c, n: {"extra": 1},
}


@pytest.mark.parametrize("edit", sorted(CHALLENGES))
def test_authentic_but_malformed_challenge(world, opened, edit):
    c, meta, arrays = opened
    bad = _resigned(world, c, **CHALLENGES[edit](c, world.n_positions))
    with pytest.raises(PlanError):
        plan(bad, world.qm.cfg.num_layers, world.served.receipt)
    meta = dict(meta, challenge_mac=bad["mac"])
    assert_rejected(world.verify(world.served, bad, meta, _copy(arrays)), "challenge_invalid")
