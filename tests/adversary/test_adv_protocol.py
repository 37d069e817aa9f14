"""Commitments and protocol: the receipt's own hashes (manifest, request, IO chain, receipt id,
token count), the client's nonce, the challenge MAC, the binding of an opening to its receipt and
challenge, and every Merkle proof against the receipt's trace roots and the key's embedding root."""

from __future__ import annotations

import copy

import pytest
from advworld import NONCE, assert_rejected
from commitllm.verifier import challenge as ch
from commitllm.verifier.receipt import build_receipt


def _set(r: dict, path: str, value) -> dict:
    r = copy.deepcopy(r)
    *head, last = path.split(".")
    node = r
    for k in head:
        node = node[k]
    node[last] = value(node[last]) if callable(value) else value
    return r


def _reseal(r: dict) -> dict:
    return build_receipt(r["manifest"], r["request"], r["nonce"], r["prompt_token_ids"],
                         r["output_token_ids"], r["text"], r["trace"])


# (name, receipt path, new value, code): edited in place, nothing recomputed
RAW = [
    ("residual-root", "trace.residual_root", "00" * 32, "receipt_hash"),
    ("kv-root", "trace.kv_root", "00" * 32, "receipt_hash"),
    ("io-chain", "io_chain", "11" * 32, "io_chain"),
    ("token-count", "trace.positions", lambda n: n + 1, "receipt_hash"),
    ("prompt-id", "prompt_token_ids", lambda ids: [ids[0] ^ 1] + ids[1:], "io_chain"),
    ("output-truncated", "output_token_ids", lambda ids: ids[:-1], "io_chain"),
    ("request-hash", "request_hash", "22" * 32, "receipt_hash"),  # the hash over the prompt
    ("manifest-hash", "manifest_hash", "23" * 32, "receipt_hash"),
    ("manifest-field", "manifest.sampling.temperature", 0.5, "receipt_hash"),
    ("nonce", "nonce", "client-nonce-0002", "io_chain"),
    ("receipt-id", "receipt_id", "33" * 32, "receipt_hash"),
    ("version", "version", "commitllm-receipt/0", "receipt_malformed"),
    ("negative-id", "output_token_ids", lambda ids: [-1] + ids[1:], "receipt_malformed"),
]


@pytest.mark.parametrize("path, value, code", [r[1:] for r in RAW], ids=[r[0] for r in RAW])
def test_receipt_field_altered(world, path, value, code):
    c = world.challenge(world.served, "routine")
    meta, arrays = world.open(world.served, c)
    forged = _set(world.served.receipt, path, value)
    assert_rejected(world.verify(forged, c, meta, arrays), code)


# (name, path, value, code): edited and every hash recomputed (a provider sealing a lie); the
# verifier challenges the forged receipt, the provider relabels its honest opening for it
RESEALED = [
    ("kv-root", "trace.kv_root", "00" * 32, "trace_root"),
    ("residual-root", "trace.residual_root", "44" * 32, "trace_root"),
    ("token-count", "trace.positions", lambda n: n + 1, "token_count"),
    ("nonce", "nonce", "client-nonce-0002", "nonce_mismatch"),
]


@pytest.mark.parametrize("path, value, code", [r[1:] for r in RESEALED],
                         ids=[r[0] for r in RESEALED])
def test_receipt_field_altered_and_resealed(world, path, value, code):
    forged = _reseal(_set(world.served.receipt, path, value))
    c = world.challenge(forged, "routine")
    fits = forged["trace"]["positions"] == world.n_positions  # the honest run can answer c
    meta, arrays = world.open(world.served, c if fits else world.challenge(world.served, "routine"))
    meta = dict(meta, receipt_id=forged["receipt_id"], challenge_mac=c["mac"])
    assert_rejected(world.verify(forged, c, meta, arrays), code)


def test_receipt_replayed_to_another_client(world):
    """A valid receipt (and opening) for client 1, returned to client 2: freshness fails."""
    c = world.challenge(world.served, "routine")
    v = world.verify(world.served, c, *world.open(world.served, c),
                     expected_nonce="client-nonce-0002")
    assert_rejected(v, "nonce_mismatch")


