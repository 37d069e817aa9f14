"""RoPE from a host table built with correctly rounded arithmetic only, hashed for the manifest.

inv_freq and the base angles cos/sin(2^b * f_i) come from mpmath at 100 bits, rounded to
float64 once. cos/sin(p * f_i) for any position p are then products of the base rotations for the
set bits of p, evaluated in float64 in a fixed order, and rounded to fp32 once. Every step is an
IEEE operation, so every machine builds the same table bit for bit; no libm call is involved.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache

import mpmath
import numpy as np

from ..config import ModelConfig

F32 = np.float32
POSITION_BITS = 24  # positions below 2^24
_MP_PREC = 100


def inv_freq(cfg: ModelConfig) -> np.ndarray:
    """f_i = theta^(-2i/d) (with llama3 scaling when configured), float64 [d/2]."""
    with mpmath.workprec(_MP_PREC):
        d = cfg.head_dim
        out = []
        for i in range(d // 2):
            f = mpmath.mpf(cfg.rope_theta) ** (-mpmath.mpf(2 * i) / d)
            out.append(float(_llama3(f, cfg) if cfg.rope_scaling else f))
    return np.array(out, dtype=np.float64)


def _llama3(f, cfg: ModelConfig):
    rs = cfg.rope_scaling
    old = mpmath.mpf(rs.original_max_position_embeddings)
    low_wl = old / mpmath.mpf(rs.low_freq_factor)
    high_wl = old / mpmath.mpf(rs.high_freq_factor)
    wavelen = 2 * mpmath.pi / f
    factor = mpmath.mpf(rs.factor)
    if wavelen < high_wl:
        return f
    if wavelen > low_wl:
        return f / factor
    smooth = (old / wavelen - mpmath.mpf(rs.low_freq_factor)) / (
        mpmath.mpf(rs.high_freq_factor) - mpmath.mpf(rs.low_freq_factor))
    return (1 - smooth) * f / factor + smooth * f


@lru_cache(maxsize=8)
def _bases(theta: float, head_dim: int, scaling) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """inv_freq and base rotations, computed once per (theta, d, scaling): mpmath is the slow
    part of building a table, and every verify and every engine load builds one. Read-only."""
    cfg = _RopeKey(theta, head_dim, scaling)
    freqs = inv_freq(cfg)
    cos_b, sin_b = base_rotations(freqs)
    for a in (freqs, cos_b, sin_b):
        a.setflags(write=False)
    return freqs, cos_b, sin_b


@dataclass(frozen=True)
class _RopeKey:
    """The fields of ModelConfig that inv_freq reads."""

    rope_theta: float
    head_dim: int
    rope_scaling: object


def base_rotations(freqs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin of 2^b * f_i for b < POSITION_BITS, float64 [POSITION_BITS, d/2]."""
    cb = np.empty((POSITION_BITS, len(freqs)))
    sb = np.empty_like(cb)
    with mpmath.workprec(_MP_PREC):
        for i, f in enumerate(freqs):
            for b in range(POSITION_BITS):
                a = mpmath.ldexp(mpmath.mpf(float(f)), b)
                cb[b, i], sb[b, i] = float(mpmath.cos(a)), float(mpmath.sin(a))
    return cb, sb


