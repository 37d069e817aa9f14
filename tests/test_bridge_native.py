"""The bridge in C (verifier/native/bridge.c through bridge.py) gives the numpy spec's bits:
RMSNorm, quantization at every profile's range, dequantization with the residual add, SwiGLU and
RoPE, on random data, hypothesis examples and edge values (zeros, subnormals, rounding ties,
magnitudes near fp32's limits, non-finite inputs), for strided inputs, for each instruction set
the machine has (each built alone), and with the compiled core off. Comparisons are `==` on the
bit patterns (NaN payloads and signed zeros included)."""

from __future__ import annotations

import ctypes
import subprocess
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from commitllm.verifier import native
from commitllm.verifier.native import bridge
from commitllm.verifier.numerics import exp2 as spec_exp2
from commitllm.verifier.numerics import norm as spec_norm
from commitllm.verifier.numerics import quant as spec_quant
from commitllm.verifier.numerics import rope as spec_rope
from commitllm.verifier.numerics.profiles import PROFILES

from test_numerics_ops import HYP

needs_core = pytest.mark.skipif(native.lib() is None, reason=f"no compiled core: {native.error()}")
QMAXES = sorted({p.act_qmax for p in PROFILES.values()} | {p.kv_qmax for p in PROFILES.values()}
                | {127, 32767})
F32 = np.float32


def bits(a) -> np.ndarray:
    a = np.asarray(a)
    return a.view({4: np.uint32, 2: np.uint16, 1: np.uint8, 8: np.uint64}[a.dtype.itemsize])


def same(got, want) -> None:
    got, want = (np.asarray(x) for x in (got, want))
    assert got.dtype == want.dtype and got.shape == want.shape
    assert np.array_equal(bits(got), bits(want)), \
        f"{int(np.sum(bits(got) != bits(want)))} elements differ"


def result(fn, *args):
    """fn(*args), or the exception's type and message."""
    try:
        return fn(*args)
    except (FloatingPointError, OverflowError, ValueError, TypeError) as e:
        return type(e), str(e)


def same_result(got, want) -> None:
    if isinstance(want, tuple) and isinstance(want[0], type):
        assert got == want
    elif isinstance(want, tuple):
        assert isinstance(got, tuple) and len(got) == len(want)
        for g, w in zip(got, want):
            same(g, w)
    else:
        same(got, want)


def _rows(rng, t, h, kind="normal"):
    if kind == "normal":
        return rng.standard_normal((t, h)).astype(F32) * F32(3)
    if kind == "wide":  # magnitudes across fp32's range, subnormals included
        m = rng.uniform(-1, 1, (t, h))
        e = rng.integers(-149, 127, (t, h))
        return np.ldexp(m, e).astype(F32)
    if kind == "tiny":
        return (rng.integers(-40, 41, (t, h)) * 2.0 ** -149).astype(F32)
    if kind == "huge":
        return (rng.uniform(-1, 1, (t, h)) * 3.4e38).astype(F32)
    raise ValueError(kind)


KINDS = ["normal", "wide", "tiny", "huge"]
WIDTHS = [1, 7, 63, 64, 65, 576, 2051]


def _spec_rmsnorm(x, w, eps):
    return spec_norm.rmsnorm(x.copy(), w, eps)


# ------------------------------------------------------------------------------ the C routines

@needs_core
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("h", WIDTHS)
def test_rmsnorm(kind, h):
    rng = np.random.default_rng(h)
    x = _rows(rng, 5, h, kind)
    x[2] = 0  # a zero row
    w = rng.standard_normal(h).astype(F32)
    for eps in (1e-5, 1e-6, 0.0):
        same_result(result(bridge.rmsnorm, x, w, eps), result(_spec_rmsnorm, x, w, eps))


@needs_core
@pytest.mark.parametrize("qmax", QMAXES)
@pytest.mark.parametrize("kind", KINDS)
def test_quantize_every_range(qmax, kind):
    rng = np.random.default_rng(qmax)
    x = _rows(rng, 6, 515, kind)
    x[1] = 0
    # ties: amax = qmax makes s = 1, so k + 1/2 lands exactly between two integers
    x[3] = (rng.integers(-qmax, qmax, 515) + 0.5).astype(F32)
    x[3, 0] = qmax
    x[4] = -x[3]
    same_result(bridge.quantize_rows(x, qmax), spec_quant.quantize_rows(x, qmax))
    heads = np.ascontiguousarray(x[:, :512]).reshape(6, 4, 128)  # per (token, head), as for q
    same_result(bridge.quantize_rows(heads, qmax), spec_quant.quantize_rows(heads, qmax))
    same_result(bridge.quantize_rows(heads[:, 1:3], qmax),  # a strided view (v), copied
                spec_quant.quantize_rows(heads[:, 1:3], qmax))


