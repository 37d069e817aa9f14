"""No seed grinding across requests, no nonce resealing: every sampling draw is
blake3("commitllm/sample/v2" || seed || H(nonce) || position), the nonce being the client's
(numerics spec commitllm-numerics/2). Before, the draws ignored the nonce: a sampled answer
(and its opening) could be resealed under another client's nonce and ACCEPTED there, and a
seed ground once for a preferred answer served every later request with the same prompt.
What remains (docs/PROTOCOL.md, limits): a provider that chooses the seed itself (the client
fixed none) can still try seeds within one request; a client that fixes the seed removes that
(checked by verify's expected_request)."""

from __future__ import annotations

import dataclasses

from advworld import NONCE, SAMPLED, assert_rejected
from commitllm.verifier.receipt import build_receipt

OTHER = "client-nonce-0002"


def test_sampled_answer_resealed_under_another_nonce(pworld):
    """Client 2 (nonce OTHER) is served client 1's sampled answer, resealed for its nonce (every
    hash recomputed) and opened from client 1's honest run: the draws under OTHER differ."""
    w = pworld
    r = w.served.receipt
    forged = build_receipt(r["manifest"], r["request"], OTHER, r["prompt_token_ids"],
                           r["output_token_ids"], r["text"], r["trace"])
    c = w.challenge(forged, "full", positions="generated")
    meta, arrays = w.open(w.served, c)
    meta = dict(meta, receipt_id=forged["receipt_id"], challenge_mac=c["mac"])
    assert_rejected(w.verify(forged, c, meta, arrays, expected_nonce=OTHER), "decode")


def test_draws_depend_on_the_nonce(world):
    """One seed, two clients' nonces: two different honest samples, each verifying for its own
    client (so a seed ground for one request says nothing about the next)."""
    a, b = world.served, world.serve(nonce=OTHER)
    assert a.transcript["seed"] == b.transcript["seed"] == SAMPLED.seed
    assert a.output != b.output
    assert world.audit(b, tier="full", positions="generated", expected_nonce=OTHER).accepted
    assert world.audit(a, tier="full", positions="generated", expected_nonce=NONCE).accepted


def test_seed_other_than_the_clients_is_refused(world):
    """A provider grinding seeds within a request must reveal a seed other than the one the
    client fixed: the client's request check refuses it."""
    s = world.serve(params=dataclasses.replace(SAMPLED, seed=SAMPLED.seed + 1))
    assert s.output != world.served.output
    v = world.audit(s, tier="full", positions="generated",
                    expected_request=world.client_request())
    assert_rejected(v, "request_mismatch")


def test_greedy_receipts_do_not_depend_on_the_nonce(chat_world):
    w = chat_world
    s = w.serve(nonce=OTHER)
    assert s.output == w.served.output
    assert w.audit(s, tier="full", expected_nonce=OTHER).accepted
