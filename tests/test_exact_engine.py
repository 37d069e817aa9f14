"""The torch exact engine equals the numpy spec value by value, and is invariant to how the work
is batched or chunked. Every comparison is `np.array_equal`: a tolerance here would be a bug."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from commitllm.engine.exact.model import ExactModel, SeqCache
from commitllm.engine.generate import generate_exact
from commitllm.verifier.checkpoint import load_checkpoint
from commitllm.verifier.numerics import PROFILES, get_profile
from commitllm.verifier.numerics.forward import KVCache, forward
from commitllm.verifier.numerics.rope import RopeTable
from commitllm.verifier.numerics.sampler import SamplingParams, sample
from commitllm.verifier.numerics.weights import quantize_model


def _np(v):
    return v.numpy() if isinstance(v, torch.Tensor) else np.asarray(v)


def assert_same_trace(spec: dict, eng: dict) -> None:
    """Every spec intermediate exists in the engine trace with identical dtype-free values."""
    assert set(spec) == set(eng), set(spec) ^ set(eng)
    for name in sorted(spec):
        a, b = _np(spec[name]), _np(eng[name])
        assert a.shape == b.shape, f"{name}: shape {a.shape} vs {b.shape}"
        if not np.array_equal(a, b):
            bad = np.argwhere(a != b)
            i = tuple(bad[0])
            raise AssertionError(f"{name}: {len(bad)} values differ, first at {i}: "
                                 f"spec {a[i]!r} engine {b[i]!r}")


def _quantized(folder: Path, profile: str):
    cfg, tensors = load_checkpoint(folder)
    return quantize_model(cfg, tensors, get_profile(profile))


@pytest.mark.parametrize("profile", sorted(PROFILES))
@pytest.mark.parametrize("gemm_rows", ["int_mm planes", "every size"])
def test_tiny_models_equal_spec(tiny_checkpoint, profile, gemm_rows, monkeypatch):
    """The traced forward (what an opening commits) equals the spec on every intermediate, with
    the linears' accumulators from _int_mm planes beyond decode-step sizes or, at every size,
    the compiled GEMM (which route prefills take is measured per machine: native_gemm_wins)."""
    from commitllm.engine.exact import gemm
    monkeypatch.setattr(gemm, "native_gemm_wins", lambda: gemm_rows == "every size")
    qm = _quantized(tiny_checkpoint, profile)
    ids = np.random.default_rng(5).integers(0, qm.cfg.vocab_size, 57)
    spec_tr, eng_tr = {}, {}
    spec_logits = forward(qm, ids, KVCache(qm.cfg.num_layers), RopeTable(qm.cfg), spec_tr)
    eng_logits = ExactModel(qm).forward([SeqCache()], [ids.tolist()], eng_tr, all_logits=True)[0]
    assert_same_trace(spec_tr, eng_tr)
    assert np.array_equal(spec_logits, eng_logits.numpy())


@pytest.mark.parametrize("profile", sorted(PROFILES))
@pytest.mark.parametrize("route", ["compiled", "small-row gemm", "torch"])
def test_untraced_forward_equals_spec_on_either_route(tiny_checkpoint, profile, route,
                                                      monkeypatch):
    """What serving runs (no trace): the compiled core's linears (plane products recombined and
    dequantized in one C pass, or the small-row GEMM of decode steps) and attention, forced at
    every size, or the torch route: the spec's logits at every position, for a prefill and two
    decode steps."""
    from commitllm.engine.exact import gemm, model as model_mod, ops
    from commitllm.verifier import native
    if route != "torch":
        if native.lib() is None:
            pytest.skip(f"no compiled core: {native.error()}")
        monkeypatch.setattr(ops, "NATIVE_MIN_SCORES", 0)
    if route == "compiled":  # plane products from _int_mm, recombined and dequantized in C
        monkeypatch.setattr(model_mod, "FUSED_MIN_ROWS", 0)
        monkeypatch.setattr(gemm, "native_gemm_wins", lambda: False)
    elif route == "small-row gemm":  # gemm.c at every size (prefills where it is faster)
        monkeypatch.setattr(model_mod, "FUSED_MIN_ROWS", 0)
        monkeypatch.setattr(gemm, "native_gemm_wins", lambda: True)
    else:
        monkeypatch.setattr(ops, "NATIVE", False)
    qm = _quantized(tiny_checkpoint, profile)
    ids = np.random.default_rng(8).integers(0, qm.cfg.vocab_size, 41).tolist()
    spec_cache, rope = KVCache(qm.cfg.num_layers), RopeTable(qm.cfg)
    want = forward(qm, np.array(ids), spec_cache, rope)
    eng, cache = ExactModel(qm), SeqCache()
    got = eng.forward([cache], [ids], all_logits=True)[0]
    assert np.array_equal(want, got.numpy())
    for tok in (3, 11):
        want = forward(qm, np.array([tok]), spec_cache, rope)
        assert np.array_equal(want[-1], eng.forward([cache], [[tok]])[0].numpy().reshape(-1))


def test_decode_steps_equal_spec(tiny_qwen2):
    """After a prefill, each decode step's trace equals the spec run over the same cache."""
    qm = _quantized(tiny_qwen2, "w8a16")
    ids = np.random.default_rng(6).integers(0, qm.cfg.vocab_size, 30).tolist()
    eng, cache = ExactModel(qm), SeqCache()
    spec_cache, rope = KVCache(qm.cfg.num_layers), RopeTable(qm.cfg)
    eng.forward([cache], [ids[:20]])
    forward(qm, ids[:20], spec_cache, rope)
    for tok in ids[20:]:
        spec_tr, eng_tr = {}, {}
        a = forward(qm, [tok], spec_cache, rope, spec_tr)
        b = eng.forward([cache], [[tok]], eng_tr, all_logits=True)[0]
        assert_same_trace(spec_tr, eng_tr)
        assert np.array_equal(a, b.numpy())


