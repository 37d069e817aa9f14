"""bench/protocol.py stays runnable and measures what it says: its helpers on hand-computed cases,
and its measurement functions end to end on the tiny random Llama (two contexts, every tier)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.append(str(Path(__file__).resolve().parents[1]))  # `bench` (last: kernels/ must not shadow)

from bench import common, protocol

GEN = 4  # generated tokens per context
PROMPTS = (12, 40)  # prompt lengths: trace positions 15 and 43 (same digit count, see below)


def test_breakdown_hand_computed():
    arrays = {"z.0.qkv": np.zeros((2, 5), np.int64),  # 80 B layer accumulators
              "zq.0.qkv": np.zeros((1, 5), np.int64),  # 40 B
              "z.lm": np.zeros((1, 3), np.int64), "z.lm.pos": np.zeros(1, np.int64),  # 24 + 8
              "kv.0.k": np.zeros((3, 2), np.int16), "kv.0.proof": np.zeros((2, 32), np.uint8),
              "resid.layer_roots": np.zeros((3, 32), np.uint8), "embed.ids": np.zeros(2, np.int64)}
    got = protocol.breakdown(arrays, total=500)
    assert got == {"header": 500 - 80 - 40 - 24 - 8 - 12 - 64 - 96 - 16, "proofs": 160,
                   "layer_acc": 80, "kv_sample_acc": 40, "indices": 24, "lm_head_acc": 24,
                   "kv_rows": 12}


def test_v1_extra_bytes_hand_computed():
    """What int64 accumulators (opening version 1) would add over packed ones, by kind."""
    arrays = {"z.0.qkv": np.zeros((2, 5, 5), np.uint8),  # 10 values at 5 B: +30 as int64
              "zq.0.qkv": np.zeros((1, 5, 5), np.uint8),  # +15
              "z.1.gate_up": np.zeros((2, 2, 3, 4), np.uint8),  # MoE [n, k, F, w]: 12 x 4 = +48
              "z.lm": np.zeros((1, 3, 6), np.uint8), "z.lm.pos": np.zeros(1, np.int64),  # +6
              "kv.0.k": np.zeros((3, 2), np.int16), "kv.0.proof": np.zeros((2, 32), np.uint8)}
    assert protocol.v1_extra_bytes(arrays) == {"layer_acc": 78, "kv_sample_acc": 15,
                                               "lm_head_acc": 6}


def test_verify_parts_other_is_the_remainder():
    parts = protocol.verify_parts({"freivalds": 0.5, "attention": 0.25, "rest": 0.125,
                                   "total": 1.0, "merkle": 0.0625})
    assert parts == {"freivalds": 0.5, "attention": 0.25, "rest": 0.125, "other": 0.125,
                     "total": 1.0, "merkle": 0.0625, "decode": 0.0}  # spans: not summed


def test_retained_per_extra_token():
    ctx = [{"retained": {"fixed_bytes": 1500, "tokens": 40}},
           {"retained": {"fixed_bytes": 1501, "tokens": 540}}]
    assert protocol.retained_per_extra_token(ctx) == pytest.approx(1 / 500)  # float ratio, a bench figure
    assert protocol.retained_per_extra_token(ctx[:1]) is None


@pytest.fixture(scope="module")
def setup(tiny_llama):
    from commitllm.engine.exact.model import ExactModel
    from commitllm.keys.keygen import build_key
    from commitllm.verifier.checkpoint import load_checkpoint
    from commitllm.verifier.numerics import get_profile
    from commitllm.verifier.numerics.sampler import SamplingParams
    from commitllm.verifier.numerics.weights import quantize_model

    cfg, tensors = load_checkpoint(tiny_llama)
    qm = quantize_model(cfg, tensors, get_profile("w8a16"))
    key = build_key(qm, None, secret=bytes(range(32)))
    return protocol.Setup(ExactModel(qm), None, key, None, SamplingParams(0.9, 20, 0.95, 7), ())


@pytest.fixture(scope="module")
def contexts(setup):
    rng = np.random.default_rng(0)
    out = []
    for n in PROMPTS:
        prompt = [int(t) for t in rng.integers(3, 128, n)]
        out.append(protocol.context_figures(setup, {"prompt": "x"}, prompt, GEN,
                                            protocol.TIERS, verify_runs=2, gen_runs=2,
                                            open_runs=2))
    return out


def test_every_tier_accepted_and_accounted(contexts):
    for c in contexts:
        assert c["positions"] == c["prompt_tokens"] + GEN - 1 and c["output_tokens"] == GEN
        assert len(c["gen_timing_s"]["runs"]) == 2 and len(c["overhead_pct_runs"]) == 2
        for tier, t in c["tiers"].items():
            assert t["accepted"], (tier, t["reject"])
            assert sum(t["breakdown_bytes"].values()) == t["opening_bytes"]
            assert 0 < t["breakdown_bytes"]["header"] < 0.5 * t["opening_bytes"]
            assert t["bytes_per_position"] == t["opening_bytes"] / t["positions"]
            ms = t["verify_ms_per_position"]
            assert all(len(ms[p]["runs"]) == 2 and math.isfinite(ms[p]["median"])
                       for p in protocol.PARTS)
            assert ms["total"]["median"] > 0 and ms["freivalds"]["median"] > 0
            # milliseconds: per-position median times positions vs the whole median (float)
            # bench milliseconds (a float product), not a committed value
            assert t["verify_ms"]["median"] == pytest.approx(ms["total"]["median"] * t["positions"])
            assert t["open_s"] > 0 and math.isfinite(t["open_over_gen"])
            assert len(t["open_timing_s"]["runs"]) == 2
            # others' share of the cores; counted in 10 ms jiffies, so it can exceed 1 on short runs
            assert t["contention"] is None or t["contention"] >= 0
            assert t["open_s"] == t["open_timing_s"]["median"]
        assert c["tiers"]["deep"]["positions"] == c["positions"]
        assert c["tiers"]["routine"]["layers"] == 2  # min(10, the tiny model's 2 layers)


def test_opening_bytes_grow_with_positions(contexts):
    short, long = contexts
    for tier in protocol.TIERS:  # K/V rows up to the last challenged position are opened
        assert long["tiers"][tier]["kv_rows_per_layer"] > short["tiers"][tier]["kv_rows_per_layer"]
    assert long["tiers"]["deep"]["opening_bytes"] > 2 * short["tiers"]["deep"]["opening_bytes"]
    d_short, d_long = short["tiers"]["deep"], long["tiers"]["deep"]
    assert d_long["breakdown_bytes"]["layer_acc"] / d_short["breakdown_bytes"]["layer_acc"] == (
        d_long["positions"] / d_short["positions"])  # accumulators: exactly per position
    assert long["tiers"]["full"]["breakdown_bytes"]["kv_rows"] > (
        short["tiers"]["full"]["breakdown_bytes"]["kv_rows"])


def test_overhead_is_a_finite_percentage(setup, contexts):
    for c in contexts:
        assert 0 < c["overhead_pct"] < math.inf
        assert 0 < c["trace_s"] < c["commit_s"]  # trace_roots is part of committing
        assert 0 < c["trace_overhead_pct"] < c["overhead_pct"]
    signed, over = protocol.sign_runs(setup, {"prompt": "x"}, [5, 6, 7], GEN, runs=3)
    assert signed.receipts[0]["output_token_ids"] and over["runs"] == 3
    assert len(over["overhead_pct_runs"]) == 3
    assert min(over["overhead_pct_runs"]) <= over["overhead_pct"] <= max(over["overhead_pct_runs"])
    assert 0 < over["overhead_pct"] < math.inf
    assert math.isfinite(over["receipt_overhead_pct"]) and over["plain_s"] > 0
    assert over["signed_s"] >= over["gen_s"]  # the wall time of the whole call


def test_retained_is_the_transcript_only(contexts):
    short, long = contexts
    for c in contexts:
        rt = c["retained"]
        assert rt["store_bytes"] == rt["token_id_bytes"] + rt["text_bytes"] + rt["fixed_bytes"]
        assert rt["tokens"] == c["prompt_tokens"] + c["output_tokens"]
    # positions 15 and 43 have as many digits, so the non-transcript part is byte-identical
    assert long["retained"]["fixed_bytes"] == short["retained"]["fixed_bytes"]
    assert protocol.retained_per_extra_token(contexts) == 0
    assert long["receipt"]["fixed_bytes"] == short["receipt"]["fixed_bytes"]
    assert long["receipt"]["bytes"] > short["receipt"]["bytes"]  # the token ids


def test_report_renders(contexts, setup, tmp_path):
    data = {"provenance": common.provenance(),
            "settings": {"model": "tiny", "profile": "w8a16", "gen_tokens": GEN, "gen_runs": 2,
                         "open_runs": 2, "quiet": 0.0,
                         "sampling": setup.params.manifest(), "deep_max": 64, "verify_runs": 2,
                         "deep_verify_runs": 2,
                         "text": "-", "config": setup.model.qm.cfg.to_hf_dict()},
            "loadavg": {"start": (0.0, 0.0, 0.0), "end": (0.0, 0.0, 0.0)},
            "manifest_s": common.Timing((0.1, 0.2)).to_dict(),
            "overhead": protocol.sign_runs(setup, {"prompt": "x"}, [5, 6], GEN, 1)[1],
            "contexts": contexts, "retained_bytes_per_extra_token": 0.0, "elapsed_s": 1.0}
    md = protocol.render_md(data)
    assert md.count(" | yes |") == len(contexts) * len(protocol.TIERS)
    js, _ = common.write_results(tmp_path, "protocol", data, md)
    assert js.is_file()
