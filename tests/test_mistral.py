"""Mistral's sliding-window attention, end to end: the config field, the spec's rule (a query at p
sees keys j with p - window < j <= p), the same bits in the numpy spec, the torch route, the
compiled core and the engine (tiles, chunks, batches), and openings that carry only the window's
K/V rows. (Triton: tests/kernels/test_attention_window.py; transformers agreement and the round
trip at every tier: the `mistral` kind of the parametrized tests; cheats:
tests/adversary/test_adv_mistral.py.)"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from commitllm.engine.exact import ops
from commitllm.engine.exact.model import ExactModel, SeqCache
from commitllm.engine.generate import generate_exact
from commitllm.engine.serve.audit import opening_bytes
from commitllm.verifier import native
from commitllm.verifier.checkpoint import load_checkpoint
from commitllm.verifier.commitment import commit_model
from commitllm.verifier.config import ConfigError, ModelConfig
from commitllm.verifier.native import attention as native_attn
from commitllm.verifier.numerics import attention as spec_attn
from commitllm.verifier.numerics import get_profile
from commitllm.verifier.numerics.forward import KVCache, forward
from commitllm.verifier.numerics.rope import RopeTable
from commitllm.verifier.numerics.sampler import SamplingParams
from commitllm.verifier.numerics.weights import quantize_model
from commitllm.verifier.opening import plan
from test_numerics_ops import QMAXES, _attn_inputs, _t, assert_same

WINDOWS = (1, 2, 5, 16, 300)


@pytest.fixture(scope="module")
def qm(tiny_mistral):
    cfg, t = load_checkpoint(tiny_mistral)
    return quantize_model(cfg, t, get_profile("w8a16"))


# ---------------------------------------------------------------- config


def _raw(**extra) -> dict:
    raw = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "vocab_size": 128,
           "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5,
           "rope_theta": 1e6, "max_position_embeddings": 256, "sliding_window": 4096}
    return raw | extra


def test_config_reads_the_window_and_writes_it_back(qm):
    cfg = ModelConfig.from_dict(_raw())
    assert cfg.family == "mistral" and cfg.sliding_window == 4096 and not cfg.attention_bias
    assert ModelConfig.from_dict(cfg.to_hf_dict()) == cfg
    assert ModelConfig.from_dict(_raw(sliding_window=None)).sliding_window is None  # v0.2 on
    assert qm.cfg.sliding_window == 5


@pytest.mark.parametrize("bad", [0, -3, True, 4.5, "8", 2**31])
def test_bad_windows_refused(bad):
    with pytest.raises(ConfigError, match="sliding_window"):
        ModelConfig.from_dict(_raw(sliding_window=bad))


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen3ForCausalLM"])
def test_other_families_still_refuse_a_window(arch):
    raw = _raw(architectures=[arch], model_type=arch[:5].lower(), use_sliding_window=True)
    with pytest.raises(ConfigError, match="sliding"):
        ModelConfig.from_dict(raw)
    with pytest.raises(ConfigError, match="sliding_window"):  # not even through the dataclass
        replace(ModelConfig.from_dict(_raw(sliding_window=None, architectures=[arch])),
                sliding_window=8)


def test_the_window_is_committed(qm):
    """The model commitment covers the window: the same weights without it are another model."""
    other = replace(qm, cfg=replace(qm.cfg, sliding_window=None))
    assert commit_model(qm)["commitment"] != commit_model(other)["commitment"]


# ---------------------------------------------------------------- the rule, in every route


def _case(qmax, t, s, seed, nh=6, nkv=2, d=24):
    x = _attn_inputs(qmax, t, s, nh, nkv, d, seed=seed, spread=4.0)
    return x, np.arange(s - t, s, dtype=np.int64)


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("qmax", QMAXES)
def test_spec_window_is_attention_over_the_window_alone(qmax, window):
    """Row by row, the windowed spec equals plain causal attention over keys lo..p only: hidden
    keys add exact zeros, so the rule is a mask and nothing else."""
    (q, sq, k, sk, v, sv), pos = _case(qmax, 9, 40, window)
    got = spec_attn.attention(q, sq, k, sk, v, sv, pos, qmax, window=window)
    for t, p in enumerate(pos):
        lo = max(0, p - window + 1)
        want = spec_attn.attention(q[t:t + 1], sq[t:t + 1], k[lo:p + 1], sk[lo:p + 1],
                                   v[lo:p + 1], sv[lo:p + 1], np.array([p - lo]), qmax)
        assert_same(got[t:t + 1], want, f"row {t} window {window}")
    full = spec_attn.attention(q, sq, k, sk, v, sv, pos, qmax)
    assert np.array_equal(got, full) == (window >= 40)


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("qmax", QMAXES)
def test_torch_route_equals_spec_traced_tiled_and_compiled(qmax, window, monkeypatch):
    (q, sq, k, sk, v, sv), pos = _case(qmax, 37, 50, 100 + window)
    parts_np, parts_t = {}, {}
    want = spec_attn.attention(q, sq, k, sk, v, sv, pos, qmax, parts_np, window=window)
    args = [_t(a) for a in (q, sq, k, sk, v, sv, pos)]
    got = ops.attention(*args, qmax, parts_t, window=window)
    assert_same(got, want, "traced")
    for name in ("scores", "logits", "weights", "z"):
        assert_same(parts_t[name], parts_np[name], f"trace {name}")
    monkeypatch.setattr(ops, "NATIVE", False)
    for tile in (1, 300, 1 << 21):
        assert_same(ops.attention(*args, qmax, tile_elems=tile, window=window), want,
                    f"torch tile {tile}")
    monkeypatch.setattr(ops, "NATIVE", True)
    monkeypatch.setattr(ops, "NATIVE_MIN_SCORES", 0)
    if ops.use_native():
        assert_same(ops.attention(*args, qmax, window=window), want, "compiled core")


@pytest.mark.parametrize("window", (1, 3, 64))
def test_decode_batch_equals_each_sequence(window):
    qmax, nh, nkv, d, lengths = 32639, 6, 2, 24, [1, 5, 300, 64, 2]
    seqs = [_attn_inputs(qmax, 1, s, nh, nkv, d, seed=i, spread=4.0)
            for i, s in enumerate(lengths)]
    got = ops.attention_batch(torch.cat([_t(x[0]) for x in seqs]),
                              torch.cat([_t(x[1]) for x in seqs]),
                              *([_t(x[j]) for x in seqs] for j in (2, 3, 4, 5)),
                              torch.tensor([s - 1 for s in lengths]), qmax, window)
    for b, (x, s) in enumerate(zip(seqs, lengths)):
        want = spec_attn.attention(*x, np.array([s - 1]), qmax, window=window)
        assert_same(got[b:b + 1], want, f"batched row {b}")


@pytest.mark.skipif(native.lib() is None, reason=f"no compiled core: {native.error()}")
@pytest.mark.parametrize("window", WINDOWS)
def test_compiled_core_every_route_equals_spec(window):
    (q, sq, k, sk, v, sv), pos = _case(32639, 21, 80, 7 * window)
    want = spec_attn.attention(q, sq, k, sk, v, sv, pos, 32639, window=window)
    try:
        for r in range(native.best_route() + 1):
            assert native.use_route(r) == r
            got = native_attn.attention(q, sq, k, sk, v, sv, pos, 32639, window=window)
            assert_same(got, want, f"route {r}")
    finally:
        native.use_route(-1)


def test_compiled_core_refuses_a_bad_window_array():
    (q, sq, k, sk, v, sv), pos = _case(127, 2, 8, 0)
    from commitllm.verifier.native.attention import _full_table
    table, cut = _full_table()
    if native.lib() is None:
        pytest.skip("no compiled core")
    args = (np.ascontiguousarray(q.transpose(1, 0, 2)).reshape(-1, q.shape[2]),
            np.ascontiguousarray(sq.T).reshape(-1), native.pack_keys(k[None]),
            np.ascontiguousarray(sk.T), native.pack_values(v[None]), np.ascontiguousarray(sv.T),
            np.full(12, 8, np.int64), 6, 24, 1.0, 256.0, table, cut)
    with pytest.raises(ValueError, match="inconsistent"):
        native.attn_fused(*args, nlo=np.zeros(3, np.int64))


# ---------------------------------------------------------------- the engine


def test_engine_equals_spec_and_the_window_matters(qm):
    ids = np.random.default_rng(3).integers(0, qm.cfg.vocab_size, 30)
    spec = forward(qm, ids, KVCache(qm.cfg.num_layers), RopeTable(qm.cfg))
    eng = ExactModel(qm).forward([SeqCache()], [ids.tolist()], all_logits=True)[0].numpy()
    assert np.array_equal(spec, eng)
    wide = replace(qm, cfg=replace(qm.cfg, sliding_window=None))
    causal = forward(wide, ids, KVCache(qm.cfg.num_layers), RopeTable(wide.cfg))
    assert np.array_equal(causal[:5], spec[:5])  # the first 5 positions see every key anyway
    assert not np.array_equal(causal[5:], spec[5:])


@pytest.mark.parametrize("chunk", [1, 3, 5, 8])
def test_chunked_prefill_and_batches_are_invariant(qm, chunk):
    """Chunks shorter than, equal to and longer than the window, alone or batched with others,
    greedy and sampled: the same tokens."""
    model = ExactModel(qm)
    rng = np.random.default_rng(chunk)
    prompts = [rng.integers(0, qm.cfg.vocab_size, n).tolist() for n in (3, 17, 9)]
    for params in (SamplingParams(), SamplingParams(0.9, 20, 0.9, 77)):
        batched = generate_exact(model, prompts, params, 14, eos_ids=())
        chunked = generate_exact(model, prompts, params, 14, eos_ids=(), prefill_chunk=chunk)
        alone = [generate_exact(model, [p], params, 14, eos_ids=())[0] for p in prompts]
        for r in (chunked, alone):
            assert [x.token_ids for x in r] == [x.token_ids for x in batched]


# ---------------------------------------------------------------- openings follow the window


def _challenge(positions, sample=(), layers=(0, 1)):
    return {"positions": list(positions), "layers": list(layers), "decode_positions": [],
            "kv_sample": {str(l): list(sample) for l in layers}}


def test_plan_opens_only_the_windows_rows(qm):
    c = _challenge([20, 25], sample=[2, 21])
    p = plan(c, 2, window=5)
    assert p.kv[0] == [2] + list(range(16, 26))  # 20's window starts at 16; sample row 2 kept
    assert plan(c, 2).kv[0] == list(range(26))  # causal: every row up to the horizon
    assert plan(_challenge([3]), 2, window=5).kv[1] == [0, 1, 2, 3]
    far = _challenge([200])
    assert len(plan(far, 2, window=5).kv[0]) == 5
    cfg = qm.cfg
    assert opening_bytes(far, cfg) < opening_bytes(far, replace(cfg, sliding_window=None))


# ---------------------------------------------------------------- serving


def test_paged_continuous_batching_equals_alone_and_verifies(tmp_path):
    """The serving path (paged pool in blocks of 4 < the window, a shared-prefix cache, prompts
    split over steps, decode batches): every receipt is the bytes of its sequence run alone,
    and an opening of one verifies at the deep tier."""
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

    loaded = load_model(str(make_tiny_chat_model(tmp_path / "m", "mistral")))
    qm = quantize_model(loaded.cfg, loaded.tensors, get_profile("w8a16"))
    model, tok = ExactModel(qm), loaded.tokenizer
    system = "be brief. "
    seqs = [SeqRequest({"prompt": system + q}, tok.encode(system + q),
                       SamplingParams(0.9, 20, 0.95, 7) if i % 2 else SamplingParams(), 6 + i,
                       f"n{i}", bytes([i]) * 16)
            for i, q in enumerate(["sky?", "the long question here", "x", "sky?"])]
    alone = [json.dumps(sign_batch(model, tok, [s], (2,)).transcripts[0], sort_keys=True)
             for s in seqs]
    probe = KVPool(model.cfg, model.profile, 1 << 30, 4)
    pool = KVPool(model.cfg, model.profile, 60 * probe.block_bytes, 4)
    got = run_all(model, tok, (2,), seqs, [0, 0, 2, 9], token_budget=7, max_seqs=4, pool=pool,
                  prefix=PrefixCache(pool))
    assert [json.dumps(f.transcript, sort_keys=True) for f in got] == alone
    key = build_key(qm, tok, secret=bytes(range(32)))
    r = got[1].transcript["receipt"]
    assert r["manifest"]["attention"] == {"window": 5}
    c = ch.derive(key.secret, r, "deep", nonce=b"n" * 16)
    v = verify(key, r, c, *build_opening(model, got[1].transcript, c), key_tokenizer(key),
               io_binding=True)
    assert v.accepted, (v.reason, v.detail)
