"""Mixtral's experts: a provider that swaps two experts' weights, routes a token to other experts
than the rule's top k (the cheapest, the runner-up, a single one), combines with other weights
(the float softmax of the reference, a uniform average, top-1 only), folds the combination into
one rounding, bumps the router, or opens accumulators that are not the selected experts'. The
verifier derives each challenged token's routing from the router's Freivalds-checked logits
(never from the opening), checks every selected expert's matmuls with that expert's secret rows
and recomputes the combination: a wrong expert fails its Freivalds check (freivalds_gate_up), a
wrong combination breaks the residual chain (residual_chain). The honest engine is accepted at
every tier. Mixtral and Qwen3-MoE alike."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from accs import add_acc
from advworld import Provider, World, assert_rejected, quantized

from commitllm.engine.exact import ops
from commitllm.engine.exact.model import ExactModel
from commitllm.verifier.commitment import commit_model
from commitllm.verifier.opening import acc_width

HONEST_ROUTE = ops.moe_route
HONEST_COMBINE = ops.moe_combine


# Qwen3-MoE's routing is Mixtral's (its honest round trip at every tier: test_protocol.py): -m slow
@pytest.fixture(scope="module", params=["mixtral", pytest.param("qwen3_moe",
                                                                marks=pytest.mark.slow)])
def world(request) -> World:
    """Each MoE family's tiny model (Qwen3-MoE: the same routing under Qwen3's q/k norm)."""
    w = World(quantized(request.getfixturevalue(f"tiny_{request.param}")))
    assert w.qm.cfg.moe and w.qm.cfg.num_experts == 4 and w.qm.cfg.experts_per_token == 2
    return w


@pytest.mark.parametrize("tier", ["routine", "full", "deep"])
def test_honest_mixtral_accepted(world, tier):
    v = world.audit(world.served, tier=tier)
    assert v.accepted, (v.reason, v.detail)


def test_honest_opening_carries_only_the_selected_experts(world):
    c = world.challenge(world.served, "full")
    _, arrays = world.open(world.served, c)
    cfg = world.qm.cfg
    n = len(c["positions"])
    w = {m: acc_width(cfg, world.qm.profile, m) for m in ("router", "gate_up", "down")}
    for l in c["layers"]:  # packed accumulators: the last axis is the width in bytes
        assert arrays[f"z.{l}.router"].shape == (n, cfg.num_experts, w["router"])
        assert arrays[f"z.{l}.gate_up"].shape == (n, 2, 2 * cfg.intermediate_size, w["gate_up"])
        assert arrays[f"z.{l}.down"].shape == (n, 2, cfg.hidden_size, w["down"])


# --- routing: which experts -------------------------------------------------------------------

def _weights(logits, sel):
    """The spec's integer-softmax weights of the experts `sel` (whatever chose them)."""
    masked = torch.full_like(logits, -1e30)
    masked.scatter_(1, sel, logits.gather(1, sel))
    got, g = HONEST_ROUTE(masked, sel.shape[1])
    assert torch.equal(got, sel)
    return g


def _route_with(select):
    """A moe_route choosing select(logits, k) [T, k], weighted by the spec's rule over them."""
    def route(logits, k):
        sel = torch.sort(select(logits, k), dim=1).values
        return sel, _weights(logits, sel)
    return route


def _ranked(logits):
    return torch.sort(-logits, dim=1, stable=True).indices  # best first, ties to the lower index


# cheat -> the experts it picks
SELECT_CHEATS = {
    "cheapest": lambda r, k: _ranked(r)[:, -k:],  # the k lowest logits
    "runner-up": lambda r, k: torch.cat([_ranked(r)[:, :k - 1], _ranked(r)[:, k:k + 1]], 1),
    "fixed-experts": lambda r, k: torch.arange(k).expand(r.shape[0], k).clone(),  # no router
    "ties-to-higher": lambda r, k: (r.shape[1] - 1
                                    - _ranked(r.flip(1))[:, :k]),  # descending, last index first
}


@pytest.mark.parametrize("tier", ["routine", "full"])
@pytest.mark.parametrize("cheat", sorted(set(SELECT_CHEATS) - {"ties-to-higher"}))
def test_wrong_experts_rejected(world, cheat, tier):
    """The provider computes (and opens) other experts' honest accumulators: the verifier's own
    routing names other experts, whose secret rows those accumulators fail."""
    p = Provider(world.honest.model, ((ops, "moe_route", _route_with(SELECT_CHEATS[cheat])),))
    assert world.computes_otherwise(p), "the cheat must change what is computed"
    assert_rejected(world.audit(world.serve(p), p, tier), "freivalds_gate_up")


def test_tie_rule_is_the_spec_s():
    """Ties go to the lower index: the reversed rule picks differently on tied logits (the
    engine's tiny model never ties, so the rule is checked on crafted logits here, and the spec
    and the engine agree on them in tests/test_moe.py)."""
    r = torch.tensor([[0.5, 1.0, 1.0, 1.0], [2.0, -0.0, 0.0, -1.0]])
    assert HONEST_ROUTE(r, 2)[0].tolist() == [[1, 2], [0, 1]]
    assert torch.sort(SELECT_CHEATS["ties-to-higher"](r, 2), 1).values.tolist() == [[2, 3], [0, 2]]


# --- routing: with what weights ---------------------------------------------------------------

def _float_softmax(logits, k):
    """The reference's rule: softmax over every expert in fp32, top k, renormalized."""
    sel, _ = HONEST_ROUTE(logits, k)
    p = torch.softmax(logits, dim=1).gather(1, sel)
    return sel, p / p.sum(dim=1, keepdim=True)


