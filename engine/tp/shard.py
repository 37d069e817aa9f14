"""The sharding plan: which slice of each quantized tensor a rank holds (docs/TP.md)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...verifier.config import ModelConfig
from ...verifier.numerics.weights import QLinear


class ShapeError(ValueError):
    """The model's shapes do not split over the requested number of ranks."""


@dataclass(frozen=True)
class Plan:
    """Rank `rank` of `size`: its heads, K/V heads, intermediate columns and vocabulary rows."""

    rank: int
    size: int
    heads: int  # local attention heads (contiguous block)
    kv_heads: int  # local K/V heads, the ones its heads read
    q_size: int
    kv_size: int
    ffn: int  # local intermediate width
    vocab_chunk: int  # ceil(V / size): every rank's LM-head block, the last one padded
    vocab: tuple[int, int]  # [lo, hi) of real vocabulary rows held


def make_plan(cfg: ModelConfig, rank: int, size: int) -> Plan:
    """The plan for one rank; ShapeError (one line) when a dimension does not divide."""
    if size < 1:
        raise ShapeError(f"--tp must be >= 1, got {size}")
    for what, n in (("attention heads", cfg.num_heads), ("K/V heads", cfg.num_kv_heads),
                    ("intermediate size", cfg.intermediate_size)):
        if n % size:
            raise ShapeError(f"--tp {size}: the model's {n} {what} do not divide into {size} "
                             f"equal shards (choose a degree dividing {cfg.num_heads} heads, "
                             f"{cfg.num_kv_heads} K/V heads and {cfg.intermediate_size})")
    v = cfg.vocab_size
    chunk = -(-v // size)
    if chunk * (size - 1) >= v:
        raise ShapeError(f"--tp {size}: a vocabulary of {v} tokens leaves a rank without LM-head "
                         f"rows (blocks of {chunk})")
    d = cfg.head_dim
    nh, nkv = cfg.num_heads // size, cfg.num_kv_heads // size
    return Plan(rank, size, nh, nkv, nh * d, nkv * d, cfg.intermediate_size // size, chunk,
                (rank * chunk, min((rank + 1) * chunk, v)))


def rows(lin: QLinear, spans: list[tuple[int, int]]) -> QLinear:
    """Output rows [a, b) of each span, in order (a fused matrix keeps its parts apart)."""
    pick = lambda a: None if a is None else np.concatenate([a[lo:hi] for lo, hi in spans])
    return QLinear(pick(lin.q), pick(lin.s), pick(lin.bias))


def cols(lin: QLinear, lo: int, hi: int) -> QLinear:
    """Input columns [lo, hi): every output row, its full scale and bias."""
    return QLinear(np.ascontiguousarray(lin.q[:, lo:hi]), lin.s, lin.bias)


def layer_spans(cfg: ModelConfig, p: Plan) -> dict[str, list[tuple[int, int]]]:
    """Row spans of the fused qkv ([q; k; v]) and gate_up ([gate; up]) matrices for rank p."""
    r, q, kv, f = p.rank, p.q_size, p.kv_size, p.ffn
    qs, kvs = cfg.q_size, cfg.kv_size
    return {"qkv": [(r * q, (r + 1) * q), (qs + r * kv, qs + (r + 1) * kv),
                    (qs + kvs + r * kv, qs + kvs + (r + 1) * kv)],
            "gate_up": [(r * f, (r + 1) * f),
                        (cfg.intermediate_size + r * f, cfg.intermediate_size + (r + 1) * f)]}
