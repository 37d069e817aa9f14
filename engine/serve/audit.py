"""The server's side of an audit: a challenge checked against the stored receipt before anything
is re-executed, and the size of its answer bounded before it is computed.

The server cannot check a challenge's MAC (the secret is the verifier's), so it checks its shape:
every list sorted, duplicate-free and in range for this receipt (positions below the receipt's
trace length, layers below the model's, K/V samples below the challenged horizon, decode
positions among the positions and past the prompt, unless the receipt commits prompt logprobs). The work of an opening is then at most one
re-execution of the receipt (bounded by the context), and its answer's size is computed from the
plan and refused over the limit (413) before the re-execution starts."""

from __future__ import annotations

import re

from ...verifier.challenge import CHALLENGE_VERSION, TIERS, logit_start
from ...verifier.opening import acc_width, plan

KEYS = {"version", "receipt_id", "tier", "nonce", "positions", "layers", "kv_sample",
        "decode_positions", "mac"}
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_HEX = re.compile(r"^[0-9a-f]{0,128}$")


class BadChallenge(ValueError):
    """A challenge whose shape does not fit its receipt (400)."""


def check_challenge(c, receipt: dict, n_layers: int) -> None:
    """Raise BadChallenge unless `c` has a challenge's shape, within range for `receipt`."""
    if not isinstance(c, dict) or set(c) != KEYS:
        raise BadChallenge(f"a challenge is a JSON object with exactly the keys {sorted(KEYS)}")
    if c["version"] != CHALLENGE_VERSION or c["tier"] not in TIERS:
        raise BadChallenge(f"unsupported challenge version or tier (want {CHALLENGE_VERSION})")
    for k in ("receipt_id", "mac"):
        if not isinstance(c[k], str) or not _HEX64.match(c[k]):
            raise BadChallenge(f"{k} is not a 32-byte hex digest")
    if not isinstance(c["nonce"], str) or not _HEX.match(c["nonce"]):
        raise BadChallenge("nonce is not a hex string of at most 64 bytes")
    n, first_decode = receipt["trace"]["positions"], logit_start(receipt)
    if receipt["trace"]["layers"] != n_layers:
        raise BadChallenge("the receipt's layer count is not the model's")
    pos = _ascending(c["positions"], "positions", 0, n)
    if not pos:
        raise BadChallenge("positions is empty")
    _ascending(c["layers"], "layers", 0, n_layers)
    dec = _ascending(c["decode_positions"], "decode_positions", first_decode, n)
    if not set(dec) <= set(pos):
        raise BadChallenge("decode_positions are not among the positions")
    kv = c["kv_sample"]
    if not isinstance(kv, dict) or not set(kv) <= {str(l) for l in c["layers"]}:
        raise BadChallenge("kv_sample is not an object keyed by the challenged layers")
    for l, sample in kv.items():
        _ascending(sample, f"kv_sample[{l}]", 0, pos[-1] + 1)


def _ascending(xs, name: str, lo: int, hi: int) -> list[int]:
    if not isinstance(xs, list) or len(xs) > max(hi - lo, 0):
        raise BadChallenge(f"{name} is not a list of at most {max(hi - lo, 0)} entries")
    prev = lo - 1
    for x in xs:
        if isinstance(x, bool) or not isinstance(x, int) or not prev < x < hi:
            raise BadChallenge(f"{name} must be strictly increasing integers in [{lo}, {hi})")
        prev = x
    return xs


def opening_bytes(c: dict, cfg, profile=None, kv_itemsize: int = 2) -> int:
    """Bytes of the opening's arrays for a checked challenge (proofs and embedding rows
    bounded from above), computed from the plan before anything is re-executed. With the
    profile, each accumulator at the width its bound needs (opening version 2, what the opening
    holds); without it, 8 bytes each (a looser upper bound)."""
    p = plan(c, cfg.num_layers, window=cfg.sliding_window)
    h, kvh, hd = cfg.hidden_size, cfg.num_kv_heads, cfg.head_dim

    def w(m: str) -> int:
        return 8 if profile is None else acc_width(cfg, profile, m)

    qkv = (cfg.num_heads + 2 * kvh) * hd * w("qkv")
    mlp = 2 * cfg.intermediate_size * w("gate_up") + h * w("down")  # Mixtral: router + k experts'
    if cfg.moe:
        mlp = cfg.num_experts * w("router") + cfg.experts_per_token * mlp
    z_row = qkv + h * w("o") + mlp
    proof = 32 * 64  # a multiproof holds at most ~log2(n) hashes per opened row; 64 is above it
    total = sum(len(v) * (4 * h + 8 + proof) for v in p.resid.values())
    total += sum(len(v) * (2 * kvh * hd * kv_itemsize + 8 * kvh + 8 + proof) for v in p.kv.values())
    total += sum(len(v) * (z_row + 8) for v in p.z.values())
    total += sum(len(v) * (qkv + 8) for v in p.zq.values())
    total += len(p.lm) * (cfg.vocab_size * w("lm_head") + 8)
    total += len(p.embed) * (h * 4 + 4 + 8 + proof)
    return total + 64 * 1024  # metadata and container headers
