"""Freivalds checks of exact integer matmuls modulo the prime 2^31 - 1.

For W [N, K] the key holds secret r [C, N] and v = r W mod p [C, K]. An opened accumulator z [N]
claimed to equal W x passes when r z == v x (mod p) for all C rows. A wrong z passes one row
with probability at most 1/p = 2^-31; C = 2 independent rows give at most 2^-62 per check.
Arithmetic is exact in int64: residues are below 2^31, products below 2^62, and sums are reduced
after every product so they never exceed N * 2^31 < 2^63.
"""

from __future__ import annotations

import blake3
import numpy as np

PRIME = 2**31 - 1
CHECKS = 2
_DOMAIN = b"commitllm/freivalds/v1\x00"


def secret_vectors(secret: bytes, label: str, n: int, checks: int = CHECKS) -> np.ndarray:
    """r [checks, n] uniform in [0, p) up to 2^-33 bias, from blake3 keyed by the secret."""
    if len(secret) != 32:
        raise ValueError("the Freivalds secret is 32 bytes")
    stream = blake3.blake3(_DOMAIN + label.encode(), key=secret).digest(length=8 * n * checks)
    return (np.frombuffer(stream, dtype="<u8") % np.uint64(PRIME)).astype(np.int64).reshape(checks, n)


def project(r: np.ndarray, w: np.ndarray) -> np.ndarray:
    """v = r W mod p, int64 [C, K], exact.

    r = hi * 2^16 + lo; each of r_lo @ W and r_hi @ W goes through float64 BLAS with every
    partial sum below N * 2^16 * 2^15 (< 2^53 for N < 2^22), then recombines modulo p.
    """
    if w.shape[0] >= 2**22:
        raise OverflowError("too many rows for an exact float64 projection")
    wf = w.astype(np.float64)
    lo = (r & 0xFFFF).astype(np.float64) @ wf
    hi = (r >> 16).astype(np.float64) @ wf
    lo_m = np.mod(lo.astype(np.int64), PRIME)
    hi_m = np.mod(hi.astype(np.int64), PRIME)
    return np.mod(hi_m * 65536 + lo_m, PRIME)


def dot_mod(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """sum_k a[c, k] * b[..., k] mod p for residues a (< p) and any int64 b: [..., C]."""
    bm = np.mod(b.astype(np.int64), PRIME)  # [..., K]
    prod = np.mod(a[None, :, :] * bm.reshape(-1, 1, bm.shape[-1]), PRIME)  # [M, C, K]
    return np.mod(prod.sum(axis=-1), PRIME).reshape(*b.shape[:-1], a.shape[0])


def check(r: np.ndarray, v: np.ndarray, x: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Per row of x [M, K] / z [M, N]: True where r z == v x (mod p) for every check vector."""
    return np.all(dot_mod(r, z) == dot_mod(v, x), axis=-1)
