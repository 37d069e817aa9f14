"""Mixture-of-experts routing (Mixtral): which experts a token takes and with what weights, as
exact rules on the router's dequantized logits.

- **Selection**: the k experts with the largest router logits (fp32, compared exactly); equal
  logits go to the lower expert index. The selected experts are kept in ascending index order.
- **Weights**: the spec's integer softmax over the selected logits alone (Mixtral's softmax over
  every expert then renormalized over the top k is the same function): fixed-point log2 logits
  L_i = clamp(rint((r_i * f32(log2 e)) * 256), -2^30, 2^30), table weights
  w_i = table_weights(max L - L_i) (the attention's table), Z = sum w_i (exact), and
  g_i = f32(w_i) / f32(Z), one correctly rounded division.
- **Combination**: y = g_0 e_0, then y = y + g_i e_i for i = 1..k-1 (ascending expert index),
  each product and sum one fp32 operation; the layer's output is h + y.

A token's experts and weights depend on its own router logits alone: no capacity, no dropping,
so batch composition changes nothing.
"""

from __future__ import annotations

import numpy as np

from .attention import LOGIT_CLAMP
from .exp2 import LOGIT_FRAC_BITS, NEG_LOG2E, table_weights

F32 = np.float32
ROUTE_SCALE = -NEG_LOG2E  # f32(log2 e) (negation is exact): natural-log logits to log2 units
# The rules by name, in the numerics constants (verifier/digest.py), so a key commits to them
SELECT_RULE = "top-k of fp32 logits, equal logits to the lower index, selected kept ascending"
COMBINE_RULE = "y = g0*e0, then y = y + gi*ei in ascending expert order, fp32, no fusion"


def select(logits: np.ndarray, k: int) -> np.ndarray:
    """The k selected experts of each row of logits fp32 [T, E], int64 [T, k] ascending."""
    if not np.all(np.isfinite(logits)):
        raise FloatingPointError("non-finite router logit")
    order = np.argsort(-logits, axis=1, kind="stable")  # descending; ties: lower index first
    return np.sort(order[:, :k], axis=1).astype(np.int64)


def weights(logits: np.ndarray, sel: np.ndarray) -> np.ndarray:
    """Combination weights g fp32 [T, k] of the selected experts sel [T, k]."""
    r = np.take_along_axis(logits, sel, axis=1).astype(F32)
    fixed = np.rint((r * ROUTE_SCALE) * F32(1 << LOGIT_FRAC_BITS))
    lg = np.clip(fixed, -LOGIT_CLAMP, LOGIT_CLAMP).astype(np.int64)
    w = table_weights(lg.max(axis=1, keepdims=True) - lg)  # int64, the max's weight 2^15
    z = w.sum(axis=1, keepdims=True)
    return (w.astype(F32) / z.astype(F32)).astype(F32)


def route(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    sel = select(logits, k)
    return sel, weights(logits, sel)


def combine(e: np.ndarray, g: np.ndarray) -> np.ndarray:
    """y fp32 [T, H] from the selected experts' outputs e fp32 [T, k, H] and weights g [T, k]."""
    y = (g[:, 0, None] * e[:, 0]).astype(F32)
    for i in range(1, e.shape[1]):
        y = (y + (g[:, i, None] * e[:, i]).astype(F32)).astype(F32)
    return y
