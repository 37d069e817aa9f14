"""Challenges: which positions, layers and K/V rows the provider must open.

Derived from the verifier's secret, the receipt id and a fresh nonce, after the receipt exists;
authenticated with a MAC under the same secret so a tampered challenge is refused.
"""

from __future__ import annotations

import hmac
import os
import re

import blake3
import numpy as np

from .commitment import canonical_json

CHALLENGE_VERSION = "commitllm-challenge/1"
TIERS = ("routine", "full", "deep")
ROUTINE_POSITIONS, ROUTINE_LAYERS, ROUTINE_KV_SAMPLE = 4, 10, 8
FULL_POSITIONS, FULL_KV_SAMPLE = 8, 16
_DOMAIN = b"commitllm/challenge/v1\x00"


def _mac(secret: bytes, body: dict) -> str:
    return blake3.blake3(_DOMAIN + b"mac" + canonical_json(body), key=secret).hexdigest()


MAX_LAYERS = 4096  # no released decoder has a tenth of this


def logit_start(receipt: dict) -> int:
    """The first position whose logits the verifier checks: the one that chose the first output
    token, or 0 when the receipt commits prompt logprobs (echo with logprobs): then a challenged
    prompt position's logits are checked against its committed logprobs too."""
    out = receipt["manifest"].get("output")
    if isinstance(out, dict) and out.get("echo") is True and out.get("logprobs") is not None:
        return 0
    return len(receipt["prompt_token_ids"]) - 1


def derive(secret: bytes, receipt: dict, tier: str, nonce: bytes | None = None,
           positions: list[int] | str | None = None, n_layers: int | None = None) -> dict:
    """The challenge for `receipt` at `tier`. positions: None (tier default), 'generated'
    (every position whose logits chose an output token) or an explicit list. n_layers: the
    key's layer count; a receipt claiming another is refused before anything is sized from it."""
    if tier not in TIERS:
        raise ValueError(f"unknown tier {tier!r}; choose one of {', '.join(TIERS)}")
    claimed = receipt["trace"]["layers"]
    if n_layers is not None and claimed != n_layers:
        raise ValueError(f"receipt claims {claimed} layers, the key's model has {n_layers}")
    if not _int(claimed) or not 1 <= claimed <= MAX_LAYERS:
        raise ValueError(f"receipt claims {claimed!r} layers (an integer, at most {MAX_LAYERS})")
    nonce = os.urandom(16) if nonce is None else nonce
    seed = blake3.blake3(_DOMAIN + bytes.fromhex(receipt["receipt_id"]) + nonce, key=secret)
    rng = np.random.Generator(np.random.PCG64(int.from_bytes(seed.digest()[:16], "little")))
    n, n_layers = receipt["trace"]["positions"], receipt["trace"]["layers"]
    first_decode = len(receipt["prompt_token_ids"]) - 1
    pos = _positions(rng, tier, n, first_decode, positions)
    layers = list(range(n_layers))
    if tier == "routine":  # the last layer always: it anchors every decode check's residual
        others = rng.choice(n_layers - 1, min(ROUTINE_LAYERS, n_layers) - 1, replace=False)
        layers = sorted(others.tolist() + [n_layers - 1])
    k = {"routine": ROUTINE_KV_SAMPLE, "full": FULL_KV_SAMPLE, "deep": 0}[tier]
    horizon = max(pos) + 1
    kv = {str(l): sorted(rng.choice(horizon, min(k, horizon), replace=False).tolist()) for l in layers}
    body = {"version": CHALLENGE_VERSION, "receipt_id": receipt["receipt_id"], "tier": tier,
            "nonce": nonce.hex(), "positions": pos, "layers": layers, "kv_sample": kv,
            "decode_positions": [p for p in pos if p >= logit_start(receipt)]}
    return body | {"mac": _mac(secret, body)}


