"""The verifier's fast paths equal their plain references bit for bit: the float64-BLAS Freivalds
arithmetic (verifier/freivalds.py: limbs, dot_mod, project) equals the int64 reference at the
extremes of every range it accepts and a single changed accumulator fails the check; the batched
Merkle leaves (commitment.leaf_hashes) equal resid_leaf / kv_leaf row by row; the grouped
attention equals a per-head loop; RoPE rows built for a few positions equal the table's rows."""

from __future__ import annotations

import numpy as np
import pytest
from commitllm.verifier import freivalds
from commitllm.verifier.commitment import kv_leaf, leaf_hashes, resid_leaf
from commitllm.verifier.freivalds import PRIMES, check, dot_mod, dot_mod_reference, limbs, moduli
from commitllm.verifier.numerics import attention as attn
from commitllm.verifier.numerics import rope

MODS = moduli()[:, None]


def _residues(rng, n: int, extreme: bool = False) -> np.ndarray:
    if extreme:  # p - 1 everywhere: the largest limbs
        return np.broadcast_to(MODS - 1, (len(MODS), n)).astype(np.int64).copy()
    return rng.integers(0, MODS, size=(len(MODS), n), dtype=np.int64)


@pytest.mark.parametrize("n", [1, 7, 576, 4096, 14336, 57344, 128256])
def test_dot_mod_equals_reference(n):
    rng = np.random.default_rng(n)
    bound = n * 32639 * 32639  # the largest accumulator bound the profiles give for this K
    for extreme in (False, True):
        a = _residues(rng, n, extreme)
        b = rng.integers(-bound, bound + 1, size=(5, n), dtype=np.int64)
        b[0], b[1] = bound, -bound  # rows at both ends of the range
        b[2, ::2] = -bound
        assert np.array_equal(dot_mod(limbs(a), b, bound), dot_mod_reference(a, b))


def test_dot_mod_small_operands_and_int16():
    rng = np.random.default_rng(1)
    a = _residues(rng, 300)
    x = rng.integers(-32639, 32640, size=(3, 300)).astype(np.int16)
    assert np.array_equal(dot_mod(limbs(a), x, 32639), dot_mod_reference(a, x))
    zero = np.zeros((2, 300), dtype=np.int64)
    assert np.array_equal(dot_mod(limbs(a), zero, 0), np.zeros((2, len(MODS)), np.int64))


def test_dot_mod_refuses_values_beyond_the_bound():
    a = _residues(np.random.default_rng(2), 10)
    b = np.full((1, 10), 1001, dtype=np.int64)
    with pytest.raises(OverflowError):
        dot_mod(limbs(a), b, 1000)
    with pytest.raises(OverflowError):
        dot_mod(limbs(a), -b, 1000)
    with pytest.raises(ValueError):
        limbs(np.full((4, 3), 2**31, dtype=np.int64))


def test_project_blocks_equal_reference():
    rng = np.random.default_rng(3)
    w = rng.integers(-32639, 32640, size=(1000, 64)).astype(np.int16)
    w[0] = 32639
    r = _residues(rng, 1000)
    want = dot_mod_reference(r, w.T.astype(np.int64)).T  # v[c, k] = sum_n r[c, n] w[n, k]
    for block in (1, 7, 4096):
        assert np.array_equal(freivalds.project(r, w, block=block), want)


def test_check_accepts_exact_and_rejects_one_flipped_accumulator():
    rng = np.random.default_rng(4)
    n, k, qx, qw = 96, 128, 32639, 127
    w = rng.integers(-qw, qw + 1, size=(n, k)).astype(np.int8)
    x = rng.integers(-qx, qx + 1, size=(6, k)).astype(np.int16)
    x[0] = qx
    z = x.astype(np.int64) @ w.T.astype(np.int64)
    r = freivalds.secret_vectors(b"\x07" * 32, "m", n)
    rl, vl = limbs(r), limbs(freivalds.project(r, w))
    bound = k * qx * qw
    assert check(rl, vl, x, z, qx, bound).all()
    for delta in (1, -1, PRIMES[0], PRIMES[1], PRIMES[0] * PRIMES[1] % bound):
        bad = z.copy()
        bad[3, 17] += delta
        ok = check(rl, vl, x, bad, qx, max(bound, int(np.abs(bad).max())))
        assert not ok[3] and ok[[0, 1, 2, 4, 5]].all()


def test_leaf_hashes_equal_per_row_leaves():
    rng = np.random.default_rng(5)
    pos = [0, 3, 4, 1000, 2**20]
    x = rng.standard_normal((5, 12)).astype(np.float32)
    assert leaf_hashes(b"resid", 7, pos, [x]) == [resid_leaf(7, t, x[i]) for i, t in enumerate(pos)]
    k = rng.integers(-32639, 32640, size=(5, 2, 3)).astype(np.int16)
    v = rng.integers(-127, 128, size=(5, 2, 3)).astype(np.int8)
    sk, sv = (rng.random((5, 2)).astype(np.float32) for _ in range(2))
    want = [kv_leaf(2, t, k[i], sk[i], v[i], sv[i]) for i, t in enumerate(pos)]
    assert leaf_hashes(b"kv", 2, pos, [k, sk, v, sv]) == want
    assert leaf_hashes(b"kv", 3, pos, [k, sk, v, sv]) != want  # the layer is in every leaf
    assert leaf_hashes(b"kv", 2, [], [k[:0], sk[:0], v[:0], sv[:0]]) == []


def test_grouped_attention_matmul_equals_per_head():
    rng = np.random.default_rng(6)
    nh, nkv, t, s, d = 8, 2, 3, 10, 4
    a = rng.integers(-32639, 32640, size=(nh, t, d)).astype(np.float64)
    b = rng.integers(-32639, 32640, size=(nkv, d, s)).astype(np.float64)
    want = np.stack([a[h] @ b[h // (nh // nkv)] for h in range(nh)])
    assert np.array_equal(attn._grouped(a, b, nkv), want)


def test_rope_rows_at_positions_equal_the_table():
    from commitllm.verifier.config import ModelConfig

    cfg = ModelConfig.from_dict({"architectures": ["LlamaForCausalLM"], "hidden_size": 64,
                                 "num_attention_heads": 4, "intermediate_size": 96,
                                 "vocab_size": 10, "num_hidden_layers": 1, "rms_norm_eps": 1e-5,
                                 "max_position_embeddings": 8192, "rope_theta": 500000.0})
    pos = np.array([0, 1, 255, 256, 1000, 4095, 5000])
    few = rope.RopeTable(cfg).lookup(pos)  # rows only (8 * 7 < 5001)
    table = rope.RopeTable(cfg)
    table.ensure(5001)
    assert len(table.cos) >= 5001
    assert np.array_equal(few[0], table.cos[pos]) and np.array_equal(few[1], table.sin[pos])
    assert np.array_equal(rope.build_rows(table.cos_b, table.sin_b, np.array([], np.int64))[0],
                          np.ones((0, len(table.freqs)), np.float32))
