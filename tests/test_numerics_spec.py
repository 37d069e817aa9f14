"""Properties of the numerics spec itself (verifier/numerics, numpy only): its constants and
tables against high-precision math, its accuracy against float64 formulas, its determinism, and
the decode policy's exact rules. Tolerances appear only where the spec is compared with real math,
each with the reason for its size; nothing here compares two implementations.
"""

from __future__ import annotations

import math
from fractions import Fraction

import blake3
import mpmath
import numpy as np
import pytest
from commitllm.verifier.config import ModelConfig, RopeScaling
from commitllm.verifier.numerics import PROFILES, SPEC_VERSION, get_profile, profiles, quant
from commitllm.verifier.numerics import attention as spec_attn
from commitllm.verifier.numerics import exp2 as spec_exp2
from commitllm.verifier.numerics import norm as spec_norm
from commitllm.verifier.numerics import rope as spec_rope
from commitllm.verifier.numerics import sampler as spec_sampler
from commitllm.verifier.numerics.sampler import SamplingParams

F32 = np.float32
ULP1 = 2.0**-24  # relative half-ulp bound of a correctly rounded fp32 result (unit roundoff)


def nearest_f32(x: mpmath.mpf) -> np.float32:
    """The fp32 nearest to the real x (ties to even), from a 200-bit mpmath value."""
    with mpmath.workprec(200):
        m, e = mpmath.frexp(x)  # x = m 2^e, 0.5 <= |m| < 1
        return F32(float(mpmath.ldexp(mpmath.nint(m * 2**24), e - 24)))


# ---------------------------------------------------------------- profiles and constants

def test_version_and_profiles():
    assert SPEC_VERSION == "commitllm-numerics/3"
    assert profiles.QMAX16 == 127 * 257 == 32639 and profiles.QMAX8 == 127
    # 127*257 = 127*256 + 127: the largest magnitude whose planes hi, lo both fit [-128, 127]
    for v in (32639, -32639):
        hi, lo = quant.split_planes(np.array([v]))
        assert -128 <= hi[0] <= 127 and -128 <= lo[0] <= 127
    with pytest.raises(OverflowError):
        quant.split_planes(np.array([32640]))
    want = {"w8a16": (127, 32639, 32639), "w16a16": (32639, 32639, 32639), "a8": (127, 127, 127)}
    assert {n: (p.weight_qmax, p.act_qmax, p.kv_qmax) for n, p in PROFILES.items()} == want
    assert [get_profile(n).weight_bits for n in ("w8a16", "w16a16", "a8")] == [8, 16, 8]
    with pytest.raises(ValueError, match="w8a16"):
        get_profile("fp8")


EXP2_COEF_HEX = ["0x3f800000", "0x3f317218", "0x3e75fdf0", "0x3d635847", "0x3c1d955b",
                 "0x3aaec3ff", "0x39218489", "0x377fe5fe"]  # as docs/NUMERICS.md lists them


def test_fp32_constants_are_nearest_to_their_real_values():
    c = spec_exp2.exp2_coefficients()
    assert [hex(int(v)) for v in c.view(np.uint32)] == EXP2_COEF_HEX
    with mpmath.workprec(200):
        ln2, log2e = mpmath.log(2), 1 / mpmath.log(2)
        for k in range(spec_exp2.EXP2_DEGREE + 1):
            assert c[k] == nearest_f32(ln2**k / mpmath.factorial(k)), k
        assert spec_exp2.NEG_LOG2E == nearest_f32(-log2e)
        assert spec_sampler.LOG2E == nearest_f32(log2e)
        for d in range(1, 1025):  # every head size in use; float64 steps do not double-round here
            assert spec_attn.score_scale(d) == nearest_f32(log2e / mpmath.sqrt(d)), d
    assert hex(int(F32(spec_exp2.NEG_LOG2E).view(np.uint32))) == "0xbfb8aa3b"
    assert hex(int(spec_attn.score_scale(64).view(np.uint32))) == "0x3e38aa3b"
    assert hex(int(spec_attn.score_scale(128).view(np.uint32))) == "0x3e0293ee"


