"""The in-place, row-blocked numerics (verifier/numerics) and the float64 Freivalds limbs equal
their previous plain formulations bit for bit. The `_ref_*` functions below are those
formulations verbatim (one numpy pass per op, a fresh array each); inputs cover zeros of both
signs, subnormals, values near fp32's top, rounding ties, rows of equal values, widths that are
not multiples of the chunk or block sizes, and enough rows for several row blocks. Floats are
compared as their bit patterns (so -0.0 != +0.0 and NaN payloads count)."""

from __future__ import annotations

import numpy as np
import pytest
from commitllm.verifier.numerics import exp2 as spec_exp2
from commitllm.verifier.numerics import norm as spec_norm
from commitllm.verifier.numerics import quant as spec_quant
from commitllm.verifier.numerics import rope as spec_rope
from commitllm.verifier.numerics.blocks import BLOCK_ELEMS, block_rows, row_blocks

F32 = np.float32
EXACT_F64 = 2**53


# ---------------------------------------------------------------- the previous formulations

def _ref_quantize_rows(x, qmax):
    amax = np.max(np.abs(x), axis=-1)
    if not np.all(np.isfinite(amax)):
        raise FloatingPointError("non-finite value in a row to quantize")
    s = amax / F32(qmax)
    zero = s == 0
    s = np.where(zero, F32(1), s).astype(F32)
    q = np.rint(x / s[..., None])
    q = np.where(zero[..., None], F32(0), np.clip(q, -qmax, qmax))
    return q.astype(spec_quant.int_dtype(qmax)), s


def _ref_int_to_f32(z):
    if np.any((z >= EXACT_F64) | (z <= -EXACT_F64)):
        raise OverflowError("integer beyond 2^53 cannot be converted exactly")
    return z.astype(np.float64).astype(F32)


def _ref_dequantize(z, sx, sw, bias):
    y = (_ref_int_to_f32(z) * sx[:, None]) * sw[None, :]
    if bias is not None:
        y = y + bias[None, :]
    return y.astype(F32)


def _ref_exact_sum_squares(x):
    amax = np.max(np.abs(x), axis=-1)
    _, e = np.frexp(amax)
    e = e.astype(np.int64)
    scale = np.ldexp(np.float64(1), spec_norm.NORM_FRAC_BITS - e)
    big_x = np.rint(x.astype(np.float64) * scale[:, None]).astype(np.int64)
    return np.sum(big_x * big_x, axis=-1), e


def _ref_rmsnorm(x, weight, eps):
    ss, e = _ref_exact_sum_squares(x)
    ms = np.ldexp(spec_norm.int64_to_f64(ss) / np.float64(x.shape[-1]),
                  2 * (e - spec_norm.NORM_FRAC_BITS))
    r = (np.float64(1) / np.sqrt(ms + np.float64(F32(eps)))).astype(F32)
    return ((x * r[:, None]) * weight[None, :]).astype(F32)


def _ref_exp2(y):
    m = np.where(y < 0, -spec_exp2._ROUND_MAGIC, spec_exp2._ROUND_MAGIC).astype(F32)
    n = ((y + m) - m).astype(F32)
    f = (y - n).astype(F32)
    c = spec_exp2.exp2_coefficients()
    p = np.full_like(f, c[spec_exp2.EXP2_DEGREE])
    for k in range(spec_exp2.EXP2_DEGREE - 1, -1, -1):
        p = ((p * f).astype(F32) + c[k]).astype(F32)
    return (p * np.ldexp(F32(1), n.astype(np.int32))).astype(F32)


def _ref_silu(g):
    y = np.clip((g * spec_exp2.NEG_LOG2E).astype(F32), F32(-spec_exp2.SILU_CLAMP),
                F32(spec_exp2.SILU_CLAMP))
    return (g / (F32(1) + _ref_exp2(y))).astype(F32)


def _ref_swiglu(gate, up):
    return (_ref_silu(gate) * up).astype(F32)


# ---------------------------------------------------------------- inputs

def _same(a: np.ndarray, b: np.ndarray) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.kind == "f":
        return np.array_equal(a.view(f"u{a.itemsize}"), b.view(f"u{b.itemsize}"))
    return np.array_equal(a, b)


