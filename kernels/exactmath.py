"""Triton device helpers for the exact numerics: rounding, powers of two, the exp2 polynomial and
per-row quantization, each written with correctly rounded IEEE operations only.

Why these forms (Triton 3.9, sm_80/sm_90 PTX): `/` on fp32 lowers to the approximate `div.full.f32`,
so fp32 division is `tl.math.div_rn`; `tl.sqrt` on fp32 is `sqrt.approx`, but on fp64 `/` and
`tl.sqrt` lower to `div.rn.f64` and `sqrt.rn.f64` (PTX has no approximate fp64 forms); `libdevice`
(e.g. `rint`) does not run under the interpreter, so rint is the 2^23 (fp32) / 2^52 (fp64) trick.
Every kernel is compiled with `enable_fp_fusion=False` so no `a * b + c` becomes an FMA.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..verifier.numerics import exp2 as spec_exp2

_C = [float(c) for c in spec_exp2.exp2_coefficients()]  # fp32 values, exact as Python floats
EXP2_C0 = tl.constexpr(_C[0])
EXP2_C1 = tl.constexpr(_C[1])
EXP2_C2 = tl.constexpr(_C[2])
EXP2_C3 = tl.constexpr(_C[3])
EXP2_C4 = tl.constexpr(_C[4])
EXP2_C5 = tl.constexpr(_C[5])
EXP2_C6 = tl.constexpr(_C[6])
EXP2_C7 = tl.constexpr(_C[7])


@triton.jit
def round_half_even_f32(y):
    """Spec exp2.round_half_even: (y + m) - m, m = -2^23 if y < 0 else 2^23 (rint, |y| < 2^23)."""
    m = tl.where(y < 0, -8388608.0, 8388608.0)
    return (y + m) - m


@triton.jit
def rint_f32(y):
    """rint (half to even) for any finite fp32: the 2^23 trick below 2^23, y itself above
    (an fp32 of magnitude >= 2^23 is already an integer)."""
    return tl.where(tl.abs(y) < 8388608.0, round_half_even_f32(y), y)


@triton.jit
def rint_f64(y):
    """rint (half to even) for any finite fp64: the 2^52 trick below 2^52, y itself above."""
    m = tl.where(y < 0, -4503599627370496.0, 4503599627370496.0).to(tl.float64)
    return tl.where(tl.abs(y) < 4503599627370496.0, (y + m) - m, y)


@triton.jit
def pow2_f32(n):
    """2^n as fp32 from its bits, n int32 in [-126, 127] (exact)."""
    return ((n + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def pow2_f64(n):
    """2^n as fp64 from its bits, n int64 in [-1022, 1023] (exact)."""
    return ((n.to(tl.int64) + 1023) << 52).to(tl.float64, bitcast=True)


@triton.jit
def exp2_poly(y):
    """Spec exp2.exp2 for fp32 y in [-64, 64]: n = rint(y), f = y - n, degree-7 Horner, * 2^n."""
    n = round_half_even_f32(y)
    f = y - n
    p = tl.full(f.shape, EXP2_C7, tl.float32)
    p = (p * f) + EXP2_C6
    p = (p * f) + EXP2_C5
    p = (p * f) + EXP2_C4
    p = (p * f) + EXP2_C3
    p = (p * f) + EXP2_C2
    p = (p * f) + EXP2_C1
    p = (p * f) + EXP2_C0
    return p * pow2_f32(n.to(tl.int32))


@triton.jit
def quant_scale(amax, qmax: tl.constexpr):
    """Spec quant.quantize_rows scale: s = amax / qmax (div.rn), 1 for a zero (or underflowed) s."""
    s = tl.math.div_rn(amax, tl.full(amax.shape, qmax, tl.float32))
    return tl.where(s == 0.0, 1.0, s)


@triton.jit
def quant_values(y, s, qmax: tl.constexpr):
    """q = clip(rint(y / s), -qmax, qmax) as int32; 0 where s came from a zero row (s == 1 and
    amax == 0 gives y == 0, so q = 0 either way)."""
    q = rint_f32(tl.math.div_rn(y, s))
    q = tl.minimum(tl.maximum(q, -qmax), qmax)
    return q.to(tl.int32)


@triton.jit
def frexp_exponent(a):
    """e with a = m * 2^e, m in [0.5, 1), for fp32 a >= 0 (0 for a == 0), as int32.

    Subnormals are scaled by 2^64 first (exact), so their exponent is read from a normal number.
    """
    sub = a < 1.1754943508222875e-38  # 2^-126
    an = tl.where(sub, tl.minimum(a, 1.1754943508222875e-38) * 18446744073709551616.0, a)
    e = ((an.to(tl.int32, bitcast=True) >> 23) & 255) - 126
    e = tl.where(sub, e - 64, e)
    return tl.where(a == 0.0, 0, e)