# ---------------------------------------------------------------- softmax table

def test_softmax_table_is_nearest_integer():
    t = spec_exp2.softmax_table()
    assert t.dtype == np.int64 and t.shape == (256,) and t[0] == 2**15
    assert np.all(np.diff(t) < 0)
    assert t.sum() == 6059301 and t[[1, 128, 255]].tolist() == [32679, 23170, 16428]  # as documented
    with mpmath.workprec(300):
        for f in range(256):
            exact = mpmath.mpf(2) ** (15 - mpmath.mpf(f) / 256)
            assert abs(t[f] - exact) < 0.5, f
            assert abs(abs(t[f] - exact) - 0.5) > 1e-6, f  # far from a tie: the check is decisive
    # and by integers alone: (2t - 1)^256 < 2^(4096 - f) < (2t + 1)^256
    for f, v in enumerate(t.tolist()):
        assert (2 * v - 1) ** 256 < 2 ** (4096 - f) < (2 * v + 1) ** 256


def test_table_weights_shape():
    tw = spec_exp2.table_weights
    d = np.arange(1 << 14, dtype=np.int64)
    w = tw(d)
    assert w[0] == 2**15 and np.all(np.diff(w) <= 0)  # non-increasing across octaves too
    assert np.array_equal(tw(d + 256), w >> 1)
    assert tw(np.array([3840, 3841, 2**31]))[:].tolist() == [1, 0, 0]  # below 2^-15: dropped


# ---------------------------------------------------------------- exp2 and SiLU

def test_round_half_even_ties():
    y = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 8388607.5, -8388607.5, 3.2, -3.7], F32)
    assert spec_exp2.round_half_even(y).tolist() == [0, 2, 2, 0, -2, -2, 8388608, -8388608, 3, -4]


def test_exp2_accuracy():
    rng = np.random.default_rng(0)
    y = np.concatenate([np.linspace(-64, 64, 1 << 20, dtype=F32),
                        rng.uniform(-64, 64, 1 << 18).astype(F32),
                        np.arange(-64, 64, dtype=F32) + F32(0.5)])
    got = spec_exp2.exp2(y).astype(np.float64)
    rel = np.abs(got / np.exp2(y.astype(np.float64)) - 1)
    # f = y - n is exact, the truncated series is off by (ln2/2)^8/8! = 5e-9 = 0.08 ULP1, the last
    # Horner add rounds by <= 1 ULP1 and earlier roundings are damped by |f| <= 1/2; 2^n is exact.
    # Observed 1.55 ULP1.
    assert rel.max() <= 2 * ULP1, (rel.max() / ULP1, y[rel.argmax()])
    n = np.arange(-64, 65, dtype=F32)
    assert np.array_equal(spec_exp2.exp2(n), np.ldexp(F32(1), n.astype(np.int32)))  # exact


def test_silu_accuracy():
    rng = np.random.default_rng(1)
    edge = 64 / math.log2(math.e)  # 44.36: beyond it |g * log2 e| is clamped to 64
    g = np.concatenate([np.linspace(-44.3, 44.3, 1 << 18), rng.standard_normal(1 << 16) * 8])
    g = g.astype(F32)
    g64 = g.astype(np.float64)
    ref = g64 / (1 + np.exp(-g64))
    got = spec_exp2.silu(g).astype(np.float64)
    nz = ref != 0
    rel = np.abs(got[nz] / ref[nz] - 1)
    # y = g * -log2 e carries <= 1.5 ULP1 relative error (the fp32 constant, then the product),
    # so 2^y is off by ln2 * 1.5 * |y| ULP1 (the bulk: 33 ULP1 observed at g = -44); exp2 adds 2,
    # 1 + 2^y and the division 1 each.
    bound = (1.04 * np.abs(g64[nz]) * math.log2(math.e) + 4) * ULP1
    assert np.all(rel <= bound), (np.max(rel / bound), g[nz][np.argmax(rel / bound)])
    assert np.array_equal(got[g == 0], g64[g == 0])
    big = np.array([edge + 0.01, 60, 1e3, 1e30], F32)
    assert np.array_equal(spec_exp2.silu(big), big)  # 1 + 2^-64 == 1 in fp32
    # below -44.36 the clamp makes silu(g) = g * 2^-64 exactly, not g * e^g: absolute error
    # <= |g| 2^-64, i.e. 5e-18 at g = -100
    neg = np.array([-edge - 0.01, -60, -100, -1e6], F32)
    assert np.array_equal(spec_exp2.silu(neg), neg * F32(2.0**-64))


