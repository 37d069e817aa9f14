"""blake3 Merkle trees with domain-separated leaves and nodes.

Leaf: H(0x00 || "commitllm/leaf/v1" || tag || data). Node: H(0x01 || "commitllm/node/v1" || L || R).
A level with an odd count carries its last node up unchanged. The tags and the hash are fixed
here; nothing is read from the data being verified.

The leaf and node hashes of many rows run through the compiled core's BLAKE3 (native/hash.c,
every row at once) when it is available, with the same digests; the functions below without
it, and `verify_multiproof_spec`, are the normative definitions (tests/test_hash_native.py).
"""

from __future__ import annotations

import hmac

import blake3
import numpy as np

LEAF_PREFIX = b"\x00commitllm/leaf/v1\x00"
NODE_PREFIX = b"\x01commitllm/node/v1\x00"
EMPTY_ROOT = blake3.blake3(b"\x02commitllm/empty/v1").digest()
MAX_DEPTH = 64


def leaf_hash(tag: bytes, data: bytes) -> bytes:
    return blake3.blake3(LEAF_PREFIX + tag + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return blake3.blake3(NODE_PREFIX + left + right).digest()


# below this many hashes of a level the per-call Python route is as fast as the compiled one
NATIVE_MIN = 8


def _core():
    """The compiled core's BLAKE3 (native.b3_many, b3_multiproof), or None."""
    from . import native
    return native if native.lib() is not None else None


def digests(d: np.ndarray) -> list[bytes]:
    """uint8 [n, 32] digests as a list of 32-byte strings."""
    b = d.tobytes()
    return [b[i:i + 32] for i in range(0, len(b), 32)]


def node_hashes(left: list[bytes], right: list[bytes]) -> list[bytes]:
    """[node_hash(l, r) for l, r in zip(left, right)], of 32-byte hashes, all at once in the
    compiled core when it is there."""
    core = _core() if len(left) >= NATIVE_MIN else None
    if core is None or any(len(h) != 32 for h in left) or any(len(h) != 32 for h in right):
        return [node_hash(a, b) for a, b in zip(left, right)]
    n = len(left)
    rows = np.empty((n, len(NODE_PREFIX) + 64), np.uint8)
    rows[:, :len(NODE_PREFIX)] = np.frombuffer(NODE_PREFIX, np.uint8)
    rows[:, len(NODE_PREFIX):-32] = np.frombuffer(b"".join(left), np.uint8).reshape(n, 32)
    rows[:, -32:] = np.frombuffer(b"".join(right), np.uint8).reshape(n, 32)
    return digests(core.b3_many(rows, n_threads=1))


def build_levels(leaves: list[bytes]) -> list[list[bytes]]:
    """All levels, leaves first, root last."""
    if not leaves:
        return [[EMPTY_ROOT]]
    levels = [list(leaves)]
    while len(levels[-1]) > 1:
        cur = levels[-1]
        nxt = node_hashes(cur[0:len(cur) - 1:2], cur[1::2])
        if len(cur) % 2:
            nxt.append(cur[-1])
        levels.append(nxt)
    return levels


class MerkleTree:
    """A tree over leaf hashes, with inclusion proofs."""

    def __init__(self, leaves: list[bytes]):
        self.n = len(leaves)
        self.levels = build_levels(leaves)

    @property
    def root(self) -> bytes:
        return self.levels[-1][0]

    def proof(self, index: int) -> list[bytes]:
        """Sibling hashes from the leaf up (levels where the node has no sibling are skipped)."""
        if not 0 <= index < self.n:
            raise IndexError(f"leaf {index} outside [0, {self.n})")
        out = []
        for level in self.levels[:-1]:
            sib = index ^ 1
            if sib < len(level):
                out.append(level[sib])
            index //= 2
        return out


def root_from_proof(leaf: bytes, index: int, n_leaves: int, proof: list[bytes]) -> bytes | None:
    """The root implied by a proof, or None if the proof has the wrong shape for (index, n)."""
    if not (0 <= index < n_leaves) or n_leaves > 2**MAX_DEPTH:
        return None
    node, width, used = leaf, n_leaves, 0
    while width > 1:
        sib = index ^ 1
        if sib < width:
            if used >= len(proof) or len(proof[used]) != 32:
                return None
            node = node_hash(node, proof[used]) if index % 2 == 0 else node_hash(proof[used], node)
            used += 1
        index, width = index // 2, (width + 1) // 2
    return node if used == len(proof) else None


def verify_proof(leaf: bytes, index: int, n_leaves: int, proof: list[bytes], root: bytes) -> bool:
    got = root_from_proof(leaf, index, n_leaves, proof)
    return got is not None and hmac.compare_digest(got, root)


def root_naive(leaves: list[bytes]) -> bytes:
    """Recursive twin of build_levels, for tests."""
    if not leaves:
        return EMPTY_ROOT
    if len(leaves) == 1:
        return leaves[0]
    pairs = [node_hash(leaves[i], leaves[i + 1]) for i in range(0, len(leaves) - 1, 2)]
    return root_naive(pairs + ([leaves[-1]] if len(leaves) % 2 else []))


def multiproof(tree: MerkleTree, indices) -> list[bytes]:
    """Sibling hashes that, with the leaves at `indices`, rebuild the root (bottom-up order)."""
    known = sorted(set(int(i) for i in indices))
    if known and not (0 <= known[0] and known[-1] < tree.n):
        raise IndexError("leaf index outside the tree")
    out = []
    for level in tree.levels[:-1]:
        have = set(known)
        out += [level[i ^ 1] for i in known if (i ^ 1) < len(level) and (i ^ 1) not in have]
        known = sorted({i // 2 for i in known})
    return out


def verify_multiproof(leaves: dict[int, bytes], n_leaves: int, proof: list[bytes],
                      root: bytes) -> bool:
    """verify_multiproof_spec, through the compiled core's walk (native/hash.c) when it is there
    and every hash is 32 bytes (the spec's answer otherwise)."""
    if (len(leaves) < NATIVE_MIN or not 0 < n_leaves < 2**63
            or any(not 0 <= i < n_leaves for i in leaves)
            or any(len(h) != 32 for h in leaves.values())):
        return verify_multiproof_spec(leaves, n_leaves, proof, root)  # (indices beyond int64)
    items = sorted(leaves.items())
    idx = np.fromiter((i for i, _ in items), np.int64, len(items))
    hashes = np.frombuffer(b"".join(h for _, h in items), np.uint8).reshape(-1, 32)
    return verify_multiproof_rows(idx, hashes, n_leaves, proof, root)


def verify_multiproof_rows(idx: np.ndarray, hashes: np.ndarray, n_leaves: int,
                           proof, root: bytes) -> bool:
    """verify_multiproof with the known leaves as arrays: idx int64 [m] (strictly increasing),
    hashes uint8 [m, 32] (a verifier's leaf digests, never turned into Python objects); proof a
    list of hashes or their rows, uint8 [k, 32]. The compiled walk when it can take them, else
    the spec on the same leaves."""
    rows = isinstance(proof, np.ndarray)
    if rows and (proof.dtype != np.uint8 or proof.ndim != 2 or proof.shape[1] != 32):
        return False  # not 32-byte hashes: no root can come of it (the spec's answer too)
    core = _core() if len(idx) >= NATIVE_MIN else None
    ok = (core is not None and idx.dtype == np.int64 and idx.ndim == 1
          and hashes.shape == (len(idx), 32) and hashes.dtype == np.uint8
          and 0 < n_leaves < 2**63 and idx[0] >= 0 and idx[-1] < n_leaves
          and bool(np.all(idx[1:] > idx[:-1])) and len(root) == 32
          and (rows or all(len(h) == 32 for h in proof)))
    if not ok:
        return verify_multiproof_spec(dict(zip(np.asarray(idx).tolist(), digests(hashes))),
                                      n_leaves, digests(proof) if rows else proof, root)
    pr = proof if rows else np.frombuffer(b"".join(proof), np.uint8).reshape(-1, 32)
    got = core.b3_multiproof(idx, hashes, n_leaves, pr, NODE_PREFIX)
    return got is not None and hmac.compare_digest(got, root)


def verify_multiproof_spec(leaves: dict[int, bytes], n_leaves: int, proof: list[bytes],
                           root: bytes) -> bool:
    """True when `leaves` (index -> leaf hash) and `proof` rebuild `root` exactly.

    Each level is one pass over its known nodes in index order: a node pairs with its known
    sibling, is carried up when it has none (the last of an odd level), or takes the next proof
    hash (the order `multiproof` writes them)."""
    if not leaves or n_leaves > 2**MAX_DEPTH or any(not 0 <= i < n_leaves for i in leaves):
        return False
    items, width, used, b3 = sorted(leaves.items()), n_leaves, 0, blake3.blake3
    while width > 1:
        nxt: list[tuple[int, bytes]] = []
        k, count = 0, len(items)
        while k < count:
            i, h = items[k]
            if i % 2 == 0 and k + 1 < count and items[k + 1][0] == i + 1:
                nxt.append((i // 2, b3(NODE_PREFIX + h + items[k + 1][1]).digest()))
                k += 2
                continue
            k += 1
            if (i ^ 1) >= width:
                nxt.append((i // 2, h))
                continue
            if used >= len(proof) or len(proof[used]) != 32:
                return False
            other, used = proof[used], used + 1
            pair = NODE_PREFIX + (h + other if i % 2 == 0 else other + h)
            nxt.append((i // 2, b3(pair).digest()))
        items, width = nxt, (width + 1) // 2
    known = dict(items)
    return used == len(proof) and hmac.compare_digest(known[0], root)
