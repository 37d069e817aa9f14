"""Canonical log-probabilities: the same float64 values on every machine, from the exact logits.

A library's exp and log (libm, numpy's SIMD loops) are not correctly rounded and differ between
machines, so the logprobs a receipt commits are defined here with integers and correctly rounded
IEEE float64 operations only (docs/NUMERICS.md, "Log-probabilities"):

  u_v   = f64(logit_v) * LOG2E                          (logits are the spec's fp32 logits)
  D_v   = rint(min(max_u - u_v, 2^30) * 2^20)            int, the distance below the max in
                                                         log2 units with 20 fraction bits
  w_v   = (T1[f >> 10] * T2[f & 1023] + 2^29) >> 30 >> k   f = D_v mod 2^20, k = D_v div 2^20
                                                         (k >= 63: w_v = 0)
  Z     = sum_v w_v                                       (w of the max is exactly 2^30)
  L     = log2(Z / 2^30) to 32 fraction bits, rounded down, by exact integer squaring
  lp_v  = (-(D_v * 2^-20) - L * 2^-32) * LN2              float64, each op correctly rounded

T1[a] = round(2^30 * 2^(-a/1024)) and T2[b] = round(2^30 * 2^(-b/2^20)) for a, b in [0, 1024),
computed once at 256-bit precision and checked to be no tie. lp_v is within about 2e-6 of the
real log-softmax of the logits (the 2^-21 rounding of D, the 2^-30 tables, the sum's
truncations), and it is the same number everywhere. Ranking (top_logprobs) is by the fp32
logits themselves, descending, ties to the lower id: the greedy token comes first.
"""

from __future__ import annotations

from functools import lru_cache

import mpmath
import numpy as np

FRAC_BITS = 20  # D_v: log2 units with 20 fraction bits
SPLIT = 10  # f = a * 2^10 + b: two tables of 1024 entries
WEIGHT_BITS = 30  # the max token's weight is 2^30
LOG_FRAC_BITS = 32  # L: log2(Z / 2^30) with 32 fraction bits
MAX_DISTANCE = 2.0 ** 30  # u distances beyond are clamped (the weight is 0 long before)
LOG2E = 1.4426950408889634  # float64 nearest to log2(e)
LN2 = 0.6931471805599453  # float64 nearest to ln(2)
MAX_TOP = 20  # OpenAI's bound on top_logprobs


@lru_cache(maxsize=1)
def tables() -> tuple[np.ndarray, np.ndarray]:
    """T1 [1024], T2 [1024] int64: round(2^30 * 2^(-a/1024)), round(2^30 * 2^(-b/2^20))."""
    out = []
    with mpmath.workprec(256):
        for denom in (1 << SPLIT, 1 << FRAC_BITS):
            col = []
            for i in range(1 << SPLIT):
                x = mpmath.mpf(2) ** (WEIGHT_BITS - mpmath.mpf(i) / denom)
                t = int(mpmath.nint(x))
                if abs(abs(x - t) - mpmath.mpf(1) / 2) < mpmath.mpf(2) ** -200:  # pragma: no cover
                    raise ArithmeticError("a logprob table entry is a tie")
                col.append(t)
            out.append(np.array(col, dtype=np.int64))
    for t in out:
        t.setflags(write=False)
    return out[0], out[1]


def distances(logits: np.ndarray) -> np.ndarray:
    """D int64 [..., V] of fp32 logits [..., V] (finite)."""
    if logits.dtype != np.float32:
        raise TypeError("logprobs are defined on fp32 logits")
    if not np.all(np.isfinite(logits)):
        raise FloatingPointError("non-finite logit")
    u = logits.astype(np.float64) * LOG2E
    d = np.minimum(u.max(axis=-1, keepdims=True) - u, MAX_DISTANCE)
    return np.rint(d * float(1 << FRAC_BITS)).astype(np.int64)


def weights(d: np.ndarray) -> np.ndarray:
    """w int64 from distances D (>= 0, <= 2^50)."""
    t1, t2 = tables()
    f = d & ((1 << FRAC_BITS) - 1)
    w = (t1[f >> SPLIT] * t2[f & ((1 << SPLIT) - 1)] + (1 << (WEIGHT_BITS - 1))) >> WEIGHT_BITS
    return w >> np.minimum(d >> FRAC_BITS, 63)


def log2_fixed(z: int) -> int:
    """floor-ish log2(z / 2^30) * 2^32 for an integer z >= 2^30, by exact squaring: the integer
    part from z's bit length, then 32 fraction bits, each from one squaring of the mantissa
    (kept to 64 fraction bits, truncated). A defined integer algorithm: the same bits
    everywhere."""
    if z < (1 << WEIGHT_BITS):
        raise ValueError("the weight sum is at least the max token's weight")
    e = z.bit_length() - 1
    m = z << (64 - e) if e <= 64 else z >> (e - 64)  # mantissa in [2^64, 2^65)
    bits = 0
    for _ in range(LOG_FRAC_BITS):
        m = (m * m) >> 64
        bits <<= 1
        if m >> 65:
            m >>= 1
            bits |= 1
    return ((e - WEIGHT_BITS) << LOG_FRAC_BITS) | bits


def logprobs_of(d: np.ndarray) -> tuple[np.ndarray, float]:
    """(lp float64 [V], L * 2^-32) from one row of distances."""
    z = int(weights(d).sum())
    lse = float(log2_fixed(z)) * 2.0 ** -LOG_FRAC_BITS  # exact: < 2^53
    lp = (-(d.astype(np.float64) * 2.0 ** -FRAC_BITS) - lse) * LN2
    return lp, lse


def ranked(logits: np.ndarray, k: int) -> np.ndarray:
    """The k highest logits' ids, descending, ties to the lower id (exact fp32 comparisons)."""
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    k = min(k, logits.shape[-1])
    thr = np.partition(logits, logits.shape[-1] - k)[logits.shape[-1] - k]  # k-th largest
    cand = np.flatnonzero(logits >= thr)  # ascending ids
    order = np.argsort(-logits[cand], kind="stable")  # stable: equal logits keep id order
    return cand[order[:k]].astype(np.int64)


def entry(logits: np.ndarray, token: int, top: int) -> list:
    """[logprob of token, [[id, logprob], ... the top `top` ids]] for fp32 logits [V]: what a
    receipt commits per position (JSON: floats are float64 and round-trip exactly)."""
    lp, _ = logprobs_of(distances(logits))
    ids = ranked(logits, top)
    return [float(lp[token]), [[int(i), float(lp[i])] for i in ids]]
