"""The exact forward pass of one sequence, in numpy: the reference every backend must equal.

`trace`, when given, receives every intermediate by name (per layer under "layers.{i}.{name}")
so tests can compare backends value by value.
"""

from __future__ import annotations

import numpy as np

from .attention import attention
from .exp2 import swiglu
from .norm import rmsnorm
from .quant import dequantize, linear
from .rope import RopeTable, apply_rope
from .quant import quantize_rows
from . import moe
from .weights import QExperts, QLinear, QuantizedModel

F32 = np.float32


class KVCache:
    """Per layer: int K/V rows [S, nkv, d] and their fp32 scales [S, nkv], positions 0..S-1."""

    def __init__(self, num_layers: int):
        self.k: list = [None] * num_layers
        self.sk: list = [None] * num_layers
        self.v: list = [None] * num_layers
        self.sv: list = [None] * num_layers
        self.length = 0

    def append(self, layer: int, k, sk, v, sv) -> None:
        for store, new in ((self.k, k), (self.sk, sk), (self.v, v), (self.sv, sv)):
            old = store[layer]
            store[layer] = new if old is None else np.concatenate([old, new])


def embed(model: QuantizedModel, ids: np.ndarray) -> np.ndarray:
    """x[t] = f32(q[id]) * s[id]: the dequantized embedding row, fp32 [T, H]."""
    e = model.embed
    return (e.q[ids].astype(F32) * e.s[ids][:, None]).astype(F32)


def _lin(x, lin: QLinear, model: QuantizedModel, tr: dict | None, name: str) -> np.ndarray:
    y, parts = linear(x, lin.q, lin.s, lin.bias, model.profile.act_qmax,
                      model.profile.matrix_qmax(name))
    if tr is not None:
        tr.update({f"{name}.{k}": v for k, v in parts.items()})
    return y


