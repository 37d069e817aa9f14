"""One dense layer's replay steps in two compiled calls (layer.c): `pre` before the attention,
`post` after it, instead of some 25 calls from Python to the same routines.

Both return None whenever the compiled route cannot answer "every step ran and every check
passed": no compiled core, an array not in the dtype, shape or layout the routines take, a
non-finite value, an accumulator beyond its bound, a Freivalds check that fails. replay.py then
replays the layer on the step-by-step route, which decides and gives the reason. So these
functions never reject anything themselves, and a verdict does not depend on the route.
tests/test_layer_native.py checks that each output is the step-by-step route's, bit for bit.
"""

from __future__ import annotations

import ctypes

import numpy as np

from ..freivalds import EXACT_BITS
from ..numerics import exp2 as _exp2
from ..numerics.quant import int_dtype
from ..numerics import attention as _spec
from . import _split_run, lib, threads
from .attention import _full_table

_p, _i64, _f32, _f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_double
_F4, _I8 = np.dtype(np.float32), np.dtype(np.int64)


class _Linear(ctypes.Structure):
    _fields_ = [("r", _p), ("v", _p), ("s", _p), ("bias", _p), ("n", _i64), ("k", _i64),
                ("bound", _i64)]


class _Acc(ctypes.Structure):
    _fields_ = [("z", _p), ("rows", _i64), ("w", _i64)]


class PreArgs(ctypes.Structure):
    _fields_ = [("t", _i64), ("hidden", _i64), ("heads", _i64), ("kv_heads", _i64),
                ("head_dim", _i64), ("act_qmax", _i64), ("kv_qmax", _i64), ("eps", _f32),
                ("x", _p), ("norm", _p), ("q_norm", _p), ("k_norm", _p), ("qkv", _Linear),
                ("z", _Acc * 2), ("cos", _p), ("sin", _p), ("q", _p), ("k", _p), ("v", _p),
                ("sq", _p), ("sk", _p), ("sv", _p), ("fv_seconds", _f64)]


class PostArgs(ctypes.Structure):
    _fields_ = [("n", _i64), ("hidden", _i64), ("inter", _i64), ("q_size", _i64),
                ("act_qmax", _i64), ("eps", _f32), ("neg_log2e", _f32), ("coefs", _p),
                ("o", _p), ("x", _p), ("norm", _p), ("lo", _Linear), ("gate_up", _Linear),
                ("down", _Linear), ("z_o", _Acc), ("z_gate_up", _Acc), ("z_down", _Acc),
                ("out", _p), ("fv_seconds", _f64)]


_POSITION_LIMIT = 1 << 40  # attend declines positions and windows from here (the key's: far below)


class _Cache(dict):
    """Structs of raw addresses kept with a key (its `_limbs`): a deep copy of the key starts
    with none (a copied entry would name the original key's arrays)."""

    def __deepcopy__(self, memo):
        return _Cache()


class AttendArgs(ctypes.Structure):
    _fields_ = [("t", _i64), ("n", _i64), ("heads", _i64), ("kv_heads", _i64), ("d", _i64),
                ("es", _i64), ("q", _p), ("sq", _p), ("k", _p), ("v", _p), ("sk", _p),
                ("sv", _p), ("pos", _p), ("n_kv", _i64), ("kpos", _p), ("k_all", _p),
                ("v_all", _p), ("sk_all", _p), ("sv_all", _p), ("window", _i64), ("scale", _f32),
                ("frac", _f32), ("table", _p), ("cut", _i64), ("out", _p)]


class LayerArgs(ctypes.Structure):
    _fields_ = [("pre", PreArgs), ("att", AttendArgs), ("post", PostArgs), ("x_tab", _p),
                ("x_rows", _i64), ("x_idx", _p), ("y_tab", _p), ("y_rows", _i64), ("y_idx", _p),
                ("cos_tab", _p), ("sin_tab", _p), ("rope_rows", _i64), ("rope_idx", _p),
                ("out", _p), ("fv_seconds", _f64), ("attn_seconds", _f64)]


