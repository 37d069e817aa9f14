"""Tamper family: the fused layer route (verifier/native/layer.c, replay._fused_layer).

The fused route may only say "every check of this layer passed"; on anything else the step route
replays the layer and decides. A dishonest provider would look for an opening the fused route
passes and the step route rejects: a difference in decoding packed accumulators (the last value
of a row, the end of a 1,024-value block, the vector decoder's masked tail), in the bound check,
in the sample rows (zq) beside the challenged ones, in rows swapped between positions, or in the
CPU route (AVX-512 with VBMI, with and without IFMA, AVX2, plain C). The IFMA route sums
z + bound unsigned: a value one below -bound must be caught as one above it is. Each tamper
below is sent to the verifier with the fused route on every CPU route and with it off: the
verdict, reason, detail and checks must be the same, and a rejection. Every other opened array
is Merkle-proven (test_adv_protocol.py and the rest); the accumulators are what the layer replay
alone vouches for.
"""

from __future__ import annotations

import numpy as np
import pytest

from accs import acc, add_acc, set_acc
from commitllm.verifier import native, replay
from commitllm.verifier.opening import acc_bound

pytestmark = pytest.mark.skipif(native.lib() is None, reason="the compiled core is not built")


def _flow(folder):
    from test_protocol import SAMPLED, Flow, _qm

    return Flow(_qm(folder), params=SAMPLED, max_tokens=12)


@pytest.fixture(scope="module")
def four_layer_llama(tmp_path_factory):
    from tinymodels import make_tiny_checkpoint

    return _flow(make_tiny_checkpoint(tmp_path_factory.mktemp("fused4"), "llama",
                                      overrides={"num_hidden_layers": 4}))


def _bound(flow, name: str) -> int:
    return acc_bound(flow.qm.cfg, flow.qm.profile, name.split(".")[-1])


