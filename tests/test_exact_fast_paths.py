"""The verifier's fast paths equal their plain references bit for bit: the Freivalds arithmetic
modulo 2^61 - 1 (verifier/freivalds.py: dot on the numpy route and on every SIMD route of the
compiled core, project) equals the Python-integer reference at the extremes of every range it
accepts, values beyond the bound are refused on every route, and a single changed accumulator
fails the check; the batched Merkle leaves (commitment.leaf_hashes) equal resid_leaf / kv_leaf row by row; the grouped
attention equals a per-head loop; RoPE rows built for a few positions equal the table's rows."""

from __future__ import annotations

import numpy as np
import pytest
from commitllm.verifier import freivalds, merkle
from commitllm.verifier.commitment import kv_leaf, leaf_hashes, resid_leaf
from commitllm.verifier import native
from commitllm.verifier.freivalds import P, check, dot, dot_reference, prepare
from commitllm.verifier.numerics import attention as attn
from commitllm.verifier.numerics import rope

def _routes():
    """Each route of freivalds.dot this machine has, as native flags: numpy (False), then every
    SIMD route of the compiled core (True, with that route set while the caller runs), without
    and then (the best route, where the CPU has it) with the IFMA route of bounds below 2^51."""
    yield False
    if native.lib() is not None:
        try:
            native.use_ifma(False)
            for r in range(native.best_route() + 1):
                native.use_route(r)
                yield True
            native.use_route(-1)
            if native.use_ifma(True):
                yield True
        finally:
            native.use_route(-1)
            native.use_ifma(True)


def _dots(prep, b, bound):
    return [freivalds.dot(prep, b, bound, native=nat) for nat in _routes()]


def _residues(rng, n: int, extreme: bool = False) -> np.ndarray:
    if extreme:  # P - 1 everywhere: the largest limbs
        return np.full(n, P - 1, dtype=np.int64)
    return rng.integers(0, P, size=n, dtype=np.int64)


@pytest.mark.parametrize("n", [1, 7, 15, 17, 576, 1023, 1025, 4096, 14336, 57344, 128256])
def test_dot_equals_reference_on_every_route(n):
    rng = np.random.default_rng(n)
    bound = n * 32639 * 32639  # the largest accumulator bound the profiles give for this K
    # and the IFMA route's largest bound and the first beyond it (the other routes take it)
    for extreme, bound in ((False, bound), (True, bound), (True, 2**51 - 1), (False, 2**51)):
        a = _residues(rng, n, extreme)
        b = rng.integers(-bound, bound + 1, size=(5, n), dtype=np.int64)
        b[0], b[1] = bound, -bound  # rows at both ends of the range
        b[2, ::2] = -bound
        want = dot_reference(a, b)
        for got in _dots(prepare(a), b, bound) + [dot(prepare(a), b.astype(np.float64), bound)]:
            assert got.dtype == np.uint64 and np.array_equal(got, want)


@pytest.mark.parametrize("dtype, qmax", [(np.int8, 127), (np.int16, 32639), (np.int32, 2**31 - 1)])
def test_dot_narrow_operands_on_every_route(dtype, qmax):
    rng = np.random.default_rng(1)
    for n in (1, 9, 300, 4096):
        a = _residues(rng, n, extreme=n == 9)
        x = rng.integers(-qmax, qmax + 1, size=(3, n)).astype(dtype)
        x[0] = qmax
        x[1] = -qmax
        for got in _dots(prepare(a), x, qmax):
            assert np.array_equal(got, dot_reference(a, x))
    zero = np.zeros((2, 300), dtype=np.int64)
    for got in _dots(prepare(_residues(rng, 300)), zero, 0):
        assert np.array_equal(got, np.zeros(2, np.uint64))


def test_dot_refuses_values_beyond_the_bound_on_every_route():
    a = prepare(_residues(np.random.default_rng(2), 2000))
    for value in (1001, -1001):
        for i in (0, 1500, 1999):  # in a SIMD block, in the second block and in the tail
            bad = np.zeros((2, 2000), dtype=np.int64)
            bad[1, i] = value
            for nat in _routes():
                for b in (bad, bad.astype(np.int16)):
                    with pytest.raises(OverflowError):
                        dot(a, b, 1000, native=nat)
    with pytest.raises(OverflowError):
        dot(a, np.zeros((1, 2000), np.int64), 2**53)
    with pytest.raises(ValueError):
        prepare(np.full(3, P, dtype=np.int64))
    with pytest.raises(ValueError):
        prepare(np.full(3, -1, dtype=np.int64))


def test_secret_vector_is_keyed_and_in_range():
    r = freivalds.secret_vector(b"\x07" * 32, "layers.0.o", 4096)
    assert r.dtype == np.int64 and r.shape == (4096,) and r.min() >= 0 and r.max() < P
    assert r.max() > 2**60  # the top 61 bits are used
    assert not np.array_equal(r, freivalds.secret_vector(b"\x08" * 32, "layers.0.o", 4096))
    assert not np.array_equal(r, freivalds.secret_vector(b"\x07" * 32, "layers.1.o", 4096))
    assert np.array_equal(r[:10], freivalds.secret_vector(b"\x07" * 32, "layers.0.o", 10))