def declare(so) -> None:
    so.ly_pre.restype = so.ly_post.restype = so.attn_layer.restype = so.ly_layer.restype = _i64
    so.ly_pre.argtypes = [ctypes.POINTER(PreArgs)]
    so.ly_post.argtypes = [ctypes.POINTER(PostArgs)]
    so.ly_layer.argtypes = [ctypes.POINTER(LayerArgs)]
    so.attn_layer.argtypes = [ctypes.POINTER(AttendArgs), _i64, _i64, _i64]


def _addr(a, shape: tuple, dtype=_F4) -> int | None:
    """The address of a C-contiguous, aligned array of this shape and dtype, else None."""
    if (a is None or a.dtype != dtype or a.shape != shape or not a.flags.c_contiguous
            or not a.flags.aligned):
        return None
    return a.ctypes.data


def _f32_vec(a, n: int) -> int | None:
    return _addr(a, (n,))


def _rows(a: np.ndarray, rows: int, n: int, dtype=_F4) -> int | None:
    return _addr(a, (rows, n), dtype)


def _table(a: np.ndarray, width: int) -> int | None:
    """The address of a fp32 table of rows [R, width], R >= 1 (as _addr), else None."""
    return _rows(a, len(a), width) if a.ndim == 2 and len(a) else None


def _linear(key, profile, label: str, n: int, k: int) -> _Linear | None:
    """The key's secret rows, scales and bias of matrix `label` [n, k], kept with the key (its
    `_limbs`, beside the prepared rows) for the next call: the entry holds the arrays whose
    addresses it gives and is used only while the key still has those very arrays."""
    arrays, limbs = key.arrays, getattr(key, "_limbs", None)
    cache = None if limbs is None else limbs.get("layer.c") or limbs.setdefault("layer.c", _Cache())
    sa, bias = arrays.get(f"{label}.s"), arrays.get(f"{label}.bias")
    r, v = key.prepared(label)
    bound = k * profile.act_qmax * profile.matrix_qmax(label)
    tag = (label, n, k, bound)
    got = None if cache is None else cache.get(tag)
    if got is not None and got[0] is sa and got[1] is bias and got[2] is r and got[3] is v:
        return got[4]
    s = _f32_vec(sa, n)
    b = None if bias is None else _f32_vec(bias, n)
    if (s is None or (bias is not None and b is None) or r.a.shape != (n,) or v.a.shape != (k,)
            or r.a.dtype != _I8 or v.a.dtype != _I8):
        return None
    if bound >= 2**EXACT_BITS:  # beyond what the step route takes (freivalds.dot): it decides
        return None
    lin = _Linear(r.a.ctypes.data, v.a.ctypes.data, s, b, n, k, bound)
    if cache is not None:
        cache[tag] = (sa, bias, r, v, lin)
    return lin


def _acc(z: np.ndarray | None, rows: int, n: int) -> _Acc | None:
    """Packed accumulator rows uint8 [rows, n, w] (None: no rows)."""
    if z is None:
        return _Acc(None, 0, 1) if rows == 0 else None
    if (z.dtype != np.uint8 or z.ndim != 3 or z.shape[:2] != (rows, n) or not 1 <= z.shape[2] <= 8
            or not z.flags.c_contiguous):
        return None
    return _Acc(z.ctypes.data, rows, z.shape[2])


def _pre_args(key, cfg, profile, l: int, t: int, z_full, z_sample) -> PreArgs | None:
    """ly_pre's arguments for layer l at t rows but for its x, cos and sin rows and outputs (the
    callers set them), or None."""
    h, nh, nkv, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    nq = cfg.q_size + 2 * cfg.kv_size
    ns = 0 if z_sample is None else z_sample.shape[0]
    arrays = key.arrays
    norm = _f32_vec(arrays.get(f"layers.{l}.attn_norm"), h)
    qn = kn = 0
    if cfg.qk_norm:
        qn = _f32_vec(arrays.get(f"layers.{l}.q_norm"), d)
        kn = _f32_vec(arrays.get(f"layers.{l}.k_norm"), d)
    lin = _linear(key, profile, f"layers.{l}.qkv", nq, h)
    accs = (_acc(z_full, t - ns, nq), _acc(z_sample, ns, nq))
    if (norm is None or qn is None or kn is None or lin is None or None in accs
            or nq != nh * d + 2 * nkv * d or d % 2):
        return None
    return PreArgs(t, h, nh, nkv, d, profile.act_qmax, profile.kv_qmax, cfg.rms_norm_eps, None,
                   norm, qn or None, kn or None, lin, (_Acc * 2)(*accs))


