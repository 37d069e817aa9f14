"""The int8-plane GEMM kernel (Triton interpreter) equals the spec's exact integer product and
dequantization bit for bit, at every tile config and for every profile's operand widths."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from commitllm.kernels import gemm
from commitllm.verifier.numerics import PROFILES
from commitllm.verifier.numerics import quant as spec_quant
from kutil import assert_bits_equal

F32 = np.float32
WIDTHS = sorted({(p.act_qmax, p.weight_qmax) for p in PROFILES.values()})  # (x, w) qmax pairs
SHAPES = [(1, 1, 1), (3, 70, 200), (17, 129, 576), (33, 64, 1000)]  # (M, N, K)


def _operands(rng, m, n, k, xq, wq):
    qx = rng.integers(-xq, xq + 1, (m, k))
    qw = rng.integers(-wq, wq + 1, (n, k))
    qx[0], qw[0] = xq, -wq  # extreme rows: every plane product at its bound
    if m > 1:
        qx[1] = -xq
    sx = rng.uniform(0.01, 2, m).astype(F32)
    sw = rng.uniform(1e-4, 0.05, n).astype(F32)
    bias = rng.standard_normal(n).astype(F32)
    resid = rng.standard_normal((m, n)).astype(F32)
    xdt = np.int8 if xq <= 127 else np.int16
    wdt = np.int8 if wq <= 127 else np.int16
    return qx.astype(xdt), qw.astype(wdt), sx, sw, bias, resid


def _spec(qx, qw, sx, sw, bias, resid, xq, wq):
    z = spec_quant.int_matmul(qx, qw, xq, wq)
    y = spec_quant.dequantize(z, sx, sw, bias)
    return z, (y if resid is None else (resid + y).astype(F32))


def _run(qx, qw, sx, sw, bias, resid, wq, cfg):
    t = torch.from_numpy
    return gemm.linear(t(qx), gemm.weight_planes(t(qw), wq), t(sx), t(sw),
                       None if bias is None else t(bias), None if resid is None else t(resid),
                       trace=True, config=cfg)


@pytest.mark.parametrize("cfg", gemm.CONFIGS, ids=str)
@pytest.mark.parametrize("widths", WIDTHS, ids=lambda w: f"x{w[0]}w{w[1]}")
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gemm_equals_spec(cfg, widths, shape):
    xq, wq = widths
    rng = np.random.default_rng(sum(shape) + xq + wq)
    qx, qw, sx, sw, bias, resid = _operands(rng, *shape, xq, wq)
    z_spec, y_spec = _spec(qx, qw, sx, sw, bias, resid, xq, wq)
    y, z = _run(qx, qw, sx, sw, bias, resid, wq, cfg)
    assert_bits_equal(z, z_spec, "z")
    assert_bits_equal(y, y_spec, "y")


@pytest.mark.parametrize("bias,resid", [(False, False), (True, False), (False, True)])
def test_gemm_epilogue_options(bias, resid):
    rng = np.random.default_rng(3)
    qx, qw, sx, sw, b, r = _operands(rng, 5, 40, 96, 32639, 127)
    b, r = (b if bias else None), (r if resid else None)
    z_spec, y_spec = _spec(qx, qw, sx, sw, b, r, 32639, 127)
    y, z = _run(qx, qw, sx, sw, b, r, 127, None)
    assert_bits_equal(z, z_spec, "z")
    assert_bits_equal(y, y_spec, "y")
    y2, none = gemm.linear(torch.from_numpy(qx), gemm.weight_planes(torch.from_numpy(qw), 127),
                           torch.from_numpy(sx), torch.from_numpy(sw),
                           None if b is None else torch.from_numpy(b),
                           None if r is None else torch.from_numpy(r))
    assert none is None and torch.equal(y2, y)


# real sizes, small M: SmolLM2 (H 576, F 1536, qkv 960) in full; Llama-3-8B (H 4096, F 14336)
# with its real K but 128 output columns (the interpreter runs ~4 ms per tile step; N adds
# nothing new for exactness, K carries the accumulator bound). Full Llama widths under slow.
REAL = [(2, 960, 576), (3, 576, 1536), (1, 128, 4096), (2, 128, 14336)]
REAL_SLOW = [(1, 6144, 4096), (1, 4096, 14336)]


@pytest.mark.parametrize("shape", REAL + [pytest.param(s, marks=pytest.mark.slow)
                                          for s in REAL_SLOW], ids=str)
def test_gemm_real_shapes(shape):
    rng = np.random.default_rng(shape[1])
    qx, qw, sx, sw, _, resid = _operands(rng, *shape, 32639, 127)
    z_spec, y_spec = _spec(qx, qw, sx, sw, None, resid, 32639, 127)
    y, z = _run(qx, qw, sx, sw, None, resid, 127, gemm.CONFIGS[0])
    assert_bits_equal(z, z_spec, "z")
    assert_bits_equal(y, y_spec, "y")


@pytest.mark.slow
@pytest.mark.parametrize("cfg", gemm.CONFIGS, ids=str)
def test_gemm_llama_gate_up_every_config(cfg):
    rng = np.random.default_rng(11)
    qx, qw, sx, sw, _, _ = _operands(rng, 4, 2 * 14336, 4096, 32639, 127)
    z_spec, y_spec = _spec(qx, qw, sx, sw, None, None, 32639, 127)
    y, z = _run(qx, qw, sx, sw, None, None, 127, cfg)
    assert_bits_equal(z, z_spec, "z")
    assert_bits_equal(y, y_spec, "y")


def test_weight_planes_recombine():
    w = torch.randint(-32639, 32640, (7, 9), dtype=torch.int16)
    p = gemm.weight_planes(w, 32639)
    assert p.shape == (2, 7, 9) and p.dtype == torch.int8
    assert torch.equal(p[0].long() * 256 + p[1].long(), w.long())
    assert gemm.weight_planes(w.clamp(-127, 127).to(torch.int8), 127).shape == (1, 7, 9)


def test_gemm_bounds_and_checks():
    x = torch.zeros(1, gemm.INT32_SAFE_K_MID + 1, dtype=torch.int16)
    w = torch.zeros(2, 1, gemm.INT32_SAFE_K_MID + 1, dtype=torch.int8)
    with pytest.raises(OverflowError):
        gemm.linear(x, w, torch.ones(1), torch.ones(1))
    with pytest.raises(ValueError):
        gemm.linear(torch.zeros(1, 8, dtype=torch.int16), torch.zeros(1, 2, 9, dtype=torch.int8),
                    torch.ones(1), torch.ones(2))
    with pytest.raises(TypeError):
        gemm.linear(torch.zeros(1, 8, dtype=torch.int32), torch.zeros(1, 2, 8, dtype=torch.int8),
                    torch.ones(1), torch.ones(2))
