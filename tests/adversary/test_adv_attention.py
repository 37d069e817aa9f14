"""Attention at arbitrary positions: the verifier replays integer-softmax attention bit-exactly at
every challenged position over every opened K/V row, re-derives the K/V rows of the challenged and
sampled positions from their committed residuals, and checks each opened row's Merkle proof. A
provider whose attention, K/V cache, RoPE, mask or head mapping deviates anywhere a challenge
reaches is caught, though its commitments are internally consistent."""

from __future__ import annotations

import pytest
from advattn import (
    attention_cheat,
    cache_of,
    kv_cheat,
    kv_row_changed,
    kv_rows_spliced,
    kv_rows_swapped,
)
from advcheats import rope_shifted
from advworld import assert_rejected

# the tiny world commits 24 positions: 0..7 prompt only, 8..23 choose an output token
WHERE = {"early": 1, "middle": 12, "last": 23}


@pytest.mark.parametrize("where", list(WHERE))
@pytest.mark.parametrize("kind", ["score", "weight", "output"])
def test_attention_changed_at_one_position(world, kind, where):
    """One head's score, softmax weight or output changed at ONE query position of layer 1; the
    challenge opens exactly that position (attention replay -> o's input differs -> Freivalds)."""
    pos = WHERE[where]
    p = attention_cheat(world.qm, kind, layer=1, positions=[pos])
    s = world.serve(p)
    assert s.receipt["trace"] != world.served.receipt["trace"]
    assert_rejected(world.audit(s, p, "full", positions=[pos]), "freivalds_o")


# (name, layer, edit, challenged positions): the edited rows sit at prefix positions 2..6
KV_EDITS = [
    ("k-row-early", 0, kv_row_changed(3, "k"), [3, 23]),
    ("v-row-prefix", 1, kv_row_changed(5, "v"), [5, 23]),
    ("rows-swapped", 0, kv_rows_swapped(2, 6), [2, 23]),
]


@pytest.mark.parametrize("layer, edit, positions", [e[1:] for e in KV_EDITS],
                         ids=[e[0] for e in KV_EDITS])
def test_committed_kv_row_not_derived_from_its_residual(world, layer, edit, positions):
    """A K/V row in the cache (and in the commitment) that its own residual does not give."""
    p = kv_cheat(world.qm, layer, edit)
    s = world.serve(p)
    assert s.receipt["trace"]["kv_root"] != world.served.receipt["trace"]["kv_root"]
    assert_rejected(world.audit(s, p, "full", positions=positions), "kv_mismatch")


def test_kv_rows_spliced_from_another_request(world):
    """A prefix cache reused across clients: K/V rows 0..3 of layer 0 are another prompt's."""
    other = cache_of(world.qm, world.other_prompt())
    p = kv_cheat(world.qm, 0, kv_rows_spliced(other, 0, range(4)))
    s = world.serve(p)
    assert_rejected(world.audit(s, p, "full", positions=[2, 23]), "kv_mismatch")


def test_prefix_state_of_another_request(world):
    """The whole state of positions 0..3 (residuals and K/V) is another prompt's: the provider
    ran other tokens there but the receipt names the client's. The embedding check of a
    challenged prefix position sees another token's row."""
    ran = world.other_prompt()[:4] + world.prompt[4:]
    computed = world.serve(prompt=ran)
    s = world.shadow(computed, world.prompt)
    assert_rejected(world.audit(s, tier="full", positions=[2, 23]), "embedding")


def test_rope_position_shifted(world):
    """Q and K rotated for position p + 1 (an off-by-one in the cache offset)."""
    p = rope_shifted(world.qm, 1)
    s = world.serve(p)
    assert_rejected(world.audit(s, p), "kv_mismatch")


def test_future_position_admitted(world):
    """The causal mask lets query p see key p + 1 (layer 0, every position; committed in one
    prefill so the future key exists)."""
    p = attention_cheat(world.qm, "future", layer=0)
    s = world.commit(world.served.output, p)
    assert s.receipt["trace"] != world.served.receipt["trace"]
    assert_rejected(world.audit(s, p, "full", positions=[5]), "freivalds_o")


def test_gqa_head_mapped_to_the_wrong_kv_head(world):
    """Query heads 1 and 2 read K/V heads 1 and 0 (h mod 2 instead of h // 2)."""
    p = attention_cheat(world.qm, "gqa", layer=0)
    s = world.serve(p)
    assert_rejected(world.audit(s, p, "full", positions=[9]), "freivalds_o")


def test_sliding_window_attention(world):
    """A cheaper kernel that only attends to the last 4 keys, every layer and position."""
    p = attention_cheat(world.qm, "window", layer=None, window=4)
    s = world.serve(p)
    assert_rejected(world.audit(s, p, "full", positions=[20]), "freivalds_o")


@pytest.fixture(params=["compiled-best", "compiled-plain", "spec"])
def verifier_route(request, monkeypatch):
    """The verifier's attention replay in the compiled core (its best SIMD route, or plain C) or
    in the numpy spec: each must reach the same verdict for the same reason."""
    from commitllm.verifier import native, replay
    from commitllm.verifier.numerics import attention as spec_attn
    if request.param == "spec":
        monkeypatch.setattr(replay, "attention", spec_attn.attention)
    elif native.lib() is None:
        pytest.skip(f"no compiled core: {native.error()}")
    else:
        native.use_route(0 if request.param == "compiled-plain" else -1)
    yield request.param
    if native.lib() is not None:
        native.use_route(-1)


@pytest.mark.parametrize("kind", ["score", "weight", "output"])
def test_attention_cheat_rejected_by_every_verifier_route(world, verifier_route, kind):
    """A changed score, weight or output at the last position is refused by the compiled replay
    and by the spec alike, and the honest run is accepted by each."""
    pos = WHERE["last"]
    p = attention_cheat(world.qm, kind, layer=1, positions=[pos])
    assert_rejected(world.audit(world.serve(p), p, "full", positions=[pos]), "freivalds_o")
    honest = world.audit(world.served, None, "full", positions=[pos])
    assert honest.accepted, honest.reason