@pytest.fixture(scope="module")
def smol_quantized(smollm2):
    return smollm2.quantized(get_profile("w8a16"))


def _real_text_ids(smollm2, n: int) -> list[int]:
    text = Path(__file__).read_text() + Path(np.__file__).read_text()
    return smollm2.tokenizer.encode(text, add_special_tokens=False)[:n]


def test_smollm2_every_intermediate_equals_spec(smollm2, smol_quantized):
    """Real model, several hundred positions, every per-layer value and the logits."""
    ids = _real_text_ids(smollm2, 320)
    assert len(ids) == 320
    spec_tr, eng_tr = {}, {}
    qm = smol_quantized
    spec_logits = forward(qm, ids, KVCache(qm.cfg.num_layers), RopeTable(qm.cfg), spec_tr)
    eng_logits = ExactModel(qm).forward([SeqCache()], [ids], eng_tr, all_logits=True)[0]
    assert_same_trace(spec_tr, eng_tr)
    assert np.array_equal(spec_logits, eng_logits.numpy())


# --- invariance -------------------------------------------------------------------------------


def _cache_arrays(cache: SeqCache) -> list[np.ndarray]:
    return [t.numpy() for store in (cache.k, cache.sk, cache.v, cache.sv) for t in store]


def _assert_same_cache(a: SeqCache, b: SeqCache) -> None:
    assert a.length == b.length
    for x, y in zip(_cache_arrays(a), _cache_arrays(b), strict=True):
        assert np.array_equal(x, y)


def _run(model: ExactModel, chunks: list[list[int]]) -> tuple[SeqCache, np.ndarray, list]:
    """Feed `chunks` one forward each; returns the cache, all logits, and per-layer residuals."""
    cache, logits, resid = SeqCache(), [], []
    for ch in chunks:
        tr = {}
        logits.append(model.forward([cache], [ch], tr, all_logits=True)[0].numpy())
        resid.append(np.stack([tr[f"layers.{i}.x"].numpy() for i in range(model.cfg.num_layers)]
                              + [tr["final_in"].numpy()], axis=0))
    return cache, np.concatenate(logits), np.concatenate(resid, axis=1)


