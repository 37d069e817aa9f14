"""Freivalds checks of exact integer matmuls modulo two primes below 2^31.

For W [N, K] the key holds secret rows r [C, N] and v = r W mod p_c [C, K]: CHECKS rows for each
prime in PRIMES. An opened accumulator z [N] claimed to equal W x passes when r z == v x
(mod p_c) for every row. The verifier also bounds every opened |z| by K * qmax_x * qmax_w
(< 2^53), so a forged z' != z differs from z by less than p_1 * p_2 (~2^62) and is therefore
different modulo at least one prime; that prime's two independent rows each let it pass with
probability at most 1/p ~ 2^-31: at most 2^-62 per check. (One prime alone would not do: with
K = 576 and int16 x int8 the bound 2.4e9 already exceeds 2^31 - 1, so z + p would alias.)
Arithmetic is exact in int64: residues are below 2^31, products below 2^62, and each product is
reduced before summing, so sums stay below K * 2^31 < 2^63.
"""

from __future__ import annotations

import blake3
import numpy as np

PRIMES = (2**31 - 1, 2**31 - 19)
CHECKS = 2  # rows per prime
_DOMAIN = b"commitllm/freivalds/v2\x00"


def moduli() -> np.ndarray:
    """The prime of each secret row, int64 [len(PRIMES) * CHECKS]."""
    return np.repeat(np.array(PRIMES, dtype=np.int64), CHECKS)


def secret_vectors(secret: bytes, label: str, n: int) -> np.ndarray:
    """r [rows, n], row c uniform in [0, p_c) up to 2^-33 bias, from blake3 keyed by the secret."""
    if len(secret) != 32:
        raise ValueError("the Freivalds secret is 32 bytes")
    mods = moduli()
    stream = blake3.blake3(_DOMAIN + label.encode(), key=secret).digest(length=8 * n * len(mods))
    raw = np.frombuffer(stream, dtype="<u8").reshape(len(mods), n)
    return (raw % mods[:, None].astype(np.uint64)).astype(np.int64)


def project(r: np.ndarray, w: np.ndarray) -> np.ndarray:
    """v = r W mod p_c, int64 [rows, K], exact.

    r = hi * 2^16 + lo; each of r_lo @ W and r_hi @ W goes through float64 BLAS with every
    partial sum below N * 2^16 * 2^15 (< 2^53 for N < 2^22), then recombines modulo p_c.
    """
    if w.shape[0] >= 2**22:
        raise OverflowError("too many rows for an exact float64 projection")
    mods = moduli()[:, None]
    wf = w.astype(np.float64)
    lo = np.mod(((r & 0xFFFF).astype(np.float64) @ wf).astype(np.int64), mods)
    hi = np.mod(((r >> 16).astype(np.float64) @ wf).astype(np.int64), mods)
    return np.mod(hi * 65536 + lo, mods)


def dot_mod(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """sum_k a[c, k] * b[m, k] mod p_c, for residues a and any int64 b [M, K]: [M, rows]."""
    mods = moduli()
    bm = np.mod(b.astype(np.int64)[:, None, :], mods[None, :, None])  # [M, rows, K]
    prod = np.mod(a[None, :, :] * bm, mods[None, :, None])
    return np.mod(prod.sum(axis=-1), mods[None, :])


def check(r: np.ndarray, v: np.ndarray, x: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Per row of x [M, K] / z [M, N]: True where r z == v x (mod p_c) for every secret row."""
    return np.all(dot_mod(r, z) == dot_mod(v, x), axis=-1)
