"""The compiled BLAKE3 (verifier/native/hash.c) against the blake3 package, and the Merkle routines
that use it against their Python definitions: the same digests, roots, proofs and verdicts. Every
test runs on each of hash.c's routes this CPU has: the portable lanes (route 0 and 1) and the
AVX-512 registers (route 2, hash_lanes16)."""

from __future__ import annotations

import blake3
import numpy as np
import pytest

from commitllm.verifier import merkle, native
from commitllm.verifier.commitment import TraceTrees, leaf_digests, leaf_hashes

pytestmark = [
    pytest.mark.skipif(native.lib() is None, reason=f"no compiled core: {native.error()}"),
    pytest.mark.usefixtures("hash_route"),  # each test on each hash route (conftest.py)
]

# every length class: empty, partial and whole blocks, one chunk exactly, chunk + 1 byte, and
# chunk counts of 2 to 17 (tree depths 1 to 5, left subtrees full or not)
LENGTHS = (0, 1, 31, 63, 64, 65, 83, 127, 128, 1000, 1023, 1024, 1025, 2047, 2048, 2049, 3072,
           3073, 4096, 4189, 5120, 7169, 8192, 8193, 16384, 16385, 17409)


def _want(rows: np.ndarray) -> list[bytes]:
    return [blake3.blake3(r.tobytes()).digest() for r in rows]


@pytest.mark.parametrize("length", LENGTHS)
def test_b3_many_equals_blake3_at_every_length(length):
    rng = np.random.default_rng(length)
    for n in (1, 15, 16, 17, 33):
        rows = rng.integers(0, 256, (n, length), dtype=np.uint8)
        assert merkle.digests(native.b3_many(rows)) == _want(rows), (length, n)


def test_b3_many_strided_rows_threads_and_extremes(monkeypatch):
    rng = np.random.default_rng(1)
    big = rng.integers(0, 256, (70, 3000), dtype=np.uint8)
    view = big[::2, 7:2100]  # row stride 6000, rows start unaligned
    assert merkle.digests(native.b3_many(view)) == _want(view)
    for fill in (0, 255):
        rows = np.full((20, 4189), fill, np.uint8)
        assert merkle.digests(native.b3_many(rows)) == _want(rows)
    monkeypatch.setattr(native, "B3_SPLIT_BYTES", 1)  # split even small batches over threads
    rows = rng.integers(0, 256, (100, 1500), dtype=np.uint8)
    for t in (1, 2, 3, 7):
        assert merkle.digests(native.b3_many(rows, n_threads=t)) == _want(rows), t


def test_b3_rows_equals_the_concatenation():
    rng = np.random.default_rng(2)
    n = 37
    # widths that put segment edges inside blocks, on block and chunk edges, and an empty one
    widths = (29, 0, 2048, 35, 64, 1024, 3)
    segs = [rng.integers(0, 256, (n, w), dtype=np.uint8) for w in widths]
    want = _want(np.concatenate(segs, axis=1))
    assert merkle.digests(native.b3_rows(segs)) == want
    strided = [np.repeat(s, 3, axis=0)[::3] for s in segs]  # other row strides, same bytes
    assert merkle.digests(native.b3_rows(strided)) == want


def test_b3_rows_refuses_bad_layouts():
    ok = np.zeros((4, 8), np.uint8)
    for bad in ([ok] * 9, [], [ok.astype(np.int16)], [ok[:, ::2]], [ok[::-1]], [ok, ok[:3]],
                [ok[0]]):
        with pytest.raises(ValueError):
            native.b3_rows(bad)


