"""Mixtral: a dishonest provider's further attempts on the mixture-of-experts checks (beyond
test_adv_moe.py). Each test is a cheat the verifier must refuse, with the reason code of the
check that should catch it; the shapes, k and E are the key's, never the opening's.

- opening layout: other expert counts / widths / dtypes for z.<l>.router, .gate_up, .down, a
  provider-supplied routing array, extra metadata;
- Freivalds modulus: an accumulator off by P = 2^61 - 1 (same residue) or beyond the bound;
- models: top-1 / top-3 / a 3-expert model / a pruned expert / a consistently permuted expert
  set, each claiming the committed model or its own commitment;
- routing rules on crafted routers: exactly tied router rows (ties to the lower index, end to
  end), rows tied only after fp32 rounding, saturated integer-softmax logits;
- a capacity-limited router (batch composition changes routing);
- every profile; a decode-only challenge; a multi-threaded verify.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from accs import acc, add_acc, set_acc
from advworld import Provider, World, assert_rejected, quantized
from test_adv_moe import _weights as _spec_weights

from commitllm.engine.exact import ops
from commitllm.engine.exact.model import ExactModel, TorchExperts
from commitllm.verifier.commitment import commit_model
from commitllm.verifier.freivalds import P

HONEST_ROUTE = ops.moe_route


@pytest.fixture(scope="module")
def world(tiny_mixtral) -> World:
    w = World(quantized(tiny_mixtral))
    assert w.qm.cfg.num_experts == 4 and w.qm.cfg.experts_per_token == 2
    return w


@pytest.fixture(scope="module")
def opened(world):
    c = world.challenge(world.served, "full")
    meta, arrays = world.open(world.served, c)
    assert world.verify(world.served, c, meta, arrays).accepted
    return c, meta, arrays


def _copy(opened):
    c, meta, arrays = opened
    return c, dict(meta), {k: v.copy() for k, v in arrays.items()}


def _commitment(world) -> str:
    return commit_model(world.qm)["commitment"].hex()


def _with_layers(qm, fn, cfg=None):
    """qm with every layer's experts replaced by fn(experts)."""
    layers = tuple(replace(layer, experts=fn(layer.experts)) for layer in qm.layers)
    return replace(qm, layers=layers, cfg=cfg or qm.cfg)


# --- the opening's layout: shapes, counts, dtypes, extra fields ----------------------------------