def pre(key, cfg, profile, l: int, x: np.ndarray, z_full: np.ndarray, z_sample, cos, sin):
    """The qkv side of layer l (dense or MoE) on rows x fp32 [t, hidden] (the challenged
    positions, then the K/V sample's), z_full / z_sample their packed qkv accumulators:
    ((q, sq), (k, sk), (v, sv)) as replay._qkv gives them, and the seconds spent in Freivalds;
    or None."""
    so = lib()
    if so is None:
        return None
    t, h, nh, nkv, d = x.shape[0], cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    a = _pre_args(key, cfg, profile, l, t, z_full, z_sample)
    ptrs = (_rows(x, t, h), _rows(cos, t, d // 2), _rows(sin, t, d // 2))
    if a is None or None in ptrs:
        return None
    dt = int_dtype(profile.kv_qmax)
    q, k, v = (np.empty((t, n, d), dt) for n in (nh, nkv, nkv))
    sq, sk, sv = (np.empty((t, n), np.float32) for n in (nh, nkv, nkv))
    a.x, a.cos, a.sin = ptrs
    a.q, a.k, a.v, a.sq, a.sk, a.sv = (b.ctypes.data for b in (q, k, v, sq, sk, sv))
    if so.ly_pre(ctypes.byref(a)):
        return None
    return ((q, sq), (k, sk), (v, sv)), a.fv_seconds


def _post_args(key, cfg, profile, l: int, n: int, packed: dict) -> PostArgs | None:
    """ly_post's arguments for dense layer l at n rows but for its o and x rows and its output
    (the callers set them), or None."""
    if cfg.moe:
        return None
    h, f, qs = cfg.hidden_size, cfg.intermediate_size, cfg.q_size
    p = f"layers.{l}."
    norm = _f32_vec(key.arrays.get(p + "mlp_norm"), h)
    lins = [_linear(key, profile, p + "o", h, qs), _linear(key, profile, p + "gate_up", 2 * f, h),
            _linear(key, profile, p + "down", h, f)]
    accs = [_acc(packed.get("o"), n, h), _acc(packed.get("gate_up"), n, 2 * f),
            _acc(packed.get("down"), n, h)]
    if norm is None or None in lins or None in accs:
        return None
    return PostArgs(n, h, f, qs, profile.act_qmax, cfg.rms_norm_eps, _exp2.NEG_LOG2E,
                    _exp2.exp2_coefficients().ctypes.data, None, None, norm, *lins, *accs)


def post(key, cfg, profile, l: int, o: np.ndarray, x: np.ndarray, packed: dict):
    """The o linear and the MLP of dense layer l at n challenged positions: o fp32 [n, q_size] (the
    attention's output), x fp32 [n, hidden] (their input rows), packed the layer's accumulators
    (o, gate_up, down rows uint8 [n, N, w]): the layer's output rows fp32 [n, hidden] and the
    seconds spent in Freivalds; or None."""
    so = lib()
    if so is None:
        return None
    n, h = o.shape[0], cfg.hidden_size
    a = _post_args(key, cfg, profile, l, n, packed)
    o = np.ascontiguousarray(o)
    ptrs = (_rows(o, n, cfg.q_size), _rows(x, n, h))
    if a is None or None in ptrs:
        return None
    out = np.empty((n, h), np.float32)
    a.o, a.x = ptrs
    a.out = out.ctypes.data
    if so.ly_post(ctypes.byref(a)):
        return None
    return out, a.fv_seconds


def _attend_args(cfg, profile, pos: np.ndarray, n: int, kv: tuple, dt) -> tuple | None:
    """attn_layer's arguments for the attention of the first n of positions pos [t] over the
    opened rows kv = (kpos, k, sk, v, sv), all but the derived rows and the output (the callers
    set them), and the keys the challenged rows see; or None (a size, dtype or bound the call
    does not take)."""
    kpos, k_all, sk_all, v_all, sv_all = kv
    t, nh, nkv, d = len(pos), cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    window = cfg.sliding_window
    if (dt not in (np.int8, np.int16) or not 1 <= n <= t or (window is not None and window < 1)
            or _spec.COEF_BITS != 15 or _spec.LOGIT_CLAMP != 2**30):
        return None
    m = len(kpos)
    ptrs = [_addr(x, shape, want) for x, shape, want in (
        (pos, (t,), _I8), (kpos, (m,), _I8), (k_all, (m, nkv, d), dt), (v_all, (m, nkv, d), dt),
        (sk_all, (m, nkv), _F4), (sv_all, (m, nkv), _F4))]
    if None in ptrs:
        return None
    p_n = pos[:n]
    pmin, pmax = int(p_n.min()), int(p_n.max())
    # positions and window far inside int64, so no sum in attn_layer can overflow
    if pmin < 0 or pmax >= _POSITION_LIMIT or (window is not None and window >= _POSITION_LIMIT):
        return None
    lo = max(0, pmin - (window - 1)) if window is not None else 0
    try:  # the spec's exactness bounds on the keys these rows see
        _spec.check_bounds(d, pmax + 1 - lo, profile.kv_qmax)
    except OverflowError:
        return None
    table, cut = _full_table()  # (kept by native.attention: alive with the module)
    a = AttendArgs(t, n, nh, nkv, d, np.dtype(dt).itemsize, None, None, None, None, None, None,
                   ptrs[0], m, *ptrs[1:], window or 0, float(_spec.score_scale(d)),
                   float(1 << _exp2.LOGIT_FRAC_BITS), table.ctypes.data, cut, None)
    return a, pmax + 1 - lo


def _attend_threads(rows: int, seen: int, d: int, n_threads: int | None) -> int:
    """The threads attn_layer's rows are split over: several when the keys seen are many
    (native._attn's rule); no bit changes."""
    return max(1, min(n_threads or threads(), rows * seen * d // (1 << 21) + 1))


def attend(cfg, profile, q, k, v, pos: np.ndarray, n: int, kv: tuple, n_threads: int | None = None):
    """The attention step of layer l on the fused route (attn.c's attn_layer): the derived K/V
    rows (q, k, v: (quantized rows [t, heads, d], scales [t, heads]) from `pre`, at positions pos
    [t], the first n challenged) against the opened ones kv = (kpos, k, sk, v, sv), then the
    attention of the n challenged rows over every opened key they see: fp32 [n, heads * d] as
    native.attention.attention gives it; or None (a row differs or is not opened, a size or
    dtype the call does not take; nothing decided)."""
    so = lib()
    (qq, sq), (kq, sk), (vq, sv) = q, k, v
    t, nh, nkv, d = len(pos), cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    dt = qq.dtype
    got = None if so is None else _attend_args(cfg, profile, pos, n, kv, dt)
    if got is None:
        return None
    a, seen = got
    ptrs = [_addr(x, shape, want) for x, shape, want in (
        (qq, (t, nh, d), dt), (sq, (t, nh), _F4), (kq, (t, nkv, d), dt), (vq, (t, nkv, d), dt),
        (sk, (t, nkv), _F4), (sv, (t, nkv), _F4))]
    if None in ptrs:
        return None
    out = np.empty((n, nh * d), np.float32)
    a.q, a.sq, a.k, a.v, a.sk, a.sv = ptrs
    a.out = out.ctypes.data
    rows = nh * n
    k_threads = _attend_threads(rows, seen, d, n_threads)
    bounds = [rows * i // k_threads for i in range(k_threads + 1)]
    codes = []  # any code but 0 (a check failed, a softmax step the step route must meet, no
    #             memory): not answered; the checks run in the first range's call

    def run(a0: int, b0: int) -> int:
        codes.append(so.attn_layer(ctypes.byref(a), a0, b0 - a0, int(a0 == 0)))
        return 0
    _split_run(run, bounds, "attn_layer")
    return None if any(codes) else out


class Whole:
    """A prepared ly_layer call (`prepare`): its argument struct, the arrays whose addresses it
    holds (kept alive with it), and the attention's thread rule (decided when it runs)."""

    __slots__ = ("args", "keep", "split")

    def __init__(self, args: LayerArgs, keep: tuple, split: int):
        self.args, self.keep, self.split = args, keep, split


def prepare(key, cfg, profile, l: int, pos: np.ndarray, n: int, x_rows: tuple, y_rows: tuple,
            rope: tuple, packed: dict, zq_rows, kv: tuple, out: np.ndarray | None = None):
    """Dense layer l's one compiled call (layer.c's ly_layer), ready to run: what pre, attend and
    post compute (at positions pos [t], the first n challenged), then the output rows compared
    with the opened x_{l+1} rows. x_rows = (table fp32 [R, hidden], row of each position int64
    [t]): the x_l rows; y_rows the same for x_{l+1} (rows of the n challenged positions); rope =
    (cos, sin fp32 [P, head_dim / 2], row of each position [t]). out fp32 [n, hidden], when
    given, gets the layer's output rows. A Whole, or None where the call does not take an array,
    size or bound (the caller then takes pre, attend and post). Nothing is read but shapes,
    dtypes, the challenged positions and addresses: a verifier prepares every layer before it
    replays any, while its Python runs on warm caches."""
    so = lib()
    if so is None or cfg.moe:
        return None
    t, h, d = len(pos), cfg.hidden_size, cfg.head_dim
    got = _attend_args(cfg, profile, pos, n, kv, int_dtype(profile.kv_qmax))
    if got is None:
        return None
    pre_a = _pre_args(key, cfg, profile, l, t, packed.get("qkv"), zq_rows)
    post_a = _post_args(key, cfg, profile, l, n, packed)
    (xt, xi), (yt, yi), (ct, st, ri) = x_rows, y_rows, rope
    tabs = (_table(xt, h), _table(yt, h), _table(ct, d // 2), _table(st, d // 2))
    idx = (_addr(xi, (t,), _I8), _addr(yi, (n,), _I8), _addr(ri, (t,), _I8))  # range: in C
    if (pre_a is None or post_a is None or None in tabs or None in idx or ct.shape != st.shape
            or (out is not None and _rows(out, n, h) is None)):
        return None
    a = LayerArgs(pre_a, got[0], post_a, tabs[0], len(xt), idx[0], tabs[1], len(yt), idx[1],
                  tabs[2], tabs[3], len(ct), idx[2], None if out is None else out.ctypes.data)
    # every array an address in `a` names (the dicts' entries themselves: a dict may change)
    norms = tuple(key.arrays.get(f"layers.{l}.{name}")
                  for name in ("attn_norm", "q_norm", "k_norm", "mlp_norm"))
    keep = (pos, xt, xi, yt, yi, ct, st, ri, tuple(packed.values()), zq_rows, tuple(kv), out,
            norms, key)
    return Whole(a, keep, _attend_threads(cfg.num_heads * n, got[1], d, 1 << 30))


def run(w: Whole):
    """Run a prepared call: (passed, Freivalds seconds, attention seconds), passed True when
    every step ran and every check passed, False otherwise (nothing decided: the step route
    decides); None when it did not run: the attention would split its rows over this thread's
    cores (the caller then takes pre, attend and post), or no compiled core."""
    so = lib()
    if so is None or min(w.split, threads()) > 1:
        return None
    rc = so.ly_layer(ctypes.byref(w.args))
    return rc == 0, w.args.fv_seconds, w.args.attn_seconds


def whole(key, cfg, profile, l: int, pos: np.ndarray, n: int, x_rows: tuple, y_rows: tuple,
          rope: tuple, packed: dict, zq_rows, kv: tuple, out: np.ndarray | None = None):
    """prepare, then run (None where either does not)."""
    w = prepare(key, cfg, profile, l, pos, n, x_rows, y_rows, rope, packed, zq_rows, kv, out)
    return None if w is None else run(w)