@needs_core
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("resid", [False, True])
def test_dequantize_and_residual(bias, resid):
    rng = np.random.default_rng(5)
    t, n = 7, 1031
    z = rng.integers(-2**53 + 1, 2**53, (t, n), dtype=np.int64)
    z[1] = rng.integers(-300, 300, n)
    z[2, :4] = [2**53 - 1, -(2**53 - 1), 0, 2**24 + 1]  # extremes and an fp32 rounding tie
    # rows below 2^51 take the vectorized conversion (bridge.c f64_of_small), a row with a value
    # from 2^51 on the exact one: both ends of each, every magnitude, fp32 rounding ties
    z[3] = rng.integers(-2**51, 2**51, n)
    z[3, :5] = [2**51 - 1, -2**51, -(2**51 - 1), 2**25 + 2, -(2**25 + 2)]
    z[4] = (rng.choice([-1, 1], n) * 2.0 ** rng.uniform(0, 51, n)).astype(np.int64)
    z[4, :3] = [2**24 + 1, -(2**24 + 3), 2**50 + 2**26]  # ties at 2^24 and at 2^50
    z[5] = z[4]
    z[5, n // 2] = 2**51  # the first value that takes the exact route
    z[6] = z[4]
    z[6, n - 1] = -2**51 - 1
    sx = rng.uniform(1e-6, 1e-2, t).astype(F32)
    sw = rng.uniform(1e-6, 1e-2, n).astype(F32)
    b = rng.standard_normal(n).astype(F32) if bias else None
    r = rng.standard_normal((t, n)).astype(F32) if resid else None
    want = spec_quant.dequantize(z, sx, sw, b)
    if resid:
        want = r + want
    same(bridge.dequantize(z, sx, sw, b, r), want)


@needs_core
@pytest.mark.parametrize("big", [2**53, -2**53, np.iinfo(np.int64).min])
def test_dequantize_refuses_what_the_spec_refuses(big):
    z = np.zeros((2, 9), np.int64)
    z[1, 4] = big
    args = (z, np.ones(2, F32), np.ones(9, F32), None)
    assert result(bridge.dequantize, *args) == result(spec_quant.dequantize, *args)
    assert result(bridge.dequantize, *args)[0] is OverflowError


def _spec_swiglu(g, u):
    return spec_exp2.swiglu(g, u)


@needs_core
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("f", [1, 17, 1536])
def test_swiglu_on_the_halves_of_gate_up(kind, f):
    rng = np.random.default_rng(f)
    gu = _rows(rng, 5, 2 * f, kind)
    gu[0, :f] = np.linspace(-80, 80, f)  # through the clamp at |g log2 e| = 64
    gu[1, : min(f, 4)] = [0.0, -0.0, 2.0 ** -149, -(2.0 ** -149)][: min(f, 4)]
    g, u = gu[:, :f], gu[:, f:]
    same_result(result(bridge.swiglu, g, u), result(_spec_swiglu, g, u))


@needs_core
@pytest.mark.parametrize("heads,d", [(1, 2), (3, 64), (9, 128), (2, 6)])
def test_rope_on_strided_views(heads, d):
    rng = np.random.default_rng(d)
    t = 5
    qkv = rng.standard_normal((t, heads * d + 40)).astype(F32)
    x = qkv[:, 8:8 + heads * d].reshape(t, heads, d)  # as split_qkv slices the qkv output
    ang = rng.uniform(-10, 10, (t, d // 2))
    cos, sin = np.cos(ang).astype(F32), np.sin(ang).astype(F32)
    same(bridge.apply_rope(x, cos, sin), spec_rope.apply_rope(x, cos, sin))


NONFINITE = [np.inf, -np.inf, np.nan, np.float32(np.nan) * -1]


@needs_core
@pytest.mark.parametrize("bad", NONFINITE)
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_non_finite_values_take_the_spec(bad):
    """A non-finite input (or output) gives exactly the spec's result: its exception, or its
    values with the same NaN bits."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 70)).astype(F32)
    x[1, 5] = bad
    w = rng.standard_normal(70).astype(F32)
    same_result(result(bridge.rmsnorm, x, w, 1e-5), result(_spec_rmsnorm, x, w, 1e-5))
    same_result(result(bridge.quantize_rows, x, 127), result(spec_quant.quantize_rows, x, 127))
    with np.errstate(invalid="ignore"):
        same_result(result(bridge.swiglu, x[:, :35], x[:, 35:]),
                    result(_spec_swiglu, x[:, :35], x[:, 35:]))
    cs = rng.standard_normal((3, 35)).astype(F32)
    same(bridge.apply_rope(x.reshape(3, 1, 70), cs, cs), spec_rope.apply_rope(x.reshape(3, 1, 70),
                                                                              cs, cs))
    z = rng.integers(-1000, 1000, (3, 70))
    one = np.ones(3, F32)
    same(bridge.dequantize(z, one, w, None, x), x + spec_quant.dequantize(z, one, w, None))
    big = np.full(70, 3e38, F32)  # finite inputs, an infinite output
    same(bridge.dequantize(z, one, big, None, None), spec_quant.dequantize(z, one, big, None))


@needs_core
def test_widths_and_layouts_the_routines_do_not_take():
    rng = np.random.default_rng(2)
    wide = rng.standard_normal((2, spec_norm.MAX_NORM_WIDTH + 1)).astype(F32)
    w = np.ones(wide.shape[1], F32)
    assert result(bridge.rmsnorm, wide, w, 1e-5) == result(_spec_rmsnorm, wide, w, 1e-5)
    x = rng.standard_normal((4, 30)).astype(F32)
    for view in (x.T, x[:, ::2], x[::-1], x.astype(np.float64), x[:, :0], x[:0]):
        for fn, spec, args in ((bridge.rmsnorm, _spec_rmsnorm, (np.ones(view.shape[-1], F32),
                                                                 1e-5)),
                               (bridge.quantize_rows, spec_quant.quantize_rows, (127,))):
            same_result(result(fn, view, *args), result(spec, view, *args))
    same_result(result(bridge.rmsnorm, x, w[:30].astype(np.float64), 1e-5),
                result(_spec_rmsnorm, x, w[:30].astype(np.float64), 1e-5))


# ------------------------------------------------------------------------------- hypothesis

def _f32_rows(max_w=80):
    return hnp.arrays(F32, st.tuples(st.integers(1, 4), st.integers(1, max_w)),
                      elements=st.floats(width=32, allow_nan=False, allow_infinity=False))


@needs_core
@HYP
@given(x=_f32_rows(), qmax=st.sampled_from(QMAXES))
def test_hypothesis_quantize(x, qmax):
    same_result(result(bridge.quantize_rows, x, qmax), result(spec_quant.quantize_rows, x, qmax))


@needs_core
@HYP
@given(x=_f32_rows(), eps=st.sampled_from([1e-5, 1e-6, 0.0]))
def test_hypothesis_rmsnorm(x, eps):
    w = np.linspace(-2, 2, x.shape[1]).astype(F32)
    same_result(result(bridge.rmsnorm, x, w, eps), result(_spec_rmsnorm, x, w, eps))


@needs_core
@HYP
@given(gu=_f32_rows(), data=st.data())
def test_hypothesis_swiglu_and_rope(gu, data):
    f = gu.shape[1] // 2
    if not f:
        return
    g, u = gu[:, :f], gu[:, f:2 * f]
    with np.errstate(all="ignore"):
        same_result(result(bridge.swiglu, g, u), result(_spec_swiglu, g, u))
        cs = data.draw(hnp.arrays(F32, (gu.shape[0], f), elements=st.floats(-1, 1, width=32)))
        x = gu[:, :2 * f].reshape(gu.shape[0], 1, 2 * f)
        same(bridge.apply_rope(x, cs, cs[::-1].copy()), spec_rope.apply_rope(x, cs, cs[::-1]))


# ------------------------------------------------------------------- every build of the routines

def _builds():
    """bridge.c built alone per instruction set this CPU has (plain, AVX2, AVX-512)."""
    flags = open("/proc/cpuinfo").read() if Path("/proc/cpuinfo").exists() else ""
    out = [("plain", [])]
    if " avx2" in flags:
        out.append(("avx2", ["-mavx2"]))
    if " avx512f" in flags:
        out.append(("avx512", ["-mavx512f"]))
    return out


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    cc = native._compiler()
    if cc is None or native.lib() is None:
        pytest.skip("no compiled core")
    src = Path(native.__file__).with_name("bridge.c")
    out = {}
    for name, extra in _builds():
        so = tmp_path_factory.mktemp(name) / "bridge.so"
        subprocess.run([cc, *native.FLAGS, "-DCOMMITLLM_ONE_TARGET", *extra, "-o", str(so),
                        str(src), "-lm"], check=True, capture_output=True, timeout=120)
        lib = ctypes.CDLL(str(so))
        native.declare_bridge(lib)
        out[name] = lib
    return out


def test_each_instruction_set_gives_the_spec(builds, monkeypatch):
    rng = np.random.default_rng(11)
    x = _rows(rng, 6, 777, "wide")
    x[2] = _rows(rng, 1, 777, "tiny")
    w = rng.standard_normal(777).astype(F32)
    z = rng.integers(-2**40, 2**40, (6, 777))
    sx = np.abs(x[:, 0]) + F32(1e-30)
    cs = rng.uniform(-1, 1, (6, 388)).astype(F32)
    gu = _rows(rng, 6, 2 * 777, "normal") * F32(20)
    r = x[:, :776].reshape(6, 1, 776)
    table = spec_rope.RopeTable(_rope_cfg(500000.0, 128, "llama3"))
    pos = np.concatenate([[0, 2 ** 24 - 1], rng.integers(0, 2 ** 24, 61)])

    def run(m):  # m: the bridge or the spec
        return (m[0](x, w, 1e-5), m[1](x, 127), m[1](x, 32767), m[2](z, sx, w, w, x),
                m[3](gu[:, :777], gu[:, 777:]), m[4](r, cs, cs),
                m[5](table.cos_b, table.sin_b, pos))
    want = run((_spec_rmsnorm, spec_quant.quantize_rows,
                lambda z_, a, b, c, res: res + spec_quant.dequantize(z_, a, b, c),
                spec_exp2.swiglu, spec_rope.apply_rope, spec_rope.build_rows))
    for name, lib in builds.items():
        monkeypatch.setattr(bridge, "lib", lambda lib=lib: lib)
        got = run((bridge.rmsnorm, bridge.quantize_rows, bridge.dequantize, bridge.swiglu,
                   bridge.apply_rope, bridge.rope_rows))
        for i, (g, wv) in enumerate(zip(got, want)):
            try:
                same_result(g, wv)
            except AssertionError as e:
                raise AssertionError(f"{name} build, routine {i}: {e}") from None


def test_without_the_core_the_spec_runs(monkeypatch):
    monkeypatch.setattr(bridge, "lib", lambda: None)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 40)).astype(F32)
    w = np.ones(40, F32)
    same(bridge.rmsnorm(x, w, 1e-5), _spec_rmsnorm(x, w, 1e-5))
    same_result(bridge.quantize_rows(x, 127), spec_quant.quantize_rows(x, 127))
    same(bridge.swiglu(x[:, :20], x[:, 20:]), spec_exp2.swiglu(x[:, :20], x[:, 20:]))


@needs_core
def test_the_replays_layouts_take_the_compiled_route(monkeypatch):
    """With the spec's functions made to fail, the bridge still answers for the layouts the
    replay passes (rows of a stack, halves of gate_up, heads sliced from qkv): the equality tests
    above compare the C routines, not the spec with itself."""
    rng = np.random.default_rng(9)
    x = rng.standard_normal((4, 96)).astype(F32)
    w = np.ones(96, F32)
    want = (_spec_rmsnorm(x, w, 1e-5), spec_quant.quantize_rows(x, 127),
            x + spec_quant.dequantize(np.ones((4, 96), np.int64), np.ones(4, F32), w, None),
            spec_exp2.swiglu(x[:, :48], x[:, 48:]),
            spec_rope.apply_rope(x.reshape(4, 2, 48), x[:, :24].copy(), x[:, 24:48].copy()))

    def boom(*a, **k):
        raise AssertionError("the spec was called")
    for mod, name in ((spec_norm, "rmsnorm"), (spec_quant, "quantize_rows"),
                      (spec_quant, "dequantize"), (spec_exp2, "swiglu"),
                      (spec_rope, "apply_rope")):
        monkeypatch.setattr(mod, name, boom)
    got = (bridge.rmsnorm(x, w, 1e-5), bridge.quantize_rows(x, 127),
           bridge.dequantize(np.ones((4, 96), np.int64), np.ones(4, F32), w, None, x),
           bridge.swiglu(x[:, :48], x[:, 48:]),
           bridge.apply_rope(x.reshape(4, 2, 48), x[:, :24].copy(), x[:, 24:48].copy()))
    for g, wv in zip(got, want):
        same_result(g, wv)


@needs_core
@pytest.mark.parametrize("dtype", [np.int8, np.int16])
def test_minmax_is_numpy_s_min_and_max(dtype):
    """The one-pass range of the opening's K/V and embedding checks: numpy's min and max at every
    size (vector tails), at the type's extremes, on strided views (numpy's route) and constants."""
    info = np.iinfo(dtype)
    rng = np.random.default_rng(info.bits)
    for n in (1, 2, 15, 16, 17, 63, 64, 65, 1000, 4099):
        a = rng.integers(info.min, info.max + 1, n).astype(dtype)
        assert bridge.minmax(a) == (int(a.min()), int(a.max())), n
        a[n // 2] = info.min
        a[n // 3] = info.max
        assert bridge.minmax(a) == (int(a.min()), int(a.max())), n
        assert bridge.minmax(np.full(n, -3, dtype)) == (-3, -3)
    b = rng.integers(-100, 100, (40, 6, 9)).astype(dtype)
    assert bridge.minmax(b[:, ::2]) == (int(b[:, ::2].min()), int(b[:, ::2].max()))
    assert bridge.minmax(b) == (int(b.min()), int(b.max()))


@needs_core
@pytest.mark.parametrize("route", range(3))
def test_swiglu_on_every_route(route):
    """br_swiglu's AVX-512 route (route 2: 16 lanes, two vectors a step, the tail masked) and
    the cloned loop (routes 0, 1) against the spec: every row length around the 16- and
    32-value steps, the clamp, rounding ties of y, subnormals, signed zeros, huge products, and
    non-finite values anywhere in a row (the spec's result then)."""
    so = native.lib()
    if route > int(so.attn_best_route()):
        pytest.skip("route not on this CPU")
    rng = np.random.default_rng(route)
    so.attn_route(route)
    try:
        for n in (*range(1, 70), 255, 1000):
            g = rng.standard_normal((3, n)).astype(F32) * F32(30)
            u = rng.standard_normal((3, n)).astype(F32)
            g[0, ::3] = np.float32(np.log(2)) * np.arange(len(g[0, ::3]), dtype=F32) / 2
            g[1, :4] = [0.0, -0.0, 2.0 ** -149, -(2.0 ** -126)][: min(n, 4)]
            u[2, -1] = F32(3e38)
            same_result(result(bridge.swiglu, g, u), result(_spec_swiglu, g, u))
            for bad in NONFINITE:
                gb = g.copy()
                gb[1, n - 1] = bad
                with np.errstate(all="ignore"):
                    same_result(result(bridge.swiglu, gb, u), result(_spec_swiglu, gb, u))
    finally:
        so.attn_route(-1)


# ------------------------------------------------------------------------------ RoPE rows

ROPE_CASES = [(500000.0, 128, None), (10000.0, 64, None), (1e6, 6, None), (10000.0, 2, None),
              (500000.0, 128, "llama3")]


def _rope_cfg(theta, d, scaling):
    from commitllm.verifier.config import ModelConfig, RopeScaling

    rs = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                     original_max_position_embeddings=8192) if scaling else None
    return ModelConfig(family="llama", vocab_size=64, hidden_size=d * 2, intermediate_size=8,
                       num_layers=1, num_heads=2, num_kv_heads=1, head_dim=d, rms_norm_eps=1e-5,
                       rope_theta=theta, max_position_embeddings=2 ** 24,
                       tie_word_embeddings=False, attention_bias=False, rope_scaling=rs)


@needs_core
@pytest.mark.parametrize("theta,d,scaling", ROPE_CASES)
def test_rope_rows_are_the_specs(theta, d, scaling):
    """The compiled RoPE rows equal build_rows bit for bit: every bit position, the table's last
    row, duplicates, unsorted, none; what it does not take (a position outside the table, a
    negative one) goes to the spec and gives the spec's answer."""
    cfg = _rope_cfg(theta, d, scaling)
    table = spec_rope.RopeTable(cfg)
    cb, sb = table.cos_b, table.sin_b
    rng = np.random.default_rng(d)
    top = 2 ** spec_rope.POSITION_BITS
    cases = [np.arange(300), [top - 1, 0, top - 1, 1], [1 << b for b in range(24)],
             rng.integers(0, top, 257), rng.integers(0, 1024, 31), np.array([], np.int64),
             [5, 5, 5], [-1, 3], [top], [top + 12345, 2]]
    for pos in cases:
        pos = np.asarray(pos, dtype=np.int64)
        got, want = bridge.rope_rows(cb, sb, pos), spec_rope.build_rows(cb, sb, pos)
        for g, w in zip(got, want):
            same(g, w)


@needs_core
def test_the_verifiers_rope_table_is_the_specs():
    """RopeTable with the compiled rows (as verify builds it) answers every lookup, prefetch and
    whole-table growth with the spec table's bits."""
    cfg = _rope_cfg(500000.0, 128, "llama3")
    rng = np.random.default_rng(1)
    fast, spec = spec_rope.RopeTable(cfg, bridge.rope_rows), spec_rope.RopeTable(cfg)
    far = rng.integers(2000, 2 ** 20, 40)
    for t in (fast, spec):
        t.prefetch(far)
    for pos in (far[:7], np.arange(50), rng.integers(0, 3000, 9), np.array([2 ** 24 - 1])):
        for g, w in zip(fast.lookup(pos), spec.lookup(pos)):
            same(g, w)
    fast.ensure(5000), spec.ensure(5000)
    same(fast.cos, spec.cos), same(fast.sin, spec.sin)


def _rope_answer(fn, *args):
    """fn(*args) as bytes per output, or the exception's type."""
    try:
        return [(np.asarray(a).dtype, np.asarray(a).shape, np.asarray(a).tobytes())
                for a in fn(*args)]
    except Exception as e:  # noqa: BLE001 - the spec's own exception is the answer to match
        return type(e)


@needs_core
def test_rope_rows_gives_the_specs_answer_where_it_declines():
    """What an independent attacker found the compiled rows answering otherwise (none reachable
    from RopeTable): scalar positions (the spec raises), a table of more than 24 rows and a
    position from 2^24 (the spec reads 24 bits), NaN meeting NaN or inf times 0 (which NaN comes
    out is the compiler's operand order), np.matrix and masked tables. Each now goes to the
    spec, so the answer is the spec's, bytes or exception."""
    _, cb, sb = spec_rope._bases(10000.0, 8, None)
    nan, neg_nan = np.float64("nan"), -np.float64("nan")
    cb25 = np.vstack([cb, np.full((1, 4), 0.5)])
    sb25 = np.vstack([sb, np.full((1, 4), 0.5)])
    cases = [(cb, sb, 5), (cb, sb, np.int64(5)), (cb, sb, np.array(5)), (cb, sb, 7.5),
             (cb25, sb25, [2 ** 24]), (cb25, sb25, [2 ** 24 + 3, 1]),
             (np.array([[1.0], [nan]]), np.array([[neg_nan], [1.0]]), [3]),
             (np.array([[np.inf], [nan]]), np.array([[1.0], [1.0]]), [3]),
             (np.array([[1e200]]), np.array([[1e200]]), [1]),
             (np.asmatrix(cb), np.asmatrix(sb), [1, 2]),
             (np.ma.masked_array(cb, mask=np.eye(24, 4, dtype=bool)), sb, [1, 3, 7])]
    with np.errstate(all="ignore"):
        for i, (c, s, pos) in enumerate(cases):
            assert _rope_answer(bridge.rope_rows, c, s, pos) == \
                _rope_answer(spec_rope.build_rows, c, s, pos), i
