"""The quantized model: int weights with fp32 per-channel scales, fused as the engine runs them.

Quantization is part of the spec: the engine, keygen and verifier all call `quantize_model`, so
the committed weights are the same bits everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from ..checkpoint import expert_names
from ..config import ModelConfig
from .profiles import Profile
from .quant import quantize_rows

F32 = np.float32


@dataclass(frozen=True)
class QLinear:
    """y = dequant(quant(x) @ q.T): q int [N, K], s fp32 [N], optional fp32 bias [N]."""

    q: np.ndarray
    s: np.ndarray
    bias: np.ndarray | None = None

    @classmethod
    def from_float(cls, w: np.ndarray, qmax: int, bias: np.ndarray | None = None) -> "QLinear":
        q, s = quantize_rows(np.ascontiguousarray(w, dtype=F32), qmax)
        return cls(q, s, None if bias is None else np.ascontiguousarray(bias, dtype=F32))


@dataclass(frozen=True)
class QExperts:
    """A mixture-of-experts MLP (Mixtral): the router and each expert's fused gate/up and down."""

    router: QLinear  # [E, H]: one logit per expert
    gate_up: tuple[QLinear, ...]  # E x [2F, H]
    down: tuple[QLinear, ...]  # E x [H, F]


@dataclass(frozen=True)
class QLayer:
    """One decoder block: q/k/v fused by output rows ([q; k; v]), gate/up fused ([gate; up]);
    a mixture-of-experts layer has `experts` instead of gate_up and down."""

    attn_norm: np.ndarray  # fp32 [H]
    qkv: QLinear  # [(nh + 2 nkv) d, H]
    o: QLinear  # [H, nh d]
    mlp_norm: np.ndarray  # fp32 [H]
    gate_up: QLinear | None  # [2F, H]
    down: QLinear | None  # [H, F]
    q_norm: np.ndarray | None = None  # fp32 [d]: RMSNorm of each q head before RoPE (Qwen3)
    k_norm: np.ndarray | None = None  # fp32 [d]: the same for each k head
    experts: QExperts | None = None  # Mixtral

    def linears(self, i: int) -> list[tuple[str, QLinear]]:
        """(label, linear) of every matrix of layer i, in the key's and the commitment's names:
        layers.{i}.qkv, .o and then .gate_up, .down, or .router, .experts.{e}.gate_up / .down."""
        p = f"layers.{i}."
        out = [(p + "qkv", self.qkv), (p + "o", self.o)]
        if self.experts is None:
            return out + [(p + "gate_up", self.gate_up), (p + "down", self.down)]
        out.append((p + "router", self.experts.router))
        for e, (gu, dn) in enumerate(zip(self.experts.gate_up, self.experts.down)):
            out += [(p + f"experts.{e}.gate_up", gu), (p + f"experts.{e}.down", dn)]
        return out


@dataclass(frozen=True)
class QuantizedModel:
    """Everything the exact forward reads. Embedding rows are quantized like LM-head rows."""

    cfg: ModelConfig
    profile: Profile
    embed: QLinear  # [V, H]: row v is token v's input (and the LM head when tied)
    layers: tuple[QLayer, ...]
    final_norm: np.ndarray  # fp32 [H]
    lm_head: QLinear  # [V, H]; the same object as embed when tied

    def to_tensors(self) -> dict[str, np.ndarray]:
        """Flat name -> array map (for safetensors caching and commitments)."""
        out = {"final_norm": self.final_norm}
        _put(out, "embed", self.embed)
        if not self.cfg.tie_word_embeddings:
            _put(out, "lm_head", self.lm_head)
        for i, layer in enumerate(self.layers):
            for label, lin in layer.linears(i):
                _put(out, label, lin)
            for f in fields(QLayer):
                value = getattr(layer, f.name)
                if isinstance(value, np.ndarray):
                    out[f"layers.{i}.{f.name}"] = value
        return out

    @classmethod
    def from_tensors(cls, cfg: ModelConfig, profile: Profile, t: dict[str, np.ndarray]):
        """Inverse of to_tensors; checks every array's shape and dtype."""
        embed = _get(t, "embed")
        def experts(i: int) -> QExperts | None:
            if not cfg.moe:
                return None
            p = f"layers.{i}."
            return QExperts(_get(t, p + "router"),
                            tuple(_get(t, p + f"experts.{e}.gate_up")
                                  for e in range(cfg.num_experts)),
                            tuple(_get(t, p + f"experts.{e}.down") for e in range(cfg.num_experts)))

        dense = lambda i, m: None if cfg.moe else _get(t, f"layers.{i}.{m}")  # noqa: E731
        layers = tuple(
            QLayer(attn_norm=t[f"layers.{i}.attn_norm"], qkv=_get(t, f"layers.{i}.qkv"),
                   o=_get(t, f"layers.{i}.o"), mlp_norm=t[f"layers.{i}.mlp_norm"],
                   gate_up=dense(i, "gate_up"), down=dense(i, "down"),
                   q_norm=t.get(f"layers.{i}.q_norm"), k_norm=t.get(f"layers.{i}.k_norm"),
                   experts=experts(i))
            for i in range(cfg.num_layers))
        lm = embed if cfg.tie_word_embeddings else _get(t, "lm_head")
        model = cls(cfg, profile, embed, layers, t["final_norm"], lm)
        check_shapes(model)
        return model


def _put(out: dict, name: str, lin: QLinear) -> None:
    out[name + ".q"], out[name + ".s"] = lin.q, lin.s
    if lin.bias is not None:
        out[name + ".bias"] = lin.bias


