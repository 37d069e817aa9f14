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


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # inf / inf in the interpreter
def test_non_finite_activation_raises(tiny_llama):
    """Like the torch backend, a non-finite value reaching a quantizer is an error, not garbage."""
    qm = _quantized(tiny_llama, "w8a16")
    model = TritonModel(qm, "cpu")
    model.final_norm = model.final_norm * float("inf")
    with pytest.raises(FloatingPointError):
        model.forward([SeqCache()], [[1, 2, 3]])
