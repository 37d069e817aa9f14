"""Torch mirrors of the numerics spec's ops; each equals its numpy twin bit for bit."""

from __future__ import annotations

import torch

from ...verifier.numerics import exp2 as spec_exp2
from ...verifier.numerics import moe as spec_moe
from ...verifier import native
from ...verifier.native import bridge
from ...verifier.numerics.attention import (COEF_BITS, LOGIT_CLAMP, check_bounds, first_visible,
                                           score_scale)
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


def _bridged(*ts) -> bool:
    """Whether an elementwise step takes the compiled bridge (verifier/native/bridge.c): NATIVE,
    built, and every tensor an fp32 one in CPU memory (zero-copy numpy views). The bridge has the
    spec's bits (tests/test_bridge_native.py) in one call where the torch route makes 5-30; it
    falls back to the numpy spec for a layout or value it does not take, which raises what the
    spec raises (a non-finite row to quantize: FloatingPointError)."""
    return NATIVE and all(t is None or (t.device.type == "cpu" and t.dtype == F32) for t in ts) \
        and native.lib() is not None


def quantize_rows(x: torch.Tensor, qmax: int,
                  amax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Spec quant.quantize_rows: s = max|x| / qmax, q = clip(rint(x / s)); zero rows s=1, q=0.

    amax: the rows' max|x| when x is a slice of wider rows (tensor parallelism: the max over the
    ranks' row_absmax, an exact reduction); every slice then gets the full row's scale and bits.
    """
    if amax is None and x.dim() >= 2 and _bridged(x):
        q, s = bridge.quantize_rows(x.numpy(), qmax)
        return torch.from_numpy(q), torch.from_numpy(s)
    amax = x.abs().amax(dim=-1) if amax is None else amax
    if not torch.isfinite(amax).all():
        raise FloatingPointError("non-finite value in a row to quantize")
    s = amax / torch.full_like(amax, qmax)  # tensor divisor: a true IEEE division
    zero = s == 0
    s = torch.where(zero, torch.ones_like(s), s)
    q = torch.round(x / s.unsqueeze(-1)).clamp_(-qmax, qmax)  # a zero row: x / 1 rounds to 0
    return q.to(torch.int8 if qmax <= 127 else torch.int16), s


def row_absmax(x: torch.Tensor) -> torch.Tensor:
    """max|x| per row, with a non-finite row reported as +inf (a max over slices keeps it)."""
    amax = x.abs().amax(dim=-1)
    return torch.where(torch.isfinite(amax), amax, torch.full_like(amax, float("inf")))


def dequantize(z, sx, sw, bias) -> torch.Tensor:
    """((f32(z) * sx[t]) * sw[j]) + bias[j]."""
    if z.dtype == I64 and z.dim() == 2 and z.device.type == "cpu" and _bridged(sx, sw, bias):
        return torch.from_numpy(bridge.dequantize(
            z.numpy(), sx.numpy(), sw.numpy(), None if bias is None else bias.numpy()))
    y = int_to_f32(z).mul_(sx.unsqueeze(1)).mul_(sw.unsqueeze(0))  # in place on a fresh tensor
    return y if bias is None else y.add_(bias.unsqueeze(0))


def int64_to_f64(v: torch.Tensor) -> torch.Tensor:
    """Correctly rounded int64 -> float64: exact halves, one rounding in the add."""
    hi = v >> 32
    lo = v - (hi << 32)
    return hi.to(F64) * float(2**32) + lo.to(F64)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Spec norm.rmsnorm: exact int64 sum of squares at the row max's exponent, float64 scalar."""
    h = x.shape[-1]
    if x.dim() == 2 and _bridged(x, weight):
        return torch.from_numpy(bridge.rmsnorm(x.numpy(), weight.numpy(), eps))
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


def head_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Spec forward.head_norm: rmsnorm over each head of x [T, n, d] (Qwen3's q/k norm)."""
    t, n, d = x.shape
    return rmsnorm(x.reshape(t * n, d), weight, eps).reshape(t, n, d)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, d], cos/sin [T, d/2]: out1 = x1*c - x2*s, out2 = x2*c + x1*s."""
    if x.dim() == 3 and _bridged(x, cos, sin):
        return torch.from_numpy(bridge.apply_rope(x.numpy(), cos.numpy(), sin.numpy()))
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
    if gate.dim() == 2 and _bridged(gate, up):
        return torch.from_numpy(bridge.swiglu(gate.numpy(), up.numpy()))
    lim = spec_exp2.SILU_CLAMP
    y = (gate * float(spec_exp2.NEG_LOG2E)).clamp(-lim, lim)
    return (gate / (1.0 + exp2(y))) * up


_TABLE = torch.from_numpy(spec_exp2.softmax_table())


def table_weights(distance: torch.Tensor) -> torch.Tensor:
    shift = torch.clamp(distance >> LOGIT_FRAC_BITS, max=31)
    return _TABLE[distance & ((1 << LOGIT_FRAC_BITS) - 1)] >> shift


def moe_route(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Spec moe.route: the k experts with the largest router logits fp32 [T, E] (ties: the
    lower index), ascending, int64 [T, k]; their weights g fp32 [T, k] by the integer softmax."""
    if not bool(torch.isfinite(logits).all()):
        raise FloatingPointError("non-finite router logit")
    order = torch.sort(-logits, dim=1, stable=True).indices[:, :k]  # descending, stable
    sel = torch.sort(order, dim=1).values
    r = logits.gather(1, sel)
    fixed = torch.round((r * float(spec_moe.ROUTE_SCALE)) * float(1 << LOGIT_FRAC_BITS))
    lg = fixed.clamp(-LOGIT_CLAMP, LOGIT_CLAMP).to(I64)
    w = table_weights(lg.amax(dim=1, keepdim=True) - lg).to(I64)
    z = w.sum(dim=1, keepdim=True)
    return sel, w.to(F32) / z.to(F32)


def moe_combine(e: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Spec moe.combine: y = g_0 e_0, then y + g_i e_i in slot order, one fp32 op each."""
    y = g[:, 0:1] * e[:, 0]
    for i in range(1, e.shape[1]):
        y = y + g[:, i:i + 1] * e[:, i]
    return y


def full_table(table: torch.Tensor) -> tuple[torch.Tensor, int]:
    """table_weights for every distance below the first shift that zeroes the whole table, then 0:
    w(D) = FULL[min(D, CUT)], one gather instead of shift, mask, gather and shift."""
    top = int(table.max())
    cut = top.bit_length() << LOGIT_FRAC_BITS  # table >> bit_length(max) == 0 everywhere
    d = torch.arange(cut + 1, dtype=I64)
    shift = torch.clamp(d >> LOGIT_FRAC_BITS, max=31)
    full = table[d & ((1 << LOGIT_FRAC_BITS) - 1)] >> shift
    if int(full[cut]) != 0:
        raise AssertionError("the softmax table does not vanish at its cut-off")
    return full.to(torch.int32), cut


_FULL_TABLE, _CUT = full_table(_TABLE)
# a masked logit: below every clamped one, and far enough that its distance saturates at _CUT
_MASKED = -(2**40)
# elements of one [heads, query rows, keys] block in prefill attention (the tile of the query axis)
TILE_ELEMS = 1 << 21
# the compiled core when it is built: the softmax passes, and the elementwise steps (quantize,
# dequantize, RMSNorm, RoPE, SwiGLU) through its bridge; tests switch it off to compare both routes
NATIVE = True
# score elements (heads x queries x keys) from which a call takes the compiled core: below it the
# torch route's fewer per-call steps are faster (short decode steps); the bits are the same
NATIVE_MIN_SCORES = 4096


def attention(q, sq, k, sk, v, sv, q_pos, qmax: int, parts: dict | None = None,
              tile_elems: int | None = None, window: int | None = None) -> torch.Tensor:
    """Spec attention.attention for one sequence (keys at positions 0..S-1), torch tensors.

    The query axis goes in tiles of about `tile_elems` score elements, each against only the keys
    its rows can see (q_pos ascending; with a sliding window of `window` keys, only the keys from
    the tile's first visible one), so memory is linear in S. Every row's values are computed
    from its own visible keys alone, so the tile size does not change a bit (tested). A trace
    (`parts`) takes the whole [nh, T, S] block in the spec's form.
    """
    t_len, nh, d = q.shape
    s_len = k.shape[0]
    check_bounds(d, s_len, qmax)
    if parts is not None:
        out = _attend(q[None], sq[None], k[None], sk[None], v[None], sv[None], q_pos[None], qmax,
                      parts, window=window)
        return out[0]
    if window is not None and t_len:  # keys before the first query's window: seen by no row
        lo = int(first_visible(int(q_pos.min()), window))
        if lo > 0:
            k, sk, v, sv, q_pos = k[lo:], sk[lo:], v[lo:], sv[lo:], q_pos - lo
            s_len -= lo
    if use_native(t_len * nh * s_len):  # the compiled core tiles rows itself
        return _native_attend(q[None], sq[None], k[None], sk[None], v[None], sv[None],
                              q_pos[None], window)[0]
    tile = max(1, (tile_elems or TILE_ELEMS) // max(1, nh * s_len))
    if tile >= t_len:
        return _attend(q[None], sq[None], k[None], sk[None], v[None], sv[None], q_pos[None],
                       qmax, window=window)[0]
    kt, vt = _keys(k[None], d, qmax), _values(v[None])  # converted once for every tile
    outs = []
    for a in range(0, t_len, tile):
        b = min(t_len, a + tile)
        keys = min(s_len, int(q_pos[a:b].max()) + 1)
        lo = 0 if window is None else int(first_visible(int(q_pos[a:b].min()), window))
        outs.append(_attend(q[None, a:b], sq[None, a:b], k[None, lo:keys], sk[None, lo:keys],
                            v[None, lo:keys], sv[None, lo:keys], q_pos[None, a:b] - lo, qmax,
                            prepared=(kt[..., lo:keys], vt[:, :, lo:keys]), window=window)[0])
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def attention_batch(q, sq, ks, sks, vs, svs, q_pos, qmax: int,
                    window: int | None = None) -> torch.Tensor:
    """One query row per sequence (a decode step) against each sequence's own keys, in one batch.

    q int [B, nh, d], sq [B, nh]; ks[b] int [S_b, nkv, d], sks[b] [S_b, nkv] (vs, svs alike);
    q_pos [B]. The key axis is padded to max S_b with zeros that no row can see: a masked key's
    weight is 0, so its products add exact zeros and the row max and sums are those of the
    sequence alone. Returns fp32 [B, nh * d], each row equal to attention() on its sequence.
    """
    pad = lambda xs: torch.nn.utils.rnn.pad_sequence(xs, batch_first=True)  # noqa: E731
    return attention_padded(q, sq, pad(ks), pad(sks), pad(vs), pad(svs), q_pos,
                            [kb.shape[0] for kb in ks], qmax, window)


def attention_padded(q, sq, k, sk, v, sv, q_pos, lengths: list[int], qmax: int,
                     window: int | None = None) -> torch.Tensor:
    """attention_batch over keys already padded to one length: k int [B, S_max, nkv, d] (sk, v,
    sv alike), lengths[b] the real keys of sequence b. Padding rows may hold any finite values:
    no row sees a key past its q_pos, so their weights are 0 and their products exact zeros."""
    for n in lengths:
        check_bounds(q.shape[-1], n, qmax)
    return _attend(q[:, None], sq[:, None], k, sk, v, sv, q_pos[:, None], qmax,
                   window=window)[:, 0]


def _wide(d: int, qmax: int) -> torch.dtype:
    """fp32 holds every score exactly when d * qmax^2 < 2^24, but only at full matmul precision
    (a lowered torch.set_float32_matmul_precision could run it in bf16 or TF32); else float64."""
    exact32 = d * qmax * qmax < (1 << 24) and torch.get_float32_matmul_precision() == "highest"
    return F32 if exact32 else F64


def _keys(k: torch.Tensor, d: int, qmax: int) -> torch.Tensor:
    """k int [B, S, nkv, d] -> [B, nkv, d, S] in the scores' exact float type."""
    return k.permute(0, 2, 3, 1).to(_wide(d, qmax))


def _values(v: torch.Tensor) -> torch.Tensor:
    """v int [B, S, nkv, d] -> float64 [B, nkv, S, d]."""
    return v.permute(0, 2, 1, 3).to(F64)


def _attend(q, sq, k, sk, v, sv, q_pos, qmax: int, parts: dict | None = None,
            prepared: tuple | None = None, window: int | None = None) -> torch.Tensor:
    """The spec's passes over a batch: q [B, T, nh, d], k/v [B, S, nkv, d], q_pos [B, T].

    The g = nh / nkv query heads of a K/V head share one matmul of g * T rows (no repeated keys).
    Scores and value sums are exact integers in fp32 when d * qmax^2 < 2^24, else in float64
    (check_bounds keeps both below 2^53); invisible keys get a logit far below every clamped one,
    so their weight, coefficient and products are exactly 0 (the spec's masks, by value):
    keys past q_pos, and under a sliding window of `window` keys those before q_pos - window + 1.
    """
    if parts is None and prepared is None and use_native(q.shape[0] * q.shape[1] * q.shape[2]
                                                         * k.shape[1]):
        return _native_attend(q, sq, k, sk, v, sv, q_pos, window)
    bsz, t_len, nh, d = q.shape
    nkv = k.shape[2]
    g = nh // nkv
    kt, vt = prepared if prepared is not None else (_keys(k, d, qmax), _values(v))
    wide = kt.dtype
    rows = lambda x: x.reshape(bsz, t_len, nkv, g, -1).permute(0, 2, 3, 1, 4).reshape(  # noqa
        bsz, nkv, g * t_len, x.shape[-1])
    qg = rows(q).to(wide)  # [B, nkv, gT, d]
    scores = torch.matmul(qg, kt)  # [B, nkv, gT, S], exact
    pos = rows(q_pos.unsqueeze(-1).unsqueeze(-1).expand(bsz, t_len, nkv, g).unsqueeze(-1))
    c, z, m = _coefs(scores, rows(sq.unsqueeze(-1)), sk, sv, pos, d, parts, t_len, window)
    acc = torch.matmul(c, vt)  # [B, nkv, gT, d], exact integers
    out = (acc.to(F32) / z.to(F64).to(F32).unsqueeze(-1)) * m
    return out.reshape(bsz, nkv, g, t_len, d).permute(0, 3, 1, 2, 4).reshape(bsz, t_len, nh * d)


def _native_attend(q, sq, k, sk, v, sv, q_pos, window: int | None = None) -> torch.Tensor:
    """_attend (no trace) in the compiled core (verifier/native/attn.c): exact integer scores
    and value sums in 16-bit pair products, the softmax passes and the output division, tiled
    over query rows, so memory is linear in S. The same bits (tests/test_native.py)."""
    bsz, t_len, nh, d = q.shape
    s_len, nkv = k.shape[1], k.shape[2]
    g = nh // nkv
    rows = lambda x: x.reshape(bsz, t_len, nkv, g, *x.shape[3:]).permute(  # noqa: E731
        0, 2, 3, 1, *range(4, x.dim() + 1)).contiguous()  # [B, nkv, g, T, ...]
    grp = lambda x: x.permute(0, 2, 1).to(F32).contiguous().reshape(bsz * nkv, s_len)  # noqa
    each = lambda x: x.to(I64)[:, None, None, :].expand(bsz, nkv, g, t_len).contiguous(  # noqa
        ).reshape(-1).numpy()
    nvis = each((q_pos + 1).clamp(0, s_len))
    nlo = None if window is None else each((q_pos - (window - 1)).clamp(min=0))
    with torch.profiler.record_function("commitllm::attn_fused"):  # C time shows in profiles
        out, _, _ = native.attn_fused(
            rows(q).reshape(-1, d).numpy(), rows(sq).to(F32).reshape(-1).numpy(),
            native.pack_keys(k.numpy()), grp(sk).numpy(), native.pack_values(v.numpy()),
            grp(sv).numpy(), nvis, g * t_len, d,
            float(score_scale(d)), float(1 << LOGIT_FRAC_BITS), _FULL_TABLE.numpy(), _CUT,
            nlo=nlo)
    return torch.from_numpy(out).view(bsz, nkv, g, t_len, d).permute(0, 3, 1, 2, 4).reshape(
        bsz, t_len, nh * d)


def use_native(scores: int | None = None) -> bool:
    """Whether the compiled attention (commitllm.verifier.native) runs: NATIVE, built, and (given
    the score elements of a call) at least NATIVE_MIN_SCORES of them."""
    return (NATIVE and _NATIVE_CONSTANTS and (scores is None or scores >= NATIVE_MIN_SCORES)
            and native.lib() is not None)


# attn.c has the spec's constants written in; a change of the spec turns it off, not wrong
_NATIVE_CONSTANTS = COEF_BITS == 15 and LOGIT_CLAMP == 2**30


def _coefs(scores, sq_rows, sk, sv, pos, d: int, parts: dict | None, t_len: int,
           window: int | None = None):
    """Logits, table weights, Z, value scale M and coefficients c (float64, exact integers) of
    the spec's passes, by torch ops over the whole [B, nkv, gT, S] block."""
    bsz, nkv, gt, s_len = scores.shape
    wide = scores.dtype
    t = scores.to(F32) if wide is F64 else scores.clone() if parts is not None else scores
    t.mul_(sq_rows).mul_(sk.permute(0, 2, 1).unsqueeze(2))
    t.mul_(float(score_scale(d))).mul_(float(1 << LOGIT_FRAC_BITS))
    logits = t.round_().clamp_(-LOGIT_CLAMP, LOGIT_CLAMP).to(I64)
    keys = torch.arange(s_len).view(1, 1, 1, s_len)
    hidden = keys > pos  # [B, nkv, gT, S]
    if window is not None:
        hidden |= keys < pos - (window - 1)
    logits.masked_fill_(hidden, _MASKED)
    row_max = logits.amax(dim=-1, keepdim=True)
    w = _FULL_TABLE[(row_max - logits).clamp_(max=_CUT)]  # int32, <= 2^15
    z = w.sum(dim=-1, dtype=I64)  # [B, nkv, gT]
    p = w.to(F32).mul_(float(2.0**-COEF_BITS)).mul_(sv.permute(0, 2, 1).unsqueeze(2))
    m = p.amax(dim=-1, keepdim=True)  # p >= 0 and 0 where hidden: the max over visible keys
    if not bool((m > 0).all()):
        raise FloatingPointError("attention value scale underflowed to zero")
    c = p.div_(m).mul_(float(1 << COEF_BITS)).round_().to(F64)
    if parts is not None:
        heads = lambda x: x[0].reshape(-1, t_len, x.shape[-1])  # noqa: E731  [nkv, gT, .] -> [nh, T, .]
        lg = heads(logits)
        parts.update(scores=heads(scores).to(I64), logits=torch.where(
            lg == _MASKED, torch.tensor(-LOGIT_CLAMP - 1, dtype=I64), lg),
            weights=heads(w).to(I64), z=heads(z.unsqueeze(-1))[..., 0])
    return c, z, m
