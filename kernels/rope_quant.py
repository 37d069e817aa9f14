"""RoPE (rotate-half, host fp32 cos/sin table) on Q and K, then per-(token, head) quantization of
Q, K and V, straight from the fused qkv linear's fp32 output."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..engine.exact import ops
from .exactmath import quant_scale, quant_values
from .launch import check_tensor, int_dtype, same_device


def rope_quant_reference(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, nh: int,
                         nkv: int, qmax: int):
    """Plain torch: ((q, sq), (k, sk), (v, sv)); q int [T, nh, d], sq fp32 [T, nh], k/v/sk/sv
    likewise over nkv heads."""
    t = qkv.shape[0]
    d = qkv.shape[1] // (nh + 2 * nkv)
    q = ops.apply_rope(qkv[:, :nh * d].reshape(t, nh, d), cos, sin)
    k = ops.apply_rope(qkv[:, nh * d:(nh + nkv) * d].reshape(t, nkv, d), cos, sin)
    v = qkv[:, (nh + nkv) * d:].reshape(t, nkv, d)
    return tuple(ops.quantize_rows(a, qmax) for a in (q, k, v))


@triton.jit
def _rope_quant_kernel(
    # inputs
    qkv_ptr, cos_ptr, sin_ptr,
    # outputs
    out_ptr, s_ptr,
    # sizes and strides
    HALF, N_ROPE, stride_x, stride_cs, stride_ot, stride_oh, stride_st,
    # meta
    QMAX: tl.constexpr, BLOCK: tl.constexpr,
):
    """Program (t, h) over heads h of qkv fp32 [T, n_heads * d] (n_heads = nh + 2 nkv, d = 2 HALF).

    Heads h < N_ROPE (= nh + nkv, the Q and K heads) are rotated with c = cos[t], s = sin[t]
    fp32 [T, HALF]: out1 = (x1 * c) - (x2 * s), out2 = (x2 * c) + (x1 * s); V heads pass through.
    Then s_th = max|x| / QMAX and q = clip(rint(x / s_th)): out int [T, n_heads, d],
    s fp32 [T, n_heads].
    """
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs = tl.arange(0, BLOCK)
    m = offs < HALF
    xr = qkv_ptr + t * stride_x + h * (2 * HALF)
    x1 = tl.load(xr + offs, mask=m, other=0.0)
    x2 = tl.load(xr + HALF + offs, mask=m, other=0.0)
    if h < N_ROPE:
        c = tl.load(cos_ptr + t * stride_cs + offs, mask=m, other=0.0)
        s = tl.load(sin_ptr + t * stride_cs + offs, mask=m, other=0.0)
        y1 = (x1 * c) - (x2 * s)
        y2 = (x2 * c) + (x1 * s)
    else:
        y1 = x1
        y2 = x2
    amax = tl.maximum(tl.max(tl.abs(y1), axis=0), tl.max(tl.abs(y2), axis=0))
    sc = quant_scale(amax, QMAX)
    tl.store(s_ptr + t * stride_st + h, sc)
    o = out_ptr + t * stride_ot + h * stride_oh
    ty = out_ptr.dtype.element_ty
    tl.store(o + offs, quant_values(y1, sc, QMAX).to(ty), mask=m)
    tl.store(o + HALF + offs, quant_values(y2, sc, QMAX).to(ty), mask=m)


def rope_quant(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, nh: int, nkv: int,
               qmax: int, num_warps: int = 1):
    """qkv fp32 [T, (nh + 2 nkv) d], cos/sin fp32 [T, d/2] -> ((q, sq), (k, sk), (v, sv)).

    q int [T, nh, d] and k, v int [T, nkv, d] are head slices of one [T, nh + 2 nkv, d] buffer
    (views, unit stride along d); the scales are fp32 [T, heads] views likewise.
    """
    check_tensor("qkv", qkv, torch.float32, 2)
    t, width = qkv.shape
    heads = nh + 2 * nkv
    if width % heads or (width // heads) % 2:
        raise ValueError(f"qkv width {width} is not {heads} heads of an even head_dim")
    half = width // heads // 2
    check_tensor("cos", cos, torch.float32, 2, (t, half))
    check_tensor("sin", sin, torch.float32, 2, (t, half))
    if cos.stride() != sin.stride():
        raise ValueError("cos and sin must share strides")
    same_device(qkv, cos, sin)
    out = torch.empty((t, heads, 2 * half), dtype=int_dtype(qmax), device=qkv.device)
    s = torch.empty((t, heads), dtype=torch.float32, device=qkv.device)
    if t:
        _rope_quant_kernel[(t, heads)](
            qkv, cos, sin, out, s, half, nh + nkv, qkv.stride(0), cos.stride(0),
            out.stride(0), out.stride(1), s.stride(0),
            QMAX=qmax, BLOCK=triton.next_power_of_2(half), num_warps=num_warps,
            enable_fp_fusion=False)
    q_end, k_end = nh, nh + nkv
    return ((out[:, :q_end], s[:, :q_end]), (out[:, q_end:k_end], s[:, q_end:k_end]),
            (out[:, k_end:], s[:, k_end:]))
