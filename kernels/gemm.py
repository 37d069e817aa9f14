"""Exact integer GEMM on int8 tensor cores with the dequantization epilogue of every linear.

A 16-bit operand (|q| <= 32639) is two int8 planes, q = 256 hi + lo; each plane pair is an int8
`tl.dot` with int32 accumulation, and the planes recombine exactly in int64:
z = 65536 (X_hi . W_hi) + 256 (X_hi . W_lo + X_lo . W_hi) + X_lo . W_lo (one plane for 8 bits).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..engine.exact import ops
from ..engine.exact.gemm import split_planes
from ..verifier.numerics.quant import EXACT_F64
from .launch import check_tensor, same_device

INT32_SAFE_K = 131071  # one plane pair: |sum| <= K * 128 * 128 < 2^31
INT32_SAFE_K_MID = 65535  # the middle term sums two plane pairs: K * 2 * 128 * 128 < 2^31


def linear_reference(qx, w_q, sx, sw, bias=None, resid=None, x_qmax=32639, w_qmax=127):
    """Plain torch: (y fp32 [M, N], z int64 [M, N]); y = resid + (((f32(z) * sx) * sw) + bias)."""
    z = qx.to(torch.int64) @ w_q.to(torch.int64).t()
    y = ops.dequantize(z, sx, sw, bias)
    return (y if resid is None else resid + y), z


@triton.jit
def _split_i8(x):
    """int16 tile -> int8 planes (hi, lo), x = 256 hi + lo, lo = ((x + 128) & 255) - 128."""
    xi = x.to(tl.int32)
    lo = ((xi + 128) & 255) - 128
    hi = (xi - lo) >> 8
    return hi.to(tl.int8), lo.to(tl.int8)


@triton.jit
def _gemm_kernel(
    # integer operands
    x_ptr, w_ptr,
    # epilogue operands
    sx_ptr, sw_ptr, bias_ptr, resid_ptr,
    # outputs
    y_ptr, z_ptr,
    # sizes and strides (unit stride along K and N)
    M, N, K, stride_xm, stride_wp, stride_wn, stride_rm, stride_ym, stride_zm,
    # meta
    X_PLANES: tl.constexpr, W_PLANES: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_RESID: tl.constexpr, TRACE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """y[m, n] = (resid[m, n] +) (((f32(z) * sx[m]) * sw[n]) (+ bias[n])), z = x[m, :] . w[n, :].

    x: int16 [M, K] split in registers into planes (X_PLANES = 2) or int8 [M, K] (X_PLANES = 1);
    w: int8 planes [W_PLANES, N, K], most significant first; sx fp32 [M], sw/bias fp32 [N],
    resid/y fp32 [M, N]; z int64 [M, N] written when TRACE. Accumulators are int32 per weight
    (65536, 256, 1), bounded by the launcher's K check, recombined in int64 after the K loop.
    """
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * grid_n)
    first_m = group * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * grid_n)) % size_m
    pid_n = (pid % (GROUP_M * grid_n)) // size_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # rows/columns past the edge wrap onto valid ones (their results are never stored), so the
    # loads need a mask along K only; int32 offsets keep the pointer tiles small (M*K, N*K < 2^31)
    x_ptrs = x_ptr + (rm % M)[:, None] * stride_xm + rk[None, :]
    w_ptrs = w_ptr + (rn % N)[None, :] * stride_wn + rk[:, None]
    acc2 = tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
    acc1 = tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
    acc0 = tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
    for k in range(0, K, BLOCK_K):
        x = tl.load(x_ptrs, mask=rk[None, :] < K - k, other=0)
        w_a = tl.load(w_ptrs, mask=rk[:, None] < K - k, other=0)  # [BLOCK_K, BLOCK_N] top plane
        if X_PLANES == 2:
            x_hi, x_lo = _split_i8(x)
            if W_PLANES == 2:
                w_b = tl.load(w_ptrs + stride_wp, mask=rk[:, None] < K - k, other=0)
                acc2 = tl.dot(x_hi, w_a, acc2, out_dtype=tl.int32)
                acc1 = tl.dot(x_hi, w_b, acc1, out_dtype=tl.int32)
                acc1 = tl.dot(x_lo, w_a, acc1, out_dtype=tl.int32)
                acc0 = tl.dot(x_lo, w_b, acc0, out_dtype=tl.int32)
            else:
                acc1 = tl.dot(x_hi, w_a, acc1, out_dtype=tl.int32)
                acc0 = tl.dot(x_lo, w_a, acc0, out_dtype=tl.int32)
        else:
            if W_PLANES == 2:
                w_b = tl.load(w_ptrs + stride_wp, mask=rk[:, None] < K - k, other=0)
                acc1 = tl.dot(x, w_a, acc1, out_dtype=tl.int32)
                acc0 = tl.dot(x, w_b, acc0, out_dtype=tl.int32)
            else:
                acc0 = tl.dot(x, w_a, acc0, out_dtype=tl.int32)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    z = (acc2.to(tl.int64) * 65536 + acc1.to(tl.int64) * 256) + acc0.to(tl.int64)
    om = (rm[:, None] < M) & (rn[None, :] < N)
    row = rm[:, None].to(tl.int64)
    if TRACE:
        tl.store(z_ptr + row * stride_zm + rn[None, :], z, mask=om)
    sx = tl.load(sx_ptr + rm, mask=rm < M, other=1.0)
    sw = tl.load(sw_ptr + rn, mask=rn < N, other=1.0)
    y = (z.to(tl.float32) * sx[:, None]) * sw[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + rn, mask=rn < N, other=0.0)[None, :]
    if HAS_RESID:
        y = tl.load(resid_ptr + row * stride_rm + rn[None, :], mask=om, other=0.0) + y
    tl.store(y_ptr + row * stride_ym + rn[None, :], y, mask=om)


@dataclass(frozen=True)
class GemmConfig:
    """Tile sizes, warps and pipeline stages of one compiled variant."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8


