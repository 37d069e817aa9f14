"""Cheating providers: the honest engine with ONE deviation, committed consistently.

Each constructor takes model A (the QuantizedModel the verifier's key was built from) and returns
a `Provider` whose generation and opening both run the deviation. Three mechanisms:

* other tensors: a modified QuantizedModel (dataclasses.replace), claiming A's commitment;
* a wrapped GEMM (`ZTap`): the integer accumulator a matmul returns is altered;
* patched ops or layer methods (RoPE, RMSNorm, residual stream, quantization widths, tables),
  each knowing the layer and the absolute positions it runs at. Attention and K/V cheats live in
  advattn.py.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from advworld import Provider
from commitllm.engine.exact import ops
from commitllm.engine.exact.model import ExactModel, TorchLinear, _TorchLayer
from commitllm.verifier.commitment import commit_model
from commitllm.verifier.config import ModelConfig
from commitllm.verifier.numerics import get_profile
from commitllm.verifier.numerics.rope import RopeTable
from commitllm.verifier.numerics.weights import QLinear, quantize_model

ORIG_LAYER_CALL, ORIG_LINEAR_CALL = _TorchLayer.__call__, TorchLinear.__call__
ORIG_RMSNORM, ORIG_EXP2 = ops.rmsnorm, ops.exp2


def commitment(qm) -> str:
    return commit_model(qm)["commitment"].hex()


def claiming_a(qm_a, qm_b, patches=(), **claims) -> Provider:
    """A provider computing with qm_b that claims A's model commitment."""
    return Provider(ExactModel(qm_b), tuple(patches), {"model_commitment": commitment(qm_a),
                                                       **claims})


# --- other tensors -------------------------------------------------------------------------------


def linear_of(qm, layer: int | None, matrix: str) -> QLinear:
    return qm.lm_head if matrix == "lm_head" else getattr(qm.layers[layer], matrix)


def with_linear(qm, layer: int | None, matrix: str, **fields):
    """qm with one QLinear's q / s / bias replaced (lm_head: the untied head)."""
    lin = dataclasses.replace(linear_of(qm, layer, matrix), **fields)
    if matrix == "lm_head":
        return dataclasses.replace(qm, lm_head=lin)
    return with_layer(qm, layer, **{matrix: lin})


def with_layer(qm, layer: int, **fields):
    layers = list(qm.layers)
    layers[layer] = dataclasses.replace(layers[layer], **fields)
    return dataclasses.replace(qm, layers=tuple(layers))


def scaled(qm_a, layer, matrix, factor: float) -> Provider:
    """Every channel scale of one matrix multiplied by `factor` (2: doubled, -1: negated)."""
    lin = linear_of(qm_a, layer, matrix)
    return claiming_a(qm_a, with_linear(qm_a, layer, matrix, s=(lin.s * np.float32(factor))))


def biased(qm_a, layer: int, channel: int, delta: float) -> Provider:
    lin = linear_of(qm_a, layer, "qkv")
    b = lin.bias.copy()
    b[channel] += np.float32(delta)
    return claiming_a(qm_a, with_linear(qm_a, layer, "qkv", bias=b))


def normed(qm_a, which: str, layer: int = 0, factor: float = 1.5) -> Provider:
    """One element of a norm weight scaled (attn_norm / mlp_norm of a layer, or the final norm).
    One element, not the whole vector: a uniform factor is absorbed by the per-row quantization
    of the next linear (same integers, same accumulators) and shows only as a rescaled output."""
    w = (qm_a.final_norm if which == "final_norm" else getattr(qm_a.layers[layer], which)).copy()
    w[0] *= np.float32(factor)
    if which == "final_norm":
        return claiming_a(qm_a, dataclasses.replace(qm_a, final_norm=w))
    return claiming_a(qm_a, with_layer(qm_a, layer, **{which: w}))


def requantized(qm_a, qmax: int = 7) -> Provider:
    """Every decoder linear re-quantized to `qmax` levels (qmax 7: 4-bit weights), stored int8."""
    layers = []
    for layer in qm_a.layers:
        fields = {}
        for m in ("qkv", "o", "gate_up", "down"):
            lin = getattr(layer, m)
            w = lin.q.astype(np.float32) * lin.s[:, None]
            s4 = (np.abs(w).max(axis=1) / np.float32(qmax)).astype(np.float32)
            q4 = np.clip(np.rint(w / s4[:, None]), -qmax, qmax).astype(lin.q.dtype)
            fields[m] = dataclasses.replace(lin, q=q4, s=s4)
        layers.append(dataclasses.replace(layer, **fields))
    return claiming_a(qm_a, dataclasses.replace(qm_a, layers=tuple(layers)))