def head_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm over each head of x fp32 [T, n, d] with one weight [d] (Qwen3's q/k norm): the
    spec's rmsnorm of the T * n rows of width d."""
    t, n, d = x.shape
    return rmsnorm(np.ascontiguousarray(x.reshape(t * n, d)), weight, eps).reshape(t, n, d)


def split_qkv(cfg, qkv: np.ndarray, q_norm, k_norm, cos, sin, rope=apply_rope):
    """q [T, nh, d], k, v [T, nkv, d] from the qkv linear's output fp32 [T, (nh + 2 nkv) d]:
    q and k head-normed (when the family has q/k norms, before RoPE) and rotated (by `rope`,
    apply_rope or a twin with its results)."""
    t, nh, nkv, d = qkv.shape[0], cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q = qkv[:, :cfg.q_size].reshape(t, nh, d)
    k = qkv[:, cfg.q_size:cfg.q_size + cfg.kv_size].reshape(t, nkv, d)
    if cfg.qk_norm:
        q, k = head_norm(q, q_norm, cfg.rms_norm_eps), head_norm(k, k_norm, cfg.rms_norm_eps)
    v = qkv[:, cfg.q_size + cfg.kv_size:].reshape(t, nkv, d)
    return rope(q, cos, sin), rope(k, cos, sin), v


def experts_forward(model, ex: QExperts, m: np.ndarray, tr: dict | None):
    """A Mixtral MLP on m fp32 [T, H] (numerics/moe.py): the router linear, the k selected
    experts of each token (ascending index), each a SwiGLU MLP of its own linears, combined by
    the routing weights. Returns (y fp32 [T, H], act fp32 [T, k, F]); the trace gets the
    router's q/s/z, the experts' accumulators gate_up.z [T, k, 2F] and down.z [T, k, H], and
    the routing (experts.sel, experts.g)."""
    cfg, prof = model.cfg, model.profile
    f, k, t = cfg.intermediate_size, cfg.experts_per_token, m.shape[0]
    r = _lin(m, ex.router, model, tr, "router")
    sel, g = moe.route(r, k)
    gu_z = np.zeros((t, k, 2 * f), np.int64)
    dn_z = np.zeros((t, k, cfg.hidden_size), np.int64)
    act = np.zeros((t, k, f), F32)
    outs = np.zeros((t, k, cfg.hidden_size), F32)
    for e in np.unique(sel):  # each expert once, over the (token, slot) pairs that chose it
        rows, slot = np.nonzero(sel == e)
        gu, p1 = linear(m[rows], ex.gate_up[e].q, ex.gate_up[e].s, None, prof.act_qmax,
                        prof.weight_qmax)
        a = swiglu(gu[:, :f], gu[:, f:])
        y, p2 = linear(a, ex.down[e].q, ex.down[e].s, None, prof.act_qmax, prof.weight_qmax)
        gu_z[rows, slot], dn_z[rows, slot], act[rows, slot], outs[rows, slot] = \
            p1["z"], p2["z"], a, y
    if tr is not None:
        tr.update({"gate_up.z": gu_z, "down.z": dn_z, "experts.sel": sel, "experts.g": g})
    return moe.combine(outs, g), act


def layer_forward(model, i: int, x, cache: KVCache, positions, rope: RopeTable, tr) -> np.ndarray:
    """One decoder block on x fp32 [T, H] at `positions`; appends its K/V rows to `cache`."""
    cfg, layer = model.cfg, model.layers[i]
    qmax = model.profile.kv_qmax
    a = rmsnorm(x, layer.attn_norm, cfg.rms_norm_eps)
    qkv = _lin(a, layer.qkv, model, tr, "qkv")
    cos, sin = rope.lookup(positions)
    q, k, v = split_qkv(cfg, qkv, layer.q_norm, layer.k_norm, cos, sin)
    (qq, sq), (kq, sk), (vq, sv) = (quantize_rows(a_, qmax) for a_ in (q, k, v))
    cache.append(i, kq, sk, vq, sv)
    parts = {} if tr is not None else None
    o = attention(qq, sq, cache.k[i], cache.sk[i], cache.v[i], cache.sv[i], positions, qmax, parts,
                  window=cfg.sliding_window)
    h = x + _lin(o, layer.o, model, tr, "o")
    m = rmsnorm(h, layer.mlp_norm, cfg.rms_norm_eps)
    if layer.experts is not None:
        y, act = experts_forward(model, layer.experts, m, tr)
        out = (h + y).astype(F32)
    else:
        gu = _lin(m, layer.gate_up, model, tr, "gate_up")
        act = swiglu(gu[:, :cfg.intermediate_size], gu[:, cfg.intermediate_size:])
        out = (h + _lin(act, layer.down, model, tr, "down")).astype(F32)
    if tr is not None:
        tr.update(x=x, attn_in=a, q=qq, sq=sq, k=kq, sk=sk, v=vq, sv=sv, attn=o, h=h, mlp_in=m,
                  act=act, out=out, **{f"attn.{k_}": v_ for k_, v_ in parts.items()})
    return out


def forward(model: QuantizedModel, ids, cache: KVCache, rope: RopeTable,
            trace: dict | None = None, logits_for: str = "all") -> np.ndarray:
    """Run ids [T] after the cache's positions; returns logits fp32 [T, V] ([1, V] for 'last')."""
    ids = np.asarray(ids, dtype=np.int64)
    positions = cache.length + np.arange(len(ids))
    x = embed(model, ids)
    for i in range(model.cfg.num_layers):
        tr = {} if trace is not None else None
        x = layer_forward(model, i, x, cache, positions, rope, tr)
        if trace is not None:
            trace.update({f"layers.{i}.{k}": v for k, v in tr.items()})
    cache.length += len(ids)
    if logits_for == "last":
        x = x[-1:]
    n = rmsnorm(x, model.final_norm, model.cfg.rms_norm_eps)
    tr = {} if trace is not None else None
    logits = _lin(n, model.lm_head, model, tr, "lm_head")
    if trace is not None:
        trace.update(final_in=n, logits=logits, **tr)
    return logits


__all__ = ["KVCache", "embed", "forward", "head_norm", "layer_forward", "split_qkv",
           "dequantize"]
