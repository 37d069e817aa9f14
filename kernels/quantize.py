"""Per-row symmetric quantization (spec quant.quantize_rows) for a linear input that no fused
kernel quantizes: the attention output going into the o projection."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..engine.exact import ops
from .exactmath import quant_scale, quant_values
from .launch import check_tensor, int_dtype
from .rmsnorm_quant import RowConfig, pick_config


def quantize_rows_reference(x: torch.Tensor, qmax: int):
    """Plain torch: (q int [T, K], s fp32 [T])."""
    return ops.quantize_rows(x, qmax)


@triton.jit
def _quantize_rows_kernel(
    # input
    x_ptr,
    # outputs
    q_ptr, s_ptr,
    # sizes and strides (rows are contiguous)
    K, stride_x, stride_q,
    # meta
    QMAX: tl.constexpr, BLOCK: tl.constexpr,
):
    """One program per row of x fp32 [T, K]: s = max|x| / QMAX (div.rn; 1 for a zero row) fp32 [T],
    q = clip(rint(x / s), -QMAX, QMAX) int [T, K]. Two sweeps of BLOCK chunks."""
    row = tl.program_id(0).to(tl.int64)
    xr = x_ptr + row * stride_x
    offs = tl.arange(0, BLOCK)
    amax = tl.zeros([BLOCK], tl.float32)
    for k in range(0, K, BLOCK):
        amax = tl.maximum(amax, tl.abs(tl.load(xr + k + offs, mask=k + offs < K, other=0.0)))
    s = quant_scale(tl.max(amax, axis=0), QMAX)
    tl.store(s_ptr + row, s)
    for k in range(0, K, BLOCK):
        m = k + offs < K
        q = quant_values(tl.load(xr + k + offs, mask=m, other=0.0), s, QMAX)
        tl.store(q_ptr + row * stride_q + k + offs, q.to(q_ptr.dtype.element_ty), mask=m)


def quantize_rows(x: torch.Tensor, qmax: int, config: RowConfig | None = None):
    """x fp32 [T, K] -> (q int8/int16 [T, K], s fp32 [T])."""
    check_tensor("x", x, torch.float32, 2)
    t, k = x.shape
    cfg = config or pick_config(k)
    q = torch.empty((t, k), dtype=int_dtype(qmax), device=x.device)
    s = torch.empty((t,), dtype=torch.float32, device=x.device)
    if t and k:
        _quantize_rows_kernel[(t,)](x, q, s, k, x.stride(0), q.stride(0), QMAX=qmax,
                                    BLOCK=cfg.block, num_warps=cfg.num_warps,
                                    enable_fp_fusion=False)
    return q, s
