"""Symmetric quantization per row, and the exact integer GEMM with its dequantization."""

from __future__ import annotations

import numpy as np

from .blocks import row_blocks

F32 = np.float32
EXACT_F64 = 2**53  # float64 holds every integer below this exactly


def int_dtype(qmax: int):
    """The narrowest signed type that holds [-qmax, qmax]."""
    return np.int8 if qmax <= 127 else np.int16


def quantize_rows(x: np.ndarray, qmax: int) -> tuple[np.ndarray, np.ndarray]:
    """x fp32 [..., K] -> (q int [..., K], s fp32 [...]) with x ~ q * s.

    s = max|x| / qmax (one rounding); q = clip(rint(x / s), -qmax, qmax) with rint half-to-even.
    A row whose s is zero (all zeros, or max|x| so small the division underflows) gets s = 1, q = 0.

    max|x| is max(max x, -min x) (no |x| array), and q is computed in row blocks. A row with s = 0
    needs no special case for q: its |x| < qmax * 2^-149, so rint(x / 1) is already +-0.
    """
    if x.dtype != F32:
        raise TypeError(f"quantize_rows expects float32, got {x.dtype}")
    x2 = x.reshape(-1, x.shape[-1])
    amax = np.maximum(np.max(x2, axis=-1), -np.min(x2, axis=-1))  # [rows]
    if not np.all(np.isfinite(amax)):
        raise FloatingPointError("non-finite value in a row to quantize")
    s = amax / F32(qmax)
    s = np.where(s == 0, F32(1), s).astype(F32)
    q = np.empty(x2.shape, int_dtype(qmax))
    for b in row_blocks(*x2.shape):
        y = np.divide(x2[b], s[b, None])
        np.rint(y, out=y)
        np.clip(y, -qmax, qmax, out=y)
        q[b] = y  # integers within [-qmax, qmax]: exact
    return q.reshape(x.shape), s.reshape(x.shape[:-1])


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
    z = np.asarray(z)
    _check_exact(z)
    return _to_f32(z, np.empty(z.shape, F32))


def _check_exact(z: np.ndarray) -> None:
    if z.size and (z.max() >= EXACT_F64 or z.min() <= -EXACT_F64):  # not |z|: |INT64_MIN| < 0
        raise OverflowError("integer beyond 2^53 cannot be converted exactly")


def _to_f32(z: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out = f32(f64(z)): the float64 conversion is exact, the fp32 store rounds once. z may
    already be float64 (holding integers): then only the fp32 rounding remains."""
    np.copyto(out, z.astype(np.float64, copy=False), casting="same_kind")
    return out


def dequantize(z: np.ndarray, sx: np.ndarray, sw: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """y[t, j] = ((f32(z[t, j]) * sx[t]) * sw[j]) + bias[j], left to right, each op rounded.

    z int, or float64 holding integers (|z| < 2^53); fp32 scales and bias (as every profile
    stores them); in place, in row blocks."""
    for a in (sx, sw) if bias is None else (sx, sw, bias):
        if a.dtype != F32:
            raise TypeError(f"dequantize expects float32 scales and bias, got {a.dtype}")
    _check_exact(z)
    y = np.empty(z.shape, F32)
    for b in row_blocks(*z.shape):
        yb = y[b]
        _to_f32(z[b], yb)
        yb *= sx[b, None]
        yb *= sw
        if bias is not None:
            yb += bias
    return y


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
