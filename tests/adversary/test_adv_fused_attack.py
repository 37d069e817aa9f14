"""Attacks on the fused replay route (replay._try_fused / _fused_layer / _fused_moe_mlp /
_linear_packed; native/layer.py + layer.c; freivalds.c's fv_acc_linear).

The rule under attack: the fused route may only answer "every check passed"; on anything else
the step route (replay._replay_layer, normative) decides. So no opening may pass the fused route
that the step route rejects, and the verdict, reason, detail and checks must be the same with
replay.FUSED on (every CPU route: native.lib().attn_route(r), r in 0..attn_best_route()) and off.

* The LM head's one-pass route (_linear_packed): z.lm tampers at the decoders' edges, verdicts on
  every route, fused off and threads=2 (test_adv_fused.py covers the layers, not z.lm).
* Consistent cheats at the replay level (Merkle proofs assumed to hold: the provider commits
  whatever rows it likes): a layer's input rows replaced by edge values (zero and -0.0 rows,
  denormals, fp32 max, huge and tiny rows), every accumulator, derived K/V row and output row
  recomputed, the K/V and output rows taken from the FUSED calls' own outputs. Were the fused
  route's arithmetic to differ from the step route's anywhere, this opening would pass the
  fused route and fail the step route; here every route must accept it, with the fused route
  answering.
* Random mutations at the replay level (a byte of any packed z / zq row, rows swapped between
  positions or between z and zq, K/V values to NaN / inf / -0.0 / integer extremes, output rows
  to NaN / -0.0 / one ulp off, input rows non-finite): every route gives the same outcome, and
  an accepted mutation never changed an accumulator.
* Hostile calls of the public functions: native.fv_acc_linear (odd shapes, widths 0..9, rows 0,
  n 0, strided / misaligned arrays; every width and route with the packed bytes, the secret and
  the float arrays ending at a PROT_NONE guard page, in a forked child, so any read past an
  array crashes the child), layer.pre / layer.post (wrong dtypes, shapes, widths, layouts: None;
  misaligned or non-contiguous-but-equal inputs: the same bits).

Findings, fixed in 131a861 while this file was written (kept as regression tests):
native.fv_acc_linear did not check the secret vector's length against the accumulators' n (an
out-of-bounds read past `a`: SIGSEGV at a guard page), passed `bound` to ctypes unchecked
(2^64 + b checked as b), and cast a packed array of any dtype to uint8. The verifier's own caller
(replay._packed_linear) checked all three, so no opening reached them.

Observation (mended after this file was written): replay.FUSED switched the layers' fused route
only, so the LM head's one-pass route ran with FUSED off too and a FUSED on/off comparison never
ran the LM head's step route. FUSED now gates _linear_packed as well; _verdicts below still adds a
combination with _packed_linear declining everything. Also mended: the one-pass routes now leave
a bound at or above 2^53 (which the step route's freivalds.dot refuses) to the step route.
"""

from __future__ import annotations

import ctypes
import mmap
import signal
import time

import numpy as np
import pytest

from forked import in_child
from accs import acc, add_acc, set_acc
from commitllm.verifier import native, replay
from commitllm.verifier import verify as verify_mod
from commitllm.verifier.native import layer
from commitllm.verifier.native.bridge import dequantize, quantize_rows, rmsnorm, swiglu
from commitllm.verifier.opening import acc_bound, pack_acc, unpack_acc

pytestmark = pytest.mark.skipif(native.lib() is None, reason="the compiled core is not built")


def _routes() -> list[int]:
    return list(range(int(native.lib().attn_best_route()) + 1))


def _flow(folder, profile="w8a16", max_tokens=12):
    from test_protocol import SAMPLED, Flow, _qm

    return Flow(_qm(folder, profile), params=SAMPLED, max_tokens=max_tokens)


def _declined(*a, **k):
    return None


def _verdicts(flow, c, meta, arrays, monkeypatch, threads=(1,)) -> list:
    """Verdicts with the fused route on every CPU route, with FUSED off (the LM head's step route,
    _linear_q, too), and with FUSED off and the one-pass linear declining everything."""
    so = native.lib()
    out = []
    one_pass = replay._packed_linear
    combos = ([(True, r, t, one_pass) for r in _routes() for t in threads]
              + [(False, -1, t, one_pass) for t in threads]
              + [(False, -1, t, _declined) for t in threads])
    for fused, route, t, packed_linear in combos:
        monkeypatch.setattr(replay, "FUSED", fused)
        monkeypatch.setattr(replay, "_packed_linear", packed_linear)
        so.attn_route(route)
        try:
            v = flow.verify(c, meta, arrays, threads=t)
        finally:
            so.attn_route(-1)
        out.append((v.accepted, v.reason, v.detail, v.checks))
    monkeypatch.setattr(replay, "FUSED", True)
    monkeypatch.setattr(replay, "_packed_linear", one_pass)
    return out


# ---------------------------------------------------------------- the LM head's one-pass route

@pytest.fixture(scope="module")
def llama_flow(tiny_llama):
    return _flow(tiny_llama)


