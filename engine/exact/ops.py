"""Torch mirrors of the numerics spec's ops; each equals its numpy twin bit for bit."""

from __future__ import annotations

import torch

from ...verifier.numerics import exp2 as spec_exp2
from ...verifier.numerics.attention import COEF_BITS, LOGIT_CLAMP, check_bounds, score_scale
from ...verifier.numerics.exp2 import LOGIT_FRAC_BITS
from ...verifier.numerics.norm import MAX_NORM_WIDTH, NORM_FRAC_BITS

F32, F64, I64 = torch.float32, torch.float64, torch.int64


def pow2_f64(k: torch.Tensor) -> torch.Tensor:
    """2^k as float64 built from its bits (exact), k int in [-1022, 1023]."""
    return ((k.to(I64) + 1023) << 52).view(F64)


def pow2_f32(k: torch.Tensor) -> torch.Tensor:
    """2^k as float32 built from its bits (exact), k int in [-126, 127]."""
    return ((k.to(torch.int32) + 127) << 23).view(F32)


def int_to_f32(z: torch.Tensor) -> torch.Tensor:
    """int64 (|z| < 2^53) -> fp32 with one rounding, through an exact float64."""
    return z.to(F64).to(F32)


def quantize_rows(x: torch.Tensor, qmax: int,
                  amax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Spec quant.quantize_rows: s = max|x| / qmax, q = clip(rint(x / s)); zero rows s=1, q=0.

    amax: the rows' max|x| when x is a slice of wider rows (tensor parallelism: the max over the
    ranks' row_absmax, an exact reduction); every slice then gets the full row's scale and bits.
    """
    amax = x.abs().amax(dim=-1) if amax is None else amax
    if not torch.isfinite(amax).all():
        raise FloatingPointError("non-finite value in a row to quantize")
    s = amax / torch.full_like(amax, qmax)  # tensor divisor: a true IEEE division
    zero = s == 0
    s = torch.where(zero, torch.ones_like(s), s)
    q = torch.round(x / s.unsqueeze(-1)).clamp_(-qmax, qmax)
    q = torch.where(zero.unsqueeze(-1), torch.zeros_like(q), q)
    return q.to(torch.int8 if qmax <= 127 else torch.int16), s


def row_absmax(x: torch.Tensor) -> torch.Tensor:
    """max|x| per row, with a non-finite row reported as +inf (a max over slices keeps it)."""
    amax = x.abs().amax(dim=-1)
    return torch.where(torch.isfinite(amax), amax, torch.full_like(amax, float("inf")))


def dequantize(z, sx, sw, bias) -> torch.Tensor:
    """((f32(z) * sx[t]) * sw[j]) + bias[j]."""
    y = (int_to_f32(z) * sx.unsqueeze(1)) * sw.unsqueeze(0)
    return y if bias is None else y + bias.unsqueeze(0)


def int64_to_f64(v: torch.Tensor) -> torch.Tensor:
    """Correctly rounded int64 -> float64: exact halves, one rounding in the add."""
    hi = v >> 32
    lo = v - (hi << 32)
    return hi.to(F64) * float(2**32) + lo.to(F64)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Spec norm.rmsnorm: exact int64 sum of squares at the row max's exponent, float64 scalar."""
    h = x.shape[-1]
    if h > MAX_NORM_WIDTH:  # |X| <= 2^23, so H * 2^46 < 2^63 needs H < 2^17
        raise OverflowError(f"row width {h} exceeds {MAX_NORM_WIDTH}")
    amax = x.abs().amax(dim=-1)
    e = torch.frexp(amax).exponent.to(I64)
    big = torch.round(x.to(F64) * pow2_f64(NORM_FRAC_BITS - e).unsqueeze(1)).to(I64)
    ss = (big * big).sum(dim=-1)
    ms = (int64_to_f64(ss) / float(h)) * pow2_f64(2 * (e - NORM_FRAC_BITS))
    eps64 = float(torch.tensor(eps, dtype=F32).item())
    root = torch.sqrt(ms + eps64)
    r = (torch.ones_like(root) / root).to(F32)
    return (x * r.unsqueeze(1)) * weight.unsqueeze(0)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, d], cos/sin [T, d/2]: out1 = x1*c - x2*s, out2 = x2*c + x1*s."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    return torch.cat([(x1 * c) - (x2 * s), (x2 * c) + (x1 * s)], dim=-1)