def test_request_served_under_another_nonce(world):
    s = world.serve(nonce="an-older-nonce")
    assert_rejected(world.audit(s, tier="routine", expected_nonce=NONCE), "nonce_mismatch")


# --- challenges and openings ------------------------------------------------------------------


def test_opening_for_another_challenge(world):
    c, other = world.challenge(world.served, "routine"), world.challenge(world.served, "full")
    assert_rejected(world.verify(world.served, other, *world.open(world.served, c)),
                    "opening_mismatch")


def test_opening_of_another_request(world):
    """Receipt of request 1, opening of request 2 (answering request 2's challenge)."""
    s2 = world.serve(prompt=world.other_prompt())
    c1, c2 = world.challenge(world.served, "routine"), world.challenge(s2, "routine")
    meta, arrays = world.open(s2, c2)
    assert_rejected(world.verify(world.served, c1, meta, arrays), "opening_mismatch")


def _challenge_variants(world):
    c = world.challenge(world.served, "routine")
    s2 = world.serve(prompt=world.other_prompt())
    return {
        "positions-edited": dict(c, positions=[0]),
        "layers-edited": dict(c, layers=[0]),
        "another-verifier": ch.derive(bytes(32), world.served.receipt, "routine", b"x" * 16),
        "another-receipt": world.challenge(s2, "routine"),
        "version": dict(c, version="commitllm-challenge/0"),
        "not-a-dict": [c],
    }


@pytest.mark.parametrize("kind", ["positions-edited", "layers-edited", "another-verifier",
                                  "another-receipt", "version", "not-a-dict"])
def test_challenge_not_ours(world, kind):
    c = world.challenge(world.served, "routine")
    meta, arrays = world.open(world.served, c)
    bad = _challenge_variants(world)[kind]
    assert_rejected(world.verify(world.served, bad, meta, arrays), "challenge_invalid")


# --- Merkle proofs ----------------------------------------------------------------------------


def _single(world, pos):
    c = world.challenge(world.served, "full", positions=[pos])
    return c, *world.open(world.served, c)


def test_residual_row_and_proof_of_another_position(world):
    """Position 12's committed final residual with its valid proof, presented for position 13
    (the final layer's rows are the decode positions only: one row each)."""
    c, meta, arrays = _single(world, 13)
    _, _, other = _single(world, 12)
    for part in ("rows", "proof"):
        arrays[f"resid.2.{part}"] = other[f"resid.2.{part}"]
    assert_rejected(world.verify(world.served, c, meta, arrays), "merkle_residual")


def test_residual_rows_of_two_positions_swapped(world):
    c = world.challenge(world.served, "deep")
    meta, arrays = world.open(world.served, c)
    rows = arrays["resid.1.rows"]
    rows[[3, 4]] = rows[[4, 3]]
    assert_rejected(world.verify(world.served, c, meta, arrays), "merkle_residual")


def test_kv_proof_of_another_challenge(world):
    """The K/V multiproof of a longer horizon (another challenge's) with this horizon's rows."""
    c, meta, arrays = _single(world, 13)
    _, _, other = _single(world, 20)
    arrays["kv.0.proof"] = other["kv.0.proof"]
    assert_rejected(world.verify(world.served, c, meta, arrays), "merkle_kv")


def test_kv_row_moved_to_another_position(world):
    c, meta, arrays = _single(world, 13)
    for x in ("k", "sk", "v", "sv"):
        arrays[f"kv.1.{x}"][5] = arrays[f"kv.1.{x}"][6]
    assert_rejected(world.verify(world.served, c, meta, arrays), "merkle_kv")


def test_embedding_row_of_another_token(world):
    c, meta, arrays = _single(world, 13)
    arrays["embed.q"][0] = world.qm.embed.q[(int(arrays["embed.ids"][0]) + 1) % 128]
    assert_rejected(world.verify(world.served, c, meta, arrays), "merkle_embedding")


@pytest.mark.parametrize("name", ["resid.layer_roots", "kv.layer_roots"])
def test_layer_roots_altered(world, name):
    c, meta, arrays = _single(world, 13)
    arrays[name][1, 0] ^= 1
    assert_rejected(world.verify(world.served, c, meta, arrays), "trace_root")
