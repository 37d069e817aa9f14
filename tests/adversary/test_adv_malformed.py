"""Malformed input never crashes the verifier and never passes it: explicit probes (the crash
and fail-open cases found while building this suite, kept as strict xfails until fixed) and
receipts with wrong types, huge and negative numbers, each with its expected reason code.
test_adv_fuzz.py fuzzes the same surfaces with hypothesis."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from accs import acc, set_acc
from advcheats import layer_hook
from advworld import assert_refused, assert_rejected, edited, resealed
from commitllm.engine.exact import ops
from commitllm.verifier.freivalds import P
from commitllm.verifier.receipt import ReceiptError, build_receipt, check_receipt

ORIG_QUANT = ops.quantize_rows


# --- explicit probes --------------------------------------------------------------------------


def test_accumulator_plus_the_freivalds_prime_cannot_be_sent(world, opened):
    """z + P (== z mod P, beyond 2^53) has no packed representation (opening version 2): the
    packer refuses it, and its low bytes, all a cheater can send, are refused."""
    c, meta, arrays = opened
    arrays = {k: v.copy() for k, v in arrays.items()}
    z = acc(arrays, "z.0.o")
    z[0, 0] += np.int64(P)
    with pytest.raises(OverflowError):
        set_acc(arrays, "z.0.o", z)
    set_acc(arrays, "z.0.o", z, wrap=True)
    assert_refused(world.verify(world.served.receipt, c, meta, arrays))


def test_lm_accumulators_as_floats(world, opened):
    c, meta, arrays = opened
    arrays = {k: v.copy() for k, v in arrays.items()}
    z = acc(arrays, "z.lm")
    arrays["z.lm"] = z.astype(np.float64) + np.where(z >= 0, 0.5, -0.5)
    assert_rejected(world.verify(world.served.receipt, c, meta, arrays), "opening_type")


def _kv_sample_challenge(world, served, layer, row, pos):
    """A full challenge at `pos` whose K/V sample of `layer` holds `row` (nonces tried in turn)."""
    for i in range(200):
        c = world.challenge(served, "full", positions=[pos], nonce=i.to_bytes(16, "little"))
        if row in c["kv_sample"][str(layer)]:
            return c
    raise AssertionError("no nonce put the row in the sample")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy casting inf on the way to the crash
def test_non_finite_committed_residual(world):
    """The provider commits x_1[3] = inf (layer 0's output), its engine tolerating it."""
    def hook(orig, self, m, i, x, step, tr):
        out = orig(self, m, i, x, step, tr)
        rows = (step.pos == 3).nonzero().flatten()
        if i == 0 and len(rows):
            out = out.clone()
            out[rows, 0] = float("inf")
        return out

    def tolerant(x, qmax):  # the cheating engine quantizes what the spec would refuse
        return ORIG_QUANT(torch.nan_to_num(x, nan=0.0, posinf=1e30, neginf=-1e30), qmax)

    p = layer_hook(world.qm, hook)
    p.patches += ((ops, "quantize_rows", tolerant),)
    s = world.serve(p)
    c = _kv_sample_challenge(world, s, 1, 3, 20)
    meta, arrays = world.open(s, c, p)
    assert_refused(world.verify(s.receipt, c, meta, arrays))


def _deep(depth: int):
    node = []
    for _ in range(depth):
        node = [node]
    return node


def test_deeply_nested_receipt(world, opened):
    c, meta, arrays = opened
    forged = dict(world.served.receipt, request={"prompt": _deep(100_000)})
    assert_refused(world.verify(forged, c, meta, arrays))


def test_chat_request_messages_not_objects(chat_world):
    w = chat_world
    r = w.served.receipt
    forged = build_receipt(r["manifest"], {"messages": ["Name two rivers."]}, r["nonce"],
                           r["prompt_token_ids"], r["output_token_ids"], r["text"], r["trace"])
    c = w.challenge(forged, "routine")
    meta, arrays = w.open(w.served, w.challenge(w.served, "routine"))
    meta = dict(meta, receipt_id=forged["receipt_id"], challenge_mac=c["mac"])
    assert_refused(w.verify(forged, c, meta, arrays))


def test_receipt_parse_errors_are_clean(world):
    """check_receipt on junk raises ReceiptError (what the CLI turns into exit code 2)."""
    for junk in (None, [], "x", {"version": 1}, {**world.served.receipt, "trace": []}):
        with pytest.raises(ReceiptError):
            check_receipt(junk)


# (name, receipt path, value, resealed, code): explicit wrong types, huge and negative numbers
RECEIPT_JUNK = [
    ("id-2^32", ("output_token_ids", 0), 2**32, False, "receipt_malformed"),
    ("id-negative", ("prompt_token_ids", 0), -5, False, "receipt_malformed"),
    ("id-bool", ("output_token_ids", 1), True, False, "receipt_malformed"),
    ("id-float", ("output_token_ids", 1), 3.0, False, "receipt_malformed"),
    ("ids-not-a-list", ("output_token_ids",), "1 2 3", False, "receipt_malformed"),
    ("trace-missing", ("trace",), None, False, "receipt_malformed"),
    ("positions-huge", ("trace", "positions"), 10**30, True, "token_count"),
    ("positions-negative", ("trace", "positions"), -1, True, "token_count"),
    ("root-not-hex", ("trace", "kv_root"), "zz" * 32, False, "receipt_malformed"),
    ("id-beyond-vocab", ("output_token_ids", 0), 10**6, True, "token_range"),
    ("temperature-huge", ("manifest", "sampling", "temperature"), 1e308, True, "sampling_invalid"),
    ("temperature-string", ("manifest", "sampling", "temperature"), "0.9", True,
     "sampling_invalid"),
    ("top-p-nan", ("manifest", "sampling", "top_p"), float("nan"), True, "sampling_invalid"),
    ("max-tokens-negative", ("manifest", "limits", "max_tokens"), -1, True, "stop_policy"),
    ("eos-not-a-list", ("manifest", "limits", "eos_token_ids"), 7, True, "receipt_malformed"),
    ("limits-missing", ("manifest", "limits"), None, True, "receipt_malformed"),
]


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")  # temperature 1e308 in fp32
@pytest.mark.parametrize("path, value, reseal, code", [j[1:] for j in RECEIPT_JUNK],
                         ids=[j[0] for j in RECEIPT_JUNK])
def test_receipt_junk(world, path, value, reseal, code):
    """The verifier checks the receipt before it derives a challenge; the provider answers that
    challenge with its honest run, relabelled for the edited receipt."""
    honest = world.served.receipt
    bad = edited(honest, path, value, delete=value is None)
    if reseal:
        bad = resealed(bad)
    try:
        check_receipt(bad)
        c = world.challenge(bad, "full", positions="generated")
    except ReceiptError:
        c = world.challenge(world.served, "full", positions="generated")
    meta, arrays = world.open(world.served, c)
    meta = dict(meta, receipt_id=bad["receipt_id"])
    assert_rejected(world.verify(bad, c, meta, arrays), code)
