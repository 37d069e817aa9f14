"""Mistral's sliding window: a provider that attends over more or fewer keys than the window (a
cheaper kernel, or the causal kernel of the other families), that claims another window in its
manifest, that runs the same weights without the window, or whose opening carries other K/V rows
than the challenged positions' windows. The verifier replays every challenged position's
attention over exactly the window's opened rows, so a wrong window changes the attention output
that o's committed accumulator must match (freivalds_o); the window is part of the model
commitment and of the manifest. The honest engine is accepted at every tier."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from advattn import attention_cheat
from advworld import Provider, World, assert_rejected, quantized, resealed

from commitllm.engine import open as open_mod
from commitllm.engine.exact.model import ExactModel
from commitllm.verifier.commitment import commit_model
from commitllm.verifier.opening import plan


@pytest.fixture(scope="module")
def world(tiny_mistral) -> World:
    w = World(quantized(tiny_mistral))
    assert w.qm.cfg.sliding_window == 5 and w.n_positions > 20
    return w


@pytest.mark.parametrize("tier", ["routine", "full", "deep"])
def test_honest_mistral_accepted(world, tier):
    v = world.audit(world.served, tier=tier)
    assert v.accepted, (v.reason, v.detail)


def test_honest_opening_carries_only_the_window(world):
    c = world.challenge(world.served, "full", positions=[20])
    _, arrays = world.open(world.served, c)
    for l in range(world.qm.cfg.num_layers):
        pos = arrays[f"kv.{l}.pos"].tolist()
        assert set(range(16, 21)) <= set(pos) and len(pos) < 21, pos


# cheat -> the attention_variant kind and its window: every layer, every position
WINDOW_CHEATS = {
    "causal-kernel": ("unwindowed", {}),  # the other families' kernel: every earlier key
    "window-too-wide": ("window", {"window": 6}),
    "window-too-narrow": ("window", {"window": 4}),
    "last-key-only": ("window", {"window": 1}),
}


@pytest.mark.parametrize("tier", ["routine", "full"])
@pytest.mark.parametrize("cheat", sorted(WINDOW_CHEATS))
def test_wrong_window_rejected(world, cheat, tier):
    kind, kw = WINDOW_CHEATS[cheat]
    p = attention_cheat(world.qm, kind, layer=None, **kw)
    assert world.computes_otherwise(p), "the cheat must change what is computed"
    s = world.serve(p)
    positions = [20] if tier == "full" else None
    assert_rejected(world.audit(s, p, tier, positions=positions), "freivalds_o")


def test_same_weights_without_the_window_claiming_mistral(world):
    """The weights run as a causal model (a cheaper or a different engine), the receipt claiming
    the committed Mistral: the K/V rows are honest but attention is not the window's."""
    causal = replace(world.qm, cfg=replace(world.qm.cfg, sliding_window=None))
    claims = {"model_commitment": commit_model(world.qm)["commitment"].hex(),
              "attention": {"window": 5}}
    window_plan = lambda c, n, receipt=None, window=None: plan(c, n, receipt, 5)  # noqa: E731
    p = Provider(ExactModel(causal), ((open_mod, "plan", window_plan),), claims)  # opens as A
    s = world.serve(p)
    assert_rejected(world.audit(s, p, "full", positions=[20]), "freivalds_o")


@pytest.mark.parametrize("window", [None, 4, 6, 2**31 - 1])
def test_manifest_claims_another_window(world, window):
    s = World.claim(world.served, attention={"window": window})
    assert_rejected(world.audit(s), "manifest_mismatch")


@pytest.mark.parametrize("attention", [{}, {"window": 5, "rule": "causal"}, {"window": 0},
                                       {"window": 5.0}, {"window": True}, {"window": "5"}])
def test_malformed_attention_manifest(world, attention):
    r = dict(world.served.receipt)
    r = resealed({**r, "manifest": {**r["manifest"], "attention": attention}})
    c = world.challenge(world.served)
    v = world.verify(r, c, *world.open(world.served, c))
    assert_rejected(v, "receipt_malformed")


def test_opening_with_every_earlier_row_rejected(world):
    """The causal plan's K/V rows (0..horizon-1) instead of the window's: more rows than the key
    implies are not an opening of this challenge."""
    causal_plan = lambda c, n, receipt=None, window=None: plan(c, n, receipt)  # noqa: E731
    p = Provider(ExactModel(world.qm), ((open_mod, "plan", causal_plan),))
    c = world.challenge(world.served, "full", positions=[20])
    v = world.verify(world.served, c, *world.open(world.served, c, p))
    assert_rejected(v, "opening_type")


def test_opening_missing_a_window_row_rejected(world):
    c = world.challenge(world.served, "full", positions=[20])
    meta, arrays = world.open(world.served, c)
    pos = arrays["kv.0.pos"]
    keep = pos != 18
    for x in ("pos", "k", "sk", "v", "sv"):
        arrays[f"kv.0.{x}"] = np.ascontiguousarray(arrays[f"kv.0.{x}"][keep])
    assert_rejected(world.verify(world.served, c, meta, arrays), "opening_type")


def test_window_row_changed_rejected(world):
    """A K/V row inside the window, changed in the opening (the Merkle proof no longer holds)."""
    c = world.challenge(world.served, "full", positions=[20])
    meta, arrays = world.open(world.served, c)
    i = arrays["kv.1.pos"].tolist().index(17)
    arrays["kv.1.v"][i, 0, 0] += 1
    assert_rejected(world.verify(world.served, c, meta, arrays), "merkle_kv")
