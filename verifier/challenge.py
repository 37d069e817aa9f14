"""Challenges: which positions, layers and K/V rows the provider must open.

Derived from the verifier's secret, the receipt id and a fresh nonce, after the receipt exists;
authenticated with a MAC under the same secret so a tampered challenge is refused.
"""

from __future__ import annotations

import hmac
import os

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


def derive(secret: bytes, receipt: dict, tier: str, nonce: bytes | None = None,
           positions: list[int] | str | None = None) -> dict:
    """The challenge for `receipt` at `tier`. positions: None (tier default), 'generated'
    (every position whose logits chose an output token) or an explicit list."""
    if tier not in TIERS:
        raise ValueError(f"unknown tier {tier!r}; choose one of {', '.join(TIERS)}")
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
            "decode_positions": [p for p in pos if p >= first_decode]}
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


def check(secret: bytes, challenge, receipt: dict) -> str | None:
    """None when the challenge is ours, untampered and for this receipt; else the reason."""
    if not isinstance(challenge, dict) or not isinstance(challenge.get("mac"), str):
        return "challenge is not a JSON object with a mac"
    body = {k: v for k, v in challenge.items() if k != "mac"}
    if not hmac.compare_digest(challenge["mac"].encode(), _mac(secret, body).encode()):
        return "challenge MAC does not verify under this key (tampered, or another verifier's)"
    if body.get("version") != CHALLENGE_VERSION:
        return f"unsupported challenge version {body.get('version')!r}"
    if not hmac.compare_digest(str(body.get("receipt_id")).encode(), receipt["receipt_id"].encode()):
        return "challenge is for another receipt"
    return None
