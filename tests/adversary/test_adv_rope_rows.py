"""Tamper family: the verifier's RoPE rows, built by the compiled route (native.bridge.rope_rows,
bridge.c br_rope_rows) in place of rope.build_rows. A provider whose RoPE differs from the spec's
at ONE position only (one row of its table changed, the manifest's digest the honest one) is
caught wherever a challenge reaches that position, with the same reason whether the verifier
builds its rows compiled or in numpy; positions the change does not reach verify alike on both
routes (an honest row there), so the compiled rows are neither stricter nor laxer than the spec.
Every profile (w8a16, a8, w16a16: the quantization of q and k after RoPE differs)."""

from __future__ import annotations

import numpy as np
import pytest
from advcheats import RopeAs
from advworld import Provider, assert_rejected
from commitllm.engine.exact.model import ExactModel
from commitllm.verifier import native
from commitllm.verifier import verify as verify_mod
from commitllm.verifier.numerics import rope as spec_rope

AT = 12  # a position that chooses an output token (the tiny world commits 0..23)

needs_core = pytest.mark.skipif(native.lib() is None, reason="the compiled RoPE rows need the core")


class RopeOneRow(RopeAs):
    """The honest table, except position `at`: there `how` changes its cos / sin row."""

    def __init__(self, table, digest: str, at: int, how: str):
        super().__init__(table, digest)
        self.at, self.how = at, how

    def lookup(self, positions):
        cos, sin = (np.array(a, copy=True) for a in self.table.lookup(positions))
        hit = np.asarray(positions) == self.at
        if self.how == "swapped":  # cos and sin of every frequency exchanged
            cos[hit], sin[hit] = sin[hit], cos[hit].copy()
        elif self.how == "negated":  # the rotation run backwards
            sin[hit] = -sin[hit]
        elif self.how == "one_frequency":  # the slowest frequency's angle doubled
            c, s = cos[hit, -1], sin[hit, -1]
            cos[hit, -1], sin[hit, -1] = c * c - s * s, 2 * c * s
        return cos, sin


def _provider(world, how: str) -> Provider:
    model = ExactModel(world.qm)
    model.rope = RopeOneRow(model.rope, model.rope.digest(), AT, how)
    return Provider(model)


def _numpy_rows(monkeypatch):
    monkeypatch.setattr(verify_mod, "rope_rows", spec_rope.build_rows)


@needs_core
@pytest.mark.parametrize("how", ["swapped", "negated", "one_frequency"])
@pytest.mark.parametrize("tier", ["routine", "full", "deep"])
def test_one_rope_row_off_is_caught_on_both_routes(pworld, monkeypatch, how, tier):
    world = pworld
    p = _provider(world, how)
    s = world.serve(p)
    positions = None if tier == "deep" else [AT]
    compiled = world.audit(s, p, tier, positions=positions)
    assert not compiled.accepted, (how, tier)
    _numpy_rows(monkeypatch)
    spec = world.audit(s, p, tier, positions=positions)
    assert (spec.accepted, spec.reason, spec.detail) == \
        (compiled.accepted, compiled.reason, compiled.detail)
    assert_rejected(spec, compiled.reason)


@needs_core
def test_positions_the_change_does_not_reach_verify_alike(pworld, monkeypatch):
    """Challenged positions before AT read no row of AT (their keys stop before it): the
    opening is honest there, and both routes accept it."""
    world = pworld
    p = _provider(world, "swapped")
    s = world.serve(p)
    before = [3, AT - 1]
    compiled = world.audit(s, p, "full", positions=before)
    _numpy_rows(monkeypatch)
    spec = world.audit(s, p, "full", positions=before)
    assert (compiled.accepted, compiled.reason) == (spec.accepted, spec.reason)
    assert compiled.accepted, (compiled.reason, compiled.detail)
