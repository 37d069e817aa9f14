"""Openings: what a challenge obliges the provider to reveal, and the binary format carrying it.

Container (verifier/container.py) with magic CLLMOPN, version 1. Arrays, per layer l:
  resid.{l}.pos / .rows fp32 [n, H] / .proof u8 [m, 32]     residual x_l rows + multiproof
  kv.{l}.pos / .k / .sk / .v / .sv / .proof                 K/V rows 0..horizon-1 + multiproof
  z.{l}.pos / .qkv / .o / .gate_up / .down  int64          accumulators at challenged positions
  zq.{l}.pos / .qkv  int64                                  accumulators of the K/V sample
  resid.layer_roots u8 [L+1, 32], kv.layer_roots u8 [L, 32]
  z.lm.pos / z.lm int64 [n, V]                              LM-head accumulators, decode checks
  embed.ids / .q / .s / .proof                              embedding rows of the challenged
                                                            tokens (by token id, deduplicated)
meta: receipt_id, challenge mac, and for sampled receipts the seed and its salt.
"""

from __future__ import annotations

from dataclasses import dataclass

OPENING_MAGIC = b"CLLMOPN\x00"
OPENING_VERSION = 1
MATRICES = ("qkv", "o", "gate_up", "down")


@dataclass(frozen=True)
class Plan:
    """Positions to open, by kind; every list sorted and duplicate-free."""

    resid: dict[int, list[int]]  # residual layer (0..L) -> positions
    kv: dict[int, list[int]]  # layer -> K/V positions (0..horizon-1)
    z: dict[int, list[int]]  # layer -> positions replayed in full
    zq: dict[int, list[int]]  # layer -> positions whose K/V derivation is re-checked
    lm: list[int]  # positions whose logits are checked against the next token
    embed: list[int]  # positions whose embedding row is checked


def plan(challenge: dict, n_layers: int) -> Plan:
    pos = sorted(set(challenge["positions"]))
    layers = sorted(set(challenge["layers"]))
    horizon = max(pos) + 1
    resid: dict[int, set] = {0: set(pos), n_layers: set(challenge["decode_positions"])}
    zq = {}
    for l in layers:
        sample = sorted(set(challenge["kv_sample"].get(str(l), [])) - set(pos))
        zq[l] = sample
        resid.setdefault(l, set()).update(pos, sample)
        resid.setdefault(l + 1, set()).update(pos)
    return Plan(resid={l: sorted(v) for l, v in sorted(resid.items()) if v},
                kv={l: list(range(horizon)) for l in layers},
                z={l: pos for l in layers}, zq={l: s for l, s in zq.items() if s},
                lm=sorted(set(challenge["decode_positions"])),
                embed=sorted(set(pos) | set(zq.get(0, []))))  # every opened x_0 row
