"""Cheating providers inside attention: one deviation in the attention computation, or in the
K/V rows that enter the cache (and the commitment), at chosen layers and absolute positions.

`attention_variant` is ops.attention's code, same order, with one deviation; the wrappers know
the layer (a wrapped `_TorchLayer._attend`) and the query positions (ops.attention's `q_pos`), so
the provider generates and re-executes its openings with the same cheat.
"""

from __future__ import annotations

import torch
from advworld import Provider
from commitllm.engine.exact import ops
from commitllm.engine.exact.model import ExactModel, SeqCache, _TorchLayer
from commitllm.verifier.numerics.attention import COEF_BITS, LOGIT_CLAMP, score_scale
from commitllm.verifier.numerics.exp2 import LOGIT_FRAC_BITS

F32, F64, I64 = torch.float32, torch.float64, torch.int64
ORIG_ATTEND, ORIG_ATTENTION = _TorchLayer._attend, ops.attention


def attention_variant(q, sq, k, sk, v, sv, q_pos, qmax, kind: str, window: int = 4,
                      model_window: int | None = None):
    """ops.attention (same code, same order; model_window: the model's sliding window, honoured
    unless the deviation is about it) with one deviation of `kind`:
    score: head 0's fixed-point logit of key 0 raised by 1.0 (log2 units);
    weight: head 0's softmax weight of key 0 doubled plus one;
    output: head 0's output row scaled by 1 + 2^-10;
    future: the causal mask admits position q_pos + 1;
    gqa: query head h reads K/V head h mod nkv instead of h // group;
    window: only the last `window` keys are visible (a cheap sliding-window kernel, or a wider
    or narrower window than the model's);
    unwindowed: the model's sliding window ignored (every earlier key visible)."""
    t_len, nh, d = q.shape
    s_len, nkv, _ = k.shape
    kh = torch.arange(nkv).repeat_interleave(nh // nkv)
    if kind == "gqa":
        kh = torch.arange(nh) % nkv
    scores = torch.matmul(q.to(F64).transpose(0, 1), k.to(F64)[:, kh].permute(1, 2, 0)).to(I64)
    keys, qp = torch.arange(s_len).view(1, 1, -1), q_pos.view(1, -1, 1)
    visible = keys <= qp + (1 if kind == "future" else 0)
    span = window if kind == "window" else None if kind == "unwindowed" else model_window
    if span is not None:
        visible = visible & (keys > qp - span)
    t = ((ops.int_to_f32(scores) * sq.t().unsqueeze(2)) * sk[:, kh].t().unsqueeze(1))
    t = t * float(score_scale(d))
    logits = torch.round(t * float(1 << LOGIT_FRAC_BITS)).clamp(-LOGIT_CLAMP, LOGIT_CLAMP).to(I64)
    if kind == "score":
        logits[0, :, 0] += 1 << LOGIT_FRAC_BITS
    logits = torch.where(visible, logits, torch.tensor(-LOGIT_CLAMP - 1, dtype=I64))
    row_max = logits.amax(dim=-1, keepdim=True)
    w = torch.where(visible, ops.table_weights(row_max - logits), torch.zeros((), dtype=I64))
    if kind == "weight":
        w[0, :, 0] = 2 * w[0, :, 0] + 1
    z = w.sum(dim=-1)
    p = (w.to(F32) * float(2.0**-COEF_BITS)) * sv[:, kh].t().unsqueeze(1)
    m = torch.where(visible, p, torch.zeros((), dtype=F32)).amax(dim=-1, keepdim=True)
    c = torch.round((p / m) * float(1 << COEF_BITS))
    c = torch.where(visible, c, torch.zeros((), dtype=F32)).to(F64)
    acc = torch.matmul(c, v.to(F64)[:, kh].transpose(0, 1)).to(I64)
    out = (ops.int_to_f32(acc) / ops.int_to_f32(z).unsqueeze(-1)) * m
    if kind == "output":
        out[0] = out[0] * (1 + 2.0**-10)
    return out.transpose(0, 1).reshape(t_len, nh * d)


class _LayerClock:
    """Which layer the engine is in (set by a wrapped _TorchLayer._attend)."""

    def __init__(self):
        self.layer = None

    def attend_hook(self, edit=None):
        clock = self

        def _attend(layer_self, i, step, qq, sq, kq, sk, vq, sv, kvq, parts, window=None):
            clock.layer = i
            if edit is not None:
                kq, sk, vq, sv = edit(i, step.pos, kq.clone(), sk.clone(), vq.clone(), sv.clone())
            return ORIG_ATTEND(layer_self, i, step, qq, sq, kq, sk, vq, sv, kvq, parts, window)
        return _attend


def attention_cheat(qm_a, kind: str, layer: int | None, positions=None, **kw) -> Provider:
    """Attention of `layer` (None: every layer) replaced by attention_variant(kind) at query
    positions `positions` (None: every position); honest elsewhere."""
    clock = _LayerClock()
    wanted = None if positions is None else {int(p) for p in positions}

    def attention(q, sq, k, sk, v, sv, q_pos, qmax, parts=None, tile_elems=None, window=None):
        honest = ORIG_ATTENTION(q, sq, k, sk, v, sv, q_pos, qmax, parts, window=window)
        if layer is not None and clock.layer != layer:
            return honest
        rows = torch.tensor([wanted is None or int(p) in wanted for p in q_pos])
        if not bool(rows.any()):
            return honest
        cheat = attention_variant(q, sq, k, sk, v, sv, q_pos, qmax, kind, model_window=window,
                                  **kw)
        return torch.where(rows.unsqueeze(1), cheat, honest)

    return Provider(ExactModel(qm_a), ((_TorchLayer, "_attend", clock.attend_hook()),
                                       (ops, "attention", attention)))


def kv_cheat(qm_a, layer: int, edit) -> Provider:
    """K/V rows of `layer` changed before they enter the cache (and the commitment):
    edit(pos [n], k, sk, v, sv) -> (k, sk, v, sv), rows in step order."""
    clock = _LayerClock()

    def on_layer(i, pos, k, sk, v, sv):
        return edit(pos, k, sk, v, sv) if i == layer else (k, sk, v, sv)

    return Provider(ExactModel(qm_a), ((_TorchLayer, "_attend", clock.attend_hook(on_layer)),))


def kv_row_changed(position: int, which: str = "k"):
    def edit(pos, k, sk, v, sv):
        rows = (pos == position).nonzero().flatten()
        target = k if which == "k" else v
        target[rows, 0, 1] += 1 if which == "k" else -3
        return k, sk, v, sv
    return edit


def kv_rows_swapped(a: int, b: int):
    def edit(pos, k, sk, v, sv):
        ia, ib = (pos == a).nonzero().flatten(), (pos == b).nonzero().flatten()
        if len(ia) and len(ib):
            for t in (k, sk, v, sv):
                t[ia], t[ib] = t[ib].clone(), t[ia].clone()
        return k, sk, v, sv
    return edit


def kv_rows_spliced(other: SeqCache, layer: int, positions):
    """K/V rows at `positions` taken from another request's cache (prefix-cache reuse)."""
    def edit(pos, k, sk, v, sv):
        for p in positions:
            rows = (pos == p).nonzero().flatten()
            if len(rows):
                k[rows], sk[rows] = other.k[layer][p], other.sk[layer][p]
                v[rows], sv[rows] = other.v[layer][p], other.sv[layer][p]
        return k, sk, v, sv
    return edit


def cache_of(qm, tokens) -> SeqCache:
    """The honest K/V cache of a token sequence."""
    cache = SeqCache()
    ExactModel(qm).forward([cache], [list(tokens)])
    return cache
