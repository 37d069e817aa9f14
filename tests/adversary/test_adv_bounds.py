"""Hostile input stays bounded on the verifier side: a receipt file larger than any honest one
for the key's context is refused before it is read or parsed; a receipt claiming a huge layer
count or position count, or a challenge claiming huge layer lists, is refused before anything
is sized from it; the container reader computes sizes in Python integers (no wrap-around) and
caps tensor counts, dims and its JSON; a lone-surrogate string never crashes a check."""

from __future__ import annotations

import json
import struct
import time
import tracemalloc

import numpy as np
import pytest
from advworld import assert_refused, assert_rejected, resealed
from commitllm.keys.keygen import save_key
from commitllm.verifier import challenge as ch
from commitllm.verifier import container
from commitllm.verifier.cli import app as verifier_app
from commitllm.verifier.opening import OPENING_MAGIC, OPENING_VERSION
from commitllm.verifier.receipt import MAX_RECEIPT_BYTES, build_receipt, receipt_bound
from typer.testing import CliRunner

MAGIC = b"CLLMTST\x00"


def _container(table: dict, payload: bytes = b"", meta: str = "{}") -> bytes:
    table = {"__metadata__": {"json": meta}, **table}
    head = json.dumps(table).encode()
    return MAGIC + struct.pack("<I", 1) + struct.pack("<Q", len(head)) + head + payload


WRAP = {
    "int64-product-wraps-to-zero": {"t": {"dtype": "U8", "shape": [2**62, 4],
                                          "data_offsets": [0, 0]}},
    "int64-product-wraps-to-small": {"t": {"dtype": "F32", "shape": [2**32 + 1, 2**32],
                                           "data_offsets": [0, 4]}},
    "dims-beyond-4": {"t": {"dtype": "U8", "shape": [1, 1, 1, 1, 1], "data_offsets": [0, 1]}},
    "dim-bool": {"t": {"dtype": "U8", "shape": [True], "data_offsets": [0, 1]}},
    "dim-negative": {"t": {"dtype": "U8", "shape": [-1], "data_offsets": [0, 1]}},
    "offset-float": {"t": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1.0]}},
    "offsets-beyond": {"t": {"dtype": "U8", "shape": [8], "data_offsets": [2**64 - 8, 2**64]}},
    "extra-entry-field": {"t": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1], "x": 1}},
    "dtype-unknown": {"t": {"dtype": "F16", "shape": [1], "data_offsets": [0, 2]}},
}


@pytest.mark.parametrize("case", sorted(WRAP))
def test_container_sizes_in_python_integers(case):
    with pytest.raises(container.ContainerError):
        container.loads(_container(WRAP[case], b"\x00" * 8), MAGIC, 1, 1 << 20)


def test_container_caps_tensor_count_and_json():
    many = {f"t{i}": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]} for i in range(8193)}
    with pytest.raises(container.ContainerError, match="tensors"):
        container.loads(_container(many), MAGIC, 1, 1 << 24)
    for meta in ("[" * 100 + "]" * 100, '{"a": 1' + "0" * 60 + "}", '{"a": NaN}',
                 '{"a": 1, "a": 2}'):
        with pytest.raises(container.ContainerError):
            container.loads(_container({}, meta=meta), MAGIC, 1, 1 << 20)
    meta, arrays = container.loads(_container({"t": {"dtype": "U8", "shape": [2, 2],
                                                     "data_offsets": [0, 4]}}, b"\x01" * 4),
                                   MAGIC, 1, 1 << 20)
    assert meta == {} and arrays["t"].tolist() == [[1, 1], [1, 1]]


@pytest.fixture(scope="module")
def files(world, opened, tmp_path_factory):
    d = tmp_path_factory.mktemp("bounds")
    c, meta, arrays = opened
    save_key(world.key, d / "k.key")
    (d / "c.json").write_text(json.dumps(c))
    container.write(d / "o.bin", OPENING_MAGIC, OPENING_VERSION, meta, arrays)
    return d


def _verify_cli(d, receipt_path):
    return CliRunner().invoke(verifier_app, [
        "verify", "--key", str(d / "k.key"), "--receipt", str(receipt_path), "--challenge",
        str(d / "c.json"), "--opening", str(d / "o.bin"), "--no-io-binding"])


