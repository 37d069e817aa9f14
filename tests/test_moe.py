"""Mixtral's mixture of experts, end to end: the config fields, the routing rule (top k on the
router's fp32 logits, ties to the lower index, integer-softmax weights, a fixed combination
order) in the spec and the torch route, the engine equal to the spec with several experts in
use, batch and chunk invariance, the commitment over every expert, and the serving path (paged
pool, prefix cache) verifying at the deep tier. (Every intermediate against the spec,
transformers agreement, the Triton backend and the round trip at every tier: the `mixtral` kind
of the parametrized tests; tensor parallelism: tests/test_tp.py; cheats:
tests/adversary/test_adv_moe.py.)
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from commitllm.engine.exact import ops
from commitllm.engine.exact.model import ExactModel, SeqCache
from commitllm.engine.generate import generate_exact
from commitllm.engine.serve.audit import opening_bytes
from commitllm.verifier.checkpoint import load_checkpoint
from commitllm.verifier.commitment import commit_model
from commitllm.verifier.config import MAX_EXPERTS, ConfigError, ModelConfig
from commitllm.verifier.numerics import get_profile, moe
from commitllm.verifier.numerics.forward import KVCache, forward
from commitllm.verifier.numerics.rope import RopeTable
from commitllm.verifier.numerics.sampler import SamplingParams
from commitllm.verifier.numerics.weights import QExperts, quantize_model

F32 = np.float32


@pytest.fixture(scope="module")
def qm(tiny_mixtral):
    cfg, t = load_checkpoint(tiny_mixtral)
    return quantize_model(cfg, t, get_profile("w8a16"))


# ---------------------------------------------------------------- config


def _raw(**extra) -> dict:
    raw = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": 128,
           "hidden_size": 64, "intermediate_size": 48, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
           "rope_theta": 1e6, "max_position_embeddings": 256, "sliding_window": None,
           "num_local_experts": 8, "num_experts_per_tok": 2}
    return raw | extra


def test_config_reads_the_experts_and_writes_them_back(qm):
    cfg = ModelConfig.from_dict(_raw())
    assert cfg.family == "mixtral" and cfg.moe
    assert (cfg.num_experts, cfg.experts_per_token) == (8, 2)
    assert cfg.sliding_window is None  # Mixtral-8x7B-v0.1's config: causal
    assert ModelConfig.from_dict(cfg.to_hf_dict()) == cfg
    assert ModelConfig.from_dict(_raw(sliding_window=4096)).sliding_window == 4096
    assert (qm.cfg.num_experts, qm.cfg.experts_per_token, qm.cfg.sliding_window) == (4, 2, 6)
    dense = ModelConfig.from_dict(_raw(architectures=["MistralForCausalLM"],
                                       model_type="mistral", num_local_experts=None))
    assert not dense.moe and dense.num_experts == dense.experts_per_token == 0


@pytest.mark.parametrize("experts, k", [(8, 9), (8, 0), (0, 0), (MAX_EXPERTS + 1, 2), (8, True),
                                        (8.0, 2), (8, 2.5), ("8", 2), (8, None), (8, -1)])
def test_bad_expert_counts_refused(experts, k):
    with pytest.raises(ConfigError, match="num_local_experts|experts"):
        ModelConfig.from_dict(_raw(num_local_experts=experts, num_experts_per_tok=k))


def test_dense_families_refuse_expert_fields():
    cfg = ModelConfig.from_dict(_raw(architectures=["MistralForCausalLM"], model_type="mistral",
                                     num_local_experts=None))
    with pytest.raises(ConfigError, match="no experts"):
        replace(cfg, num_experts=4, experts_per_token=2)
    with pytest.raises(ConfigError, match="mixture-of-experts"):  # Mistral with an expert count
        ModelConfig.from_dict(_raw(architectures=["MistralForCausalLM"], model_type="mistral"))


@pytest.mark.parametrize("arch, field", [("Qwen2MoeForCausalLM", "num_experts"),
                                         ("DeepseekV3ForCausalLM", "n_routed_experts")])
def test_other_moe_architectures_refused(arch, field):
    raw = _raw(architectures=[arch], model_type=arch.lower(), num_local_experts=None,
               **{field: 64})
    with pytest.raises(ConfigError, match="unsupported architecture|mixture-of-experts"):
        ModelConfig.from_dict(raw)


def _qwen3_moe(**extra) -> dict:
    """Qwen3-30B-A3B's MoE fields at a small size."""
    return _raw(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe",
                num_local_experts=None, num_experts=8, moe_intermediate_size=32,
                intermediate_size=96, head_dim=16, norm_topk_prob=True, decoder_sparse_step=1,
                mlp_only_layers=[], use_sliding_window=False) | extra


