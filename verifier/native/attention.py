"""The spec's attention (verifier/numerics/attention.py) in the compiled core (attn.c's
attn_fused_rows): exact integer scores and value sums, the softmax passes and the output division.
Same bits as the spec (tests/test_native.py); without the core it is the spec itself."""

from __future__ import annotations

import numpy as np

from ..numerics import attention as spec
from ..numerics.exp2 import LOGIT_FRAC_BITS, softmax_table
from . import attn_fused_rows, lib

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


def attention(q, sq, k, sk, v, sv, q_pos, qmax: int, window: int | None = None) -> np.ndarray:
    """spec.attention (no trace), in the compiled core when it is available (attn_fused: integer
    scores and value sums, softmax passes, output), else the spec itself."""
    small = all(x.dtype in (np.int8, np.int16) for x in (q, k, v))
    if lib() is None or not small or spec.COEF_BITS != 15 or spec.LOGIT_CLAMP != 2**30:
        return spec.attention(q, sq, k, sk, v, sv, q_pos, qmax, window=window)
    t_len, nh, d = q.shape
    s_len, nkv, _ = k.shape
    spec.check_bounds(d, s_len, qmax)
    g = nh // nkv
    rows = np.ascontiguousarray(q.transpose(1, 0, 2)).reshape(nh * t_len, d)  # [nkv, g, T] rows
    pos = np.tile(np.asarray(q_pos, dtype=np.int64), nh)
    nvis = np.clip(pos + 1, 0, s_len)
    nlo = None if window is None else spec.first_visible(pos, window).astype(np.int64)
    table, cut = _full_table()
    out, _, _ = attn_fused_rows(rows, np.ascontiguousarray(sq.T, dtype=np.float32).reshape(-1),
                                k, np.ascontiguousarray(sk.T, dtype=np.float32),
                                v, np.ascontiguousarray(sv.T, dtype=np.float32),
                                nvis, g * t_len, d, float(spec.score_scale(d)),
                                float(1 << LOGIT_FRAC_BITS), table, cut, nlo=nlo)
    return out.reshape(nh, t_len, d).transpose(1, 0, 2).reshape(t_len, nh * d)
