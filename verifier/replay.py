"""Bit-exact replay of opened layers and decode steps, using the numpy spec and Freivalds checks.

Each function raises Reject(code, detail) on the first mismatch; every comparison is `==`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from . import freivalds, native
from .native import layer
from .native.attention import attention  # the spec's, softmax passes compiled when built
from .native.bridge import apply_rope, dequantize, quantize_rows, rmsnorm, swiglu  # the spec's
from .numerics.attention import first_visible
from .numerics import moe
from .numerics.logprobs import entry as lp_entry
from .numerics.forward import split_qkv
from .numerics.sampler import SamplingParams, sample
from .opening import unpack_acc


class Reject(Exception):
    def __init__(self, code: str, detail: str):
        super().__init__(f"{code}: {detail}")
        self.code, self.detail = code, detail


@dataclass
class Timer:
    """Seconds spent per part of the replay. `decode` holds the share of each part spent in
    replay_decode (LM head and decode policy: once per position, not per layer); `merkle` the
    seconds spent checking trace proofs (outside the replay parts)."""

    parts: dict = field(default_factory=lambda: {"freivalds": 0.0, "attention": 0.0, "rest": 0.0})
    decode: dict = field(default_factory=lambda: {"freivalds": 0.0, "attention": 0.0, "rest": 0.0})
    merkle: float = 0.0
    scope: str | None = None  # "decode" while replay_decode runs

    def _count(self, part: str, sec: float) -> None:
        self.parts[part] += sec
        if self.scope == "decode":
            self.decode[part] += sec

    def split(self, t0: float, freivalds: float, attention: float = 0.0) -> float:
        """The time since t0 of a compiled call that measured its own Freivalds (and attention)
        seconds: those under "freivalds" ("attention"), the rest under "rest"."""
        now = time.perf_counter()
        self._count("freivalds", freivalds)
        self._count("attention", attention)
        self._count("rest", now - t0 - freivalds - attention)
        return now

    def add(self, part: str, t0: float) -> float:
        now = time.perf_counter()
        self._count(part, now - t0)
        return now

    def merge(self, other: "Timer") -> None:
        """Add another timer's seconds (a layer thread's, or a route that answered) to these."""
        for part, sec in other.parts.items():
            self.parts[part] += sec
        for part, sec in other.decode.items():
            self.decode[part] += sec
        self.merkle += other.merkle

    @contextmanager
    def span(self, scope: str | None = None):
        """A replay step: what its timed parts do not cover (quantization, dequantization,
        SwiGLU, norms, comparisons) is added to "rest"."""
        t0, before, outer = time.perf_counter(), sum(self.parts.values()), self.scope
        self.scope = scope
        try:
            yield
        finally:
            self.add("rest", t0 + (sum(self.parts.values()) - before))
            self.scope = outer


@dataclass
class Ctx:
    """What the replay reads: key, config, profile, rope table, opened arrays."""

    key: object
    cfg: object
    profile: object
    rope: object
    arrays: dict
    timer: Timer
    ready: dict = field(default_factory=dict)  # layer -> its prepared one-call replay or None


def _freivalds(ctx: Ctx, label: str, x: np.ndarray, z: np.ndarray, z_bound: int,
               code: str) -> None:
    t0 = time.perf_counter()
    r, v = ctx.key.prepared(label)
    ok = freivalds.check(r, v, x, z, ctx.profile.act_qmax, z_bound)
    ctx.timer.add("freivalds", t0)
    if not np.all(ok):
        raise Reject(code, f"{label}: accumulator of row {int(np.argmin(ok))} fails Freivalds")


def _linear(ctx: Ctx, label: str, x: np.ndarray, z: np.ndarray, code: str,
            resid: np.ndarray | None = None) -> np.ndarray:
    """Quantize x, bound z, check z = W q(x) by Freivalds, dequantize (and add resid, the
    spec's resid + linear(x), in the same pass).

    Every |z| is checked against K * qmax_x * qmax_w (< 2^53) by freivalds.dot before any
    residue is trusted (its OverflowError is the rejection)."""
    qx, sx = quantize_rows(x, ctx.profile.act_qmax)
    return _linear_q(ctx, label, qx, sx, z, code, resid)


def _linear_q(ctx: Ctx, label: str, qx: np.ndarray, sx: np.ndarray, z: np.ndarray, code: str,
              resid: np.ndarray | None = None) -> np.ndarray:
    """_linear on an input already quantized (qx, sx): several linears that read the same rows
    (a MoE layer's router and experts) quantize them once."""
    if z.dtype != np.int64 or z.shape != (qx.shape[0], len(ctx.key.arrays[f"{label}.s"])):
        raise Reject("opening_malformed", f"{label}: accumulator {z.dtype} {z.shape}")
    bound = _z_bound(ctx, label, qx.shape[1])  # < 2^53
    try:
        _freivalds(ctx, label, qx, z, bound, code)
    except OverflowError:
        raise Reject(code, f"{label}: an accumulator exceeds the bound K * qmax_x * qmax_w") \
            from None
    return dequantize(z, sx, ctx.key.arrays[f"{label}.s"], ctx.key.arrays.get(f"{label}.bias"),
                      resid)


def _z_bound(ctx: Ctx, label: str, k: int) -> int:
    """The proven bound on a linear's |z|: K * qmax_x * qmax_w."""
    return k * ctx.profile.act_qmax * ctx.profile.matrix_qmax(label)


def _packed_linear(ctx: Ctx, label: str, qx: np.ndarray, sx: np.ndarray, packed: np.ndarray,
                   resid: np.ndarray | None = None) -> np.ndarray | None:
    """The linear on quantized rows (qx, sx) from its packed accumulator rows in one compiled
    pass (native.fv_acc_linear: bound, Freivalds residue and dequantization, + resid), when the
    core is built and every check passes; else None (nothing decided: the caller takes the step
    route, which decides and gives the reason)."""
    r, v = ctx.key.prepared(label)
    s, bias = ctx.key.arrays[f"{label}.s"], ctx.key.arrays.get(f"{label}.bias")
    f32 = [a for a in (s, bias, sx, resid) if a is not None]
    if not (native.lib() is not None and packed.dtype == np.uint8 and packed.ndim == 3
            and packed.shape[:2] == (len(qx), len(s)) and 1 <= packed.shape[2] <= 8
            and r.a.shape == s.shape and (bias is None or bias.shape == s.shape)
            and (resid is None or resid.shape == packed.shape[:2])
            and all(a.dtype == np.float32 and a.flags.c_contiguous for a in f32)):
        return None
    bound = _z_bound(ctx, label, qx.shape[1])
    if bound >= 2**freivalds.EXACT_BITS:  # the step route refuses it (freivalds.dot): it decides
        return None
    t0 = time.perf_counter()
    got = native.fv_acc_linear(r.a, np.ascontiguousarray(packed), bound, sx, s, bias, resid)
    ok = got is not None and np.array_equal(got[0], native.fv_dot(v.a, qx, ctx.profile.act_qmax))
    ctx.timer.add("freivalds", t0)
    return got[1] if ok else None


def _linear_packed(ctx: Ctx, label: str, x: np.ndarray, packed: np.ndarray, code: str):
    """_linear on packed accumulator rows: the one-pass route when it answers (and FUSED is on),
    else decoded and through _linear_q, which decides and gives the reason."""
    qx, sx = quantize_rows(x, ctx.profile.act_qmax)
    y = _packed_linear(ctx, label, qx, sx, packed) if FUSED else None
    return y if y is not None else _linear_q(ctx, label, qx, sx, unpack_acc(packed), code)


class RowTable(Mapping):
    """Opened rows by position (position -> row view), read as a mapping; `take` gathers the
    rows of several positions in one indexing instead of a stack of views."""

    def __init__(self, positions, rows: np.ndarray):
        self.rows = rows
        self.index = {int(p): i for i, p in enumerate(positions)}

    def __getitem__(self, p):
        return self.rows[self.index[int(p)]]

    def __iter__(self):
        return iter(self.index)

    def __len__(self) -> int:
        return len(self.index)

    def take(self, positions) -> np.ndarray:
        return self.rows[self.at(positions)]

    def at(self, positions) -> np.ndarray:
        """The row index of each position, int64 (KeyError: a position not in the table)."""
        index = self.index
        ps = positions.tolist() if isinstance(positions, np.ndarray) else positions
        return np.fromiter((index[int(p)] for p in ps), np.int64, len(ps))


def _rows(table, positions) -> np.ndarray:
    """The rows of `positions` from a RowTable, or from a dict of rows (tests build those)."""
    if isinstance(table, RowTable):
        return table.take(positions)
    return np.stack([table[int(p)] for p in positions])


def replay_layer(ctx: Ctx, l: int, resid: dict, kv: dict, z: dict, zq: dict) -> None:
    """Layer l at its challenged positions (full) and its K/V sample (derivation only).

    resid[l]: position -> x_l row; kv[l]: (positions, k, sk, v, sv), the opened K/V rows
    (positions sorted: every key a challenged position sees, and the K/V sample);
    z[l]: (positions, {matrix: rows}); zq[l]: (positions, qkv rows); accumulator rows packed
    (opening version 2, type-checked against the key), decoded here one layer at a time.

    A layer first takes the fused route (native/layer.py: one compiled call for a dense layer,
    else compiled calls before, for and after the attention; a MoE layer's MLP: each linear in
    one pass over its packed rows), which can only
    answer "every check passed"; anything else, and every layer when FUSED is off or the
    compiled core is not built, takes the step-by-step route, which decides and gives the
    reason. The two compute the same values, so the verdict is the same.
    """
    with ctx.timer.span():
        if not (FUSED and _try_fused(ctx, l, resid, kv, z, zq)):
            _replay_layer(ctx, l, resid, kv, z, zq)


FUSED = True  # tests switch it off to compare the routes


def _try_fused(ctx: Ctx, l: int, resid: dict, kv: dict, z: dict, zq: dict) -> bool:
    """_fused_layer, with any rejection or arithmetic refusal inside it meaning "not answered"
    (the step route then meets it in its own order and decides)."""
    try:
        return _fused_layer(ctx, l, resid, kv, z, zq)
    except (Reject, ArithmeticError, ValueError):
        return False


def _positions(z: dict, zq: dict, l: int):
    p_full, packed = z[l]
    p_sample, zq_rows = zq.get(l, ([], None))
    return np.array(list(p_full) + list(p_sample), dtype=np.int64), len(p_full), packed, zq_rows


_UNSET = object()


def prepare_layers(ctx: Ctx, layers, resid: dict, kv: dict, z: dict, zq: dict) -> None:
    """Prepare the one-call replay (layer.prepare) of every dense layer in `layers` into
    ctx.ready, before any is replayed: its Python then runs on warm caches (prepared in turn, each
    layer's would run after the previous layer's compiled call swept them, several times
    slower). Its time counts as the replay's ("rest"). Nothing is decided here: a layer whose
    preparation declines or raises gets None (the fused route's other calls or the step route
    replay it in its turn, in the canonical order)."""
    if not FUSED or ctx.cfg.moe or native.lib() is None:
        return
    with ctx.timer.span():
        for l in layers:
            try:
                ctx.ready[l] = _prepare(ctx, l, resid, kv, z, zq)
            except Exception:  # noqa: BLE001 - decided in the layer's turn, in order
                ctx.ready[l] = None


def _prepare(ctx: Ctx, l: int, resid: dict, kv: dict, z: dict, zq: dict):
    """layer.prepare for layer l when its rows are in RowTables, else None."""
    xt, yt = resid[l], resid[l + 1]
    if ctx.cfg.moe or not (isinstance(xt, RowTable) and isinstance(yt, RowTable)):
        return None
    pos, n, packed, zq_rows = _positions(z, zq, l)
    return layer.prepare(ctx.key, ctx.cfg, ctx.profile, l, pos, n, (xt.rows, xt.at(pos)),
                         (yt.rows, yt.at(pos[:n])), ctx.rope.where(pos), packed, zq_rows, kv[l])


def _fused_layer(ctx: Ctx, l: int, resid: dict, kv: dict, z: dict, zq: dict) -> bool:
    """Layer l through the compiled calls: True when every step ran and every check passed;
    False (or an exception, which _try_fused reads as False) when it did not answer. A dense
    layer whose rows are in RowTables takes one call (layer.prepare, here or by prepare_layers
    before; layer.run) unless it declines; else, and for a MoE layer, pre, the attention and
    the MLP are separate calls."""
    cfg = ctx.cfg
    t0 = time.perf_counter()
    w = ctx.ready.pop(l, _UNSET)
    if w is _UNSET:
        w = _prepare(ctx, l, resid, kv, z, zq)
    got = None if w is None else layer.run(w)
    if got is not None:
        ctx.timer.split(t0, got[1], got[2])
        return got[0]
    pos, n, packed, zq_rows = _positions(z, zq, l)
    x = _rows(resid[l], pos)
    cos, sin = ctx.rope.lookup(pos)
    got = layer.pre(ctx.key, cfg, ctx.profile, l, x, packed.get("qkv"), zq_rows, cos, sin)
    t0 = ctx.timer.split(t0, got[1] if got else 0.0)
    if got is None:
        return False
    o = layer.attend(cfg, ctx.profile, *got[0], pos, n, kv[l])
    t0 = ctx.timer.add("attention", t0)
    if o is None:
        return False
    if cfg.moe:
        out = _fused_moe_mlp(ctx, l, o, x[:n], packed)
        return out is not None and np.array_equal(out, _rows(resid[l + 1], pos[:n]))
    done = layer.post(ctx.key, cfg, ctx.profile, l, o, x[:n], packed)
    ok = done is not None and np.array_equal(done[0], _rows(resid[l + 1], pos[:n]))
    ctx.timer.split(t0, done[1] if done else 0.0)
    return ok


def _fused_moe_mlp(ctx: Ctx, l: int, o: np.ndarray, x: np.ndarray, packed: dict):
    """The o linear and a Mixtral MLP (as _replay_experts computes it) with every linear from its
    packed rows in one pass (_packed_linear): the layer's output rows, or None when a step does
    not answer (the step route then decides)."""
    cfg, qmax = ctx.cfg, ctx.profile.act_qmax
    f, k = cfg.intermediate_size, cfg.experts_per_token
    p = f"layers.{l}."
    h = _packed_linear(ctx, p + "o", *quantize_rows(o, qmax), packed["o"], x)
    if h is None:
        return None
    m = rmsnorm(h, ctx.key.arrays[p + "mlp_norm"], cfg.rms_norm_eps)
    qm, sm = quantize_rows(m, qmax)
    r = _packed_linear(ctx, p + "router", qm, sm, packed["router"])
    if r is None:
        return None
    sel, g = moe.route(r, k)
    outs = np.zeros((m.shape[0], k, cfg.hidden_size), np.float32)
    for e in np.unique(sel):
        rows, slot = np.nonzero(sel == e)
        q = f"{p}experts.{int(e)}."
        gu = _packed_linear(ctx, q + "gate_up", qm[rows], sm[rows], packed["gate_up"][rows, slot])
        if gu is None:
            return None
        act = swiglu(gu[:, :f], gu[:, f:])
        y = _packed_linear(ctx, q + "down", *quantize_rows(act, qmax), packed["down"][rows, slot])
        if y is None:
            return None
        outs[rows, slot] = y
    return (h + moe.combine(outs, g)).astype(np.float32)


def _attend(ctx: Ctx, l: int, pos: np.ndarray, n: int, q, k, v, kv: dict, t0: float):
    """The derived K/V rows (k, v: quantized rows and scales at pos) against the opened ones, then
    the attention of the first n positions' q over every opened key they see."""
    kq, sk = k
    vq, sv = v
    kpos, k_all, sk_all, v_all, sv_all = kv[l]
    at = np.searchsorted(kpos, pos)
    if not (np.all(at < len(kpos)) and np.array_equal(kpos[np.minimum(at, len(kpos) - 1)], pos)):
        raise Reject("opening_malformed", f"layer {l}: a derived K/V row is not opened")
    if not (np.array_equal(kq, k_all[at]) and np.array_equal(sk, sk_all[at])
            and np.array_equal(vq, v_all[at]) and np.array_equal(sv, sv_all[at])):
        raise Reject("kv_mismatch", f"layer {l}: a committed K/V row differs from its derivation")
    t0 = ctx.timer.add("rest", t0)
    # the keys the challenged positions see: positions lo .. max(p_full), every one opened
    cfg = ctx.cfg
    lo, hi = int(first_visible(pos[:n].min(), cfg.sliding_window)), int(pos[:n].max()) + 1
    a = int(np.searchsorted(kpos, lo))
    if not np.array_equal(kpos[a:a + hi - lo], np.arange(lo, hi)):
        raise Reject("opening_malformed", f"layer {l}: the K/V rows {lo}..{hi - 1} the "
                                          f"challenged positions see are not all opened")
    b = a + hi - lo
    o = attention(q[0][:n], q[1][:n], k_all[a:b], sk_all[a:b], v_all[a:b], sv_all[a:b],
                  pos[:n] - lo, ctx.profile.kv_qmax, window=cfg.sliding_window)
    ctx.timer.add("attention", t0)
    return o


def _replay_layer(ctx: Ctx, l: int, resid: dict, kv: dict, z: dict, zq: dict) -> None:
    """The step-by-step route: every step a call from here, the first failing check raised."""
    cfg = ctx.cfg
    pos, n, packed, zq_rows = _positions(z, zq, l)
    zs = {m: unpack_acc(a) for m, a in packed.items()}
    zq_rows = (np.zeros((0, zs["qkv"].shape[1]), np.int64) if zq_rows is None
               else unpack_acc(zq_rows))
    t0 = time.perf_counter()
    x = _rows(resid[l], pos)
    a = rmsnorm(x, ctx.key.arrays[f"layers.{l}.attn_norm"], cfg.rms_norm_eps)
    ctx.timer.add("rest", t0)
    qkv = _linear(ctx, f"layers.{l}.qkv", a, np.concatenate([zs["qkv"], zq_rows]), "freivalds_qkv")
    t0 = time.perf_counter()
    q, k, v = _qkv(ctx, qkv, pos, l)
    o = _attend(ctx, l, pos, n, q, k, v, kv, t0)
    h = _linear(ctx, f"layers.{l}.o", o, zs["o"], "freivalds_o", x[:n])  # x + linear(o)
    m = rmsnorm(h, ctx.key.arrays[f"layers.{l}.mlp_norm"], cfg.rms_norm_eps)
    if cfg.moe:
        out = _replay_experts(ctx, l, m, zs, h)
    else:
        gu = _linear(ctx, f"layers.{l}.gate_up", m, zs["gate_up"], "freivalds_gate_up")
        f = cfg.intermediate_size
        act = swiglu(gu[:, :f], gu[:, f:])
        out = _linear(ctx, f"layers.{l}.down", act, zs["down"], "freivalds_down", h)  # h + ...
    if not np.array_equal(out, _rows(resid[l + 1], pos[:n])):
        raise Reject("residual_chain",
                     f"layer {l}: replayed output differs from committed x_{l + 1}")


def _replay_experts(ctx: Ctx, l: int, m: np.ndarray, zs: dict, h: np.ndarray) -> np.ndarray:
    """A Mixtral MLP at the challenged positions (numerics/moe.py): the router's accumulator by
    Freivalds, the selection and weights derived here from its logits (never read from the
    opening), each selected expert's gate_up and down accumulators by that expert's own secret
    rows; returns h + the combination."""
    cfg = ctx.cfg
    f, k = cfg.intermediate_size, cfg.experts_per_token
    qm, sm = quantize_rows(m, ctx.profile.act_qmax)  # once: the router and every expert read it
    r = _linear_q(ctx, f"layers.{l}.router", qm, sm, zs["router"], "freivalds_router")
    try:
        sel, g = moe.route(r, k)  # (its time: "rest", by the layer's span)
    except FloatingPointError as e:
        raise Reject("nonfinite", f"layer {l}: router logits ({e})") from None
    outs = np.zeros((m.shape[0], k, cfg.hidden_size), np.float32)
    for e in np.unique(sel):
        rows, slot = np.nonzero(sel == e)
        p = f"layers.{l}.experts.{int(e)}."
        gu = _linear_q(ctx, p + "gate_up", qm[rows], sm[rows], zs["gate_up"][rows, slot],
                       "freivalds_gate_up")  # (fancy indexing: contiguous copies)
        act = swiglu(gu[:, :f], gu[:, f:])
        outs[rows, slot] = _linear(ctx, p + "down", act, zs["down"][rows, slot],
                                   "freivalds_down")
    return (h + moe.combine(outs, g)).astype(np.float32)


def _qkv(ctx: Ctx, qkv: np.ndarray, pos: np.ndarray, l: int):
    cfg, kvq = ctx.cfg, ctx.profile.kv_qmax
    cos, sin = ctx.rope.lookup(pos)
    norms = ((ctx.key.arrays[f"layers.{l}.q_norm"], ctx.key.arrays[f"layers.{l}.k_norm"])
             if cfg.qk_norm else (None, None))
    q, k, v = split_qkv(cfg, qkv, *norms, cos, sin, apply_rope)
    return quantize_rows(q, kvq), quantize_rows(k, kvq), quantize_rows(v, kvq)


def replay_decode(ctx: Ctx, final: dict, positions, z_lm: np.ndarray, tokens: list[int],
                  params: SamplingParams, first: int | None = None, logprobs: dict | None = None,
                  top: int | None = None) -> None:
    """Final norm, LM head (Freivalds), decode policy at each position from `first` (the one that
    chose the first output token): must yield tokens[t+1]. With top (the receipt's logprobs),
    every position's committed logprobs entry must be the canonical one; positions before
    `first` (prompt logprobs, echo) are checked for that alone."""
    with ctx.timer.span("decode"):
        _replay_decode(ctx, final, positions, z_lm, tokens, params,
                       0 if first is None else first, logprobs, top)


def _replay_decode(ctx: Ctx, final: dict, positions, z_lm, tokens, params, first, logprobs,
                   top) -> None:
    x = _rows(final, positions)
    t0 = time.perf_counter()
    n = rmsnorm(x, ctx.key.arrays["final_norm"], ctx.cfg.rms_norm_eps)
    ctx.timer.add("rest", t0)
    logits = _linear_packed(ctx, "lm_head", n, z_lm, "freivalds_lm_head")
    t0 = time.perf_counter()
    for row, t in zip(logits, positions):
        t = int(t)
        if top is not None:
            part, i = ("output", t - first) if t >= first else ("prompt", t)
            if logprobs[part] is None:
                raise Reject("logprobs", f"position {t}: no committed {part} logprobs")
            want = lp_entry(row, tokens[t + 1], top)
            if logprobs[part][i] != want:
                raise Reject("logprobs", f"position {t + 1}: the committed {part} logprobs are "
                                         f"not the canonical ones of the replayed logits")
        if t < first:
            continue
        got = sample(row, params, t + 1)
        if got != tokens[t + 1]:
            raise Reject("decode", f"position {t + 1}: policy gives {got}, "
                                   f"receipt has {tokens[t + 1]}")
    ctx.timer.add("rest", t0)