@pytest.fixture(scope="module")
def llama_opened(llama_flow):
    c = llama_flow.challenge("full")
    meta, arrays = llama_flow.open(c)
    return c, meta, arrays


def _edit_lm(flow, arrays, how: str) -> None:
    z = acc(arrays, "z.lm")
    b = acc_bound(flow.qm.cfg, flow.qm.profile, "lm_head")
    w = arrays["z.lm"].shape[-1]
    if how == "first":
        add_acc(arrays, "z.lm", (0, 0), 1)
    elif how == "last":  # the last value of the last row: the decoders' short tail loads
        add_acc(arrays, "z.lm", (-1, -1), -1)
    elif how == "block":  # the 8-value SIMD step edge and the middle of the row
        add_acc(arrays, "z.lm", (0, min(8, z.shape[1] - 1)), 2)
    elif how == "over":  # one beyond the bound
        z[-1, -1] = b + 1
        set_acc(arrays, "z.lm", z, wrap=True)
    elif how == "neg_over":
        z[0, 3] = -b - 1
        set_acc(arrays, "z.lm", z, wrap=True)
    elif how == "wrap":  # the width's most negative value
        z[0, 1] = -(1 << (8 * w - 1))
        set_acc(arrays, "z.lm", z, wrap=True)
    elif how == "swap":
        z[[0, -1]] = z[[-1, 0]]
        set_acc(arrays, "z.lm", z)
    elif how == "zero":
        z[-1] = 0
        set_acc(arrays, "z.lm", z)
    elif how == "bytes":  # every byte of one value flipped
        arrays["z.lm"] = arrays["z.lm"].copy()
        arrays["z.lm"][0, 5] ^= 0xFF
    else:
        raise AssertionError(how)


@pytest.mark.parametrize("how", ["first", "last", "block", "over", "neg_over", "wrap", "swap",
                                 "zero", "bytes"])
def test_lm_head_tampers_reject_alike_on_every_route(llama_flow, llama_opened, how, monkeypatch):
    c, meta, arrays = llama_opened
    arrays = dict(arrays)
    assert acc(arrays, "z.lm").shape[0] >= 2
    _edit_lm(llama_flow, arrays, how)
    got = _verdicts(llama_flow, c, meta, arrays, monkeypatch,
                    threads=(1, 2) if how in ("last", "over") else (1,))
    assert all(g == got[0] for g in got), [g[1:3] for g in got]
    assert got[0][0] is False and got[0][1] == "freivalds_lm_head", got[0][1:3]
    if how in ("over", "neg_over"):
        assert "bound" in got[0][2]


def test_honest_opening_the_fused_lm_head_answers(llama_flow, llama_opened, monkeypatch):
    """The one-pass LM head really answers on an honest opening (else the tampers above would
    test the step route twice), and the verdict is the step route's."""
    c, meta, arrays = llama_opened
    calls = []
    real = replay._linear_q
    monkeypatch.setattr(replay, "_linear_q", lambda ctx, label, *a, **k:
                        calls.append(label) or real(ctx, label, *a, **k))
    got = _verdicts(llama_flow, c, meta, arrays, monkeypatch, threads=(1, 2))
    assert all(g == got[0] for g in got) and got[0][0] is True, got[0][1:3]
    # FUSED on: the LM head takes the one-pass route; off: every linear the step route
    for fused in (True, False):
        calls.clear()
        monkeypatch.setattr(replay, "FUSED", fused)
        assert llama_flow.verify(c, meta, arrays).accepted
        assert ("lm_head" in calls) is not fused and len(calls) == (0 if fused else 9), \
            (fused, calls)
    # declined: the step route (_linear_q) replays it, same verdict
    calls.clear()
    monkeypatch.setattr(replay, "_packed_linear", _declined)
    assert llama_flow.verify(c, meta, arrays).accepted and "lm_head" in calls


# ---------------------------------------------------------------- replay-level harness

def _capture(flow, tier="full"):
    """What verify hands replay_layer, per layer, on an honest opening (Merkle already passed)."""
    c = flow.challenge(tier)
    meta, arrays = flow.open(c)
    got = []
    real = verify_mod.replay_layer

    def rec(ctx, l, resid, kv, z, zq):
        got.append((ctx, l, resid, kv, z, zq))
        return real(ctx, l, resid, kv, z, zq)
    verify_mod.replay_layer = rec
    try:
        v = flow.verify(c, meta, arrays)
    finally:
        verify_mod.replay_layer = real
    assert v.accepted, (v.reason, v.detail)
    return got


def _fresh(ctx):
    return replay.Ctx(ctx.key, ctx.cfg, ctx.profile, ctx.rope, ctx.arrays, replay.Timer())


def _outcome(ctx, l, tables, fused: bool, route: int = -1):
    so = native.lib()
    old = replay.FUSED
    replay.FUSED = fused
    so.attn_route(route)
    try:
        replay.replay_layer(_fresh(ctx), l, *tables)
        return ("ok",)
    except replay.Reject as e:
        return ("reject", e.code, e.detail)
    except Exception as e:  # noqa: BLE001 - compared between routes (verify maps it)
        return ("exc", type(e).__name__, str(e))
    finally:
        so.attn_route(-1)
        replay.FUSED = old