# ---------------------------------------------------------------- RMSNorm

def _norm_rows(rng, h: int) -> np.ndarray:
    rows = [rng.standard_normal(h), rng.standard_normal(h) * 1e-40, rng.standard_normal(h) * 1e35,
            np.where(np.arange(h) == 0, 1e4, rng.standard_normal(h) * 1e-2),  # one outlier
            rng.standard_normal(h) * 2.0 ** rng.uniform(-30, 0, h),  # wide dynamic range
            np.full(h, 1 - 2**-24)]
    return np.array(rows, dtype=F32)


def test_exact_sum_squares_matches_python_integers():
    rng = np.random.default_rng(2)
    x = _norm_rows(rng, 77)
    ss, e = spec_norm.exact_sum_squares(x)
    for row, s_row, e_row in zip(x.tolist(), ss.tolist(), e.tolist()):
        e_py = math.frexp(max(abs(v) for v in row))[1]
        big = [round(v * 2.0 ** (23 - e_py)) for v in row]  # exact float64, round half to even
        assert e_row == e_py and s_row == sum(b * b for b in big)
        assert max(abs(b) for b in big) <= 2**23  # 2^23 is reached: (1 - 2^-24) 2^23 ties up


@pytest.mark.parametrize("h", [1, 7, 576, 4096])
def test_rmsnorm_accuracy(h):
    rng = np.random.default_rng(h)
    x, eps = _norm_rows(rng, h), 1e-6
    r = spec_norm.rms_scale(x, eps).astype(np.float64)
    x64 = x.astype(np.float64)
    ms = np.array([math.fsum(v * v for v in row) for row in x64]) / h  # squares exact in float64
    ref = 1 / np.sqrt(ms + float(F32(eps)))
    # Error sources: the fixed point X = rint(x 2^(23-e)) moves each X by <= 1/2, so the sum of
    # squares moves by <= sum|X| + H/4 (relative to ss; halved by the sqrt), the final fp32
    # rounding by <= ULP1, float64 steps by ~1e-15.
    ss, e = spec_norm.exact_sum_squares(x)
    big = np.rint(x64 * np.ldexp(1.0, 23 - e)[:, None])
    ss_err = (np.abs(big).sum(axis=1) + h / 4) / np.maximum(ss.astype(np.float64), 1)
    bound = ULP1 + 0.5 * ss_err + 1e-14
    rel = np.abs(r / ref - 1)
    assert np.all(rel <= bound), rel / bound
    w = np.linspace(0.5, 2, h, dtype=F32)
    y = spec_norm.rmsnorm(x, w, eps).astype(np.float64)
    y_ref = x64 * ref[:, None] * w
    nz = np.abs(y_ref) >= np.finfo(F32).tiny
    # two more fp32 roundings; subnormal outputs (the 1e-40 row: eps dominates, r = 1000) have
    # fewer significant bits and are left out
    limit = np.broadcast_to((bound + 2 * ULP1)[:, None], y.shape)
    assert np.all(np.abs(y[nz] / y_ref[nz] - 1) <= limit[nz])


def test_rmsnorm_at_max_width_stays_finite():
    x = np.full((1, spec_norm.MAX_NORM_WIDTH), F32(1 - 2**-24))
    with np.errstate(invalid="ignore"):
        r = spec_norm.rms_scale(x, 1e-5)
    assert np.isfinite(r).all() and abs(float(r[0]) - 1) < 1e-4


