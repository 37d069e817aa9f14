"""Integer-softmax GQA attention (spec attention.attention): exact scores on int8 tensor cores,
fixed-point log2 logits, table weights, exact int64 sums, split-KV with an exact combine.

The spec needs three maxima/sums in order, each over all visible keys: the logit row max, then
(Z, P = max p_j) which depend on it, then A = sum c_j V_j whose c_j depend on P. So the kernel runs
three sweeps over the keys (scores are recomputed, never stored), each split over the KV axis:

  1. `_attn_rowmax_kernel`   partial row max of the logits per split
  2. `_attn_sums_kernel`     global row max -> w; partial Z (int64) and partial P (fp32 max)
  3. `_attn_values_kernel`   global P -> c; partial A (int64); with one split, the output directly
  4. `_attn_combine_kernel`  A = sum of partials, Z = sum of partials -> output (split-KV only)

Integer sums are associative, maxima are exact, so the result does not depend on the split count,
the tile sizes or the warp count. Rows are (query token, head of the GQA group) pairs of one K/V
head: row r is token r // g, head kvh * g + r % g, so a decode step (T = 1) fills g rows.

Tensor-core forms (every dot is int8 x int8 -> int32):
  scores  S = 65536 (Q_hi . K_hi) + 256 (Q_hi . K_lo + Q_lo . K_hi) + Q_lo . K_lo  (16-bit Q/K)
  values  c_j is in [0, 2^15], so its high byte ch = (c - cl) >> 8 (cl = ((c + 128) & 255) - 128)
          reaches 128 and is not int8; the kernel feeds ch - 128 (in [-128, 0]) to the tensor
          core and adds 128 * colsum(V) back: ch . V = (ch - 128) . V + 128 sum_j V_j over the
          tile's keys (masked keys have c = 0 and cancel exactly).
Bounds: each plane product <= 2^14; the int32 accumulators of a split hold at most two plane
products per key, so a split covers at most 65535 keys (`MAX_SPLIT_KEYS`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from ..engine.exact import ops
from ..verifier.numerics.attention import LOGIT_CLAMP, check_bounds, score_scale
from ..verifier.numerics.exp2 import softmax_table
from .exactmath import rint_f32
from .launch import check_tensor, int_dtype, same_device

MAX_SPLIT_KEYS = 65535  # 2 * 65535 * 2^14 < 2^31 for the int32 plane accumulators
# In the kernels, -1073741825 = -LOGIT_CLAMP - 1 is the spec's logit of a masked key (below every
# visible logit) and 1073741824 = LOGIT_CLAMP.
assert LOGIT_CLAMP == 1073741824


def attention_reference(q, sq, k, sk, v, sv, q_pos, qmax: int,
                        window: int | None = None) -> torch.Tensor:
    """Plain torch (the CPU backend's op): out fp32 [T, nh * d]."""
    return ops.attention(q, sq, k, sk, v, sv, q_pos.to(torch.int64), qmax, window=window)


# ------------------------------------------------------------------------------ device helpers

@triton.jit
def _planes(x):
    """int16 tile -> int8 planes (hi, lo) with x = 256 hi + lo."""
    xi = x.to(tl.int32)
    lo = ((xi + 128) & 255) - 128
    return ((xi - lo) >> 8).to(tl.int8), lo.to(tl.int8)


@triton.jit
def _row_setup(q_ptr, sq_ptr, qpos_ptr, kvh, R, G, stride_qt, stride_qh, stride_sqt, stride_sqh,
               d, KV_PLANES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows of this program: (t, h, valid, pos, sq, q planes a/b)."""
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    valid = r < R
    t = r // G
    h = kvh * G + r % G
    dd = tl.arange(0, BLOCK_D)
    qp = q_ptr + t[:, None].to(tl.int64) * stride_qt + h[:, None] * stride_qh + dd[None, :]
    qt = tl.load(qp, mask=valid[:, None] & (dd[None, :] < d), other=0)  # [BLOCK_M, BLOCK_D]
    pos = tl.load(qpos_ptr + t, mask=valid, other=-1)
    sq = tl.load(sq_ptr + t.to(tl.int64) * stride_sqt + h * stride_sqh, mask=valid, other=1.0)
    if KV_PLANES == 2:
        qa, qb = _planes(qt)
    else:
        qa = qt.to(tl.int8)
        qb = qa
    return t, h, valid, pos, sq, qa, qb


@triton.jit
def _phys(j, hi, bt_ptr, BS, PAGED: tl.constexpr):
    """The storage row of logical keys j: j itself, or (paged) block_table[j // BS] * BS + j % BS
    (keys past hi read block 0's rows, masked like every invisible key)."""
    if PAGED:
        blk = tl.load(bt_ptr + j // BS, mask=j < hi, other=0)
        return blk.to(tl.int64) * BS + (j % BS)
    else:
        return j.to(tl.int64)


@triton.jit
def _key_range(pos, S, CHUNK, window):
    """Keys [lo, hi) of this split that any row of the block can see (from the earliest row's
    first visible key under a sliding window of `window` keys; 0: none), and the split's end."""
    start = tl.program_id(2) * CHUNK
    end = tl.minimum(start + CHUNK, S)
    hi = tl.minimum(end, tl.max(pos, axis=0) + 1)
    first = tl.min(tl.where(pos >= 0, pos, 2147483647), axis=0) - window + 1  # rows past R: -1
    lo = tl.where(window > 0, tl.maximum(start, first), start)
    return lo, hi, end


@triton.jit
def _tile_logits(qa, qb, sq, pos, j, pj, end, hi, k_base, sk_base, stride_kt, stride_skt, d,
                 scale, window, KV_PLANES: tl.constexpr, BLOCK_D: tl.constexpr):
    """Logits L int32 [BLOCK_M, BLOCK_N] and visibility of keys j (spec steps 1-2): j <= pos,
    and j > pos - window under a sliding window (window > 0).

    S exact (int64 from int32 plane dots); u = ((f32(S) * sq) * sk) * scale;
    L = clamp(rint(u * 256), -2^30, 2^30).
    """
    dd = tl.arange(0, BLOCK_D)
    kt = tl.load(k_base + pj[None, :] * stride_kt + dd[:, None],
                 mask=(j[None, :] < hi) & (dd[:, None] < d), other=0)  # [BLOCK_D, BLOCK_N]
    if KV_PLANES == 2:
        ka, kb = _planes(kt)
        s2 = tl.dot(qa, ka, out_dtype=tl.int32)
        s1 = tl.dot(qa, kb, out_dtype=tl.int32)
        s1 = tl.dot(qb, ka, s1, out_dtype=tl.int32)
        s0 = tl.dot(qb, kb, out_dtype=tl.int32)
        s = (s2.to(tl.int64) * 65536 + s1.to(tl.int64) * 256) + s0.to(tl.int64)
    else:
        s = tl.dot(qa, kt.to(tl.int8), out_dtype=tl.int32).to(tl.int64)
    sk = tl.load(sk_base + pj * stride_skt, mask=j < hi, other=1.0)
    u = ((s.to(tl.float32) * sq[:, None]) * sk[None, :]) * scale
    lg = rint_f32(u * 256.0)
    lg = tl.minimum(tl.maximum(lg, -1073741824.0), 1073741824.0).to(tl.int32)
    vis = (j[None, :] <= pos[:, None]) & (j[None, :] < end)
    vis = vis & ((j[None, :] >= pos[:, None] - window + 1) | (window == 0))
    return lg, vis


@triton.jit
def _tile_weights(lg, vis, rowmax, table_ptr):
    """w = T[D & 255] >> min(D >> 8, 31), D = rowmax - L clamped to [0, 65536] (w(65536) = 0 =
    every masked key's weight; clamping a larger D changes nothing: T < 2^16, shift 31)."""
    floor = rowmax[:, None] - 65536
    dist = rowmax[:, None] - tl.where(vis, tl.maximum(lg, floor), floor)
    return tl.load(table_ptr + (dist & 255)) >> tl.minimum(dist >> 8, 31)


@triton.jit
def _global_rowmax(pmax_ptr, kvh, r, valid, R, NKV, N_SPLIT):
    m = tl.full(r.shape, -1073741825, tl.int32)
    for s in range(N_SPLIT):
        m = tl.maximum(m, tl.load(pmax_ptr + (s * NKV + kvh) * R + r, mask=valid, other=0))
    return m


@triton.jit
def _global_pmax(pm_ptr, kvh, r, valid, R, NKV, N_SPLIT):
    m = tl.zeros(r.shape, tl.float32)
    for s in range(N_SPLIT):
        m = tl.maximum(m, tl.load(pm_ptr + (s * NKV + kvh) * R + r, mask=valid, other=0.0))
    return tl.where(m == 0.0, 1.0, m)  # only rows past R (never stored) have no visible key


@triton.jit
def _store_out(out_ptr, acc, pm, z, t, h, valid, d, stride_ot, BLOCK_D: tl.constexpr):
    """out[t, h d + i] = (f32(A) / f32(Z)) * P (div.rn)."""
    dd = tl.arange(0, BLOCK_D)
    o = tl.math.div_rn(acc.to(tl.float32), z.to(tl.float32)[:, None]) * pm[:, None]
    op = out_ptr + t[:, None].to(tl.int64) * stride_ot + h[:, None] * d + dd[None, :]
    tl.store(op, o, mask=valid[:, None] & (dd[None, :] < d))


# ------------------------------------------------------------------------------ kernels

@triton.jit
def _attn_rowmax_kernel(
    # inputs
    q_ptr, sq_ptr, qpos_ptr, k_ptr, sk_ptr, scale, window, bt_ptr, BS,
    # output: partial row max int32 [N_SPLIT, NKV, R]
    pmax_ptr,
    # sizes and strides
    R, G, NKV, S, CHUNK, d, stride_qt, stride_qh, stride_sqt, stride_sqh, stride_kt, stride_kh,
    stride_skt,
    # meta
    KV_PLANES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGED: tl.constexpr,
):
    """Sweep 1, program (row block, kv head, split): pmax = max of L over this split's visible keys
    (-2^30 - 1 when none). q int [T, nh, d], sq fp32 [T, nh], q_pos int32 [T], k int [S, nkv, d],
    sk fp32 [S, nkv], scale fp32 = score_scale(d)."""
    kvh = tl.program_id(1)
    _t, _h, valid, pos, sq, qa, qb = _row_setup(q_ptr, sq_ptr, qpos_ptr, kvh, R, G, stride_qt,
                                                stride_qh, stride_sqt, stride_sqh, d, KV_PLANES,
                                                BLOCK_M, BLOCK_D)
    lo, hi, end = _key_range(pos, S, CHUNK, window)
    m = tl.full([BLOCK_M], -1073741825, tl.int32)
    for j0 in range(lo, hi, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        pj = _phys(j, hi, bt_ptr, BS, PAGED)
        lg, vis = _tile_logits(qa, qb, sq, pos, j, pj, end, hi, k_ptr + kvh * stride_kh,
                               sk_ptr + kvh, stride_kt, stride_skt, d, scale, window, KV_PLANES,
                               BLOCK_D)
        m = tl.maximum(m, tl.max(tl.where(vis, lg, -1073741825), axis=1))
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    tl.store(pmax_ptr + (tl.program_id(2) * NKV + kvh) * R + r, m, mask=valid)


@triton.jit
def _attn_sums_kernel(
    # inputs
    q_ptr, sq_ptr, qpos_ptr, k_ptr, sk_ptr, sv_ptr, table_ptr, pmax_ptr, scale, window, bt_ptr, BS,
    # outputs: partial Z int64 and partial P fp32, [N_SPLIT, NKV, R]
    z_ptr, pm_ptr,
    # sizes and strides
    R, G, NKV, S, CHUNK, N_SPLIT, d, stride_qt, stride_qh, stride_sqt, stride_sqh, stride_kt,
    stride_kh, stride_skt, stride_svt,
    # meta
    KV_PLANES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGED: tl.constexpr,
):
    """Sweep 2: rowmax = max over splits of pmax; w = table weights; Z = sum w (int64) and
    P = max_j (f32(w_j) * 2^-15) * sv_j over this split's visible keys (0 when none).
    sv fp32 [S, nkv], table int32 [256]."""
    kvh = tl.program_id(1)
    _t, _h, valid, pos, sq, qa, qb = _row_setup(q_ptr, sq_ptr, qpos_ptr, kvh, R, G, stride_qt,
                                                stride_qh, stride_sqt, stride_sqh, d, KV_PLANES,
                                                BLOCK_M, BLOCK_D)
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rowmax = _global_rowmax(pmax_ptr, kvh, r, valid, R, NKV, N_SPLIT)
    lo, hi, end = _key_range(pos, S, CHUNK, window)
    z = tl.zeros([BLOCK_M], tl.int64)
    pm = tl.zeros([BLOCK_M], tl.float32)
    for j0 in range(lo, hi, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        pj = _phys(j, hi, bt_ptr, BS, PAGED)
        lg, vis = _tile_logits(qa, qb, sq, pos, j, pj, end, hi, k_ptr + kvh * stride_kh,
                               sk_ptr + kvh, stride_kt, stride_skt, d, scale, window, KV_PLANES,
                               BLOCK_D)
        w = _tile_weights(lg, vis, rowmax, table_ptr)
        z += tl.sum(w.to(tl.int64), axis=1)
        sv = tl.load(sv_ptr + kvh + pj * stride_svt, mask=j < hi, other=0.0)
        pm = tl.maximum(pm, tl.max((w.to(tl.float32) * 3.0517578125e-05) * sv[None, :], axis=1))
    off = (tl.program_id(2) * NKV + kvh) * R + r
    tl.store(z_ptr + off, z, mask=valid)
    tl.store(pm_ptr + off, pm, mask=valid)


@triton.jit
def _attn_values_kernel(
    # inputs
    q_ptr, sq_ptr, qpos_ptr, k_ptr, sk_ptr, v_ptr, sv_ptr, table_ptr, pmax_ptr, z_ptr, pm_ptr,
    scale, window, bt_ptr, BS,
    # outputs: partial A int64 [N_SPLIT, NKV, R, d], or out fp32 [T, nh * d] when DIRECT
    acc_ptr, out_ptr,
    # sizes and strides
    R, G, NKV, S, CHUNK, N_SPLIT, d, stride_qt, stride_qh, stride_sqt, stride_sqh, stride_kt,
    stride_kh, stride_skt, stride_vt, stride_vh, stride_svt, stride_ot,
    # meta
    KV_PLANES: tl.constexpr, DIRECT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, PAGED: tl.constexpr,
):
    """Sweep 3: P = max over splits; c_j = rint((p_j / P) * 2^15) (div.rn); A = sum_j c_j V_j
    exactly (int8 planes of c and V, see the module docstring). v int [S, nkv, d]."""
    kvh = tl.program_id(1)
    t, h, valid, pos, sq, qa, qb = _row_setup(q_ptr, sq_ptr, qpos_ptr, kvh, R, G, stride_qt,
                                              stride_qh, stride_sqt, stride_sqh, d, KV_PLANES,
                                              BLOCK_M, BLOCK_D)
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rowmax = _global_rowmax(pmax_ptr, kvh, r, valid, R, NKV, N_SPLIT)
    pm = _global_pmax(pm_ptr, kvh, r, valid, R, NKV, N_SPLIT)
    lo, hi, end = _key_range(pos, S, CHUNK, window)
    dd = tl.arange(0, BLOCK_D)
    a2 = tl.zeros([BLOCK_M, BLOCK_D], tl.int32)
    a1 = tl.zeros([BLOCK_M, BLOCK_D], tl.int32)
    a0 = tl.zeros([BLOCK_M, BLOCK_D], tl.int32)
    cs_a = tl.zeros([BLOCK_D], tl.int32)
    cs_b = tl.zeros([BLOCK_D], tl.int32)
    for j0 in range(lo, hi, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        pj = _phys(j, hi, bt_ptr, BS, PAGED)
        lg, vis = _tile_logits(qa, qb, sq, pos, j, pj, end, hi, k_ptr + kvh * stride_kh,
                               sk_ptr + kvh, stride_kt, stride_skt, d, scale, window, KV_PLANES,
                               BLOCK_D)
        w = _tile_weights(lg, vis, rowmax, table_ptr)
        sv = tl.load(sv_ptr + kvh + pj * stride_svt, mask=j < hi, other=0.0)
        p = (w.to(tl.float32) * 3.0517578125e-05) * sv[None, :]  # w * 2^-15 is exact
        c = rint_f32(tl.math.div_rn(p, pm[:, None]) * 32768.0).to(tl.int32)
        cl = ((c + 128) & 255) - 128
        chm = (((c - cl) >> 8) - 128).to(tl.int8)  # high byte - 128, in [-128, 0]
        cl = cl.to(tl.int8)
        vt = tl.load(v_ptr + kvh * stride_vh + pj[:, None] * stride_vt + dd[None, :],
                     mask=(j[:, None] < hi) & (dd[None, :] < d), other=0)  # [BLOCK_N, BLOCK_D]
        if KV_PLANES == 2:
            va, vb = _planes(vt)
            a2 = tl.dot(chm, va, a2, out_dtype=tl.int32)
            a1 = tl.dot(chm, vb, a1, out_dtype=tl.int32)
            a1 = tl.dot(cl, va, a1, out_dtype=tl.int32)
            a0 = tl.dot(cl, vb, a0, out_dtype=tl.int32)
            cs_a += tl.sum(va.to(tl.int32), axis=0)
            cs_b += tl.sum(vb.to(tl.int32), axis=0)
        else:
            va = vt.to(tl.int8)
            a1 = tl.dot(chm, va, a1, out_dtype=tl.int32)
            a0 = tl.dot(cl, va, a0, out_dtype=tl.int32)
            cs_b += tl.sum(va.to(tl.int32), axis=0)
    hi_part = a2.to(tl.int64) + cs_a.to(tl.int64)[None, :] * 128
    mid = a1.to(tl.int64) + cs_b.to(tl.int64)[None, :] * 128
    acc = (hi_part * 65536 + mid * 256) + a0.to(tl.int64)
    if DIRECT:
        z = tl.load(z_ptr + kvh * R + r, mask=valid, other=1)
        _store_out(out_ptr, acc, pm, z, t, h, valid, d, stride_ot, BLOCK_D)
    else:
        off = ((tl.program_id(2) * NKV + kvh) * R + r).to(tl.int64) * d
        tl.store(acc_ptr + off[:, None] + dd[None, :], acc,
                 mask=valid[:, None] & (dd[None, :] < d))


@triton.jit
def _attn_combine_kernel(
    # inputs: partials [N_SPLIT, NKV, R] (z int64, pm fp32) and [N_SPLIT, NKV, R, d] (acc int64)
    acc_ptr, z_ptr, pm_ptr,
    # output fp32 [T, nh * d]
    out_ptr,
    # sizes and strides
    R, G, NKV, N_SPLIT, d, stride_ot,
    # meta
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (row block, kv head): A = sum over splits, Z = sum over splits (exact integer
    sums), P = max over splits, then out = (f32(A) / f32(Z)) * P."""
    kvh = tl.program_id(1)
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    valid = r < R
    dd = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.int64)
    z = tl.zeros([BLOCK_M], tl.int64)
    for s in range(N_SPLIT):
        off = (s * NKV + kvh) * R + r
        z += tl.load(z_ptr + off, mask=valid, other=0)
        acc += tl.load(acc_ptr + off.to(tl.int64)[:, None] * d + dd[None, :],
                       mask=valid[:, None] & (dd[None, :] < d), other=0)
    pm = _global_pmax(pm_ptr, kvh, r, valid, R, NKV, N_SPLIT)
    z = tl.where(valid, z, 1)
    _store_out(out_ptr, acc, pm, z, r // G, kvh * G + r % G, valid, d, stride_ot, BLOCK_D)


# ------------------------------------------------------------------------------ launcher

@dataclass(frozen=True)
class AttnConfig:
    """Rows per program, keys per tile, warps and pipeline stages (shared by the four sweeps)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# The values sweep holds three int32 [BLOCK_M, BLOCK_D] accumulators plus the score tile; these
# are the sizes that keep it at or near zero spill bytes on sm_80/sm_90 (kernels check).
DECODE_CONFIGS = (AttnConfig(16, 32, 4, 2), AttnConfig(16, 64, 8, 2))
PREFILL_CONFIGS = (AttnConfig(32, 64, 8, 2), AttnConfig(64, 64, 8, 1))
CONFIGS = DECODE_CONFIGS + PREFILL_CONFIGS

_TABLES: dict = {}


def softmax_table_on(device: torch.device) -> torch.Tensor:
    """The spec's 256-entry weight table as int32 on `device` (cached)."""
    key = str(device)
    if key not in _TABLES:
        _TABLES[key] = torch.from_numpy(softmax_table().astype(np.int32)).to(device)
    return _TABLES[key]


def pick_config(rows: int) -> AttnConfig:
    """Decode tiles for up to 16 rows (one token's GQA group), else prefill tiles."""
    if rows <= 16:
        return DECODE_CONFIGS[1]
    return PREFILL_CONFIGS[0] if rows <= 32 else PREFILL_CONFIGS[1]


def pick_splits(rows: int, s_len: int, block_n: int) -> int:
    """Splits over the keys: decode spreads long caches over programs (~512 keys each, at most
    64); prefill has enough row blocks and splits only where a split would exceed MAX_SPLIT_KEYS."""
    need = triton.cdiv(s_len, MAX_SPLIT_KEYS // block_n * block_n)
    return max(need, min(64, triton.cdiv(s_len, 512))) if rows <= 16 else need


def attention(q, sq, k, sk, v, sv, q_pos, qmax: int, n_split: int | None = None,
              config: AttnConfig | None = None, block_table: torch.Tensor | None = None,
              block_size: int = 0, seq_len: int | None = None,
              window: int | None = None) -> torch.Tensor:
    """q int [T, nh, d], sq fp32 [T, nh]; k, v int [S, nkv, d], sk, sv fp32 [S, nkv];
    q_pos int [T] (query t sees keys j <= q_pos[t] < S, and under a sliding window of `window`
    keys only j > q_pos[t] - window). Returns fp32 [T, nh * d].

    Paged (engine/exact/paged.py's layout): k, sk, v, sv are one layer of a pool viewed as
    [n_blocks * block_size, ...] rows, block_table int [>= ceil(seq_len / block_size)] the
    sequence's blocks, seq_len its S; key j is row block_table[j // block_size] * block_size +
    j % block_size. The same bits as the contiguous rows (tested)."""
    paged = block_table is not None
    if paged:
        t_len, nh, d, s_len, nkv = _check_paged(q, sq, k, sk, v, sv, q_pos, qmax, block_table,
                                                block_size, seq_len)
    else:
        t_len, nh, d, s_len, nkv = _check(q, sq, k, sk, v, sv, q_pos, qmax)
    g = nh // nkv
    rows = t_len * g
    cfg = config or pick_config(rows)
    splits = n_split or pick_splits(rows, s_len, cfg.block_n)
    chunk = triton.cdiv(triton.cdiv(s_len, splits), cfg.block_n) * cfg.block_n
    if chunk > MAX_SPLIT_KEYS:
        raise OverflowError(f"{splits} splits leave {chunk} keys per split > {MAX_SPLIT_KEYS}")
    splits = triton.cdiv(s_len, chunk)  # no empty trailing split
    dev = q.device
    out = torch.empty((t_len, nh * d), dtype=torch.float32, device=dev)
    if t_len == 0:
        return out
    pos = q_pos.to(device=dev, dtype=torch.int32).contiguous()
    part = dict(device=dev)
    pmax = torch.empty((splits, nkv, rows), dtype=torch.int32, **part)
    zp = torch.empty((splits, nkv, rows), dtype=torch.int64, **part)
    pmp = torch.empty((splits, nkv, rows), dtype=torch.float32, **part)
    direct = splits == 1
    accp = out if direct else torch.empty((splits, nkv, rows, d), dtype=torch.int64, **part)
    grid = (triton.cdiv(rows, cfg.block_m), nkv, splits)
    meta = dict(KV_PLANES=2 if qmax > 127 else 1, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                BLOCK_D=max(32, triton.next_power_of_2(d)), num_warps=cfg.num_warps,
                num_stages=cfg.num_stages, enable_fp_fusion=False)
    scale = float(score_scale(d))
    if window is not None and not 0 < window < 2**31:
        raise ValueError(f"window must be in [1, 2^31), got {window}")
    win = 0 if window is None else int(window)
    table = softmax_table_on(dev)
    qs = (q.stride(0), q.stride(1), sq.stride(0), sq.stride(1))
    bt = (block_table.to(device=dev, dtype=torch.int32).contiguous() if paged else pos,
          block_size if paged else 1)
    meta["PAGED"] = paged
    _attn_rowmax_kernel[grid](q, sq, pos, k, sk, scale, win, *bt, pmax, rows, g, nkv, s_len, chunk, d,
                              *qs, k.stride(0), k.stride(1), sk.stride(0), **meta)
    _attn_sums_kernel[grid](q, sq, pos, k, sk, sv, table, pmax, scale, win, *bt, zp, pmp, rows, g,
                            nkv, s_len, chunk, splits, d, *qs, k.stride(0), k.stride(1),
                            sk.stride(0), sv.stride(0), **meta)
    _attn_values_kernel[grid](q, sq, pos, k, sk, v, sv, table, pmax, zp, pmp, scale, win, *bt,
                              accp,
                              out,
                              rows, g, nkv, s_len, chunk, splits, d, *qs, k.stride(0),
                              k.stride(1), sk.stride(0), v.stride(0), v.stride(1), sv.stride(0),
                              out.stride(0), DIRECT=direct, **meta)
    if not direct:
        _attn_combine_kernel[grid[:2]](accp, zp, pmp, out, rows, g, nkv, splits, d, out.stride(0),
                                       BLOCK_M=cfg.block_m, BLOCK_D=meta["BLOCK_D"],
                                       num_warps=cfg.num_warps, enable_fp_fusion=False)
    return out


def _check_paged(q, sq, k, sk, v, sv, q_pos, qmax: int, block_table, block_size: int,
                 seq_len):
    """_check for the paged layout: the pool's rows, then the table covers seq_len keys with
    blocks inside the pool; returns (T, nh, d, seq_len, nkv)."""
    t_len, nh, d, rows, nkv = _check(q, sq, k, sk, v, sv, q_pos, qmax, positions=False)
    if block_size < 1 or rows % block_size:
        raise ValueError(f"{rows} pool rows are not whole blocks of {block_size}")
    if seq_len is None or not 0 < seq_len <= rows:
        raise ValueError(f"seq_len must be in [1, {rows}], got {seq_len}")
    check_tensor("block_table", block_table, (torch.int32, torch.int64), 1)
    need = -(-seq_len // block_size)
    if block_table.shape[0] < need:
        raise ValueError(f"{seq_len} keys need {need} blocks, the table has "
                         f"{block_table.shape[0]}")
    if block_table.device.type == "cpu" and (int(block_table[:need].min()) < 0 or
                                             int(block_table[:need].max()) >= rows // block_size):
        raise ValueError(f"block ids must lie in [0, {rows // block_size})")
    check_bounds(d, seq_len, qmax)
    if q_pos.device.type == "cpu" and t_len and (int(q_pos.min()) < 0 or
                                                 int(q_pos.max()) >= seq_len):
        raise ValueError(f"query positions must lie in [0, {seq_len})")
    return t_len, nh, d, seq_len, nkv


def _check(q, sq, k, sk, v, sv, q_pos, qmax: int, positions: bool = True):
    """Validate dtypes/shapes/strides; returns (T, nh, d, S, nkv)."""
    kv_dtype = int_dtype(qmax)
    check_tensor("q", q, kv_dtype, 3)
    t_len, nh, d = q.shape
    check_tensor("k", k, kv_dtype, 3)
    s_len, nkv, _ = k.shape
    check_tensor("k", k, kv_dtype, 3, (s_len, nkv, d))
    check_tensor("v", v, kv_dtype, 3, (s_len, nkv, d))
    check_tensor("sq", sq, torch.float32, 2, (t_len, nh))
    for name, s in (("sk", sk), ("sv", sv)):
        check_tensor(name, s, torch.float32, 2, (s_len, nkv))
    if sk.stride(1) != 1 or sv.stride(1) != 1:
        raise ValueError("sk/sv must be contiguous along the heads")
    check_tensor("q_pos", q_pos, (torch.int32, torch.int64), 1, (t_len,))
    same_device(q, sq, k, sk, v, sv)
    if nkv == 0 or nh % nkv:
        raise ValueError(f"{nh} query heads over {nkv} K/V heads")
    if positions:
        check_bounds(d, s_len, qmax)
        if q_pos.device.type == "cpu" and t_len and (int(q_pos.min()) < 0 or
                                                     int(q_pos.max()) >= s_len):
            raise ValueError(f"query positions must lie in [0, {s_len})")
    return t_len, nh, d, s_len, nkv