def _all_outcomes(ctx, l, tables):
    return [_outcome(ctx, l, tables, True, r) for r in _routes()] + [_outcome(ctx, l, tables,
                                                                              False)]


def _fused_answers(ctx, l, tables, route=-1) -> bool:
    so = native.lib()
    so.attn_route(route)
    try:
        return replay._try_fused(_fresh(ctx), l, *tables)
    finally:
        so.attn_route(-1)


def _z(qx, lin):
    return qx.astype(np.int64) @ lin.q.astype(np.int64).T


def _rebuild_dense(qm, ctx, l, resid, kv, z, zq, x_new: dict):
    """A consistent cheat: input rows x_new (position -> row) at layer l; every accumulator
    recomputed exactly (W q(x)), the derived K/V rows and the output rows taken from the fused
    calls (layer.pre / layer.post), which must answer. Returns the new tables."""
    cfg, prof, L = ctx.cfg, ctx.profile, qm.layers[l]
    resid = {k: dict(v) for k, v in resid.items()}
    for p, row in x_new.items():
        resid[l][p] = np.asarray(row, np.float32)
    pos, n, packed, zq_rows = replay._positions(z, zq, l)
    x = replay._rows(resid[l], pos)
    qx, sx = quantize_rows(rmsnorm(x, L.attn_norm, cfg.rms_norm_eps), prof.act_qmax)
    zqkv = _z(qx, L.qkv)
    pk = dict(packed)
    pk["qkv"] = pack_acc(zqkv[:n], packed["qkv"].shape[-1])
    zqr = None if zq_rows is None else pack_acc(zqkv[n:], zq_rows.shape[-1])
    cos, sin = ctx.rope.lookup(pos)
    got = layer.pre(ctx.key, cfg, prof, l, x, pk["qkv"], zqr, cos, sin)
    assert got is not None, "the fused qkv side declined a consistent opening"
    q, k, v = got[0]
    kpos, *rows = kv[l]
    k_all, sk_all, v_all, sv_all = (a.copy() for a in rows)
    at = np.searchsorted(kpos, pos)
    k_all[at], sk_all[at], v_all[at], sv_all[at] = k[0], k[1], v[0], v[1]
    kv = dict(kv)
    kv[l] = (kpos, k_all, sk_all, v_all, sv_all)
    o = replay._attend(_fresh(ctx), l, pos, n, q, k, v, kv, time.perf_counter())
    qo, so_ = quantize_rows(o, prof.act_qmax)
    zo = _z(qo, L.o)
    h = dequantize(zo, so_, L.o.s, L.o.bias, x[:n])
    qm_, sm = quantize_rows(rmsnorm(h, L.mlp_norm, cfg.rms_norm_eps), prof.act_qmax)
    zgu = _z(qm_, L.gate_up)
    gu = dequantize(zgu, sm, L.gate_up.s, L.gate_up.bias)
    f = cfg.intermediate_size
    qa, _ = quantize_rows(swiglu(gu[:, :f], gu[:, f:]), prof.act_qmax)
    zd = _z(qa, L.down)
    for name, zz in (("o", zo), ("gate_up", zgu), ("down", zd)):
        pk[name] = pack_acc(zz, packed[name].shape[-1])
    done = layer.post(ctx.key, cfg, prof, l, o, x[:n], pk)
    assert done is not None, "the fused MLP side declined a consistent opening"
    for i, p in enumerate(pos[:n]):
        resid[l + 1][int(p)] = done[0][i]
    z = dict(z)
    z[l] = (z[l][0], pk)
    zq = dict(zq)
    if zq_rows is not None:
        zq[l] = (zq[l][0], zqr)
    return resid, kv, z, zq


def _edge_rows(h: int, base: np.ndarray, rng) -> dict:
    return {"zero": np.zeros(h), "negzero": -np.zeros(h), "denormal": np.full(h, 1e-45),
            "denormal_mix": rng.choice([1e-45, -1e-45, 0.0, -0.0, 1e-40], h),
            "tiny": base * 1e-38, "huge": base * 1e30, "fp32_max": np.full(h, 3.4028235e38),
            "one_max": np.where(np.arange(h) == 3, -3.4028235e38, 0.0),
            "one_hot": np.eye(h)[h - 1] * 7, "sumsq_over": np.full(h, 2e19)}


