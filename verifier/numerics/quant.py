"""Symmetric quantization per row, and the exact integer GEMM with its dequantization."""

from __future__ import annotations

import numpy as np

F32 = np.float32
EXACT_F64 = 2**53  # float64 holds every integer below this exactly


def int_dtype(qmax: int):
    """The narrowest signed type that holds [-qmax, qmax]."""
    return np.int8 if qmax <= 127 else np.int16


def quantize_rows(x: np.ndarray, qmax: int) -> tuple[np.ndarray, np.ndarray]:
    """x fp32 [..., K] -> (q int [..., K], s fp32 [...]) with x ~ q * s.

    s = max|x| / qmax (one rounding); q = clip(rint(x / s), -qmax, qmax) with rint half-to-even.
    A row whose s is zero (all zeros, or max|x| so small the division underflows) gets s = 1, q = 0.
    """
    if x.dtype != F32:
        raise TypeError(f"quantize_rows expects float32, got {x.dtype}")
    amax = np.max(np.abs(x), axis=-1)  # [...]
    if not np.all(np.isfinite(amax)):
        raise FloatingPointError("non-finite value in a row to quantize")
    s = amax / F32(qmax)
    zero = s == 0
    s = np.where(zero, F32(1), s).astype(F32)
    q = np.rint(x / s[..., None])
    q = np.where(zero[..., None], F32(0), np.clip(q, -qmax, qmax))
    return q.astype(int_dtype(qmax)), s


def int_matmul(qx: np.ndarray, qw: np.ndarray, qmax_x: int, qmax_w: int) -> np.ndarray:
    """Exact z = qx @ qw.T as int64; qx [T, K], qw [N, K] (or their float64 copies).

    Computed through float64 BLAS: every product and every partial sum is an integer of magnitude
    at most K * qmax_x * qmax_w, asserted below 2^53, so any summation order is exact.
    """
    k = qx.shape[-1]
    if k * qmax_x * qmax_w >= EXACT_F64:
        raise OverflowError(f"K={k} with ranges {qmax_x}x{qmax_w} can exceed 2^53")
    z = np.asarray(qx, dtype=np.float64) @ np.asarray(qw, dtype=np.float64).T
    return z.astype(np.int64)


def int_to_f32(z: np.ndarray) -> np.ndarray:
    """Integer -> fp32, rounded to nearest even once (through float64, exact below 2^53)."""
    if np.any((z >= EXACT_F64) | (z <= -EXACT_F64)):  # not np.abs: abs(INT64_MIN) < 0
        raise OverflowError("integer beyond 2^53 cannot be converted exactly")
    return z.astype(np.float64).astype(F32)


def dequantize(z: np.ndarray, sx: np.ndarray, sw: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """y[t, j] = ((f32(z[t, j]) * sx[t]) * sw[j]) + bias[j], left to right, each op rounded."""
    y = (int_to_f32(z) * sx[:, None]) * sw[None, :]
    if bias is not None:
        y = y + bias[None, :]
    return y.astype(F32)


def linear(x: np.ndarray, w_q: np.ndarray, w_s: np.ndarray, bias: np.ndarray | None,
           act_qmax: int, w_qmax: int) -> tuple[np.ndarray, dict]:
    """Quantize x per token, exact GEMM, dequantize. Returns (y fp32 [T, N], parts)."""
    qx, sx = quantize_rows(x, act_qmax)
    z = int_matmul(qx, w_q, act_qmax, w_qmax)
    return dequantize(z, sx, w_s, bias), {"q": qx, "s": sx, "z": z}


def split_planes(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """16-bit q (|q| <= 127*257) -> int8 planes (hi, lo) with q = hi*256 + lo, both in [-128, 127]."""
    q = q.astype(np.int32)
    lo = ((q + 128) & 255) - 128
    hi = (q - lo) >> 8
    if np.any(hi < -128) or np.any(hi > 127):
        raise OverflowError("value outside the two-plane range 127*257")
    return hi.astype(np.int8), lo.astype(np.int8)
