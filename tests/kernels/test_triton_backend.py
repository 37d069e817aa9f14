"""The Triton backend (kernels under the interpreter) equals the torch exact backend value by value
on the tiny models: every traced intermediate, the logits, the residual streams, greedy tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from commitllm.engine.exact.model import ExactModel, SeqCache
from commitllm.engine.exact.triton_backend import TritonModel
from commitllm.verifier.checkpoint import load_checkpoint
from commitllm.verifier.numerics import PROFILES, get_profile
from commitllm.verifier.numerics.weights import quantize_model
from kutil import assert_bits_equal
from tinymodels import TINY_KINDS


def _quantized(folder, profile: str):
    cfg, tensors = load_checkpoint(folder)
    return quantize_model(cfg, tensors, get_profile(profile))


def _assert_same(torch_tr: dict, triton_tr: dict) -> None:
    assert set(torch_tr) == set(triton_tr), set(torch_tr) ^ set(triton_tr)
    for name in sorted(torch_tr):
        assert_bits_equal(triton_tr[name], torch_tr[name], name)


def _prefill(qm, ids):
    ref_tr, tri_tr, ref_res, tri_res = {}, {}, [], []
    ref = ExactModel(qm).forward([SeqCache()], [ids], ref_tr, all_logits=True, residuals=ref_res,
                                 trace_attention=False)
    tri = TritonModel(qm, "cpu").forward([SeqCache()], [ids], tri_tr, all_logits=True,
                                         residuals=tri_res)
    _assert_same(ref_tr, tri_tr)
    assert_bits_equal(tri[0], ref[0], "logits")
    for a, b in zip(tri_res, ref_res):
        assert_bits_equal(a, b, "residual")


# llama_tied_scaled differs from llama only outside the kernels (RoPE tables, a tied head),
# qwen3_moe is qwen3's head norms + mixtral's experts, both run: -m slow
@pytest.mark.parametrize("tiny_checkpoint", [
    pytest.param(k, marks=[pytest.mark.slow] if k in ("llama_tied_scaled", "qwen3_moe") else [])
    for k in sorted(TINY_KINDS)], indirect=True)
def test_tiny_models_prefill_equal_torch(tiny_checkpoint):
    qm = _quantized(tiny_checkpoint, "w8a16")
    _prefill(qm, np.random.default_rng(5).integers(0, qm.cfg.vocab_size, 23).tolist())


@pytest.mark.parametrize("profile", sorted(set(PROFILES) - {"w8a16"}))
def test_other_profiles_equal_torch(tiny_llama, profile):
    qm = _quantized(tiny_llama, profile)
    _prefill(qm, np.random.default_rng(6).integers(0, qm.cfg.vocab_size, 17).tolist())


def test_batched_decode_equals_torch(tiny_qwen2):
    """Two sequences of different lengths: prefill, then decode steps, logits equal each step."""
    qm = _quantized(tiny_qwen2, "w8a16")
    rng = np.random.default_rng(7)
    prompts = [rng.integers(0, qm.cfg.vocab_size, n).tolist() for n in (9, 4)]
    ref, tri = ExactModel(qm), TritonModel(qm, "cpu")
    rc, tc = [SeqCache(), SeqCache()], [SeqCache(), SeqCache()]
    steps = [prompts] + [[[int(t)] for t in rng.integers(0, qm.cfg.vocab_size, 2)]
                         for _ in range(3)]
    for tokens in steps:
        a, b = ref.forward(rc, tokens), tri.forward(tc, tokens)
        for x, y in zip(b, a):
            assert_bits_equal(x, y, "logits")
    for c1, c2 in zip(tc, rc):
        assert c1.length == c2.length
        assert all(torch.equal(x, y) for x, y in zip(c1.k + c1.v, c2.k + c2.v))


def test_paged_pool_steps_equal_torch(tiny_qwen2):
    """Sequences in one K/V pool (continuous batching's caches): the Triton backend writes each
    step's rows into their blocks and its kernel reads the keys through each sequence's block
    table; the logits of every step (chunked prefill across block boundaries, then one-token
    steps of both sequences together) and the pool's rows are the torch backend's, bit for bit,
    and the pool keeps its size."""
    from commitllm.engine.exact.paged import KVPool, PagedCache

    qm = _quantized(tiny_qwen2, "w8a16")
    rng = np.random.default_rng(8)
    prompts = [rng.integers(0, qm.cfg.vocab_size, n).tolist() for n in (11, 6)]
    ref, tri = ExactModel(qm), TritonModel(qm, "cpu")
    probe = KVPool(qm.cfg, qm.profile, 1 << 30, 4)
    pools = [KVPool(qm.cfg, qm.profile, 12 * probe.block_bytes, 4, device=m.device if m is tri
                    else None) for m in (ref, tri)]
    size = pools[1].nbytes
    rc, tc = ([PagedCache(p) for _ in prompts] for p in pools)
    steps = [[prompts[0][:7], prompts[1]], [prompts[0][7:], [3]]] + \
        [[[int(t)] for t in rng.integers(0, qm.cfg.vocab_size, 2)] for _ in range(3)]
    for tokens in steps:
        for c in rc + tc:
            assert c.reserve(len(tokens[(rc + tc).index(c) % 2]))
        a, b = ref.forward(rc, tokens), tri.forward(tc, tokens)
        for x, y in zip(b, a):
            assert_bits_equal(x, y, "logits")
    for c1, c2 in zip(tc, rc):
        assert c1.length == c2.length and c1.blocks == c2.blocks
        for name in ("k", "sk", "v", "sv"):
            for l in range(qm.cfg.num_layers):
                assert torch.equal(getattr(c1, name)[l], getattr(c2, name)[l]), (name, l)
    assert pools[1].nbytes == size and pools[1].k.device == tri.device


@pytest.mark.slow  # about a minute under the interpreter
def test_continuous_batching_on_the_pool_signs_the_torch_receipts(tmp_path):
    """Continuous batching with the Triton backend on a paged pool with prefix caching (the
    default serving path): staggered arrivals, a small token budget, a repeated prompt that hits
    the prefix cache; every transcript (receipt, token ids, logprobs) byte for byte the torch
    backend's run alone."""
    import json

    from commitllm.engine.batching import run_all
    from commitllm.engine.exact.paged import KVPool
    from commitllm.engine.loader import load_model
    from commitllm.engine.prefix import PrefixCache
    from commitllm.engine.receipts import sign_batch
    from test_batching import EOS, _seqs
    from tinymodels import make_tiny_chat_model

    loaded = load_model(str(make_tiny_chat_model(tmp_path / "m")))
    qm = quantize_model(loaded.cfg, loaded.tensors, get_profile("w8a16"))
    tok, ref, tri = loaded.tokenizer, ExactModel(qm), TritonModel(qm, "cpu")
    seqs = _seqs(tok, 3)
    seqs.append(seqs[1])  # the same long prompt again: its full blocks come from the cache
    alone = [json.dumps(sign_batch(ref, tok, [s], EOS).transcripts[0], sort_keys=True)
             for s in seqs]
    pool = KVPool(qm.cfg, qm.profile, 1 << 22, 4, device=tri.device)
    prefix = PrefixCache(pool)
    got = run_all(tri, tok, EOS, seqs, [0, 1, 1, 6], token_budget=12, max_seqs=3, pool=pool,
                  prefix=prefix)
    assert [json.dumps(f.transcript, sort_keys=True) for f in got] == alone
    assert prefix.hit_tokens > 0


def test_worker_puts_the_pool_on_the_model_s_device(tiny_llama):
    """serve's worker sizes its pool on the backend's device (a GPU for the Triton backend)."""
    from commitllm.engine.serve.worker import Worker

    qm = _quantized(tiny_llama, "w8a16")
    tri = TritonModel(qm, "cpu")
    w = Worker(tri, None, (), None, {}, kv_cache_bytes=1 << 20)
    assert w.pool is not None and w.pool.device == tri.device


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # inf / inf in the interpreter
def test_non_finite_activation_raises(tiny_llama):
    """Like the torch backend, a non-finite value reaching a quantizer is an error, not garbage."""
    qm = _quantized(tiny_llama, "w8a16")
    model = TritonModel(qm, "cpu")
    model.final_norm = model.final_norm * float("inf")
    with pytest.raises(FloatingPointError):
        model.forward([SeqCache()], [[1, 2, 3]])
