"""The replay's elementwise steps ("the bridge") through the compiled core (bridge.c).

Each function has the signature and the result of its numpy spec (numerics/norm.py, quant.py,
exp2.py, rope.py), bit for bit, and calls that spec when the compiled core is unavailable, when
the arrays are not in a layout the C routine takes (dtype, strides), and when the routine reports
a value it does not handle (a non-finite input or output, a width beyond the spec's limit): the
spec then raises or computes what it defines. tests/test_bridge_native.py checks both routes.
"""

from __future__ import annotations

import numpy as np

from ..numerics import exp2 as _exp2
from ..numerics import norm as _norm
from ..numerics import quant as _quant
from ..numerics import rope as _rope
from . import lib

F32 = np.float32
_F4 = np.dtype(np.float32)


def _rows_layout(x: np.ndarray, itemsize: int) -> int | None:
    """The row stride in elements of a 2-D array whose rows are contiguous, else None."""
    if x.ndim != 2 or x.strides[1] != itemsize or x.strides[0] % itemsize or x.strides[0] < 0:
        return None
    return x.strides[0] // itemsize if x.shape[0] > 1 else x.shape[1]


def _contig(a: np.ndarray | None, dtype=_F4) -> bool:
    return a is None or (a.dtype == dtype and a.flags.c_contiguous)


def rmsnorm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """norm.rmsnorm(x, weight, eps) for fp32 x [T, H]."""
    so = lib()
    xs = _rows_layout(x, 4) if x.dtype == _F4 else None
    if so is None or xs is None or not x.shape[1] or not _contig(weight) \
            or weight.shape != (x.shape[1],):
        return _norm.rmsnorm(x, weight, eps)
    y = np.empty(x.shape, F32)
    if so.br_rmsnorm(x.ctypes.data, x.shape[0], x.shape[1], xs, weight.ctypes.data, F32(eps),
                     y.ctypes.data):
        return _norm.rmsnorm(x, weight, eps)
    return y


def quantize_rows(x: np.ndarray, qmax: int) -> tuple[np.ndarray, np.ndarray]:
    """quant.quantize_rows(x, qmax) for fp32 x [..., K] (rows of K; [T, heads, d] per head)."""
    so = lib()
    x2 = x.reshape(-1, x.shape[-1]) if x.ndim > 2 else x  # a view when the layout allows
    xs = _rows_layout(x2, 4) if x.dtype == _F4 and x.ndim >= 2 else None
    if so is None or xs is None or not x2.shape[1] or not 1 <= qmax <= 32767:
        return _quant.quantize_rows(x, qmax)
    dt = _quant.int_dtype(qmax)
    q = np.empty(x2.shape, dt)
    s = np.empty(x2.shape[0], F32)
    if so.br_quantize(x2.ctypes.data, x2.shape[0], x2.shape[1], xs, int(qmax),
                      np.dtype(dt).itemsize, q.ctypes.data, s.ctypes.data):
        return _quant.quantize_rows(x, qmax)
    return q.reshape(x.shape), s.reshape(x.shape[:-1])


def dequantize(z: np.ndarray, sx: np.ndarray, sw: np.ndarray, bias: np.ndarray | None,
               resid: np.ndarray | None = None) -> np.ndarray:
    """quant.dequantize(z, sx, sw, bias), and with resid fp32 [T, N] the residual add after it:
    resid + dequantize(...), for int64 z [T, N]."""
    so = lib()
    rs = _rows_layout(resid, 4) if resid is not None and resid.dtype == _F4 else None
    if (so is None or z.dtype != np.int64 or z.ndim != 2 or not z.flags.c_contiguous
            or not (_contig(sx) and _contig(sw) and _contig(bias))
            or sx.shape != (z.shape[0],) or sw.shape != (z.shape[1],)
            or (bias is not None and bias.shape != sw.shape)
            or (resid is not None and (rs is None or resid.shape != z.shape))):
        return _dequantize_spec(z, sx, sw, bias, resid)
    y = np.empty(z.shape, F32)
    if so.br_dequant(z.ctypes.data, z.shape[0], z.shape[1], sx.ctypes.data, sw.ctypes.data,
                     None if bias is None else bias.ctypes.data,
                     None if resid is None else resid.ctypes.data, rs or 0, y.ctypes.data):
        return _dequantize_spec(z, sx, sw, bias, resid)
    return y