def test_int64_to_f64_is_correctly_rounded():
    rng = np.random.default_rng(3)
    v = np.concatenate([rng.integers(-(2**63), 2**63 - 1, 5000, dtype=np.int64),
                        np.array([2**53 + 1, 2**54 + 2, 2**54 + 6, -(2**63), 2**63 - 1])])
    assert np.array_equal(spec_norm.int64_to_f64(v), [float(int(i)) for i in v])


# ---------------------------------------------------------------- quantization

def test_quantize_rows_reconstruction():
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((50, 257)) * 10.0 ** rng.uniform(-30, 30, (50, 1))).astype(F32)
    for qmax in (127, 32639):
        q, s = quant.quantize_rows(x, qmax)
        assert np.all(np.max(np.abs(q.astype(np.int64)), axis=1) == qmax)  # the max hits qmax
        err = np.abs(x.astype(np.float64) - q.astype(np.float64) * s[:, None])
        # |x/s - q| <= 1/2 plus the fp32 rounding of x/s (<= qmax ULP1 absolute)
        assert np.all(err <= s[:, None].astype(np.float64) * (0.5 + qmax * 2 * ULP1))


# ---------------------------------------------------------------- RoPE table

def _cfg(d: int, theta: float, scaling: RopeScaling | None = None) -> ModelConfig:
    return ModelConfig(family="llama", vocab_size=16, hidden_size=d, intermediate_size=8,
                       num_layers=1, num_heads=1, num_kv_heads=1, head_dim=d, rms_norm_eps=1e-5,
                       rope_theta=theta, max_position_embeddings=131072, tie_word_embeddings=False,
                       attention_bias=False, rope_scaling=scaling)


LLAMA3 = _cfg(128, 500000.0, RopeScaling(8.0, 1.0, 4.0, 8192))
SMOL = _cfg(64, 100000.0)


@pytest.fixture(scope="module")
def llama3_table() -> spec_rope.RopeTable:
    t = spec_rope.RopeTable(LLAMA3)
    t.ensure(4096)
    return t


def _rotate(table: spec_rope.RopeTable, p: int) -> tuple[np.ndarray, np.ndarray]:
    """Naive twin of build_table for one position: the same float64 ops in the same order."""
    c, s = np.ones(len(table.freqs)), np.zeros(len(table.freqs))
    for b in range(spec_rope.POSITION_BITS):
        if (p >> b) & 1:
            cb, sb = table.cos_b[b], table.sin_b[b]
            c, s = (c * cb) - (s * sb), (s * cb) + (c * sb)
    return c.astype(F32), s.astype(F32)


def test_rope_table_naive_twin(llama3_table):
    for p in (0, 1, 2, 3, 255, 1000, 2047, 4095):
        c, s = _rotate(llama3_table, p)
        assert np.array_equal(c, llama3_table.cos[p]) and np.array_equal(s, llama3_table.sin[p])
    assert np.all(llama3_table.cos[0] == 1) and np.all(llama3_table.sin[0] == 0)


def test_rope_table_accuracy(llama3_table):
    rng = np.random.default_rng(5)
    positions = [1, 2, 3, 1000, 4095, 32767, 131071, 2**20 + 12345, 2**24 - 1]
    positions += rng.integers(0, 2**24, 6).tolist()
    freqs = llama3_table.freqs
    worst = 0.0
    with mpmath.workprec(80):
        for p in positions:
            c, s = _rotate(llama3_table, p)
            for i in range(0, len(freqs), 3):
                a = p * mpmath.mpf(float(freqs[i]))  # the table's angle: exactly p * f_i
                worst = max(worst, abs(float(c[i]) - float(mpmath.cos(a))),
                            abs(float(s[i]) - float(mpmath.sin(a))))
    # fp32 rounding of a value in [-1, 1] is <= 2^-25; 24 float64 rotations add < 1e-14
    assert worst <= 2.0**-25 + 1e-13, worst


