"""Exact integer GEMM in torch: int8 planes through torch._int_mm (int32 accumulation), recombined
in int64. Falls back to float64 BLAS (exact below 2^53) if the int8 path fails a self-test.
"""

from __future__ import annotations

import os
import time
from functools import lru_cache

import torch

from ...verifier import native
from ...verifier.numerics.quant import EXACT_F64
from . import ops

INT32_SAFE_K = 131071  # K * 128 * 128 < 2^31: a plane product cannot overflow int32


# rows up to which matmul takes the compiled small-row GEMM (verifier/native/gemm.c: int16
# activations times int8 weights, no planes): decode steps and short chunks; the same integers
GEMM_MAX_ROWS = 16

SPLIT_ROWS = 8192  # rows split at a time: int32 temporaries of a 128256 x 8192 head were 4 GB each


def split_planes(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int tensor with |q| <= 127*257 -> int8 (hi, lo), q = hi*256 + lo (SPLIT_ROWS rows at a
    time, so the int32 temporaries stay small)."""
    if q.dim() == 0 or q.shape[0] <= SPLIT_ROWS:
        return _split(q)
    hi = torch.empty(q.shape, dtype=torch.int8, device=q.device)
    lo = torch.empty(q.shape, dtype=torch.int8, device=q.device)
    for i in range(0, q.shape[0], SPLIT_ROWS):
        hi[i:i + SPLIT_ROWS], lo[i:i + SPLIT_ROWS] = _split(q[i:i + SPLIT_ROWS])
    return hi, lo


def _split(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    q = q.to(torch.int32)
    lo = ((q + 128) & 255) - 128
    hi = (q - lo) >> 8
    return hi.to(torch.int8), lo.to(torch.int8)


def planes(q: torch.Tensor, qmax: int) -> list[torch.Tensor]:
    """The int8 planes of q, most significant first (one plane when qmax fits int8)."""
    return [q.to(torch.int8)] if qmax <= 127 else list(split_planes(q))


@lru_cache(maxsize=1)
def int_mm_is_exact() -> bool:
    """Check torch._int_mm against int64 on worst-case inputs (saturating int8 paths exist)."""
    try:
        g = torch.Generator().manual_seed(0)
        for k in (16, 64, 1000, 4096):
            for a_val, b_val in ((-128, -128), (127, -128), (-128, 127), (127, 127)):
                a = torch.full((17, k), a_val, dtype=torch.int8)
                b = torch.full((k, 8), b_val, dtype=torch.int8)
                if not torch.equal(torch._int_mm(a, b).long(), a.long() @ b.long()):
                    return False
            a = torch.randint(-128, 128, (17, k), dtype=torch.int8, generator=g)
            b = torch.randint(-128, 128, (k, 8), dtype=torch.int8, generator=g)
            if not torch.equal(torch._int_mm(a, b).long(), a.long() @ b.long()):
                return False
        return True
    except (RuntimeError, NotImplementedError):
        return False


GEMM_ROUTE_ENV = "COMMITLLM_GEMM"  # "native" or "int_mm": the route of prefill-sized products


@lru_cache(maxsize=1)
def native_gemm_wins() -> bool:
    """Whether products of more than GEMM_MAX_ROWS rows take gemm.c too, decided once per process
    by measurement (or by $COMMITLLM_GEMM: native, int_mm). torch._int_mm is fast where oneDNN
    has int8 dot-product instructions (AVX-512 VNNI) and some 20-40 times slower than gemm.c's
    AVX2 route where it has not (an AVX2-only AMD EPYC: 0.9 GMAC/s per int8 plane against 20 for
    int16 x int8 at 128 x 4096 x 6144, one thread), so a prefill there took minutes. The probe
    times both on one small product of int16 activations (32 x 1024 x 256, the best of two each:
    some 50 ms where _int_mm is slow, under 1 ms where it is fast); the bits are the same either
    way (both exact: tests/test_numerics_ops.py)."""
    forced = os.environ.get(GEMM_ROUTE_ENV, "").strip().lower()
    if forced in ("native", "int_mm"):
        return forced == "native"
    if forced:
        raise ValueError(f"${GEMM_ROUTE_ENV} must be 'native' or 'int_mm', not {forced!r}")
    if native.lib() is None or not int_mm_is_exact():
        return native.lib() is not None
    g = torch.Generator().manual_seed(0)
    w = torch.randint(-127, 128, (256, 1024), dtype=torch.int8, generator=g)
    x = torch.randint(-32767, 32768, (32, 1024), dtype=torch.int16, generator=g)
    packed, wt, xn = native.pack_weight(w.numpy()), w.t(), x.numpy()

    def via_int_mm():  # what matmul does for this int8 weight: one weight plane, two of x
        stacked, n_x = ExactWeight._stacked(x, 32767)
        return _recombine(_int_mm(stacked, wt), n_x, x.shape[0])

    def best(f) -> float:
        out = []
        for _ in range(2):
            t0 = time.perf_counter()
            f()
            out.append(time.perf_counter() - t0)
        return min(out)
    return best(lambda: native.gemm_i16i8(xn, packed, 256)) < best(via_int_mm)


class ExactWeight:
    """An int weight [N, K] prepared for exact products with int activations."""

    def __init__(self, q: torch.Tensor, qmax: int):
        self.n, self.k = q.shape
        self.qmax = qmax
        self.use_int_mm = int_mm_is_exact() and self.k <= INT32_SAFE_K
        if self.use_int_mm:
            self.planes_t = [p.t() for p in planes(q, qmax)]  # [K, N] views for _int_mm
        else:
            self.f64_t = q.to(torch.float64).t()
        self._cpu = q.device.type == "cpu" and qmax <= 127 * 257 and q.dtype in (torch.int8,
                                                                                 torch.int16)
        self._q = q
        self._packed = None  # gemm.c's layout of the weight, made at its first small call

    def small_rows(self, qx: torch.Tensor) -> bool:
        """Whether matmul(qx) takes the compiled GEMM (gemm.c): an int8/int16 CPU weight,
        int8/int16 activations and the compiled core on (ops.NATIVE), at most GEMM_MAX_ROWS rows
        (decode steps), or any number where it is faster than _int_mm here (native_gemm_wins:
        the same integers either way)."""
        return (self._cpu and qx.dim() == 2 and qx.device.type == "cpu"
                and qx.dtype in (torch.int8, torch.int16) and ops.NATIVE
                and native.lib() is not None
                and (qx.shape[0] <= GEMM_MAX_ROWS or native_gemm_wins()))

    def matmul(self, qx: torch.Tensor, x_qmax: int) -> torch.Tensor:
        """z = qx @ q.T exactly, int64 [M, N]."""
        self._check(x_qmax)
        if self.small_rows(qx):
            if self._packed is None:
                q = self._q if self.qmax > 127 else self._q.to(torch.int8)  # int8: no copy
                self._packed = native.pack_weight(q.numpy())
            with torch.profiler.record_function("commitllm::gemm_i16i8"):
                return torch.from_numpy(native.gemm_i16i8(qx.numpy(), self._packed, self.n))
        if not self.use_int_mm:
            return (qx.to(torch.float64) @ self.f64_t).long()
        stacked, n_x = self._stacked(qx, x_qmax)
        z = None
        for wp in self.planes_t:
            part = _recombine(_int_mm(stacked, wp), n_x, qx.shape[0])  # int64 [M, N]
            z = part if z is None else z.mul_(256).add_(part)
        return z

    def plane_products(self, qx: torch.Tensor, x_qmax: int) -> tuple[torch.Tensor, int]:
        """The int32 plane products of qx @ q.T, [weight planes, activation planes * M, N] (most
        significant first), and the number of activation planes: matmul() before recombining
        (int8 path only)."""
        self._check(x_qmax)
        stacked, n_x = self._stacked(qx, x_qmax)
        out = torch.empty((len(self.planes_t), stacked.shape[0], self.n), dtype=torch.int32)
        for i, wp in enumerate(self.planes_t):
            torch._int_mm(stacked, wp, out=out[i])
        return out, n_x

    def _check(self, x_qmax: int) -> None:
        if self.k * x_qmax * self.qmax >= EXACT_F64:
            raise OverflowError(f"K={self.k} can exceed 2^53")

    @staticmethod
    def _stacked(qx: torch.Tensor, x_qmax: int) -> tuple[torch.Tensor, int]:
        """qx's int8 planes stacked row-wise [P*M, K] (contiguous, as _int_mm needs), and P."""
        xs = planes(qx, x_qmax)
        return (torch.cat(xs) if len(xs) > 1 else xs[0]).contiguous(), len(xs)


def _recombine(part: torch.Tensor, n_planes: int, m: int) -> torch.Tensor:
    """int32 plane products [P*M, N] -> int64 [M, N], in place on one int64 tensor (a prefill's
    LM head is [M, 49152]: fresh temporaries there cost more than the products)."""
    z = part[:m].long()
    return z if n_planes == 1 else z.mul_(256).add_(part[m:])


def _int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch._int_mm(a.contiguous(), b)
