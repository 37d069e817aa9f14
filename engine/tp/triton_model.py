"""TPTritonModel: the Triton backend sharded with the same plan and the same exact collectives as
TPModel (engine/tp/model.py).

Column-parallel linears (qkv, gate_up, the LM head) are the Triton GEMM on the rank's weight rows,
fed by the fused RMSNorm+quant kernel on the replicated residual. Attention is the Triton kernel
on the rank's heads (their K/V heads with them), RoPE and Q/K/V quantization the fused kernel on
the rank's columns: each is per head, so nothing crosses ranks. The row-parallel linears (o, down)
cannot use the fused kernels' own quantization, whose absmax covers only the rank's slice: they
take the global absmax (all-reduce MAX), quantize their slice with it, run the GEMM for its int64
accumulators, all-reduce them (SUM, exact in any order) and dequantize (plus the residual) on the
summed integers, which are the unsharded run's. SwiGLU is the fused kernel's fp32 activation, its
quantization redone with the global absmax. The LM head's logits are gathered as raw bytes.

Receipts and openings need the residual streams, the gathered K/V cache, the LM-head accumulators
(gathered like the logits) and, traced, every linear's full-width accumulators: column-parallel
ones gathered, row-parallel ones summed. Other per-layer intermediates are not traced here.
"""

from __future__ import annotations

import torch

from ...kernels import gemm, rmsnorm_quant, rope_quant, swiglu_quant
from ...verifier.numerics.rope import RopeTable
from ...verifier.numerics.weights import QuantizedModel
from ..exact import ops
from ..exact.triton_backend import (TritonExperts, TritonLinear, TritonModel, _device_norms,
                                    _TritonLayer, head_normed)
from .comm import Comm
from .model import TPModel, gather_columns, gather_vocab
from .shard import Plan, cols, layer_spans, rows


class _TPTritonExperts(TritonExperts):
    """A Mixtral MLP on the rank's columns of every expert, as the dense MLP is split: the router
    (replicated) on the quantized MLP input, so every rank picks the same experts and runs their
    collectives in the same order; each expert's gate_up GEMM on its rank rows, SwiGLU, the
    activation requantized with the global absmax, the down GEMM's int64 accumulators summed."""

    def __init__(self, ex, wq: int, cfg, p: Plan, comm: Comm, device: torch.device):
        span, lo = layer_spans(cfg, p)["gate_up"], p.rank * p.ffn
        self.comm, self.parts = comm, [p.ffn, p.ffn]
        self.router = TritonLinear(ex.router, wq, device)
        self.gate_up = [TritonLinear(rows(lin, span), wq, device) for lin in ex.gate_up]
        self.down = [TritonLinear(cols(lin, lo, lo + p.ffn), wq, device) for lin in ex.down]

    def _expert(self, e: int, qx, sx, aq: int, keep: bool):
        gu_lin, dn_lin = self.gate_up[e], self.down[e]
        gu, z1 = gemm.linear(qx, gu_lin.planes, sx, gu_lin.scale, trace=keep)
        a, _, _ = swiglu_quant.swiglu_quant(gu, aq, store_act=True)
        qa, sa = ops.quantize_rows(a, aq, self.comm.max_(ops.row_absmax(a)))
        _, z2 = gemm.linear(qa, dn_lin.planes, sa, dn_lin.scale, trace=True)
        z2 = self.comm.sum_(z2)
        y = ops.dequantize(z2, sa, dn_lin.scale, dn_lin.bias)
        return a, y, gather_columns(self.comm, z1, self.parts) if keep else None, z2, sa


