"""The fused layer route (verifier/native/layer.c and layer.py; replay._fused_layer) against the
step-by-step route, bit for bit: the one-pass packed linear (freivalds.c's fv_acc_linear) against
decoding, fv_dot and dequantize on every route and width; each layer's q/k/v rows and output rows
against the step route's in every dense family and profile; and the fused route really answering
on honest openings. Verdicts under tampering with the route on and off: adversary/
test_adv_fused.py."""

from __future__ import annotations

import numpy as np
import pytest

from commitllm.verifier import native, replay
from commitllm.verifier.native import bridge, layer
from commitllm.verifier.opening import pack_acc

pytestmark = pytest.mark.skipif(native.lib() is None, reason="the compiled core is not built")


def _routes() -> list[int]:
    best = int(native.lib().attn_best_route())
    return list(range(best + 1))


@pytest.fixture
def route(request):
    so = native.lib()
    so.attn_route(request.param)
    yield request.param
    so.attn_route(-1)


def _modes() -> list:
    """(CPU route, IFMA on): every route without fv_acc_linear's IFMA route, and the best with
    it where this CPU has it."""
    modes = [(r, False) for r in _routes()]
    if native.use_ifma(True):
        modes.append((_routes()[-1], True))
    return modes


@pytest.fixture
def mode(request):
    r, ifma = request.param
    so = native.lib()
    so.attn_route(r)
    assert native.use_ifma(ifma) == ifma
    yield request.param
    so.attn_route(-1)
    native.use_ifma(True)


