"""RMSNorm with an exact integer sum of squares."""

from __future__ import annotations

import numpy as np

from .blocks import row_blocks

F32 = np.float32
NORM_FRAC_BITS = 23  # each element is scaled so the row max lies in [2^22, 2^23)
MAX_NORM_WIDTH = 2**17 - 1  # |X| <= 2^23, so width * 2^46 < 2^63 keeps the int64 sum exact


def exact_sum_squares(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x fp32 [T, H] -> (ss int64 [T], e int64 [T]).

    e is the binary exponent of the row max (max|x| = m * 2^e, m in [0.5, 1); 0 for a zero row);
    X = rint(x * 2^(23 - e)) is exact fixed point with |X| <= 2^23, and ss = sum X^2 exactly.

    Computed in float64 without rounding anywhere: x * 2^(23 - e) and X^2 <= 2^46 are exact, each
    sum of SUM_CHUNK squares is an integer <= 2^52 (exact in any order), and those are added in
    int64. max|x| is max(max x, -min x). Row blocks keep the float64 scratch in cache.
    """
    if x.shape[-1] > MAX_NORM_WIDTH:
        raise OverflowError(f"row width {x.shape[-1]} exceeds {MAX_NORM_WIDTH}")
    amax = np.maximum(np.max(x, axis=-1), -np.min(x, axis=-1))
    _, e = np.frexp(amax)
    e = e.astype(np.int64)
    scale = np.ldexp(np.float64(1), NORM_FRAC_BITS - e)  # float64: exact powers of two
    ss = np.empty(x.shape[0], np.int64)
    for b in row_blocks(*x.shape):
        big_x = np.multiply(x[b], scale[b, None], dtype=np.float64)
        np.rint(big_x, out=big_x)
        ss[b] = _exact_square_sums(big_x)
    return ss, e


SUM_CHUNK = 64  # squares per float64 partial sum: 64 * 2^46 = 2^52 < 2^53


def _exact_square_sums(big_x: np.ndarray) -> np.ndarray:
    """sum X^2 per row, int64, for float64 integers |X| <= 2^23 (big_x is overwritten)."""
    sq = np.multiply(big_x, big_x, out=big_x)
    t, h = sq.shape
    k = h - h % SUM_CHUNK
    ss = np.add.reduce(sq[:, :k].reshape(t, k // SUM_CHUNK, SUM_CHUNK), axis=-1) \
        .astype(np.int64).sum(axis=-1)
    if k < h:
        ss += np.add.reduce(sq[:, k:], axis=-1).astype(np.int64)
    return ss


def int64_to_f64(v: np.ndarray) -> np.ndarray:
    """int64 -> float64 rounded once: hi*2^32 and lo convert exactly, their sum rounds once."""
    hi = v >> 32
    lo = v - (hi << 32)
    return hi.astype(np.float64) * np.float64(2**32) + lo.astype(np.float64)


def rms_scale(x: np.ndarray, eps: float) -> np.ndarray:
    """r [T] fp32 = f32(1 / sqrt(mean(x^2) + f32(eps))), the mean from the exact sum of squares.

    In float64, each op correctly rounded: ms = (f64(ss) / H) * 2^(2(e - 23)); r = 1 / sqrt(ms + eps).
    """
    ss, e = exact_sum_squares(x)
    ms = np.ldexp(int64_to_f64(ss) / np.float64(x.shape[-1]), 2 * (e - NORM_FRAC_BITS))
    r = np.float64(1) / np.sqrt(ms + np.float64(F32(eps)))
    return r.astype(F32)


def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """y = (x * r) * weight in fp32, r from rms_scale (an fp32 weight; in place)."""
    if weight.dtype != F32:
        raise TypeError(f"rmsnorm expects a float32 weight, got {weight.dtype}")
    y = np.multiply(x, rms_scale(x, eps)[:, None])
    y *= weight
    return y
