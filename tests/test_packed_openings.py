"""Packed accumulators (opening version 2, verifier/opening.py): each matrix's width from the key's
config and profile, the encoding against int64, both decoders, and honest openings at every
family's widths. Tamper families: adversary/test_adv_linear.py, test_adv_typed.py,
test_adv_malformed.py, test_adv_moe_attack.py."""

from __future__ import annotations

import numpy as np
import pytest

from commitllm.keys.keygen import build_key
from commitllm.verifier import native
from commitllm.verifier.checkpoint import load_checkpoint
from commitllm.verifier.numerics import get_profile
from commitllm.verifier.numerics.weights import quantize_model
from commitllm.verifier.opening import (_acc_matrix, acc_bound, acc_width, in_features, pack_acc,
                                        unpack_acc)

KINDS = ["llama", "llama_tied_scaled", "qwen3", "mixtral", "qwen3_moe", "odd"]


@pytest.mark.parametrize("kind", KINDS)
def test_widths_follow_each_matrix_s_input_and_profile(kind, request):
    """in_features is the length of every matrix's Freivalds row in a real key (so acc_bound is
    the bound the replay checks), and acc_width the fewest bytes holding [-B, B]."""
    cfg, tensors = load_checkpoint(request.getfixturevalue(f"tiny_{kind}"))
    for profile in ("w8a16", "a8", "w16a16") if kind == "llama" else ("w8a16",):
        prof = get_profile(profile)
        key = build_key(quantize_model(cfg, tensors, prof), None, secret=bytes(32))
        labels = [lab for lab in key.meta["rows"] if lab.split(".")[-1] in
                  ("qkv", "o", "router", "gate_up", "down", "lm_head")]
        assert {lab.split(".")[-1] for lab in labels} >= {"qkv", "o", "down", "lm_head"}
        for lab in labels:
            m = lab.split(".")[-1]
            assert len(key.v(lab)) == in_features(cfg, m), (kind, lab)
            b, w = acc_bound(cfg, prof, m), acc_width(cfg, prof, m)
            assert b == in_features(cfg, m) * prof.act_qmax * prof.matrix_qmax(lab)
            assert b < 1 << (8 * w - 1) and (w == 1 or b >= 1 << (8 * w - 9))


def test_widths_at_the_anchor_shapes():
    """The widths docs/PROTOCOL.md quotes: Llama-3.1-8B at w8a16 (5 bytes, the 16-bit LM head 6),
    at a8 (4), and w16a16 (6, the head too)."""
    from types import SimpleNamespace

    cfg = SimpleNamespace(hidden_size=4096, num_heads=32, head_dim=128, intermediate_size=14336)
    got = {p: {m: acc_width(cfg, get_profile(p), m) for m in ("qkv", "o", "gate_up", "down",
                                                             "lm_head")}
           for p in ("w8a16", "a8", "w16a16")}
    assert got == {"w8a16": {"qkv": 5, "o": 5, "gate_up": 5, "down": 5, "lm_head": 6},
                   "a8": {"qkv": 4, "o": 4, "gate_up": 4, "down": 4, "lm_head": 4},
                   "w16a16": {"qkv": 6, "o": 6, "gate_up": 6, "down": 6, "lm_head": 6}}


@pytest.mark.parametrize("w", range(1, 9))
def test_pack_and_both_decoders_are_exact(w, monkeypatch):
    rng = np.random.default_rng(w)
    top = 1 << (8 * w - 1)
    z = np.concatenate([rng.integers(-top, top, 500, dtype=np.int64, endpoint=False),
                        np.array([0, 1, -1, top - 1, -top], np.int64)]).reshape(5, 101)
    b = pack_acc(z, w)
    assert b.dtype == np.uint8 and b.shape == (5, 101, w) and b.flags.c_contiguous
    assert np.array_equal(b, z.astype("<i8")[..., None].view(np.uint8)[..., :w])
    fast = unpack_acc(b)
    assert fast.dtype == np.int64 and np.array_equal(fast, z)
    assert np.array_equal(unpack_acc(b[:, 3:40]), z[:, 3:40])  # a strided view
    for k in range(1, 10):  # arrays shorter than one 8-byte load, and the tail of each
        assert np.array_equal(unpack_acc(b[4, -k:]), z[4, -k:]), k
    monkeypatch.setattr(native, "lib", lambda: None)
    assert np.array_equal(unpack_acc(b), z)  # the numpy route
    if w < 8:
        for bad in (top, -top - 1):
            with pytest.raises(OverflowError):
                pack_acc(np.array([bad]), w)
    with pytest.raises(TypeError):
        pack_acc(z.astype(np.float64), w)


def test_native_decoder_refuses_bad_widths():
    if native.lib() is None:
        pytest.skip(f"no compiled core: {native.error()}")
    for bad in (np.zeros((3, 0), np.uint8), np.zeros((3, 9), np.uint8), np.zeros(3, np.int8)):
        with pytest.raises(ValueError):
            native.acc_unpack(bad)


def test_accumulator_names():
    assert [_acc_matrix(n) for n in ("z.lm", "z.3.qkv", "zq.0.qkv", "z.1.router", "z.2.pos",
                                     "zq.0.pos", "z.lm.pos", "kv.1.k", "resid.0.rows")] == \
        ["lm_head", "qkv", "qkv", "router", None, None, None, None, None]


def test_server_size_bound_counts_the_packed_widths(tiny_llama):
    """The server's bound on an opening's size (engine/serve/audit.opening_bytes, refused over
    --max-opening-bytes before any re-execution) is above the real opening at every tier, and
    with the profile counts each accumulator at its packed width (below the 8-byte bound)."""
    from test_protocol import Flow, _qm

    from commitllm.engine.open import build_opening
    from commitllm.engine.serve.audit import opening_bytes
    from commitllm.verifier import container
    from commitllm.verifier.opening import OPENING_MAGIC, OPENING_VERSION

    flow = Flow(_qm(tiny_llama))
    cfg, prof = flow.qm.cfg, flow.qm.profile
    for tier in ("routine", "full", "deep"):
        c = flow.challenge(tier)
        data = container.dumps(OPENING_MAGIC, OPENING_VERSION,
                               *build_opening(flow.model, flow.transcript, c))
        packed, loose = opening_bytes(c, cfg, prof), opening_bytes(c, cfg)
        assert len(data) <= packed < loose, (tier, len(data), packed, loose)