def test_huge_receipt_refused_before_parsing(world, files):
    """A 1 GiB receipt (sparse: no disk used) for a model of context 256: refused by its size
    alone, in bounded time and memory (never read)."""
    bound = receipt_bound(world.qm.cfg.max_position_embeddings)
    assert bound < MAX_RECEIPT_BYTES
    big = files / "big.json"
    with big.open("wb") as f:
        f.truncate(1 << 30)
    tracemalloc.start()
    t0 = time.perf_counter()
    res = _verify_cli(files, big)
    took = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert res.exit_code == 2 and "larger than" in res.output, res.output
    assert peak < 32 << 20 and took < 5, (peak, took)
    honest = files / "r.json"
    honest.write_text(json.dumps(world.served.receipt))
    assert _verify_cli(files, honest).exit_code == 0
    just_over = files / "over.json"
    just_over.write_text(json.dumps(world.served.receipt) + " " * bound)
    assert _verify_cli(files, just_over).exit_code == 2


def test_huge_layer_count_refused_before_allocation(world, opened):
    c, meta, arrays = opened
    r = dict(world.served.receipt, trace=dict(world.served.receipt["trace"], layers=10**12))
    bad = resealed(r)
    with pytest.raises(ValueError, match="layers"):
        ch.derive(world.key.secret, bad, "full")
    with pytest.raises(ValueError, match="layers"):
        ch.derive(world.key.secret, bad, "routine", n_layers=world.qm.cfg.num_layers)
    tracemalloc.start()
    v = world.verify(bad, c, dict(meta, receipt_id=bad["receipt_id"]), arrays)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert_rejected(v, "manifest_mismatch")
    assert peak < 64 << 20, peak


def test_challenge_with_huge_lists_refused_before_allocation(world, opened):
    c, meta, arrays = opened
    body = {k: v for k, v in c.items() if k != "mac"} | {"layers": list(range(2 * 10**5)),
                                                          "kv_sample": {}}
    bad = body | {"mac": ch._mac(world.key.secret, body)}
    assert_rejected(world.verify(world.served, bad, dict(meta, challenge_mac=bad["mac"]), arrays),
                    "challenge_invalid")


def test_receipt_with_a_huge_position_claim(world, opened):
    """trace.positions far beyond the tokens: refused by the token count, nothing sized."""
    c, meta, arrays = opened
    bad = resealed(dict(world.served.receipt,
                        trace=dict(world.served.receipt["trace"], positions=2**62)))
    assert_rejected(world.verify(bad, c, dict(meta, receipt_id=bad["receipt_id"]), arrays),
                    "token_count")


def test_lone_surrogates_never_crash(world, opened):
    c, meta, arrays = opened
    r = world.served.receipt
    assert ch.check(world.key.secret, dict(c, mac="\ud800"), r) is not None
    assert ch.check(world.key.secret, dict(c, receipt_id="\udfff"), r) is not None
    assert_refused(world.verify(r, dict(c, mac="\ud800"), meta, arrays))
    assert_refused(world.verify(r, c, dict(meta, receipt_id="\ud800"), arrays))
    forged = dict(r, nonce="\ud800")
    assert_rejected(world.verify(forged, c, meta, arrays, expected_nonce=None), "receipt_malformed")
    assert_refused(world.verify(r, c, meta, arrays, expected_nonce="\ud800"))


def test_receipt_at_the_context_limit_verifies_in_bounded_memory(world):
    """The longest honest receipt the tiny model allows (context 256, deep tier): accepted,
    and its verification's peak memory is a few MiB."""
    prompt = world.prompt * 26  # 234 prompt tokens + 16 output = 250 <= 256
    s = world.serve(prompt=prompt)
    c = world.challenge(s, "deep")
    meta, arrays = world.open(s, c)
    tracemalloc.start()
    v = world.verify(s, c, meta, arrays)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert v.accepted, (v.reason, v.detail)
    assert peak < 256 << 20, peak
    assert np.all(np.array(s.tokens) < world.qm.cfg.vocab_size)
    over = build_receipt(s.receipt["manifest"], s.receipt["request"], s.receipt["nonce"],
                         prompt * 2, s.receipt["output_token_ids"], s.receipt["text"],
                         dict(s.receipt["trace"], positions=2 * len(prompt) + 15))
    assert_rejected(world.verify(over, c, meta, arrays), "context_length")