@pytest.mark.parametrize("chunking", ["token_by_token", "chunks_of_7", "chunks_of_16"])
def test_prefill_decode_and_chunking_invariance(tiny_llama_tied_scaled, chunking):
    model = ExactModel(_quantized(tiny_llama_tied_scaled, "w8a16"))
    ids = np.random.default_rng(7).integers(0, model.cfg.vocab_size, 45).tolist()
    whole_cache, whole_logits, whole_resid = _run(model, [ids])
    step = {"token_by_token": 1, "chunks_of_7": 7, "chunks_of_16": 16}[chunking]
    cache, logits, resid = _run(model, [ids[i:i + step] for i in range(0, len(ids), step)])
    _assert_same_cache(whole_cache, cache)
    assert np.array_equal(whole_logits, logits)
    assert np.array_equal(whole_resid, resid)


def test_batch_composition_invariance(tiny_qwen2):
    """A sequence's K/V rows, residuals and logits are the same alone or batched with others."""
    model = ExactModel(_quantized(tiny_qwen2, "w8a16"))
    rng = np.random.default_rng(8)
    target = rng.integers(0, model.cfg.vocab_size, 23).tolist()
    others = [rng.integers(0, model.cfg.vocab_size, n).tolist() for n in (5, 40, 1)]
    alone, alone_logits, alone_resid = _run(model, [target])
    caches = [SeqCache() for _ in range(4)]
    tr = {}
    batch = [others[0], target, others[1], others[2]]
    out = model.forward(caches, batch, tr, all_logits=True)
    _assert_same_cache(alone, caches[1])
    assert np.array_equal(alone_logits, out[1].numpy())
    start = len(others[0])
    for i in range(model.cfg.num_layers):
        got = tr[f"layers.{i}.x"].numpy()[start:start + len(target)]
        assert np.array_equal(alone_resid[i], got)


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(0.9, 20, 0.9, 1234)],
                         ids=["greedy", "sampled"])
def test_generation_is_deterministic_and_batch_invariant(tiny_llama, params):
    model = ExactModel(_quantized(tiny_llama, "w8a16"))
    rng = np.random.default_rng(9)
    prompts = [rng.integers(0, model.cfg.vocab_size, n).tolist() for n in (3, 11, 6)]
    batched = generate_exact(model, prompts, params, 25, eos_ids=())
    again = generate_exact(model, prompts, params, 25, eos_ids=())
    chunked = generate_exact(model, prompts, params, 25, eos_ids=(), prefill_chunk=4)
    alone = [generate_exact(model, [p], params, 25, eos_ids=())[0] for p in prompts]
    for r in (again, chunked, alone):
        assert [x.token_ids for x in r] == [x.token_ids for x in batched]
    assert all(len(x.token_ids) == 25 for x in batched)


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(1.1, 0, 0.95, 77)],
                         ids=["greedy", "sampled"])
def test_generation_equals_spec_decode(tiny_odd, params):
    """Token ids from the engine equal a plain loop over the numpy spec and spec sampler."""
    qm = _quantized(tiny_odd, "w8a16")
    prompt = [5, 17, 3, 99, 42]
    got = generate_exact(ExactModel(qm), [prompt], params, 20, eos_ids=())[0].token_ids
    cache, rope, seq, want = KVCache(qm.cfg.num_layers), RopeTable(qm.cfg), list(prompt), []
    logits = forward(qm, seq, cache, rope, logits_for="last")
    for _ in range(20):
        tok = sample(logits[-1], params, len(seq))
        want.append(tok)
        seq.append(tok)
        logits = forward(qm, [tok], cache, rope, logits_for="last")
    assert got == want


