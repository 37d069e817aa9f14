"""Decode policy and stop policy: at every challenged position that chose an output token the
verifier recomputes the logits (LM head by Freivalds) and re-runs the committed policy (greedy, or
seeded sampling with the revealed seed, checked against its commitment), and it checks that the
output stops exactly at EOS or max_tokens. A provider that commits consistently to tokens the
claimed policy does not give is caught."""

from __future__ import annotations

import dataclasses

import pytest
from advworld import GREEDY, SAMPLED, Provider, World, assert_rejected
from commitllm.verifier.receipt import seed_commitment


def _recommitted(world: World, out, **kw):
    s = world.commit(out, **kw)
    return world.audit(s, tier="full", positions="generated")


def _changed(out):
    out = list(out)
    out[5] = (out[5] + 1) % 128
    return out


def _swapped(out):
    out = list(out)
    out[3], out[9] = out[9], out[3]
    assert out[3] != out[9]
    return out


# (name, edit of the honest output, code)
TOKENS = [("changed", _changed, "decode"), ("reordered", _swapped, "decode"),
          ("truncated", lambda o: list(o)[:-4], "stop_policy"),
          ("extended", lambda o: list(o) + [5, 6], "stop_policy")]


@pytest.mark.parametrize("edit, code", [t[1:] for t in TOKENS], ids=[t[0] for t in TOKENS])
def test_output_tokens_edited_and_recommitted(world, edit, code):
    """The provider commits (re-executing consistently) to an edited output sequence."""
    assert_rejected(_recommitted(world, edit(world.served.output)), code)


# sampler parameters actually used, while the manifest claims the client's SAMPLED
SAMPLERS = [("temperature", {"temperature": 0.3}), ("top_k", {"top_k": 2}),
            ("top_p", {"top_p": 0.3})]


@pytest.mark.parametrize("change", [s[1] for s in SAMPLERS], ids=[s[0] for s in SAMPLERS])
def test_sampled_with_other_parameters(world, change):
    used = dataclasses.replace(SAMPLED, **change)
    p = Provider(world.honest.model, (), {"sampling": SAMPLED.manifest()})
    s = world.serve(p, params=used)
    assert s.output != world.served.output
    assert_rejected(world.audit(s, tier="full", positions="generated"), "decode")


def test_sampled_with_another_seed_opened_with_the_committed_one(world):
    """Sampled with seed B, committed to (and opening) the client-visible seed A."""
    s = world.serve(params=dataclasses.replace(SAMPLED, seed=7))
    salt = bytes.fromhex(s.transcript["salt"])
    s = World.claim(s, seed_commitment=seed_commitment(SAMPLED.seed, salt))
    s.transcript["seed"] = SAMPLED.seed
    assert s.output != world.served.output
    assert_rejected(world.audit(s, tier="full", positions="generated"), "decode")


def test_sampled_with_another_seed_revealing_it(world):
    """Sampled with seed B and committed to A; the opening reveals the seed it really used."""
    s = world.serve(params=dataclasses.replace(SAMPLED, seed=7))
    salt = bytes.fromhex(s.transcript["salt"])
    s = World.claim(s, seed_commitment=seed_commitment(SAMPLED.seed, salt))
    assert_rejected(world.audit(s, tier="full", positions="generated"), "seed_commitment")


@pytest.mark.parametrize("field", ["seed", "salt"])
def test_opening_reveals_another_seed_or_salt(world, field):
    c = world.challenge(world.served, "routine")
    meta, arrays = world.open(world.served, c)
    meta = dict(meta, seed=meta["seed"] + 1) if field == "seed" else dict(meta, salt="00" * 16)
    assert_rejected(world.verify(world.served, c, meta, arrays), "seed_commitment")


def test_greedy_claimed_while_sampled(world):
    """Sampled tokens, committed as a greedy receipt (no seed commitment)."""
    assert_rejected(_recommitted(world, world.served.output, params=GREEDY), "decode")


@pytest.mark.parametrize("claim", [{"sampling": GREEDY.manifest()}, {"seed_commitment": None}],
                         ids=["greedy-with-seed-commitment", "sampled-without-seed-commitment"])
def test_sampling_manifest_inconsistent(world, claim):
    s = World.claim(world.served, **claim)
    assert_rejected(world.audit(s, tier="routine"), "seed_commitment")


def test_eos_ignored(world):
    """The client's EOS is a token the model emits at output index i; the provider keeps
    generating past it, with the EOS still listed in the manifest."""
    out = world.served.output
    eos = out[4]
    assert eos not in out[:4]
    s = world.serve(eos=())
    s = World.claim(s, limits={**s.receipt["manifest"]["limits"], "eos_token_ids": [eos]})
    assert_rejected(world.audit(s, tier="routine"), "stop_policy")


def test_eos_invented(world):
    """The provider stops early by emitting an EOS the policy did not choose."""
    out = world.served.output
    eos = next(t for t in range(3, 128) if t not in out[:6])
    s = world.commit(out[:5] + [eos], eos=(eos,))
    assert_rejected(world.audit(s, tier="full", positions="generated"), "decode")
