"""The fused route's attention step (attn.c's attn_layer, native/layer.py's `attend`) against the
step route's (replay._attend) and the spec's attention, bit for bit: int8 and int16 K/V, grouped
and plain heads, odd head sizes, sliding windows, K/V sample rows, every score route and thread
split. And what it must not answer: a derived K/V row that differs from the opened one, a row or
a key not opened, a type it does not take. There the step route decides (it raises), and for
float scales the two compare alike (-0 equals +0, NaN equals nothing)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from commitllm.verifier import native, replay
from commitllm.verifier.native import layer
from commitllm.verifier.numerics import attention as spec

pytestmark = pytest.mark.skipif(native.lib() is None, reason="the compiled core is not built")


def _routes() -> list[int]:
    return list(range(int(native.lib().attn_best_route()) + 1))


def _case(rng, heads=4, kv_heads=2, d=16, qmax=127, n=3, sample=2, top=40, window=None,
          extra=()):
    """Derived rows at n challenged positions (below `top`) and `sample` K/V sample positions;
    the opened K/V rows: every key the challenged positions see, the sample's and `extra`,
    with the derived rows in place."""
    dt = np.int8 if qmax <= 127 else np.int16
    full = np.sort(rng.choice(np.arange(top // 2, top), n, replace=False))[::-1]
    full[0] = top - 1
    lo = 0 if window is None else max(0, int(full.min()) - (window - 1))
    seen = set(range(lo, top))
    samp = [p for p in dict.fromkeys(int(x) for x in rng.choice(np.arange(0, top + 20), 40))
            if p not in full][:sample]
    pos = np.array([*full, *samp], np.int64)
    kpos = np.array(sorted(seen | set(samp) | set(extra)), np.int64)
    t, m = len(pos), len(kpos)

    def ints(*shape):
        return rng.integers(-qmax, qmax + 1, size=shape).astype(dt)

    def scales(*shape):
        return rng.uniform(0.5, 2.0, size=shape).astype(np.float32) / qmax
    q, sq = ints(t, heads, d), scales(t, heads)
    k_all, v_all = ints(m, kv_heads, d), ints(m, kv_heads, d)
    sk_all, sv_all = scales(m, kv_heads), scales(m, kv_heads)
    at = np.searchsorted(kpos, pos)
    k, v = (k_all[at].copy(), sk_all[at].copy()), (v_all[at].copy(), sv_all[at].copy())
    cfg = SimpleNamespace(num_heads=heads, num_kv_heads=kv_heads, head_dim=d,
                          sliding_window=window)
    prof = SimpleNamespace(kv_qmax=qmax)
    kv = (kpos, k_all, sk_all, v_all, sv_all)
    return cfg, prof, (q, sq), k, v, pos, n, kv


def _step(cfg, prof, q, k, v, pos, n, kv):
    ctx = replay.Ctx(None, cfg, prof, None, None, replay.Timer())
    return replay._attend(ctx, 0, pos, n, q, k, v, {0: kv}, 0.0)


def _spec(cfg, prof, q, pos, n, kv):
    kpos, k_all, sk_all, v_all, sv_all = kv
    p = pos[:n]
    lo = int(spec.first_visible(p.min(), cfg.sliding_window))
    a, b = int(np.searchsorted(kpos, lo)), int(np.searchsorted(kpos, p.max())) + 1
    return spec.attention(q[0][:n], q[1][:n], k_all[a:b], sk_all[a:b], v_all[a:b], sv_all[a:b],
                          p - lo, prof.kv_qmax, window=cfg.sliding_window)


def _bits(a):
    return a.dtype, a.shape, a.tobytes()


SHAPES = [dict(), dict(qmax=32767), dict(heads=4, kv_heads=4), dict(heads=6, kv_heads=2, d=7),
          dict(heads=3, kv_heads=1, d=9, qmax=32767), dict(n=1, sample=0),
          dict(window=8), dict(window=8, qmax=32767, n=4), dict(window=1, n=2),
          dict(top=300, n=4, sample=3), dict(extra=(55, 60, 71))]


@pytest.mark.parametrize("shape", SHAPES, ids=[str(s) or "plain" for s in SHAPES])
def test_attend_is_the_step_routes_attention(shape):
    rng = np.random.default_rng(len(str(shape)))
    case = _case(rng, **shape)
    cfg, prof, q, k, v, pos, n, kv = case
    want = _step(*case)
    assert _bits(want) == _bits(_spec(cfg, prof, q, pos, n, kv))
    so = native.lib()
    try:
        for r in _routes():
            so.attn_route(r)
            for threads in (1, 2, 3, 7):
                got = layer.attend(*case, n_threads=threads)
                assert got is not None, (shape, r, threads)
                assert _bits(got) == _bits(want), (shape, r, threads)
    finally:
        so.attn_route(-1)


def _tampers(case):
    """(name, the case changed, whether the step route accepts it): every change attend must
    decline unless the step route accepts it, where it must answer alike or decline."""
    cfg, prof, q, k, v, pos, n, kv = case
    kpos, k_all, sk_all, v_all, sv_all = kv
    t = len(pos)

    def with_kv(i, name, fn):
        arrs = [a.copy() for a in (k_all, sk_all, v_all, sv_all)]
        fn(arrs, int(np.searchsorted(kpos, pos[i])))
        return name, (cfg, prof, q, k, v, pos, n, (kpos, *arrs))

    def flip(j, delta):
        def f(arrs, at):
            arrs[j][at].flat[-1] += delta
        return f
    out = []
    for i in (0, n - 1, t - 1):  # a challenged row, the last challenged, the last sample row
        out += [with_kv(i, f"k row {i}", flip(0, 1)), with_kv(i, f"v row {i}", flip(2, -1)),
                with_kv(i, f"sk row {i}", lambda a, at: a[1][at].__setitem__(0, a[1][at][0] * 2)),
                with_kv(i, f"sv row {i}", lambda a, at: a[3][at].__setitem__(-1, -a[3][at][-1]))]
    nan = [a.copy() for a in (k[1], v[1])]
    nan[0][t - 1, 0] = np.nan
    kk = [a.copy() for a in (k_all, sk_all, v_all, sv_all)]
    kk[1][np.searchsorted(kpos, pos[t - 1]), 0] = np.nan
    out.append(("NaN sk both sides", (cfg, prof, q, (k[0], nan[0]), v, pos, n, (kpos, *kk))))
    # a key the challenged rows see is missing (with keys past them opened: "keys_past", the
    # count alone does not tell); a derived row's position is not opened
    lo = int(spec.first_visible(pos[:n].min(), cfg.sliding_window))
    gap = int(np.searchsorted(kpos, lo)) + 1
    drop = np.ones(len(kpos), bool)
    drop[gap] = False
    out.append(("key gap", (cfg, prof, q, k, v, pos, n,
                            tuple(a[drop] for a in kv))))
    far = pos.copy()
    far[-1] = kpos[-1] + 5
    out.append(("row not opened", (cfg, prof, q, k, v, far, n, kv)))
    return out


@pytest.mark.parametrize("shape", [dict(), dict(qmax=32767, window=8), dict(extra=(45, 52))],
                         ids=["int8", "int16w", "keys_past"])
def test_attend_declines_what_the_step_route_rejects(shape):
    case = _case(np.random.default_rng(5), **shape)
    for name, bad in _tampers(case):
        with pytest.raises(replay.Reject) as e:
            _step(*bad)
        assert e.value.code in ("kv_mismatch", "opening_malformed"), (name, e.value.code)
        for threads in (1, 2):
            assert layer.attend(*bad, n_threads=threads) is None, (name, threads)


def test_attend_and_the_step_route_read_scales_alike():
    """Scales compare as floats on both routes: -0 equals +0 (both answer, the same bits); the
    opened K/V at a wider integer type with the same values: the step route compares values and
    accepts, attend declines (it takes one element size), so the step route decides."""
    case = _case(np.random.default_rng(6), qmax=127)
    cfg, prof, q, k, v, pos, n, kv = case
    kpos, k_all, sk_all, v_all, sv_all = kv
    sk2, skd = sk_all.copy(), k[1].copy()
    at = int(np.searchsorted(kpos, pos[-1]))
    sk2[at, 0], skd[len(pos) - 1, 0] = 0.0, -0.0
    signed = (cfg, prof, q, (k[0], skd), v, pos, n, (kpos, k_all, sk2, v_all, sv_all))
    want = _step(*signed)
    got = layer.attend(*signed)
    assert got is not None and _bits(got) == _bits(want)
    wide = (cfg, prof, q, k, v, pos, n,
            (kpos, k_all.astype(np.int16), sk_all, v_all.astype(np.int16), sv_all))
    assert _step(*wide) is not None
    assert layer.attend(*wide) is None


def test_attend_declines_sizes_it_does_not_take():
    case = _case(np.random.default_rng(7))
    cfg, prof, q, k, v, pos, n, kv = case
    assert layer.attend(*case) is not None
    bad = [(cfg, prof, q, k, v, pos, 0, kv),  # no challenged row
           (cfg, prof, q, k, v, pos, len(pos) + 1, kv),
           (cfg, prof, (q[0][:, :, ::2], q[1]), k, v, pos, n, kv),  # strided, wrong shape
           (cfg, prof, (q[0].astype(np.int32), q[1]), k, v, pos, n, kv),
           (cfg, prof, q, k, v, pos.astype(np.int32), n, kv),
           (SimpleNamespace(**{**vars(cfg), "sliding_window": 0}), prof, q, k, v, pos, n, kv),
           (cfg, prof, q, k, v, pos, n, (kv[0], kv[1][:, :, :-1], *kv[2:]))]
    for i, args in enumerate(bad):
        assert layer.attend(*args) is None, i


def _lower_bound(a, x) -> int:
    lo, hi = 0, len(a)  # attn_layer's search
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if a[mid] < x else (lo, mid)
    return lo


def test_attend_declines_an_unsorted_position_table():
    """Opened positions out of order past the keys the attention reads, one of them a second row
    of a challenged position p: a binary search on an unsorted table can find that copy while the
    attention reads p's row in the sorted part, so the derived-row check and the attention would
    read different rows (here the copy is the honest row, the attended row has V negated).
    attn_layer declines any table that is not strictly increasing; the step route decides."""
    cfg, prof, q, k, v, pos, n, kv = _case(np.random.default_rng(8), top=24, n=2, sample=1)
    kpos, *rows = kv
    m, rng, found = len(kpos), np.random.default_rng(1), None
    for _ in range(20000):
        p = int(pos[rng.integers(n)])
        tail = [int(x) for x in rng.integers(-30, 60, rng.integers(0, 5))]
        tail.insert(int(rng.integers(len(tail) + 1)), p)
        kp = np.array([*kpos, *tail], np.int64)
        if _lower_bound(kp, p) < m or _lower_bound(kp, 0) != 0:
            continue
        if all(kp[min(_lower_bound(kp, x), len(kp) - 1)] == x for x in pos):
            found = p, kp
            break
    assert found is not None  # not vacuous: such a table exists
    p, kp = found
    src = np.array([int(np.searchsorted(kpos, x)) if x in kpos else 0 for x in kp], np.int64)
    bad = [a[src].copy() for a in rows]
    bad[2][int(np.searchsorted(kpos, p))] *= -1
    table = (kp, *bad)
    for threads in (1, 2):
        assert layer.attend(cfg, prof, q, k, v, pos, n, table, n_threads=threads) is None
    dup = np.insert(np.arange(m), 4, 4)  # sorted but one position twice
    assert layer.attend(cfg, prof, q, k, v, pos, n, tuple(a[dup] for a in kv)) is None


def test_attend_declines_positions_beyond_its_limit():
    case = _case(np.random.default_rng(9), window=8)
    cfg, prof, q, k, v, pos, n, kv = case
    assert layer.attend(*case) is not None
    for p, w in (([-1], 8), ([layer._POSITION_LIMIT], 8), ([], layer._POSITION_LIMIT),
                 ([], 2**63 - 1)):
        pp = pos.copy()
        pp[:len(p)] = p
        c2 = SimpleNamespace(**{**vars(cfg), "sliding_window": w})
        assert layer.attend(c2, prof, q, k, v, pp, n, kv) is None, (p, w)


def test_attend_declines_unaligned_arrays():
    """An opening's arrays can lie at any byte offset of its container: attend takes only
    aligned ones (the C reads int64 positions and fp32 scales through typed pointers)."""
    case = _case(np.random.default_rng(10))
    cfg, prof, q, k, v, pos, n, kv = case
    kpos = kv[0]
    buf = np.zeros(kpos.nbytes + 4, np.uint8)
    odd = buf[4:4 + kpos.nbytes].view(np.int64)
    odd[...] = kpos
    assert not odd.flags.aligned
    assert layer.attend(cfg, prof, q, k, v, pos, n, (odd, *kv[1:])) is None
    assert layer.attend(*case) is not None
