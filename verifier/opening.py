"""Openings: what a challenge obliges the provider to reveal, and the binary format carrying it.

Container (verifier/container.py) with magic CLLMOPN, version 2. Arrays, per layer l:
  resid.{l}.pos / .rows fp32 [n, H] / .proof u8 [m, 32]     residual x_l rows + multiproof
  kv.{l}.pos / .k / .sk / .v / .sv / .proof                 K/V rows 0..horizon-1 (under a
                                                            sliding window: from the earliest
                                                            challenged position's first visible
                                                            key, plus the K/V sample) + multiproof
  z.{l}.pos / .qkv / .o / .gate_up / .down  packed         accumulators at challenged positions
                                                            (Mixtral: + .router [n, E]; .gate_up
                                                            / .down [n, k, .] of the selected
                                                            experts in ascending order)
  zq.{l}.pos / .qkv  packed                                 accumulators of the K/V sample
  resid.layer_roots u8 [L+1, 32], kv.layer_roots u8 [L, 32]
  z.lm.pos / z.lm packed [n, V]                             LM-head accumulators, decode checks
  embed.ids / .q / .s / .proof                              embedding rows of the challenged
                                                            tokens (by token id, deduplicated)
meta: receipt_id, challenge mac, and for sampled receipts the seed and its salt.

Packed accumulators (version 2): an accumulator array of shape S is stored as uint8 S + (w,),
each value as w bytes of little-endian two's complement, where w is the fewest bytes that hold
every integer in [-B, B] for the matrix's proven bound B = K * act_qmax * matrix_qmax (K its input
width; `acc_width`), from the key's config and profile, never from the opening: 5 bytes for the
8B decoder linears at w8a16, 4 at a8, 6 for a 16-bit LM head. The verifier checks the packed
type and shape (check_types), then decodes each layer's as it replays it (`unpack_acc`);
Freivalds still checks each |z| <= B. Version 1 (int64 accumulators) is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .numerics.attention import first_visible

OPENING_MAGIC = b"CLLMOPN\x00"
OPENING_VERSION = 2
ACC_DTYPE = "|u1"  # packed accumulators: uint8 [..., acc_width]
# said with a ContainerVersionError on an opening of another version
OPENING_UPGRADE = ("openings before version 2 carried int64 accumulators: open the receipt again "
                   "with this release (commitllm-engine open)")
MATRICES = ("qkv", "o", "gate_up", "down")
MOE_MATRICES = ("qkv", "o", "router", "gate_up", "down")  # gate_up, down: [n, k, .] per expert


def matrices(cfg) -> tuple[str, ...]:
    """The accumulators an opening carries per challenged (layer, position): for a Mixtral
    layer the router's and the k selected experts' gate_up and down, in ascending expert order."""
    return MOE_MATRICES if cfg.moe else MATRICES


def in_features(cfg, matrix: str) -> int:
    """The input width K of a matrix (qkv, o, router, gate_up, down, lm_head): the length of
    its quantized input rows, hence of its Freivalds secret row."""
    if matrix == "o":
        return cfg.num_heads * cfg.head_dim
    if matrix == "down":
        return cfg.intermediate_size
    if matrix in ("qkv", "router", "gate_up", "lm_head"):
        return cfg.hidden_size
    raise ValueError(f"no accumulators for matrix {matrix!r}")


def acc_bound(cfg, profile, matrix: str) -> int:
    """The proven bound B on |z| for a matrix's accumulators: K * act_qmax * matrix_qmax."""
    label = "lm_head" if matrix == "lm_head" else f"layers.0.{matrix}"
    return in_features(cfg, matrix) * profile.act_qmax * profile.matrix_qmax(label)


