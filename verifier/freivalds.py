"""Freivalds checks of exact integer matmuls modulo two primes below 2^31.

For W [N, K] the key holds secret rows r [C, N] and v = r W mod p_c [C, K]: CHECKS rows for each
prime in PRIMES. An opened accumulator z [N] claimed to equal W x passes when r z == v x
(mod p_c) for every row. The verifier also bounds every opened |z| by K * qmax_x * qmax_w
(< 2^53), so a forged z' != z differs from z by less than p_1 * p_2 (~2^62) and is therefore
different modulo at least one prime; that prime's two independent rows each let it pass with
probability at most 1/p ~ 2^-31: at most 2^-62 per check. (One prime alone would not do: with
K = 576 and int16 x int8 the bound 2.4e9 already exceeds 2^31 - 1, so z + p would alias.)
Arithmetic is exact: the sums go through float64 BLAS on limbs small enough that every product
and partial sum is an integer below 2^53 (see dot_mod); `dot_mod_reference` is the plain int64
twin the tests compare it with.
"""

from __future__ import annotations

from functools import lru_cache

import blake3
import numpy as np

PRIMES = (2**31 - 1, 2**31 - 19)
CHECKS = 2  # rows per prime
_DOMAIN = b"commitllm/freivalds/v2\x00"


def moduli() -> np.ndarray:
    """The prime of each secret row, int64 [len(PRIMES) * CHECKS]."""
    return np.repeat(np.array(PRIMES, dtype=np.int64), CHECKS)


_MODULI = moduli()
_MODULI.setflags(write=False)


def secret_vectors(secret: bytes, label: str, n: int) -> np.ndarray:
    """r [rows, n], row c uniform in [0, p_c) up to 2^-33 bias, from blake3 keyed by the secret."""
    if len(secret) != 32:
        raise ValueError("the Freivalds secret is 32 bytes")
    mods = moduli()
    stream = blake3.blake3(_DOMAIN + label.encode(), key=secret).digest(length=8 * n * len(mods))
    raw = np.frombuffer(stream, dtype="<u8").reshape(len(mods), n)
    return (raw % mods[:, None].astype(np.uint64)).astype(np.int64)


def project(r: np.ndarray, w: np.ndarray, block: int = 4096) -> np.ndarray:
    """v = r W mod p_c, int64 [rows, K], exact.

    r = hi * 2^16 + lo; each of r_lo @ W and r_hi @ W goes through float64 BLAS with every
    partial sum below N * 2^16 * 2^15 (< 2^53 for N < 2^22), then recombines modulo p_c. W is
    converted to float64 `block` rows at a time (a 70B MLP matrix would take 3.8 GB at once).
    """
    if w.shape[0] >= 2**22:
        raise OverflowError("too many rows for an exact float64 projection")
    mods = moduli()[:, None]
    acc = np.zeros((r.shape[0], w.shape[1]), dtype=np.int64)
    for i in range(0, w.shape[0], block):
        wf, ri = w[i:i + block].astype(np.float64), r[:, i:i + block]
        lo = ((ri & 0xFFFF).astype(np.float64) @ wf).astype(np.int64)
        hi = ((ri >> 16).astype(np.float64) @ wf).astype(np.int64)
        acc = np.mod(acc + np.mod(hi, mods) * 65536 + lo, mods)  # < 2^31 + 2^47 + 2^53
    return acc


A_LIMB = 16  # residues < 2^31 split into two 16-bit limbs
EXACT_BITS = 53  # float64 holds every integer below 2^53
BLOCK_ELEMS = 1 << 15  # elements of b per column block in dot_mod (its limbs: 2-3 times that)


def limbs(a: np.ndarray) -> np.ndarray:
    """Residues a [R, N] (0 <= a < 2^31) as float64 [N, 2R]: the low 16-bit limbs, then the
    high ones. What dot_mod multiplies by; a verifier computes it once per matrix."""
    if a.dtype != np.int64 or np.any((a < 0) | (a >= 2**31)):
        raise ValueError("limbs expects int64 residues below 2^31")
    return np.ascontiguousarray(np.concatenate([a & 0xFFFF, a >> A_LIMB]).T, dtype=np.float64)


def b_limb_bits(n: int) -> int:
    """Width of the limbs of b in dot_mod: n * 2^16 * 2^bits <= 2^53 keeps every sum exact."""
    return EXACT_BITS - A_LIMB - max(1, int(n - 1).bit_length())