WEIGHT_CHEATS = {
    "float-softmax": _float_softmax,
    "uniform": lambda r, k: (HONEST_ROUTE(r, k)[0], torch.full((r.shape[0], k), 1.0 / k)),
    "top-1-only": lambda r, k: (lambda s, g: (s, (g == g.amax(1, keepdim=True)).float()))(
        *HONEST_ROUTE(r, k)),
    "unnormalized": lambda r, k: (lambda s, g: (s, g * 1.001))(*HONEST_ROUTE(r, k)),
}


@pytest.mark.parametrize("tier", ["routine", pytest.param("full", marks=pytest.mark.slow)])
@pytest.mark.parametrize("cheat", sorted(WEIGHT_CHEATS))
def test_wrong_combination_weights_rejected(world, cheat, tier):
    """The right experts and accumulators, combined with other weights: the layer's committed
    output is not the spec's combination (the residual chain breaks)."""
    p = Provider(world.honest.model, ((ops, "moe_route", WEIGHT_CHEATS[cheat]),))
    assert world.computes_otherwise(p), "the cheat must change what is computed"
    assert_rejected(world.audit(world.serve(p), p, tier), "residual_chain")


def _fused_combine(e, g):
    """g_i e_i summed in float64, rounded once (an FMA-style kernel)."""
    return (g.double().unsqueeze(2) * e.double()).sum(dim=1).float()


def test_fused_combination_rejected(world):
    p = Provider(world.honest.model, ((ops, "moe_combine", _fused_combine),))
    assert world.computes_otherwise(p), "the cheat must change what is computed"
    assert_rejected(world.audit(world.serve(p), p, "full"), "residual_chain")


# --- weights: other experts or another router -------------------------------------------------

def _swapped_experts(world, a=0, b=1) -> Provider:
    """Every layer's experts a and b exchanged (gate_up and down), claiming model A."""
    layers = []
    for layer in world.qm.layers:
        ex = layer.experts
        order = list(range(len(ex.gate_up)))
        order[a], order[b] = b, a
        ex = replace(ex, gate_up=tuple(ex.gate_up[i] for i in order),
                     down=tuple(ex.down[i] for i in order))
        layers.append(replace(layer, experts=ex))
    qm = replace(world.qm, layers=layers)
    return Provider(ExactModel(qm), (), {"model_commitment": _commitment(world)})


def _commitment(world) -> str:
    return commit_model(world.qm)["commitment"].hex()


def test_swapped_experts_rejected(world):
    p = _swapped_experts(world)
    assert world.computes_otherwise(p), "the cheat must change what is computed"
    assert_rejected(world.audit(world.serve(p), p, "full"), "freivalds_gate_up")


def test_swapped_down_only_rejected(world):
    """gate_up honest, down of another expert: caught by the down matrix's own secret rows."""
    layers = []
    for layer in world.qm.layers:
        ex = layer.experts
        layers.append(replace(layer, experts=replace(
            ex, down=(ex.down[1], ex.down[0]) + tuple(ex.down[2:]))))
    p = Provider(ExactModel(replace(world.qm, layers=layers)), (),
                 {"model_commitment": _commitment(world)})
    assert world.computes_otherwise(p)
    assert_rejected(world.audit(world.serve(p), p, "full"), "freivalds_down")


def test_other_router_rejected(world):
    layers = []
    for layer in world.qm.layers:
        ex = layer.experts
        q = ex.router.q.copy()
        q[:, 0] = -q[:, 0]
        layers.append(replace(layer, experts=replace(ex, router=replace(ex.router, q=q))))
    p = Provider(ExactModel(replace(world.qm, layers=layers)), (),
                 {"model_commitment": _commitment(world)})
    assert world.computes_otherwise(p)
    assert_rejected(world.audit(world.serve(p), p, "full"), "freivalds_router")


def test_top_1_model_claiming_top_2_rejected(world):
    """The same weights run with one expert per token (half the MLP work): its opening carries
    one accumulator per token where the key's configuration needs two."""
    one = replace(world.qm, cfg=replace(world.qm.cfg, experts_per_token=1))
    p = Provider(ExactModel(one), (), {"model_commitment": _commitment(world)})
    assert world.computes_otherwise(p)
    assert_rejected(world.audit(world.serve(p), p, "full"), "opening_type")


# --- the opening ------------------------------------------------------------------------------

def test_router_accumulator_changed_rejected(world):
    c = world.challenge(world.served, "full")
    meta, arrays = world.open(world.served, c)
    l = c["layers"][0]
    add_acc(arrays, f"z.{l}.router", (0, 1), 1)
    assert_rejected(world.verify(world.served, c, meta, arrays), "freivalds_router")


@pytest.mark.parametrize("matrix", ["gate_up", "down"])
def test_expert_slots_exchanged_rejected(world, matrix):
    """The two selected experts' accumulators in each other's slots."""
    c = world.challenge(world.served, "full")
    meta, arrays = world.open(world.served, c)
    l = c["layers"][0]
    z = arrays[f"z.{l}.{matrix}"]
    arrays[f"z.{l}.{matrix}"] = np.ascontiguousarray(z[:, ::-1])
    assert_rejected(world.verify(world.served, c, meta, arrays), f"freivalds_{matrix}")


def test_every_expert_s_accumulators_rejected(world):
    """An opening with all E experts' accumulators (more than the routing selects) is not an
    opening of this key's configuration."""
    c = world.challenge(world.served, "full")
    meta, arrays = world.open(world.served, c)
    l, e = c["layers"][0], world.qm.cfg.num_experts
    z = arrays[f"z.{l}.gate_up"]
    arrays[f"z.{l}.gate_up"] = np.ascontiguousarray(np.concatenate([z, z], axis=1)[:, :e])
    assert_rejected(world.verify(world.served, c, meta, arrays), "opening_type")
