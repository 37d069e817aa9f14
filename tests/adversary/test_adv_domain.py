"""Domain checks on the receipt: token ids below the key's vocabulary (the last output token
included), prompt + output within the model's context, the decode policy's parameters in their
domain, JSON types exact (no bool for a number, no float for an integer) and no field the
verifier does not know. Each edit is resealed (every hash recomputed: what a provider would
send); codes token_range, context_length, sampling_invalid, receipt_malformed,
manifest_mismatch. The receipt schema does not depend on the profile: one world."""

from __future__ import annotations

import numpy as np
import pytest
from advworld import NONCE, assert_refused, assert_rejected, edited, resealed
from commitllm.verifier.receipt import ReceiptError, build_receipt, check_receipt, receipt_id

V = 128  # the tiny Llama's vocabulary

# (name, path, value or function of the old value, code)
EDITS = [
    ("last-output-id-beyond-vocab", ("output_token_ids", -1), V, "token_range"),
    ("last-output-id-far-beyond", ("output_token_ids", -1), 2**32 - 1, "token_range"),
    ("prompt-id-beyond-vocab", ("prompt_token_ids", 0), V, "token_range"),
    ("eos-beyond-vocab", ("manifest", "limits", "eos_token_ids"), [V + 5], "token_range"),
    ("eos-duplicated", ("manifest", "limits", "eos_token_ids"), [2, 2], "receipt_malformed"),
    ("eos-bool", ("manifest", "limits", "eos_token_ids"), [True], "receipt_malformed"),
    ("temperature-negative", ("manifest", "sampling", "temperature"), -0.9, "sampling_invalid"),
    ("temperature-fp32-underflow", ("manifest", "sampling", "temperature"), 1e-50,
     "sampling_invalid"),
    ("temperature-fp32-subnormal", ("manifest", "sampling", "temperature"), 1e-40,
     "sampling_invalid"),
    ("temperature-fp32-overflow", ("manifest", "sampling", "temperature"), 1e39,
     "sampling_invalid"),
    ("temperature-false", ("manifest", "sampling", "temperature"), False, "sampling_invalid"),
    ("temperature-true", ("manifest", "sampling", "temperature"), True, "sampling_invalid"),
    ("temperature-null", ("manifest", "sampling", "temperature"), None, "sampling_invalid"),
    ("top-p-true", ("manifest", "sampling", "top_p"), True, "sampling_invalid"),
    ("top-p-zero", ("manifest", "sampling", "top_p"), 0.0, "sampling_invalid"),
    ("top-p-above-one", ("manifest", "sampling", "top_p"), 1.5, "sampling_invalid"),
    ("top-k-negative", ("manifest", "sampling", "top_k"), -1, "sampling_invalid"),
    ("top-k-float", ("manifest", "sampling", "top_k"), 30.0, "sampling_invalid"),
    ("top-k-bool", ("manifest", "sampling", "top_k"), True, "sampling_invalid"),
    ("top-k-huge", ("manifest", "sampling", "top_k"), 2**40, "sampling_invalid"),
    ("chat-number", ("manifest", "chat"), 1e308, "receipt_malformed"),
    ("chat-int", ("manifest", "chat"), 0, "receipt_malformed"),
    ("max-tokens-float", ("manifest", "limits", "max_tokens"), 16.0, "receipt_malformed"),
    ("max-tokens-bool", ("manifest", "limits", "max_tokens"), True, "receipt_malformed"),
    ("context-length-changed", ("manifest", "limits", "context_length"), 10**6,
     "manifest_mismatch"),
    ("context-length-float", ("manifest", "limits", "context_length"), 256.0, "receipt_malformed"),
    ("profile-qmax-float", ("manifest", "profile", "kv_qmax"), 32639.0, "receipt_malformed"),
    ("seed-commitment-not-hex", ("manifest", "seed_commitment"), "x" * 64, "receipt_malformed"),
    ("trace-layers-float", ("trace", "layers"), 2.0, "receipt_malformed"),
    ("unknown-top-level", ("note",), "hi", "receipt_malformed"),
    ("unknown-manifest", ("manifest", "stop"), ["\n"], "receipt_malformed"),
    ("unknown-limits", ("manifest", "limits", "max_time"), 5, "receipt_malformed"),
    ("unknown-sampling", ("manifest", "sampling", "min_p"), 0.1, "receipt_malformed"),
    ("unknown-trace", ("trace", "extra_root"), "00" * 32, "receipt_malformed"),
    ("unknown-profile", ("manifest", "profile", "scale_bits"), 8, "receipt_malformed"),
    ("missing-manifest-field", ("manifest", "rope_digest"), None, "receipt_malformed"),
    ("nonce-lone-surrogate", ("nonce",), "\ud800", "receipt_malformed"),
    ("nonce-huge", ("nonce",), "n" * 5000, "receipt_malformed"),
]


