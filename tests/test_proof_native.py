"""A trace proof group in one compiled call (hash.c's b3_proof; commitment.prepare_proof,
native.proof_run): the K/V range check folded into the leaf hashing, then the multiproof walk
and the root comparison. Its answer must be exactly "the range check passed and
verify_multiproof_rows passed" on honest and tampered groups, on each hash route, on one
thread and with its rows split over several."""

from __future__ import annotations

import numpy as np
import pytest

from commitllm.verifier import merkle, native
from commitllm.verifier.commitment import leaf_digests, leaf_hashes, prepare_proof

pytestmark = [
    pytest.mark.skipif(native.lib() is None, reason=f"no compiled core: {native.error()}"),
    pytest.mark.usefixtures("hash_route"),  # each test on each hash route (conftest.py)
]


def _layer(rng, n: int, dtype, q: int):
    """One K/V layer of n positions, values in [-q, q], and its tree."""
    k = rng.integers(-q, q + 1, (n, 2, 24)).astype(dtype)
    v = rng.integers(-q, q + 1, (n, 2, 24)).astype(dtype)
    sk, sv = (rng.random((n, 2)).astype(np.float32) for _ in range(2))
    return [k, sk, v, sv]


def _tree(rows, n_leaves: int):
    return merkle.MerkleTree(leaf_hashes(b"kv", 3, list(range(n_leaves)), rows))


def _reference(rows, idx, proof, root, n_leaves, q) -> bool:
    """check_range on K and V, then the leaves and verify_multiproof_rows: the two checks the
    prepared call replaces."""
    k, _, v, _ = rows
    if min(int(k.min()), int(v.min())) < -q or max(int(k.max()), int(v.max())) > q:
        return False
    return merkle.verify_multiproof_rows(idx, leaf_digests(b"kv", 3, idx, rows), n_leaves,
                                         proof, root)


def _answers(rows, idx, proof, root, n_leaves, q, monkeypatch) -> set:
    w = prepare_proof(b"kv", 3, idx, rows, proof, root, n_leaves, [(-q, q), None, (-q, q), None])
    assert w is not None
    got = {native.proof_run(w, n_threads=1)}
    with monkeypatch.context() as mp:
        mp.setattr(native, "B3_SPLIT_BYTES", 1)  # split even a few rows over threads
        for t in (2, 3):
            got.add(native.proof_run(w, n_threads=t))
    return got


@pytest.mark.parametrize("dtype,q", [(np.int16, 1000), (np.int16, 32767), (np.int8, 127),
                                     (np.int8, 100)])