@pytest.mark.parametrize("kind", ["llama", "qwen3", "qwen2", "odd"])
def test_consistent_cheats_with_edge_inputs_pass_every_route_alike(kind, request):
    """Were the fused arithmetic to differ from the step route's on any of these rows, the
    opening built from the fused calls' outputs would pass the fused route and fail the
    normative step route. Every route must accept it and the fused route must answer."""
    flow = _flow(request.getfixturevalue(f"tiny_{kind}"))
    got = _capture(flow)
    ctx, l, resid, kv, z, zq = got[-1]
    pos, n, _, _ = replay._positions(z, zq, l)
    rng = np.random.default_rng(3)
    h = ctx.cfg.hidden_size
    p0, pl, ps = int(pos[0]), int(pos[n - 1]), int(pos[-1])
    for name, row in _edge_rows(h, resid[l][p0], rng).items():
        # a challenged row, and the same value in a K/V-sample row (derivation only)
        tables = _rebuild_dense(flow.qm, ctx, l, resid, kv, z, zq, {p0: row, ps: -row,
                                                                     pl: row[::-1]})
        out = _all_outcomes(ctx, l, tables)
        assert all(o == ("ok",) for o in out), (kind, name, out)
        assert all(_fused_answers(ctx, l, tables, r) for r in _routes()), (kind, name)


def _mutate(rng, l, resid, kv, z, zq):
    """One random mutation of layer l's tables; (label, new tables)."""
    resid = {k: dict(v) for k, v in resid.items()}
    kv, z, zq = dict(kv), dict(z), dict(zq)
    pos, n, packed, zq_rows = replay._positions(z, zq, l)
    kind = int(rng.integers(0, 9))
    if kind <= 2:  # one byte of a packed z or zq row
        pk = {k: v.copy() for k, v in packed.items()}
        names = sorted(pk) + (["zq"] if zq_rows is not None else [])
        nm = names[int(rng.integers(len(names)))]
        arr = zq_rows.copy() if nm == "zq" else pk[nm]
        flat = arr.reshape(-1)
        i = int(rng.integers(flat.size))
        flat[i] = rng.choice([flat[i] ^ (1 << int(rng.integers(8))), 0, 255, 127, 128])
        if nm == "zq":
            zq[l] = (zq[l][0], arr)
        z[l] = (z[l][0], pk)
        return "byte", (resid, kv, z, zq)
    if kind == 3:  # a K/V value or scale
        kpos, *rows = kv[l]
        rows = [a.copy() for a in rows]
        i, which = int(rng.integers(len(kpos))), int(rng.integers(4))
        f = rows[which][i].reshape(-1)
        j = int(rng.integers(f.size))
        if f.dtype.kind == "f":
            f[j] = rng.choice([np.nan, np.inf, -np.inf, -0.0, 0.0, 1e-45, f[j] * 2])
        else:
            info = np.iinfo(f.dtype)
            f[j] = rng.choice([info.min, info.max, 0, f[j] ^ 1])
        kv[l] = (kpos, *rows)
        return "kv", (resid, kv, z, zq)
    if kind in (4, 5):  # a challenged output row at l + 1
        p = int(pos[int(rng.integers(n))])
        row = resid[l + 1][p].copy()
        j = int(rng.integers(row.size))
        row[j] = rng.choice([np.nan, np.inf, -row[j], np.nextafter(row[j], np.float32(np.inf))])
        resid[l + 1][p] = row
        return "out", (resid, kv, z, zq)
    if kind == 6:  # an input row at l (the finiteness check before the replay bypassed)
        p = int(pos[int(rng.integers(len(pos)))])
        row = resid[l][p].copy()
        row[int(rng.integers(row.size))] = rng.choice([np.nan, np.inf, 3.4e38, -0.0, 1e-45])
        resid[l][p] = row
        return "in", (resid, kv, z, zq)
    if kind == 7:  # two positions' rows of one matrix exchanged
        pk = {k: v.copy() for k, v in packed.items()}
        nm = sorted(pk)[int(rng.integers(len(pk)))]
        if len(pk[nm]) > 1:
            i, j = rng.choice(len(pk[nm]), 2, replace=False)
            pk[nm][[i, j]] = pk[nm][[j, i]]
        z[l] = (z[l][0], pk)
        return "swap", (resid, kv, z, zq)
    if zq_rows is None:
        return "none", (resid, kv, z, zq)
    pk = dict(packed)  # a challenged row's qkv exchanged with a K/V-sample row's
    a, b = pk["qkv"].copy(), zq_rows.copy()
    i, j = int(rng.integers(len(a))), int(rng.integers(len(b)))
    a[i], b[j] = b[j].copy(), a[i].copy()
    pk["qkv"] = a
    z[l], zq[l] = (z[l][0], pk), (zq[l][0], b)
    return "zswap", (resid, kv, z, zq)


def _accs(l, z, zq) -> list:
    return [unpack_acc(a) for _, a in sorted(z[l][1].items())] + (
        [unpack_acc(zq[l][1])] if l in zq else [])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the numpy spec on NaN input rows
@pytest.mark.parametrize("kind,count", [("llama", 90), ("qwen3", 40), ("qwen3_moe", 60)])
def test_random_replay_level_mutations_agree_on_every_route(kind, count, request):
    flow = _flow(request.getfixturevalue(f"tiny_{kind}"))
    got = _capture(flow)
    rng = np.random.default_rng(11)
    seen = set()
    for _ in range(count):
        ctx, l, *tables = got[int(rng.integers(len(got)))]
        label, new = _mutate(rng, l, *tables)
        out = _all_outcomes(ctx, l, new)
        assert all(o == out[0] for o in out), (kind, l, label, out)
        seen.add((label, out[0][0]))
        if out[0] == ("ok",):  # only a mutation that changed no accumulator may pass
            assert all(np.array_equal(a, b) for a, b in zip(_accs(l, tables[2], tables[3]),
                                                             _accs(l, new[2], new[3]))), label
    assert ("byte", "reject") in seen and ("out", "reject") in seen  # not vacuous


