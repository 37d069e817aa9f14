"""Commitments: the model (weights, config, profile) and the execution trace (residuals, K/V rows).

Model: blake3(domain || embed_root || tensors_root || blake3(config+profile JSON)). embed_root is a
Merkle tree with one leaf per embedding row (so a row opens with a proof); tensors_root has one
leaf per other quantized tensor (name and content digest).

Trace: for each layer, a Merkle tree over positions; the receipt holds the root over the layer
roots. Residual layer l holds x_l (the input of layer l; l = L is the final residual), K/V layer
l holds the quantized K and V rows and their scales. Leaf tags carry (kind, layer, position).
"""

from __future__ import annotations

import json
import struct

import blake3
import numpy as np

from .digest import array_digest
from . import merkle
from .merkle import LEAF_PREFIX, MerkleTree, leaf_hash
from .numerics.weights import QuantizedModel

MODEL_DOMAIN = b"commitllm/model/v1\x00"


def canonical_json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def embed_leaf(row: int, q: np.ndarray, s: np.float32) -> bytes:
    data = np.ascontiguousarray(q).astype(q.dtype.newbyteorder("<")).tobytes()
    return leaf_hash(b"embed" + struct.pack("<I", row), data + np.float32(s).astype("<f4").tobytes())


def embed_leaves(qm: QuantizedModel) -> list[bytes]:
    return [embed_leaf(i, qm.embed.q[i], qm.embed.s[i]) for i in range(qm.embed.q.shape[0])]


def tensor_leaves(qm: QuantizedModel) -> list[bytes]:
    out = []
    for name, arr in sorted(qm.to_tensors().items()):
        if name.startswith("embed."):
            continue
        out.append(leaf_hash(b"tensor", struct.pack("<I", len(name)) + name.encode()
                             + bytes.fromhex(array_digest(arr))))
    return out


def config_digest(qm: QuantizedModel) -> bytes:
    return blake3.blake3(canonical_json({"config": qm.cfg.to_hf_dict(),
                                         "profile": qm.profile.manifest()})).digest()


def model_commitment(embed_root: bytes, tensors_root: bytes, cfg_digest: bytes) -> bytes:
    return blake3.blake3(MODEL_DOMAIN + embed_root + tensors_root + cfg_digest).digest()


def commit_model(qm: QuantizedModel) -> dict:
    """{'commitment', 'embed_root', 'tensors_root', 'config_digest'} as bytes."""
    embed_root = MerkleTree(embed_leaves(qm)).root
    tensors_root = MerkleTree(tensor_leaves(qm)).root
    cd = config_digest(qm)
    return {"commitment": model_commitment(embed_root, tensors_root, cd), "embed_root": embed_root,
            "tensors_root": tensors_root, "config_digest": cd}


# --- execution trace --------------------------------------------------------------------------


def leaf_digests(kind: bytes, layer: int, positions, arrays) -> np.ndarray:
    """leaf_hashes as uint8 [n, 32] (the compiled core's rows as they come out)."""
    n = len(positions)
    core = merkle._core() if n >= merkle.NATIVE_MIN else None
    if core is None:
        return np.frombuffer(b"".join(leaf_hashes(kind, layer, positions, arrays)),
                             np.uint8).reshape(n, 32)
    return _native_leaves(core, kind, layer, positions, arrays)


def _leaf_segments(kind: bytes, layer: int, positions, arrays) -> list[np.ndarray]:
    """The leaves' bytes as b3_rows segments: a header row per position (prefix, kind, layer,
    position), then each array's rows as little-endian bytes (views where they lie)."""
    n = len(positions)
    head = LEAF_PREFIX + kind + struct.pack("<I", layer)
    top = np.empty((n, len(head) + 4), np.uint8)
    top[:, :len(head)] = np.frombuffer(head, np.uint8)
    top[:, len(head):] = np.asarray(positions, dtype="<u4").reshape(n, 1).view(np.uint8)
    return [top] + [_le_bytes(np.asarray(a).reshape(n, -1)) for a in arrays]


def _native_leaves(core, kind: bytes, layer: int, positions, arrays) -> np.ndarray:
    return core.b3_rows(_leaf_segments(kind, layer, positions, arrays))


def prepare_proof(kind: bytes, layer: int, positions: np.ndarray, arrays, proof: np.ndarray,
                  root: bytes, n_leaves: int, ranges=None):
    """A trace proof group (leaf_digests, then merkle.verify_multiproof_rows against root) as
    one compiled call, its arguments built now (native.proof_prepare): positions int64 [n] the
    rows' leaf indices; ranges[i] None or (lo, hi) for arrays[i], an int8 / int16 array whose
    values must lie in [lo, hi] (the opening's deferred K/V range check, on the same bytes as
    they are hashed). None when the compiled core cannot take it (no rows, positions past
    2^32, other dtypes): the caller checks it the usual way. native.proof_run(prepared) then
    answers only whether everything passed."""
    core = merkle._core()
    # (dtype, shape, order and the tree's bound: native.proof_prepare and b3_proof check them)
    if core is None or positions.dtype != np.int64 or positions.ndim != 1 \
            or not len(positions) or int(positions[-1]) >= 2**32:  # headers hold u32 positions
        return None
    arrays = [np.asarray(a) for a in arrays]
    spans = [None]  # the header segment is never range-checked
    for a, r in zip(arrays, ranges or [None] * len(arrays)):
        if r is not None and a.dtype not in (np.int8, np.int16):
            return None
        spans.append(None if r is None else (a.dtype.itemsize, *r))
    segs = _leaf_segments(kind, layer, positions, arrays)
    return core.proof_prepare(segs, spans, positions, n_leaves, proof, merkle.NODE_PREFIX, root)


