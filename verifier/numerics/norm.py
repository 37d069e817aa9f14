"""RMSNorm with an exact integer sum of squares."""

from __future__ import annotations

import numpy as np

F32 = np.float32
NORM_FRAC_BITS = 23  # each element is scaled so the row max lies in [2^22, 2^23)
MAX_NORM_WIDTH = 2**17 - 1  # |X| <= 2^23, so width * 2^46 < 2^63 keeps the int64 sum exact


def exact_sum_squares(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x fp32 [T, H] -> (ss int64 [T], e int64 [T]).

    e is the binary exponent of the row max (max|x| = m * 2^e, m in [0.5, 1); 0 for a zero row);
    X = rint(x * 2^(23 - e)) is exact fixed point with |X| <= 2^23, and ss = sum X^2 exactly.
    """
    if x.shape[-1] > MAX_NORM_WIDTH:
        raise OverflowError(f"row width {x.shape[-1]} exceeds {MAX_NORM_WIDTH}")
    amax = np.max(np.abs(x), axis=-1)
    _, e = np.frexp(amax)
    e = e.astype(np.int64)
    scale = np.ldexp(np.float64(1), NORM_FRAC_BITS - e)  # float64: exact powers of two
    big_x = np.rint(x.astype(np.float64) * scale[:, None]).astype(np.int64)
    return np.sum(big_x * big_x, axis=-1), e


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
    """y = (x * r) * weight in fp32, r from rms_scale."""
    r = rms_scale(x, eps)
    return ((x * r[:, None]) * weight[None, :]).astype(F32)
