"""RMSNorm with an exact integer sum of squares, fused with per-token quantization.

y = rmsnorm(x, w, eps) (spec norm.rmsnorm), then (q, s) = quantize_rows(y, qmax) (spec quant).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..engine.exact import ops
from ..verifier.numerics.norm import MAX_NORM_WIDTH, NORM_FRAC_BITS
from .exactmath import frexp_exponent, pow2_f64, quant_scale, quant_values, rint_f64
from .launch import check_tensor, int_dtype


def rmsnorm_quant_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, qmax: int):
    """Plain torch: (y fp32 [T, H], q int [T, H], s fp32 [T])."""
    y = ops.rmsnorm(x, weight, eps)
    q, s = ops.quantize_rows(y, qmax)
    return y, q, s


@triton.jit
def _rmsnorm_quant_kernel(
    # inputs
    x_ptr, w_ptr, eps,
    # outputs
    y_ptr, q_ptr, s_ptr,
    # sizes and strides (rows are contiguous)
    H, stride_x, stride_y, stride_q,
    # meta
    QMAX: tl.constexpr, FRAC_BITS: tl.constexpr, BLOCK: tl.constexpr, STORE_Y: tl.constexpr,
):
    """One program per row t of x fp32 [T, H]; w fp32 [H]; eps fp32 (spec: f64(f32(eps))).

    e = frexp exponent of max|x|; X_i = rint(f64(x_i) * 2^(23-e)) int64; ss = sum X_i^2 (exact);
    ms = (f64(ss) / f64(H)) * 2^(2(e-23)); r = f32(1 / sqrt(ms + eps)) in f64 (div.rn/sqrt.rn.f64);
    y_i = (x_i * r) * w_i fp32; s = max|y| / QMAX; q_i = clip(rint(y_i / s)) -> q [T, H] int8/16,
    s [T] fp32, y [T, H] fp32 when STORE_Y. The row is walked in BLOCK chunks (4 sweeps; each
    sweep recomputes from x, so nothing written is read back).
    """
    row = tl.program_id(0).to(tl.int64)
    xr = x_ptr + row * stride_x
    offs = tl.arange(0, BLOCK)
    amax = tl.zeros([BLOCK], tl.float32)
    for k in range(0, H, BLOCK):
        m = k + offs < H
        amax = tl.maximum(amax, tl.abs(tl.load(xr + k + offs, mask=m, other=0.0)))
    e = frexp_exponent(tl.max(amax, axis=0))
    scale = pow2_f64(FRAC_BITS - e)
    ss = tl.zeros([BLOCK], tl.int64)
    for k in range(0, H, BLOCK):
        m = k + offs < H
        xv = tl.load(xr + k + offs, mask=m, other=0.0)
        big = rint_f64(xv.to(tl.float64) * scale).to(tl.int64)
        ss += big * big
    sst = tl.sum(ss, axis=0)
    hi = sst >> 32
    lo = sst - (hi << 32)
    ss64 = (hi.to(tl.float64) * 4294967296.0) + lo.to(tl.float64)
    ms = (ss64 / tl.cast(H, tl.float64)) * pow2_f64(2 * (e - FRAC_BITS))
    # fp64 `/` and tl.sqrt lower to div.rn.f64 / sqrt.rn.f64 (tl.sqrt_rn and div_rn take fp32
    # only in Triton 3.9); `kernels check` fails on any .approx or rounding-mode-less float op.
    r = (1.0 / tl.sqrt(ms + tl.cast(eps, tl.float64))).to(tl.float32)
    ymax = tl.zeros([BLOCK], tl.float32)
    for k in range(0, H, BLOCK):
        m = k + offs < H
        w = tl.load(w_ptr + k + offs, mask=m, other=0.0)
        y = (tl.load(xr + k + offs, mask=m, other=0.0) * r) * w
        ymax = tl.maximum(ymax, tl.abs(tl.where(m, y, 0.0)))
        if STORE_Y:
            tl.store(y_ptr + row * stride_y + k + offs, y, mask=m)
    s = quant_scale(tl.max(ymax, axis=0), QMAX)
    tl.store(s_ptr + row, s)
    for k in range(0, H, BLOCK):
        m = k + offs < H
        w = tl.load(w_ptr + k + offs, mask=m, other=0.0)
        y = (tl.load(xr + k + offs, mask=m, other=0.0) * r) * w
        q = quant_values(y, s, QMAX)
        tl.store(q_ptr + row * stride_q + k + offs, q.to(q_ptr.dtype.element_ty), mask=m)


@dataclass(frozen=True)
class RowConfig:
    """A row kernel's chunk width and warp count."""

    block: int
    num_warps: int


CONFIGS = (RowConfig(256, 2), RowConfig(1024, 4), RowConfig(4096, 8))


def pick_config(width: int) -> RowConfig:
    """The smallest chunk that covers the row, else the widest."""
    return next((c for c in CONFIGS if c.block >= width), CONFIGS[-1])


def rmsnorm_quant(x: torch.Tensor, weight: torch.Tensor, eps: float, qmax: int,
                  store_y: bool = True, config: RowConfig | None = None):
    """x fp32 [T, H], weight fp32 [H] -> (y fp32 [T, H] or None, q int [T, H], s fp32 [T])."""
    check_tensor("x", x, torch.float32, 2)
    t, h = x.shape
    check_tensor("weight", weight, torch.float32, 1, (h,))
    if h > MAX_NORM_WIDTH:  # |X_i| <= 2^23, so H * 2^46 < 2^63 needs H < 2^17
        raise OverflowError(f"row width {h} exceeds {MAX_NORM_WIDTH}")
    cfg = config or pick_config(h)
    q = torch.empty((t, h), dtype=int_dtype(qmax), device=x.device)
    s = torch.empty((t,), dtype=torch.float32, device=x.device)
    y = torch.empty((t, h), dtype=torch.float32, device=x.device) if store_y else q
    if t:
        eps32 = float(torch.tensor(eps, dtype=torch.float32).item())
        _rmsnorm_quant_kernel[(t,)](
            x, weight, eps32, y, q, s, h, x.stride(0), y.stride(0), q.stride(0),
            QMAX=qmax, FRAC_BITS=NORM_FRAC_BITS, BLOCK=cfg.block, STORE_Y=store_y,
            num_warps=cfg.num_warps, enable_fp_fusion=False)
    return (y if store_y else None), q, s