def _edit(flow, arrays: dict, tamper: str) -> None:
    kind, name = tamper.split(":")
    z = acc(arrays, name)
    b = _bound(flow, name)
    if kind == "first":
        add_acc(arrays, name, (0, 0), 1)
    elif kind == "last":  # the last value of the last row: the decoders' tail
        add_acc(arrays, name, (-1, -1), -1)
    elif kind == "block":  # the first value past a 1,024-value block, or the middle
        add_acc(arrays, name, (0, min(1024, z.shape[1] - 1)), 3)
    elif kind == "up":  # the first value of gate_up's "up" half
        add_acc(arrays, name, (0, z.shape[1] // 2), 1)
    elif kind == "over":  # one beyond the bound, with the opposite low bytes compensating none
        z[0, 1] = b + 1
        set_acc(arrays, name, z, wrap=True)
    elif kind == "under":  # one below -bound (z + bound wraps below 0 on the IFMA route)
        z[0, 1] = -b - 1
        set_acc(arrays, name, z, wrap=True)
    elif kind == "wrap":  # the true value plus 2^(8w): the same low bytes would be the honest
        w = arrays[name].shape[-1]  # opening, so send the value minus 2^(8w - 1) instead
        z[0, 2] -= 1 << (8 * w - 1)
        set_acc(arrays, name, z, wrap=True)
    elif kind == "swap":  # two positions' rows exchanged
        if z.shape[0] < 2:
            pytest.skip("one row")
        z[[0, 1]] = z[[1, 0]]
        set_acc(arrays, name, z)
    elif kind == "zero":  # a row of zeros (what a lazy provider would send)
        z[-1] = 0
        set_acc(arrays, name, z)
    else:
        raise AssertionError(tamper)


TAMPERS = ["first:z.0.qkv", "last:z.3.qkv", "last:zq.1.qkv", "first:zq.2.qkv", "block:z.1.gate_up",
           "up:z.2.gate_up", "last:z.0.o", "first:z.3.down", "last:z.1.down", "over:z.2.o",
           "over:zq.0.qkv", "under:z.1.gate_up", "under:zq.2.qkv", "wrap:z.1.down",
           "swap:z.0.gate_up", "swap:zq.3.qkv", "zero:z.2.down", "zero:zq.1.qkv",
           "first:z.0.down+last:z.3.o"]


def _verdicts(flow, c, meta, arrays, monkeypatch) -> list:
    from commitllm.verifier.native import layer

    so = native.lib()
    out = []
    best = int(so.attn_best_route())
    prepare = layer.prepare
    # every CPU route, the best one with fv_acc_linear's IFMA route too where the CPU has it; a
    # dense layer in one call (ly_layer, the default) and in three (pre, attend, post)
    modes = [(True, r, False, True) for r in range(best + 1)] + [(False, -1, False, True),
                                                                 (True, best, False, False)]
    if native.use_ifma(True):
        modes.append((True, best, True, True))
    for fused, route, ifma, one_call in modes:
        monkeypatch.setattr(replay, "FUSED", fused)
        monkeypatch.setattr(layer, "prepare", prepare if one_call else lambda *a, **k: None)
        so.attn_route(route)
        native.use_ifma(ifma)
        try:
            v = flow.verify(c, meta, arrays)
        finally:
            so.attn_route(-1)
            native.use_ifma(True)
        out.append((v.accepted, v.reason, v.detail, v.checks))
    return out


@pytest.mark.parametrize("tamper", TAMPERS)
def test_fused_and_step_routes_reject_alike(four_layer_llama, tamper, monkeypatch):
    flow = four_layer_llama
    c = flow.challenge("full")
    meta, arrays = flow.open(c)
    for t in tamper.split("+"):
        _edit(flow, arrays, t)
    got = _verdicts(flow, c, meta, arrays, monkeypatch)
    assert all(g == got[0] for g in got), [g[1:3] for g in got]
    assert got[0][0] is False and got[0][1].startswith(("freivalds", "kv_mismatch", "residual")), \
        got[0][1:3]
    if "+" in tamper:
        assert "layers.0." in got[0][2]  # the first failing layer decides, as in the step route


OTHER = [(k, t) for k in ("qwen3", "qwen2", "odd") for t in
         ("last:z.0.qkv", "last:zq.0.qkv", "block:z.0.gate_up", "over:z.0.down", None)]
OTHER += [(k, t) for k in ("mixtral", "qwen3_moe") for t in
          ("last:z.0.qkv", "first:z.0.router", "last:z.1.router", "first:z.0.gate_up",
           "last:z.1.down", "over:z.0.down", "zero:z.1.gate_up", "swap:z.0.router", "first:z.1.o",
           None)]


@pytest.mark.parametrize("kind,tamper", OTHER)
def test_other_families(kind, tamper, request, monkeypatch):
    """Qwen3 (head norms inside the fused qkv side), Qwen2 (qkv bias), odd head counts, and the
    MoE families (the router and each selected expert's linears in one pass each; a slot's
    accumulators edited, its router row edited so another expert would be chosen)."""
    flow = _flow(request.getfixturevalue(f"tiny_{kind}"))
    c = flow.challenge("full")
    meta, arrays = flow.open(c)
    if tamper:
        _edit(flow, arrays, tamper)
    got = _verdicts(flow, c, meta, arrays, monkeypatch)
    assert all(g == got[0] for g in got), [g[1:3] for g in got]
    assert got[0][0] is (tamper is None), got[0][1:3]


def test_a_declined_layer_is_replayed_step_by_step(four_layer_llama, monkeypatch):
    """When the fused calls decline a layer they cannot take (here: every one), the step route
    replays it and an honest opening is accepted; a compiled core that always declined would
    cost time, never a verdict."""
    from commitllm.verifier.native import layer

    flow = four_layer_llama
    c = flow.challenge("routine")
    meta, arrays = flow.open(c)
    calls, ran = [], []
    monkeypatch.setattr(layer, "prepare", lambda *a, **k: None)  # declined: the three calls run
    monkeypatch.setattr(layer, "post", lambda *a: calls.append(a[3]))  # None: declined
    v = flow.verify(c, meta, arrays)
    assert v.accepted and calls and np.all(np.diff(calls) > 0), (v.reason, calls)
    # the one call ran and did not pass (as on a tampered layer): the step route decides alone
    monkeypatch.undo()
    prepare = layer.prepare
    monkeypatch.setattr(layer, "prepare", lambda *a, **k: ran.append(a[3]) or prepare(*a, **k))
    monkeypatch.setattr(layer, "run", lambda w: (False, 0.0, 0.0))
    monkeypatch.setattr(layer, "pre", lambda *a: pytest.fail("the three calls ran after it"))
    v = flow.verify(c, meta, arrays)
    assert v.accepted and ran and np.all(np.diff(ran) > 0), (v.reason, ran)