def dot_mod(a_limbs: np.ndarray, b: np.ndarray, bound: int) -> np.ndarray:
    """sum_k a[c, k] * b[m, k] mod p_c for int b [M, N] with |b| <= bound: int64 [M, R].

    a_limbs = limbs(a). b is cut into signed limbs of w = b_limb_bits(N) bits (low limbs in
    [0, 2^w), the top one arithmetic-shifted, |top| <= 2^w), so each limb-by-limb product is at
    most (2^16 - 1) * 2^w and each BLAS sum over N terms at most N (2^16 - 1) 2^w < 2^53: exact
    in any order (also summed block by block: every partial sum is a sum of fewer such terms).
    The sums are reduced modulo p_c and recombined with 2^shift mod p_c.

    b may also be float64 holding integers (an int array converted exactly, bound < 2^53): its
    limbs are then cut in float64, floor(b / 2^w) and b - 2^w floor(b / 2^w), every step exact,
    the same limbs as the integer shifts give.
    """
    n, rows = a_limbs.shape[0], a_limbs.shape[1] // 2
    if (b.ndim != 2 or b.shape[-1] != n or rows != len(moduli())
            or not (b.dtype.kind == "i" or b.dtype == np.float64)):
        raise ValueError(f"dot_mod: b {b.dtype} {b.shape} does not match limbs {a_limbs.shape}")
    w = b_limb_bits(n)
    if w < 1 or bound >= 2**62 or (b.dtype.kind == "f" and bound >= 2**EXACT_BITS):
        raise OverflowError(f"dot_mod: N={n} with bound {bound} cannot be summed exactly")
    count = 1
    while bound >> (count * w):
        count += 1
    if b.max(initial=0) > bound or b.min(initial=0) < -bound:
        raise OverflowError("dot_mod: a value of b exceeds its bound")
    m = b.shape[0]
    acc = np.zeros((count * m, 2 * rows), dtype=np.float64)
    step = min(max(BLOCK_ELEMS // max(m, 1), 2048), n) if n else 1
    for s in range(0, n, step):  # column blocks: the limb temporaries stay in cache
        # all limbs of the block in one product: the limbs of a are read once
        acc += _limbs_of(b[:, s:s + step], w, count, bound) @ a_limbs[s:s + step]  # exact
    mods = _MODULI
    sums = np.mod(acc.astype(np.int64).reshape(count, m, 2, rows), mods)  # < 2^31
    sums *= _limb_scales(w, count)[:, None]  # 2^(i w + 16 j) mod p_c: products < 2^62
    np.mod(sums, mods, out=sums)
    return np.mod(sums.sum(axis=(0, 2)), mods)  # 2 count terms < 2^31 each


@lru_cache(maxsize=64)
def _limb_scales(w: int, count: int) -> np.ndarray:
    """2^(i w + 16 j) mod p_c, int64 [count, 2, rows]: the weight of limb i of b times limb j
    of a."""
    out = np.array([[[pow(2, i * w + j * A_LIMB, int(p)) for p in _MODULI] for j in range(2)]
                    for i in range(count)], dtype=np.int64)
    out.setflags(write=False)
    return out


def _limbs_of(blk: np.ndarray, w: int, count: int, bound: int) -> np.ndarray:
    """The count limbs of w bits of blk [m, k] (lowest first), float64 [count * m, k]."""
    if count == 1:
        return blk.astype(np.float64, copy=False)  # exact: |b| <= bound < 2^w
    out = np.empty((count, *blk.shape), dtype=np.float64)
    if bound >= 2**EXACT_BITS:  # int64 beyond float64's integers: integer shifts
        for i in range(count):
            out[i] = blk >> (i * w) if i == count - 1 else (blk >> (i * w)) & ((1 << w) - 1)
        return out.reshape(count * blk.shape[0], blk.shape[1])
    rest = blk.astype(np.float64, copy=False)  # exact: |b| <= bound < 2^53
    for i in range(count - 1):  # floor(b / 2^w) and b - 2^w floor(b / 2^w): exact
        hi = np.multiply(rest, 2.0 ** -w, out=out[i + 1])
        np.floor(hi, out=hi)
        lo = np.multiply(hi, 2.0 ** w, out=out[0] if i == 0 else None)  # (rest is out[i] if i)
        np.subtract(rest, lo, out=out[i])
        rest = hi
    return out.reshape(count * blk.shape[0], blk.shape[1])


def dot_mod_reference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """dot_mod in plain int64 (each product reduced before summing): the tests' reference."""
    mods = moduli()
    bm = np.mod(b.astype(np.int64)[:, None, :], mods[None, :, None])  # [M, rows, K]
    prod = np.mod(a[None, :, :] * bm, mods[None, :, None])
    return np.mod(prod.sum(axis=-1), mods[None, :])


def check(r_limbs: np.ndarray, v_limbs: np.ndarray, x: np.ndarray, z: np.ndarray,
          x_bound: int, z_bound: int) -> np.ndarray:
    """Per row of x [M, K] / z [M, N]: True where r z == v x (mod p_c) for every secret row.
    r_limbs = limbs(r), v_limbs = limbs(v); |x| <= x_bound and |z| <= z_bound (range-checked
    by the caller; dot_mod refuses values beyond them)."""
    return np.all(dot_mod(r_limbs, z, z_bound) == dot_mod(v_limbs, x, x_bound), axis=-1)