@pytest.mark.parametrize("mode", _modes(), indirect=True, ids=str)
@pytest.mark.parametrize("w", range(1, 9))
def test_one_pass_linear_is_decode_fv_dot_dequantize(mode, w):
    """Every width, lengths around the 8-value SIMD step, the IFMA route's 16-value step and the
    1,024-value block (so tails and the last values' short loads), bias and residual on and off,
    bounds up to 2^52 - 1 and the IFMA route's largest, 2^51 - 1: the same residues and the same
    fp32 bits as unpack, fv_dot and bridge.dequantize."""
    route, ifma = mode
    rng = np.random.default_rng(w + 10 * route + 100 * ifma)
    tops = {min((1 << (8 * w - 1)) - 1, (1 << 52) - 1), min((1 << (8 * w - 1)) - 1, (1 << 51) - 1)}
    for top, (m, n) in ((t, s) for t in sorted(tops) for s in (
            (1, 1), (1, 7), (2, 9), (1, 15), (2, 17), (3, 1023), (2, 1025), (5, 2050))):
        z = rng.integers(-top, top, (m, n), endpoint=True)
        z.reshape(-1)[:2] = (top, -top)[: z.size]
        a = rng.integers(0, 2**61 - 1, n)
        a[: n // 2] = 2**61 - 2  # the largest residues: the IFMA route's high parts at their top
        sx = rng.random(m).astype(np.float32) * 1e-3
        sw = rng.random(n).astype(np.float32)
        for bias, resid in ((None, None), (rng.standard_normal(n).astype(np.float32),
                                           rng.standard_normal((m, n)).astype(np.float32))):
            got = native.fv_acc_linear(a, pack_acc(z, w), top, sx, sw, bias, resid)
            assert got is not None, (w, m, n)
            assert np.array_equal(got[0], native.fv_dot(a, z, top))
            want = bridge.dequantize(z, sx, sw, bias, resid)
            assert np.array_equal(got[1].view(np.uint32), want.view(np.uint32)), (w, m, n)


@pytest.mark.parametrize("route", _routes(), indirect=True)
def test_decoder_on_every_route(route):
    """acc_unpack (the step route's decoder) on each CPU route, AVX-512 VBMI's masked loads
    included: every width, lengths 1..20 and past a block, against the bytes' definition."""
    rng = np.random.default_rng(route)
    for w in range(1, 9):
        top = 1 << (8 * w - 1)
        for n in (*range(1, 21), 1030):
            z = rng.integers(-top, top, n)
            got = native.acc_unpack(pack_acc(z, w))
            assert got is not None and np.array_equal(got, z), (route, w, n)


@pytest.mark.parametrize("mode", _modes(), indirect=True, ids=str)
def test_one_pass_linear_declines_what_it_does_not_decide(mode):
    """A value beyond the bound (above or below, in a tail or a full step, at every width), one
    at 2^53 (the dequantization's limit) and a non-finite output give None, so the step route
    decides; a bad width is an error."""
    rng = np.random.default_rng(5)
    for w in range(1, 9):
        bound = min((1 << (8 * w - 1)) - 2, (1 << 51) - 1)
        for n, at in ((20, 3), (20, 17), (1030, 1029)):
            a = rng.integers(0, 2**61 - 1, n)
            for v in (bound + 1, -bound - 1):
                z = rng.integers(-bound, bound, (2, n), endpoint=True)
                z[1, at] = v
                got = native.fv_acc_linear(a, pack_acc(z, w), bound, np.ones(2, np.float32),
                                           np.ones(n, np.float32))
                assert got is None, (w, n, at, v)
    a = np.arange(1, 11, dtype=np.int64)
    sx, sw = np.ones(2, np.float32), np.ones(10, np.float32)
    z = np.zeros((2, 10), np.int64)
    z[1, 9] = 1001
    assert native.fv_acc_linear(a, pack_acc(z, 2), 1000, sx, sw) is None
    z[1, 9] = 1 << 53
    assert native.fv_acc_linear(a, pack_acc(z, 8), (1 << 62) - 1, sx, sw) is None
    z[1, 9] = 1 << 40
    big = np.full(10, 3e38, np.float32)
    assert native.fv_acc_linear(a, pack_acc(z, 8), 1 << 41, sx, big) is None
    assert native.fv_acc_linear(a, pack_acc(z, 8), 1 << 41, sx, sw) is not None
    with pytest.raises(ValueError):
        native.fv_acc_linear(a, np.zeros((2, 10, 9), np.uint8), 1, sx, sw)
    with pytest.raises(ValueError):  # a secret row shorter than the accumulator rows
        native.fv_acc_linear(a[:9], pack_acc(z, 8), 1 << 41, sx, sw)
    with pytest.raises(ValueError):
        native.fv_acc_linear(a, pack_acc(z, 8).astype(np.int8), 1 << 41, sx, sw)
    with pytest.raises(OverflowError):
        native.fv_acc_linear(a, pack_acc(z, 8), 1 << 62, sx, sw)


FAMILIES = [("llama", "w8a16"), ("llama", "a8"), ("llama", "w16a16"), ("qwen2", "w8a16"),
            ("qwen3", "w8a16"), ("mistral", "w8a16"), ("llama_tied_scaled", "w8a16"),
            ("odd", "w8a16")]


def _record(monkeypatch):
    """What each route computes per layer: the fused calls' outputs, and the step route's q/k/v
    (replay._qkv) and output rows (the down linear plus the residual)."""
    seen = {"fused": {}, "steps": {}, "declined": 0, "q_layer": {}}
    pre, post, qkv, lin = layer.pre, layer.post, replay._qkv, replay._linear
    attend, step_attend = layer.attend, replay._attend

    def fused(fn, part):
        def rec(key, cfg, prof, l, *a):
            got = fn(key, cfg, prof, l, *a)
            seen["declined"] += got is None
            if got is not None:
                seen["fused"][(part, l)] = got[0]
                if part == "qkv":
                    seen["q_layer"][id(got[0][0][0])] = l
            return got
        return rec

    def rec_qkv(ctx, q, pos, l):
        got = qkv(ctx, q, pos, l)
        seen["steps"][("qkv", l)] = got
        return got

    def rec_lin(ctx, label, *a, **k):
        got = lin(ctx, label, *a, **k)
        if label.endswith(".down") and ".experts." not in label:
            seen["steps"][("out", int(label.split(".")[1]))] = got
        return got

    def rec_attend(cfg, prof, q, k, v, pos, n, kv, **kw):
        got = attend(cfg, prof, q, k, v, pos, n, kv, **kw)
        seen["declined"] += got is None
        if got is not None:  # the layer: the one whose fused qkv call gave these q rows
            seen["fused"][("attn", seen["q_layer"][id(q[0])])] = got
        return got

    monkeypatch.setattr(layer, "attend", rec_attend)
    monkeypatch.setattr(replay, "_attend", _by_layer(seen, "steps", "attn", step_attend))
    monkeypatch.setattr(layer, "pre", fused(pre, "qkv"))
    monkeypatch.setattr(layer, "post", fused(post, "out"))
    monkeypatch.setattr(replay, "_qkv", rec_qkv)
    monkeypatch.setattr(replay, "_linear", rec_lin)
    return seen


def _by_layer(seen, side: str, part: str, fn):
    """fn(ctx, l, *a) recording its result under seen[side][(part, l)] (a fused call's None
    counted as declined)."""
    def rec(ctx, l, *a):
        got = fn(ctx, l, *a)
        if side == "fused":
            seen["declined"] += got is None
        seen[side][(part, l)] = got
        return got
    return rec


def _same(a, b) -> bool:
    if isinstance(a, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("kind,profile", FAMILIES, ids=[f"{k}-{p}" for k, p in FAMILIES])
def test_fused_layers_compute_the_step_routes_bits(kind, profile, request, monkeypatch):
    """An honest full-tier opening of each dense family and profile (Qwen2's qkv bias, Qwen3's
    head norms, Mistral's window, tied and scaled RoPE, odd head counts), with the one-call
    layer (layer.prepare) switched off: the three calls answer for every layer (they decline
    nothing), and their q, k, v rows with their scales, attention output (layer.attend) and
    output rows are the step route's, byte for byte."""
    from test_protocol import SAMPLED, Flow, _qm

    flow = Flow(_qm(request.getfixturevalue(f"tiny_{kind}"), profile), params=SAMPLED)
    c = flow.challenge("full")
    meta, arrays = flow.open(c)
    monkeypatch.setattr(layer, "prepare", lambda *a, **k: None)
    seen = _record(monkeypatch)
    v = flow.verify(c, meta, arrays)
    assert v.accepted, (v.reason, v.detail)
    layers = {int(k.split(".")[1]) for k in arrays if k.startswith("z.") and
              k.split(".")[1].isdigit()}
    assert seen["declined"] == 0 and not seen["steps"]
    assert set(seen["fused"]) == {(p, l) for l in layers for p in ("qkv", "attn", "out")}
    monkeypatch.setattr(replay, "FUSED", False)
    v2 = flow.verify(c, meta, arrays)
    assert (v2.accepted, v2.reason, v2.checks) == (v.accepted, v.reason, v.checks)
    assert set(seen["steps"]) == set(seen["fused"])
    for k, got in seen["fused"].items():
        assert _same(got, seen["steps"][k]), (kind, profile, k)


def _record_whole(monkeypatch):
    """The one-call layer's answers per layer, each call prepared with an `out` array (the
    layer's output rows it computed), and the step route's output rows."""
    seen = {"whole": {}, "steps": {}, "ran": 0, "passed": 0}
    prepare, run, lin = layer.prepare, layer.run, replay._linear

    def rec_prepare(key, cfg, prof, l, pos, n, *a, **k):
        out = np.full((n, cfg.hidden_size), np.nan, np.float32)
        seen["whole"][l] = out
        return prepare(key, cfg, prof, l, pos, n, *a, out=out)

    def rec_run(w):
        got = run(w)
        if got is not None:
            seen["ran"] += 1
            seen["passed"] += got[0]
        return got

    def rec_lin(ctx, label, *a, **k):
        got = lin(ctx, label, *a, **k)
        if label.endswith(".down") and ".experts." not in label:
            seen["steps"][int(label.split(".")[1])] = got
        return got
    monkeypatch.setattr(layer, "prepare", rec_prepare)
    monkeypatch.setattr(layer, "run", rec_run)
    monkeypatch.setattr(replay, "_linear", rec_lin)
    return seen


@pytest.mark.parametrize("tier", ["routine", "full"])
@pytest.mark.parametrize("kind,profile", FAMILIES, ids=[f"{k}-{p}" for k, p in FAMILIES])
def test_the_one_call_layer_computes_the_step_routes_bits(kind, profile, tier, request,
                                                          monkeypatch):
    """The same openings through the one-call layer (ly_layer: the rows gathered by index, the
    three steps, the comparison with x_{l+1} in C; every layer prepared before any runs): it
    runs and passes for every layer, nothing else of the fused route runs, and the output rows
    it computed are the step route's, byte for byte; the verdict and its checks are the step
    route's."""
    from test_protocol import SAMPLED, Flow, _qm

    flow = Flow(_qm(request.getfixturevalue(f"tiny_{kind}"), profile), params=SAMPLED)
    c = flow.challenge(tier)
    meta, arrays = flow.open(c)
    seen = _record_whole(monkeypatch)
    for name in ("pre", "attend", "post"):
        monkeypatch.setattr(layer, name, _never(name))
    with native.thread_budget(1):
        v = flow.verify(c, meta, arrays)
    assert v.accepted, (v.reason, v.detail)
    layers = {int(k.split(".")[1]) for k in arrays if k.startswith("z.") and
              k.split(".")[1].isdigit()}
    assert seen["ran"] == seen["passed"] == len(layers) and set(seen["whole"]) == layers
    monkeypatch.setattr(replay, "FUSED", False)
    v2 = flow.verify(c, meta, arrays)
    assert (v2.accepted, v2.reason, v2.checks) == (v.accepted, v.reason, v.checks)
    assert set(seen["steps"]) == layers
    for l in layers:
        assert _same(seen["whole"][l], seen["steps"][l]), (kind, profile, tier, l)


def _never(name: str):
    def fail(*a, **k):
        raise AssertionError(f"layer.{name} ran: the one-call layer should have answered")
    return fail


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_moe_layers_compute_the_step_routes_bits(kind, request, monkeypatch):
    """A MoE layer: the qkv side through the fused call, the MLP (o, router, each selected
    expert's gate_up and down) through the one-pass linear, never declined on an honest opening,
    the same q/k/v and output rows as the step route."""
    from test_protocol import SAMPLED, Flow, _qm

    flow = Flow(_qm(request.getfixturevalue(f"tiny_{kind}")), params=SAMPLED)
    c = flow.challenge("full")
    meta, arrays = flow.open(c)
    seen = _record(monkeypatch)
    monkeypatch.setattr(replay, "_fused_moe_mlp",
                        _by_layer(seen, "fused", "out", replay._fused_moe_mlp))
    monkeypatch.setattr(replay, "_replay_experts",
                        _by_layer(seen, "steps", "out", replay._replay_experts))
    v = flow.verify(c, meta, arrays)
    assert v.accepted, (v.reason, v.detail)
    assert seen["declined"] == 0 and not seen["steps"] and seen["fused"]
    monkeypatch.setattr(replay, "FUSED", False)
    v2 = flow.verify(c, meta, arrays)
    assert (v2.accepted, v2.reason, v2.checks) == (v.accepted, v.reason, v.checks)
    assert set(seen["steps"]) == set(seen["fused"])
    for k, got in seen["fused"].items():
        assert _same(got, seen["steps"][k]), (kind, k)


def test_a_used_key_copies_without_its_address_cache(request):
    """The fused route keeps structs of raw addresses with the key (its _limbs): a deep copy of
    the key must not carry them (they would name the original's arrays)."""
    import copy

    from test_protocol import SAMPLED, Flow, _qm

    flow = Flow(_qm(request.getfixturevalue("tiny_llama")), params=SAMPLED)
    c = flow.challenge("routine")
    meta, arrays = flow.open(c)
    assert flow.verify(c, meta, arrays).accepted
    key = flow.key
    assert key._limbs.get("layer.c")  # the route ran and kept its structs
    assert not copy.deepcopy(key)._limbs.get("layer.c")
    assert copy.copy(key)._limbs is key._limbs  # a shallow copy shares the very arrays


def test_the_one_call_layer_passes_only_the_honest_rows(request, monkeypatch):
    """ly_layer on the arguments of an honest layer, then each changed: it passes the honest
    ones only. One element of a committed x_{l+1} row one ulp off, or NaN; an x_l or RoPE row
    gathered from another position; any row index out of its table (negative, at the end): not
    passed. Tables in another dtype or width, or not contiguous: not run (None)."""
    from test_protocol import SAMPLED, Flow, _qm

    flow = Flow(_qm(request.getfixturevalue("tiny_llama")), params=SAMPLED)
    c = flow.challenge("routine")
    meta, arrays = flow.open(c)
    calls, prepare, whole = [], layer.prepare, layer.whole
    monkeypatch.setattr(layer, "prepare", lambda *a, **k: calls.append(a) or prepare(*a, **k))
    with native.thread_budget(1):
        assert flow.verify(c, meta, arrays).accepted
    key, cfg, prof, l, pos, n, xr, yr, rope, packed, zq, kv = calls[0]

    def run(xr=xr, yr=yr, rope=rope):
        with native.thread_budget(1):
            got = whole(key, cfg, prof, l, pos, n, xr, yr, rope, packed, zq, kv)
        return None if got is None else got[0]
    assert run() is True
    (xt, xi), (yt, yi), (ct, st, ri) = xr, yr, rope
    for value in ("ulp", "nan"):
        y = yt.copy()
        row = y[yi[n - 1]]
        row[3] = np.nextafter(row[3], np.float32(np.inf)) if value == "ulp" else np.nan
        assert run(yr=(y, yi)) is False, value
    assert len(set(xi.tolist())) > 1 and len(set(ri.tolist())) > 1
    assert run(xr=(xt, np.roll(xi, 1))) is False
    assert run(rope=(ct, st, np.roll(ri, 1))) is False
    for bad in (-1, len(xt)):
        assert run(xr=(xt, np.where(np.arange(len(xi)) == 0, bad, xi))) is False
    for bad in (-1, len(yt)):
        assert run(yr=(yt, np.where(np.arange(len(yi)) == 0, bad, yi))) is False
    for bad in (-1, len(ct)):
        assert run(rope=(ct, st, np.where(np.arange(len(ri)) == 0, bad, ri))) is False
    assert run(xr=(xt.astype(np.float64), xi)) is None
    assert run(yr=(np.asfortranarray(np.repeat(yt, 2, axis=0)[::2]), yi)) is None
    assert run(rope=(ct[:, :-1], st[:, :-1], ri)) is None
    assert run(xr=(xt, xi.astype(np.int32))) is None
    assert run() is True  # nothing above changed the honest arguments


def test_a_prepared_call_keeps_every_array_it_names(request, monkeypatch):
    """layer.prepare on private copies of the opened arrays, the dicts they came in then emptied
    and the key's norm weights replaced, the memory reused: the prepared call still passes (it
    holds the arrays whose addresses it gives, not the dicts that held them)."""
    import gc

    from test_protocol import SAMPLED, Flow, _qm

    flow = Flow(_qm(request.getfixturevalue("tiny_llama")), params=SAMPLED)
    c = flow.challenge("routine")
    meta, arrays = flow.open(c)
    calls, prepare = [], layer.prepare
    monkeypatch.setattr(layer, "prepare", lambda *a, **k: calls.append(a) or prepare(*a, **k))
    with native.thread_budget(1):
        assert flow.verify(c, meta, arrays).accepted
    key, cfg, prof, l, pos, n, xr, yr, rope, packed, zq, kv = calls[0]
    packed = {k: v.copy() for k, v in packed.items()}
    kv = tuple(a.copy() for a in kv)
    w = layer.prepare(key, cfg, prof, l, pos.copy(), n, tuple(a.copy() for a in xr),
                      tuple(a.copy() for a in yr), tuple(a.copy() for a in rope), packed,
                      None if zq is None else zq.copy(), kv)
    assert w is not None
    shapes = [a.shape for a in packed.values()]
    packed.clear()
    name = f"layers.{l}.attn_norm"
    saved = key.arrays[name]
    key.arrays[name] = saved.copy()
    try:
        del kv
        gc.collect()
        scribble = [np.full(s, 0x55, np.uint8) for s in shapes for _ in range(4)]
        with native.thread_budget(1):
            got = layer.run(w)
        assert got is not None and got[0] is True, got
        del scribble
    finally:
        key.arrays[name] = saved