# Chosen so no profile's variant spills on sm_80/sm_90 (see `commitllm-engine kernels check`):
# the 16-bit profiles keep 2-3 int32 accumulator tiles live, BLOCK_M * BLOCK_N * 3 / threads regs.
CONFIGS = (
    GemmConfig(16, 64, 128, 4, 4),  # decode: M <= 16, N-parallel
    GemmConfig(32, 64, 128, 8, 4),
    GemmConfig(64, 64, 64, 4, 3),
    GemmConfig(128, 64, 64, 8, 3),  # prefill
)


def pick_config(m: int) -> GemmConfig:
    """The first config whose BLOCK_M covers M, else the largest tile."""
    return next((c for c in CONFIGS if c.block_m >= m), CONFIGS[-1])


def weight_planes(w_q: torch.Tensor, qmax: int) -> torch.Tensor:
    """int weight [N, K] -> int8 planes [P, N, K], most significant first (P = 1 for 8 bits)."""
    if qmax <= 127:
        return w_q.to(torch.int8).unsqueeze(0).contiguous()
    hi, lo = split_planes(w_q)
    return torch.stack([hi, lo]).contiguous()


def linear(qx: torch.Tensor, w_planes: torch.Tensor, sx: torch.Tensor, sw: torch.Tensor,
           bias: torch.Tensor | None = None, resid: torch.Tensor | None = None,
           trace: bool = False, config: GemmConfig | None = None):
    """qx int16/int8 [M, K], w_planes int8 [P, N, K] -> (y fp32 [M, N], z int64 [M, N] or None)."""
    check_tensor("qx", qx, (torch.int16, torch.int8), 2)
    check_tensor("w_planes", w_planes, torch.int8, 3)
    m, k = qx.shape
    p, n, kw = w_planes.shape
    if kw != k or p not in (1, 2) or not w_planes.is_contiguous():
        raise ValueError(f"w_planes {tuple(w_planes.shape)} does not match K={k} "
                         "(contiguous, 1 or 2 planes)")
    check_tensor("sx", sx, torch.float32, 1, (m,))
    check_tensor("sw", sw, torch.float32, 1, (n,))
    if bias is not None:
        check_tensor("bias", bias, torch.float32, 1, (n,))
    if resid is not None:
        check_tensor("resid", resid, torch.float32, 2, (m, n))
    same_device(qx, w_planes, sx, sw, bias, resid)
    x_planes = 2 if qx.dtype == torch.int16 else 1
    _check_k(k, x_planes, p)
    if max(m * k, p * n * k) >= 2**31:  # the kernel's operand offsets are int32
        raise OverflowError(f"operands of {m} x {k} and {p} x {n} x {k} exceed int32 offsets")
    cfg = config or pick_config(m)
    y = torch.empty((m, n), dtype=torch.float32, device=qx.device)
    z = torch.empty((m, n), dtype=torch.int64, device=qx.device) if trace else None
    if m and n:
        grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
        _gemm_kernel[grid](
            qx, w_planes, sx, sw, bias if bias is not None else sw,
            resid if resid is not None else y, y, z if trace else y,
            m, n, k, qx.stride(0), w_planes.stride(0), w_planes.stride(1),
            resid.stride(0) if resid is not None else 0, y.stride(0), z.stride(0) if trace else 0,
            X_PLANES=x_planes, W_PLANES=p, HAS_BIAS=bias is not None,
            HAS_RESID=resid is not None, TRACE=trace, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, num_warps=cfg.num_warps,
            num_stages=cfg.num_stages, enable_fp_fusion=False)
    return y, z


def _check_k(k: int, x_planes: int, w_planes: int) -> None:
    """The int32 plane accumulators and the int64 -> fp32 conversion must stay exact."""
    limit = INT32_SAFE_K_MID if x_planes == 2 and w_planes == 2 else INT32_SAFE_K
    if k > limit:
        raise OverflowError(f"K={k} exceeds {limit} for int32 plane accumulation")
    qx = 32639 if x_planes == 2 else 127
    qw = 32639 if w_planes == 2 else 127
    if k * qx * qw >= EXACT_F64:
        raise OverflowError(f"K={k} can exceed 2^53")