def test_qwen3_moe_config_reads_its_fields():
    cfg = ModelConfig.from_dict(_qwen3_moe())
    assert (cfg.family, cfg.qk_norm, cfg.moe) == ("qwen3_moe", True, True)
    assert (cfg.num_experts, cfg.experts_per_token, cfg.intermediate_size) == (8, 2, 32)
    assert ModelConfig.from_dict(cfg.to_hf_dict()) == cfg
    # transformers 5 writes the count as num_local_experts; the same count twice is fine
    assert ModelConfig.from_dict(_qwen3_moe(num_experts=None, num_local_experts=8)) == cfg
    assert ModelConfig.from_dict(_qwen3_moe(num_local_experts=8)) == cfg


@pytest.mark.parametrize("extra, field", [
    ({"norm_topk_prob": False}, "norm_topk_prob"), ({"norm_topk_prob": None}, "norm_topk_prob"),
    ({"decoder_sparse_step": 2}, "decoder_sparse_step"), ({"mlp_only_layers": [1]}, "mlp_only"),
    ({"shared_expert_intermediate_size": 64}, "shared_expert"),
    ({"num_local_experts": 4}, "differ"), ({"num_experts": None}, "num_experts"),
    ({"moe_intermediate_size": None}, "moe_intermediate_size"),
    ({"use_sliding_window": True}, "sliding"), ({"num_experts_per_tok": 9}, "experts")])
def test_qwen3_moe_variants_the_spec_does_not_implement_are_refused(extra, field):
    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_dict(_qwen3_moe(**extra))


def test_mixtral_without_an_expert_count_refused():
    with pytest.raises(ConfigError, match="num_local_experts"):
        ModelConfig.from_dict(_raw(num_local_experts=None))


def test_every_expert_and_the_routing_shape_are_committed(qm):
    """The model commitment covers each expert's weights, their order and k: swapping two
    experts, or taking one more per token, is another model."""
    base = commit_model(qm)["commitment"]
    layers = list(qm.layers)
    ex = layers[0].experts
    swapped = QExperts(ex.router, (ex.gate_up[1], ex.gate_up[0], *ex.gate_up[2:]),
                       (ex.down[1], ex.down[0], *ex.down[2:]))
    layers[0] = replace(layers[0], experts=swapped)
    assert commit_model(replace(qm, layers=tuple(layers)))["commitment"] != base
    k3 = replace(qm, cfg=replace(qm.cfg, experts_per_token=3))
    assert commit_model(k3)["commitment"] != base


# ---------------------------------------------------------------- the routing rule


def _both(logits: np.ndarray, k: int):
    sel, g = moe.route(logits, k)
    ts, tg = ops.moe_route(torch.from_numpy(logits), k)
    assert np.array_equal(ts.numpy(), sel) and ts.dtype == torch.int64
    assert tg.numpy().tobytes() == g.tobytes(), "weights differ between spec and torch"
    return sel, g


def test_selection_rule_ties_and_signed_zero():
    r = np.array([[1.0, 3.0, 3.0, 2.0],  # a tie for the top: both taken
                  [2.0, 2.0, 2.0, 2.0],  # all equal: the two lowest indices
                  [0.0, -0.0, -1.0, -0.0],  # +0 and -0 are equal logits: lower index first
                  [5.0, 1.0, 4.0, 4.0],  # a tie for second place: the lower index
                  [-1e30, -3.0, 7.0, 1e30]], F32)  # extreme magnitudes (clamped in weights)
    sel, g = _both(r, 2)
    assert sel.tolist() == [[1, 2], [0, 1], [0, 1], [0, 2], [2, 3]]
    assert g[0].tolist() == [0.5, 0.5] and g[1].tolist() == [0.5, 0.5]
    assert g[2].tolist() == [0.5, 0.5]
    assert g[4].tolist() == [0.0, 1.0]  # 2^30 fixed-point apart: the table's weight is 0


