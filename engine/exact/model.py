"""ExactModel: the quantized model in torch, run over a batch of sequences with KV caches.

Every op is per token except attention, which is per sequence: a token's values do not depend on
what else is in the batch, how the prompt was chunked, or whether it came in prefill or decode.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ...verifier import native
from ...verifier.numerics.rope import RopeTable
from ...verifier.numerics.weights import QLinear, QuantizedModel
from . import ops
from .gemm import ExactWeight
from .paged import PagedStep


# rows from which an untraced linear recombines and dequantizes in the compiled core: below it
# the per-call overhead costs more than the pass saves (decode steps); the bits are the same
FUSED_MIN_ROWS = 64


class TorchLinear:
    """An exact linear layer: int weight, fp32 channel scales, optional fp32 bias."""

    def __init__(self, lin: QLinear, qmax: int):
        self.weight = ExactWeight(torch.from_numpy(np.ascontiguousarray(lin.q)), qmax)
        self.scale = torch.from_numpy(lin.s)
        self.bias = None if lin.bias is None else torch.from_numpy(lin.bias)
        # untraced calls recombine and dequantize in the compiled core, one pass (a subclass that
        # quantizes or accumulates otherwise, as tensor parallelism's row split, keeps its steps)
        self.fused = (type(self).quantize is TorchLinear.quantize
                      and type(self).accumulate is TorchLinear.accumulate)

    def __call__(self, x: torch.Tensor, act_qmax: int, tr: dict | None, name: str):
        qx, sx = self.quantize(x, act_qmax)
        if (tr is None and self.fused and x.shape[0] >= FUSED_MIN_ROWS and ops.NATIVE
                and self.weight.use_int_mm and native.lib() and not self.weight.small_rows(qx)):
            parts, nx = self.weight.plane_products(qx, act_qmax)
            with torch.profiler.record_function("commitllm::dequant_planes"):
                y = native.dequant_planes(parts.numpy(), nx, sx.contiguous().numpy(),
                                          self.scale.numpy(),
                                          None if self.bias is None else self.bias.numpy())
            return self.output(torch.from_numpy(y))
        z = self.accumulate(qx, act_qmax)
        if tr is not None:
            tr.update(self.traced(name, qx, sx, z))
        return self.output(ops.dequantize(z, sx, self.scale, self.bias))

    # The steps a sharded linear (engine/tp) overrides; here they are the single-device ones.
    def quantize(self, x: torch.Tensor, act_qmax: int):
        return ops.quantize_rows(x, act_qmax)

    def accumulate(self, qx: torch.Tensor, act_qmax: int) -> torch.Tensor:
        return self.weight.matmul(qx, act_qmax)

    def traced(self, name: str, qx, sx, z) -> dict:
        return {f"{name}.q": qx, f"{name}.s": sx, f"{name}.z": z}

    def output(self, y: torch.Tensor) -> torch.Tensor:
        return y


class TorchExperts:
    """A Mixtral MLP (verifier/numerics/moe.py): the router, then each selected expert's SwiGLU
    MLP over the rows that chose it, combined by the routing weights in ascending expert order.
    Each row's values depend on that row alone (no capacity), so batching changes no bit."""

    def __init__(self, ex, wq: int):
        self.router = TorchLinear(ex.router, wq)
        self.gate_up = [TorchLinear(lin, wq) for lin in ex.gate_up]
        self.down = [TorchLinear(lin, wq) for lin in ex.down]

    @staticmethod
    def _apply(lin: TorchLinear, qx: torch.Tensor, sx: torch.Tensor, aq: int):
        z = lin.accumulate(qx, aq)
        return ops.dequantize(z, sx, lin.scale, lin.bias), z

    def full(self, lin: TorchLinear, z: torch.Tensor) -> torch.Tensor:
        """A gate_up's full-width accumulators (tensor parallelism gathers its column split)."""
        return z

    def __call__(self, cfg, m: torch.Tensor, aq: int, tr: dict | None):
        """(y fp32 [T, H], act fp32 [T, k, F]); the trace as the spec's experts_forward (act:
        the intermediate columns this device computes)."""
        k, t, hid = cfg.experts_per_token, m.shape[0], cfg.hidden_size
        f = self.gate_up[0].scale.shape[0] // 2  # this device's intermediate width
        sel, g = ops.moe_route(self.router(m, aq, tr, "router"), k)
        outs = torch.empty((t, k, hid), dtype=torch.float32)
        act = torch.empty((t, k, f), dtype=torch.float32)
        f2 = 2 * cfg.intermediate_size
        gu_z = torch.empty((t, k, f2), dtype=torch.int64) if tr is not None else None
        dn_z = torch.empty((t, k, hid), dtype=torch.int64) if tr is not None else None
        qm, sm = self.gate_up[0].quantize(m, aq)  # once (per row): every expert reads it
        for e in torch.unique(sel).tolist():  # each expert once, over the rows that chose it
            rows, slot = (sel == e).nonzero(as_tuple=True)
            gu, z1 = self._apply(self.gate_up[e], qm[rows], sm[rows], aq)
            a = ops.swiglu(gu[:, :f], gu[:, f:])
            y, z2 = self._apply(self.down[e], *self.down[e].quantize(a, aq), aq)
            outs[rows, slot], act[rows, slot] = y, a
            if tr is not None:
                gu_z[rows, slot], dn_z[rows, slot] = self.full(self.gate_up[e], z1), z2
        if tr is not None:
            tr.update({"gate_up.z": gu_z, "down.z": dn_z, "experts.sel": sel, "experts.g": g})
        return ops.moe_combine(outs, g), act


