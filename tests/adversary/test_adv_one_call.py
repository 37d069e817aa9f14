"""Tamper family: the one-call layer (layer.c's ly_layer, replay.prepare_layers).

ly_layer gathers a layer's x_l rows and RoPE rows by index, replays the layer and compares its
output rows with the committed x_{l+1} rows in C; its arguments are prepared for every layer
before any layer runs. A dishonest provider would look for a committed residual stream it
passes and the step route rejects: an output row one ulp off, rows of two positions exchanged
(each row honest somewhere), a layer skipped or fed another layer's input, and a cheat at two
layers at once (the first failing layer decides). Each is served, committed and opened by the
provider, then verified three ways: the one call (the default), the three calls from Python
(pre, attend, post) and the step route; the verdict, its reason, detail and the checks listed
must be the same, and the expected rejection, in every profile, at the routine and full tiers,
on 1 and 2 threads."""

from __future__ import annotations

import pytest
from advcheats import layer_fed_earlier_input, layer_hook, layer_skipped, residual_ulp
from commitllm.verifier import native, replay
from commitllm.verifier.native import layer

pytestmark = pytest.mark.skipif(native.lib() is None, reason="the compiled core is not built")


def rows_swapped(qm_a, at: int, a: int, b: int):
    """Layer `at`'s output rows of positions a and b exchanged, committed and used onwards."""
    def hook(orig, self, m, i, x, step, tr):
        out = orig(self, m, i, x, step, tr)
        ra, rb = ((step.pos == p).nonzero().flatten() for p in (a, b))
        if i == at and len(ra) and len(rb):
            out = out.clone()
            out[ra], out[rb] = out[rb].clone(), out[ra].clone()
        return out
    return layer_hook(qm_a, hook)


def two_ulps(qm_a):
    """Layer 0 one ulp off at position 12 and layer 1 one ulp off at position 3."""
    first = residual_ulp(qm_a, 0, 12)
    second = residual_ulp(qm_a, 1, 3)
    (cls, name, call0), = first.patches
    (_, _, call1), = second.patches

    def both(layer_self, m, i, x, step, tr):
        return (call0 if i == 0 else call1)(layer_self, m, i, x, step, tr)
    first.patches = ((cls, name, both),)
    return first


# (name, provider, code, positions challenged)
CHEATS = [
    ("ulp-layer0-pos12", lambda qm: residual_ulp(qm, 0, 12), "residual_chain", [12]),
    ("ulp-layer1-pos3", lambda qm: residual_ulp(qm, 1, 3), "residual_chain", [3, 12]),
    ("ulp-two-layers", two_ulps, "residual_chain", [3, 12]),
    ("rows-3-5-swapped", lambda qm: rows_swapped(qm, 0, 3, 5), "residual_chain", [3, 5]),
    ("layer0-skipped", lambda qm: layer_skipped(qm, 0), "residual_chain", [12]),
    ("layer1-fed-layer0-input", lambda qm: layer_fed_earlier_input(qm, 1), "freivalds_qkv",
     [12]),
]


def _routes(world, served, provider, tier, positions, monkeypatch, threads):
    """The verdicts of one opening on the three routes, and how many layers the one call ran."""
    c = world.challenge(served, tier, positions)
    meta, arrays = world.open(served, c, provider)
    ran, run = [], layer.run

    def counted(w):
        got = run(w)
        ran.append(got is not None)
        return got
    out = []
    for route in ("one", "three", "step"):
        with monkeypatch.context() as mp:
            mp.setattr(layer, "run", counted if route == "one" else run)
            if route == "three":
                mp.setattr(layer, "prepare", lambda *a, **k: None)
            if route == "step":
                mp.setattr(replay, "FUSED", False)
            v = world.verify(served, c, meta, arrays, threads=threads)
        out.append((v.accepted, v.reason, v.detail, v.checks))
    return out, ran


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("tier", ["routine", "full"])
@pytest.mark.parametrize("name,make,code,positions", CHEATS, ids=[c[0] for c in CHEATS])
def test_committed_residual_cheats_are_rejected_alike(pworld, monkeypatch, name, make, code,
                                                      positions, tier, threads):
    p = make(pworld.qm)
    s = pworld.serve(p)
    got, ran = _routes(pworld, s, p, tier, positions, monkeypatch, threads)
    assert all(g == got[0] for g in got), [g[1:3] for g in got]
    assert ran and any(ran), "the one call never ran"
    assert not got[0][0] and got[0][1] == code, (name, tier, got[0][1:3])


def test_the_honest_opening_runs_the_one_call_on_every_layer(pworld, monkeypatch):
    got, ran = _routes(pworld, pworld.served, pworld.honest, "full", None, monkeypatch, 1)
    assert all(g == got[0] for g in got) and got[0][0], got[0][1:3]
    assert ran and all(ran), ran