def acc_width(cfg, profile, matrix: str) -> int:
    """Bytes of two's complement that hold every integer in [-B, B] (B = acc_bound)."""
    return min(8, (acc_bound(cfg, profile, matrix).bit_length() + 8) // 8)


def _acc_matrix(name: str) -> str | None:
    """The matrix of an accumulator array's name (z.<l>.<m>, zq.<l>.qkv, z.lm), else None."""
    if name == "z.lm":
        return "lm_head"
    parts = name.split(".")
    if len(parts) == 3 and parts[0] in ("z", "zq") and parts[2] != "pos":
        return parts[2]
    return None


def pack_acc(z: np.ndarray, w: int) -> np.ndarray:
    """int64 accumulators [...] as uint8 [..., w] (little-endian two's complement); OverflowError
    for a value w bytes do not hold (an honest accumulator is within its bound)."""
    z = np.asarray(z)
    if z.dtype.kind != "i":
        raise TypeError(f"accumulators must be integers, got {z.dtype}")
    lim = 1 << (8 * w - 1)
    if z.size and (int(z.min()) < -lim or int(z.max()) >= lim):
        raise OverflowError(f"an accumulator needs more than {w} bytes")
    return np.ascontiguousarray(z.astype("<i8")[..., None].view(np.uint8)[..., :w])


def unpack_acc(b: np.ndarray) -> np.ndarray:
    """pack_acc's inverse: uint8 [..., w] -> int64 [...], sign-extended (the compiled core's
    acc_unpack when it is there, the same integers)."""
    from . import native

    if native.lib() is not None:
        got = native.acc_unpack(b)
        if got is not None:
            return got
    w = b.shape[-1]
    out = np.zeros(b.shape[:-1] + (8,), np.uint8)
    out[..., :w] = b
    out[..., w:] = np.where(b[..., w - 1:w] >= 128, np.uint8(255), np.uint8(0))
    return out.view("<i8")[..., 0].astype(np.int64)


def pack_accumulators(arrays: dict, cfg, profile) -> dict:
    """The opening's arrays with every accumulator array packed to its matrix's width."""
    out = {}
    for name, a in arrays.items():
        m = _acc_matrix(name)
        out[name] = a if m is None else pack_acc(a, acc_width(cfg, profile, m))
    return out


@dataclass(frozen=True)
class Plan:
    """Positions to open, by kind; every list sorted and duplicate-free."""

    resid: dict[int, list[int]]  # residual layer (0..L) -> positions
    kv: dict[int, list[int]]  # layer -> K/V positions (0..horizon-1, or the window's and sample)
    z: dict[int, list[int]]  # layer -> positions replayed in full
    zq: dict[int, list[int]]  # layer -> positions whose K/V derivation is re-checked
    lm: list[int]  # positions whose logits are checked against the next token
    embed: list[int]  # positions whose embedding row is checked


class PlanError(ValueError):
    """A challenge that does not fit its receipt or the model (checked before allocating)."""


def plan(challenge: dict, n_layers: int, receipt: dict | None = None,
         window: int | None = None) -> Plan:
    """What `challenge` opens. receipt: when given, the challenge's shape is checked against it
    and the model's n_layers first (challenge.shape_error), so nothing is sized from an
    unchecked challenge; PlanError says why it does not fit. window: the model's sliding
    attention window (ModelConfig.sliding_window): the K/V rows no challenged position sees are
    not opened, except those of the K/V sample."""
    if receipt is not None:
        from .challenge import shape_error

        reason = shape_error(challenge, receipt, n_layers)
        if reason:
            raise PlanError(reason)
    pos = sorted(set(challenge["positions"]))
    layers = sorted(set(challenge["layers"]))
    horizon = max(pos) + 1
    first = int(first_visible(pos[0], window))  # the earliest key a challenged position sees
    resid: dict[int, set] = {0: set(pos), n_layers: set(challenge["decode_positions"])}
    zq = {}
    for l in layers:
        sample = sorted(set(challenge["kv_sample"].get(str(l), [])) - set(pos))
        zq[l] = sample
        resid.setdefault(l, set()).update(pos, sample)
        resid.setdefault(l + 1, set()).update(pos)
    # every key first .. horizon - 1, with the sample's positions outside them (sorted, distinct)
    # before or after: the sorted union, without a set of the whole range per layer
    kv = {l: [t for t in zq[l] if t < first] + list(range(first, horizon))
          + [t for t in zq[l] if t >= horizon] for l in layers}
    return Plan(resid={l: sorted(v) for l, v in sorted(resid.items()) if v},
                kv=kv,
                z={l: pos for l in layers}, zq={l: s for l, s in zq.items() if s},
                lm=sorted(set(challenge["decode_positions"])),
                embed=sorted(set(pos) | set(zq.get(0, []))))  # every opened x_0 row


@dataclass(frozen=True)
class Spec:
    """What one opened array must be: dtype (explicit byte order), shape (None: a proof's length,
    at most `max_rows`), and its values: exactly `values`, within [lo, hi], finite, or finite
    positive normal fp32 (K/V scales)."""

    dtype: str
    shape: tuple
    values: tuple | None = None
    lo: int | None = None
    hi: int | None = None
    finite: bool = False
    normal: bool = False
    max_value: float | None = None  # with normal: the largest scale a quantization can give
    max_rows: int = 0
    acc: int = 0  # a packed accumulator array: its width in bytes (the last axis)


def _proof_rows(leaves: int, n: int) -> int:
    """A multiproof of `leaves` leaves in an n-leaf tree has at most leaves * depth hashes."""
    return max(leaves, 1) * max(n - 1, 1).bit_length()


def array_specs(cfg, profile, rows: dict, p: Plan, n_positions: int) -> dict[str, Spec]:
    """Every array an opening answering plan `p` must hold, and nothing else, with its type,
    shape and range from the key (config, profile, matrix rows), never from the opening.
    n_positions: the receipt's committed positions (the trace trees' leaf count)."""
    from .numerics.quant import int_dtype

    L, H = cfg.num_layers, cfg.hidden_size
    kvq = profile.kv_qmax
    kv_t = np.dtype(int_dtype(kvq)).newbyteorder("<").str
    i64, f32, u8 = "<i8", "<f4", "|u1"
    positions = lambda pos: Spec(i64, (len(pos),), values=tuple(pos))  # noqa: E731
    proof = lambda k, n: Spec(u8, (None, 32), max_rows=_proof_rows(k, n))  # noqa: E731
    out = {"resid.layer_roots": Spec(u8, (L + 1, 32)), "kv.layer_roots": Spec(u8, (L, 32))}
    for l, pos in p.resid.items():
        out[f"resid.{l}.pos"] = positions(pos)
        out[f"resid.{l}.rows"] = Spec(f32, (len(pos), H), finite=True)
        out[f"resid.{l}.proof"] = proof(len(pos), n_positions)
    kv_shape = (cfg.num_kv_heads, cfg.head_dim)
    for l, pos in p.kv.items():
        n = len(pos)
        out[f"kv.{l}.pos"] = positions(pos)
        for x in ("k", "v"):
            out[f"kv.{l}.{x}"] = Spec(kv_t, (n, *kv_shape), lo=-kvq, hi=kvq)
        top = float(np.float32(np.finfo(np.float32).max) / np.float32(kvq))  # max|x| / qmax
        for x in ("sk", "sv"):
            out[f"kv.{l}.{x}"] = Spec(f32, (n, kv_shape[0]), normal=True, max_value=top)
        out[f"kv.{l}.proof"] = proof(n, n_positions)
    k = cfg.experts_per_token
    acc = lambda m, *shape: Spec(ACC_DTYPE, (*shape, acc_width(cfg, profile, m)),  # noqa: E731
                                 acc=acc_width(cfg, profile, m))
    for l, pos in p.z.items():
        out[f"z.{l}.pos"] = positions(pos)
        for m in matrices(cfg):
            if cfg.moe and m in ("gate_up", "down"):  # every expert's matrix has the same rows
                out[f"z.{l}.{m}"] = acc(m, len(pos), k, rows[f"layers.{l}.experts.0.{m}"])
            else:
                out[f"z.{l}.{m}"] = acc(m, len(pos), rows[f"layers.{l}.{m}"])
        if p.zq.get(l):
            out[f"zq.{l}.pos"] = positions(p.zq[l])
            out[f"zq.{l}.qkv"] = acc("qkv", len(p.zq[l]), rows[f"layers.{l}.qkv"])
    if p.lm:
        out["z.lm.pos"] = positions(p.lm)
        out["z.lm"] = acc("lm_head", len(p.lm), rows["lm_head"])
    return out


def embed_specs(cfg, profile, ids: list[int]) -> dict[str, Spec]:
    """The embedding rows of the (sorted, unique) token ids the plan opens."""
    hq = profile.head_qmax
    from .numerics.quant import int_dtype

    head_t = np.dtype(int_dtype(hq)).newbyteorder("<").str
    n = len(ids)
    return {"embed.ids": Spec("<i8", (n,), values=tuple(ids)),
            "embed.q": Spec(head_t, (n, cfg.hidden_size), lo=-hq, hi=hq),
            "embed.s": Spec("<f4", (n,), finite=True),
            "embed.proof": Spec("|u1", (None, 32), max_rows=_proof_rows(n, cfg.vocab_size))}
