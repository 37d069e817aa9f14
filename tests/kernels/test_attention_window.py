"""Sliding-window attention (Mistral) in the split-KV kernels (Triton interpreter) equals the numpy
spec bit for bit: decode and prefill, windows shorter than, equal to and longer than the keys,
several splits (a split can lie wholly before a row's window), 16- and 8-bit Q/K/V, and the
paged layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from commitllm.kernels import attention as ka
from commitllm.verifier.numerics import attention as spec_attn
from kutil import assert_bits_equal
from test_attention import QMAXES, _inputs, _paged

CASES = [(1, 150, 8, 2, 32), (40, 40, 4, 2, 16), (7, 130, 5, 1, 24)]  # (T, S, nh, nkv, d)


# 16-bit unsplit and 8-bit in 3 splits by default; the other two pairs: -m slow
@pytest.mark.parametrize("window", (1, 5, 64, 200))
@pytest.mark.parametrize("qmax, splits", [(QMAXES[0], 1), (QMAXES[1], 3),
                                          pytest.param(QMAXES[0], 3, marks=pytest.mark.slow),
                                          pytest.param(QMAXES[1], 1, marks=pytest.mark.slow)])
@pytest.mark.parametrize("shape", CASES, ids=str)
def test_window_equals_spec(shape, qmax, splits, window):
    rng = np.random.default_rng(sum(shape) + qmax + window)
    args = _inputs(rng, *shape, qmax)
    want = spec_attn.attention(*args, qmax, window=window)
    got = ka.attention(*(torch.from_numpy(a) for a in args), qmax, n_split=splits, window=window)
    assert_bits_equal(got, want, f"attention out, window {window}")
    if window < shape[1]:  # the window is real: without it the output differs
        assert not np.array_equal(spec_attn.attention(*args, qmax), want)


@pytest.mark.parametrize("window", (3, 17))
@pytest.mark.parametrize("bs", (1, 16))
def test_paged_window_equals_spec(bs, window):
    rng = np.random.default_rng(bs + window)
    args = _inputs(rng, 7, 40, 4, 2, 16, 32639)
    want = spec_attn.attention(*args, 32639, window=window)
    pooled, table = _paged(args, 32639, bs, bs)
    got = ka.attention(*(torch.from_numpy(a) for a in pooled), 32639, n_split=3,
                       block_table=torch.from_numpy(table), block_size=bs, seq_len=40,
                       window=window)
    assert_bits_equal(got, want, "paged attention out under a window")


@pytest.mark.parametrize("window", (0, -1, 2**31))
def test_bad_window_refused(window):
    args = _inputs(np.random.default_rng(0), 1, 8, 2, 1, 8, 127)
    with pytest.raises(ValueError, match="window"):
        ka.attention(*(torch.from_numpy(a) for a in args), 127, window=window)