def leaf_hashes(kind: bytes, layer: int, positions, arrays) -> list[bytes]:
    """leaf_hash(kind + <II layer, position>, row bytes of each array, little-endian) for every
    position at once: arrays hold one row per position ([n, ...] each). The compiled core hashes
    the header and the arrays' rows where they lie (native.b3_rows); without it the same bytes
    are written into one preallocated [n, width] buffer (one copy per array, byte order
    converted on the way) and hashed a row at a time from it."""
    n = len(positions)
    if n == 0:
        return []
    core = merkle._core() if n >= merkle.NATIVE_MIN else None
    if core is not None:
        return merkle.digests(_native_leaves(core, kind, layer, positions, arrays))
    head = LEAF_PREFIX + kind + struct.pack("<I", layer)
    parts = [np.asarray(a).reshape(n, -1) for a in arrays]
    off = len(head) + 4
    w = off + sum(a.shape[1] * a.dtype.itemsize for a in parts)
    rows = np.empty((n, w), np.uint8)
    rows[:, :len(head)] = np.frombuffer(head, np.uint8)
    rows[:, len(head):off] = np.asarray(positions, dtype="<u4").reshape(n, 1).view(np.uint8)
    for a in parts:
        width = a.shape[1] * a.dtype.itemsize
        np.copyto(rows[:, off:off + width].view(a.dtype.newbyteorder("<")), a, casting="equiv")
        off += width
    mv, b3 = memoryview(rows).cast("B"), blake3.blake3
    return [b3(mv[i * w:(i + 1) * w]).digest() for i in range(n)]


def _le_bytes(a: np.ndarray) -> np.ndarray:
    """a [n, k] as uint8 [n, k * itemsize]: its rows' little-endian bytes, a view when the rows
    are contiguous, in ascending order and little-endian already."""
    le = a.dtype.newbyteorder("<")
    if a.dtype != le or a.strides[1] != a.dtype.itemsize or a.strides[0] < 0:
        a = np.ascontiguousarray(a, dtype=le)
    return a.view(np.uint8) if a.shape[1] else np.empty((a.shape[0], 0), np.uint8)


def resid_leaf(layer: int, pos: int, x: np.ndarray) -> bytes:
    return leaf_hash(b"resid" + struct.pack("<II", layer, pos), x.astype("<f4").tobytes())


def kv_bytes(k, sk, v, sv) -> bytes:
    return b"".join(np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<")).tobytes()
                    for a in (k, sk, v, sv))


def kv_leaf(layer: int, pos: int, k, sk, v, sv) -> bytes:
    return leaf_hash(b"kv" + struct.pack("<II", layer, pos), kv_bytes(k, sk, v, sv))


def layer_leaf(kind: bytes, layer: int, root: bytes) -> bytes:
    return leaf_hash(kind + b"-layer" + struct.pack("<I", layer), root)


class TraceTrees:
    """Per-layer position trees for residuals (L + 1 layers) and K/V rows (L layers)."""

    def __init__(self, resid: np.ndarray | None, k, sk, v, sv, resid_leaves=None):
        """resid fp32 [L+1, T, H]; k, v int [L, T, nkv, d]; sk, sv fp32 [L, T, nkv].
        resid_leaves: the residual leaves [L+1][T] instead of resid, hashed as they were made
        (the serving scheduler's, some from the prefix cache)."""
        if resid_leaves is None:
            pos = range(resid.shape[1])
            resid_leaves = [leaf_hashes(b"resid", l, pos, [resid[l]])
                            for l in range(resid.shape[0])]
        self.resid_trees = [MerkleTree(list(leaves)) for leaves in resid_leaves]
        self.kv_trees = [MerkleTree(leaf_hashes(b"kv", l, range(k.shape[1]),
                                                [k[l], sk[l], v[l], sv[l]]))
                         for l in range(k.shape[0])]
        self.resid_layer_roots = [t.root for t in self.resid_trees]
        self.kv_layer_roots = [t.root for t in self.kv_trees]
        self.resid_root = MerkleTree([layer_leaf(b"resid", l, r)
                                      for l, r in enumerate(self.resid_layer_roots)]).root
        self.kv_root = MerkleTree([layer_leaf(b"kv", l, r)
                                   for l, r in enumerate(self.kv_layer_roots)]).root


def layer_roots_match(kind: bytes, layer_roots: list[bytes], root: bytes) -> bool:
    import hmac

    got = MerkleTree([layer_leaf(kind, l, r) for l, r in enumerate(layer_roots)]).root
    return hmac.compare_digest(got, root)
