"""exp2 for SiLU by a fixed polynomial, and the integer table of the integer softmax."""

from __future__ import annotations

from functools import lru_cache

import mpmath
import numpy as np

from .blocks import block_rows, row_blocks

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
    y = np.array(y, dtype=F32)  # a copy: _exp2_into overwrites it
    return _exp2_into(y, np.empty_like(y), np.empty_like(y))


def _exp2_into(y: np.ndarray, n: np.ndarray, out: np.ndarray) -> np.ndarray:
    """exp2 of fp32 y (|y| <= 64) into out, with y and n as scratch (both overwritten).

    n = rint(y) equals round_half_even(y) but for the sign of a zero n (y in [-1/2, 0]), which
    changes only f = y - n at y = -0 (+-0), and c[7] * +-0 + c[6] = c[6]: the same p. 2^n is
    written as fp32 bits ((n + 127) << 23), the value ldexp(1, n) has for n in [-126, 127].
    """
    c = exp2_coefficients()
    np.rint(y, out=n)
    f = np.subtract(y, n, out=y)
    p = np.multiply(f, c[EXP2_DEGREE], out=out)  # = c[7] * f: the first Horner step from p = c[7]
    p += c[EXP2_DEGREE - 1]
    for k in range(EXP2_DEGREE - 2, -1, -1):
        p *= f
        p += c[k]
    n += F32(127)
    bits = n.astype(np.int32)
    bits <<= 23
    p *= bits.view(F32)
    return p


def silu(g: np.ndarray) -> np.ndarray:
    """g / (1 + 2^clamp(g * -log2 e, -64, 64)), fp32, each op rounded, left to right."""
    return _swiglu(g, None)


def swiglu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """silu(gate) * up in fp32."""
    return _swiglu(gate, up)


def _swiglu(gate: np.ndarray, up: np.ndarray | None) -> np.ndarray:
    """silu(gate) [* up], fp32 [T, F]: the ops of silu and exp2 in their order, in place, in row
    blocks (two scratch blocks)."""
    if gate.dtype != F32 or (up is not None and up.dtype != F32):
        raise TypeError("swiglu expects float32")
    g2 = gate.reshape(-1, gate.shape[-1]) if gate.ndim != 2 else gate
    u2 = None if up is None else up.reshape(g2.shape) if up.ndim != 2 else up
    out = np.empty(g2.shape, F32)
    y, n = (np.empty((block_rows(*g2.shape), g2.shape[1]), F32) for _ in range(2))
    for b in row_blocks(*g2.shape):
        gb, ob = g2[b], out[b]
        yb, nb = y[:len(gb)], n[:len(gb)]
        np.multiply(gb, NEG_LOG2E, out=yb)
        np.clip(yb, F32(-SILU_CLAMP), F32(SILU_CLAMP), out=yb)
        e = _exp2_into(yb, nb, ob)
        e += F32(1)
        np.divide(gb, e, out=e)
        if u2 is not None:
            e *= u2[b]
    return out.reshape(gate.shape)


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