def _dequantize_spec(z, sx, sw, bias, resid):
    y = _quant.dequantize(z, sx, sw, bias)
    return y if resid is None else resid + y


def swiglu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """exp2.swiglu(gate, up) for fp32 gate, up [T, F] (rows may be strided: the two halves of
    the gate_up linear's output)."""
    so = lib()
    ok = gate.dtype == _F4 and up.dtype == _F4 and gate.shape == up.shape
    gs, us = (_rows_layout(gate, 4), _rows_layout(up, 4)) if ok else (None, None)
    if so is None or gs is None or us is None:
        return _exp2.swiglu(gate, up)
    out = np.empty(gate.shape, F32)
    coefs = _exp2.exp2_coefficients()
    if so.br_swiglu(gate.ctypes.data, up.ctypes.data, gate.shape[0], gate.shape[1], gs, us,
                    _exp2.NEG_LOG2E, coefs.ctypes.data, out.ctypes.data):
        return _exp2.swiglu(gate, up)
    return out


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """rope.apply_rope(x, cos, sin) for fp32 x [T, heads, d] (heads of contiguous dims, any
    token and head strides) and fp32 cos, sin [T, d/2]."""
    so = lib()
    t = x.shape[0] if x.ndim == 3 else -1
    d = x.shape[2] if x.ndim == 3 else 0
    if (so is None or x.dtype != _F4 or t < 0 or d % 2 or x.strides[2] != 4
            or x.strides[0] % 4 or x.strides[1] % 4 or min(x.strides) < 0
            or not (_contig(cos) and _contig(sin)) or cos.shape != (t, d // 2)
            or sin.shape != cos.shape):
        return _rope.apply_rope(x, cos, sin)
    out = np.empty(x.shape, F32)
    if so.br_rope(x.ctypes.data, t, x.shape[1], d, x.strides[0] // 4, x.strides[1] // 4,
                  cos.ctypes.data, sin.ctypes.data, out.ctypes.data):
        return _rope.apply_rope(x, cos, sin)
    return out


def rope_rows(cos_b: np.ndarray, sin_b: np.ndarray, positions) -> tuple[np.ndarray, np.ndarray]:
    """rope.build_rows(cos_b, sin_b, positions) in one compiled pass: the same binary64 steps in
    the same order, each row rounded to fp32 once, so the same bits; the spec's numpy route
    without the core or for anything the call does not take: positions that are not one row of
    integers, or outside [0, 2^24) (the spec's bits), tables that are not plain C-contiguous
    float64 ndarrays [bits, d/2], a result that is not finite."""
    so = lib()
    if (so is None or np.ndim(positions) != 1 or type(cos_b) is not np.ndarray
            or type(sin_b) is not np.ndarray or cos_b.dtype != np.float64
            or sin_b.dtype != np.float64 or cos_b.ndim != 2 or sin_b.shape != cos_b.shape
            or not (cos_b.flags.c_contiguous and sin_b.flags.c_contiguous)):
        return _rope.build_rows(cos_b, sin_b, positions)
    p = np.ascontiguousarray(positions, dtype=np.int64)
    bits, half = min(cos_b.shape[0], _rope.POSITION_BITS), cos_b.shape[1]  # the spec's bits
    cos, sin = np.empty((len(p), half), F32), np.empty((len(p), half), F32)
    if so.br_rope_rows(cos_b.ctypes.data, sin_b.ctypes.data, half, bits, p.ctypes.data, len(p),
                       cos.ctypes.data, sin.ctypes.data):
        return _rope.build_rows(cos_b, sin_b, positions)
    return cos, sin


def minmax(a: np.ndarray) -> tuple[int, int]:
    """(int(a.min()), int(a.max())) of a non-empty int8/int16 array, in one compiled pass when the
    array is C-contiguous (else numpy's two)."""
    so = lib()
    if so is None or a.dtype not in (np.int8, np.int16) or not a.flags.c_contiguous or not a.size:
        return int(a.min()), int(a.max())
    out = np.empty(2, np.int64)
    if so.br_minmax(a.ctypes.data, a.size, a.dtype.itemsize, out.ctypes.data):
        return int(a.min()), int(a.max())
    return int(out[0]), int(out[1])
