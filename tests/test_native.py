"""The compiled core (commitllm.verifier.native): the softmax passes of integer attention in C
give the spec's bits, by themselves and inside the engine, with either score width, any thread
split, and its switch off; the build cache is private and the route without a compiler works."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from commitllm.engine.exact import ops  # noqa: E402
from commitllm.verifier import native  # noqa: E402
from commitllm.verifier.numerics import attention as spec_attn  # noqa: E402
from test_numerics_ops import ATTN_CASES, QMAXES, _attn_inputs, _t, assert_same  # noqa: E402

needs_core = pytest.mark.skipif(native.lib() is None, reason=f"no compiled core: {native.error()}")


def _both(qmax, case, spread, tile=None):
    t, s, nh, nkv, d, q_pos = ATTN_CASES[case]
    x = _attn_inputs(qmax, t, s, nh, nkv, d, seed=7, spread=spread)
    q_pos = np.asarray(q_pos, dtype=np.int64)
    out, least = [], ops.NATIVE_MIN_SCORES
    for on in (True, False):
        ops.NATIVE, ops.NATIVE_MIN_SCORES = on, 0  # the core for every size, small ones included
        try:
            out.append(ops.attention(*map(_t, (*x, q_pos)), qmax, tile_elems=tile))
        finally:
            ops.NATIVE, ops.NATIVE_MIN_SCORES = True, least
    return out, spec_attn.attention(*x, q_pos, qmax)


@needs_core
@pytest.mark.parametrize("qmax", QMAXES)
@pytest.mark.parametrize("spread", [1.5, 12.0])  # 12: scores far beyond the logit clamp
@pytest.mark.parametrize("case", sorted(ATTN_CASES))
def test_compiled_attention_equals_torch_route_and_spec(qmax, spread, case):
    assert ops.use_native()
    (fast, slow), want = _both(qmax, case, spread)
    assert_same(fast, want, f"compiled {case}")
    assert_same(slow, want, f"torch route {case}")


@needs_core
@pytest.mark.parametrize("wide", [np.float32, np.float64])
def test_attn_coefs_thread_split_and_width(wide):
    """Rows are independent: 1, 2, 3 and 7 threads give the same bits; exact integer scores given
    as float64 are rounded to fp32 exactly as given as fp32."""
    rng = np.random.default_rng(3)
    rows, keys, rpg = 42, 257, 6
    s = rng.integers(-2**26, 2**26, (rows, keys)).astype(wide)
    sq = rng.uniform(1e-5, 1e-3, rows).astype(np.float32)
    sk = rng.uniform(1e-5, 1e-3, (rows // rpg, keys)).astype(np.float32)
    sv = rng.uniform(1e-3, 2.0, (rows // rpg, keys)).astype(np.float32)
    nvis = rng.integers(1, keys + 1, rows).astype(np.int64)
    table, cut = ops._FULL_TABLE.numpy(), ops._CUT
    args = (sq, sk, sv, rpg, nvis, 0.18, 256.0, table, cut)
    ref = native.attn_coefs(s, *args, n_threads=1)
    for n in (2, 3, 7):
        for a, b in zip(ref, native.attn_coefs(s, *args, n_threads=n)):
            assert a.dtype == b.dtype and np.array_equal(a.view(np.uint8), b.view(np.uint8))
    if wide is np.float64:
        for a, b in zip(ref, native.attn_coefs(s.astype(np.float32), *args, n_threads=1)):
            assert np.array_equal(a.view(np.uint8), b.view(np.uint8))
    c = ref[0]
    for r in range(rows):  # hidden keys get exact zeros, visible ones at most 2^15
        assert not c[r, nvis[r]:].any() and c[r, :nvis[r]].max() == 2**15


@needs_core
def test_attn_coefs_fails_closed():
    """A row whose value scale underflows, a NaN logit and inconsistent shapes raise."""
    table, cut = ops._FULL_TABLE.numpy(), ops._CUT
    s = np.zeros((2, 4), np.float32)
    ones = np.ones(2, np.float32)
    sk = np.ones((1, 4), np.float32)
    nvis = np.full(2, 4, np.int64)
    with pytest.raises(FloatingPointError, match="underflowed"):
        native.attn_coefs(s, ones, sk, np.zeros((1, 4), np.float32), 2, nvis, 1.0, 1.0, table, cut)
    with pytest.raises(FloatingPointError, match="NaN"):
        native.attn_coefs(s, np.full(2, np.nan, np.float32), sk, sk, 2, nvis, 1.0, 1.0, table, cut)
    with pytest.raises(ValueError, match="shapes"):
        native.attn_coefs(s, ones, sk, sk, 3, nvis, 1.0, 1.0, table, cut)
    with pytest.raises(TypeError, match="contiguous"):
        native.attn_coefs(s, ones.astype(np.float64), sk, sk, 2, nvis, 1.0, 1.0, table, cut)


def test_switched_off_or_without_a_compiler_the_engine_still_runs(monkeypatch, tmp_path):
    """COMMITLLM_NATIVE=0, or no C compiler: lib() is None with a reason, and attention takes the
    torch route with the spec's bits."""
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("COMMITLLM_NATIVE", "0")
    assert native.lib() is None and not ops.use_native()
    monkeypatch.setenv("COMMITLLM_NATIVE", "1")
    monkeypatch.setenv("COMMITLLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "_compiler", lambda: None)
    assert native.lib() is None and "no C compiler" in native.error()
    (got, _), want = _both(32767, "prefill_causal", 1.5)
    assert_same(got, want, "torch route without a compiler")


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_build_cache_must_be_private(monkeypatch, tmp_path):
    """A cache folder that others may write to is refused (a planted library would run as us);
    a fresh one is created 0700 and holds the built library."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("COMMITLLM_CACHE", str(shared))
    assert native.lib() is None and "not a private folder" in native.error()
    if native._compiler() is None:
        pytest.skip("no C compiler")
    fresh = tmp_path / "fresh"
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("COMMITLLM_CACHE", str(fresh))
    assert native.lib() is not None, native.error()
    assert stat.S_IMODE((fresh / "native").stat().st_mode) == 0o700
    assert len(list((fresh / "native").glob("native-*.so"))) == 1


def _coefs_twin(s, sq, sk, sv, rpg, nvis, scale, frac):
    """attn_coefs written with the spec's numpy pieces (what attn.c must equal)."""
    from commitllm.verifier.numerics import exp2 as spec_exp2
    f32 = np.float32
    grp = np.arange(len(s)) // rpg
    with np.errstate(over="ignore"):  # +-3e38 scores overflow to inf, then clamp
        t = (((s.astype(f32) * sq[:, None]) * sk[grp]) * f32(scale)) * f32(frac)
    lg = np.clip(np.rint(t), -spec_attn.LOGIT_CLAMP, spec_attn.LOGIT_CLAMP).astype(np.int64)
    vis = np.arange(s.shape[1])[None, :] < nvis[:, None]
    lg = np.where(vis, lg, -spec_attn.LOGIT_CLAMP - 1)
    w = np.where(vis, spec_exp2.table_weights(lg.max(axis=1, keepdims=True) - lg), 0)
    p = (w.astype(f32) * f32(2.0**-15)) * sv[grp]
    m = p.max(axis=1)
    c = np.where(vis, np.rint((p / m[:, None]) * f32(2**15)), 0).astype(np.float64)
    return c, w.sum(axis=1), m


@needs_core
@pytest.mark.parametrize("seed", range(4))
def test_attn_coefs_equals_its_numpy_twin_ties_and_clamps_included(seed):
    """Halfway cases round to even in both roundings (logits and coefficients), logits beyond
    +-2^30 clamp, and huge or tiny scales: the C routine equals the spec's formula bit for bit."""
    rng = np.random.default_rng(seed)
    rows, keys, rpg = 12, 64, 3
    s = (rng.integers(-2**12, 2**12, (rows, keys)) + 0.5).astype(np.float32)  # x.5: ties
    s[0, :8] = [2.5, 3.5, -2.5, -0.5, 0.5, -1.5, 1.5, -3.5]
    s[1, :4] = [3e38, -3e38, 2**31, -2**31]  # clamped logits
    sq = np.ones(rows, np.float32)
    sk = np.ones((rows // rpg, keys), np.float32)
    sv = rng.uniform(0.5, 2.0, (rows // rpg, keys)).astype(np.float32)
    # coefficient ties: equal weights (equal logits), p_1 / p_0 = (2k + 1) / 2^16
    s[3] = 7.0
    sv[1] = 1.0
    sv[1, 1:] = (2 * rng.integers(0, 2**15, keys - 1) + 1) / np.float32(2**16)
    nvis = rng.integers(1, keys + 1, rows).astype(np.int64)
    nvis[:4] = keys
    scale, frac = (1.0, 1.0) if seed < 2 else (float(np.float32(0.18033688)), 256.0)
    got = native.attn_coefs(s, sq, sk, sv, rpg, nvis, scale, frac, ops._FULL_TABLE.numpy(),
                            ops._CUT, n_threads=1)
    want = _coefs_twin(s, sq, sk, sv, rpg, nvis, scale, frac)
    for g, w, name in zip(got, want, ("c", "z", "m")):
        assert g.dtype == w.dtype, name
        assert np.array_equal(g.view(np.uint8), w.view(np.uint8)), name


@needs_core
@pytest.mark.parametrize("qmax", QMAXES)
@pytest.mark.parametrize("spread", [1.5, 12.0])
@pytest.mark.parametrize("case", sorted(ATTN_CASES))
def test_verifier_attention_with_the_core_equals_the_spec(qmax, spread, case):
    """What the verifier's replay calls (commitllm.verifier.native.attention) gives the spec's
    bits; the table it builds is the engine's one-gather table."""
    from commitllm.verifier.native import attention as fast
    t, s, nh, nkv, d, q_pos = ATTN_CASES[case]
    x = _attn_inputs(qmax, t, s, nh, nkv, d, seed=11, spread=spread)
    q_pos = np.asarray(q_pos, dtype=np.int64)
    assert_same(fast.attention(*x, q_pos, qmax), spec_attn.attention(*x, q_pos, qmax),
                f"verifier attention {case}")
    table, cut = fast._full_table()
    assert cut == ops._CUT and np.array_equal(table, ops._FULL_TABLE.numpy())


# ---------------------------------------------------------------- attn_fused: the whole attention

def _routes() -> list[int]:
    return list(range(native.best_route() + 1))


def _fused(q, sq, k, sk, v, sv, q_pos, n_threads=None):
    """attn_fused on one sequence in the spec's layout ([T, nh, d] queries, [S, nkv, d] keys)."""
    from commitllm.verifier.native.attention import _full_table
    t_len, nh, d = q.shape
    s_len, nkv, _ = k.shape
    g = nh // nkv
    table, cut = _full_table()
    out, z, m = native.attn_fused(
        np.ascontiguousarray(q.transpose(1, 0, 2)).reshape(nh * t_len, d),
        np.ascontiguousarray(sq.T).reshape(-1), native.pack_keys(k[None]),
        np.ascontiguousarray(sk.T), native.pack_values(v[None]), np.ascontiguousarray(sv.T),
        np.clip(np.tile(np.asarray(q_pos, np.int64) + 1, nh), 0, s_len), g * t_len, d,
        float(spec_attn.score_scale(d)), 256.0, table, cut, n_threads=n_threads)
    return out.reshape(nh, t_len, d).transpose(1, 0, 2).reshape(t_len, nh * d)


@pytest.fixture
def each_route():
    yield _routes()
    native.use_route(-1)


@needs_core
@pytest.mark.parametrize("qmax", QMAXES)
@pytest.mark.parametrize("case", sorted(ATTN_CASES))
def test_attn_fused_every_route_and_thread_split_equals_the_spec(qmax, case, each_route):
    """Plain C, AVX2 and AVX-512 VNNI (those this CPU has), 1, 2 or 3 threads: the spec's bits."""
    t, s, nh, nkv, d, q_pos = ATTN_CASES[case]
    x = _attn_inputs(qmax, t, s, nh, nkv, d, seed=5, spread=12.0 if qmax > 127 else 1.5)
    want = spec_attn.attention(*x, np.asarray(q_pos), qmax)
    for r in each_route:
        assert native.use_route(r) == r
        for n in (1, 2, 3):
            assert_same(_fused(*x, q_pos, n_threads=n), want, f"{case} route {r} threads {n}")


@needs_core
@pytest.mark.parametrize("qmax", QMAXES)
@pytest.mark.parametrize("case", sorted(ATTN_CASES))
def test_attn_fused_rows_equals_attn_fused_every_route(qmax, case, each_route):
    """attn_fused_rows (K/V rows where they lie, packed per group inside the call) against
    attn_fused on pack_keys / pack_values: the same bits on every route and thread split, with
    the K/V rows strided views of a wider array (the opening's leaves) and a sliding window."""
    from commitllm.verifier.native.attention import _full_table
    t, s, nh, nkv, d, q_pos = ATTN_CASES[case]
    q, sq, k, sk, v, sv = _attn_inputs(qmax, t, s, nh, nkv, d, seed=9,
                                       spread=12.0 if qmax > 127 else 1.5)
    wide = np.zeros((s, 2, nkv, d + 3), k.dtype)
    wide[:, 0, :, 1:d + 1], wide[:, 1, :, 2:d + 2] = k, v
    ks, vs = wide[:, 0, :, 1:d + 1], wide[:, 1, :, 2:d + 2]
    g, table, cut = nh // nkv, *_full_table()
    rows = np.ascontiguousarray(q.transpose(1, 0, 2)).reshape(nh * t, d)
    pos = np.tile(np.asarray(q_pos, np.int64), nh)
    nvis = np.clip(pos + 1, 0, s)
    for nlo in (None, np.clip(pos - 2, 0, None)):
        common = (nvis, g * t, d, float(spec_attn.score_scale(d)), 256.0, table, cut)
        for r in each_route:
            assert native.use_route(r) == r
            want = native.attn_fused(rows, np.ascontiguousarray(sq.T).reshape(-1),
                                     native.pack_keys(k[None]), np.ascontiguousarray(sk.T),
                                     native.pack_values(v[None]), np.ascontiguousarray(sv.T),
                                     *common, n_threads=1, nlo=nlo)
            for n in (1, 2, 3):
                got = native.attn_fused_rows(rows, np.ascontiguousarray(sq.T).reshape(-1), ks,
                                             np.ascontiguousarray(sk.T), vs,
                                             np.ascontiguousarray(sv.T), *common, n_threads=n,
                                             nlo=nlo)
                for a, b in zip(got, want):
                    assert a.tobytes() == b.tobytes(), (case, r, n, nlo is None)


@needs_core
def test_attn_fused_rows_refuses_bad_shapes_and_copies_reversed_rows():
    from commitllm.verifier.native.attention import _full_table
    table, cut = _full_table()
    q = np.ones((2, 4), np.int16)
    sk = np.ones((1, 3), np.float32)
    k = np.ones((3, 1, 4), np.int16)
    args = (np.ones(2, np.float32),)
    tail = (np.array([3, 3], np.int64), 2, 4, 1.0, 256.0, table, cut)
    for kk, vv in ((k, k.astype(np.int8)), (k[:, :, :3], k[:, :, :3]), (k[:2], k[:2]),
                   (k.astype(np.int32), k.astype(np.int32))):
        with pytest.raises(ValueError):
            native.attn_fused_rows(q, *args, kk, sk, vv, sk, *tail)
    # reversed rows (negative strides) are read from a copy: the packed route's bits
    k = np.random.default_rng(0).integers(-999, 999, (3, 1, 4)).astype(np.int16)
    want = native.attn_fused(q, *args, native.pack_keys(k[::-1][None]), sk,
                             native.pack_values(k[::-1][None]), sk, *tail)
    got = native.attn_fused_rows(q, *args, k[::-1], sk, k[::-1], sk, *tail)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(got, want))


@needs_core
@pytest.mark.parametrize("d", [1, 7, 64, 300, 512])  # odd, one pair chunk, two chunks (> 256)
def test_attn_fused_worst_magnitudes_stay_exact(d, each_route):
    """Every int16 extreme (-32768 and 32767 in q, k and v) at every head width the bounds allow,
    with more keys than one int32 flush of value sums (128): the integer sums never overflow."""
    rng = np.random.default_rng(d)
    s, t = 300, 3
    q = np.where(rng.random((t, 2, d)) < 0.5, -32768, 32767).astype(np.int16)
    q[0] = 32767  # hi plane 128, lo plane -1 everywhere
    k = np.where(rng.random((s, 1, d)) < 0.5, -32768, 32767).astype(np.int16)
    k[:, :, :] = k[:1]  # equal logits: every coefficient is 2^15, the largest
    v = np.where(rng.random((s, 1, d)) < 0.5, -32768, 32767).astype(np.int16)
    v[:, :, 0] = -32768
    sq = np.full((t, 2), 2.0**-20, np.float32)
    sk = np.full((s, 1), 2.0**-20, np.float32)
    sv = rng.uniform(0.5, 2.0, (s, 1)).astype(np.float32)
    q_pos = np.array([s - 3, s - 2, s - 1])
    want = spec_attn.attention(q, sq, k, sk, v, sv, q_pos, 32767)
    for r in each_route:
        native.use_route(r)
        assert_same(_fused(q, sq, k, sk, v, sv, q_pos), want, f"d={d} route {r}")


@needs_core
def test_key_packing_is_the_same_on_every_route():
    """The whole-block int16 key packing (a 16 x 16 word transpose in AVX-512 registers on route
    2, the scalar loop otherwise) gives the documented layout on every route: dim-pair counts
    around the 16-pair step, key counts around the 16-key block, the opening's [S, H, d] rows
    with strided heads."""
    so = native.lib()
    rng = np.random.default_rng(3)

    def want(k):  # [G, S, d] -> [G, ceil(S / 16), dp / 2, 16, 2]
        g, s, d = k.shape
        dp, nb = d + d % 2, -(-s // 16)
        out = np.zeros((g, nb * 16, dp), np.int16)
        out[:, :s, :d] = k
        return out.reshape(g, nb, 16, dp // 2, 2).transpose(0, 1, 3, 2, 4)

    try:
        for r in range(int(so.attn_best_route()) + 1):
            so.attn_route(r)
            for s, d in ((1024, 128), (33, 64), (16, 32), (17, 30), (48, 34), (5, 7), (64, 96)):
                k = rng.integers(-32768, 32768, (2, s, d)).astype(np.int16)
                assert np.array_equal(native.pack_keys(k), want(k)), (r, s, d)
                kv = rng.integers(-32768, 32768, (s, 3, d)).astype(np.int16)
                assert np.array_equal(native.pack_keys(kv[None]), want(kv.transpose(1, 0, 2))), \
                    (r, s, d)
    finally:
        so.attn_route(-1)


@needs_core
@pytest.mark.parametrize("dtype", [np.int8, np.int16])
def test_pack_reads_any_strides(dtype):
    """pack_keys / pack_values read the cache's [B, S, H, d] layout (and strided views of it)
    into the documented block layouts, zeros in the padding."""
    rng = np.random.default_rng(1)
    big = rng.integers(-100, 100, (2, 37, 3, 10)).astype(dtype)
    x = big[:, ::2, :, 1:8]  # [2, 19, 3, 7], no unit strides left
    g = x.transpose(0, 2, 1, 3).reshape(6, 19, 7).astype(np.int16)
    kp = native.pack_keys(x)
    assert kp.shape == (6, 2, 4, 16, 2) and kp.dtype == np.int16
    want = np.zeros((6, 32, 8), np.int16)
    want[:, :19, :7] = g
    assert np.array_equal(kp, want.reshape(6, 2, 16, 4, 2).transpose(0, 1, 3, 2, 4))
    vp = native.pack_values(x)
    assert vp.shape == (6, 10, 32, 2)
    want = np.zeros((6, 20, 32), np.int16)
    want[:, :19, :7] = g
    assert np.array_equal(vp, want.reshape(6, 10, 2, 32).transpose(0, 1, 3, 2))
    assert np.array_equal(native.pack_keys(g), kp)
    xt = torch.from_numpy(big)[:, ::2, :, 1:8]  # what the engine passes: a strided torch view
    assert np.array_equal(native.pack_keys(xt.numpy()), kp)
    assert np.array_equal(native.pack_values(xt.numpy()), vp)
    with pytest.raises(TypeError):
        native.pack_keys(g.astype(np.int32))


@needs_core
@pytest.mark.parametrize("dtype", [np.int8, np.int16])
@pytest.mark.parametrize("s_len", [32, 35, 1])
def test_pack_whole_blocks_equal_the_layouts(dtype, s_len):
    """Rows whose width is the packed width (d even, a multiple of 32) take attn.c's whole-block
    copies (int16) where the blocks are full; partial blocks and int8 the general loop: both give
    the documented layouts."""
    rng = np.random.default_rng(s_len)
    info = np.iinfo(dtype)
    x = rng.integers(info.min, info.max + 1, (2, s_len, 3, 64)).astype(dtype)
    g = x.transpose(0, 2, 1, 3).reshape(6, s_len, 64).astype(np.int16)
    nb, nv = -(-s_len // 16), -(-s_len // 2)
    want = np.zeros((6, nb * 16, 64), np.int16)
    want[:, :s_len] = g
    assert np.array_equal(native.pack_keys(x),
                          want.reshape(6, nb, 16, 32, 2).transpose(0, 1, 3, 2, 4))
    want = np.zeros((6, nv * 2, 64), np.int16)
    want[:, :s_len] = g
    assert np.array_equal(native.pack_values(x), want.reshape(6, nv, 2, 64).transpose(0, 1, 3, 2))


@needs_core
def test_attn_fused_fails_closed():
    """Inconsistent shapes raise before any C runs; an underflowed value scale raises."""
    q = np.ones((2, 4), np.int16)
    k = np.ones((1, 3, 4), np.int16)
    kp, vp = native.pack_keys(k), native.pack_values(k)
    ones = np.ones((1, 3), np.float32)
    table, cut = ops._FULL_TABLE.numpy(), ops._CUT
    nvis = np.array([3, 3])
    args = (np.ones(2, np.float32), kp, ones, vp)
    with pytest.raises(ValueError, match="shapes"):
        native.attn_fused(q, *args, ones, nvis, 3, 4, 1.0, 256.0, table, cut)  # 2 rows != 1 x 3
    with pytest.raises(ValueError, match="shapes"):
        native.attn_fused(q, *args, np.ones((1, 2), np.float32), nvis, 2, 4, 1.0, 256.0, table,
                          cut)
    with pytest.raises(FloatingPointError, match="underflowed"):
        native.attn_fused(q, *args, np.zeros((1, 3), np.float32), nvis, 2, 4, 1.0, 256.0, table,
                          cut)
    out, z, m = native.attn_fused(q, *args, ones, nvis, 2, 4, 1.0, 256.0, table, cut)
    assert np.array_equal(out, np.ones((2, 4), np.float32)) and list(z) == [3 * 2**15] * 2


@needs_core
@pytest.mark.parametrize("wq, xq", [(127, 127), (127, 32639), (32639, 32639)])
@pytest.mark.parametrize("bias", [False, True])
def test_dequant_planes_equals_the_torch_route(wq, xq, bias):
    """Plane products recombined and dequantized in one C pass: the torch route's int64
    accumulator and fp32 output, every plane count, with and without bias, int32 extremes in the
    plane products (full-range rows) and rows split over threads."""
    from commitllm.engine.exact.gemm import ExactWeight
    g = torch.Generator().manual_seed(wq + xq)
    w = torch.randint(-wq, wq + 1, (70, 300), generator=g).to(
        torch.int16 if wq > 127 else torch.int8)
    w[0] = -wq
    x = torch.randn(37, 300, generator=g)
    x[0] = -1.0  # a row of -qmax against a row of -qmax: the largest products
    qx, sx = ops.quantize_rows(x, xq)
    sw = torch.rand(70, generator=g) * 1e-3 + 1e-6
    b = torch.randn(70, generator=g) if bias else None
    weight = ExactWeight(w, wq)
    want = ops.dequantize(weight.matmul(qx, xq), sx, sw, b)
    parts, nx = weight.plane_products(qx, xq)
    assert parts.shape == (1 if wq <= 127 else 2, nx * 37, 70)
    for n in (1, 2, 3):
        got = native.dequant_planes(parts.numpy(), nx, sx.numpy(), sw.numpy(),
                                    None if b is None else b.numpy(), n_threads=n)
        assert_same(torch.from_numpy(got), want.numpy(), f"threads {n}")
    with pytest.raises(ValueError, match="shapes"):
        native.dequant_planes(parts.numpy(), nx, sx.numpy()[:-1], sw.numpy(), None)


@needs_core
@pytest.mark.parametrize("wdtype", [np.int8, np.int16])
@pytest.mark.parametrize("m, n, k", [(1, 1, 1), (3, 17, 7), (5, 33, 256), (8, 960, 576),
                                     (4, 20, 14336), (17, 40, 1001)])
def test_small_row_gemm_is_exact_on_every_route(wdtype, m, n, k, each_route, monkeypatch):
    """gemm_i16i8 = int64 numpy on every SIMD route and thread split: odd K (a padded pair), N
    off the 16-column blocks, rows off the 4-row tiles, K = 14336 of the largest products (the
    int32 sums of 128 pairs are widened before they can overflow), int16 weights as two planes."""
    rng = np.random.default_rng(m * n + k)
    wv = [-128, 127, 1, 0] if wdtype == np.int8 else [-32639, 32639, 255, -256, 0, 1]
    x = rng.choice(np.array([-32768, 32767, -1, 0, 5], np.int16), (m, k))
    w = rng.choice(np.array(wv, wdtype), (n, k))
    if k == 14336:  # z[0, 0] sums only the largest positive products, z[0, 1] the most negative
        x[0], w[0], w[1] = -32768, wv[0], wv[1]
    want = x.astype(np.int64) @ w.astype(np.int64).T
    wp = native.pack_weight(w)
    assert wp.shape == (1 if wdtype == np.int8 else 2, -(-n // 16), -(-k // 2), 16, 2)
    monkeypatch.setattr(native, "GEMM_SPLIT_WEIGHTS", 0)  # split however small the weight
    x8 = np.clip(x, -128, 127).astype(np.int8)  # a8 activations: int8 rows
    xs = np.repeat(x, 2, axis=1)[:, ::2]  # a strided view: copied into gemm.c's layout
    for r in each_route:
        assert native.use_route(r) == r
        for t in (1, 2, 3):
            got = native.gemm_i16i8(x, wp, n, n_threads=t)
            assert got.dtype == np.int64 and np.array_equal(got, want), f"route {r} threads {t}"
        assert np.array_equal(native.gemm_i16i8(x8, wp, n),
                              x8.astype(np.int64) @ w.astype(np.int64).T), f"int8 x, route {r}"
        assert np.array_equal(native.gemm_i16i8(xs, wp, n), want), f"strided x, route {r}"


@needs_core
def test_small_row_gemm_fails_closed():
    """Shapes that do not match the packed weight, a weight not in its layout, int16 weights
    without int8 planes: errors, not products of the wrong memory."""
    w = np.ones((20, 9), np.int8)
    wp = native.pack_weight(w)
    x = np.ones((2, 9), np.int16)
    assert np.array_equal(native.gemm_i16i8(x, wp, 20), np.full((2, 20), 9))
    for bad_x, bad_n in ((np.ones((2, 11), np.int16), 20), (x, 33), (x, 0), (x, 16),
                         (np.ones((2, 9), np.int32), 20), (np.ones(9, np.int16), 20)):
        with pytest.raises(ValueError):
            native.gemm_i16i8(bad_x, wp, bad_n)
    with pytest.raises(ValueError, match="layout"):
        native.gemm_i16i8(x, wp[0], 20)
    with pytest.raises(ValueError, match="layout"):
        native.gemm_i16i8(x, wp.astype(np.int16), 20)
    with pytest.raises(OverflowError, match="127\\*257"):
        native.pack_weight(np.full((2, 2), 32767, np.int16))
    with pytest.raises(TypeError):
        native.pack_weight(np.ones((2, 2), np.int32))


def test_thread_budget_is_per_thread_and_restored():
    """The verifier's layer threads give their row-split passes a share of the cores; the budget
    holds for the calling thread only and is restored after (nesting included)."""
    import threading

    full = native.threads()
    seen = []
    with native.thread_budget(1):
        assert native.threads() == 1
        with native.thread_budget(3):
            assert native.threads() == 3
        assert native.threads() == 1
        t = threading.Thread(target=lambda: seen.append(native.threads()))
        t.start()
        t.join()
    assert seen == [full] and native.threads() == full


def test_background_build_returns_at_once_and_the_next_process_loads_it(monkeypatch, tmp_path):
    """build_in_background: with no library yet lib() is None at once (the reason says so) and a
    detached process builds it; a later process (fresh state) finds and loads it."""
    import time

    cache = tmp_path / "cache"
    monkeypatch.setenv("COMMITLLM_CACHE", str(cache))
    monkeypatch.setattr(native, "_state", {})
    native.build_in_background()
    t0 = time.perf_counter()
    assert native.lib() is None
    assert time.perf_counter() - t0 < 1.0 and "background" in native.error()
    while not list((cache / "native").glob("native-*.so")):
        assert time.perf_counter() - t0 < 120, "the background build did not finish"
        time.sleep(0.1)
    monkeypatch.setattr(native, "_state", {})
    assert native.lib() is not None  # built by the other process: loaded, not rebuilt
    assert native.use_route(-1) == native.best_route()
