"""TritonModel: ExactModel's forward on the Triton kernels (GPU, or the interpreter on a CPU).

Same interface and same bits as the torch backend: every linear input is quantized by a fused row
kernel (RMSNorm+quant, SwiGLU+quant, or plain quant for the attention output), every linear is the
int8-plane GEMM with the dequantization (and residual add) in its epilogue, RoPE and the Q/K/V
quantization are one kernel, and attention is the split-KV integer-softmax kernel per sequence.
The kernels never materialize attention scores, so traces carry no `attn.*` parts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ...kernels import attention, gemm, quantize, rmsnorm_quant, rope_quant, swiglu_quant
from ...verifier.numerics.rope import RopeTable
from ...verifier.numerics.weights import QLinear, QuantizedModel
from . import ops
from .model import ExactModel, SeqCache
from .paged import PagedStep


class TritonLinear:
    """int8 weight planes [P, N, K], fp32 channel scales and optional bias, on `device`."""

    def __init__(self, lin: QLinear, qmax: int, device: torch.device):
        w = torch.from_numpy(np.ascontiguousarray(lin.q))
        self.planes = gemm.weight_planes(w, qmax).to(device)
        self.scale = torch.from_numpy(lin.s).to(device)
        self.bias = None if lin.bias is None else torch.from_numpy(lin.bias).to(device)

    def __call__(self, qx, sx, tr: dict | None, name: str, resid=None) -> torch.Tensor:
        """y = (resid +) dequant(qx @ W.T); records q, s, z under `name` when tracing."""
        y, z = gemm.linear(qx, self.planes, sx, self.scale, self.bias, resid, trace=tr is not None)
        if tr is not None:
            tr.update({f"{name}.q": qx, f"{name}.s": sx, f"{name}.z": z})
        return y


@dataclass
class _Step:
    caches: list
    lengths: list
    pos: torch.Tensor  # int32 [N] absolute positions, on device
    cos: torch.Tensor  # fp32 [N, d/2], on device
    sin: torch.Tensor
    scales: list = field(default_factory=list)  # every quantization scale of the step
    paged: object = None  # the PagedStep when every cache is in one K/V pool (False: none)


class TritonModel(ExactModel):
    """The exact forward on Triton kernels; weights and caches live on `device`."""

    def __init__(self, qm: QuantizedModel, device: str | torch.device | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.qm, self.cfg, self.profile = qm, qm.cfg, qm.profile
        wq = qm.profile.weight_qmax
        self.embed_q = torch.from_numpy(qm.embed.q).to(self.device)
        self.embed_s = torch.from_numpy(qm.embed.s).to(self.device)
        self.layers = [_TritonLayer(layer, wq, self.device) for layer in qm.layers]
        self.final_norm = torch.from_numpy(qm.final_norm).to(self.device)
        self.lm_head = TritonLinear(qm.lm_head, qm.profile.matrix_qmax("lm_head"), self.device)
        self.rope = RopeTable(qm.cfg)

    @torch.inference_mode()
    def forward(self, caches: list[SeqCache], tokens: list[list[int]], trace: dict | None = None,
                all_logits: bool = False, residuals: list | None = None,
                trace_attention: bool = True) -> list[torch.Tensor]:
        """As ExactModel.forward: logits come back on the CPU; traced values and `residuals` stay
        on `device`; trace_attention is accepted and ignored (no attention parts)."""
        lengths = [len(t) for t in tokens]
        if min(lengths) < 1:
            raise ValueError("every sequence in a step needs at least one token")
        dev = self.device
        ids = torch.tensor([i for t in tokens for i in t], dtype=torch.int64, device=dev)
        pos = np.concatenate([c.length + np.arange(n) for c, n in zip(caches, lengths)])
        cos, sin = (torch.from_numpy(a).to(dev) for a in self.rope.lookup(pos))
        x = self.embed_q[ids].to(torch.float32) * self.embed_s[ids].unsqueeze(1)
        step = _Step(caches, lengths, torch.from_numpy(pos.astype(np.int32)).to(dev), cos, sin)
        x = self._run_layers(x, step, trace, residuals)
        _check_finite(step.scales)
        for c, n in zip(caches, lengths):
            c.length += n
        return self._logits(x, lengths, trace, all_logits)

    @torch.inference_mode()
    def lm_accumulators(self, final_rows: torch.Tensor) -> torch.Tensor:
        """LM-head integer accumulators int64 [n, V] (on the CPU) for final residual rows fp32."""
        x = final_rows.to(self.device)
        _, qn, sn = rmsnorm_quant.rmsnorm_quant(x, self.final_norm, self.cfg.rms_norm_eps,
                                                self.profile.act_qmax, store_y=False)
        _check_finite([sn])
        _, z = gemm.linear(qn, self.lm_head.planes, sn, self.lm_head.scale, trace=True)
        return self._vocab(z).cpu()

    def _vocab(self, y: torch.Tensor) -> torch.Tensor:
        """The full vocabulary row of an LM-head output (a sharded model gathers it)."""
        return y

    def _logits(self, x, lengths, trace, all_logits):
        if not all_logits:
            x = x[torch.from_numpy(np.cumsum(lengths) - 1).to(self.device)]
        n, qn, sn = rmsnorm_quant.rmsnorm_quant(x, self.final_norm, self.cfg.rms_norm_eps,
                                                self.profile.act_qmax, store_y=trace is not None)
        tr = {} if trace is not None else None
        _check_finite([sn])
        logits = self._vocab(self.lm_head(qn, sn, tr, "lm_head"))
        if trace is not None:
            tr["lm_head.z"] = self._vocab(tr["lm_head.z"])
            trace.update(final_in=n, logits=logits, **tr)
        logits = logits.cpu()  # the sampler and the receipt work on the host
        return list(logits.split(1)) if not all_logits else list(logits.split(lengths))


class TritonExperts:
    """A Mixtral MLP (verifier/numerics/moe.py) on the kernels: the router GEMM on the quantized
    MLP input, the routing by the torch backend's rule (a handful of values per token), then each
    selected expert's gate_up GEMM, SwiGLU+quant and down GEMM over the rows that chose it; the
    combination is one fp32 multiply and one add per slot (separate ops, no FMA)."""

    def __init__(self, ex, wq: int, device: torch.device):
        self.router = TritonLinear(ex.router, wq, device)
        self.gate_up = [TritonLinear(lin, wq, device) for lin in ex.gate_up]
        self.down = [TritonLinear(lin, wq, device) for lin in ex.down]

    def __call__(self, cfg, qm, sm, h, step: _Step, tr: dict | None, aq: int):
        """(act fp32 [T, k, F], h + y fp32 [T, H]) from the MLP input quantized (qm, sm); act:
        the intermediate columns this device computes."""
        k, t, hid, keep = cfg.experts_per_token, qm.shape[0], cfg.hidden_size, tr is not None
        sel, g = ops.moe_route(self.router(qm, sm, tr, "router"), k)
        dev, f = qm.device, self.gate_up[0].scale.shape[0] // 2
        outs = torch.empty((t, k, hid), dtype=torch.float32, device=dev)
        act = torch.empty((t, k, f), dtype=torch.float32, device=dev)
        if keep:
            gu_z = torch.empty((t, k, 2 * cfg.intermediate_size), dtype=torch.int64, device=dev)
            dn_z = torch.empty((t, k, hid), dtype=torch.int64, device=dev)
        for e in torch.unique(sel).tolist():  # each expert once, over the rows that chose it
            rows, slot = (sel == e).nonzero(as_tuple=True)
            a, y, z1, z2, sa = self._expert(e, qm[rows].contiguous(), sm[rows].contiguous(), aq,
                                            keep)
            step.scales.append(sa)
            outs[rows, slot], act[rows, slot] = y, a
            if keep:
                gu_z[rows, slot], dn_z[rows, slot] = z1, z2
        if keep:
            tr.update({"gate_up.z": gu_z, "down.z": dn_z, "experts.sel": sel, "experts.g": g})
        return act, h + ops.moe_combine(outs, g)

    def _expert(self, e: int, qx, sx, aq: int, keep: bool):
        """Expert e on the rows (qx, sx): (act, y, gate_up z, down z, act scales); the z's
        full-width (tensor parallelism gathers and sums them), None untraced."""
        gu, z1 = gemm.linear(qx, self.gate_up[e].planes, sx, self.gate_up[e].scale, trace=keep)
        a, qa, sa = swiglu_quant.swiglu_quant(gu, aq, store_act=True)
        y, z2 = gemm.linear(qa, self.down[e].planes, sa, self.down[e].scale, trace=keep)
        return a, y, z1, z2, sa


def head_normed(qkv: torch.Tensor, q_norm, k_norm, nh: int, nkv: int, eps: float, qmax: int):
    """qkv fp32 [T, (nh + 2 nkv) d] with every q and k head RMSNormed (Qwen3's q/k norm), by the
    rmsnorm_quant kernel over the heads' rows (its fp32 output, the spec's head_norm)."""
    if q_norm is None:
        return qkv
    t = qkv.shape[0]
    d = qkv.shape[1] // (nh + 2 * nkv)
    out = qkv.clone()
    for lo, n, w in ((0, nh, q_norm), (nh * d, nkv, k_norm)):
        rows = qkv[:, lo:lo + n * d].reshape(t * n, d).contiguous()
        y, _, _ = rmsnorm_quant.rmsnorm_quant(rows, w, eps, qmax, store_y=True)
        out[:, lo:lo + n * d] = y.reshape(t, n * d)
    return out


def _device_norms(layer, device):
    return tuple(None if w is None else torch.from_numpy(w).to(device)
                 for w in (layer.q_norm, layer.k_norm))


class _TritonLayer:
    def __init__(self, layer, wq: int, device: torch.device):
        self.q_norm, self.k_norm = _device_norms(layer, device)
        self.attn_norm = torch.from_numpy(layer.attn_norm).to(device)
        self.mlp_norm = torch.from_numpy(layer.mlp_norm).to(device)
        self.qkv, self.o = TritonLinear(layer.qkv, wq, device), TritonLinear(layer.o, wq, device)
        self.experts = None if layer.experts is None else \
            TritonExperts(layer.experts, wq, device)
        if layer.experts is None:
            self.gate_up = TritonLinear(layer.gate_up, wq, device)
            self.down = TritonLinear(layer.down, wq, device)

    def __call__(self, m: TritonModel, i: int, x: torch.Tensor, step: _Step, tr) -> torch.Tensor:
        cfg, aq, kvq, eps = m.cfg, m.profile.act_qmax, m.profile.kv_qmax, m.cfg.rms_norm_eps
        keep = tr is not None  # fp32 intermediates are only written when traced
        a, qa, sa = rmsnorm_quant.rmsnorm_quant(x, self.attn_norm, eps, aq, store_y=keep)
        qkv = self.qkv(qa, sa, tr, "qkv")
        qkv = head_normed(qkv, self.q_norm, self.k_norm, cfg.num_heads, cfg.num_kv_heads, eps,
                          kvq)
        (qq, sq), (kq, sk), (vq, sv) = rope_quant.rope_quant(
            qkv, step.cos, step.sin, cfg.num_heads, cfg.num_kv_heads, kvq)
        o = self._attend(i, step, qq, sq, kq, sk, vq, sv, kvq, cfg.sliding_window)
        qo, so = quantize.quantize_rows(o, aq)
        step.scales += [sa, sq, sk, sv, so]
        h = self.o(qo, so, tr, "o", resid=x)
        mm, qm, sm = rmsnorm_quant.rmsnorm_quant(h, self.mlp_norm, eps, aq, store_y=keep)
        step.scales.append(sm)
        if self.experts is not None:
            act, out = self.experts(cfg, qm, sm, h, step, tr, aq)
        else:
            gu = self.gate_up(qm, sm, tr, "gate_up")
            act, qact, sact = swiglu_quant.swiglu_quant(gu, aq, store_act=keep)
            out = self.down(qact, sact, tr, "down", resid=h)
            step.scales.append(sact)
        if tr is not None:
            tr.update(x=x, attn_in=a, q=qq.contiguous(), sq=sq.contiguous(), k=kq.contiguous(),
                      sk=sk.contiguous(), v=vq.contiguous(), sv=sv.contiguous(), attn=o, h=h,
                      mlp_in=mm, act=act, out=out)
        return out

    def _attend(self, i, step: _Step, qq, sq, kq, sk, vq, sv, kvq,
                window: int | None = None) -> torch.Tensor:
        """Each sequence's new rows against its keys. Sequences in one K/V pool (continuous
        batching): the step's new rows written into their blocks in one copy per tensor, and the
        kernel reads every key where it lies through the sequence's block table (the same bits
        as contiguous rows: tests/kernels). Otherwise each cache appends and is read whole."""
        if step.paged is None:
            step.paged = PagedStep.of(step.caches, step.lengths) or False
        ps = step.paged
        if ps:
            ps.write(i, kq, sk, vq, sv)
            rows = ps.rows(i)
        outs, start = [], 0
        for j, (cache, n) in enumerate(zip(step.caches, step.lengths)):
            sl = slice(start, start + n)
            if ps:
                keys, paging = rows, dict(block_table=ps.table(j), block_size=ps.pool.block_size,
                                          seq_len=cache.length + n)
            else:
                cache.append(i, kq[sl].contiguous(), sk[sl].contiguous(), vq[sl].contiguous(),
                             sv[sl].contiguous())
                keys, paging = (cache.k[i], cache.sk[i], cache.v[i], cache.sv[i]), {}
            outs.append(attention.attention(qq[sl], sq[sl], *keys, step.pos[sl], kvq,
                                            window=window, **paging))
            start += n
        return torch.cat(outs)


def _check_finite(scales: list) -> None:
    """The spec refuses to quantize a non-finite row; a kernel cannot raise, but its scale is then
    inf or NaN. One check per step (one device sync) keeps the torch backend's FloatingPointError."""
    flat = torch.cat([s.reshape(-1) for s in scales])
    if not bool(torch.isfinite(flat).all()):
        raise FloatingPointError("non-finite value in a row to quantize")
