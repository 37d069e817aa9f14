"""blake3 Merkle trees with domain-separated leaves and nodes.

Leaf: H(0x00 || "commitllm/leaf/v1" || tag || data). Node: H(0x01 || "commitllm/node/v1" || L || R).
A level with an odd count carries its last node up unchanged. The tags and the hash are fixed
here; nothing is read from the data being verified.
"""

from __future__ import annotations

import hmac

import blake3

LEAF_PREFIX = b"\x00commitllm/leaf/v1\x00"
NODE_PREFIX = b"\x01commitllm/node/v1\x00"
EMPTY_ROOT = blake3.blake3(b"\x02commitllm/empty/v1").digest()
MAX_DEPTH = 64


def leaf_hash(tag: bytes, data: bytes) -> bytes:
    return blake3.blake3(LEAF_PREFIX + tag + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return blake3.blake3(NODE_PREFIX + left + right).digest()


def build_levels(leaves: list[bytes]) -> list[list[bytes]]:
    """All levels, leaves first, root last."""
    if not leaves:
        return [[EMPTY_ROOT]]
    levels = [list(leaves)]
    while len(levels[-1]) > 1:
        cur = levels[-1]
        nxt = [node_hash(cur[i], cur[i + 1]) for i in range(0, len(cur) - 1, 2)]
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