def random_tensors(cfg: ModelConfig, seed: int) -> dict[str, np.ndarray]:
    """A fresh random checkpoint of cfg's shapes (linear N(0, 0.2), norms 1 + 0.1 N(0, 1))."""
    from commitllm.verifier.checkpoint import expected_shapes

    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in expected_shapes(cfg).items():
        noise = rng.standard_normal(shape).astype(np.float32)
        out[name] = (1 + 0.1 * noise) if name.endswith("norm.weight") else 0.2 * noise
    return out


def other_model(qm_a, seed: int = 99, keep_embedding: bool = False) -> Provider:
    """Another checkpoint of the same architecture (same shapes, other weights)."""
    qm_b = quantize_model(qm_a.cfg, random_tensors(qm_a.cfg, seed), qm_a.profile)
    if keep_embedding:
        qm_b = dataclasses.replace(qm_b, embed=qm_a.embed,
                                   lm_head=qm_a.embed if qm_a.cfg.tie_word_embeddings else qm_b.lm_head)
    return claiming_a(qm_a, qm_b)


def moved(qm, layer: int, matrix: str = "down", seed: int = 5, count: int = 1):
    """qm with `count` int8 weights of one matrix moved by one step towards zero."""
    lin = linear_of(qm, layer, matrix)
    rng = np.random.default_rng(seed)
    q = lin.q.copy()
    for _ in range(count):
        i, j = rng.integers(q.shape[0]), rng.integers(q.shape[1])
        q[i, j] = q[i, j] - 1 if q[i, j] > 0 else q[i, j] + 1
    return with_linear(qm, layer, matrix, q=q)


def perturbed(qm_a, layer: int, matrix: str = "down", seed: int = 5, count: int = 1) -> Provider:
    """Model B = A with `count` int8 weights of one matrix moved by one step (a slightly
    perturbed copy: fine-tuned, or a bit flip), claiming A."""
    return claiming_a(qm_a, moved(qm_a, layer, matrix, seed, count))


def perturbed_everywhere(qm_a, matrix: str = "down") -> Provider:
    """Model B = A with one weight of `matrix` moved in every layer, claiming A."""
    qm = qm_a
    for l in range(qm_a.cfg.num_layers):
        qm = moved(qm, l, matrix, seed=l)
    return claiming_a(qm_a, qm)


# --- accumulators --------------------------------------------------------------------------------


class ZTap:
    """An ExactWeight whose products come back with `delta` added to output column `col`."""

    def __init__(self, inner, col: int, delta: int):
        self.inner, self.col, self.delta = inner, col, int(delta)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def matmul(self, qx: torch.Tensor, x_qmax: int) -> torch.Tensor:
        z = self.inner.matmul(qx, x_qmax).clone()
        z[:, self.col] += self.delta
        return z


def tapped(qm_a, layer: int | None, matrix: str, col: int, delta: int) -> Provider:
    """The accumulator z[:, col] of one matrix off by `delta` at every position. The model is
    A's, so the manifest is A's without any override. A delta beyond 2^53 (z + P) runs on the
    torch ops, whose int64 -> fp32 conversion takes any accumulator (the compiled bridge, as the
    spec, refuses one it cannot convert exactly): a cheater runs whatever code serves it."""
    model = ExactModel(qm_a)
    lin = model.lm_head if matrix == "lm_head" else getattr(model.layers[layer], matrix)
    lin.weight = ZTap(lin.weight, col, delta)
    return Provider(model, patches=((ops, "NATIVE", False),) if abs(delta) >= 2**53 else ())


# --- RoPE, norms, numerics -----------------------------------------------------------------------


class RopeAs:
    """A RoPE table that computes like `table` (or at shifted positions) but reports `digest`."""

    def __init__(self, table: RopeTable, digest: str, shift: int = 0):
        self.table, self._digest, self.shift = table, digest, shift

    def lookup(self, positions):
        return self.table.lookup(np.asarray(positions) + self.shift)

    def digest(self) -> str:
        return self._digest


def rope_shifted(qm_a, shift: int = 1) -> Provider:
    model = ExactModel(qm_a)
    model.rope = RopeAs(model.rope, model.rope.digest(), shift)
    return Provider(model)


def rope_theta(qm_a, theta: float, silent: bool) -> Provider:
    """RoPE with another base; silent: the manifest keeps A's RoPE digest."""
    model = ExactModel(qm_a)
    table = RopeTable(dataclasses.replace(qm_a.cfg, rope_theta=theta))
    model.rope = RopeAs(table, model.rope.digest() if silent else table.digest())
    return Provider(model)


def rmsnorm_eps(qm_a, factor: float = 10.0) -> Provider:
    def rmsnorm(x, weight, eps):
        return ORIG_RMSNORM(x, weight, eps * factor)
    return Provider(ExactModel(qm_a), ((ops, "rmsnorm", rmsnorm),))


def act_width(qm_a, qmax: int = 127) -> Provider:
    """Activations into every linear quantized to int8 while the manifest says int16."""
    def call(self, x, act_qmax, tr, name):
        return ORIG_LINEAR_CALL(self, x, min(act_qmax, qmax), tr, name)
    return Provider(ExactModel(qm_a), ((TorchLinear, "__call__", call),))


