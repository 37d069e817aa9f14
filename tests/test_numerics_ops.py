"""Op by op, the torch backend (engine/exact/ops.py, gemm.py) equals the numpy spec
(verifier/numerics) bit for bit: same dtype, same shape, same bytes (so -0.0 != +0.0 here).

Inputs are seeded and cover awkward shapes (length 1, odd, non-powers of two) and the real sizes of
SmolLM2-135M (H=576, F=1536, d=64, 9/3 heads) and Llama-3-8B (H=4096, F=14336, d=128, 32/8 heads).
There is no tolerance anywhere in this file: any difference is a bug in one of the two.

Every test runs on both routes of the torch backend: its own torch ops, and the compiled core
(verifier/native: the elementwise bridge and the attention passes) that the engine takes for CPU
tensors when it is built.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

torch = pytest.importorskip("torch")

from commitllm.engine.exact import gemm, ops
from commitllm.verifier.config import ModelConfig, RopeScaling
from commitllm.verifier.numerics import PROFILES
from commitllm.verifier.numerics import attention as spec_attn
from commitllm.verifier.numerics import exp2 as spec_exp2
from commitllm.verifier.numerics import norm as spec_norm
from commitllm.verifier.numerics import quant as spec_quant
from commitllm.verifier.numerics import rope as spec_rope

F32 = np.float32
QMAXES = sorted({p.act_qmax for p in PROFILES.values()} | {p.kv_qmax for p in PROFILES.values()})
HYP = settings(derandomize=True, deadline=None, max_examples=150,
               suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(autouse=True, scope="module", params=["compiled", "torch"])
def route(request):
    """ops.NATIVE on (the compiled core where it is built) or off (torch ops only)."""
    from commitllm.verifier import native
    if request.param == "compiled" and native.lib() is None:
        pytest.skip(f"no compiled core: {native.error()}")
    before = ops.NATIVE
    ops.NATIVE = request.param == "compiled"
    yield request.param
    ops.NATIVE = before


# ---------------------------------------------------------------- mismatch helper

def _np(v) -> np.ndarray:
    return v.detach().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)


def _bits(a: np.ndarray) -> np.ndarray:
    """Floats as their raw bits (signed zeros and NaN payloads count); integers as they are."""
    if a.dtype.kind == "f":
        return a.view(np.dtype(f"u{a.dtype.itemsize}"))
    return a


def _ulps(a: np.ndarray) -> np.ndarray:
    """Float bits mapped to a monotone integer line, so differences count ulps."""
    i = a.view(np.dtype(f"i{a.dtype.itemsize}")).astype(np.int64)
    return np.where(i < 0, -(i & np.int64(2 ** (8 * a.dtype.itemsize - 1) - 1)), i)


def assert_same(got, want, what: str) -> None:
    """Bit equality; on failure report the count, the first few positions and the worst gap."""
    got, want = _np(got), _np(want)
    assert got.dtype == want.dtype and got.shape == want.shape, (
        f"{what}: got {got.dtype}{got.shape}, want {want.dtype}{want.shape}")
    gb, wb = _bits(got), _bits(want)
    if np.array_equal(gb, wb):
        return
    bad = np.argwhere(gb != wb)
    shown = "; ".join(f"{tuple(int(j) for j in i)}: got {got[tuple(i)]!r} want {want[tuple(i)]!r}"
                      for i in bad[:5])
    if got.dtype.kind == "f":
        gap = f"max ulp gap {int(np.max(np.abs(_ulps(got) - _ulps(want))))}"
    else:
        gap = f"max |diff| {int(np.max(np.abs(got.astype(np.float64) - want)))}"
    raise AssertionError(f"{what}: {len(bad)} of {got.size} values differ ({gap}); {shown}")


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


def _activations(rng, shape, spread: float = 3.0) -> np.ndarray:
    """Normal values, rows scaled by 10^U(-spread, spread), a few outliers 1e3x: fp32."""
    x = rng.standard_normal(shape) * 10.0 ** rng.uniform(-spread, spread, shape[:-1] + (1,))
    x = np.where(rng.random(shape) < 0.002, x * 1e3, x)
    return x.astype(F32)


# ---------------------------------------------------------------- quantize_rows

SHAPES = [(1, 1), (1, 576), (7, 33), (3, 1536), (2, 4096), (2, 14336), (2, 3, 5)]


@pytest.mark.parametrize("qmax", QMAXES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_quantize_rows_random(qmax, shape):
    x = _activations(np.random.default_rng(len(shape) * 1000 + shape[-1]), shape)
    q_np, s_np = spec_quant.quantize_rows(x, qmax)
    q_t, s_t = ops.quantize_rows(_t(x), qmax)
    assert_same(q_t, q_np, "q")
    assert_same(s_t, s_np, "s")


def _edge_rows() -> np.ndarray:
    """Zero rows, -0.0, subnormal rows (s underflows to 0, or s is itself subnormal), fp32 max."""
    tiny = np.float32(1.4e-45)  # the smallest subnormal
    big = np.finfo(F32).max
    rows = [
        np.zeros(9), -np.zeros(9),
        np.full(9, tiny), np.array([tiny, -tiny, 0, 0, 0, 0, 0, 0, 0]),
        np.linspace(-1e-38, 1e-38, 9), np.linspace(-3e-41, 2e-40, 9),
        np.array([big, -big, big / 3, 1, 0, -1, 1e30, -1e-30, tiny]),
        np.array([1e-30, 1e30, 0, 0, 0, 0, 0, 0, 5e-45]),
    ]
    return np.array(rows, dtype=F32)


@pytest.mark.parametrize("qmax", QMAXES)
def test_quantize_rows_edges(qmax):
    x = _edge_rows()
    q_np, s_np = spec_quant.quantize_rows(x, qmax)
    q_t, s_t = ops.quantize_rows(_t(x), qmax)
    assert_same(q_t, q_np, "q")
    assert_same(s_t, s_np, "s")
    assert np.all(q_np[:2] == 0) and np.all(s_np[:2] == 1)  # zero rows: s = 1, q = 0
    assert np.all(np.abs(q_np.astype(np.int64)) <= qmax)


@pytest.mark.parametrize("qmax", QMAXES)
def test_quantize_rows_ties_round_half_even(qmax):
    # amax = qmax makes s = 1 exactly, so x / s = x and the halves are exact ties
    halves = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, qmax - 0.5, 126.5, -126.5], dtype=F32)
    x = np.concatenate([[F32(qmax)], halves]).astype(F32)[None, :]
    q_np, s_np = spec_quant.quantize_rows(x, qmax)
    q_t, s_t = ops.quantize_rows(_t(x), qmax)
    assert s_np[0] == 1
    want = [qmax, 0, 2, 2, 0, -2, -2, qmax - 1, 126, -126]  # qmax is odd: qmax - 1/2 goes down
    assert q_np[0].tolist() == want
    assert_same(q_t, q_np, "q")
    assert_same(s_t, s_np, "s")


finite_f32 = st.floats(width=32, allow_nan=False, allow_infinity=False, allow_subnormal=True)


@HYP
@given(x=hnp.arrays(F32, hnp.array_shapes(min_dims=1, max_dims=3, max_side=24), elements=finite_f32),
       qmax=st.sampled_from(QMAXES))
def test_quantize_rows_any_finite_input(x, qmax):
    q_np, s_np = spec_quant.quantize_rows(x, qmax)
    q_t, s_t = ops.quantize_rows(_t(x), qmax)
    assert_same(q_t, q_np, "q")
    assert_same(s_t, s_np, "s")


def test_quantize_rows_rejects_non_finite():
    x = np.array([[1, np.inf]], dtype=F32)
    with pytest.raises(FloatingPointError):
        spec_quant.quantize_rows(x, 127)
    with pytest.raises(FloatingPointError):
        ops.quantize_rows(_t(x), 127)
    with pytest.raises(TypeError):
        spec_quant.quantize_rows(x.astype(np.float64), 127)


# ---------------------------------------------------------------- exact GEMM

GEMM_SHAPES = [(1, 1, 1), (1, 7, 3), (17, 33, 9), (5, 576, 960), (3, 1536, 576), (2, 576, 3072),
               (4, 4096, 512), (3, 14336, 256)]


def _rand_q(rng, shape, qmax) -> np.ndarray:
    return rng.integers(-qmax, qmax + 1, shape).astype(spec_quant.int_dtype(qmax))


def _products_every_route(qw: np.ndarray, qx: np.ndarray, qmax: int, x_qmax: int,
                          monkeypatch) -> list:
    """qx @ qw.T by ExactWeight.matmul on each route: the _int_mm planes (at every row count),
    the compiled GEMM (gemm.c, at every row count) and the float64 fallback."""
    from commitllm.verifier import native
    fast = gemm.ExactWeight(_t(qw), qmax)
    with monkeypatch.context() as m:
        m.setattr(gemm, "int_mm_is_exact", lambda: False)
        slow = gemm.ExactWeight(_t(qw), qmax)
    assert fast.use_int_mm and not slow.use_int_mm
    out = [("float64", slow.matmul(_t(qx), x_qmax))]
    for route, wins in (("int_mm", False), ("compiled", True)):
        if wins and native.lib() is None:
            continue
        with monkeypatch.context() as m:
            m.setattr(gemm, "native_gemm_wins", lambda wins=wins: wins)
            m.setattr(gemm, "GEMM_MAX_ROWS", 16 if wins else 0)
            if fast.small_rows(_t(qx)) != wins:
                # gemm.c: the compiled core on, int8/int16 activations, weights to 127 * 257
                assert wins and not (ops.NATIVE and qmax <= 127 * 257
                                     and qx.dtype in (np.int8, np.int16))
                continue
            out.append((route, fast.matmul(_t(qx), x_qmax)))
    if (ops.NATIVE and native.lib() is not None and qmax <= 127 * 257
            and qx.dtype in (np.int8, np.int16)):
        assert [r for r, _ in out] == ["float64", "int_mm", "compiled"]
    return out


@pytest.mark.parametrize("profile", sorted(PROFILES))
@pytest.mark.parametrize("mkn", GEMM_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gemm_random(profile, mkn, monkeypatch):
    p, (m, k, n) = PROFILES[profile], mkn
    rng = np.random.default_rng(m * 7 + k * 3 + n)
    qx, qw = _rand_q(rng, (m, k), p.act_qmax), _rand_q(rng, (n, k), p.weight_qmax)
    want = spec_quant.int_matmul(qx, qw, p.act_qmax, p.weight_qmax)
    assert want.dtype == np.int64
    for name, got in _products_every_route(qw, qx, p.weight_qmax, p.act_qmax, monkeypatch):
        assert_same(got, want, f"{profile} {name}")


@pytest.mark.parametrize("profile", sorted(PROFILES))
@pytest.mark.parametrize("signs", [(-1, -1), (1, -1), (1, 1)])
def test_gemm_extremes(profile, signs, monkeypatch):
    """Every product at its largest magnitude, K = 14336: the worst case for each int32 plane."""
    p, k = PROFILES[profile], 14336
    qx = np.full((3, k), signs[0] * p.act_qmax, spec_quant.int_dtype(p.act_qmax))
    qw = np.full((5, k), signs[1] * p.weight_qmax, spec_quant.int_dtype(p.weight_qmax))
    want = spec_quant.int_matmul(qx, qw, p.act_qmax, p.weight_qmax)
    assert np.all(want == signs[0] * signs[1] * k * p.act_qmax * p.weight_qmax)
    for name, got in _products_every_route(qw, qx, p.weight_qmax, p.act_qmax, monkeypatch):
        assert_same(got, want, f"{profile} {name}")


@pytest.mark.parametrize("profile", ["a8", "w8a16"])
def test_gemm_k_beyond_int32_planes_uses_float64(profile):
    p, k = PROFILES[profile], gemm.INT32_SAFE_K + 1
    rng = np.random.default_rng(11)
    qx, qw = _rand_q(rng, (2, k), p.act_qmax), _rand_q(rng, (3, k), p.weight_qmax)
    w = gemm.ExactWeight(_t(qw), p.weight_qmax)
    assert not w.use_int_mm
    want = spec_quant.int_matmul(qx, qw, p.act_qmax, p.weight_qmax)
    assert_same(w.matmul(_t(qx), p.act_qmax), want, profile)


def test_gemm_route_by_measurement_or_environment(monkeypatch):
    """native_gemm_wins: $COMMITLLM_GEMM forces a route (anything else is refused with a message
    that names the choices); unset, a measurement decides (a bool, kept for the process)."""
    try:
        for value, want in (("native", True), ("int_mm", False), (" Native ", True)):
            monkeypatch.setenv(gemm.GEMM_ROUTE_ENV, value)
            gemm.native_gemm_wins.cache_clear()
            assert gemm.native_gemm_wins() is want
        monkeypatch.setenv(gemm.GEMM_ROUTE_ENV, "fast")
        gemm.native_gemm_wins.cache_clear()
        with pytest.raises(ValueError, match="'native' or 'int_mm'"):
            gemm.native_gemm_wins()
        monkeypatch.delenv(gemm.GEMM_ROUTE_ENV)
        gemm.native_gemm_wins.cache_clear()
        assert gemm.native_gemm_wins() in (True, False)
    finally:
        gemm.native_gemm_wins.cache_clear()


def test_int_mm_is_exact_here():
    assert gemm.int_mm_is_exact()
    assert gemm.INT32_SAFE_K * 128 * 128 < 2**31 <= (gemm.INT32_SAFE_K + 1) * 128 * 128


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_gemm_overflow_guard(profile):
    """K is refused exactly when K * qmax_x * qmax_w reaches 2^53 (numpy and torch)."""
    p = PROFILES[profile]
    k_max = (2**53 - 1) // (p.act_qmax * p.weight_qmax)
    too_long = np.broadcast_to(np.int16(0), (1, k_max + 1))  # no memory: only the shape is read
    with pytest.raises(OverflowError):
        spec_quant.int_matmul(too_long, too_long, p.act_qmax, p.weight_qmax)
    if profile == "w16a16":  # K = 8455048 is small enough to build and run
        ok = np.zeros((1, k_max), np.int16)
        assert spec_quant.int_matmul(ok, ok, p.act_qmax, p.weight_qmax)[0, 0] == 0
        w = gemm.ExactWeight(torch.zeros((1, k_max + 1), dtype=torch.int16), p.weight_qmax)
        with pytest.raises(OverflowError):
            w.matmul(torch.zeros((1, k_max + 1), dtype=torch.int16), p.act_qmax)


# ---------------------------------------------------------------- planes and conversions

def test_split_planes_round_trip():
    q = np.arange(-128 * 256 - 128, 127 * 256 + 128, dtype=np.int32)  # every two-plane value
    hi, lo = spec_quant.split_planes(q)
    assert hi.dtype == lo.dtype == np.int8
    assert np.array_equal(hi.astype(np.int32) * 256 + lo, q)
    hi_t, lo_t = gemm.split_planes(_t(q))
    assert_same(hi_t, hi, "hi")
    assert_same(lo_t, lo, "lo")
    assert [len(gemm.planes(_t(q[:3]), qm)) for qm in (127, 32639)] == [1, 2]


@pytest.mark.parametrize("value", [127 * 256 + 128, -128 * 256 - 129, 2**15, -(2**15) - 1000])
def test_split_planes_rejects_out_of_range(value):
    with pytest.raises(OverflowError):
        spec_quant.split_planes(np.array([value]))


def test_int_to_f32_and_int64_to_f64():
    rng = np.random.default_rng(3)
    z = np.concatenate([rng.integers(-(2**53) + 1, 2**53, 4000),
                        rng.integers(-(2**25), 2**25, 4000),  # ties at fp32's 24 bits
                        [0, 1, -1, 2**24 + 1, 2**24 + 3, 2**53 - 1, -(2**53) + 1]]).astype(np.int64)
    assert_same(ops.int_to_f32(_t(z)), spec_quant.int_to_f32(z), "int_to_f32")
    with pytest.raises(OverflowError):
        spec_quant.int_to_f32(np.array([2**53]))
    big = np.concatenate([rng.integers(-(2**63), 2**63 - 1, 4000, dtype=np.int64),
                          np.array([2**63 - 1, -(2**63), 2**53 + 1, -(2**53) - 1], np.int64)])
    assert_same(ops.int64_to_f64(_t(big)), spec_norm.int64_to_f64(big), "int64_to_f64")


def test_pow2_from_bits():
    k64 = np.arange(-1022, 1024)
    assert_same(ops.pow2_f64(_t(k64)), np.ldexp(np.float64(1), k64), "pow2_f64")
    k32 = np.arange(-126, 128)
    assert_same(ops.pow2_f32(_t(k32)), np.ldexp(F32(1), k32.astype(np.int32)), "pow2_f32")


# ---------------------------------------------------------------- dequantize

@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("tn", [(1, 1), (3, 7), (5, 576), (2, 4096)], ids=str)
def test_dequantize(with_bias, tn):
    t, n = tn
    rng = np.random.default_rng(t * n)
    z = rng.integers(-(2**52), 2**52, (t, n)) >> rng.integers(0, 52, (t, n))  # all magnitudes
    z[0, 0] = 0
    sx = (2.0 ** rng.uniform(-60, 30, t)).astype(F32)
    sw = (2.0 ** rng.uniform(-60, 30, n) * rng.choice([-1, 1], n)).astype(F32)
    bias = (rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 3, n)).astype(F32) if with_bias else None
    want = spec_quant.dequantize(z, sx, sw, bias)
    got = ops.dequantize(_t(z), _t(sx), _t(sw), None if bias is None else _t(bias))
    assert_same(got, want, "dequantize")


# ---------------------------------------------------------------- RMSNorm

def _norm_rows(rng, t, h) -> np.ndarray:
    rows = [
        rng.standard_normal(h),
        rng.standard_normal(h) * 1e-3 + np.where(np.arange(h) == h // 2, 3e4, 0),  # massive outlier
        np.zeros(h),
        -np.zeros(h),
        rng.standard_normal(h) * 1e-42,  # subnormal: exponent far below fp32's normal range
        rng.standard_normal(h) * 1e37,  # near fp32's top
        np.where(rng.random(h) < 0.5, 1e-30, 1e30) * rng.choice([-1, 1], h),
        np.full(h, F32(1 - 2**-24)),  # the row max rounds up to 2^23 in fixed point
    ]
    rows += [rng.standard_normal(h) * 10.0 ** rng.uniform(-20, 20) for _ in range(t)]
    return np.array(rows, dtype=F32)


@pytest.mark.parametrize("eps", [1e-5, 1e-6])
@pytest.mark.parametrize("h", [1, 2, 3, 40, 576, 1001, 4096])
def test_rmsnorm(h, eps):
    rng = np.random.default_rng(h)
    x = _norm_rows(rng, 4, h)
    weight = (1 + 0.1 * rng.standard_normal(h)).astype(F32)
    want = spec_norm.rmsnorm(x, weight, eps)
    assert_same(ops.rmsnorm(_t(x), _t(weight), eps), want, f"rmsnorm h={h}")


@HYP
@given(x=hnp.arrays(F32, st.tuples(st.integers(1, 3), st.integers(1, 64)), elements=finite_f32))
def test_rmsnorm_any_finite_input(x):
    weight = np.linspace(0.5, 1.5, x.shape[1], dtype=F32)
    with np.errstate(over="ignore"):  # (x * r) * w may overflow to inf: both sides alike
        want = spec_norm.rmsnorm(x, weight, 1e-6)
    assert_same(ops.rmsnorm(_t(x), _t(weight), 1e-6), want, "rmsnorm")


def test_rmsnorm_too_wide_raises():
    x = np.zeros((1, spec_norm.MAX_NORM_WIDTH + 1), F32)
    with pytest.raises(OverflowError):
        spec_norm.rms_scale(x, 1e-5)
    with pytest.raises(OverflowError):
        ops.rmsnorm(_t(x), torch.ones(x.shape[1]), 1e-5)


# ---------------------------------------------------------------- RoPE

def _cfg(d: int, theta: float, scaling: RopeScaling | None = None) -> ModelConfig:
    return ModelConfig(family="llama", vocab_size=16, hidden_size=d, intermediate_size=8,
                       num_layers=1, num_heads=1, num_kv_heads=1, head_dim=d, rms_norm_eps=1e-5,
                       rope_theta=theta, max_position_embeddings=131072, tie_word_embeddings=False,
                       attention_bias=False, rope_scaling=scaling)


ROPE_CFGS = {
    "smollm2_d64": _cfg(64, 100000.0),
    "llama3_8b_d128": _cfg(128, 500000.0, RopeScaling(8.0, 1.0, 4.0, 8192)),
    "odd_d24": _cfg(24, 10000.0),
}


@pytest.fixture(scope="module")
def rope_tables() -> dict:
    return {name: spec_rope.RopeTable(cfg) for name, cfg in ROPE_CFGS.items()}


@pytest.mark.parametrize("cfg_name", sorted(ROPE_CFGS))
@pytest.mark.parametrize("heads", [1, 3, 8])
def test_apply_rope(rope_tables, cfg_name, heads):
    table, d = rope_tables[cfg_name], ROPE_CFGS[cfg_name].head_dim
    rng = np.random.default_rng(heads * d)
    pos = np.concatenate([np.arange(7), [255, 256, 4095, 32767, 40000], rng.integers(0, 40000, 9)])
    cos, sin = table.lookup(pos)
    x = _activations(rng, (len(pos), heads, d), spread=2.0)
    x[0, 0, :3] = [0.0, -0.0, 1e-44]
    want = spec_rope.apply_rope(x, cos, sin)
    assert_same(ops.apply_rope(_t(x), _t(cos), _t(sin)), want, f"rope {cfg_name}")


# ---------------------------------------------------------------- exp2, SiLU, table weights

def _around(v: float, n: int = 4) -> list:
    """v and its n fp32 neighbours on each side."""
    out, up, down = [F32(v)], F32(v), F32(v)
    for _ in range(n):
        up, down = np.nextafter(up, F32(np.inf)), np.nextafter(down, F32(-np.inf))
        out += [up, down]
    return out


def _exp2_inputs() -> np.ndarray:
    rng = np.random.default_rng(2)
    ys = [np.linspace(-64, 64, 1 << 18, dtype=F32), rng.uniform(-64, 64, 1 << 16).astype(F32),
          np.arange(-64, 64) + F32(0.5), np.arange(-64, 65, dtype=F32), [F32(0), F32(-0.0)]]
    for v in [-64, 64, 0.5, -0.5, 63.5, -63.5, 1e-30, -1e-30]:
        ys.append(_around(v))
    return np.concatenate([np.asarray(y, F32) for y in ys])


def test_exp2():
    y = _exp2_inputs()
    assert_same(ops.exp2(_t(y)), spec_exp2.exp2(y), "exp2")


def _gates() -> np.ndarray:
    rng = np.random.default_rng(4)
    edge = F32(spec_exp2.SILU_CLAMP) / -spec_exp2.NEG_LOG2E  # |g| where g * -log2 e hits the clamp
    big = np.finfo(F32).max
    gs = [rng.standard_normal(1 << 16) * 4, np.linspace(-100, 100, 1 << 16),
          rng.choice([-1, 1], 4096) * 10.0 ** rng.uniform(-45, 38.5, 4096),
          _around(edge), _around(-edge), [0.0, -0.0, 1.4e-45, -1.4e-45, big, -big]]
    return np.concatenate([np.asarray(g, F32) for g in gs])


def test_swiglu():
    gate = _gates()
    up = (np.random.default_rng(5).standard_normal(gate.shape) * 3).astype(F32)
    up[:3] = [1.0, -0.0, 1e30]
    with np.errstate(over="ignore"):  # silu(huge) * 1e30 overflows to inf on both sides
        want = spec_exp2.swiglu(gate, up)
    assert_same(ops.swiglu(_t(gate), _t(up)), want, "swiglu")
    one = np.ones_like(gate)
    with np.errstate(over="ignore"):  # g * -log2 e overflows to +-inf for |g| > 2.4e38, then clamps
        want = spec_exp2.silu(gate)
    assert_same(ops.swiglu(_t(gate), _t(one)), want, "silu")


def test_table_weights():
    rng = np.random.default_rng(6)
    d = np.concatenate([np.arange(1 << 14), rng.integers(0, 2**31 + 1, 10000),
                        [31 * 256 - 1, 31 * 256, 32 * 256, 2**30, 2**31 - 1, 2**31]]).astype(np.int64)
    want = spec_exp2.table_weights(d)
    assert_same(ops.table_weights(_t(d)), want, "table_weights")


@HYP
@given(y=hnp.arrays(F32, st.integers(1, 64),
                    elements=st.floats(-(2**23), 2**23, width=32, exclude_min=True,
                                       exclude_max=True)))
def test_round_half_even_is_rint(y):
    """Equal as numbers; a zero result is always +0.0 (np.rint(-0.3) is -0.0), which is harmless
    where the spec uses it: exp2 only turns n into the exponent of 2^n."""
    got, want = spec_exp2.round_half_even(y), np.rint(y)
    assert got.dtype == F32 and np.array_equal(got, want), np.argwhere(got != want)[:5]
    nonzero = want != 0
    assert_same(got[nonzero], want[nonzero], "round_half_even")
    assert not np.any(np.signbit(got[~nonzero]))


# ---------------------------------------------------------------- attention

def _kv_rows(rng, n, heads, d, qmax, spread):
    return spec_quant.quantize_rows(_activations(rng, (n, heads, d), spread), qmax)


def _run_both(qmax, t, s, nh, nkv, d, q_pos, seed, spread=1.5):
    rng = np.random.default_rng(seed)
    (q, sq), (k, sk), (v, sv) = (_kv_rows(rng, n, h, d, qmax, spread)
                                 for n, h in ((t, nh), (s, nkv), (s, nkv)))
    q_pos = np.asarray(q_pos, dtype=np.int64)
    parts_np, parts_t = {}, {}
    want = spec_attn.attention(q, sq, k, sk, v, sv, q_pos, qmax, parts_np)
    got = ops.attention(*map(_t, (q, sq, k, sk, v, sv, q_pos)), qmax, parts_t)
    assert_same(got, want, "attention out")
    for name in ("scores", "logits", "weights", "z"):
        assert_same(parts_t[name], parts_np[name], f"attention {name}")
    return parts_np


ATTN_CASES = {  # (T, S, nh, nkv, d, q_pos)
    "single_key": (1, 1, 1, 1, 64, [0]),
    "decode_smollm2": (1, 4097, 9, 3, 64, [4096]),
    "decode_llama3": (1, 2048, 32, 8, 128, [2047]),
    "prefill_causal": (37, 37, 6, 2, 24, np.arange(37)),
    "chunk_after_cache": (5, 50, 5, 1, 40, np.arange(45, 50)),
    "decode_mid_cache": (1, 300, 4, 4, 16, [123]),  # later keys exist but are masked
}


@pytest.mark.parametrize("qmax", QMAXES)
@pytest.mark.parametrize("case", sorted(ATTN_CASES))
def test_attention_cases(qmax, case):
    _run_both(qmax, *ATTN_CASES[case], seed=len(case))


@pytest.mark.parametrize("qmax", QMAXES)
@pytest.mark.parametrize("group", [1, 2, 3, 4, 7])
def test_attention_gqa_groups(qmax, group):
    _run_both(qmax, 19, 19, 2 * group, 2, 16, np.arange(19), seed=group)


@pytest.mark.parametrize("qmax", QMAXES)
def test_attention_clamped_logits(qmax):
    """Row scales up to 1e12 push |t * 256| past 2^30: the clamp is hit and must match too."""
    parts = _run_both(qmax, 6, 6, 2, 1, 32, np.arange(6), seed=9, spread=12.0)
    assert np.max(np.abs(parts["logits"])) >= spec_attn.LOGIT_CLAMP


@pytest.mark.parametrize("qmax", QMAXES)
def test_attention_bounds(qmax):
    """Value sums S * 2^15 * qmax and scores d * qmax^2 must stay below 2^53."""
    s_max = (2**53 - 1) // ((1 << spec_attn.COEF_BITS) * qmax)
    d_max = (2**53 - 1) // (qmax * qmax)
    spec_attn.check_bounds(128, s_max, qmax)
    spec_attn.check_bounds(d_max, 1, qmax)
    for d, s in ((128, s_max + 1), (d_max + 1, 1)):
        with pytest.raises(OverflowError):
            spec_attn.check_bounds(d, s, qmax)
    assert s_max >= 32768


def test_attention_rejects_too_many_keys_in_both():
    qmax = 32639
    s = (2**53 - 1) // ((1 << spec_attn.COEF_BITS) * qmax) + 1
    q, sq = np.zeros((1, 1, 2), np.int16), np.ones((1, 1), F32)
    k = np.broadcast_to(np.int16(0), (s, 1, 2))
    sk = np.broadcast_to(F32(1), (s, 1))
    with pytest.raises(OverflowError):
        spec_attn.attention(q, sq, k, sk, k, sk, np.array([0]), qmax)
    with pytest.raises(OverflowError):  # torch checks before touching the (zero-stride) keys
        ops.attention(_t(q), _t(sq), torch.zeros(1, 1, 2).expand(s, 1, 2),
                      torch.ones(1, 1).expand(s, 1), torch.zeros(1, 1, 2).expand(s, 1, 2),
                      torch.ones(1, 1).expand(s, 1), torch.tensor([0]), qmax)


def _attn_inputs(qmax, t, s, nh, nkv, d, seed, spread=1.5):
    rng = np.random.default_rng(seed)
    return [x for n, h in ((t, nh), (s, nkv), (s, nkv))
            for x in _kv_rows(rng, n, h, d, qmax, spread)]


@pytest.mark.parametrize("qmax", QMAXES)
@pytest.mark.parametrize("tile", [1, 37, 400, 1 << 21])
@pytest.mark.parametrize("spread", [1.5, 12.0])
def test_attention_query_tiles_equal_spec(qmax, tile, spread):
    """Untraced attention runs in query tiles against only the keys a tile can see: every tile
    size gives the spec's bits (one row per tile, a few rows, one tile), clamped logits included."""
    for case in ("prefill_causal", "chunk_after_cache", "decode_mid_cache", "decode_smollm2"):
        t, s, nh, nkv, d, q_pos = ATTN_CASES[case]
        q, sq, k, sk, v, sv = _attn_inputs(qmax, t, s, nh, nkv, d, seed=tile, spread=spread)
        q_pos = np.asarray(q_pos, dtype=np.int64)
        want = spec_attn.attention(q, sq, k, sk, v, sv, q_pos, qmax)
        ops.NATIVE = False  # the compiled core tiles rows its own way (tests/test_native.py)
        try:
            got = ops.attention(*map(_t, (q, sq, k, sk, v, sv, q_pos)), qmax, tile_elems=tile)
        finally:
            ops.NATIVE = True
        assert_same(got, want, f"attention {case} tile {tile}")