def exp2(y: torch.Tensor) -> torch.Tensor:
    """Spec exp2: n = rint(y) by the 2^23 trick, f = y - n, degree-7 Horner, times 2^n."""
    magic = torch.where(y < 0, -8388608.0, 8388608.0).to(F32)
    n = (y + magic) - magic
    f = y - n
    c = [float(v) for v in spec_exp2.exp2_coefficients()]
    p = torch.full_like(f, c[-1])
    for k in range(len(c) - 2, -1, -1):
        p = (p * f) + c[k]
    return p * pow2_f32(n.to(torch.int32))


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up with silu(g) = g / (1 + 2^clamp(g * -log2 e, -64, 64))."""
    lim = spec_exp2.SILU_CLAMP
    y = (gate * float(spec_exp2.NEG_LOG2E)).clamp(-lim, lim)
    return (gate / (1.0 + exp2(y))) * up


_TABLE = torch.from_numpy(spec_exp2.softmax_table())


def table_weights(distance: torch.Tensor) -> torch.Tensor:
    shift = torch.clamp(distance >> LOGIT_FRAC_BITS, max=31)
    return _TABLE[distance & ((1 << LOGIT_FRAC_BITS) - 1)] >> shift


def attention(q, sq, k, sk, v, sv, q_pos, qmax: int, parts: dict | None = None) -> torch.Tensor:
    """Spec attention.attention for one sequence (keys at positions 0..S-1), torch tensors."""
    t_len, nh, d = q.shape
    s_len, nkv, _ = k.shape
    check_bounds(d, s_len, qmax)
    kh = torch.arange(nkv).repeat_interleave(nh // nkv)  # [nh]
    scores = torch.matmul(q.to(F64).transpose(0, 1), k.to(F64)[:, kh].permute(1, 2, 0)).to(I64)
    visible = torch.arange(s_len).view(1, 1, -1) <= q_pos.view(1, -1, 1)  # [1, T, S]
    t = ((int_to_f32(scores) * sq.t().unsqueeze(2)) * sk[:, kh].t().unsqueeze(1))
    t = t * float(score_scale(d))
    logits = torch.round(t * float(1 << LOGIT_FRAC_BITS)).clamp(-LOGIT_CLAMP, LOGIT_CLAMP).to(I64)
    logits = torch.where(visible, logits, torch.tensor(-LOGIT_CLAMP - 1, dtype=I64))
    row_max = logits.amax(dim=-1, keepdim=True)
    w = torch.where(visible, table_weights(row_max - logits), torch.zeros((), dtype=I64))
    z = w.sum(dim=-1)  # [nh, T]
    p = (w.to(F32) * float(2.0**-COEF_BITS)) * sv[:, kh].t().unsqueeze(1)  # [nh, T, S]
    m = torch.where(visible, p, torch.zeros((), dtype=F32)).amax(dim=-1, keepdim=True)
    if not bool((m > 0).all()):
        raise FloatingPointError("attention value scale underflowed to zero")
    c = torch.round((p / m) * float(1 << COEF_BITS))
    c = torch.where(visible, c, torch.zeros((), dtype=F32)).to(F64)
    acc = torch.matmul(c, v.to(F64)[:, kh].transpose(0, 1)).to(I64)  # [nh, T, d]
    out = (int_to_f32(acc) / int_to_f32(z).unsqueeze(-1)) * m
    if parts is not None:
        parts.update(scores=scores, logits=logits, weights=w, z=z)
    return out.transpose(0, 1).reshape(t_len, nh * d)
