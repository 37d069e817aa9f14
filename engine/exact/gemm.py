"""Exact integer GEMM in torch: int8 planes through torch._int_mm (int32 accumulation), recombined
in int64. Falls back to float64 BLAS (exact below 2^53) if the int8 path fails a self-test.
"""

from __future__ import annotations

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
        """Whether matmul(qx) takes the compiled small-row GEMM: an int8/int16 CPU weight and
        activations of at most GEMM_MAX_ROWS rows, and the compiled core on (ops.NATIVE)."""
        return (self._cpu and qx.shape[0] <= GEMM_MAX_ROWS and qx.dim() == 2
                and qx.device.type == "cpu" and qx.dtype in (torch.int8, torch.int16)
                and ops.NATIVE and native.lib() is not None)

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