@dataclass
class SeqCache:
    """One sequence's K/V rows per layer: int [S, nkv, d] and fp32 scales [S, nkv].

    k, sk, v, sv[layer] are views of the filled rows of buffers that grow by doubling, so a
    decode step writes one row in place instead of copying the whole cache.
    """

    k: list = field(default_factory=list)
    sk: list = field(default_factory=list)
    v: list = field(default_factory=list)
    sv: list = field(default_factory=list)
    length: int = 0
    _bufs: dict = field(default_factory=dict, repr=False)  # layer -> [k, sk, v, sv] buffers

    def append(self, layer: int, k, sk, v, sv) -> None:
        new, stores = (k, sk, v, sv), (self.k, self.sk, self.v, self.sv)
        n = self.k[layer].shape[0] if len(self.k) > layer else 0
        bufs = self._bufs.get(layer)
        if bufs is None or n + k.shape[0] > bufs[0].shape[0]:
            cap = max(n + k.shape[0], 2 * n, 16)
            bufs = [torch.empty((cap, *x.shape[1:]), dtype=x.dtype, device=x.device) for x in new]
            for b, store in zip(bufs, stores):
                if n:
                    b[:n] = store[layer]
            self._bufs[layer] = bufs
        for b, x in zip(bufs, new):
            b[n:n + x.shape[0]] = x
        for b, store in zip(bufs, stores):
            if len(store) <= layer:
                store.append(b[:n + k.shape[0]])
            else:
                store[layer] = b[:n + k.shape[0]]


