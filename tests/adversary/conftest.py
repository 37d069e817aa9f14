"""Session fixtures of the adversary suite: one honest World per model, built once.

* ``world``: tiny Llama (GQA 4/2, untied head), seeded sampling, 9 prompt + 16 output tokens
  (24 committed positions: 0..7 prompt-only, 8..23 choose an output token).
* ``qwen_world``: tiny Qwen2 (q/k/v biases), same request.
* ``chat_world``: a tiny Llama with SmolLM2's 49152-token vocabulary and SmolLM2's real tokenizer
  and chat template (the key carries them, so the verifier's input and output binding run), greedy,
  whose LM-head row of EOS (id 2) is 1.5 x the row of a token it emits early: the honest answer
  ends with EOS after a few tokens, so stop-policy cheats have a real EOS to play with.
"""

from __future__ import annotations

import dataclasses

import pytest
from advcheats import random_tensors
from advworld import CHAT_TEXT, EOS, GREEDY, World, quantized
from commitllm.engine.exact.model import ExactModel
from commitllm.engine.generate import generate_exact
from commitllm.verifier.checkpoint import load_checkpoint
from commitllm.verifier.numerics import get_profile
from commitllm.verifier.numerics.weights import quantize_model

CHAT_VOCAB = 49152  # SmolLM2's vocabulary, so its tokenizer's ids fit the tiny model


@pytest.fixture(scope="session")
def world(tiny_llama) -> World:
    return World(quantized(tiny_llama))


@pytest.fixture(scope="session")
def qwen_world(tiny_qwen2) -> World:
    return World(quantized(tiny_qwen2))


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2):
    return smollm2.tokenizer


@pytest.fixture(scope="session")
def chat_world(tiny_llama, smollm2_tokenizer) -> World:
    tok = smollm2_tokenizer
    cfg, _ = load_checkpoint(tiny_llama)
    cfg = dataclasses.replace(cfg, vocab_size=CHAT_VOCAB, eos_token_ids=(EOS,))
    tensors = random_tensors(cfg, seed=7)
    prompt = tok.encode_chat([{"role": "user", "content": CHAT_TEXT}])
    prof = get_profile("w8a16")
    plain = ExactModel(quantize_model(cfg, tensors, prof))
    early = generate_exact(plain, [prompt], GREEDY, 3, ())[0].token_ids[1]
    tensors["lm_head.weight"][EOS] = 1.5 * tensors["lm_head.weight"][early]
    qm = quantize_model(cfg, tensors, prof)
    w = World(qm, tok, GREEDY, prompt, max_tokens=8, eos=(EOS,), request={"messages": [{"role": "user", "content": CHAT_TEXT}]})
    assert w.served.output[-1] == EOS and len(w.served.output) >= 2, w.served.output
    return w


@pytest.fixture(scope="session")
def opened(world):
    """An honest full-tier opening of `world` (every kind of array, the LM head's included) and
    its challenge; tests copy before they edit."""
    c = world.challenge(world.served, "full")
    meta, arrays = world.open(world.served, c)
    assert world.verify(world.served, c, meta, arrays).accepted
    return c, meta, arrays


PROFILES = ("w8a16", "a8", "w16a16")


@pytest.fixture(scope="session")
def profile_worlds(tiny_llama, world) -> dict:
    """One World per numerics profile (the key built under it), w8a16 being `world` itself;
    built lazily, once per session."""
    return {"w8a16": world}


@pytest.fixture(scope="session", params=PROFILES)
def pworld(request, profile_worlds, tiny_llama) -> World:
    """The tiny Llama's World under each profile in turn (the test id names the profile)."""
    name = request.param
    if name not in profile_worlds:
        profile_worlds[name] = World(quantized(tiny_llama, name))
    return profile_worlds[name]


@pytest.fixture(scope="session")
def popened(pworld) -> tuple:
    """An honest full-tier opening of `pworld` and its challenge (copy before editing)."""
    c = pworld.challenge(pworld.served, "full")
    meta, arrays = pworld.open(pworld.served, c)
    assert pworld.verify(pworld.served, c, meta, arrays).accepted
    return c, meta, arrays
