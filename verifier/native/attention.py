"""The spec's attention (verifier/numerics/attention.py) with its softmax passes in the compiled
core: the scores and value sums stay the spec's exact float64 GEMMs, the per-element passes in
between run in attn.c. Same bits as the spec (tests/test_native.py); without the core it is the
spec itself."""

from __future__ import annotations

import numpy as np

from ..numerics import attention as spec
from ..numerics.exp2 import LOGIT_FRAC_BITS, softmax_table
from ..numerics.quant import int_to_f32
from . import attn_coefs, lib

_TABLES: dict = {}


def _full_table() -> tuple[np.ndarray, int]:
    """table_weights for every distance up to the cut-off where the whole table has shifted to 0,
    as int32 [cut + 1] (what attn.c gathers from)."""
    if "t" not in _TABLES:
        table = softmax_table()
        cut = int(table.max()).bit_length() << LOGIT_FRAC_BITS
        d = np.arange(cut + 1, dtype=np.int64)
        full = table[d & ((1 << LOGIT_FRAC_BITS) - 1)] >> np.minimum(d >> LOGIT_FRAC_BITS, 31)
        if full[cut] != 0:
            raise AssertionError("the softmax table does not vanish at its cut-off")
        _TABLES["t"] = (full.astype(np.int32), cut)
    return _TABLES["t"]


def attention(q, sq, k, sk, v, sv, q_pos, qmax: int) -> np.ndarray:
    """spec.attention (no trace), its softmax passes compiled when the core is available."""
    if lib() is None or spec.COEF_BITS != 15 or spec.LOGIT_CLAMP != 2**30:
        return spec.attention(q, sq, k, sk, v, sv, q_pos, qmax)
    t_len, nh, d = q.shape
    s_len, nkv, _ = k.shape
    spec.check_bounds(d, s_len, qmax)
    g = nh // nkv
    qf = q.astype(np.float64).transpose(1, 0, 2)  # [nh, T, d]
    kf = k.astype(np.float64).transpose(1, 2, 0)  # [nkv, d, S]
    scores = np.ascontiguousarray(spec._grouped(qf, kf, nkv).reshape(nh * t_len, s_len))
    nvis = np.clip(np.tile(np.asarray(q_pos, dtype=np.int64) + 1, nh), 0, s_len)
    table, cut = _full_table()
    c, z, m = attn_coefs(scores, np.ascontiguousarray(sq.T, dtype=np.float32).reshape(-1),
                         np.ascontiguousarray(sk.T, dtype=np.float32),
                         np.ascontiguousarray(sv.T, dtype=np.float32), g * t_len, nvis,
                         float(spec.score_scale(d)), float(1 << LOGIT_FRAC_BITS), table, cut)
    acc = spec._grouped(c.reshape(nh, t_len, s_len), v.astype(np.float64).transpose(1, 0, 2),
                        nkv).astype(np.int64)
    zf = int_to_f32(z.reshape(nh, t_len))[..., None]
    out = ((int_to_f32(acc) / zf) * m.reshape(nh, t_len, 1)).astype(np.float32)
    return out.transpose(1, 0, 2).reshape(t_len, nh * d)