def _positions(rng, tier: str, n: int, first_decode: int, positions) -> list[int]:
    if isinstance(positions, list):
        if not positions or not all(isinstance(p, int) and 0 <= p < n for p in positions):
            raise ValueError(f"positions must lie in [0, {n})")
        return sorted(set(positions))
    if positions == "generated":
        return list(range(first_decode, n))
    if tier == "deep":
        return list(range(n))
    k = min(ROUTINE_POSITIONS if tier == "routine" else FULL_POSITIONS, n)
    decode = int(rng.integers(first_decode, n))  # at least one decode check
    rest = rng.choice(n, k, replace=False).tolist()
    return sorted(set([decode] + rest[: max(k - 1, 0)]))


_KEYS = {"version", "receipt_id", "tier", "nonce", "positions", "layers", "kv_sample",
         "decode_positions", "mac"}


def _int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _ascending(xs, lo: int, hi: int) -> bool:
    """A list of ints, strictly increasing (sorted, unique), within [lo, hi)."""
    return (isinstance(xs, list) and all(_int(x) for x in xs)
            and all(a < b for a, b in zip(xs, xs[1:]))
            and (not xs or (xs[0] >= lo and xs[-1] < hi)))


def shape_error(challenge, receipt: dict, n_layers: int) -> str | None:
    """None when the challenge is well formed for this receipt and a model of n_layers layers:
    exactly the known fields with their JSON types, positions and layers sorted, unique and in
    range, the K/V sample of every challenged layer (and no other) below the horizon, and the
    decode positions exactly the challenged ones that choose an output token. Checked before
    anything is sized from it."""
    if not isinstance(challenge, dict):
        return "challenge is not a JSON object"
    if set(challenge) != _KEYS:
        extra, missing = sorted(set(challenge) - _KEYS), sorted(_KEYS - set(challenge))
        return f"challenge fields differ from the schema (unknown {extra[:4]}, missing {missing})"
    c = challenge
    if not all(isinstance(c[k], str) for k in ("version", "receipt_id", "tier", "nonce", "mac")):
        return "challenge version, receipt_id, tier, nonce and mac must be strings"
    if c["tier"] not in TIERS or not re.fullmatch(r"[0-9a-f]{1,128}", c["nonce"]):
        return "challenge tier or nonce malformed"
    n, first = receipt["trace"]["positions"], logit_start(receipt)
    if not (_ascending(c["positions"], 0, n) and c["positions"]):
        return f"challenge positions must be sorted, unique and in [0, {n})"
    if not (_ascending(c["layers"], 0, n_layers) and c["layers"]):
        return f"challenge layers must be sorted, unique and in [0, {n_layers})"
    horizon = c["positions"][-1] + 1
    kv = c["kv_sample"]
    if not isinstance(kv, dict) or set(kv) != {str(l) for l in c["layers"]} or not all(
            _ascending(s, 0, horizon) for s in kv.values()):
        return ("challenge K/V sample must name each challenged layer, its rows sorted and below "
                "the horizon")
    if c["decode_positions"] != [p for p in c["positions"] if p >= first]:
        return ("challenge decode positions are not the challenged positions whose logits are "
                "checked")
    return None


def check(secret: bytes, challenge, receipt: dict, n_layers: int | None = None) -> str | None:
    """None when the challenge is ours, untampered and for this receipt; else the reason.
    n_layers (the key's model): also check its shape (shape_error)."""
    if not isinstance(challenge, dict) or not isinstance(challenge.get("mac"), str):
        return "challenge is not a JSON object with a mac"
    body = {k: v for k, v in challenge.items() if k != "mac"}
    try:
        want = _mac(secret, body)
    except (TypeError, ValueError, RecursionError) as e:  # not canonical JSON (e.g. a NaN)
        return f"challenge is not canonical JSON ({type(e).__name__})"
    if not hmac.compare_digest(challenge["mac"].encode("utf-8", "replace"), want.encode()):
        return "challenge MAC does not verify under this key (tampered, or another verifier's)"
    if body.get("version") != CHALLENGE_VERSION:
        return f"unsupported challenge version {body.get('version')!r}"
    if not hmac.compare_digest(str(body.get("receipt_id")).encode("utf-8", "replace"),
                               receipt["receipt_id"].encode()):
        return "challenge is for another receipt"
    return None if n_layers is None else shape_error(challenge, receipt, n_layers)
