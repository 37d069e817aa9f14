"""The benchmark scripts stay runnable: their metric formulas on hand-computed cases, and their
pipelines end to end on a tiny random checkpoint (a few tokens, a few seconds).

The approx/allclose here compare benchmark statistics (KL, perplexity, CPU shares: float64 sums
and ratios computed in a different order than the hand formula), never a committed value; the
exact path is tested with `==` in test_exact_engine.py and test_numerics_*.py."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.append(str(Path(__file__).resolve().parents[1]))  # `bench` (last: kernels/ must not shadow)

from bench import accuracy, common, generate

# ---- common ---------------------------------------------------------------------------------

def test_time_runs_warmup_median_spread():
    ticks = iter([0.0, 1.0, 10.0, 13.0, 20.0, 22.0])  # timed runs of 1, 3 and 2 s
    calls = []
    timing, outs = common.time_runs(lambda i: calls.append(i) or i * 10, runs=3, warmup=2,
                                    clock=lambda: next(ticks))
    assert calls == [-1, -2, 0, 1, 2]  # two warm-ups (untimed), then the timed runs
    assert outs == [0, 10, 20]
    assert timing.runs == (1.0, 3.0, 2.0)
    assert timing.median == 2.0 and timing.spread == 1.0  # (3 - 1) / 2
    assert timing.to_dict()["min"] == 1.0 and timing.to_dict()["max"] == 3.0
    with pytest.raises(ValueError):
        common.time_runs(lambda i: None, runs=0)


def test_timing_counts_other_processes_cpu():
    # probe: (own CPU s, machine busy s). Run 0: own +1, machine +3 -> others 2; run 1: own +2,
    # machine +2 -> others 0.
    probes = iter([(0.0, 10.0), (1.0, 13.0), (1.0, 13.0), (3.0, 15.0)])
    ticks = iter([0.0, 2.0, 2.0, 4.0])
    timing, _ = common.time_runs(lambda i: None, runs=2, warmup=0, clock=lambda: next(ticks),
                                 probe=lambda: next(probes))
    assert timing.cpu == (1.0, 2.0) and timing.foreign == (2.0, 0.0)
    cores = __import__("os").cpu_count()
    assert timing.contention == pytest.approx(2.0 / (4.0 * cores))
    unknown, _ = common.time_runs(lambda i: None, runs=1, warmup=0, probe=lambda: (0.0, None))
    assert unknown.foreign == (None,) and unknown.contention is None


def test_wait_for_quiet():
    shares = iter([0.9, 0.5, 0.05, 0.0])
    assert common.wait_for_quiet(0.1, 100, share=lambda s: next(shares), clock=lambda: 0.0) == 0.05
    busy = iter([0.9, 0.8, 0.7])
    ticks = iter([0.0, 5.0, 11.0])  # deadline 10: gives up after the second sample
    assert common.wait_for_quiet(0.1, 10, share=lambda s: next(busy),
                                 clock=lambda: next(ticks)) == 0.8
    probes = iter([(1.0, 100.0), (1.5, 101.5)])  # others used 1 CPU-s of 2 s on every core
    share = common.others_share(2.0, probe=lambda: next(probes), sleep=lambda s: None)
    assert share == pytest.approx(1.0 / (2.0 * __import__("os").cpu_count()))


def test_time_interleaved_alternates():
    calls = []
    fns = {"a": lambda i: calls.append(("a", i)), "b": lambda i: calls.append(("b", i))}
    out = common.time_interleaved(fns, runs=2, warmup=1)
    assert calls == [("a", -1), ("b", -1), ("a", 0), ("b", 0), ("a", 1), ("b", 1)]
    assert set(out) == {"a", "b"} and all(len(t.runs) == 2 for t, _ in out.values())


def test_time_interleaved_repeats_disturbed_runs():
    # probe (own CPU, machine busy): others use 1.0 CPU-s in a's first attempt, then nothing
    busy = iter([0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    calls = []
    fns = {"a": lambda i: calls.append(("a", i)), "b": lambda i: calls.append(("b", i))}
    out = common.time_interleaved(fns, runs=1, warmup=0, probe=lambda: (0.0, next(busy)),
                                  accept=lambda wall, foreign: foreign == 0.0, retries=2)
    assert calls == [("a", 0), ("a", 0), ("b", 0)]  # a's disturbed run was repeated
    assert out["a"][0].discarded == 1 and out["b"][0].discarded == 0
    assert out["a"][0].foreign == (0.0,)
    always_busy = common.time_interleaved({"a": lambda i: None}, runs=1, warmup=0,
                                          accept=lambda wall, foreign: False, retries=2)
    assert always_busy["a"][0].discarded == 2  # gives up after the retries, keeps the last


def test_write_results_atomic_and_provenance(tmp_path):
    prov = common.provenance()
    assert {"date", "machine", "git", "packages"} <= prov.keys()
    assert prov["machine"]["cores"] >= 1 and prov["packages"]["numpy"]
    js, md = common.write_results(tmp_path / "out", "x", {"a": 1, "p": prov},
                                  "# t\n\n" + common.provenance_md(prov))
    assert json.loads(js.read_text())["a"] == 1
    assert md.read_text().startswith("# t") and "- commit:" in md.read_text()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["x.json", "x.md"]  # no temps
    assert common.md_table(["a", "b"], [[1, "x"]]) == "| a | b |\n|---|---|\n| 1 | x |"


# ---- accuracy metrics -----------------------------------------------------------------------

def test_compare_hand_computed():
    # V = 2, T = 3 (2 predicted positions). Position 0: ref p = (3/4, 1/4), variant p = (1/2, 1/2),
    # same argmax by the lowest-id tie rule; position 1: ref (1/2, 1/2) -> argmax 0, variant
    # p = (1/4, 3/4) -> argmax 1. Position 2 has no next token and is not counted.
    ids = [0, 1, 0]
    ref = np.array([[math.log(3), 0.0], [0.0, 0.0], [5.0, 0.0]], dtype=np.float32)
    var = np.array([[0.0, 0.0], [0.0, math.log(3)], [0.0, 5.0]], dtype=np.float32)
    t = accuracy.compare(ids, ref, var)
    kl0 = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    kl1 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert t.n == 2 and t.agree == 1 and t.agreement == 50.0
    # fp32 logits of log(3) carry ~1e-7 relative error into the float64 log-softmax
    assert t.mean_kl == pytest.approx((kl0 + kl1) / 2, abs=1e-6)
    nll = -math.log(0.5) - math.log(0.25)  # true next tokens: 1 at position 0, 0 at position 1
    assert t.perplexity == pytest.approx(math.exp(nll / 2), rel=1e-6)
    self_t = accuracy.compare(ids, ref, ref)
    assert self_t.agree == 2 and self_t.kl == 0.0


def test_compare_chunks_and_tally_sum():
    """Row chunking and Tally addition give the same sums as one pass over all rows."""
    rng = np.random.default_rng(0)
    t_len, v = accuracy.ROW_CHUNK * 2 + 7, 11
    ref = rng.normal(size=(t_len, v)).astype(np.float32)
    var = ref + 0.3 * rng.normal(size=(t_len, v)).astype(np.float32)
    ids = rng.integers(0, v, t_len).tolist()
    t = accuracy.compare(ids, ref, var)
    lr, lv = accuracy.log_softmax64(ref[:-1]), accuracy.log_softmax64(var[:-1])
    assert t.n == t_len - 1
    assert t.agree == int(np.sum(ref[:-1].argmax(-1) == var[:-1].argmax(-1)))
    assert t.kl == pytest.approx(float(np.sum(np.exp(lr) * (lr - lv))), rel=1e-12)
    assert t.nll == pytest.approx(float(-lv[np.arange(t_len - 1), ids[1:]].sum()), rel=1e-12)
    total = accuracy.Tally()
    total += t
    total += t
    assert total.n == 2 * t.n and total.mean_kl == pytest.approx(t.mean_kl)
    with pytest.raises(ValueError):
        accuracy.compare(ids[:-1], ref, var)


def test_log_softmax64_is_normalized_and_shift_invariant():
    x = np.array([[1000.0, 0.0, -1000.0], [1.0, 2.0, 3.0]], dtype=np.float32)
    lp = accuracy.log_softmax64(x)
    assert lp.dtype == np.float64
    assert np.allclose(np.exp(lp).sum(-1), 1.0, rtol=0, atol=1e-15)  # float64 rounding only
    assert np.allclose(accuracy.log_softmax64(x + 7), lp, rtol=0, atol=1e-12)


def test_text_windows():
    ids = list(range(10))
    assert accuracy.text_windows(ids, 8, 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert accuracy.text_windows(ids, 9, 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]  # short tail dropped
    with pytest.raises(ValueError):
        accuracy.text_windows(ids, 11, 4)
    with pytest.raises(ValueError):
        accuracy.text_windows(ids, 3, 4)


def _tally(agree_pct: float, kl: float, ppl: float, n: int = 1000) -> accuracy.Tally:
    return accuracy.Tally(n=n, agree=round(agree_pct * n / 100), kl=kl * n,
                          nll=math.log(ppl) * n)


def test_check_bars():
    bf16 = _tally(97.0, 0.002, 20.0)
    good = {"bf16": bf16, "w16a16": _tally(99.0, 1e-4, 20.0), "w8a16": _tally(95.6, 0.005, 20.1)}
    assert [b.ok for b in accuracy.check_bars(good)] == [True] * 4
    bad = {"bf16": bf16, "w16a16": _tally(96.9, 1e-4, 20.0), "w8a16": _tally(95.4, 0.011, 19.7)}
    bars = accuracy.check_bars(bad)
    assert [b.ok for b in bars] == [False] * 4
    assert bars[3].value == pytest.approx(1.5)  # |19.7 / 20 - 1| in percent


# ---- pipelines on a tiny random checkpoint -------------------------------------------------

def test_accuracy_evaluate_tiny(tiny_llama):
    from commitllm.engine.exact.model import ExactModel
    from commitllm.engine.reference import ReferenceModel
    from commitllm.verifier.checkpoint import load_checkpoint
    from commitllm.verifier.numerics import get_profile
    from commitllm.verifier.numerics.weights import quantize_model

    cfg, tensors = load_checkpoint(tiny_llama)
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, 48).tolist()
    windows = accuracy.text_windows(ids, 48, 24)
    variants = {
        "reference": lambda: accuracy.reference_logits(ReferenceModel(cfg, tensors)),
        "w16a16": lambda: accuracy.exact_logits(
            ExactModel(quantize_model(cfg, tensors, get_profile("w16a16"))), chunk=10),
    }
    res = accuracy.evaluate(windows, accuracy.hf_logits(accuracy.load_hf(tiny_llama, "float32")),
                            variants)
    by = {r.name: r.tally for r in res}
    assert list(by) == ["fp32", "reference", "w16a16"]
    assert by["fp32"].n == 46 and by["fp32"].agreement == 100.0 and by["fp32"].kl == 0.0
    # the engine's fp32 reference matches transformers to ~1e-5 in the logits
    assert by["reference"].agreement == 100.0 and by["reference"].mean_kl < 1e-8
    # 16-bit weights and activations: logits within ~1e-3 of fp32 on this model
    assert by["w16a16"].mean_kl < 1e-3
    assert by["w16a16"].perplexity == pytest.approx(by["fp32"].perplexity, rel=1e-2)


def test_linear_params_counts_every_linear(tiny_llama):
    import torch
    from commitllm.verifier.checkpoint import load_checkpoint

    cfg, _ = load_checkpoint(tiny_llama)
    hf = accuracy.load_hf(tiny_llama, "float32")
    n = sum(m.weight.numel() for m in hf.modules() if isinstance(m, torch.nn.Linear))
    assert generate.linear_params(cfg) == n


def test_left_pad():
    ids, mask = generate.left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_summarize_formulas():
    timing = {"median": 2.0, "min": 1.6, "max": 4.0, "runs": [1.6, 2.0, 4.0], "spread": 1.2}
    s = generate.summarize(timing, [0.5, 0.4, 0.6], batch=2, n=4)
    assert s["tokens_per_s"] == 4.0  # 2 x 4 / 2.0
    assert s["tokens_per_s_min"] == 2.0 and s["tokens_per_s_max"] == 5.0
    assert s["ttft_median_s"] == 0.5
    assert s["decode_tokens_per_s"] == pytest.approx(2 * 3 / 1.5)
    assert math.isnan(s["tokens_per_cpu_s"])  # no CPU times given
    s = generate.summarize(timing | {"cpu": [3.0, 4.0, 8.0]}, [0.5], batch=2, n=4)
    assert s["tokens_per_cpu_s"] == 2.0  # 2 x 4 / median CPU 4.0
    assert generate.common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2


def test_generators_tiny(tiny_llama):
    """Both generators give exactly n new tokens per ragged prompt, eos ignored."""
    from commitllm.engine.exact.model import ExactModel
    from commitllm.verifier.checkpoint import load_checkpoint
    from commitllm.verifier.numerics import get_profile
    from commitllm.verifier.numerics.weights import quantize_model

    cfg, tensors = load_checkpoint(tiny_llama)
    ours = generate.exact_generator(ExactModel(quantize_model(cfg, tensors, get_profile("w8a16"))))
    hf = generate.hf_generator(accuracy.load_hf(tiny_llama, "float32"), pad_id=0)
    prompts = [[3, 4, 5, 6, 7], [cfg.eos_token_ids[0]], [9, 10, 11]]
    quiet = generate.quiet_policy(wait=1.0, share=1.0, retries=1, sample=0.05)  # share 100 %
    rows = generate.measure({"ours": ours, "hf": hf}, prompts, batch=2, n=5, runs=2, quiet=quiet)
    assert [r["engine"] for r in rows] == ["ours", "hf"]
    for r in rows:
        assert r["batch"] == 2 and len(r["timing_s"]["runs"]) == 2
        assert all(len(t) == 5 for out in r["outputs"] for t in out)
        assert all(0 < f <= s for f, s in zip(r["ttft_s"], r["timing_s"]["runs"]))


def test_hybrids_equal_the_profiles_they_stand_for(tiny_llama_tied_scaled):
    """int8 weights carried in the int16 path give bit-identical logits to the int8 path, so a
    hybrid row differs from w16a16 only in the matrices it swaps."""
    from commitllm.engine.exact.model import ExactModel, SeqCache
    from commitllm.verifier.checkpoint import load_checkpoint
    from commitllm.verifier.numerics import get_profile
    from commitllm.verifier.numerics.weights import quantize_model

    cfg, tensors = load_checkpoint(tiny_llama_tied_scaled)
    int8_all = accuracy.one_more_8bit_profiles()[0]
    w16, w8, donor = (quantize_model(cfg, tensors, p)
                      for p in (get_profile("w16a16"), get_profile("w8a16"), int8_all))
    ids = np.random.default_rng(2).integers(0, cfg.vocab_size, 20).tolist()

    def logits(qm):
        return ExactModel(qm).forward([SeqCache()], [ids], all_logits=True)[0].numpy()

    assert np.array_equal(logits(accuracy.hybrid(w16, donor, accuracy.MATRICES)), logits(donor))
    assert np.array_equal(logits(accuracy.hybrid(w16, donor, accuracy.QLAYER_PARTS)), logits(w8))
    assert np.array_equal(logits(accuracy.hybrid(w16, donor, ())), logits(w16))
    both = accuracy.hybrid(w16, donor, ("embed", "lm_head"))
    assert both.lm_head is both.embed and both.layers[0].qkv is w16.layers[0].qkv
    head = accuracy.hybrid(w16, donor, ("lm_head",))  # untied: int8 head, int16 embedding
    assert head.embed is w16.embed and np.array_equal(head.lm_head.q, donor.lm_head.q)
    with pytest.raises(ValueError):
        accuracy.hybrid(donor, w16, ("qkv",))


def test_paired_difference():
    a = np.array([True, True, False, True, False, True])
    b = np.array([True, False, True, False, False, True])
    c = accuracy.paired(a, b)
    assert (c["only_first"], c["only_second"], c["positions"]) == (2, 1, 6)
    assert c["diff_points"] == pytest.approx(100 / 6)
    half = 100 * 1.96 * math.sqrt(3) / 6
    assert c["ci95_points"] == pytest.approx([100 / 6 - half, 100 / 6 + half])
