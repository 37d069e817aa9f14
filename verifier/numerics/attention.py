"""Integer-softmax attention: exact integer scores, fixed-point log2 logits, table weights,
exact int64 sums, one division per output. Two passes (row max, then sums); no online rescaling.
"""

from __future__ import annotations

import math

import numpy as np

from .exp2 import LOGIT_FRAC_BITS, table_weights
from .quant import EXACT_F64, int_to_f32

F32 = np.float32
LOGIT_CLAMP = 2**30  # fixed-point logits are clamped to +-2^30 before the max
COEF_BITS = 15  # value coefficients c_j = rint(p_j / max p * 2^15)


def score_scale(head_dim: int) -> np.float32:
    """fp32 nearest to log2(e) / sqrt(d) (one float64 division of correctly rounded values)."""
    return F32(1.4426950408889634 / math.sqrt(head_dim))


def check_bounds(head_dim: int, n_keys: int, qmax: int) -> None:
    """Scores (d * qmax^2) and value sums (S * 2^15 * qmax) must stay exact in float64."""
    if head_dim * qmax * qmax >= EXACT_F64 or n_keys * (1 << COEF_BITS) * qmax >= EXACT_F64:
        raise OverflowError(f"attention bounds exceeded (d={head_dim}, keys={n_keys}, qmax={qmax})")


def first_visible(q_pos, window: int | None):
    """The first key a query at q_pos sees: 0 (causal), or q_pos - window + 1 under a sliding
    window of `window` keys (Mistral: key j is visible iff q_pos - window < j <= q_pos),
    clamped at 0. Works on ints and integer arrays alike."""
    if window is None:
        return np.zeros_like(np.asarray(q_pos))
    return np.maximum(np.asarray(q_pos) - (window - 1), 0)


def attention(q, sq, k, sk, v, sv, q_pos, qmax: int, parts: dict | None = None,
              window: int | None = None) -> np.ndarray:
    """Causal GQA attention for one sequence whose keys sit at positions 0..S-1.

    q int [T, nh, d], sq fp32 [T, nh]; k, v int [S, nkv, d], sk, sv fp32 [S, nkv];
    q_pos int [T] (query t sees keys j <= q_pos[t], and with a sliding window of `window` keys
    only j > q_pos[t] - window). Returns fp32 [T, nh * d].
    """
    t_len, nh, d = q.shape
    s_len, nkv, _ = k.shape
    check_bounds(d, s_len, qmax)
    g = nh // nkv
    kh = np.repeat(np.arange(nkv), g)  # [nh] K/V head of each query head
    qf = q.astype(np.float64).transpose(1, 0, 2)  # [nh, T, d]
    kf = k.astype(np.float64).transpose(1, 2, 0)  # [nkv, d, S]
    scores = _grouped(qf, kf, nkv).astype(np.int64)  # [nh, T, S] exact
    j = np.arange(s_len)[None, None, :]
    visible = j <= np.asarray(q_pos)[None, :, None]  # [1, T, S]
    if window is not None:
        visible &= j >= first_visible(q_pos, window)[None, :, None]
    sqh = sq.T[:, :, None]  # [nh, T, 1]
    skh = sk[:, kh].T[:, None, :]  # [nh, 1, S]
    t = ((int_to_f32(scores) * sqh) * skh) * score_scale(d)
    logits = np.clip(np.rint(t * F32(1 << LOGIT_FRAC_BITS)), -LOGIT_CLAMP, LOGIT_CLAMP)
    logits = np.where(visible, logits.astype(np.int64), np.int64(-LOGIT_CLAMP - 1))
    row_max = np.max(logits, axis=-1, keepdims=True)
    w = np.where(visible, table_weights(row_max - logits), 0)  # [nh, T, S] int64
    z = np.sum(w, axis=-1)  # [nh, T]
    out = _weighted_values(w, z, v, sv, kh, visible)  # [nh, T, d]
    if parts is not None:
        parts.update(scores=scores, logits=logits, weights=w, z=z)
    return out.transpose(1, 0, 2).reshape(t_len, nh * d)


def _grouped(a: np.ndarray, b: np.ndarray, nkv: int) -> np.ndarray:
    """a [nh, T, X] @ b[kv head of h] ([nkv, X, Y]) -> [nh, T, Y], without repeating b per query
    head: the g = nh / nkv heads sharing a K/V head go through one matmul of g * T rows. Exact
    for integer operands whose sums stay below 2^53 (check_bounds)."""
    nh, t, x = a.shape
    g = nh // nkv
    out = a.reshape(nkv, g * t, x) @ b  # [nkv, g T, Y]
    return out.reshape(nh, t, b.shape[-1])


def _weighted_values(w, z, v, sv, kh, visible) -> np.ndarray:
    """out = (f32(A) / f32(Z)) * M with A = sum_j c_j V_j, c_j = rint((p_j / M) * 2^15),
    p_j = (f32(w_j) * 2^-15) * sv_j, M = max_j p_j.

    w_j * 2^-15 <= 1 is exact, so p_j <= sv_j cannot overflow; A / Z is bounded by qmax * 2^15,
    so only a true output beyond fp32's range can overflow.
    """
    p = (w.astype(F32) * F32(2.0**-COEF_BITS)) * sv[:, kh].T[:, None, :]  # [nh, T, S] fp32
    m = np.max(np.where(visible, p, F32(0)), axis=-1, keepdims=True)
    if not np.all(m > 0):
        raise FloatingPointError("attention value scale underflowed to zero")
    c = np.rint((p / m) * F32(1 << COEF_BITS))
    c = np.where(visible, c, 0).astype(np.float64)
    acc = _grouped(c, v.astype(np.float64).transpose(1, 0, 2), len(sv[0])).astype(np.int64)
    return ((int_to_f32(acc) / int_to_f32(z)[..., None]) * m).astype(F32)
