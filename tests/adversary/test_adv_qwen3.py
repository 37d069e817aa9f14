"""Qwen3's per-head q/k RMSNorm: a provider that skips it, applies it to one of q and k only,
swaps the two weights or normalizes before the wrong step commits K/V rows (and attention inputs)
that the committed residual does not give under the spec. The verifier re-derives every
challenged position's q, k, v from its committed residual and the key's norm weights: a wrong k
head makes a committed K row differ from its derivation (kv_mismatch), a wrong q head changes the
attention output that o's committed accumulator must match (freivalds_o). The honest engine is
accepted at every tier."""

from __future__ import annotations

import pytest
from advworld import Provider, World, assert_rejected, quantized

from commitllm.engine.exact import ops
from commitllm.engine.exact.model import ExactModel


@pytest.fixture(scope="module")
def qwen3_world(tiny_qwen3) -> World:
    return World(quantized(tiny_qwen3))


@pytest.mark.parametrize("tier", ["routine", "full", "deep"])
def test_honest_qwen3_accepted(qwen3_world, tier):
    w = qwen3_world
    assert w.qm.cfg.qk_norm
    v = w.audit(w.served, tier=tier)
    assert v.accepted, (v.reason, v.detail)


def _patched(w: World, edit) -> Provider:
    """A provider whose layers' (q_norm, k_norm) are edit(layer)."""
    model = ExactModel(w.qm)
    patches = []
    for layer in model.layers:
        qn, kn = edit(layer)
        patches += [(layer, "q_norm", qn), (layer, "k_norm", kn)]
    return Provider(model, tuple(patches))


# cheat -> ((q_norm, k_norm) the provider uses, the check that catches it). A wrong k head gives
# a committed K row its residual does not derive (kv_mismatch); a wrong q head leaves the K/V rows
# honest but changes attention, so o's committed input fails its Freivalds check.
CHEATS = {
    "skipped": (lambda layer: (None, None), "kv_mismatch"),
    "q-only": (lambda layer: (layer.q_norm, _ones_like(layer.k_norm)), "kv_mismatch"),
    "k-only": (lambda layer: (_ones_like(layer.q_norm), layer.k_norm), "freivalds_o"),
    "swapped": (lambda layer: (layer.k_norm, layer.q_norm), "kv_mismatch"),
    "k-weight-off": (lambda layer: (layer.q_norm, _bumped(layer.k_norm)), "kv_mismatch"),
    "q-weight-off": (lambda layer: (_bumped(layer.q_norm), layer.k_norm), "freivalds_o"),
}


def _ones_like(t):
    import torch

    return torch.ones_like(t)


def _bumped(t):
    """One weight of the head norm 25 % larger (one ulp is absorbed by the K/V quantization:
    such a provider computes the same committed values, which is not a cheat)."""
    out = t.clone()
    out[3] = out[3] * 1.25
    return out


@pytest.mark.parametrize("cheat", sorted(CHEATS))
def test_qk_norm_cheats_rejected(qwen3_world, cheat):
    w = qwen3_world
    edit, code = CHEATS[cheat]
    p = _patched(w, edit)
    assert w.computes_otherwise(p), "the cheat must change what is computed"
    served = w.serve(p)
    v = w.audit(served, p, tier="routine")
    assert_rejected(v, code)


def test_norm_after_rope_rejected(qwen3_world, monkeypatch):
    """The norm and RoPE swapped: each head rotated first, normed after."""
    w = qwen3_world
    import commitllm.engine.exact.model as model_mod

    real_rope, real_norm = ops.apply_rope, ops.head_norm
    pending = []  # (weight, eps) of q, then k: the layer norms both, then rotates both

    def norm_later(x, weight, eps):
        pending.append((weight, eps))
        return x

    def rope_then_norm(x, cos, sin):
        y = real_rope(x, cos, sin)
        return real_norm(y, *pending.pop(0)) if pending else y

    p = Provider(ExactModel(w.qm), ((model_mod.ops, "head_norm", norm_later),
                                    (model_mod.ops, "apply_rope", rope_then_norm)))
    assert w.computes_otherwise(p)
    v = w.audit(w.serve(p), p, tier="routine")
    assert_rejected(v, "kv_mismatch")
