"""Freivalds checks of exact integer matmuls with one secret row modulo P = 2^61 - 1.

For W [N, K] the key holds v = r W mod P [K] for a secret row r [N] (residues in [0, P)). An
opened accumulator row z [N] claimed to equal W x passes when r z == v x (mod P). The verifier
first bounds every opened |z| by K * qmax_x * qmax_w (< 2^53), so a forged z' != W x differs
from it by d with 0 < |d_i| < 2^54 < P in some coordinate i: d != 0 mod P, and for any fixed
value of the other coordinates of r exactly one residue of r_i makes r d == 0 (mod P); r_i takes
each residue with probability at most 2^-60 (see secret_vector), so a forged row passes with
probability at most 2^-60 per check. docs/PROTOCOL.md has the argument in full.

Arithmetic is exact on every route, and every route gives the same residues:
  - the compiled core (native.fv_dot): the secret read as its residues and cut in registers
    into three limbs of at most 21 bits, exact int64 block sums, reduced modulo P (2^61 = 1
    mod P) and recombined by rotations;
  - numpy (`dot`, without the compiled core): the secret as four 16-bit limbs in float64, the
    opened integers as limbs of w = 37 - ceil(log2 N) bits, one float64 BLAS product in which
    every product and partial sum is an integer below 2^53;
  - `dot_reference`: Python integers, the tests' reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import blake3
import numpy as np

P = 2**61 - 1
SCHEME = {"modulus": "2^61-1", "rows": 1}  # the key's "freivalds" metadata
_DOMAIN = b"commitllm/freivalds/v3\x00"
USE_NATIVE: bool | None = None  # dot's route when not given: None, the compiled core when built
_P64 = np.uint64(P)


def secret_vector(secret: bytes, label: str, n: int) -> np.ndarray:
    """r int64 [n] in [0, P) from blake3-XOF keyed by the secret over the label: the top 61 bits
    of each little-endian u64, reduced mod P (2^61 - 1 -> 0). Residue 0 then has probability
    2^-60 and every other one 2^-61."""
    if len(secret) != 32:
        raise ValueError("the Freivalds secret is 32 bytes")
    stream = blake3.blake3(_DOMAIN + label.encode(), key=secret).digest(length=8 * n)
    raw = np.frombuffer(stream, dtype="<u8") >> np.uint64(3)
    return np.where(raw == _P64, np.uint64(0), raw).astype(np.int64)


def _mod_i64(s: np.ndarray) -> np.ndarray:
    """int64 (any value) -> uint64 residues mod P."""
    return np.mod(s, np.int64(P)).astype(np.uint64)


def _shift(x: np.ndarray, k: int) -> np.ndarray:
    """x * 2^k mod P for uint64 residues x: a rotation of 61 bits (2^61 = 1 mod P)."""
    k %= 61
    if k == 0:
        return x
    return ((x << np.uint64(k)) & _P64) | (x >> np.uint64(61 - k))


def _add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    s = a + b  # both below P < 2^61: no wrap
    return np.where(s >= _P64, s - _P64, s)


A_LIMB = 16  # the secret's limbs in the numpy route
A_LIMBS = 4  # 16 + 16 + 16 + 13 bits
EXACT_BITS = 53  # float64 holds every integer below 2^53
BLOCK_ELEMS = 1 << 15  # elements of b per column block (its limbs: a few times that)


def project(r: np.ndarray, w: np.ndarray, block: int = 4096) -> np.ndarray:
    """v = r W mod P, int64 [K], exact, for int8/int16 W [N, K].

    r is cut into four 16-bit limbs; each limb row times a block of W goes through float64 BLAS
    with every partial sum below N * 2^16 * 2^15 (< 2^53 for N < 2^22); the sums are reduced
    mod P and recombined by rotations. W is converted to float64 `block` rows at a time (a 70B
    MLP matrix would take 3.8 GB at once)."""
    if w.shape[0] >= 2**22 or np.abs(w).max(initial=0) > 2**15:
        raise OverflowError("too many rows or too wide weights for an exact float64 projection")
    if r.shape != (w.shape[0],):
        raise ValueError(f"project: r {r.shape} does not match W {w.shape}")
    acc = np.zeros(w.shape[1], dtype=np.uint64)
    for i in range(0, w.shape[0], block):
        wf, ri = w[i:i + block].astype(np.float64), r[i:i + block]
        parts = np.stack([(ri >> (A_LIMB * j)) & 0xFFFF for j in range(A_LIMBS)]).astype(
            np.float64) @ wf  # [4, K], |.| < 2^53: exact
        for j in range(A_LIMBS):
            acc = _add(acc, _shift(_mod_i64(parts[j].astype(np.int64)), A_LIMB * j))
    return acc.astype(np.int64)


@dataclass(frozen=True, eq=False)
class Prepared:
    """A secret vector (r, or v = r W) in the forms the dot products multiply by: its int64
    residues (the compiled core) and float64 [N, 4] 16-bit limbs (numpy; built when first used)."""

    a: np.ndarray  # int64 [N], residues

    @property
    def n(self) -> int:
        return self.a.shape[0]

    def float_limbs(self) -> np.ndarray:
        return _cached(self, "_float", lambda: np.ascontiguousarray(np.stack(
            [(self.a >> (A_LIMB * j)) & 0xFFFF for j in range(A_LIMBS)], axis=1)
            .astype(np.float64)))


def _cached(obj, name: str, make):
    got = obj.__dict__.get(name)
    if got is None:
        got = make()
        object.__setattr__(obj, name, got)
    return got


def prepare(a: np.ndarray) -> Prepared:
    """Check that a is int64 [N] residues below P and wrap it for `dot`."""
    a = np.ascontiguousarray(a)
    if a.dtype != np.int64 or a.ndim != 1 or np.any((a < 0) | (a >= P)):
        raise ValueError("a Freivalds vector is int64 [N] residues below 2^61 - 1")
    return Prepared(a)


def dot(prep: Prepared, b: np.ndarray, bound: int, native: bool | None = None) -> np.ndarray:
    """sum_i a[i] * b[m, i] mod P for int b [M, N] with |b| <= bound (< 2^53): uint64 [M].

    b may also be float64 holding integers (an int array converted exactly). Values beyond the
    bound are refused (OverflowError). native: the compiled core (default: when it is built)."""
    n = prep.n
    if b.ndim != 2 or b.shape[1] != n or not (b.dtype.kind == "i" or b.dtype == np.float64):
        raise ValueError(f"freivalds.dot: b {b.dtype} {b.shape} does not match N = {n}")
    if bound >= 2**EXACT_BITS:
        raise OverflowError(f"freivalds.dot: bound {bound} is not below 2^53")
    from . import native as core

    if native is None:
        native = USE_NATIVE if USE_NATIVE is not None else core.lib() is not None
    if native and b.dtype != np.float64:
        return core.fv_dot(prep.a, b, bound)  # checks the bound on the way
    if b.size and (b.max() > bound or b.min() < -bound):
        raise OverflowError("freivalds.dot: a value of b exceeds its bound")
    if native:
        return core.fv_dot(prep.a, b.astype(np.int64), bound)  # exact below 2^53
    return _dot_numpy(prep.float_limbs(), b, bound)


def b_limb_bits(n: int) -> int:
    """Width of the limbs of b in the numpy route: n * 2^16 * 2^bits <= 2^53 keeps sums exact."""
    return EXACT_BITS - A_LIMB - max(1, int(n - 1).bit_length())


def _dot_numpy(a_limbs: np.ndarray, b: np.ndarray, bound: int) -> np.ndarray:
    """The numpy route of `dot`: b cut into signed limbs of w = b_limb_bits(N) bits (low limbs
    in [0, 2^w), the top one arithmetic-shifted, |top| <= 2^w), so each limb-by-limb product is
    at most (2^16 - 1) 2^w and each BLAS sum over N terms below 2^53: exact in any order (also
    block by block). The [count * M, 4] sums are reduced mod P and recombined by rotations by
    i w + 16 j. float64 b is cut in float64 (floor(b / 2^w), b - 2^w floor(b / 2^w): exact)."""
    n, m = a_limbs.shape[0], b.shape[0]
    w = b_limb_bits(n)
    if w < 1:
        raise OverflowError(f"freivalds.dot: N={n} is too large for exact float64 sums")
    count = 1
    while bound >> (count * w):
        count += 1
    acc = np.zeros((count * m, A_LIMBS), dtype=np.float64)
    step = min(max(BLOCK_ELEMS // max(m, 1), 2048), n) if n else 1
    for s in range(0, n, step):  # column blocks: the limb temporaries stay in cache
        acc += _limbs_of(b[:, s:s + step], w, count) @ a_limbs[s:s + step]  # exact
    sums = _mod_i64(acc.astype(np.int64)).reshape(count, m, A_LIMBS)
    out = np.zeros(m, dtype=np.uint64)
    for i in range(count):
        for j in range(A_LIMBS):
            out = _add(out, _shift(sums[i, :, j], i * w + A_LIMB * j))
    return out


def _limbs_of(blk: np.ndarray, w: int, count: int) -> np.ndarray:
    """The count limbs of w bits of blk [m, k] (lowest first), float64 [count * m, k]."""
    if count == 1:
        return blk.astype(np.float64, copy=False)  # exact: |b| <= bound < 2^w
    out = np.empty((count, *blk.shape), dtype=np.float64)
    rest = blk.astype(np.float64, copy=False)  # exact: |b| <= bound < 2^53
    for i in range(count - 1):  # floor(b / 2^w) and b - 2^w floor(b / 2^w): exact
        hi = np.multiply(rest, 2.0 ** -w, out=out[i + 1])
        np.floor(hi, out=hi)
        lo = np.multiply(hi, 2.0 ** w, out=out[0] if i == 0 else None)  # (rest is out[i] if i)
        np.subtract(rest, lo, out=out[i])
        rest = hi
    return out.reshape(count * blk.shape[0], blk.shape[1])


def dot_reference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """`dot` in Python integers: the tests' reference, uint64 [M]."""
    a = [int(x) for x in np.asarray(a).tolist()]
    return np.array([sum(x * int(y) for x, y in zip(a, row)) % P
                     for row in np.asarray(b).tolist()], dtype=np.uint64)


def check(r: Prepared, v: Prepared, x: np.ndarray, z: np.ndarray, x_bound: int, z_bound: int,
          native: bool | None = None) -> np.ndarray:
    """Per row of x [M, K] / z [M, N]: True where r z == v x (mod P). |x| <= x_bound and
    |z| <= z_bound (range-checked by the caller; `dot` refuses values beyond them)."""
    return dot(r, z, z_bound, native) == dot(v, x, x_bound, native)