def test_leaf_hashes_and_trees_equal_the_python_route(monkeypatch):
    rng = np.random.default_rng(3)
    n = 45
    k = rng.integers(-32768, 32768, (n, 2, 24)).astype(np.int16)
    sk = rng.random((n, 2)).astype(np.float32)
    v8 = rng.integers(-128, 128, (n, 2, 24)).astype(np.int8)
    kbig = k.astype(">i2")  # big-endian input: hashed as its little-endian bytes
    kt = np.ascontiguousarray(k.transpose(1, 0, 2)).transpose(1, 0, 2)  # strided rows
    pos = list(range(3, 3 + n))
    cases = [[k, sk, v8, sk], [kbig, sk, kt, sk], [k[:, :, :1]], [sk[:, :1]]]
    fast = [leaf_hashes(b"kv", 5, pos, c) for c in cases]
    assert [merkle.digests(leaf_digests(b"kv", 5, pos, c)) for c in cases] == fast
    resid = rng.standard_normal((3, n, 20)).astype(np.float32)
    trees = TraceTrees(resid, k[None].repeat(2, 0), sk[None].repeat(2, 0), v8[None].repeat(2, 0),
                       sk[None].repeat(2, 0))
    monkeypatch.setattr(merkle, "_core", lambda: None)
    assert fast == [leaf_hashes(b"kv", 5, pos, c) for c in cases]
    assert [merkle.digests(leaf_digests(b"kv", 5, pos, c)) for c in cases] == fast
    slow = TraceTrees(resid, k[None].repeat(2, 0), sk[None].repeat(2, 0), v8[None].repeat(2, 0),
                      sk[None].repeat(2, 0))
    assert (trees.resid_root, trees.kv_root) == (slow.resid_root, slow.kv_root)
    assert [t.levels for t in trees.kv_trees] == [t.levels for t in slow.kv_trees]
    for m in (1, 2, 7, 8, 9, 100, 257):  # node levels of every parity, both routes
        leaves = [blake3.blake3(bytes([i % 256, i // 256])).digest() for i in range(m)]
        assert merkle.MerkleTree(leaves).root == merkle.root_naive(leaves)


def _tampered(proof: list[bytes], rng) -> list[list[bytes]]:
    out = [proof[:-1], proof + [proof[-1]], proof[::-1], [b"\0" * 32] + proof] if proof else \
        [[b"\0" * 32]]
    if proof:
        i = int(rng.integers(len(proof)))
        flip = bytearray(proof[i])
        flip[int(rng.integers(32))] ^= 1 << int(rng.integers(8))
        out.append(proof[:i] + [bytes(flip)] + proof[i + 1:])
        out.append(proof[:i] + [proof[i][:31]] + proof[i + 1:])  # a short hash: the spec decides
    return out


def test_multiproof_walk_equals_the_spec_on_honest_and_tampered_proofs():
    rng = np.random.default_rng(4)
    checked = 0
    for n in list(range(1, 40)) + [63, 64, 65, 200, 1024, 1025]:
        leaves = [blake3.blake3(n.to_bytes(4, "little") + i.to_bytes(4, "little")).digest()
                  for i in range(n)]
        tree = merkle.MerkleTree(leaves)
        for want in (n, max(1, n // 2), min(n, 8), min(n, 9)):
            idx = sorted(rng.choice(n, size=want, replace=False).tolist())
            known = {i: leaves[i] for i in idx}
            proof = merkle.multiproof(tree, idx)
            assert merkle.verify_multiproof(known, n, proof, tree.root) is True
            assert merkle.verify_multiproof_spec(known, n, proof, tree.root) is True
            bad_leaf = dict(known)
            bad_leaf[idx[0]] = bytes(32)
            moved = {(i + 1) % n: h for i, h in known.items()} if n > 1 else known
            cases = [(known, n, p, tree.root) for p in _tampered(proof, rng)]
            cases += [(known, n, proof, bytes(32)), (bad_leaf, n, proof, tree.root),
                      (moved, n, proof, tree.root), (known, n + 1, proof, tree.root),
                      (known, max(1, n - 1), proof, tree.root), ({}, n, proof, tree.root),
                      ({n: leaves[0]}, n, proof, tree.root), ({-1: leaves[0]}, n, proof, tree.root)]
            for args in cases:
                want = merkle.verify_multiproof_spec(*args)
                assert merkle.verify_multiproof(*args) == want
                items = sorted(args[0].items())
                idx = np.array([i for i, _ in items], np.int64)
                rows = np.frombuffer(b"".join(h for _, h in items), np.uint8).reshape(-1, 32)
                if all(len(h) == 32 for _, h in items):
                    assert merkle.verify_multiproof_rows(idx, rows, *args[1:]) == want
                checked += 1
            # leaves out of order or repeated: the rows route gives the spec's dict answer
            idx = np.array(idx[::-1] if len(idx) > 1 else idx.tolist() * 2, np.int64)
            rows = np.stack([np.frombuffer(leaves[i], np.uint8) for i in idx.tolist()])
            spec = merkle.verify_multiproof_spec(dict(zip(idx.tolist(), merkle.digests(rows))),
                                                 n, proof, tree.root)
            assert merkle.verify_multiproof_rows(idx, rows, n, proof, tree.root) == spec
    assert checked > 1000


def test_b3_multiproof_refuses_bad_inputs():
    h = np.zeros((2, 32), np.uint8)
    p = np.zeros((1, 32), np.uint8)
    for idx, n in ((np.array([1, 0]), 4), (np.array([0, 0]), 4), (np.array([0, 4]), 4),
                   (np.array([-1, 2]), 4), (np.array([0, 1], np.int32), 4), (np.array([0, 1]), 0),
                   (np.array([0, 1]), 2**63)):
        with pytest.raises(ValueError):
            native.b3_multiproof(idx, h, n, p, merkle.NODE_PREFIX)
    # the walk itself answers "no root" (1) to indices out of order, repeated or beyond the tree
    # (without that check the last three would rebuild a root: a leaf outside the tree)
    so, root = native.lib(), np.empty(32, np.uint8)
    pz = np.zeros((2, 32), np.uint8)
    for idx, n, k in (([1, 0], 4, 1), ([0, 0], 4, 1), ([-1, 2], 4, 1), ([0, 3], 3, 2),
                      ([2, 3], 3, 1), ([1, 5], 5, 2)):
        idx = np.array(idx, np.int64)
        assert so.b3_multiproof(idx.ctypes.data, h.ctypes.data, 2, n, pz.ctypes.data, k,
                                merkle.NODE_PREFIX, len(merkle.NODE_PREFIX),
                                root.ctypes.data) == 1, (idx, n, k)


def _chain(dom: bytes, cur: bytes, tags: bytes, ids: list[int]) -> bytes:
    import struct

    for t, i in zip(tags, ids):
        cur = blake3.blake3(dom + cur + bytes([t]) + struct.pack("<I", i)).digest()
    return cur


def test_b3_chain_equals_the_links_one_by_one():
    rng = np.random.default_rng(4)
    ids = [0, 1, 2**32 - 1, *map(int, rng.integers(0, 2**32, 200))]
    tags = bytes(rng.choice(list(b"po"), len(ids)))
    for dom in (b"", b"commitllm/io/v1\x00", b"x" * 27):
        for n in (0, 1, 2, len(ids)):
            cur = bytes(range(32))
            assert native.b3_chain(dom, cur, tags[:n], ids[:n]) == _chain(dom, cur, tags[:n],
                                                                            ids[:n]), (dom, n)
    for bad in ((b"x" * 28, bytes(32), b"p", [1]), (b"", bytes(31), b"p", [1]),
                (b"", bytes(32), b"pp", [1]), (b"", bytes(32), b"p", [-1]),
                (b"", bytes(32), b"p", [2**32]), (b"", bytes(32), b"p", [True]),
                (b"", bytes(32), b"p", [1.0])):
        with pytest.raises(ValueError):
            native.b3_chain(*bad)


def test_receipt_io_chain_is_the_python_links(monkeypatch):
    """receipt.io_chain through the compiled core (from CHAIN_NATIVE_MIN links) equals the
    Python links; ids the core cannot take (negative, 2^32, a bool) take the Python links, which
    refuse (or read) them as before."""
    import struct

    from commitllm.verifier import receipt

    rng = np.random.default_rng(5)
    args = ("ab" * 32, "cd" * 32, "nonce")
    for n_p, n_o in ((3, 2), (31, 0), (32, 0), (500, 37)):
        p = [int(t) for t in rng.integers(0, 2**32, n_p)]
        o = [int(t) for t in rng.integers(0, 50000, n_o)]
        fast = receipt.io_chain(*args, p, o)
        with monkeypatch.context() as m:
            m.setattr(receipt, "_chain_core", lambda ids: None)
            assert receipt.io_chain(*args, p, o) == fast, (n_p, n_o)
    for bad in (-1, 2**32):
        with pytest.raises(struct.error):
            receipt.io_chain(*args, [bad] + [1] * 40, [])
    odd = [True] + [1] * 40  # the core refuses a bool id: the Python links, as before
    got = receipt.io_chain(*args, odd, [])
    with monkeypatch.context() as m:
        m.setattr(receipt, "_chain_core", lambda ids: None)
        assert receipt.io_chain(*args, odd, []) == got