LAYOUT_EDITS = {
    # one expert fewer than the key's k
    "gate_up-k-1": ("gate_up", lambda z: z[:, :1]),
    "down-k-1": ("down", lambda z: z[:, :1]),
    # one more than k (a duplicate slot)
    "gate_up-k+1": ("gate_up", lambda z: np.concatenate([z, z[:, :1]], 1)),
    # the k experts' rows flattened into one row
    "gate_up-flat": ("gate_up", lambda z: z.reshape(z.shape[0], -1)),
    # gate only (half the width), padded nowhere
    "gate_up-half": ("gate_up", lambda z: z[:, :, : z.shape[2] // 2]),
    # the router with one expert fewer / more than E
    "router-E-1": ("router", lambda z: z[:, :-1]),
    "router-E+1": ("router", lambda z: np.concatenate([z, z[:, :1]], 1)),
    # another dtype
    "router-int32": ("router", lambda z: z.astype(np.int32)),
    "router-float64": ("router", lambda z: z.astype(np.float64)),
    "down-big-endian": ("down", lambda z: z.astype(">i8")),
    "gate_up-uint64": ("gate_up", lambda z: z.astype(np.uint64)),
}


@pytest.mark.parametrize("edit", sorted(LAYOUT_EDITS))
def test_opening_layout_other_than_the_key_s_rejected(world, opened, edit):
    c, meta, arrays = _copy(opened)
    matrix, fn = LAYOUT_EDITS[edit]
    for l in c["layers"]:
        arrays[f"z.{l}.{matrix}"] = np.ascontiguousarray(fn(arrays[f"z.{l}.{matrix}"]))
    assert_rejected(world.verify(world.served, c, meta, arrays), "opening_type")


def test_provider_routing_array_rejected(world, opened):
    """An opening that names its own experts (z.<l>.sel): the verifier reads no routing."""
    c, meta, arrays = _copy(opened)
    l = c["layers"][0]
    arrays[f"z.{l}.sel"] = np.zeros((len(c["positions"]), 2), np.int64)
    assert_rejected(world.verify(world.served, c, meta, arrays), "opening_type")


def test_opening_meta_with_experts_rejected(world, opened):
    c, meta, arrays = _copy(opened)
    meta["experts_per_token"] = 1
    assert_rejected(world.verify(world.served, c, meta, arrays), "opening_type")


def test_receipt_manifest_with_moe_field_rejected(world):
    """A receipt claiming its own routing configuration in the manifest (resealed)."""
    s = World.claim(world.served, moe={"experts_per_token": 1})
    c = world.challenge(s, "full")
    meta, arrays = world.open(s, c)
    assert_rejected(world.verify(s, c, meta, arrays), "receipt_malformed")


def test_opening_expert_axis_all_zero_rejected(world, opened):
    """Zero accumulators for the second selected expert (an expert 'skipped')."""
    c, meta, arrays = _copy(opened)
    l = c["layers"][0]
    arrays[f"z.{l}.gate_up"][:, 1] = 0
    assert_rejected(world.verify(world.served, c, meta, arrays), "freivalds_gate_up")


# --- the Freivalds modulus and the bound ---------------------------------------------------------

MODULUS_EDITS = {
    "router+P": ("router", (0, 0), P, "freivalds_router"),
    "router-P": ("router", (0, 3), -P, "freivalds_router"),
    "router+2^62": ("router", (1, 1), 1 << 62, "freivalds_router"),
    "gate_up+P": ("gate_up", (0, 0, 0), P, "freivalds_gate_up"),
    "gate_up slot1-P": ("gate_up", (0, 1, 5), -P, "freivalds_gate_up"),
    "down+P": ("down", (0, 1, 0), P, "freivalds_down"),
    "down+2P": ("down", (0, 0, 7), 2 * P, "freivalds_down"),
}


@pytest.mark.parametrize("edit", sorted(MODULUS_EDITS))
def test_accumulator_off_by_the_modulus_rejected(world, opened, edit):
    """z + P has z's residue modulo P. A packed opening (version 2) cannot carry it: the packer
    refuses, and the low bytes a cheater can send either are the honest bytes (z + 2^62 at any
    width below 8: nothing changed) or fail Freivalds."""
    c, meta, arrays = _copy(opened)
    matrix, at, d, code = MODULUS_EDITS[edit]
    changed = False
    for l in c["layers"]:
        name = f"z.{l}.{matrix}"
        z, before = acc(arrays, name), arrays[name].copy()
        z[at] += d
        with pytest.raises(OverflowError):
            set_acc(arrays, name, z)
        set_acc(arrays, name, z, wrap=True)
        changed |= not np.array_equal(arrays[name], before)
    v = world.verify(world.served, c, meta, arrays)
    if changed:
        assert_rejected(v, code)
    else:
        assert v.accepted and (d % (1 << 8 * arrays[name].shape[-1])) == 0


def test_router_shift_that_keeps_the_routing_rejected(world, opened):
    """A router accumulator moved by one unit on the lowest-scoring expert (which neither
    selection nor weights read): Freivalds still refuses it."""
    c, meta, arrays = _copy(opened)
    l = c["layers"][0]
    z = acc(arrays, f"z.{l}.router")
    s = world.key.arrays[f"layers.{l}.router.s"].astype(np.float64)
    low = np.argmin(z * s, axis=1)
    z[np.arange(len(z)), low] -= 1
    set_acc(arrays, f"z.{l}.router", z)
    assert_rejected(world.verify(world.served, c, meta, arrays), "freivalds_router")


def test_multithreaded_verify_rejects_the_same(world, opened):
    c, meta, arrays = _copy(opened)
    l = c["layers"][-1]
    arrays[f"z.{l}.down"] = np.ascontiguousarray(arrays[f"z.{l}.down"][:, ::-1])
    v = world.verify(world.served, c, meta, arrays, threads=2)
    assert_rejected(v, "freivalds_down")


def test_decode_only_challenge_catches_a_wrong_expert(world):
    """A challenge of the last (decode) position alone, its second expert's gate_up swapped for
    the first's."""
    c = world.challenge(world.served, "routine", positions=[world.n_positions - 1])
    meta, arrays = world.open(world.served, c)
    assert world.verify(world.served, c, meta, arrays).accepted
    l = c["layers"][-1]
    arrays[f"z.{l}.gate_up"][:, 1] = arrays[f"z.{l}.gate_up"][:, 0]
    assert_rejected(world.verify(world.served, c, meta, arrays), "freivalds_gate_up")


# --- other models ----------------------------------------------------------------------------

def test_top_1_model_with_its_own_commitment_rejected(world):
    """A top-1 model committed honestly as itself: not the key's model."""
    one = replace(world.qm, cfg=replace(world.qm.cfg, experts_per_token=1))
    p = Provider(ExactModel(one), (), {"model_commitment": commit_model(one)["commitment"].hex()})
    assert_rejected(world.audit(world.serve(p), p, "full"), "manifest_mismatch")


def test_three_expert_model_claiming_four_rejected(world):
    """Expert 3 dropped (router row and matrices): its router accumulators are [n, 3]."""
    cfg = replace(world.qm.cfg, num_experts=3)

    def drop(ex):
        r = replace(ex.router, q=ex.router.q[:3].copy(), s=ex.router.s[:3].copy())
        return replace(ex, router=r, gate_up=ex.gate_up[:3], down=ex.down[:3])
    qm = _with_layers(world.qm, drop, cfg)
    p = Provider(ExactModel(qm), (), {"model_commitment": _commitment(world)})
    assert world.computes_otherwise(p)
    assert_rejected(world.audit(world.serve(p), p, "full"), "opening_type")


def test_three_expert_model_with_its_own_commitment_rejected(world):
    cfg = replace(world.qm.cfg, num_experts=3)

    def drop(ex):
        r = replace(ex.router, q=ex.router.q[:3].copy(), s=ex.router.s[:3].copy())
        return replace(ex, router=r, gate_up=ex.gate_up[:3], down=ex.down[:3])
    qm = _with_layers(world.qm, drop, cfg)
    p = Provider(ExactModel(qm), (), {"model_commitment": commit_model(qm)["commitment"].hex()})
    assert_rejected(world.audit(world.serve(p), p, "full"), "manifest_mismatch")


def _most_used_expert(world) -> int:
    c = world.challenge(world.served, "deep")
    _, arrays = world.open(world.served, c)
    counts = np.zeros(world.qm.cfg.num_experts, int)
    for l in c["layers"]:
        z = acc(arrays, f"z.{l}.router")
        s = world.key.arrays[f"layers.{l}.router.s"].astype(np.float64)
        top = np.argsort(-(z * s), axis=1, kind="stable")[:, :2]
        np.add.at(counts, top.ravel(), 1)
    return int(np.argmax(counts))


def test_pruned_expert_claiming_the_model_rejected(world):
    """The most used expert's weights zeroed (an expert pruned to save memory)."""
    e = _most_used_expert(world)

    def prune(ex):
        gu = replace(ex.gate_up[e], q=np.zeros_like(ex.gate_up[e].q))
        return replace(ex, gate_up=ex.gate_up[:e] + (gu,) + ex.gate_up[e + 1:])
    p = Provider(ExactModel(_with_layers(world.qm, prune)), (),
                 {"model_commitment": _commitment(world)})
    assert world.computes_otherwise(p)
    assert_rejected(world.audit(world.serve(p), p, "full"), "freivalds_gate_up")


def test_consistently_permuted_experts_rejected(world):
    """Experts and router rows permuted together: with k = 2 (fp32 addition commutes) the same
    function bit for bit, but not the committed matrices: refused by the router's rows."""
    order = [2, 0, 3, 1]

    def perm(ex):
        r = replace(ex.router, q=ex.router.q[order].copy(), s=ex.router.s[order].copy())
        return replace(ex, router=r, gate_up=tuple(ex.gate_up[i] for i in order),
                       down=tuple(ex.down[i] for i in order))
    p = Provider(ExactModel(_with_layers(world.qm, perm)), (),
                 {"model_commitment": _commitment(world)})
    assert not world.computes_otherwise(p)
    assert_rejected(world.audit(world.serve(p), p, "full"), "freivalds_router")


def test_top_3_model_opening_the_top_2_subset_rejected(world):
    """Computes top 3 (every output committed), opens for each challenged token the two of its
    three experts the spec's top 2 names: every accumulator honest, the combination is not."""
    three = replace(world.qm, cfg=replace(world.qm.cfg, experts_per_token=3))
    p = Provider(ExactModel(three), (), {"model_commitment": _commitment(world)})
    assert world.computes_otherwise(p)
    s = world.serve(p)
    c = world.challenge(s, "full")
    meta, arrays = world.open(s, c, p)
    for l in c["layers"]:
        z = acc(arrays, f"z.{l}.router")
        sc = world.key.arrays[f"layers.{l}.router.s"].astype(np.float64)
        rank = np.argsort(-(z * sc), axis=1, kind="stable")
        sel3, sel2 = np.sort(rank[:, :3], 1), np.sort(rank[:, :2], 1)
        slots = np.stack([np.searchsorted(a, b) for a, b in zip(sel3, sel2)])
        for m in ("gate_up", "down"):
            a = arrays[f"z.{l}.{m}"]
            arrays[f"z.{l}.{m}"] = np.ascontiguousarray(
                np.take_along_axis(a, slots[:, :, None, None], axis=1))  # [n, k, F, bytes]
    assert_rejected(world.verify(s, c, meta, arrays), "residual_chain")


# --- a capacity-limited router: batch composition decides routing ------------------------------

def _capacity_route(logits, k):
    """GShard-style: each expert takes at most floor(T k / E) tokens of the batch (at least 1), in
    token order; a token whose choice is full takes its next best expert."""
    t, e = logits.shape
    cap = max(1, (t * k) // e)
    load = [0] * e
    rank = torch.sort(-logits, dim=1, stable=True).indices
    sel = torch.empty((t, k), dtype=torch.int64)
    for i in range(t):
        r = rank[i].tolist()
        got = [j for j in r if load[j] < cap][:k]
        got += [j for j in r if j not in got][:k - len(got)]
        for j in got:
            load[j] += 1
        sel[i] = torch.tensor(sorted(got))
    return sel, _spec_weights(logits, sel)


def test_capacity_limited_router_rejected(world):
    """Committed in one pass over the whole sequence (so that the provider's re-execution
    reproduces its own batch-dependent routing when it opens)."""
    p = Provider(world.honest.model, ((ops, "moe_route", _capacity_route),))
    assert world.computes_otherwise(p)
    assert_rejected(world.audit(world.commit(world.served.output, p), p, "deep"),
                    "freivalds_gate_up")


# --- crafted routers: ties, near-ties, saturated weights -----------------------------------------

def _tied_router(qm, nudge=False):
    """Router row 2 equal to row 1 (their logits tie exactly); with nudge, rows 2 and 3 both
    equal to row 1 and the three scales consecutive fp32 values just below 2^-7 (a relative
    step of 2^-24: the three logits differ before the fp32 rounding of the dequantization, and
    tie after it on about a quarter of the tokens)."""
    def tie(ex):
        q, s = ex.router.q.copy(), ex.router.s.copy()
        q[2], s[2] = q[1], s[1]
        if nudge:
            q[3] = q[1]
            top = np.float32(2.0 ** -7)
            s[3] = np.nextafter(top, np.float32(0))
            s[2] = np.nextafter(s[3], np.float32(0))
            s[1] = np.nextafter(s[2], np.float32(0))
        return replace(ex, router=replace(ex.router, q=q, s=s))
    return _with_layers(qm, tie)


def _ties_to_higher(logits, k):
    e = logits.shape[1]
    order = torch.sort(-logits.flip(1), dim=1, stable=True).indices[:, :k]
    sel = torch.sort(e - 1 - order, dim=1).values
    return sel, _spec_weights(logits, sel)


@pytest.fixture(scope="module")
def tied_world(world) -> World:
    return World(_tied_router(world.qm))


@pytest.fixture(scope="module")
def near_tied_world(world) -> World:
    return World(_tied_router(world.qm, nudge=True))


def test_tied_router_honest_accepted_and_tie_cheat_rejected(tied_world):
    """End to end on exact ties: the engine's tie rule is the verifier's, and a provider breaking
    ties to the higher index is caught by the other expert's secret rows."""
    w = tied_world
    v = w.audit(w.served, tier="deep")
    assert v.accepted, (v.reason, v.detail)
    p = Provider(w.honest.model, ((ops, "moe_route", _ties_to_higher),))
    assert w.computes_otherwise(p), "the crafted router must produce ties the cheat breaks"
    assert_rejected(w.audit(w.serve(p), p, "deep"), "freivalds_gate_up")


_EXPERTS_CALL = TorchExperts.__call__


def _f64_router_call(self, cfg, m, aq, tr):
    """TorchExperts with the selection made on float64 logits (z * sx * s unrounded, as a
    higher-precision router kernel would), the weights still the spec's."""
    qx, sx = self.router.quantize(m, aq)
    z = self.router.accumulate(qx, aq)
    l64 = z.double() * sx.double()[:, None] * self.router.scale.double()[None, :]
    honest = ops.moe_route

    def route(logits, k):
        sel = torch.sort(torch.sort(-l64, dim=1, stable=True).indices[:, :k], 1).values
        return sel, _spec_weights(logits, sel)
    ops.moe_route = route
    try:
        return _EXPERTS_CALL(self, cfg, m, aq, tr)
    finally:
        ops.moe_route = honest


def test_near_tied_router_f64_routing_rejected(near_tied_world):
    """Logits equal after fp32 rounding but not before: the spec picks the lower index, a
    float64 router the larger unrounded logit."""
    w = near_tied_world
    v = w.audit(w.served, tier="deep")
    assert v.accepted, (v.reason, v.detail)
    p = Provider(w.honest.model, ((TorchExperts, "__call__", _f64_router_call),))
    assert w.computes_otherwise(p), "the crafted router must produce fp32-only ties"
    assert_rejected(w.audit(w.serve(p), p, "deep"), "freivalds_gate_up")


@pytest.fixture(scope="module")
def saturated_world(world) -> World:
    """The router scaled by 2^24: every selected logit clamps to +-2^30 in fixed point."""
    def big(ex):
        return replace(ex, router=replace(ex.router, s=(ex.router.s * np.float32(2**24))))
    return World(_with_layers(world.qm, big))


def _float_softmax(logits, k):
    sel, _ = HONEST_ROUTE(logits, k)
    pr = torch.softmax(logits.double(), dim=1).gather(1, sel)
    return sel, (pr / pr.sum(dim=1, keepdim=True)).float()


def test_saturated_router_honest_accepted_float_softmax_rejected(saturated_world):
    w = saturated_world
    v = w.audit(w.served, tier="deep")
    assert v.accepted, (v.reason, v.detail)
    p = Provider(w.honest.model, ((ops, "moe_route", _float_softmax),))
    assert w.computes_otherwise(p)
    assert_rejected(w.audit(w.serve(p), p, "full"), "residual_chain")


# --- every profile -----------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["a8", "w16a16"])
def pworld(request, tiny_mixtral) -> World:
    return World(quantized(tiny_mixtral, request.param))


def _cheapest(logits, k):
    sel = torch.sort(torch.sort(-logits, dim=1, stable=True).indices[:, -k:], 1).values
    return sel, _spec_weights(logits, sel)


def test_profiles_honest_accepted_and_cheats_rejected(pworld):
    for tier in ("routine", "full", "deep"):
        v = pworld.audit(pworld.served, tier=tier)
        assert v.accepted, (tier, v.reason, v.detail)
    p = Provider(pworld.honest.model, ((ops, "moe_route", _cheapest),))
    assert pworld.computes_otherwise(p)
    assert_rejected(pworld.audit(pworld.serve(p), p, "full"), "freivalds_gate_up")
    c = pworld.challenge(pworld.served, "full")
    meta, arrays = pworld.open(pworld.served, c)
    l = c["layers"][0]
    add_acc(arrays, f"z.{l}.router", (0, 0), P, wrap=True)  # (the low bytes of z + P)
    assert_rejected(pworld.verify(pworld.served, c, meta, arrays), "freivalds_router")
    meta, arrays = pworld.open(pworld.served, c)
    add_acc(arrays, f"z.{l}.down", (0, 1, 0), -P, wrap=True)
    assert_rejected(pworld.verify(pworld.served, c, meta, arrays), "freivalds_down")


# --- batch composition and chunked prefill -----------------------------------------------------

def _batched(world, provider, prefill_chunk=4):
    from advworld import NONCE, Served

    from commitllm.engine.receipts import generate_with_receipts

    with provider.running() as model:
        s = generate_with_receipts(model, None, [world.request, {"prompt": "y"}],
                                   [world.prompt, world.other_prompt()], world.params,
                                   world.max_tokens, (), NONCE, prefill_chunk=prefill_chunk)
    return Served(s.receipts[0], s.transcripts[0])


def test_batched_chunked_receipt_honest_accepted(world):
    """Routing is per token: the receipt of a request served beside another, its prompt
    prefilled in chunks of 4, verifies like the solo one."""
    s = _batched(world, world.honest)
    assert s.output == world.served.output
    v = world.audit(s, tier="deep")
    assert v.accepted, (v.reason, v.detail)


def test_batched_capacity_router_cannot_open(world):
    """A capacity-limited router served in a batch: its routing depended on the batch, so its
    re-execution does not reproduce its own trace and it cannot answer a challenge at all."""
    from commitllm.engine.open import OpenError

    p = Provider(world.honest.model, ((ops, "moe_route", _capacity_route),))
    s = _batched(world, p)
    c = world.challenge(s, "full")
    with pytest.raises(OpenError):
        world.open(s, c, p)
