"""Bridge and residual stream: the replay recomputes each opened layer from its committed input
residual and compares the result with the committed output residual with `==`, so a residual off
by one ulp, a wrong RMSNorm epsilon or weight, a skipped or re-wired layer, or an opening whose
rows belong to another layer is caught."""

from __future__ import annotations

import pytest
from advcheats import layer_fed_earlier_input, layer_skipped, normed, residual_ulp, rmsnorm_eps
from advworld import assert_rejected


def test_residual_one_ulp_off(world):
    """Layer 0's output at position 12 moved by one ulp in one element, used and committed."""
    p = residual_ulp(world.qm, 0, 12)
    s = world.serve(p)
    assert s.receipt["trace"]["residual_root"] != world.served.receipt["trace"]["residual_root"]
    assert_rejected(world.audit(s, p, "full", positions=[12]), "residual_chain")


# (name, provider, code)
CONSISTENT = [
    # eps only rescales whole rows: the next linear's integers (and Freivalds) are unchanged,
    # the Q/K/V scales are not; the first committed value that differs is a K/V row scale
    ("rmsnorm-eps-x10", lambda qm: rmsnorm_eps(qm, 10.0), "kv_mismatch"),
    ("layer-0-skipped", lambda qm: layer_skipped(qm, 0), "residual_chain"),
    ("layer-1-fed-layer-0-input", lambda qm: layer_fed_earlier_input(qm, 1), "freivalds_qkv"),
    ("attn-norm-weight", lambda qm: normed(qm, "attn_norm", 0), "freivalds_qkv"),
    ("mlp-norm-weight", lambda qm: normed(qm, "mlp_norm", 1), "freivalds_gate_up"),
    ("final-norm-weight", lambda qm: normed(qm, "final_norm"), "freivalds_lm_head"),
]


@pytest.mark.parametrize("make, code", [c[1:] for c in CONSISTENT], ids=[c[0] for c in CONSISTENT])
def test_bridge_changed_and_committed(world, make, code):
    p = make(world.qm)
    s = world.serve(p)
    assert_rejected(world.audit(s, p), code)


# an honest deep opening whose layer-0 arrays are presented as layer 1's
RELABELLED = [("kv", ("pos", "k", "sk", "v", "sv", "proof"), "merkle_kv"),
              ("z", ("pos", "qkv", "o", "gate_up", "down"), "freivalds_qkv"),
              ("resid", ("pos", "rows", "proof"), "merkle_residual")]


@pytest.mark.parametrize("prefix, parts, code", RELABELLED, ids=[r[0] for r in RELABELLED])
def test_opening_of_layer_0_presented_for_layer_1(world, prefix, parts, code):
    c = world.challenge(world.served, "deep")
    meta, arrays = world.open(world.served, c)
    for part in parts:
        arrays[f"{prefix}.1.{part}"] = arrays[f"{prefix}.0.{part}"].copy()
    assert_rejected(world.verify(world.served, c, meta, arrays), code)