def test_rope_table_deterministic():
    a, b = spec_rope.RopeTable(SMOL), spec_rope.RopeTable(SMOL)
    a.ensure(3000)
    b.ensure(300)
    b.ensure(1000)
    b.ensure(3000)  # grown in steps: 300 -> 1000 -> 3000
    assert a.digest() == b.digest() and len(a.cos) == len(b.cos) == 3000
    assert a.cos.tobytes() == b.cos.tobytes() and a.sin.tobytes() == b.sin.tobytes()
    c, s = spec_rope.build_table(a.cos_b, a.sin_b, 5000)
    assert np.array_equal(c[:3000], a.cos) and np.array_equal(s[:3000], a.sin)  # prefix-stable
    assert spec_rope.RopeTable(_cfg(64, 100001.0)).digest() != a.digest()
    assert spec_rope.RopeTable(LLAMA3).digest() != spec_rope.RopeTable(_cfg(128, 500000.0)).digest()


def test_rope_table_digests_pinned():
    """The digests docs/NUMERICS.md lists; a change (code, mpmath rounding) must be deliberate."""
    assert spec_rope.RopeTable(SMOL).digest() == (
        "f353fed55629cb7374b2f7095e25217b8dd4bd37b3e31edb31c6b9c9e117a5ae")
    assert spec_rope.RopeTable(LLAMA3).digest() == (
        "f24c15ba746eab130553fdb904de4250183ed1079bd7f8f9fee5a1c42ba31055")


def test_rope_table_position_limit():
    t = spec_rope.RopeTable(_cfg(8, 10000.0))
    with pytest.raises(ValueError):
        t.ensure(2**spec_rope.POSITION_BITS + 1)


# ---------------------------------------------------------------- attention

def _qkv(rng, t, s, nh, nkv, d, qmax, temp=1.0, spread=0.5):
    def rows(n, h, scale=1.0):
        x = rng.standard_normal((n, h, d)) * scale * 10.0 ** rng.uniform(-spread, spread, (n, h, 1))
        return quant.quantize_rows(x.astype(F32), qmax)
    return rows(t, nh, temp), rows(s, nkv), rows(s, nkv)