def _rows(rng, t: int, h: int) -> np.ndarray:
    """t random rows of every scale plus the awkward ones, fp32 [t + 12, h]."""
    rows = [
        np.zeros(h), -np.zeros(h), np.where(np.arange(h) % 2, 0.0, -0.0),
        np.full(h, 3.0), np.full(h, -2.5),  # all equal (and, quantized, exact ties)
        rng.standard_normal(h) * 1e-42,  # subnormal
        rng.standard_normal(h) * 1e-45,  # a few subnormal steps: s underflows to 0
        rng.standard_normal(h) * 1e37,  # near fp32's top
        np.where(rng.random(h) < 0.5, 1e-30, 1e30) * rng.choice([-1, 1], h),
        np.full(h, F32(1 - 2**-24)),
        (rng.integers(-64, 64, h) + 0.5) * 2.0 ** rng.integers(-3, 3),  # halves
        rng.standard_normal(h) * 1e-3 + np.where(np.arange(h) == h // 2, -3e4, 0),
    ]
    rows += [rng.standard_normal(h) * 10.0 ** rng.uniform(-20, 20) for _ in range(t)]
    return np.array(rows, dtype=F32)


WIDTHS = [1, 3, 64, 65, 576, 1001, 4096]


def test_row_blocks_cover_every_row_once():
    for rows, width in [(0, 5), (1, 1), (7, BLOCK_ELEMS), (300, 1001), (5, 10 * BLOCK_ELEMS)]:
        seen = np.concatenate([np.arange(rows)[b] for b in row_blocks(rows, width)] or [[]])
        assert seen.tolist() == list(range(rows))
        assert all(b.stop - b.start <= max(1, block_rows(rows, width))
                   for b in row_blocks(rows, width))


# ---------------------------------------------------------------- quantization

@pytest.mark.parametrize("qmax", [127, 32639])
@pytest.mark.parametrize("h", WIDTHS)
def test_quantize_rows_equals_previous(h, qmax):
    rng = np.random.default_rng(h + qmax)
    x = _rows(rng, max(4, 3 * BLOCK_ELEMS // h), h)  # several row blocks
    with np.errstate(over="ignore", under="ignore"):
        want, got = _ref_quantize_rows(x, qmax), spec_quant.quantize_rows(x, qmax)
    assert _same(got[0], want[0]) and _same(got[1], want[1])


def test_quantize_rows_heads_and_strided_views_equal_previous():
    rng = np.random.default_rng(3)
    qkv = (rng.standard_normal((9, 3 * 4 * 16)) * 10.0 ** rng.uniform(-5, 5, (9, 1))).astype(F32)
    for x in (qkv[:, :64].reshape(9, 4, 16), qkv[:, 64:].reshape(9, 8, 16), qkv[0], qkv[:, ::3]):
        want, got = _ref_quantize_rows(x, 32639), spec_quant.quantize_rows(x, 32639)
        assert _same(got[0], want[0]) and _same(got[1], want[1])
    for bad in (np.array([[1.0, np.inf]], F32), np.array([[np.nan, 0.0]], F32)):
        with pytest.raises(FloatingPointError):
            spec_quant.quantize_rows(bad, 127)


# ---------------------------------------------------------------- dequantization

def _accumulators(rng, t: int, n: int) -> np.ndarray:
    z = rng.integers(-(2**52), 2**52, (t, n)) >> rng.integers(0, 53, (t, n))  # every magnitude
    edge = [0, 2**53 - 1, -(2**53 - 1), 2**24 + 1,  # ends of the range, an fp32 tie
            2**25 + 2, -(2**24 + 3), 2**40 + 2**16]  # ties again (to even)
    z.reshape(-1)[:min(len(edge), z.size)] = edge[:z.size]
    return z


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("tn", [(1, 1), (3, 7), (40, 4097), (9, 28672)], ids=str)
def test_dequantize_equals_previous(tn, with_bias):
    t, n = tn
    rng = np.random.default_rng(t * n)
    z = _accumulators(rng, t, n)
    sx = (2.0 ** rng.uniform(-60, 30, t)).astype(F32)
    sw = (2.0 ** rng.uniform(-60, 30, n) * rng.choice([-1, 1], n)).astype(F32)
    bias = (rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 3, n)).astype(F32) if with_bias \
        else None
    with np.errstate(over="ignore", under="ignore"):
        want = _ref_dequantize(z, sx, sw, bias)
        assert _same(spec_quant.dequantize(z, sx, sw, bias), want)
        # the verifier hands over the float64 copy of z (exact below 2^53)
        assert _same(spec_quant.dequantize(z.astype(np.float64), sx, sw, bias), want)
    assert _same(spec_quant.int_to_f32(z), _ref_int_to_f32(z))
    assert _same(spec_quant.int_to_f32(z[0, 0]), _ref_int_to_f32(z[0, 0]))  # 0-d
    for big in (2**53, -(2**53), 2**63 - 1, -(2**63)):
        with pytest.raises(OverflowError):
            spec_quant.int_to_f32(np.array([[big]]))
        with pytest.raises(OverflowError):
            spec_quant.dequantize(np.array([[big]]), sx[:1], sw[:1], None)


def test_float64_bound_check_is_the_integer_one():
    """replay._linear bounds f64(z): rounding is monotone and bound, bound + 1 are exact, so
    f64(z) > bound exactly when z > bound, for every int64 z."""
    for bound in (4096 * 32639 * 127, 14336 * 32639 * 32639, 2**53 - 1):
        z = np.array([bound, bound + 1, -bound, -bound - 1, 2**53, 2**62, 2**63 - 1, -(2**63),
                      bound - 1, 0], dtype=np.int64)
        zf = z.astype(np.float64)
        assert np.array_equal(zf > bound, z > bound)
        assert np.array_equal(zf < -bound, z < -bound)


# ---------------------------------------------------------------- RMSNorm

@pytest.mark.parametrize("eps", [1e-5, 1e-6])
@pytest.mark.parametrize("h", WIDTHS)
def test_rmsnorm_equals_previous(h, eps):
    rng = np.random.default_rng(h)
    x = _rows(rng, max(4, 3 * BLOCK_ELEMS // h), h)
    weight = (1 + 0.1 * rng.standard_normal(h)).astype(F32)
    with np.errstate(over="ignore", under="ignore"):
        ss, e = spec_norm.exact_sum_squares(x)
        ss_ref, e_ref = _ref_exact_sum_squares(x)
        assert np.array_equal(ss, ss_ref) and np.array_equal(e, e_ref)
        assert _same(spec_norm.rmsnorm(x, weight, eps), _ref_rmsnorm(x, weight, eps))


def test_exact_sum_squares_at_the_largest_terms():
    """Every X = +-2^23 (the row max rounded up): chunk sums reach 64 * 2^46 = 2^52."""
    h = 4096 + 7
    x = np.full((3, h), F32(1 - 2**-24))
    x[1, ::2] *= -1
    x[2, :] = F32(2.0**100) * F32(1 - 2**-24)
    ss, _ = spec_norm.exact_sum_squares(x)
    assert ss.tolist() == [h * 2**46] * 3
    assert np.array_equal(ss, _ref_exact_sum_squares(x)[0])


# ---------------------------------------------------------------- exp2, SiLU, SwiGLU

def test_exp2_equals_previous_on_a_dense_grid():
    """Every 61st fp32 bit pattern in [0, 64] and its negative, every multiple of 1/256 (ties of
    the rounding to n among them), both zeros, and the clamp's ends."""
    pos = np.arange(0, 0x42800001, 61, dtype=np.uint32).view(F32)
    grid = np.arange(-64 * 256, 64 * 256 + 1) / F32(256)
    y = np.concatenate([pos, -pos, grid, [0.0, -0.0, 64.0, -64.0, 0.5, -0.5, 1.5, -1.5]])
    y = y.astype(F32)
    assert _same(spec_exp2.exp2(y), _ref_exp2(y))


def _gates(rng, t: int, f: int) -> np.ndarray:
    g = (rng.standard_normal((t, f)) * 10.0 ** rng.uniform(-3, 2, (t, f))).astype(F32)
    special = np.array([0.0, -0.0, 1e-45, -1e-45, 44.0, -44.4, -45.0, 88.0, -88.0, 3e38,
                        -3e38, np.inf, -np.inf, 0.5, -0.5, 1e-38], F32)
    g.reshape(-1)[:len(special)] = special[:g.size]
    return g


@pytest.mark.parametrize("tf", [(1, 1), (2, 17), (5, 1536), (11, 14336)], ids=str)
def test_swiglu_and_silu_equal_previous(tf):
    t, f = tf
    rng = np.random.default_rng(t * f)
    gu = np.concatenate([_gates(rng, t, f), _gates(rng, t, f)], axis=1)  # the replay's views
    gate, up = gu[:, :f], gu[:, f:]
    with np.errstate(over="ignore", invalid="ignore"):
        assert _same(spec_exp2.swiglu(gate, up), _ref_swiglu(gate, up))
        assert _same(spec_exp2.silu(gate), _ref_silu(gate))
        assert _same(spec_exp2.silu(gate[0]), _ref_silu(gate[0]))  # 1-D


# ---------------------------------------------------------------- RoPE rows

def test_rope_prefetched_rows_equal_the_table():
    from commitllm.verifier.config import ModelConfig

    cfg = ModelConfig(family="llama", vocab_size=16, hidden_size=64, intermediate_size=8,
                      num_layers=1, num_heads=1, num_kv_heads=1, head_dim=64, rms_norm_eps=1e-5,
                      rope_theta=500000.0, max_position_embeddings=131072,
                      tie_word_embeddings=False, attention_bias=False)
    far = np.array([3, 700, 1023, 5000, 70000])
    table = spec_rope.RopeTable(cfg)
    table.ensure(70001)
    got = spec_rope.RopeTable(cfg)
    got.prefetch(far)
    assert len(got.cos) == 0 and len(got._far) == len(far)  # rows only, no table
    for pos in (far[:2], far[1:4], far[[4, 0]]):
        c, s = got.lookup(pos)
        assert _same(c, table.cos[pos]) and _same(s, table.sin[pos])
    many = spec_rope.RopeTable(cfg)
    many.prefetch(np.arange(0, 300, 7))  # many rows: the table is built instead
    assert len(many.cos) >= 294 and len(many._far) == 0
    # a second prefetch merges its rows with the first's (overlap kept once, sorted)
    got.prefetch(np.array([70000, 9, 4000]))
    assert list(got._far) == [3, 9, 700, 1023, 4000, 5000, 70000]
    for pos in (np.array([9, 70000, 3]), np.array([4000, 4000])):
        c, s = got.lookup(pos)
        assert _same(c, table.cos[pos]) and _same(s, table.sin[pos])
    c, s = got.lookup(np.array([70000, 11]))  # one row not prefetched: built, same bits
    assert _same(c, table.cos[[70000, 11]]) and _same(s, table.sin[[70000, 11]])