def test_eos_stops_and_is_included(tiny_llama):
    model = ExactModel(_quantized(tiny_llama, "w8a16"))
    free = generate_exact(model, [[1, 2, 3]], SamplingParams(), 12, eos_ids=())[0].token_ids
    eos = free[4]
    first = free.index(eos)
    res = generate_exact(model, [[1, 2, 3]], SamplingParams(), 12, eos_ids=(eos,))[0]
    assert res.token_ids == free[:first + 1] and res.finish_reason == "eos"


def test_request_checks(tiny_llama):
    model = ExactModel(_quantized(tiny_llama, "w8a16"))
    with pytest.raises(ValueError, match="empty"):
        generate_exact(model, [[]], SamplingParams(), 3, ())
    with pytest.raises(ValueError, match="outside"):
        generate_exact(model, [[1, 10_000]], SamplingParams(), 3, ())
    with pytest.raises(ValueError, match="context length"):
        generate_exact(model, [[1] * 250], SamplingParams(), 10, ())


@pytest.mark.parametrize("tile", [1, 50, 1 << 30])
def test_attention_tile_size_does_not_change_a_bit(tiny_llama, monkeypatch, tile):
    """Untraced prefill runs attention in query tiles (TILE_ELEMS): one row per tile, a few rows
    and one tile give the same logits and K/V rows, batched decode steps included."""
    from commitllm.engine.exact import ops

    model = ExactModel(_quantized(tiny_llama, "a8"))
    rng = np.random.default_rng(11)
    prompts = [rng.integers(0, model.cfg.vocab_size, n).tolist() for n in (29, 3, 17)]

    def run():
        caches = [SeqCache() for _ in prompts]
        out = [x.numpy() for x in model.forward(caches, prompts, all_logits=True)]
        for step in range(3):
            out += [x.numpy() for x in model.forward(caches, [[5 + step]] * len(prompts))]
        return out, caches

    want, want_caches = run()
    monkeypatch.setattr(ops, "TILE_ELEMS", tile)
    got, caches = run()
    for a, b in zip(want, got, strict=True):
        assert np.array_equal(a, b)
    for a, b in zip(want_caches, caches, strict=True):
        _assert_same_cache(a, b)


def test_cache_growth_keeps_rows_and_earlier_views():
    """Rows appended in chunks equal their concatenation; growing the buffers leaves a view taken
    earlier unchanged (an opening may hold one)."""
    cache, rng, chunks = SeqCache(), np.random.default_rng(2), [3, 1, 1, 20, 1, 40]
    parts = [[torch.from_numpy(rng.integers(-9, 9, (n, 2, 4)).astype(np.int16)),
              torch.from_numpy(rng.random((n, 2)).astype(np.float32))] for n in chunks]
    early = None
    for i, (k, s) in enumerate(parts):
        for layer in (0, 1):
            cache.append(layer, k + layer, s, k - layer, s * 2)
        if i == 2:
            early = cache.k[1].clone(), cache.k[1]
    want_k = torch.cat([k for k, _ in parts])
    for layer in (0, 1):
        assert torch.equal(cache.k[layer], want_k + layer)
        assert torch.equal(cache.v[layer], want_k - layer)
        assert torch.equal(cache.sv[layer], torch.cat([s for _, s in parts]) * 2)
    assert torch.equal(early[0], early[1])


def test_teacher_forced_scores_equal_whole_logits(tiny_llama):
    """`score`'s chunked path (one chunk of logits in memory) gives the argmax and log-probs of
    the whole [T, V] logits, bit for bit, for chunk sizes that do and do not divide T."""
    from commitllm.engine.generate import teacher_forced, teacher_forced_scores
    from commitllm.engine.runner import score_logits

    model = ExactModel(_quantized(tiny_llama, "w8a16"))
    ids = np.random.default_rng(5).integers(0, model.cfg.vocab_size, 41).tolist()
    want = score_logits(ids, teacher_forced(model, ids))
    for chunk in (1, 8, 41, 64):
        top, lp = teacher_forced_scores(model, ids, chunk)
        assert top.tolist() == want["argmax"]
        assert np.array_equal(lp, np.array(want["logprobs"]))