def kv_width(qm_a, qmax: int = 127) -> Provider:
    """Q/K/V quantized to int8 while the manifest claims A's profile (int16 Q/K/V)."""
    model = ExactModel(qm_a)
    model.profile = dataclasses.replace(qm_a.profile, kv_qmax=qmax)
    return Provider(model, (), {"profile": qm_a.profile.manifest()})


def served_profile(qm_a, name: str) -> Provider:
    """Another numerics profile run (its own widths), A's profile and commitment claimed."""
    model = ExactModel(qm_a)
    model.profile = get_profile(name)
    return Provider(model, (), {"profile": qm_a.profile.manifest()})


def softmax_table(qm_a) -> Provider:
    """Another softmax table (every entry one unit lower), the manifest's numerics digest kept;
    the engine's one-gather form of the table is patched with it, so the cheat takes effect."""
    table = ops._TABLE - (ops._TABLE > 0).long()
    full, cut = ops.full_table(table)
    return Provider(ExactModel(qm_a), ((ops, "_TABLE", table), (ops, "_FULL_TABLE", full),
                                       (ops, "_CUT", cut)))


def exp2_poly(qm_a) -> Provider:
    """SiLU's exp2 off by a relative 2^-12 (another polynomial), the numerics digest kept; on the
    torch ops (the compiled bridge has the spec's polynomial built in)."""
    def exp2(y):
        return ORIG_EXP2(y) * (1 + 2.0**-12)
    return Provider(ExactModel(qm_a), ((ops, "exp2", exp2), (ops, "NATIVE", False)))


# --- residual stream ------------------------------------------------------------------------------


def layer_hook(qm_a, hook) -> Provider:
    """hook(orig_call, layer_self, m, i, x, step, tr) replaces _TorchLayer.__call__."""
    def call(layer_self, m, i, x, step, tr):
        return hook(ORIG_LAYER_CALL, layer_self, m, i, x, step, tr)
    return Provider(ExactModel(qm_a), ((_TorchLayer, "__call__", call),))


def residual_ulp(qm_a, layer: int, position: int) -> Provider:
    """The output residual of `layer` at `position` moved up by one ulp (element 0)."""
    def hook(orig, self, m, i, x, step, tr):
        out = orig(self, m, i, x, step, tr)
        rows = (step.pos == position).nonzero().flatten()
        if i == layer and len(rows):
            out = out.clone()
            out[rows, 0] = torch.nextafter(out[rows, 0], torch.tensor(float("inf")))
        return out
    return layer_hook(qm_a, hook)


def layer_skipped(qm_a, layer: int) -> Provider:
    """Layer `layer` computed (its K/V rows are honest) but its output dropped: x_{l+1} = x_l."""
    def hook(orig, self, m, i, x, step, tr):
        out = orig(self, m, i, x, step, tr)
        return x if i == layer else out
    return layer_hook(qm_a, hook)


def layer_fed_earlier_input(qm_a, layer: int) -> Provider:
    """Layer `layer` (>= 1) run on layer l-1's input instead of its own (x_l still committed)."""
    seen = {}

    def hook(orig, self, m, i, x, step, tr):
        seen[i] = x
        return orig(self, m, i, seen[i - 1] if i == layer else x, step, tr)
    return layer_hook(qm_a, hook)


def kv_beyond_qmax(w):
    """A served, challenged and opened run whose engine stores K[0] of the last layer with one
    value at -(kv_qmax + 1), a value no quantization produces, and attends over it: receipt,
    trees and re-execution all agree, and the challenge (full tier) leaves row 0 of the last
    layer out of its positions and K/V sample, so no derivation replays it; only the K/V range
    check can stop it. Returns (served, challenge, meta, arrays)."""
    from commitllm.engine.exact.model import SeqCache

    last, q = w.qm.cfg.num_layers - 1, w.key.meta["profile"]["kv_qmax"]
    orig = SeqCache.append

    def append(self, layer, k, sk, v, sv):
        if layer == last and (len(self.k) <= layer or self.k[layer].shape[0] == 0):
            k = k.clone()
            k[0, 0, 0] = -q - 1
        orig(self, layer, k, sk, v, sv)

    p = Provider(ExactModel(w.qm), ((SeqCache, "append", append),))
    s = w.serve(p)
    for i in range(100):  # a challenge that does not sample row 0 of the last layer
        c = w.challenge(s, "full", positions="generated", nonce=i.to_bytes(16, "little"))
        if 0 not in c["kv_sample"][str(last)] and 0 not in c["positions"]:
            break
    meta, arrays = w.open(s, c, p)
    assert int(arrays[f"kv.{last}.k"].min()) == -q - 1
    return s, c, meta, arrays
