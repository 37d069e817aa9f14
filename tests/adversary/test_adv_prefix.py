"""The prefix cache as an attack surface: K/V rows or residual leaves a cache hit supplies that are
not what the prefix computes (a poisoned pool, a block filed under another prefix's hash, a wrong
leaf). A receipt built from them commits rows that no honest run gives: the provider's own
opening re-executes without the cache and refuses (OpenError), and a provider that instead opens
the spliced rows is rejected by the verifier's attention replay
(test_adv_attention.py::test_kv_rows_spliced_from_another_request). The honest cache changes
nothing (receipts equal, openings accepted)."""

from __future__ import annotations

import pytest
from advworld import NONCE

from commitllm.engine.batching import run_all
from commitllm.engine.exact.paged import KVPool
from commitllm.engine.open import OpenError, build_opening
from commitllm.engine.prefix import PrefixCache
from commitllm.engine.receipts import SeqRequest
from commitllm.verifier import challenge as ch
from commitllm.verifier.verify import verify

BS = 4


def _setup(world, n_blocks=64):
    model = world.honest.model  # no patches: the honest engine
    probe = KVPool(model.cfg, model.profile, 1 << 30, BS)
    pool = KVPool(model.cfg, model.profile, n_blocks * probe.block_bytes, BS)
    return model, pool, PrefixCache(pool)


def _seq(world, prompt, nonce=NONCE, salt=bytes(16)):
    return SeqRequest(world.request, list(prompt), world.params, 6, nonce, salt)


def _two(world):
    """Two prompts sharing their first 8 tokens (two full blocks), then different."""
    base = list(world.prompt)
    return base + [5, 6, 7], base[:8] + [9, 9, 9, 9, 3]


def _run(world, model, pool, prefix, seqs, arrivals):
    return [f.transcript for f in run_all(model, None, world.eos, seqs, arrivals, 32, 2, pool,
                                          prefix)]


def _honest(world, model, seqs):
    return [f.transcript for f in run_all(model, None, world.eos, seqs, [0] * len(seqs), 32, 2)]


def test_honest_cache_hit_is_invisible(world):
    model, pool, prefix = _setup(world)
    a, b = _two(world)
    seqs = [_seq(world, a), _seq(world, b, "other")]
    got = _run(world, model, pool, prefix, seqs, [0, 30])
    assert prefix.hits == 1 and prefix.hit_tokens == 8
    assert got == _honest(world, model, seqs)
    for tr in got:
        c = ch.derive(world.key.secret, tr["receipt"], "deep", nonce=b"n" * 16)
        v = verify(world.key, tr["receipt"], c, *build_opening(model, tr, c), world.vtok,
                   io_binding=False)
        assert v.accepted, (v.reason, v.detail)


@pytest.mark.parametrize("what", ["k", "sv"])
def test_poisoned_pool_block_cannot_be_opened(world, what):
    """A cached block's K/V rows changed in the pool after it was filed (memory corruption, or a
    provider that edits them): the receipt that hits it differs from the honest one and the
    provider's re-execution refuses to open it."""
    model, pool, prefix = _setup(world)
    a, b = _two(world)
    first = _run(world, model, pool, prefix, [_seq(world, a)], [0])
    assert first == _honest(world, model, [_seq(world, a)])
    blk = prefix.match(b)[0][0].block
    store = getattr(pool, what)
    store[0, blk, 1] = store[0, blk, 1] + (1 if what == "k" else 0.5)
    served = _run(world, model, pool, prefix, [_seq(world, b, "other")], [0])[0]
    honest = _honest(world, model, [_seq(world, b, "other")])[0]
    assert served["receipt"]["trace"] != honest["receipt"]["trace"]
    c = ch.derive(world.key.secret, served["receipt"], "routine", nonce=b"n" * 16)
    with pytest.raises(OpenError, match="trace roots"):
        build_opening(model, served, c)


def test_block_filed_under_another_prefix_cannot_be_opened(world):
    """A lookup that returns the blocks of a different prefix (a hash collision, or a cache keyed
    on too little): the receipt commits another request's K/V rows and cannot be opened."""
    model, pool, prefix = _setup(world)
    a, _ = _two(world)
    other = [t + 1 if t + 1 < model.cfg.vocab_size else 3 for t in a]
    _run(world, model, pool, prefix, [_seq(world, other)], [0])
    cached, _ = prefix.match(other)
    for c_, h in zip(cached, prefix.hashes(a, len(cached))):  # filed under a's hashes too
        prefix._by_hash[h] = c_
    served = _run(world, model, pool, prefix, [_seq(world, a, "victim")], [0])[0]
    assert served != _honest(world, model, [_seq(world, a, "victim")])[0]
    c = ch.derive(world.key.secret, served["receipt"], "routine", nonce=b"n" * 16)
    with pytest.raises(OpenError, match="trace roots"):
        build_opening(model, served, c)


def test_wrong_cached_residual_leaf_cannot_be_opened(world):
    """The K/V rows are right but a residual leaf kept with the block is not: the receipt's
    residual root is not the computation's, and the opening refuses."""
    model, pool, prefix = _setup(world)
    a, b = _two(world)
    _run(world, model, pool, prefix, [_seq(world, a)], [0])
    c0 = prefix.match(b)[0][0]
    c0.leaves[1][2] = bytes(32)
    served = _run(world, model, pool, prefix, [_seq(world, b, "other")], [0])[0]
    honest = _honest(world, model, [_seq(world, b, "other")])[0]
    assert served["receipt"]["trace"]["residual_root"] != honest["receipt"]["trace"][
        "residual_root"]
    assert served["receipt"]["trace"]["kv_root"] == honest["receipt"]["trace"]["kv_root"]
    c = ch.derive(world.key.secret, served["receipt"], "routine", nonce=b"n" * 16)
    with pytest.raises(OpenError, match="trace roots"):
        build_opening(model, served, c)