def _get(t: dict, name: str) -> QLinear:
    return QLinear(t[name + ".q"], t[name + ".s"], t.get(name + ".bias"))


def check_shapes(m: QuantizedModel) -> None:
    """Raise ValueError if any array has the wrong shape or dtype for the config and profile."""
    c = m.cfg
    h, f, v = c.hidden_size, c.intermediate_size, c.vocab_size
    wdt = np.dtype(np.int8 if m.profile.weight_qmax <= 127 else np.int16)
    hdt = np.dtype(np.int8 if m.profile.head_qmax <= 127 else np.int16)
    head = {"embed": (m.embed, (v, h)), "lm_head": (m.lm_head, (v, h))}
    want = {}
    for i, layer in enumerate(m.layers):
        if (layer.experts is None) != (not c.moe) or (layer.gate_up is None) != c.moe or (
                layer.down is None) != c.moe:
            raise ValueError(f"layers.{i}: {'experts' if c.moe else 'a dense MLP'} expected")
        if c.moe and not (len(layer.experts.gate_up) == len(layer.experts.down) == c.num_experts):
            raise ValueError(f"layers.{i}: expected {c.num_experts} experts")
        shapes = {"qkv": (c.q_size + 2 * c.kv_size, h), "o": (h, c.q_size), "router": (
            c.num_experts, h), "gate_up": (2 * f, h), "down": (h, f)}
        for label, lin in layer.linears(i):
            want[label] = (lin, shapes[label.split(".")[-1]])
        for norm in (layer.attn_norm, layer.mlp_norm):
            _expect(f"layers.{i} norm", norm, (h,), np.dtype(F32))
        for name, norm in (("q_norm", layer.q_norm), ("k_norm", layer.k_norm)):
            if c.qk_norm:
                if norm is None:
                    raise ValueError(f"layers.{i}.{name}: missing ({c.family} normalizes q/k heads)")
                _expect(f"layers.{i}.{name}", norm, (c.head_dim,), np.dtype(F32))
            elif norm is not None:
                raise ValueError(f"layers.{i}.{name}: {c.family} has no q/k head norm")
    _expect("final_norm", m.final_norm, (h,), np.dtype(F32))
    for name, (lin, shape) in [*want.items(), *head.items()]:
        _expect(name + ".q", lin.q, shape, hdt if name in head else wdt)
        _expect(name + ".s", lin.s, shape[:1], np.dtype(F32))
        if lin.bias is not None:
            _expect(name + ".bias", lin.bias, shape[:1], np.dtype(F32))
    if len(m.layers) != c.num_layers:
        raise ValueError(f"expected {c.num_layers} layers, got {len(m.layers)}")


def _expect(name: str, a: np.ndarray, shape: tuple, dtype: np.dtype) -> None:
    if a.shape != shape or a.dtype != dtype:
        raise ValueError(f"{name}: expected {dtype} {shape}, got {a.dtype} {a.shape}")


def quantize_model(cfg: ModelConfig, t: dict[str, np.ndarray], profile: Profile) -> QuantizedModel:
    """Quantize fp32 HF tensors (names as in checkpoint.expected_shapes) under `profile`."""
    qmax, hq = profile.weight_qmax, profile.head_qmax
    embed = QLinear.from_float(t["model.embed_tokens.weight"], hq)
    lm = embed if cfg.tie_word_embeddings else QLinear.from_float(t["lm_head.weight"], hq)
    layers = tuple(_quantize_layer(cfg, t, i, qmax)
                   for i in range(cfg.num_layers))
    model = QuantizedModel(cfg, profile, embed, layers, _f32(t["model.norm.weight"]), lm)
    check_shapes(model)
    return model


def _quantize_experts(cfg: ModelConfig, t: dict, layer: int, qmax: int) -> QExperts:
    router, ex = expert_names(cfg, layer)
    return QExperts(
        QLinear.from_float(t[router], qmax),
        tuple(QLinear.from_float(np.concatenate([t[gate], t[up]]), qmax) for gate, up, _ in ex),
        tuple(QLinear.from_float(t[down], qmax) for _, _, down in ex))


def _quantize_layer(cfg: ModelConfig, t: dict, i: int, qmax: int) -> QLayer:
    p = f"model.layers.{i}."
    a = p + "self_attn."
    qkv_w = np.concatenate([t[a + "q_proj.weight"], t[a + "k_proj.weight"],
                            t[a + "v_proj.weight"]])
    qkv_b = None
    if cfg.attention_bias:
        qkv_b = np.concatenate([t[a + "q_proj.bias"], t[a + "k_proj.bias"], t[a + "v_proj.bias"]])
    mlp = {}
    if cfg.moe:
        mlp = dict(gate_up=None, down=None, experts=_quantize_experts(cfg, t, i, qmax))
    else:
        gate_up = np.concatenate([t[p + "mlp.gate_proj.weight"], t[p + "mlp.up_proj.weight"]])
        mlp = dict(gate_up=QLinear.from_float(gate_up, qmax),
                   down=QLinear.from_float(t[p + "mlp.down_proj.weight"], qmax))
    norms = {}
    if cfg.qk_norm:
        norms = dict(q_norm=_f32(t[a + "q_norm.weight"]), k_norm=_f32(t[a + "k_norm.weight"]))
    return QLayer(
        attn_norm=_f32(t[p + "input_layernorm.weight"]),
        qkv=QLinear.from_float(qkv_w, qmax, qkv_b),
        o=QLinear.from_float(t[a + "o_proj.weight"], qmax),
        mlp_norm=_f32(t[p + "post_attention_layernorm.weight"]),
        **mlp,
        **norms,
    )


def _f32(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=F32)
