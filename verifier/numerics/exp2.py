"""exp2 for SiLU by a fixed polynomial, and the integer table of the integer softmax."""

from __future__ import annotations

from functools import lru_cache

import mpmath
import numpy as np

F32 = np.float32
EXP2_DEGREE = 7
SILU_CLAMP = 64.0  # |g * log2(e)| is clamped here: 2^-64 is below fp32's resolution near 1
NEG_LOG2E = F32(-1.4426950408889634)  # fp32 nearest to -log2(e)
LOGIT_FRAC_BITS = 8  # softmax logits in log2 units, fixed point with 8 fraction bits
EXP_TABLE_BITS = 15  # T[0] = 2^15
_ROUND_MAGIC = F32(2**23)


@lru_cache(maxsize=1)
def exp2_coefficients() -> np.ndarray:
    """Taylor coefficients of 2^f = sum (ln 2)^k / k! f^k, k = 0..7, rounded to fp32.

    Degree 7 on |f| <= 1/2 truncates at (ln2/2)^8 / 8! ~ 5e-9, below fp32's 6e-8 rounding.
    """
    with mpmath.workprec(100):
        return np.array([float(mpmath.log(2) ** k / mpmath.factorial(k))
                         for k in range(EXP2_DEGREE + 1)], dtype=np.float64).astype(F32)


def round_half_even(y: np.ndarray) -> np.ndarray:
    """rint for fp32 |y| < 2^23 by two correctly rounded adds (the form the kernels use)."""
    m = np.where(y < 0, -_ROUND_MAGIC, _ROUND_MAGIC).astype(F32)
    return ((y + m) - m).astype(F32)


def exp2(y: np.ndarray) -> np.ndarray:
    """2^y for fp32 y in [-64, 64]: n = rint(y), f = y - n (exact), Horner in fp32, times 2^n."""
    n = round_half_even(y)
    f = (y - n).astype(F32)
    c = exp2_coefficients()
    p = np.full_like(f, c[EXP2_DEGREE])
    for k in range(EXP2_DEGREE - 1, -1, -1):
        p = ((p * f).astype(F32) + c[k]).astype(F32)
    return (p * np.ldexp(F32(1), n.astype(np.int32))).astype(F32)


def silu(g: np.ndarray) -> np.ndarray:
    """g / (1 + 2^clamp(g * -log2 e, -64, 64)), fp32, each op rounded, left to right."""
    y = np.clip((g * NEG_LOG2E).astype(F32), F32(-SILU_CLAMP), F32(SILU_CLAMP))
    return (g / (F32(1) + exp2(y))).astype(F32)


def swiglu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """silu(gate) * up in fp32."""
    return (silu(gate) * up).astype(F32)


@lru_cache(maxsize=1)
def softmax_table() -> np.ndarray:
    """T[f] = round(2^15 * 2^(-f/256)) for f = 0..255, int64, computed with integers only.

    t is the nearest integer when (t - 1/2)^256 < 2^(3840 - f) <= (t + 1/2)^256 (no ties exist:
    a tie would make 2^(15 - f/256) rational with an odd denominator).
    """
    frac = 1 << LOGIT_FRAC_BITS
    out = []
    for f in range(frac):
        target = 1 << (EXP_TABLE_BITS * frac - f + frac)  # (2t+1)^256 compares with 2^(...+256)
        t = int(round(2.0 ** (EXP_TABLE_BITS - f / frac)))
        while (2 * t + 1) ** frac < target:
            t += 1
        while (2 * t - 1) ** frac >= target:
            t -= 1
        out.append(t)
    return np.array(out, dtype=np.int64)


def table_weights(distance: np.ndarray) -> np.ndarray:
    """w = T[D mod 256] >> (D div 256) for integer distances D >= 0 below the row max."""
    shift = np.minimum(distance >> LOGIT_FRAC_BITS, 31)
    return softmax_table()[distance & ((1 << LOGIT_FRAC_BITS) - 1)] >> shift