def test_the_prepared_group_is_the_range_check_and_the_proof(dtype, q, monkeypatch):
    rng = np.random.default_rng(q)
    answers = {True: 0, False: 0}
    for n_leaves in (1, 3, 8, 9, 33, 70):
        full = _layer(rng, n_leaves, dtype, q)
        for m in sorted({1, min(n_leaves, 2), min(n_leaves, 8), min(n_leaves, 9), n_leaves}):
            idx = np.array(sorted(rng.choice(n_leaves, m, replace=False)), np.int64)
            tree = _tree(full, n_leaves)
            proof = np.frombuffer(b"".join(merkle.multiproof(tree, idx.tolist())),
                                  np.uint8).reshape(-1, 32)
            rows = [a[idx] for a in full]
            cases = [("honest", rows, idx, proof, tree.root, n_leaves)]
            for which, at in ((0, 0), (2, -1), (0, m // 2)):  # K or V, first / last / middle row
                for value in (q + 1, -q - 1):
                    if not np.iinfo(dtype).min <= value <= np.iinfo(dtype).max:
                        continue
                    bad = [a.copy() for a in full]
                    bad[which][idx[at], 1, 5] = value
                    # committed: the tree over the bad values, so only the range can catch it
                    t2 = _tree(bad, n_leaves)
                    p2 = np.frombuffer(b"".join(merkle.multiproof(t2, idx.tolist())),
                                       np.uint8).reshape(-1, 32)
                    cases.append((f"committed {value} in {which}@{at}", [a[idx] for a in bad],
                                  idx, p2, t2.root, n_leaves))
            edge = [a.copy() for a in full]  # the range's ends are inside it
            edge[0][idx[0], 0, 0], edge[2][idx[-1], 1, 23] = -q, q
            t3 = _tree(edge, n_leaves)
            p3 = np.frombuffer(b"".join(merkle.multiproof(t3, idx.tolist())),
                               np.uint8).reshape(-1, 32)
            cases.append(("ends", [a[idx] for a in edge], idx, p3, t3.root, n_leaves))
            for s in range(4):  # one bit of any array of any row, in range: only the proof
                bad = [a.copy() for a in rows]
                flat = bad[s].view(np.uint8).reshape(m, -1)
                r, b = int(rng.integers(m)), int(rng.integers(flat.shape[1]))
                flat[r, b] ^= 1
                cases.append((f"bit in {s}", bad, idx, proof, tree.root, n_leaves))
            extra = proof[:1] if len(proof) else np.zeros((1, 32), np.uint8)
            cases += [("root", rows, idx, proof, bytes(32), n_leaves),
                      ("proof long", rows, idx, np.concatenate([proof, extra]), tree.root,
                       n_leaves),
                      ("leaves moved", rows, (idx + 1) % n_leaves if idx[-1] < n_leaves - 1
                       else idx, proof, tree.root, n_leaves),
                      ("tree wider", rows, idx, proof, tree.root, n_leaves + 1)]
            if len(proof):  # every challenged leaf known: no proof hashes to tamper with
                flip = proof.copy()
                flip[int(rng.integers(len(proof))), int(rng.integers(32))] ^= 4
                cases += [("proof bit", rows, idx, flip, tree.root, n_leaves),
                          ("proof short", rows, idx, proof[:-1], tree.root, n_leaves)]
            for name, r, i, p, root, nl in cases:
                if not np.all(i[1:] > i[:-1]):
                    continue
                want = _reference(r, i, p, root, nl, q)
                got = _answers(r, i, p, root, nl, q, monkeypatch)
                assert got == {want}, (name, n_leaves, m, got, want)
                answers[want] += 1
                if name == "honest":
                    assert want
                elif name not in ("ends", "leaves moved", "tree wider"):
                    # (a wider tree can have the same root walk: n_leaves is the receipt's)
                    assert not want, (name, n_leaves, m)
    assert answers[True] >= 8 and answers[False] >= 60, answers


def test_a_group_without_ranges_is_the_proof_alone():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((40, 64)).astype(np.float32)
    leaves = leaf_hashes(b"resid", 2, list(range(40)), [x])
    tree = merkle.MerkleTree(leaves)
    idx = np.array([0, 3, 4, 9, 10, 11, 20, 39], np.int64)
    proof = np.frombuffer(b"".join(merkle.multiproof(tree, idx.tolist())), np.uint8).reshape(-1, 32)
    w = prepare_proof(b"resid", 2, idx, [x[idx]], proof, tree.root, 40)
    assert native.proof_run(w)
    y = x[idx].copy()
    y[3, 7] = np.nextafter(y[3, 7], np.float32(np.inf))
    assert not native.proof_run(prepare_proof(b"resid", 2, idx, [y], proof, tree.root, 40))
    assert not native.proof_run(prepare_proof(b"resid", 3, idx, [x[idx]], proof, tree.root, 40))


def test_prepare_declines_what_it_cannot_take():
    """None (the caller's usual route then decides) for groups the compiled call does not take;
    proof_run refuses a struct with inconsistent arguments."""
    rng = np.random.default_rng(6)
    k = rng.integers(-5, 6, (12, 2, 8)).astype(np.int16)
    sk = np.ones((12, 2), np.float32)
    proof = np.zeros((3, 32), np.uint8)
    idx = np.arange(12, dtype=np.int64)
    r = [(-5, 5), None, (-5, 5), None]
    assert prepare_proof(b"kv", 0, idx, [k, sk, k, sk], proof, bytes(32), 12, r) is not None
    declined = [
        (idx[:0], [a[:0] for a in (k, sk, k, sk)], proof, 12, r),  # no rows
        (idx.astype(np.int32), [k, sk, k, sk], proof, 12, r),
        (idx + 2**32, [k, sk, k, sk], proof, 2**40, r),  # beyond the leaves' u32 positions
        (idx, [k, sk, k, sk], proof, 11, r),  # an index beyond the tree
        (idx, [k, sk, k, sk], proof.astype(np.int8), 12, r),
        (idx, [k, sk, k, sk], np.zeros((3, 31), np.uint8), 12, r),
        (idx, [k.astype(np.int32), sk, k, sk], proof, 12, r),  # a range on int32 values
        (idx, [k, sk, k, sk], proof, 12, [None, (0, 1), None, None]),  # a range on floats
    ]
    for i, rows, p, nl, rr in declined:
        assert prepare_proof(b"kv", 0, i, rows, p, bytes(32), nl, rr) is None, (i.dtype, nl)
    assert prepare_proof(b"kv", 0, idx, [k, sk, k, sk], proof, bytes(31), 12, r) is None
    for order in (idx[::-1].copy(), np.r_[idx[:5], idx[4:11]]):  # not increasing: not passed
        w = prepare_proof(b"kv", 0, order, [k, sk, k, sk], proof, bytes(32), 12, r)
        assert w is not None and native.proof_run(w) is False
    w = prepare_proof(b"kv", 0, idx, [k, sk, k, sk], proof, bytes(32), 12, r)
    w.args.nseg = 9
    with pytest.raises(ValueError):
        native.proof_run(w)