@pytest.mark.parametrize("k", [1, 2, 3, 8])
def test_spec_and_torch_route_agree_on_random_and_tied_logits(k):
    rng = np.random.default_rng(k)
    r = (rng.standard_normal((300, 8)) * rng.choice([0.01, 1, 30], (300, 1))).astype(F32)
    r[::7] = np.round(r[::7])  # many exact ties
    r[::11, :4] = r[::11, 4:]
    sel, g = _both(r, k)
    assert np.all(np.diff(sel, axis=1) > 0)  # ascending, no repeats
    ranked = np.sort(r, axis=1)[:, ::-1]
    assert np.array_equal(np.sort(np.take_along_axis(r, sel, 1), axis=1)[:, ::-1], ranked[:, :k])
    if k == 1:
        assert np.all(g == 1.0)


def test_weights_are_the_renormalized_softmax_to_table_precision():
    """The integer softmax over the top k is Mixtral's softmax-then-renormalize, up to the
    table's rounding: a sanity bound (the rule itself is exact and compared bit for bit)."""
    rng = np.random.default_rng(0)
    r = (rng.standard_normal((500, 8)) * 2).astype(F32)
    sel, g = moe.route(r, 2)
    top = np.take_along_axis(r, sel, 1).astype(np.float64)
    ref = np.exp(top - top.max(1, keepdims=True))
    ref /= ref.sum(1, keepdims=True)
    assert np.abs(g - ref).max() < 2e-3
    assert np.abs(g.astype(np.float64).sum(1) - 1).max() < 1e-6


def test_non_finite_router_logits_raise_in_both():
    for bad in (np.nan, np.inf, -np.inf):
        r = np.zeros((2, 4), F32)
        r[1, 2] = bad
        with pytest.raises(FloatingPointError):
            moe.route(r, 2)
        with pytest.raises(FloatingPointError):
            ops.moe_route(torch.from_numpy(r), 2)


def test_combination_order_is_fixed_and_shared():
    """g0 e0, then + g1 e1 ...: one fp32 rounding per product and per sum, the same bits in the
    spec and the torch op; another order or a fused sum gives other bits somewhere."""
    rng = np.random.default_rng(5)
    e = (rng.standard_normal((64, 3, 32)) * 100).astype(F32)
    g = rng.dirichlet(np.ones(3), 64).astype(F32)
    y = moe.combine(e, g)
    want = (g[:, 0, None] * e[:, 0]).astype(F32)
    want = (want + (g[:, 1, None] * e[:, 1]).astype(F32)).astype(F32)
    want = (want + (g[:, 2, None] * e[:, 2]).astype(F32)).astype(F32)
    assert y.tobytes() == want.tobytes()
    got = ops.moe_combine(torch.from_numpy(e), torch.from_numpy(g))
    assert got.numpy().tobytes() == y.tobytes()
    fused = np.einsum("tk,tkh->th", g.astype(np.float64), e.astype(np.float64)).astype(F32)
    rev = (g[:, 2, None] * e[:, 2] + g[:, 1, None] * e[:, 1] + g[:, 0, None] * e[:, 0]).astype(F32)
    assert not np.array_equal(fused, y) or not np.array_equal(rev, y)


# ---------------------------------------------------------------- the engine


def test_engine_equals_spec_and_the_routing_is_used(qm):
    ids = np.random.default_rng(3).integers(0, qm.cfg.vocab_size, 30)
    trace = {}
    spec = forward(qm, ids, KVCache(qm.cfg.num_layers), RopeTable(qm.cfg), trace)
    eng = ExactModel(qm).forward([SeqCache()], [ids.tolist()], all_logits=True)[0].numpy()
    assert np.array_equal(spec, eng)
    for l in range(qm.cfg.num_layers):  # the tiny model's router spreads tokens over experts
        sel = trace[f"layers.{l}.experts.sel"]
        assert sel.shape == (30, 2) and len(np.unique(sel)) == qm.cfg.num_experts
        assert len({tuple(s) for s in sel}) >= 3
    # the same weights under top-1: other logits (the second expert's share matters)
    k1 = replace(qm, cfg=replace(qm.cfg, experts_per_token=1))
    assert not np.array_equal(forward(k1, ids, KVCache(2), RopeTable(k1.cfg)), spec)


def test_engine_trace_carries_the_routing(qm):
    ids = np.random.default_rng(4).integers(0, qm.cfg.vocab_size, 12).tolist()
    spec_tr, eng_tr = {}, {}
    forward(qm, ids, KVCache(qm.cfg.num_layers), RopeTable(qm.cfg), spec_tr)
    ExactModel(qm).forward([SeqCache()], [ids], trace=eng_tr, all_logits=True)
    for l in range(qm.cfg.num_layers):
        for name in ("router.z", "gate_up.z", "down.z", "experts.sel", "experts.g"):
            a, b = spec_tr[f"layers.{l}.{name}"], eng_tr[f"layers.{l}.{name}"]
            b = b.numpy() if isinstance(b, torch.Tensor) else b
            assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), f"layer {l} {name}"