class _TPTritonLayer(_TritonLayer):
    def __init__(self, layer, wq: int, cfg, p: Plan, comm: Comm, device: torch.device):
        spans = layer_spans(cfg, p)
        self.comm, self.heads, self.kv_heads = comm, p.heads, p.kv_heads
        self.parts = {"qkv": [p.q_size, p.kv_size, p.kv_size], "gate_up": [p.ffn, p.ffn]}
        self.q_norm, self.k_norm = _device_norms(layer, device)  # per head: every rank's heads
        self.attn_norm = torch.from_numpy(layer.attn_norm).to(device)
        self.mlp_norm = torch.from_numpy(layer.mlp_norm).to(device)
        self.qkv = TritonLinear(rows(layer.qkv, spans["qkv"]), wq, device)
        lo = p.rank * p.q_size
        self.o = TritonLinear(cols(layer.o, lo, lo + p.q_size), wq, device)
        self.experts = None if layer.experts is None else \
            _TPTritonExperts(layer.experts, wq, cfg, p, comm, device)
        if layer.experts is None:
            self.gate_up = TritonLinear(rows(layer.gate_up, spans["gate_up"]), wq, device)
            self.down = TritonLinear(cols(layer.down, p.rank * p.ffn, (p.rank + 1) * p.ffn), wq,
                                     device)

    def _column(self, name: str, qx, sx, tr) -> torch.Tensor:
        """The rank's output columns; traced: the full-width accumulators, as one device has."""
        y = getattr(self, name)(qx, sx, tr, name)
        if tr is not None:
            tr[f"{name}.z"] = gather_columns(self.comm, tr[f"{name}.z"], self.parts[name])
        return y

    def _row(self, name: str, x: torch.Tensor, qmax: int, resid: torch.Tensor, tr):
        """resid + the unsharded linear of the full row whose columns x holds here; and sx."""
        lin = getattr(self, name)
        qx, sx = ops.quantize_rows(x, qmax, self.comm.max_(ops.row_absmax(x)))
        _, z = gemm.linear(qx, lin.planes, sx, lin.scale, trace=True)
        z = self.comm.sum_(z)
        if tr is not None:
            tr.update({f"{name}.q": torch.cat(self.comm.gather(qx), dim=-1), f"{name}.s": sx,
                       f"{name}.z": z})
        return resid + ops.dequantize(z, sx, lin.scale, lin.bias), sx

    def __call__(self, m, i: int, x: torch.Tensor, step, tr) -> torch.Tensor:
        """tr: only the linears' full-width q, s and z (what openings read), and x."""
        cfg, aq, kvq, eps = m.cfg, m.profile.act_qmax, m.profile.kv_qmax, m.cfg.rms_norm_eps
        _, qa, sa = rmsnorm_quant.rmsnorm_quant(x, self.attn_norm, eps, aq, store_y=False)
        qkv = self._column("qkv", qa, sa, tr)
        qkv = head_normed(qkv, self.q_norm, self.k_norm, self.heads, self.kv_heads, eps, kvq)
        (qq, sq), (kq, sk), (vq, sv) = rope_quant.rope_quant(
            qkv, step.cos, step.sin, self.heads, self.kv_heads, kvq)
        o = self._attend(i, step, qq, sq, kq, sk, vq, sv, kvq, cfg.sliding_window)
        h, so = self._row("o", o, aq, x, tr)
        _, qm, sm = rmsnorm_quant.rmsnorm_quant(h, self.mlp_norm, eps, aq, store_y=False)
        step.scales += [sa, sq, sk, sv, so, sm]
        if self.experts is not None:
            _, out = self.experts(cfg, qm, sm, h, step, tr, aq)
        else:
            gu = self._column("gate_up", qm, sm, tr)
            act, _, _ = swiglu_quant.swiglu_quant(gu, aq, store_act=True)
            out, sact = self._row("down", act, aq, h, tr)
            step.scales.append(sact)
        if tr is not None:
            tr.update(x=x, h=h, out=out)
        return out


class TPTritonModel(TPModel, TritonModel):
    """One rank's shard on the Triton kernels; rank 0 drives the others exactly as in TPModel
    (forward, cache gathers and heartbeats are announced first; the MRO puts TritonModel's
    forward under TPModel's)."""

    def __init__(self, qm: QuantizedModel, comm: Comm, device: str | torch.device | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self._init_driver(qm, comm)
        cfg, p = qm.cfg, self.plan
        self.embed_q = torch.from_numpy(qm.embed.q).to(self.device)
        self.embed_s = torch.from_numpy(qm.embed.s).to(self.device)
        self.layers = [_TPTritonLayer(layer, qm.profile.weight_qmax, cfg, p, comm, self.device)
                       for layer in qm.layers]
        self.final_norm = torch.from_numpy(qm.final_norm).to(self.device)
        self.lm_head = TritonLinear(rows(qm.lm_head, [p.vocab]),
                                    qm.profile.matrix_qmax("lm_head"), self.device)
        self.rope = RopeTable(cfg)

    def _vocab(self, y: torch.Tensor) -> torch.Tensor:
        return gather_vocab(self.comm, y, self.plan.vocab_chunk, self.cfg.vocab_size)