def test_project_blocks_equal_reference():
    rng = np.random.default_rng(3)
    w = rng.integers(-32639, 32640, size=(1000, 64)).astype(np.int16)
    w[0] = 32639
    for r in (_residues(rng, 1000), _residues(rng, 1000, extreme=True)):
        want = dot_reference(r, w.T)  # v[k] = sum_n r[n] w[n, k]
        for block in (1, 7, 4096):
            assert np.array_equal(freivalds.project(r, w, block=block).astype(np.uint64), want)


def test_check_accepts_exact_and_rejects_one_flipped_accumulator():
    rng = np.random.default_rng(4)
    n, k, qx, qw = 96, 128, 32639, 127
    w = rng.integers(-qw, qw + 1, size=(n, k)).astype(np.int8)
    x = rng.integers(-qx, qx + 1, size=(6, k)).astype(np.int16)
    x[0] = qx
    z = x.astype(np.int64) @ w.T.astype(np.int64)
    r = freivalds.secret_vector(b"\x07" * 32, "m", n)
    rp, vp = prepare(r), prepare(freivalds.project(r, w))
    bound = k * qx * qw
    for nat in _routes():
        assert check(rp, vp, x, z, qx, bound, native=nat).all()
        for delta in (1, -1, 2**31, 2**31 - 1, 2**40, bound):
            bad = z.copy()
            bad[3, 17] += delta
            ok = check(rp, vp, x, bad, qx, max(bound, int(np.abs(bad).max())), native=nat)
            assert not ok[3] and ok[[0, 1, 2, 4, 5]].all()
        with pytest.raises(OverflowError):  # z + P would alias: the bound refuses it first
            bad = z.copy()
            bad[0, 0] += P
            check(rp, vp, x, bad, qx, bound, native=nat)


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


def test_leaf_hashes_of_big_endian_and_strided_rows():
    """Rows given big-endian or as strided views hash as their little-endian bytes."""
    rng = np.random.default_rng(8)
    k = rng.integers(-300, 300, (5, 2, 4)).astype(np.int16)
    sk = rng.random((5, 2)).astype(np.float32)
    want = leaf_hashes(b"kv", 1, range(5), [k, sk, k, sk])
    assert leaf_hashes(b"kv", 1, range(5), [k.astype(">i2"), sk.astype(">f4"), k, sk]) == want
    wide = np.zeros((5, 2, 8), np.int16)
    wide[:, :, ::2] = k
    assert leaf_hashes(b"kv", 1, range(5), [wide[:, :, ::2], sk, k, sk]) == want


def _multiproof_reference(leaves, n_leaves, proof, root):
    """The earlier dict-based rebuild: the same answer for every input."""
    known, width, used = dict(leaves), n_leaves, 0
    while width > 1:
        nxt = {}
        for i in sorted(known):
            if i // 2 in nxt:
                continue
            sib = i ^ 1
            if sib >= width:
                nxt[i // 2] = known[i]
                continue
            if sib in known:
                other = known[sib]
            elif used < len(proof) and len(proof[used]) == 32:
                other, used = proof[used], used + 1
            else:
                return False
            nxt[i // 2] = (merkle.node_hash(known[i], other) if i % 2 == 0
                           else merkle.node_hash(other, known[i]))
        known, width = nxt, (width + 1) // 2
    return used == len(proof) and known[0] == root


@pytest.mark.parametrize("n", [1, 2, 3, 7, 8, 33, 100])
def test_verify_multiproof_one_pass_per_level(n):
    """The one-pass rebuild accepts exactly what the dict-based one did: honest subsets
    (contiguous ranges, scattered, all), and refuses dropped, extra, swapped or cut proofs."""
    rng = np.random.default_rng(n)
    leaves = [merkle.leaf_hash(b"t", bytes([i % 256, i // 256])) for i in range(n)]
    tree = merkle.MerkleTree(leaves)
    subsets = [range(n), range(n // 3, n), sorted(set(rng.integers(0, n, 3).tolist()))]
    for idx in subsets:
        got = {i: leaves[i] for i in idx}
        proof = merkle.multiproof(tree, idx)
        assert merkle.verify_multiproof(got, n, proof, tree.root)
        bad_proofs = [proof + [b"\0" * 32], proof[:-1], proof[::-1] if len(proof) > 1 else None,
                      [p[:31] for p in proof] if proof else None]
        for bad in [b for b in bad_proofs if b is not None and b != proof]:
            want = _multiproof_reference(got, n, bad, tree.root)
            assert merkle.verify_multiproof(got, n, bad, tree.root) == want
            assert not want
        wrong = dict(got)
        first = next(iter(wrong))
        wrong[first] = merkle.leaf_hash(b"t", b"other")
        assert not merkle.verify_multiproof(wrong, n, proof, tree.root)