def _forged(honest: dict, path: tuple, value) -> dict:
    """The edit with every hash recomputed where it can be (a lone surrogate cannot be hashed:
    then the edit stays unsealed, and must still be refused cleanly)."""
    bad = edited(honest, path, value, delete=value is None and path[-1] == "rope_digest")
    if len(path) == 1 and path[0] not in honest:  # a field build_receipt does not know
        return dict(bad, receipt_id=receipt_id(bad))
    if path[-1] == "nonce" and isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:
            return bad
    return resealed(bad) or bad


@pytest.mark.parametrize("path, value, code", [e[1:] for e in EDITS], ids=[e[0] for e in EDITS])
def test_receipt_outside_its_domain(world, path, value, code):
    """The verifier challenges the forged receipt; the provider answers with its honest run,
    relabelled for it (the embedding rows of the tokens it really ran)."""
    bad = _forged(world.served.receipt, path, value)
    try:
        c = world.challenge(bad, "full", positions="generated")
    except ValueError:  # too malformed to derive from (what check_receipt refuses first)
        c = world.challenge(world.served, "full", positions="generated")
    meta, arrays = world.open(world.served, c)
    meta = dict(meta, receipt_id=bad["receipt_id"], challenge_mac=c["mac"])
    assert_rejected(world.verify(bad, c, meta, arrays, expected_nonce=None), code)


def test_receipt_longer_than_the_context(world, opened):
    """Prompt + output beyond the model's context (256): refused before any hash or opening."""
    r = world.served.receipt
    long = build_receipt(r["manifest"], r["request"], r["nonce"], r["prompt_token_ids"] * 40,
                         r["output_token_ids"], r["text"], dict(r["trace"], positions=40 * 9 + 15))
    c, meta, arrays = opened
    assert_rejected(world.verify(long, c, meta, arrays), "context_length")
    with pytest.raises(ReceiptError) as e:
        check_receipt(long, vocab_size=V, max_positions=256)
    assert e.value.code == "context_length"


def test_last_token_beyond_vocab_on_a_routine_challenge_without_decode_of_it(world):
    """A routine challenge rarely checks the last decode step; the id is refused regardless."""
    r = world.served.receipt
    forged = build_receipt(r["manifest"], r["request"], r["nonce"], r["prompt_token_ids"],
                           r["output_token_ids"][:-1] + [V + 1], r["text"], r["trace"])
    c = world.challenge(forged, "routine", positions=[3])
    meta, arrays = world.open(world.served, world.challenge(world.served, "routine",
                                                            positions=[3]))
    meta = dict(meta, receipt_id=forged["receipt_id"], challenge_mac=c["mac"])
    assert_rejected(world.verify(forged, c, meta, arrays), "token_range")


META_EDITS = {
    "extra-field": lambda m: {**m, "note": 1},
    "seed-bool": lambda m: {**m, "seed": True},
    "seed-float": lambda m: {**m, "seed": float(m["seed"])},
    "seed-negative": lambda m: {**m, "seed": -1},
    "salt-missing": lambda m: {k: v for k, v in m.items() if k != "salt"},
    "salt-not-16-bytes": lambda m: {**m, "salt": "00"},
    # the same bytes spelled another way: one canonical encoding (no malleable openings)
    "salt-uppercase": lambda m: {**m, "salt": m["salt"].upper()},
    "salt-spaced": lambda m: {**m, "salt": m["salt"][:30] + " " + m["salt"][31]},
    "salt-not-hex": lambda m: {**m, "salt": "g" * 32},
    "not-an-object": lambda m: [m],
}


@pytest.mark.parametrize("edit", sorted(META_EDITS))
def test_opening_meta_typed(world, opened, edit):
    c, meta, arrays = opened
    v = world.verify(world.served, c, META_EDITS[edit](dict(meta)), dict(arrays))
    assert_rejected(v, "opening_type")


def test_junk_never_crashes(world, opened):
    """Wrong JSON types at every manifest, limits, sampling and trace leaf: a clean rejection."""
    c, meta, arrays = opened
    r = world.served.receipt
    for sect in ("manifest", "trace"):
        node = r[sect]
        leaves = [(sect, k) for k in node] + [(sect, k, j) for k in node
                                               if isinstance(node[k], dict) for j in node[k]]
        for path in leaves:
            old = r[path[0]][path[1]] if len(path) == 2 else r[path[0]][path[1]][path[2]]
            for junk in (True, 1.5, -1, "x", None, [], {}, 2**70):
                if junk is old or (type(junk) is type(old) and junk == old):
                    continue
                bad = resealed(edited(r, path, junk)) or edited(r, path, junk)
                v = world.verify(bad, c, dict(meta, receipt_id=bad["receipt_id"]), arrays,
                                 expected_nonce=NONCE)
                assert not v.accepted, (path, junk)
                assert_refused(v)


def test_honest_chat_and_greedy_receipts_pass(chat_world):
    v = chat_world.audit(chat_world.served, tier="full")
    assert v.accepted, (v.reason, v.detail)
    check_receipt(chat_world.served.receipt, vocab_size=49152, max_positions=256)
    assert np.all(np.array(chat_world.served.tokens) < 49152)
