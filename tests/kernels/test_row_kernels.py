"""RMSNorm+quant, RoPE+quant and SwiGLU+quant kernels (Triton interpreter) equal the numpy spec
bit for bit, at every row config, for awkward and real (SmolLM2, Llama-3-8B) widths."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from commitllm.kernels import quantize as qz
from commitllm.kernels import rmsnorm_quant as rq
from commitllm.kernels import rope_quant as rp
from commitllm.kernels import swiglu_quant as sq
from commitllm.verifier.numerics import exp2 as spec_exp2
from commitllm.verifier.numerics import norm as spec_norm
from commitllm.verifier.numerics import quant as spec_quant
from commitllm.verifier.numerics import rope as spec_rope
from kutil import assert_bits_equal

F32 = np.float32
QMAXES = (32639, 127)
WIDTHS = (1, 7, 576, 1000, 1536, 4096)  # length 1, odd, SmolLM2 H, non-power-of-two, F, 8B H


def _rows(rng, t: int, h: int, scale: float = 3.0) -> np.ndarray:
    x = (rng.standard_normal((t, h)) * scale).astype(F32)
    if t > 1:
        x[1] = 0.0  # zero row: e = 0, s = 1, q = 0
    if t > 2:
        x[2] *= F32(2.0**-140)  # subnormal row: the 2^64 rescale in frexp_exponent
    if t > 3:
        x[3] *= F32(1e30)
    return x


@pytest.mark.parametrize("cfg", rq.CONFIGS, ids=str)
@pytest.mark.parametrize("h", WIDTHS)
@pytest.mark.parametrize("qmax", QMAXES)
def test_rmsnorm_quant_equals_spec(cfg, h, qmax):
    rng = np.random.default_rng(h + qmax)
    x = _rows(rng, 5, h)
    w = (1 + 0.1 * rng.standard_normal(h)).astype(F32)
    y_spec = spec_norm.rmsnorm(x, w, 1e-5)
    q_spec, s_spec = spec_quant.quantize_rows(y_spec, qmax)
    y, q, s = rq.rmsnorm_quant(torch.from_numpy(x), torch.from_numpy(w), 1e-5, qmax, config=cfg)
    assert_bits_equal(y, y_spec, "y")
    assert_bits_equal(q, q_spec, "q")
    assert_bits_equal(s, s_spec, "s")


def test_rmsnorm_quant_without_y_and_empty():
    x = torch.randn(3, 64)
    y, q, s = rq.rmsnorm_quant(x, torch.ones(64), 1e-6, 127, store_y=False)
    assert y is None
    _, q_ref, s_ref = rq.rmsnorm_quant_reference(x, torch.ones(64), 1e-6, 127)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    y, q, s = rq.rmsnorm_quant(torch.zeros(0, 64), torch.ones(64), 1e-6, 127)
    assert q.shape == (0, 64) and s.shape == (0,)


def test_rmsnorm_quant_rejects_bad_input():
    with pytest.raises(TypeError):
        rq.rmsnorm_quant(torch.zeros(2, 8, dtype=torch.float64), torch.ones(8), 1e-6, 127)
    with pytest.raises(ValueError):
        rq.rmsnorm_quant(torch.zeros(2, 8), torch.ones(9), 1e-6, 127)
    with pytest.raises(OverflowError):
        rq.rmsnorm_quant(torch.zeros(1, spec_norm.MAX_NORM_WIDTH + 1), torch.ones(
            spec_norm.MAX_NORM_WIDTH + 1), 1e-6, 127)


@pytest.mark.parametrize("cfg", rq.CONFIGS, ids=str)
@pytest.mark.parametrize("f", (1, 7, 1536, 14336))
@pytest.mark.parametrize("qmax", QMAXES)
def test_swiglu_quant_equals_spec(cfg, f, qmax):
    rng = np.random.default_rng(f + qmax)
    gu = (rng.standard_normal((3, 2 * f)) * 8).astype(F32)
    gu[0, 0], gu[0, f - 1] = 100.0, -100.0  # beyond the clamp: silu = g, g * 2^-64
    gu[1, : min(f, 4)] = [0.5, -0.5, 44.37, -44.37][: min(f, 4)]
    act_spec = spec_exp2.swiglu(gu[:, :f], gu[:, f:])
    q_spec, s_spec = spec_quant.quantize_rows(act_spec, qmax)
    act, q, s = sq.swiglu_quant(torch.from_numpy(gu), qmax, config=cfg)
    assert_bits_equal(act, act_spec, "act")
    assert_bits_equal(q, q_spec, "q")
    assert_bits_equal(s, s_spec, "s")


def test_swiglu_quant_rejects_odd_width():
    with pytest.raises(ValueError):
        sq.swiglu_quant(torch.zeros(2, 7), 127)


ROPE_SHAPES = [(1, 1, 1, 2), (3, 5, 1, 6), (7, 9, 3, 64), (2, 32, 8, 128)]  # (T, nh, nkv, d)


@pytest.mark.parametrize("shape", ROPE_SHAPES, ids=str)
@pytest.mark.parametrize("qmax", QMAXES)
def test_rope_quant_equals_spec(shape, qmax):
    t, nh, nkv, d = shape
    rng = np.random.default_rng(d + qmax)
    qkv = (rng.standard_normal((t, (nh + 2 * nkv) * d)) * 2).astype(F32)
    qkv[0, (nh + nkv) * d:(nh + nkv + 1) * d] = 0.0  # a zero V head
    freqs = rng.uniform(1e-4, 1.0, d // 2)
    cos_b, sin_b = np.cos(freqs * 2.0 ** np.arange(24)[:, None]), np.sin(
        freqs * 2.0 ** np.arange(24)[:, None])
    cos, sin = spec_rope.build_table(cos_b, sin_b, 5000)
    pos = rng.integers(0, 5000, t)
    c, s = cos[pos], sin[pos]
    q = spec_rope.apply_rope(qkv[:, :nh * d].reshape(t, nh, d), c, s)
    k = spec_rope.apply_rope(qkv[:, nh * d:(nh + nkv) * d].reshape(t, nkv, d), c, s)
    v = qkv[:, (nh + nkv) * d:].reshape(t, nkv, d)
    want = [spec_quant.quantize_rows(a, qmax) for a in (q, k, v)]
    got = rp.rope_quant(torch.from_numpy(qkv), torch.from_numpy(c), torch.from_numpy(s), nh,
                        nkv, qmax)
    for name, (gq, gs), (wq, ws) in zip("qkv", got, want):
        assert_bits_equal(gq.contiguous(), wq, name)
        assert_bits_equal(gs.contiguous(), ws, "s" + name)


def test_rope_quant_rejects_bad_width():
    with pytest.raises(ValueError):
        rp.rope_quant(torch.zeros(1, 30), torch.zeros(1, 2), torch.zeros(1, 2), 2, 1, 127)


@pytest.mark.parametrize("cfg", rq.CONFIGS, ids=str)
@pytest.mark.parametrize("k", (1, 7, 576, 4096))
@pytest.mark.parametrize("qmax", QMAXES)
def test_quantize_rows_equals_spec(cfg, k, qmax):
    x = _rows(np.random.default_rng(k + qmax), 5, k)
    ties = np.array([qmax, 2.5, 3.5, -0.5, -1.5, 0.5, 126.5], dtype=F32)[:k]
    x[0, :len(ties)], x[0, len(ties):] = ties, 0.0  # s = 1 exactly: x / s hits half-way points
    q_spec, s_spec = spec_quant.quantize_rows(x, qmax)
    q, s = qz.quantize_rows(torch.from_numpy(x), qmax, config=cfg)
    assert_bits_equal(q, q_spec, "q")
    assert_bits_equal(s, s_spec, "s")