class RopeTable:
    """cos/sin fp32 [P, d/2] for positions 0..P-1, grown on demand, identical on every machine.
    rows: what builds rows (build_rows' signature and bits; the verifier passes its compiled
    route, native.bridge.rope_rows)."""

    def __init__(self, cfg: ModelConfig, rows=None):
        self.rows = rows or build_rows
        self.freqs, self.cos_b, self.sin_b = _bases(cfg.rope_theta, cfg.head_dim, cfg.rope_scaling)
        self.cos = np.ones((0, len(self.freqs)), F32)
        self.sin = np.zeros((0, len(self.freqs)), F32)
        # prefetch: rows past the table, positions sorted and unique, their cos and sin rows
        self._far = np.zeros(0, np.int64)
        self._far_cos, self._far_sin = self.cos, self.sin

    def digest(self) -> str:
        """sha256 of the float64 inv_freq and base rotations: they determine every entry."""
        h = hashlib.sha256()
        for arr in (self.freqs, self.cos_b, self.sin_b):
            h.update(np.ascontiguousarray(arr, dtype="<f8").tobytes())
        return h.hexdigest()

    def ensure(self, n: int) -> None:
        if n > 2**POSITION_BITS:
            raise ValueError(f"position {n - 1} beyond the RoPE table's 2^{POSITION_BITS}")
        if n <= len(self.cos):
            return
        n = max(n, 2 * len(self.cos), 256)
        self.cos, self.sin = self.rows(self.cos_b, self.sin_b, np.arange(n, dtype=np.int64))

    def lookup(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cos, sin, at = self.where(positions)
        return cos[at], sin[at]

    def where(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(cos, sin, at): the rows of `positions` are cos[at], sin[at] (lookup's answer without
        its copies: the table, the prefetched far rows, or rows built for this call)."""
        positions = np.asarray(positions, dtype=np.int64)
        top = int(np.max(positions)) + 1
        if top > len(self.cos) and 8 * len(positions) < top:  # a few rows far out (the
            if top > 2**POSITION_BITS:  # verifier's challenged positions): those rows only
                raise ValueError(f"position {top - 1} beyond the RoPE table's 2^{POSITION_BITS}")
            at = np.searchsorted(self._far, positions)
            if np.all(at < len(self._far)) and np.array_equal(
                    self._far[np.minimum(at, len(self._far) - 1)], positions):
                return self._far_cos, self._far_sin, at
            cos, sin = self.rows(self.cos_b, self.sin_b, positions)
            return cos, sin, np.arange(len(positions), dtype=np.int64)
        self.ensure(top)
        return self.cos, self.sin, positions

    def prefetch(self, positions) -> None:
        """Rows that later lookups will ask for (the verifier's positions of every layer), built
        in one call: the table up to the top position when they are many, else those rows
        alone, kept for lookup (each row depends on its own position only: the same bits)."""
        positions = np.unique(np.asarray(positions, dtype=np.int64))
        if not len(positions):
            return
        top = int(positions[-1]) + 1
        if top > 2**POSITION_BITS:
            raise ValueError(f"position {top - 1} beyond the RoPE table's 2^{POSITION_BITS}")
        if 8 * len(positions) >= top:
            self.ensure(top)
        elif top > len(self.cos):
            new = np.setdiff1d(positions, self._far)
            cos, sin = self.rows(self.cos_b, self.sin_b, new)
            far = np.concatenate([self._far, new])
            order = np.argsort(far, kind="stable")
            self._far = far[order]
            self._far_cos = np.concatenate([self._far_cos, cos])[order]
            self._far_sin = np.concatenate([self._far_sin, sin])[order]


def build_table(cos_b: np.ndarray, sin_b: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows 0..n-1 of the table."""
    return build_rows(cos_b, sin_b, np.arange(n, dtype=np.int64))


def build_rows(cos_b: np.ndarray, sin_b: np.ndarray, positions: np.ndarray):
    """Rotate (1, 0) by the base rotation of each set bit of p, lowest bit first (float64): each
    row depends on its own position only, so any subset of rows equals the table's."""
    p = np.asarray(positions, dtype=np.int64)[:, None]
    c = np.ones((len(p), cos_b.shape[1]))
    s = np.zeros_like(c)
    top = int(p.max(initial=0)) + 1
    for b in range(POSITION_BITS):
        if top <= (1 << b):
            break
        on = ((p >> b) & 1) == 1
        cb, sb = cos_b[b][None, :], sin_b[b][None, :]
        c_new = (c * cb) - (s * sb)
        s_new = (s * cb) + (c * sb)
        c, s = np.where(on, c_new, c), np.where(on, s_new, s)
    return c.astype(F32), s.astype(F32)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x fp32 [T, heads, d], cos/sin [T, d/2] -> rotated, rotate-half layout:

    out1 = (x1 * c) - (x2 * s);  out2 = (x2 * c) + (x1 * s), with x1, x2 the two halves of d.
    """
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return np.concatenate([(x1 * c) - (x2 * s), (x2 * c) + (x1 * s)], axis=-1).astype(F32)