@pytest.mark.parametrize("chunk", [1, 4, 7])
def test_chunked_prefill_and_batches_are_invariant(qm, chunk):
    """A token's experts depend on its own logits alone (no capacity): chunked, batched with
    others or alone, greedy and sampled, the same tokens."""
    model = ExactModel(qm)
    rng = np.random.default_rng(chunk)
    prompts = [rng.integers(0, qm.cfg.vocab_size, n).tolist() for n in (3, 15, 8)]
    for params in (SamplingParams(), SamplingParams(0.9, 20, 0.9, 77)):
        batched = generate_exact(model, prompts, params, 10, eos_ids=())
        chunked = generate_exact(model, prompts, params, 10, eos_ids=(), prefill_chunk=chunk)
        alone = [generate_exact(model, [p], params, 10, eos_ids=())[0] for p in prompts]
        for r in (chunked, alone):
            assert [x.token_ids for x in r] == [x.token_ids for x in batched]


def test_opening_size_counts_the_selected_experts_only(qm):
    c = {"positions": [9, 20], "layers": [0, 1], "decode_positions": [], "kv_sample": {}}
    cfg = qm.cfg
    k1 = opening_bytes(c, replace(cfg, experts_per_token=1))
    k2 = opening_bytes(c, cfg)
    per_expert = 8 * (2 * cfg.intermediate_size + cfg.hidden_size)
    assert k2 - k1 == 2 * 2 * per_expert  # two positions, two layers, one more expert each
    assert opening_bytes(c, replace(cfg, num_experts=64)) - k2 == 2 * 2 * 8 * 60  # router rows


# ---------------------------------------------------------------- serving


def test_paged_continuous_batching_equals_alone_and_verifies(tmp_path):
    """The serving path (paged pool in blocks of 4, a shared-prefix cache, prompts split over
    steps, decode batches): every receipt is the bytes of its sequence run alone, and an
    opening of one verifies at the deep tier."""
    import json

    from commitllm.engine.batching import run_all
    from commitllm.engine.exact.paged import KVPool
    from commitllm.engine.loader import load_model
    from commitllm.engine.open import build_opening
    from commitllm.engine.prefix import PrefixCache
    from commitllm.engine.receipts import SeqRequest, sign_batch
    from commitllm.keys.keygen import build_key, key_tokenizer
    from commitllm.verifier import challenge as ch
    from commitllm.verifier.verify import verify
    from tinymodels import make_tiny_chat_model

    loaded = load_model(str(make_tiny_chat_model(tmp_path / "m", "mixtral")))
    qm = quantize_model(loaded.cfg, loaded.tensors, get_profile("w8a16"))
    model, tok = ExactModel(qm), loaded.tokenizer
    system = "be brief. "
    seqs = [SeqRequest({"prompt": system + q}, tok.encode(system + q),
                       SamplingParams(0.9, 20, 0.95, 7) if i % 2 else SamplingParams(), 5 + i,
                       f"n{i}", bytes([i]) * 16)
            for i, q in enumerate(["sky?", "the long question here", "x"])]
    alone = [json.dumps(sign_batch(model, tok, [s], (2,)).transcripts[0], sort_keys=True)
             for s in seqs]
    probe = KVPool(model.cfg, model.profile, 1 << 30, 4)
    pool = KVPool(model.cfg, model.profile, 60 * probe.block_bytes, 4)
    got = run_all(model, tok, (2,), seqs, [0, 0, 2], token_budget=7, max_seqs=4, pool=pool,
                  prefix=PrefixCache(pool))
    assert [json.dumps(f.transcript, sort_keys=True) for f in got] == alone
    key = build_key(qm, tok, secret=bytes(range(32)))
    cfg = qm.cfg  # a secret row, and its projection, per expert matrix
    projections = [n for n in key.arrays if ".experts." in n and n.endswith(".v")]
    assert len(projections) == cfg.num_layers * cfg.num_experts * 2  # gate_up and down
    assert all(f"layers.{l}.router.v" in key.arrays for l in range(cfg.num_layers))
    r = got[1].transcript["receipt"]
    c = ch.derive(key.secret, r, "deep", nonce=b"n" * 16)
    v = verify(key, r, c, *build_opening(model, got[1].transcript, c), key_tokenizer(key),
               io_binding=True)
    assert v.accepted, (v.reason, v.detail)
