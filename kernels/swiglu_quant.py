"""SwiGLU (SiLU by the fixed exp2 polynomial) fused with per-token quantization for the down
projection."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..engine.exact import ops
from ..verifier.numerics import exp2 as spec_exp2
from .exactmath import exp2_poly, quant_scale, quant_values
from .launch import check_tensor, int_dtype
from .rmsnorm_quant import RowConfig, pick_config

NEG_LOG2E = tl.constexpr(float(spec_exp2.NEG_LOG2E))
SILU_CLAMP = tl.constexpr(float(spec_exp2.SILU_CLAMP))


def swiglu_quant_reference(gu: torch.Tensor, qmax: int):
    """Plain torch: gu fp32 [T, 2F] ([gate; up]) -> (act fp32 [T, F], q int [T, F], s fp32 [T])."""
    f = gu.shape[1] // 2
    act = ops.swiglu(gu[:, :f], gu[:, f:])
    q, s = ops.quantize_rows(act, qmax)
    return act, q, s


@triton.jit
def _swiglu(g, u):
    """silu(g) * u = (g / (1 + exp2(clamp(g * NEG_LOG2E, -64, 64)))) * u, fp32, div.rn."""
    y = tl.minimum(tl.maximum(g * NEG_LOG2E, -SILU_CLAMP), SILU_CLAMP)
    return tl.math.div_rn(g, 1.0 + exp2_poly(y)) * u


@triton.jit
def _swiglu_quant_kernel(
    # input
    gu_ptr,
    # outputs
    act_ptr, q_ptr, s_ptr,
    # sizes and strides (rows are contiguous)
    F, stride_gu, stride_act, stride_q,
    # meta
    QMAX: tl.constexpr, BLOCK: tl.constexpr, STORE_ACT: tl.constexpr,
):
    """One program per row t of gu fp32 [T, 2F] (gate = gu[:, :F], up = gu[:, F:]).

    act = silu(gate) * up fp32 [T, F] (stored when STORE_ACT); s = max|act| / QMAX fp32 [T];
    q = clip(rint(act / s)) int [T, F]. Two sweeps of BLOCK chunks; the second recomputes act.
    """
    row = tl.program_id(0).to(tl.int64)
    gr = gu_ptr + row * stride_gu
    offs = tl.arange(0, BLOCK)
    amax = tl.zeros([BLOCK], tl.float32)
    for k in range(0, F, BLOCK):
        m = k + offs < F
        a = _swiglu(tl.load(gr + k + offs, mask=m, other=0.0),
                    tl.load(gr + F + k + offs, mask=m, other=0.0))
        amax = tl.maximum(amax, tl.abs(a))
        if STORE_ACT:
            tl.store(act_ptr + row * stride_act + k + offs, a, mask=m)
    s = quant_scale(tl.max(amax, axis=0), QMAX)
    tl.store(s_ptr + row, s)
    for k in range(0, F, BLOCK):
        m = k + offs < F
        a = _swiglu(tl.load(gr + k + offs, mask=m, other=0.0),
                    tl.load(gr + F + k + offs, mask=m, other=0.0))
        q = quant_values(a, s, QMAX)
        tl.store(q_ptr + row * stride_q + k + offs, q.to(q_ptr.dtype.element_ty), mask=m)


def swiglu_quant(gu: torch.Tensor, qmax: int, store_act: bool = True,
                 config: RowConfig | None = None):
    """gu fp32 [T, 2F] -> (act fp32 [T, F] or None, q int [T, F], s fp32 [T])."""
    check_tensor("gu", gu, torch.float32, 2)
    t, two_f = gu.shape
    if two_f % 2:
        raise ValueError(f"gate/up width {two_f} is odd")
    f = two_f // 2
    cfg = config or pick_config(f)
    q = torch.empty((t, f), dtype=int_dtype(qmax), device=gu.device)
    s = torch.empty((t,), dtype=torch.float32, device=gu.device)
    act = torch.empty((t, f), dtype=torch.float32, device=gu.device) if store_act else q
    if t and f:
        _swiglu_quant_kernel[(t,)](
            gu, act, q, s, f, gu.stride(0), act.stride(0), q.stride(0),
            QMAX=qmax, BLOCK=cfg.block, STORE_ACT=store_act, num_warps=cfg.num_warps,
            enable_fp_fusion=False)
    return (act if store_act else None), q, s
