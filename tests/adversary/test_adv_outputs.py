"""Stop sequences, logprobs and echo (verifier/outputs.py): a provider that runs past a stop, cuts
the text elsewhere, forges a committed logprob (output or echoed prompt), drops or adds what the
client asked for. Every receipt here is sealed properly (hashes recomputed): only the checks of
the output policy stand between it and ACCEPTED."""

from __future__ import annotations

import json
import os

import pytest
from advworld import NONCE, Served, assert_rejected
from commitllm.engine.receipts import SeqRequest, receipt_for_tokens, sign_batch
from commitllm.verifier.outputs import OutputPolicy
from commitllm.verifier.receipt import build_receipt


def _served(w, output_ids, policy: OutputPolicy, text=None, logprobs=None, request=None):
    salt = os.urandom(16)
    with w.honest.running() as model:
        r = receipt_for_tokens(model, w.tokenizer, request or w.request, NONCE, w.params, salt,
                               w.max_tokens, w.eos, list(w.prompt), list(output_ids), policy,
                               text, logprobs)
    return Served(r, {"receipt": r, "seed": w.params.seed, "salt": salt.hex()})


def _reseal(served: Served, **fields) -> Served:
    r = json.loads(json.dumps(served.receipt)) | fields
    new = build_receipt(r["manifest"], r["request"], r["nonce"], r["prompt_token_ids"],
                        r["output_token_ids"], r["text"], r["trace"], r["logprobs"])
    return Served(new, {**served.transcript, "receipt": new})


def _stop_of(w):
    """A stop string the honest output reaches at its first token (its text's last characters)."""
    out = w.served.output
    first = w.tokenizer.decode(out[:1])
    assert first and len(out) >= 2, (first, out)
    return first[-2:], out


def test_honest_stop_string_receipt_accepts(chat_world):
    w = chat_world
    stop, out = _stop_of(w)
    s = _served(w, out[:1], OutputPolicy(stop=(stop,)), text=None)
    # the honest text is cut before the stop string: receipt_for_tokens commits it whole, the
    # rule's cut is what an honest engine commits
    full = w.tokenizer.decode(out[:1])
    s = _reseal(s, text=full[:full.find(stop)])
    assert w.audit(s).accepted


def test_ran_past_the_stop_string(chat_world):
    w = chat_world
    stop, out = _stop_of(w)
    s = _served(w, out, OutputPolicy(stop=(stop,)))  # all 8 tokens, past the stop
    assert_rejected(w.audit(s), "stop_policy")


def test_stop_string_text_not_cut(chat_world):
    w = chat_world
    stop, out = _stop_of(w)
    s = _served(w, out[:1], OutputPolicy(stop=(stop,)))  # the stop string left in the text
    assert_rejected(w.audit(s), "output_binding")


def test_stopped_early_claiming_a_stop_string_that_is_not_there(chat_world):
    w = chat_world
    s = _served(w, w.served.output[:1], OutputPolicy(stop=("\u2603never",)))
    assert_rejected(w.audit(s), "stop_policy")


def test_ran_past_a_stop_token_id(chat_world):
    w = chat_world
    out = w.served.output
    s = _served(w, out, OutputPolicy(stop_token_ids=(out[0],)))
    assert_rejected(w.audit(s), "stop_policy")


@pytest.mark.parametrize("part", ["output-value", "output-top-id", "output-top-order",
                                  "prompt-value"])
def test_forged_logprob(chat_world, part):
    w = chat_world
    req = {"prompt": "the quick brown fox"}
    seq = SeqRequest(req, w.tokenizer.encode(req["prompt"]), w.params, 3, NONCE,
                     output=OutputPolicy(logprobs=2, echo=True))
    with w.honest.running() as model:
        signed = sign_batch(model, w.tokenizer, [seq], w.eos)
    r = signed.receipts[0]
    s = Served(r, signed.transcripts[0])
    assert w.audit(s).accepted  # honest: every position checked (deep)
    lp = json.loads(json.dumps(r["logprobs"]))
    if part == "output-value":
        lp["output"][1][0] = lp["output"][1][0] - 2.0**-30
    elif part == "output-top-id":
        lp["output"][0][1][1][0] ^= 1
    elif part == "output-top-order":
        lp["output"][0][1].reverse()
    else:
        lp["prompt"][0][0] = min(0.0, lp["prompt"][0][0] + 0.25)
    assert_rejected(w.audit(_reseal(s, logprobs=lp)), "logprobs")


def test_logprobs_dropped_added_or_policy_changed(chat_world):
    w = chat_world
    s = _served(w, w.served.output, OutputPolicy(logprobs=1))
    assert w.audit(s).accepted
    assert_rejected(w.audit(_reseal(s, logprobs=None)), "receipt_malformed")  # asked, not there
    plain = w.served
    lp = s.receipt["logprobs"]
    assert_rejected(w.audit(_reseal(plain, logprobs=lp)), "receipt_malformed")  # not asked
    # the client asked for stop strings; the provider served (and sealed) without them
    req = w.client_request() | {"stop": ["zz"]}
    assert_rejected(w.audit(plain, expected_request=req), "request_mismatch")
