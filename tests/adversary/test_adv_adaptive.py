"""Adaptive and lazy providers: a provider that serves model B but answers challenges as if it
had served A, and providers that cheat only at some positions or layers, hoping the challenge
misses them. The first is caught by the Merkle roots; the others exactly when a challenge reaches
them, which bench/adversary.py turns into detection probabilities (docs/ADVERSARY.md)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from advattn import attention_cheat
from advcheats import perturbed
from advworld import assert_rejected

sys.path.append(str(Path(__file__).resolve().parents[2]))  # `bench` (last: kernels/ must not shadow)
from bench import adversary as bench


def test_served_b_opened_with_a_values(world):
    """Receipt from model B (claiming A); challenged, the provider sends A's honest opening (for
    A's tokens: its embedding rows are not the ones B's receipt names)."""
    p = perturbed(world.qm, 0, "down")
    s = world.serve(p)
    c = world.challenge(s, "routine")
    meta, arrays = world.open(world.served, world.challenge(world.served, "routine"))
    meta = dict(meta, receipt_id=s.receipt["receipt_id"], challenge_mac=c["mac"],
                seed=s.transcript["seed"], salt=s.transcript["salt"])
    v = world.verify(s, c, meta, arrays)  # the row count, or the ids, differ (challenge-dependent)
    assert not v.accepted and v.reason in ("opening_type", "opening_mismatch"), v.reason


def _substituted(world, position: int):
    ran = list(world.prompt)
    ran[position] = (ran[position] + 1) % world.qm.cfg.vocab_size
    return world.shadow(world.serve(prompt=ran), world.prompt)


def test_prompt_token_substituted_at_a_challenged_position(world):
    s = _substituted(world, 4)
    assert_rejected(world.audit(s, tier="full", positions=[4, 23]), "embedding")


def test_prompt_token_substituted_at_an_opened_kv_sample_row(world):
    """The substituted position's layer-0 residual is opened (K/V sample), not challenged."""
    s = _substituted(world, 4)
    for i in range(200):
        c = world.challenge(s, "full", positions=[23], nonce=i.to_bytes(16, "little"))
        if 4 in c["kv_sample"]["0"]:
            break
    assert 4 in c["kv_sample"]["0"] and 4 not in c["positions"]
    assert_rejected(world.verify(s, c, *world.open(s, c)), "embedding")


LAZY = {9, 14, 21}  # the positions a lazy provider cuts attention short at


@pytest.fixture(scope="module")
def lazy(world):
    p = attention_cheat(world.qm, "window", None, LAZY, window=4)
    return world.serve(p), p


@pytest.mark.parametrize("i", range(10))
def test_lazy_provider_caught_exactly_when_reached(world, lazy, i):
    """Routine challenges against a provider cheating at 3 of 24 positions: each rejects if and
    only if it challenges one of them (the bench's coverage rule), and then with freivalds_o."""
    s, p = lazy
    c = world.challenge(s, "routine", nonce=bench._nonce(i, 1))
    v = world.verify(s, c, *world.open(s, c, p))
    assert (not v.accepted) == bool(LAZY & set(c["positions"]))
    assert v.accepted or v.reason == "freivalds_o"


def test_bench_reexecute_once_gives_the_same_openings(world, lazy):
    s, p = lazy
    for tier in ("routine", "full", "deep"):
        c = world.challenge(s, tier)
        plain = world.open(s, c, p)
        with bench.reexecute_once():
            fast, again = world.open(s, c, p), world.open(s, c, p)
        for meta, arrays in (fast, again):
            assert meta == plain[0] and arrays.keys() == plain[1].keys()
            assert all(np.array_equal(arrays[k], plain[1][k]) for k in arrays)


def test_bench_runs_and_writes(tmp_path):
    """The detection bench end to end at toy size (3 layers, 8 new tokens)."""
    res = bench.run(audits=2, predict=30, layers=3, prompt_len=12, new=8, lazy_sizes=(2,),
                    position_sweep=(1, 4), layer_sweep=(1, 3), progress=lambda _: None)
    names = [c["name"] for c in res["cheats"]]
    assert names == ["one-layer-swap", "last-layer-swap", "model-swap", "kv-row",
                     "prompt-substitution", "lazy-2"]
    for c in res["cheats"]:
        for row in c["positions"] + c.get("layers", []):
            assert row["agree"] == row["audits"] == 2, (c["name"], row)
    swap = res["cheats"][2]["positions"]
    assert all(r["audited"] == 1.0 for r in swap)
    md = bench.markdown(res, bench.provenance())
    js, _ = bench.write_results(tmp_path, "adversary", res, md)
    assert js.is_file() and "model-swap" in md
