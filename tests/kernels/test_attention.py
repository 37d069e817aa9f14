"""The split-KV integer-softmax attention kernels (Triton interpreter) equal the numpy spec bit for
bit: decode (one query, long cache, GQA) and prefill (causal, many queries), every tile config,
every split count, 16-bit and 8-bit Q/K/V (the large shapes' full grid: -m slow)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from commitllm.kernels import attention as ka
from commitllm.verifier.numerics import attention as spec_attn
from commitllm.verifier.numerics import quant as spec_quant
from kutil import assert_bits_equal

F32 = np.float32
QMAXES = (32639, 127)
# (T, S, nh, nkv, d); queries sit at the last T positions (decode T = 1, prefill T = S)
DECODE = [(1, 1, 1, 1, 2), (1, 37, 3, 1, 6), (1, 300, 9, 3, 64), (1, 150, 32, 8, 128)]
PREFILL = [(5, 5, 4, 2, 8), (40, 40, 9, 3, 64), (7, 130, 5, 1, 24), (20, 20, 32, 8, 128)]


def _inputs(rng, t, s, nh, nkv, d, qmax, spread=3.0):
    """Quantized q/k/v (spec quantize_rows), with a tie block: keys 1..3 copy key 0 so several
    keys share the row max and c_j = 2^15 happens for more than one key."""
    qf = (rng.standard_normal((t, nh, d)) * spread).astype(F32)
    kf = (rng.standard_normal((s, nkv, d)) * spread).astype(F32)
    vf = rng.standard_normal((s, nkv, d)).astype(F32)
    kf[1:4], vf[1:4] = kf[0], vf[0]
    (q, sq), (k, sk), (v, sv) = (spec_quant.quantize_rows(a, qmax) for a in (qf, kf, vf))
    return q, sq, k, sk, v, sv, np.arange(s - t, s, dtype=np.int32)


def _check(args, qmax, **kw):
    q, sq, k, sk, v, sv, pos = args
    want = spec_attn.attention(q, sq, k, sk, v, sv, pos, qmax)
    got = ka.attention(*(torch.from_numpy(a) for a in args), qmax, **kw)
    assert_bits_equal(got, want, "attention out")


def _grid(shapes: list[tuple], big: int) -> list:
    """(shape, qmax, splits, cfg) for every tile config, split count (normalized: no empty
    split) and qmax. The shapes of more than a few thousand query-key pairs run one config each
    by default, rotating from config `big` (the two grids together give every config a large
    shape), 16-bit unsplit and 8-bit in 3 splits; the rest of their grid is `slow`."""
    out = []
    for shape in shapes:
        heavy = shape[0] * shape[1] * shape[2] > 2000
        for qmax in QMAXES:
            for splits in (1, 3):
                for j, cfg in enumerate(ka.CONFIGS):
                    pair = (qmax == QMAXES[0]) == (splits == 1)  # 16-bit unsplit, 8-bit split
                    slow = heavy and (j != big % len(ka.CONFIGS) or not pair)
                    out.append(pytest.param(shape, qmax, splits, cfg,
                                            id=f"{shape}-{qmax}-{splits}-{cfg}",
                                            marks=[pytest.mark.slow] if slow else []))
        big += heavy
    return out


@pytest.mark.parametrize("shape, qmax, splits, cfg", _grid(DECODE, 0))
def test_decode_equals_spec(shape, qmax, splits, cfg):
    rng = np.random.default_rng(sum(shape) + qmax)
    _check(_inputs(rng, *shape, qmax), qmax, n_split=splits, config=cfg)


@pytest.mark.parametrize("shape, qmax, splits, cfg", _grid(PREFILL, 2))
def test_prefill_equals_spec(shape, qmax, splits, cfg):
    rng = np.random.default_rng(sum(shape) + qmax + 1)
    _check(_inputs(rng, *shape, qmax), qmax, n_split=splits, config=cfg)


@pytest.mark.parametrize("spread", (0.01, 30.0, 3000.0))
def test_flat_and_peaky_logits(spread):
    """Near-uniform weights (every key counts) and very peaky ones (D beyond the table, w = 0,
    logits at the +-2^30 clamp for the largest spread)."""
    rng = np.random.default_rng(int(spread * 100))
    args = _inputs(rng, 6, 90, 4, 2, 32, 32639, spread=spread)
    parts = {}
    spec_attn.attention(*args, 32639, parts)
    if spread > 1000:
        assert np.isin(parts["logits"], [-spec_attn.LOGIT_CLAMP, spec_attn.LOGIT_CLAMP]).any()
    for splits in (1, 4):
        _check(args, 32639, n_split=splits)


def test_long_decode_auto_splits():
    rng = np.random.default_rng(9)
    args = _inputs(rng, 1, 3000, 4, 1, 64, 32639)
    assert ka.pick_splits(4, 3000, 64) > 1
    _check(args, 32639)


def test_arbitrary_query_positions():
    """Queries need not be the last positions (a re-run of earlier tokens, unordered rows)."""
    rng = np.random.default_rng(10)
    q, sq, k, sk, v, sv, _ = _inputs(rng, 6, 50, 6, 3, 16, 127)
    pos = np.array([0, 49, 3, 3, 17, 31], dtype=np.int32)
    _check((q, sq, k, sk, v, sv, pos), 127, n_split=2)


def test_zero_and_subnormal_rows():
    """A zero value row (s = 1, q = 0) and a zero query (all logits 0: uniform weights)."""
    rng = np.random.default_rng(12)
    q, sq, k, sk, v, sv, pos = _inputs(rng, 3, 12, 2, 1, 8, 32639)
    q[0], sq[0] = 0, 1.0
    v[5], sv[5] = 0, 1.0
    _check((q, sq, k, sk, v, sv, pos), 32639, n_split=2)


def test_rejects_bad_input():
    rng = np.random.default_rng(13)
    args = [torch.from_numpy(a) for a in _inputs(rng, 2, 8, 4, 2, 8, 32639)]
    with pytest.raises(TypeError):  # int8 tensors under a 16-bit qmax
        ka.attention(*args, 127)
    bad_pos = torch.tensor([0, 8], dtype=torch.int32)
    with pytest.raises(ValueError):
        ka.attention(*args[:6], bad_pos, 32639)
    q = torch.zeros((1, 3, 8), dtype=torch.int16)
    with pytest.raises(ValueError):  # 3 query heads over 2 K/V heads
        ka.attention(q, torch.ones(1, 3), *args[2:6], torch.zeros(1, dtype=torch.int32), 32639)


def test_split_bound_enforced():
    s = ka.MAX_SPLIT_KEYS + 100
    k = torch.zeros((s, 1, 2), dtype=torch.int8)
    sk = torch.ones((s, 1))
    q, sq = torch.zeros((1, 1, 2), dtype=torch.int8), torch.ones((1, 1))
    pos = torch.zeros(1, dtype=torch.int32)
    with pytest.raises(OverflowError):
        ka.attention(q, sq, k, sk, k, sk, pos, 127, n_split=1)
    assert ka.pick_splits(1, s, 64) >= 2


def _paged(args, qmax, bs, seed):
    """The same keys scattered over a pool of `bs`-position blocks in a shuffled order, every other
    pool row holding unrelated quantized values (stale rows a block can hold)."""
    q, sq, k, sk, v, sv, pos = args
    rng = np.random.default_rng(seed)
    s, nkv, d = k.shape
    nb = -(-s // bs)
    n_pool = 2 * nb + 3
    table = rng.permutation(n_pool)[:nb].astype(np.int32)
    junk = lambda shape: spec_quant.quantize_rows(  # noqa: E731
        (rng.standard_normal(shape) * 5).astype(F32), qmax)
    (pk, psk), (pv, psv) = junk((n_pool * bs, nkv, d)), junk((n_pool * bs, nkv, d))
    rows = (table[np.arange(s) // bs].astype(np.int64) * bs + np.arange(s) % bs)
    pk[rows], psk[rows], pv[rows], psv[rows] = k, sk, v, sv
    return (q, sq, pk, psk, pv, psv, pos), table


@pytest.mark.parametrize("splits", (1, 3))
@pytest.mark.parametrize("bs", (1, 5, 16))
@pytest.mark.parametrize("qmax", QMAXES)
@pytest.mark.parametrize("shape", [(1, 37, 3, 1, 6), (1, 150, 8, 2, 32), (7, 40, 4, 2, 16)],
                         ids=str)
def test_paged_layout_equals_spec(shape, qmax, bs, splits):
    """The paged read (engine/exact/paged.py's block table) gives the contiguous kernel's bits,
    decode and prefill, with stale rows around the sequence's blocks."""
    rng = np.random.default_rng(sum(shape) + qmax + bs)
    args = _inputs(rng, *shape, qmax)
    q, sq, k, sk, v, sv, pos = args
    want = spec_attn.attention(q, sq, k, sk, v, sv, pos, qmax)
    pooled, table = _paged(args, qmax, bs, bs)
    got = ka.attention(*(torch.from_numpy(a) for a in pooled), qmax, n_split=splits,
                       block_table=torch.from_numpy(table), block_size=bs, seq_len=k.shape[0])
    assert_bits_equal(got, want, "paged attention out")


def test_paged_layout_rejects_bad_tables():
    rng = np.random.default_rng(0)
    args = _inputs(rng, 1, 20, 2, 1, 8, 127)
    pooled, table = _paged(args, 127, 4, 0)
    t = lambda a: [torch.from_numpy(x) for x in a]  # noqa: E731
    with pytest.raises(ValueError, match="blocks, the table has"):
        ka.attention(*t(pooled), 127, block_table=torch.from_numpy(table[:2]), block_size=4,
                     seq_len=20)
    bad = table.copy()
    bad[0] = 10_000
    with pytest.raises(ValueError, match="block ids"):
        ka.attention(*t(pooled), 127, block_table=torch.from_numpy(bad), block_size=4, seq_len=20)
    with pytest.raises(ValueError, match="whole blocks"):
        ka.attention(*t(pooled), 127, block_table=torch.from_numpy(table), block_size=7,
                     seq_len=20)