def _kv_edits(l, kv):
    """Edits of layer l's opened K/V table (positions and rows) that its Merkle proof would
    catch only if the provider had not committed to them: what the attention step (on the fused
    route attn.c's attn_layer, on the step route replay._attend) alone must refuse."""
    kpos, *rows = kv[l]
    m = len(kpos)
    out = []

    def put(name, p, rs):
        new = dict(kv)
        new[l] = (np.asarray(p, np.int64), *rs)
        out.append((name, new))
    i, j = m // 3, m - 1
    swapped = [a.copy() for a in rows]
    for a in swapped:
        a[[i, j]] = a[[j, i]]
    put("rows swapped", kpos, swapped)
    for at in (0, m // 2, m - 1):  # a position and its rows dropped
        keep = np.arange(m) != at
        put(f"drop {at}", kpos[keep], [a[keep] for a in rows])
    dup = np.insert(np.arange(m), m // 2, m // 2)  # a position opened twice
    put("duplicate", kpos[dup], [a[dup] for a in rows])
    shifted = kpos.copy()
    shifted[m // 2:] += 1  # positions relabelled past the middle
    put("shifted", shifted, rows)
    order = np.arange(m)[::-1]  # unsorted
    put("reversed", kpos[order], [a[order] for a in rows])
    tail = np.concatenate([np.arange(m), [m // 2, 0]])  # copies of two rows past the end: unsorted
    put("unsorted tail", kpos[tail], [a[tail] for a in rows])
    wider = [a.astype(np.int16) if a.dtype == np.int8 else a for a in rows]
    put("int8 rows as int16", kpos, wider)  # the same values: both routes accept alike
    return out


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen3"])
def test_kv_table_edits_agree_on_every_route(kind, request):
    """Each edit of an opened K/V table: the same outcome with the fused route on every CPU
    route and with it off, and a rejection unless the edit keeps every value the attention
    reads (the int8 rows widened; honest copies past the end, which the fused route declines
    and the step route decides)."""
    flow = _flow(request.getfixturevalue(f"tiny_{kind}"))
    got = _capture(flow, "routine")
    for ctx, l, resid, kv, z, zq in got:
        for name, new in _kv_edits(l, kv):
            out = _all_outcomes(ctx, l, (resid, new, z, zq))
            assert all(o == out[0] for o in out), (kind, l, name, out)
            if name == "int8 rows as int16":
                assert out[0] == ("ok",), (kind, l, out[0])
            elif name != "unsorted tail":  # honest copies: the step route may find either
                assert out[0][0] == "reject", (kind, l, name, out[0])
            else:  # not strictly increasing: the fused route declines, the step route decides
                assert not _fused_answers(ctx, l, (resid, new, z, zq)), (kind, l)


# ---------------------------------------------------------------- fv_acc_linear, hostile calls

class _Guarded:
    """Arrays whose last byte is the last byte before a PROT_NONE page: a read past one faults."""

    def __init__(self, size: int = 1 << 16):
        self.page = mmap.PAGESIZE
        self.size = (size + self.page - 1) // self.page * self.page
        self.mm = mmap.mmap(-1, self.size + self.page)
        self.buf = np.frombuffer(self.mm, np.uint8)
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        assert libc.mprotect(self.buf.ctypes.data + self.size, self.page, 0) == 0  # PROT_NONE
        self.at = self.size

    def put(self, a: np.ndarray) -> np.ndarray:
        """A copy of a ending just below the guard (the first one) or below the previous copy."""
        a = np.ascontiguousarray(a)
        start = self.at - a.nbytes
        start -= start % a.itemsize  # aligned to the item; the end then is below self.at
        assert start >= 0
        out = self.buf[start:start + a.nbytes].view(a.dtype).reshape(a.shape)
        out[...] = a
        self.at = start - 64 * 1024  # a next array well below (only the first ends at the guard)
        return out


def test_the_guard_page_faults():
    """The guard is real (else the test below would be vacuous): a read one byte past a guarded
    array kills the child, a read of its last byte does not."""
    def read(off):
        def child():
            g = _Guarded()
            p = g.put(np.arange(16, dtype=np.uint8))
            return ctypes.c_uint8.from_address(p.ctypes.data + off).value
        return child
    assert in_child(read(15)) == 15
    assert in_child(read(16)) == -signal.SIGSEGV


SHAPES = [(1, 1), (1, 7), (3, 1), (2, 9), (1, 1023), (1, 1025), (65, 3), (2, 2055)]


def test_fv_acc_linear_reads_nothing_past_its_arrays():
    """Every width 1..8, every CPU route, lengths around the 8-value step, the 1,024-value
    block and the 64-row pass, with the packed bytes (then the secret, the scales, the bias and
    the residual rows) ending at a guard page: the child must finish with the same answers as
    unpack + fv_dot + dequantize (any over-read kills it with SIGSEGV)."""
    def child():
        rng = np.random.default_rng(5)
        for w in range(1, 9):
            top = min((1 << (8 * w - 1)) - 1, (1 << 52) - 1)
            for m, n in SHAPES:
                z = rng.integers(-top, top, (m, n), endpoint=True)
                a = rng.integers(0, 2**61 - 1, n)
                sx = (rng.random(m) * 1e-3).astype(np.float32)
                sw = rng.random(n).astype(np.float32)
                bias = rng.standard_normal(n).astype(np.float32)
                resid = rng.standard_normal((m, n)).astype(np.float32)
                want = (native.fv_dot(a, z, top), dequantize(z, sx, sw, bias, resid))
                for which in range(6):
                    g = _Guarded(max(1 << 16, 2 * z.size * 8 + 4 * 65536))
                    args = [a, pack_acc(z, w), sx, sw, bias, resid]
                    args[which] = g.put(args[which])
                    ga, gp, gsx, gsw, gb, gr = args
                    for r in _routes():
                        native.lib().attn_route(r)
                        got = native.fv_acc_linear(ga, gp, top, gsx, gsw, gb, gr)
                        native.lib().attn_route(-1)
                        if got is None or not np.array_equal(got[0], want[0]) or \
                                got[1].tobytes() != want[1].tobytes():
                            return 10 + w
                    for r in _routes() if which == 1 else ():  # acc_unpack: VBMI on route 2
                        native.lib().attn_route(r)
                        ok = np.array_equal(native.acc_unpack(gp), z)
                        native.lib().attn_route(-1)
                        if not ok:
                            return 20 + w
        return 0
    assert in_child(child) == 0


def test_fv_dot_reads_nothing_past_its_arrays():
    """fv_dot (the activations' side of every check) on every CPU route, with and without the
    IFMA route (masked loads of int8, int16, int32 and int64 rows), lengths around the 8- and
    16-value steps, the 1,024-value block and the 64-row pass, with the rows and then the
    secret ending at a guard page: the child must give the Python integers' residues."""
    def child():
        rng = np.random.default_rng(6)
        for dtype, top in ((np.int8, 127), (np.int16, 32767), (np.int32, 2**31 - 1),
                           (np.int64, 2**51 - 1), (np.int64, 2**51)):
            for m, n in SHAPES + [(1, 15), (2, 17), (1, 31)]:
                x = rng.integers(-top, top, (m, n), endpoint=True).astype(dtype)
                a = rng.integers(0, 2**61 - 1, n)
                want = np.array([sum(int(u) * int(v) for u, v in zip(a, row)) % (2**61 - 1)
                                 for row in x], np.uint64)
                for which in range(2):
                    g = _Guarded(max(1 << 16, 2 * x.size * 8 + 4 * 65536))
                    args = [a, x]
                    args[which] = g.put(args[which])
                    for r, ifma in [(r, False) for r in _routes()] + [(-1, True)]:
                        native.lib().attn_route(r)
                        native.use_ifma(ifma)
                        got = native.fv_dot(args[0], args[1], top)
                        native.lib().attn_route(-1)
                        native.use_ifma(True)
                        if not np.array_equal(got, want):
                            return 1
        return 0
    assert in_child(child) == 0


def test_fv_acc_linear_hostile_shapes_are_clean_errors():
    rng = np.random.default_rng(0)
    m, n = 2, 9
    z = rng.integers(-1000, 1000, (m, n))
    a = rng.integers(0, 2**61 - 1, n)
    sx, sw = np.ones(m, np.float32), np.ones(n, np.float32)
    for bad in (np.zeros((n, 3), np.uint8), np.zeros((1, m, n, 3), np.uint8),
                np.zeros((m, n, 0), np.uint8), np.zeros((m, n, 9), np.uint8)):
        with pytest.raises(ValueError):
            native.fv_acc_linear(a, bad, 10, sx, sw)
    with pytest.raises(TypeError):
        native.fv_acc_linear(np.repeat(a, 2)[::2], pack_acc(z, 3), 10**6, sx, sw)  # strided
    with pytest.raises(TypeError):
        native.fv_acc_linear(a.astype(np.int32), pack_acc(z, 3), 10**6, sx, sw)
    for bad_sx, bad_sw in ((np.ones(m + 1, np.float32), sw), (sx, np.ones(n, np.float64)),
                           (sx, np.ones(2 * n, np.float32)[::2])):
        with pytest.raises(ValueError):
            native.fv_acc_linear(a, pack_acc(z, 3), 10**6, bad_sx, bad_sw)
    with pytest.raises(ValueError):
        native.fv_acc_linear(a, pack_acc(z, 3), 10**6, sx, sw, resid=np.ones((m, n + 1),
                                                                            np.float32))
    for bound in (-1, 2**62, 2**63 - 1, 2**64 + 5):
        with pytest.raises((ValueError, OverflowError)):
            native.fv_acc_linear(a, pack_acc(z, 3), bound, sx, sw)
    # no rows, no columns: empty answers
    got = native.fv_acc_linear(a, np.zeros((0, n, 3), np.uint8), 10, np.ones(0, np.float32), sw)
    assert got[0].shape == (0,) and got[1].shape == (0, n)
    got = native.fv_acc_linear(a[:0], np.zeros((m, 0, 3), np.uint8), 10, sx,
                               np.ones(0, np.float32))
    assert np.array_equal(got[0], np.zeros(m, np.uint64)) and got[1].shape == (m, 0)
    # misaligned secret, scales and packed bytes: the same answer
    want = native.fv_acc_linear(a, pack_acc(z, 3), 10**6, sx, sw)
    raw = np.zeros(8 * n + 64, np.uint8)
    ma = raw[1:1 + 8 * n].view(np.int64)
    ma[:] = a
    rs = np.zeros(4 * m + 8, np.uint8)
    msx = rs[3:3 + 4 * m].view(np.float32)
    msx[:] = sx
    rp = np.zeros(pack_acc(z, 3).nbytes + 8, np.uint8)
    mp = rp[5:5 + pack_acc(z, 3).nbytes].reshape(m, n, 3)
    mp[...] = pack_acc(z, 3)
    assert not ma.flags.aligned and not msx.flags.aligned
    got = native.fv_acc_linear(ma, mp, 10**6, msx, sw)
    assert np.array_equal(got[0], want[0]) and got[1].tobytes() == want[1].tobytes()
    # a value at the bound passes, one beyond declines, on every route and width
    for w in (3, 8):
        for r in _routes():
            native.lib().attn_route(r)
            try:
                zz = z.copy()
                zz[-1, -1] = 10**6
                assert native.fv_acc_linear(a, pack_acc(zz, w), 10**6, sx, sw) is not None
                zz[-1, -1] = -10**6 - 1
                assert native.fv_acc_linear(a, pack_acc(zz, w), 10**6, sx, sw) is None
            finally:
                native.lib().attn_route(-1)


def test_fv_acc_linear_refuses_a_short_secret_vector():
    """Found by this file, fixed in 131a861: a short secret was read past its end (a SIGSEGV with
    the vector at a guard page)."""
    rng = np.random.default_rng(1)
    m, n = 2, 9
    z = rng.integers(-1000, 1000, (m, n))
    buf = rng.integers(0, 2**61 - 1, n + 8)  # the short vector's bytes continue inside buf
    sx, sw = np.ones(m, np.float32), np.ones(n, np.float32)
    with pytest.raises(ValueError):
        got = native.fv_acc_linear(buf[:1], pack_acc(z, 3), 10**6, sx, sw)
        # what it does instead: the residues of the first n values of buf (read past buf[:1])
        assert np.array_equal(got[0], native.fv_dot(buf[:n], z, 10**6))


def test_fv_acc_linear_refuses_a_bound_beyond_int64():
    """Found by this file, fixed in 131a861: 2^64 + b went to ctypes and was checked as b."""
    a = np.arange(1, 4, dtype=np.int64)
    z = np.array([[5000, 0, 0]])
    with pytest.raises((OverflowError, ValueError)):
        got = native.fv_acc_linear(a, pack_acc(z, 2), 2**64 + 1000, np.ones(1, np.float32),
                                   np.ones(3, np.float32))
        assert got is None  # what it does: checks |z| <= 1000, not <= 2^64 + 1000


def test_fv_acc_linear_refuses_packed_arrays_that_are_not_uint8():
    """Found by this file, fixed in 131a861: any dtype was cast to uint8 (int64 bytes + 256
    decoded as the bytes)."""
    a = np.arange(1, 4, dtype=np.int64)
    p = pack_acc(np.array([[1, 2, 3]]), 2).astype(np.int64) + 256
    with pytest.raises((TypeError, ValueError)):
        native.fv_acc_linear(a, p, 10, np.ones(1, np.float32), np.ones(3, np.float32))


# ---------------------------------------------------------------- layer.pre / layer.post

@pytest.fixture(scope="module")
def llama_layer(llama_flow):
    got = _capture(llama_flow)
    ctx, l, resid, kv, z, zq = got[0]
    pos, n, packed, zq_rows = replay._positions(z, zq, l)
    x = replay._rows(resid[l], pos)
    cos, sin = ctx.rope.lookup(pos)
    return ctx, l, x, n, packed, zq_rows, cos, sin


def _same(a, b) -> bool:
    if isinstance(a, tuple):
        return len(a) == len(b) and all(_same(p, q) for p, q in zip(a, b))
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _misaligned_copy(a: np.ndarray, shift: int = 1) -> np.ndarray:
    raw = np.zeros(a.nbytes + 16, np.uint8)
    out = raw[shift:shift + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


def test_layer_pre_hostile_arguments_decline(llama_layer):
    ctx, l, x, n, packed, zq_rows, cos, sin = llama_layer
    key, cfg, prof = ctx.key, ctx.cfg, ctx.profile
    zf = packed["qkv"]
    honest = layer.pre(key, cfg, prof, l, x, zf, zq_rows, cos, sin)
    assert honest is not None
    bad = {
        "x f64": (x.astype(np.float64), zf, zq_rows, cos, sin),
        "x strided": (np.repeat(x, 2, axis=0)[::2], zf, zq_rows, cos, sin),
        "x no rows": (x[:0], None, None, cos[:0], sin[:0]),
        "x one row short": (x[:-1], zf, zq_rows, cos[:-1], sin[:-1]),
        "sample more than x": (x[:2], None, zq_rows, cos[:2], sin[:2]),
        "z width 0": (x, zf[..., :0], zq_rows, cos, sin),
        "z width 9": (x, np.concatenate([zf, zf[..., :5]], -1), zq_rows, cos, sin),
        "z int8": (x, zf.view(np.int8), zq_rows, cos, sin),
        "z fortran": (x, np.asfortranarray(zf), zq_rows, cos, sin),
        "widths differ": (x, zf[..., :3].copy(), zq_rows, cos, sin),
        "cos short": (x, zf, zq_rows, cos[:, :-1].copy(), sin),
        "cos f64": (x, zf, zq_rows, cos.astype(np.float64), sin),
        "no qkv rows": (x, None, zq_rows, cos, sin),
    }
    for name, args in bad.items():
        assert layer.pre(key, cfg, prof, l, *args) is None, name
    # the same values in other layouts: the same bits, or declined (never other bits)
    for name, args in {"rows all in the sample part": (x, zf[:0], np.concatenate([zf, zq_rows]),
                                                       cos, sin),  # (the step route concatenates)
                       "x misaligned": (_misaligned_copy(x), zf, zq_rows, cos, sin),
                       "z misaligned": (x, _misaligned_copy(zf, 3), _misaligned_copy(zq_rows, 5),
                                        cos, sin),
                       "cos misaligned": (x, zf, zq_rows, _misaligned_copy(cos, 2), sin)}.items():
        got = layer.pre(key, cfg, prof, l, *args)
        assert got is None or _same(got[0], honest[0]), name


def test_layer_post_hostile_arguments_decline(llama_layer):
    ctx, l, x, n, packed, zq_rows, cos, sin = llama_layer
    key, cfg, prof = ctx.key, ctx.cfg, ctx.profile
    rng = np.random.default_rng(2)
    o = rng.standard_normal((n, cfg.q_size)).astype(np.float32)
    xs = np.ascontiguousarray(x[:n])
    ref = layer.post(key, cfg, prof, l, o, xs, packed)
    assert ref is not None or True  # random o: Freivalds fails -> None; shapes are the point
    for name, (oo, xx, pk) in {
            "o f64": (o.astype(np.float64), xs, packed),
            "o wide": (np.ones((n, cfg.q_size + 1), np.float32), xs, packed),
            "x strided": (o, np.repeat(xs, 2, axis=0)[::2], packed),
            "x rows": (o, xs[:-1], packed),
            "no down": (o, xs, {k: v for k, v in packed.items() if k != "down"}),
            "o rows short": (o, xs, dict(packed, o=packed["o"][:-1])),
            "gate_up width 9": (o, xs, dict(packed, gate_up=np.zeros(
                packed["gate_up"].shape[:2] + (9,), np.uint8))),
            "down not uint8": (o, xs, dict(packed, down=packed["down"].astype(np.int16))),
            "no rows": (o[:0], xs[:0], {k: v[:0] for k, v in packed.items()})}.items():
        assert layer.post(key, cfg, prof, l, oo, xx, pk) is None, name


def test_layer_post_on_consistent_rows_equals_step_route_in_any_layout(llama_flow):
    """layer.post with an honest layer's o (the attention's output) answers, and a strided o or
    misaligned x / packed rows give the same bits or decline."""
    got = _capture(llama_flow)
    ctx, l, resid, kv, z, zq = got[1]
    tables = _rebuild_dense(llama_flow.qm, ctx, l, resid, kv, z, zq, {})
    resid2, kv2, z2, zq2 = tables
    pos, n, packed, zq_rows = replay._positions(z2, zq2, l)
    x = replay._rows(resid2[l], pos)
    cos, sin = ctx.rope.lookup(pos)
    q, k, v = layer.pre(ctx.key, ctx.cfg, ctx.profile, l, x, packed["qkv"], zq_rows, cos, sin)[0]
    o = replay._attend(_fresh(ctx), l, pos, n, q, k, v, kv2, time.perf_counter())
    want = layer.post(ctx.key, ctx.cfg, ctx.profile, l, o, x[:n], packed)
    assert want is not None and np.array_equal(want[0], replay._rows(resid2[l + 1], pos[:n]))
    strided = np.repeat(o, 2, axis=1)[:, ::2]
    for oo, xx, pk in ((strided, x[:n], packed), (o, _misaligned_copy(x[:n]), packed),
                       (o, x[:n], {k_: _misaligned_copy(a, 1) for k_, a in packed.items()})):
        g = layer.post(ctx.key, ctx.cfg, ctx.profile, l, oo, xx, pk)
        assert g is None or g[0].tobytes() == want[0].tobytes()