@pytest.mark.parametrize("qmax", QMAXES)
@pytest.mark.parametrize("spread", [1.5, 12.0])
def test_attention_batch_equals_each_sequence(qmax, spread):
    """A decode step's rows in one padded batch equal the spec on each sequence alone."""
    nh, nkv, d, lengths = 6, 2, 24, [1, 5, 300, 64, 2]
    seqs = [_attn_inputs(qmax, 1, s, nh, nkv, d, seed=i, spread=spread)
            for i, s in enumerate(lengths)]
    got = ops.attention_batch(torch.cat([_t(x[0]) for x in seqs]),
                              torch.cat([_t(x[1]) for x in seqs]),
                              *([_t(x[j]) for x in seqs] for j in (2, 3, 4, 5)),
                              torch.tensor([s - 1 for s in lengths]), qmax)
    for b, (x, s) in enumerate(zip(seqs, lengths)):
        want = spec_attn.attention(*x, np.array([s - 1]), qmax)
        assert_same(got[b:b + 1], want, f"batched attention row {b}")


@pytest.mark.parametrize("qmax", QMAXES)
def test_attention_ignores_a_lowered_matmul_precision(qmax):
    """A caller's torch.set_float32_matmul_precision (bf16/TF32 matmuls) must not reach the
    exact scores: the fp32 route is taken only at 'highest'."""
    t, s, nh, nkv, d, q_pos = ATTN_CASES["prefill_causal"]
    q, sq, k, sk, v, sv = _attn_inputs(qmax, t, s, nh, nkv, d, seed=3)
    want = spec_attn.attention(q, sq, k, sk, v, sv, np.asarray(q_pos), qmax)
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        got = ops.attention(*map(_t, (q, sq, k, sk, v, sv, np.asarray(q_pos))), qmax)
    finally:
        torch.set_float32_matmul_precision(old)
    assert_same(got, want, "attention at medium matmul precision")


def test_full_softmax_table_equals_shift_and_lookup():
    d = torch.arange(0, ops._CUT + 5000, dtype=torch.int64)
    want = ops.table_weights(d)
    got = ops._FULL_TABLE[d.clamp(max=ops._CUT)].to(torch.int64)
    assert torch.equal(got, want)
    assert int(want[ops._CUT:].abs().max()) == 0 and int(want[ops._CUT - 256:ops._CUT].max()) > 0