def _float_attention(q, sq, k, sk, v, sv, q_pos):
    """float64 softmax attention on the dequantized inputs: [T, nh, d]."""
    nh, nkv, d = q.shape[1], k.shape[1], q.shape[2]
    kh = np.repeat(np.arange(nkv), nh // nkv)
    qf = q * sq[..., None].astype(np.float64)
    kf, vf = (k * sk[..., None].astype(np.float64))[:, kh], (v * sv[..., None].astype(np.float64))[:, kh]
    logits = np.einsum("thd,shd->hts", qf, kf) / math.sqrt(d)
    logits = np.where(np.arange(len(k))[None, None, :] <= q_pos[None, :, None], logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return np.einsum("hts,shd->thd", p / p.sum(-1, keepdims=True), vf), np.abs(vf).max(axis=(0, 2))


@pytest.mark.parametrize("qmax", [127, 32639])
@pytest.mark.parametrize("temp", [0.3, 1.0, 3.0, 30.0])  # flat ... peaky attention
@pytest.mark.parametrize("s", [17, 1000, 4096])
def test_attention_accuracy(qmax, temp, s):
    rng = np.random.default_rng(s + int(temp * 10))
    (q, sq), (k, sk), (v, sv) = _qkv(rng, 4, s, 4, 2, 64, qmax, temp)
    q_pos = np.arange(s - 4, s)
    got = spec_attn.attention(q, sq, k, sk, v, sv, q_pos, qmax).reshape(4, 4, 64)
    ref, vmax = _float_attention(q, sq, k, sk, v, sv, q_pos)
    err = np.abs(got - ref).max(axis=-1) / vmax[None, :]  # [T, nh], relative to the largest value
    # Each logit is rounded to 1/256 in log2 units, so each normalized weight is within a factor
    # 2^(+-1/512) of exact and the output (a convex combination) within 2 (2^(1/512) - 1) = 2.7e-3
    # of max|V|. Table rounding (2^-16), weights floored to integers and 15-bit coefficients add
    # ~1/Z per key; observed worst 1.5e-3.
    assert err.max() <= 2 * (2 ** (1 / 512) - 1), err.max()


def test_attention_rows_are_independent():
    """Prefill row t equals a decode of row t over keys 0..t: attention is per query row."""
    rng = np.random.default_rng(6)
    (q, sq), (k, sk), (v, sv) = _qkv(rng, 23, 23, 6, 2, 16, 32639, temp=3.0)
    full = spec_attn.attention(q, sq, k, sk, v, sv, np.arange(23), 32639)
    for t in (0, 1, 11, 22):
        one = spec_attn.attention(q[t:t + 1], sq[t:t + 1], k[:t + 1], sk[:t + 1], v[:t + 1],
                                  sv[:t + 1], np.array([t]), 32639)
        assert np.array_equal(one[0], full[t]), t
    k2, v2 = k.copy(), v.copy()
    k2[12:], v2[12:] = 7, -3  # keys after a query's position cannot change its output
    masked = spec_attn.attention(q, sq, k2, sk, v2, sv, np.arange(23), 32639)
    assert np.array_equal(masked[:12], full[:12])


@pytest.mark.parametrize("qmax", [127, 32639])
def test_attention_single_key_returns_its_value(qmax):
    # w = 2^15, Z = 2^15, c = 2^15: out = ((2^15 V * 2^15 sv) / 2^15) 2^-15 = fp32(V * sv)
    rng = np.random.default_rng(7)
    (q, sq), (k, sk), (v, sv) = _qkv(rng, 1, 1, 3, 1, 32, qmax, spread=3.0)
    parts = {}
    out = spec_attn.attention(q, sq, k, sk, v, sv, np.array([0]), qmax, parts)
    assert np.all(parts["weights"] == 2**15) and np.all(parts["z"] == 2**15)
    want = (v[0].astype(F32) * sv[0][:, None]).astype(F32)  # [1, d]
    assert np.array_equal(out, np.tile(want, (1, 3)))


def test_attention_logits_as_documented():
    rng = np.random.default_rng(8)
    (q, sq), (k, sk), (v, sv) = _qkv(rng, 3, 9, 2, 1, 24, 32639, temp=5.0)
    parts = {}
    spec_attn.attention(q, sq, k, sk, v, sv, np.array([8, 8, 8]), 32639, parts)  # all visible
    scores = q[:, 0].astype(np.int64) @ k[:, 0].astype(np.int64).T  # head 0 [T, S]
    assert np.array_equal(parts["scores"][0], scores)
    t = ((scores.astype(np.float64).astype(F32) * sq[:, :1]) * sk[:, 0][None, :])
    t = t * spec_attn.score_scale(24)
    assert np.array_equal(parts["logits"][0], np.rint(t * F32(256)).astype(np.int64))
    d = parts["logits"][0].max(axis=1, keepdims=True) - parts["logits"][0]
    assert np.array_equal(parts["weights"][0], spec_exp2.table_weights(d))
    assert np.array_equal(parts["z"][0], parts["weights"][0].sum(axis=1))


def test_attention_huge_values_stay_finite():
    v_row = np.array([[[3.0e38, 1.0]]], F32)  # [S=1, nkv=1, d=2]
    v, sv = quant.quantize_rows(v_row, 32639)
    q, sq = np.ones((1, 1, 2), np.int16), np.ones((1, 1), F32)
    with np.errstate(all="ignore"):
        out = spec_attn.attention(q, sq, q.copy(), sq.copy(), v, sv, np.array([0]), 32639)
    assert np.isfinite(out).all() and abs(out[0, 0] / 3.0e38 - 1) < 1e-3


# ---------------------------------------------------------------- decode policy

def test_greedy_ties_to_lowest_id():
    g = spec_sampler.greedy
    assert g(np.array([1, 3, 3, 2], F32)) == 1
    assert g(np.array([-0.0, 0.0, -1], F32)) == 0
    assert g(np.full(7, -5, F32)) == 0
    with pytest.raises(FloatingPointError):
        g(np.array([0, np.nan], F32))
    logits = np.array([0.5, 2.0, 2.0], F32)
    assert spec_sampler.sample(logits, SamplingParams(), position=3) == 1  # temperature 0


def test_sampling_weights_as_documented():
    w = spec_sampler.sampling_weights(np.array([0, -1, 3.5, 3.5], F32), 2.0)
    # u = (l / 2) * log2 e; L = rint(256 u) = [0, -185, 646, 646]; w = table(646 - L)
    table = spec_exp2.softmax_table()
    assert w.tolist() == [table[646 % 256] >> (646 // 256), table[831 % 256] >> (831 // 256),
                          2**15, 2**15]


def test_top_k_and_top_p_keep_sets():
    cand = spec_sampler.candidates
    w = np.array([5, 7, 7, 3, 7, 1], np.int64)  # order: 1, 2, 4 (ties by id), 0, 3, 5
    assert cand(w, 0, 1.0)[0].tolist() == [1, 2, 4, 0, 3, 5]
    assert cand(w, 2, 1.0)[0].tolist() == [1, 2]
    assert cand(w, 4, 1.0)[0].tolist() == [1, 2, 4, 0]
    assert cand(w, 100, 1.0)[0].tolist() == [1, 2, 4, 0, 3, 5]
    # top-p: shortest prefix with S 2^24 >= rint(p 2^24) Z; Z = 16 makes the boundary exact
    w = np.array([1, 4, 2, 4, 4, 1], np.int64)  # order: 1, 3, 4, 2, 0, 5; cum 4, 8, 12, ...
    assert cand(w, 0, 0.5)[0].tolist() == [1, 3]  # S = 8 = 0.5 Z: equality keeps the prefix
    assert cand(w, 0, 0.5 + 2**-24)[0].tolist() == [1, 3, 4]
    assert cand(w, 0, 0.5 - 2**-24)[0].tolist() == [1, 3]
    assert cand(w, 0, 1e-9)[0].tolist() == [1]
    assert cand(w, 0, 0.75)[0].tolist() == [1, 3, 4]
    # top-k first, then top-p against the top-k set's Z = 12
    assert cand(w, 3, 0.5)[0].tolist() == [1, 3]  # S = 4 < 6 <= 8
    # S = 8 is exactly (2/3) Z, but rint((2/3) 2^24) = 11184811 rounds up, so 8 no longer suffices
    assert int(np.rint(np.float64(2 / 3) * 2**24)) * 12 > 8 * 2**24
    assert cand(w, 3, 2 / 3)[0].tolist() == [1, 3, 4]
    _, ws = cand(w, 3, 1.0)
    assert ws.tolist() == [4, 4, 4]


def test_draw_is_blake3_of_domain_seed_nonce_position():
    for seed, pos, nonce in ((0, 0, ""), (2**64 - 1, 7, "n-1"), (12345, 2**40, "\u00e9\u4e16")):
        h = blake3.blake3(b"commitllm/nonce/v1\x00" + nonce.encode("utf-8")).digest()
        msg = (b"commitllm/sample/v2\x00" + seed.to_bytes(8, "little") + h
               + pos.to_bytes(8, "little"))
        want = int.from_bytes(blake3.blake3(msg).digest()[:8], "little")
        assert spec_sampler.draw(seed, pos, nonce) == want
    draws = {spec_sampler.draw(1, p) for p in range(2000)}
    assert len(draws) == 2000 and spec_sampler.draw(1, 5) != spec_sampler.draw(2, 5)
    assert spec_sampler.draw(1, 5, "a") != spec_sampler.draw(1, 5, "b")


def test_sampling_is_deterministic_and_positions_differ():
    rng = np.random.default_rng(9)
    logits = rng.standard_normal(1000).astype(F32) * 2
    params = SamplingParams(temperature=0.8, top_k=50, top_p=0.9, seed=42)
    a = [spec_sampler.sample(logits, params, p) for p in range(200)]
    assert a == [spec_sampler.sample(logits, params, p) for p in range(200)]
    assert len(set(a)) > 10  # positions draw independently
    kept = set(spec_sampler.candidates(spec_sampler.sampling_weights(logits, 0.8), 50, 0.9)[0])
    assert set(a) <= kept
    other = [spec_sampler.sample(logits, SamplingParams(0.8, 50, 0.9, seed=43), p)
             for p in range(200)]
    assert other != a


def test_sampling_frequencies_match_integer_weights():
    logits = np.array([0.0, -0.3, -0.7, -1.2, -2.0, -3.0, -5.0, -40.0], F32)
    params = SamplingParams(temperature=1.0, seed=7)
    w = spec_sampler.sampling_weights(logits, 1.0)
    assert w[-1] == 0  # 40 / ln2 = 57.7 log2 units below the max: below 2^-15, never drawn
    n = 20000
    counts = np.bincount([spec_sampler.sample(logits, params, p) for p in range(n)], minlength=8)
    assert counts[-1] == 0
    expect = n * w / w.sum()
    live = expect > 0
    chi2 = float(np.sum((counts[live] - expect[live]) ** 2 / expect[live]))
    # 6 degrees of freedom: P(chi2 > 22.46) = 1e-3 for a fair sampler; seed fixed, so not flaky
    assert chi2 < 22.46, (chi2, counts, expect)


def test_multiply_shift_stays_in_range():
    for total in (1, 3, 2**15, 2**33 + 7):
        for x in (0, 1, 2**63, 2**64 - 1):
            r = (x * total) >> 64
            assert 0 <= r < total


@pytest.mark.parametrize("kwargs", [
    {"temperature": -1.0}, {"temperature": float("nan")}, {"temperature": float("inf")},
    {"top_k": -1}, {"top_k": 2.0}, {"top_k": True}, {"top_p": 0.0}, {"top_p": 1.5},
    {"top_p": float("nan")}, {"seed": -1}, {"seed": 2**64}, {"temperature": 1e-40},
    {"temperature": 1e-50}, {"temperature": 1e39}, {"temperature": True}, {"top_p": True},
    {"nonce": b"bytes"}])
def test_sampling_params_validation(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_sampling_params_accepts_edges():
    p = SamplingParams(temperature=1e-6, top_k=0, top_p=1.0, seed=2**64 - 1)
    assert not p.greedy and SamplingParams().greedy
    assert p.manifest() == {"temperature": 1e-6, "top_k": 0, "top_p": 1.0}


def test_sampling_params_rejects_non_integer_seed():
    with pytest.raises(ValueError):
        SamplingParams(temperature=1.0, seed=1.5)


def test_top_p_integer_widths():
    """cum << 24 and rint(p 2^24) * Z stay below 2^63 for vocabularies below 2^24 tokens."""
    z_max = (2**24 - 1) * 2**15
    assert (z_max << spec_sampler.TOP_P_BITS) < 2**63
    assert (2**spec_sampler.TOP_P_BITS) * z_max < 2**63
    assert Fraction(int(np.rint(np.float64(0.9) * 2**24)), 2**24) == Fraction(15099494, 2**24)


def test_canonical_logprobs_are_close_to_the_real_ones_and_rank_like_greedy():
    import mpmath
    from commitllm.verifier.numerics import logprobs as L

    rng = np.random.default_rng(3)
    for spread in (0.5, 5.0, 40.0):
        x = (rng.standard_normal(4099) * spread).astype(np.float32)
        x[[7, 11]] = x.max()  # a tie at the top: the lower id ranks first, as greedy picks it
        lp, _ = L.logprobs_of(L.distances(x))
        x64 = x.astype(np.float64)
        ref = x64 - x64.max() - np.log(np.exp(x64 - x64.max()).sum())
        assert np.abs(lp - ref).max() < 1e-5
        assert L.ranked(x, 3)[:2].tolist() == [7, 11] and int(np.argmax(x)) == 7
        e = L.entry(x, 5, 2)
        assert e[0] == lp[5] and e[1] == [[7, lp[7]], [11, lp[11]]]
    for z in (2**30, 2**30 + 1, 3 * 2**40 + 12345, 2**62 - 1):
        want = mpmath.floor(mpmath.log(mpmath.mpf(z) / 2**30, 2) * 2**32)
        assert abs(L.log2_fixed(z) - int(want)) <= 1  # truncated squarings: within one ulp
    with pytest.raises(FloatingPointError):
        L.distances(np.array([0.0, np.inf], dtype=np.float32))