class ExactModel:
    """The exact forward of the spec, batched over sequences."""

    def __init__(self, qm: QuantizedModel):
        self.qm, self.cfg, self.profile = qm, qm.cfg, qm.profile
        wq = qm.profile.weight_qmax
        self.embed_q = torch.from_numpy(qm.embed.q)
        self.embed_s = torch.from_numpy(qm.embed.s)
        self.layers = [_TorchLayer(layer, wq) for layer in qm.layers]
        self.final_norm = torch.from_numpy(qm.final_norm)
        self.lm_head = TorchLinear(qm.lm_head, qm.profile.matrix_qmax("lm_head"))
        self.rope = RopeTable(qm.cfg)

    def full_cache(self, cache: SeqCache) -> SeqCache:
        """The cache with every K/V head (what the receipt commits); sharded models gather it."""
        return cache

    @torch.inference_mode()
    def lm_accumulators(self, final_rows: torch.Tensor) -> torch.Tensor:
        """LM-head integer accumulators int64 [n, V] for final residual rows fp32 [n, H]."""
        tr = {}
        n = ops.rmsnorm(final_rows, self.final_norm, self.cfg.rms_norm_eps)
        self.lm_head(n, self.profile.act_qmax, tr, "lm")
        return tr["lm.z"]

    @torch.inference_mode()
    def forward(self, caches: list[SeqCache], tokens: list[list[int]], trace: dict | None = None,
                all_logits: bool = False, residuals: list | None = None,
                trace_attention: bool = True) -> list[torch.Tensor]:
        """Append tokens[i] to sequence i; returns per sequence logits fp32 [n_i or 1, V].

        residuals, when given, receives the L + 1 residual streams fp32 [N, H] of the flattened
        batch: the input of every layer, then the final one (what the receipt commits).
        """
        lengths = [len(t) for t in tokens]
        if min(lengths) < 1:
            raise ValueError("every sequence in a step needs at least one token")
        ids = torch.tensor([i for t in tokens for i in t], dtype=torch.int64)
        pos = np.concatenate([c.length + np.arange(n) for c, n in zip(caches, lengths)])
        cos, sin = (torch.from_numpy(a) for a in self.rope.lookup(pos))
        x = self.embed_q[ids].to(torch.float32) * self.embed_s[ids].unsqueeze(1)
        step = _Step(caches, lengths, torch.from_numpy(pos), cos, sin, trace_attention)
        x = self._run_layers(x, step, trace, residuals)
        for c, n in zip(caches, lengths):
            c.length += n
        return self._logits(x, lengths, trace, all_logits)

    def _run_layers(self, x, step, trace: dict | None, residuals: list | None):
        """Every decoder block in order; records residual streams and per-layer traces."""
        for i, layer in enumerate(self.layers):
            if residuals is not None:
                residuals.append(x)
            tr = {} if trace is not None else None
            x = layer(self, i, x, step, tr)
            if trace is not None:
                trace.update({f"layers.{i}.{k}": v for k, v in tr.items()})
        if residuals is not None:
            residuals.append(x)
        return x

    def _logits(self, x, lengths, trace, all_logits):
        ends = np.cumsum(lengths)
        if not all_logits:
            x = x[torch.from_numpy(ends - 1)]
        n = ops.rmsnorm(x, self.final_norm, self.cfg.rms_norm_eps)
        tr = {} if trace is not None else None
        logits = self.lm_head(n, self.profile.act_qmax, tr, "lm_head")
        if trace is not None:
            trace.update(final_in=n, logits=logits, **tr)
        if not all_logits:
            return list(logits.split(1))
        return list(logits.split(lengths))


@dataclass
class _Step:
    """What one forward step needs beyond the activations: caches, token counts, positions."""

    caches: list
    lengths: list
    pos: torch.Tensor  # [N] absolute positions
    cos: torch.Tensor  # [N, d/2]
    sin: torch.Tensor
    trace_attention: bool = True  # record scores/weights (single-sequence traces only)
    paged: object = None  # the PagedStep when every cache is in one K/V pool (False: none)


