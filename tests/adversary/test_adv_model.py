"""Model and configuration substitution: the manifest must name the key's model commitment,
profile, RoPE table and numerics digest; a provider that claims them while computing with other
weights, widths, tables or constants is caught by Merkle proofs against the key's embedding root,
by Freivalds against the key's projections, or by the bit-exact replay."""

from __future__ import annotations

import pytest
from advcheats import (
    act_width,
    exp2_poly,
    kv_width,
    other_model,
    perturbed,
    requantized,
    rope_theta,
    served_profile,
    softmax_table,
)
from advworld import World, assert_rejected
from commitllm.verifier.numerics import get_profile

# (name, provider, code)
SILENT = [
    ("other-weights", lambda qm: other_model(qm), "merkle_embedding"),
    ("other-layers-same-embedding", lambda qm: other_model(qm, keep_embedding=True),
     "freivalds_qkv"),
    ("one-weight-moved", lambda qm: perturbed(qm, 1, "down"), "freivalds_down"),
    ("int8-activations", lambda qm: act_width(qm, 127), "freivalds_qkv"),
    # int8 K/V arrays where the key's profile implies int16 (a cheat that casts them to int16
    # still fails the K/V derivation: test_adv_typed.py)
    ("int8-qkv", lambda qm: kv_width(qm, 127), "opening_type"),
    ("a8-profile-run", lambda qm: served_profile(qm, "a8"), "opening_type"),
    ("4-bit-weights", lambda qm: requantized(qm, 7), "freivalds_qkv"),
    ("rope-theta-silent", lambda qm: rope_theta(qm, 1e5, silent=True), "kv_mismatch"),
    ("rope-theta-declared", lambda qm: rope_theta(qm, 1e5, silent=False), "manifest_mismatch"),
    ("softmax-table", softmax_table, "freivalds_o"),
    ("exp2-polynomial", exp2_poly, "freivalds_down"),
]


@pytest.mark.parametrize("make, code", [c[1:] for c in SILENT], ids=[c[0] for c in SILENT])
def test_served_another_model_or_numerics(world, make, code):
    p = make(world.qm)
    assert world.computes_otherwise(p), "the cheat changes nothing the engine computes"
    s = world.serve(p)
    assert_rejected(world.audit(s, p), code)


def test_a_cheat_the_engine_never_reads_is_seen_as_no_cheat(world):
    """The guard above: patching the per-call softmax table alone changes nothing since the
    engine gathers from its one-gather form, so such a 'cheat' is honest and must be flagged."""
    from commitllm.engine.exact import ops
    from advworld import Provider
    from commitllm.engine.exact.model import ExactModel
    stale = Provider(ExactModel(world.qm), ((ops, "_TABLE", ops._TABLE - (ops._TABLE > 0).long()),))
    assert not world.computes_otherwise(stale)
    assert world.computes_otherwise(softmax_table(world.qm))


# manifest fields declared honestly by a provider that runs something else than the key's model
DECLARED = [("model_commitment", "ab" * 32), ("numerics_digest", "cd" * 32),
            ("spec_version", "commitllm-numerics/0"), ("rope_digest", "ef" * 32),
            ("profile", get_profile("w16a16").manifest()),
            ("tokenizer_hash", "12" * 32)]


@pytest.mark.parametrize("field, value", DECLARED, ids=[d[0] for d in DECLARED])
def test_manifest_names_another_model_or_numerics(world, field, value):
    s = World.claim(world.served, **{field: value})
    assert_rejected(world.audit(s), "manifest_mismatch")


def test_trace_with_another_layer_count(world):
    r = world.served.receipt
    from commitllm.verifier.receipt import build_receipt

    forged = build_receipt(r["manifest"], r["request"], r["nonce"], r["prompt_token_ids"],
                           r["output_token_ids"], r["text"], {**r["trace"], "layers": 3})
    c = world.challenge(world.served, "routine")
    assert_rejected(world.verify(forged, c, *world.open(world.served, c)), "manifest_mismatch")