class _TorchLayer:
    def sizes(self, cfg) -> tuple[int, int, int, int, int]:
        """(heads, K/V heads, q width, k/v width, intermediate) this layer computes."""
        return (cfg.num_heads, cfg.num_kv_heads, cfg.q_size, cfg.kv_size,
                cfg.intermediate_size)

    def __init__(self, layer, wq: int):
        self.attn_norm = torch.from_numpy(layer.attn_norm)
        self.mlp_norm = torch.from_numpy(layer.mlp_norm)
        self.qkv = TorchLinear(layer.qkv, wq)
        self.o = TorchLinear(layer.o, wq)
        self.experts = None if layer.experts is None else TorchExperts(layer.experts, wq)
        if layer.experts is None:
            self.gate_up = TorchLinear(layer.gate_up, wq)
            self.down = TorchLinear(layer.down, wq)
        self.q_norm, self.k_norm = (None if w is None else torch.from_numpy(w)
                                    for w in (layer.q_norm, layer.k_norm))

    def __call__(self, m: ExactModel, i: int, x: torch.Tensor, step: _Step, tr) -> torch.Tensor:
        cfg, aq, kvq = m.cfg, m.profile.act_qmax, m.profile.kv_qmax
        n, d = x.shape[0], cfg.head_dim
        nh, nkv, q_size, kv_size, f = self.sizes(cfg)
        a = ops.rmsnorm(x, self.attn_norm, cfg.rms_norm_eps)
        qkv = self.qkv(a, aq, tr, "qkv")
        q = qkv[:, :q_size].reshape(n, nh, d)
        k = qkv[:, q_size:q_size + kv_size].reshape(n, nkv, d)
        if self.q_norm is not None:  # Qwen3: RMSNorm over each head before RoPE
            q = ops.head_norm(q, self.q_norm, cfg.rms_norm_eps)
            k = ops.head_norm(k, self.k_norm, cfg.rms_norm_eps)
        q = ops.apply_rope(q, step.cos, step.sin)
        k = ops.apply_rope(k, step.cos, step.sin)
        v = qkv[:, q_size + kv_size:].reshape(n, nkv, d)
        # per (token, head) rows: one call over the q, k and v heads side by side, then views
        qkv_q, qkv_s = ops.quantize_rows(torch.cat([q, k, v], dim=1), kvq)
        (qq, kq, vq), (sq, sk, sv) = (t.split([nh, nkv, nkv], dim=1) for t in (qkv_q, qkv_s))
        parts = {} if tr is not None and len(step.caches) == 1 and step.trace_attention else None
        o = self._attend(i, step, qq, sq, kq, sk, vq, sv, kvq, parts, cfg.sliding_window)
        h = x + self.o(o, aq, tr, "o")
        mm = ops.rmsnorm(h, self.mlp_norm, cfg.rms_norm_eps)
        if self.experts is not None:
            y, act = self.experts(cfg, mm, aq, tr)
            out = h + y
        else:
            gu = self.gate_up(mm, aq, tr, "gate_up")
            act = ops.swiglu(gu[:, :f], gu[:, f:])
            out = h + self.down(act, aq, tr, "down")
        if tr is not None:
            tr.update(x=x, attn_in=a, q=qq, sq=sq, k=kq, sk=sk, v=vq, sv=sv, attn=o, h=h,
                      mlp_in=mm, act=act, out=out)
            tr.update({f"attn.{k_}": v_ for k_, v_ in (parts or {}).items()})
        return out

    def _attend(self, i, step: _Step, qq, sq, kq, sk, vq, sv, kvq, parts,
                window: int | None = None) -> torch.Tensor:
        """Each sequence's new rows against its cache: the one-row sequences of a decode step in
        one padded batch, longer ones (prefill chunks) one at a time in query tiles; `window`:
        the model's sliding attention window (None: causal over every earlier key)."""
        out = torch.empty((qq.shape[0], qq.shape[1] * qq.shape[2]), dtype=torch.float32)
        starts = np.concatenate([[0], np.cumsum(step.lengths)[:-1]]).tolist()
        if step.paged is None:
            step.paged = PagedStep.of(step.caches, step.lengths) or False
        if step.paged:
            step.paged.write(i, kq, sk, vq, sv)
        else:
            for cache, n, a in zip(step.caches, step.lengths, starts):
                cache.append(i, kq[a:a + n], sk[a:a + n], vq[a:a + n], sv[a:a + n])
        single = [j for j, n in enumerate(step.lengths) if n == 1]
        if len(single) > 1 and step.paged:
            rows = torch.tensor([starts[j] for j in single])
            out[rows] = ops.attention_padded(qq[rows], sq[rows], *step.paged.padded(i, single),
                                             step.pos[rows],
                                             [step.caches[j].length + 1 for j in single], kvq,
                                             window)
        elif len(single) > 1:
            rows = torch.tensor([starts[j] for j in single])
            cs = [step.caches[j] for j in single]
            out[rows] = ops.attention_batch(qq[rows], sq[rows], [c.k[i] for c in cs],
                                            [c.sk[i] for c in cs], [c.v[i] for c in cs],
                                            [c.sv[i] for c in cs], step.pos[rows], kvq, window)
        for j, (cache, n, a) in enumerate(zip(step.caches, step.lengths, starts)):
            if len(single) > 1 and n == 1:
                continue
            sl = slice(a, a + n)
            out[sl] = ops.attention(qq[sl], sq[sl], cache.k[i], cache.sk[i], cache.v[i],
                                    cache.sv[i], step.pos[sl], kvq, parts, window=window)
        return out
