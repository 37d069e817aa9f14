"""Commit-and-audit round trips (no false rejection, every tier) and a first set of tamper tests,
each rejected with its expected reason code."""

from __future__ import annotations


import numpy as np
import pytest

from commitllm.engine.exact.model import ExactModel
from commitllm.engine.open import OpenError, build_opening
from commitllm.engine.receipts import generate_with_receipts, receipt_for_tokens
from commitllm.keys.keygen import build_key, key_tokenizer, load_key, save_key
from commitllm.verifier import challenge as ch
from commitllm.verifier import container
from commitllm.verifier.checkpoint import load_checkpoint
from commitllm.verifier.numerics import get_profile
from commitllm.verifier.numerics.sampler import SamplingParams
from commitllm.verifier.opening import OPENING_MAGIC, OPENING_VERSION
from commitllm.verifier.verify import verify
from accs import add_acc

GREEDY, SAMPLED = SamplingParams(), SamplingParams(0.9, 30, 0.95, 4242)


def _qm(folder, profile="w8a16"):
    cfg, t = load_checkpoint(folder)
    from commitllm.verifier.numerics.weights import quantize_model

    return quantize_model(cfg, t, get_profile(profile))


class Flow:
    """The honest flow: key, generation with a receipt, challenge, opening (through bytes)."""

    def __init__(self, qm, tokenizer=None, params=GREEDY, prompt=None, max_tokens=20, eos=(),
                 request=None):
        self.qm, self.model, self.tok = qm, ExactModel(qm), tokenizer
        self.key = build_key(qm, tokenizer, secret=bytes(range(32)))
        prompt = prompt or list(np.random.default_rng(1).integers(3, qm.cfg.vocab_size, 9))
        prompt = [int(t) for t in prompt]
        self.signed = generate_with_receipts(self.model, tokenizer, [request or {"prompt": "x"}],
                                             [prompt], params, max_tokens, eos, "nonce")
        self.receipt, self.transcript = self.signed.receipts[0], self.signed.transcripts[0]

    def challenge(self, tier="full", positions=None, receipt=None):
        return ch.derive(self.key.secret, receipt or self.receipt, tier, nonce=b"n" * 16,
                         positions=positions)

    def open(self, challenge, transcript=None, model=None):
        meta, arrays = build_opening(model or self.model, transcript or self.transcript, challenge)
        data = container.dumps(OPENING_MAGIC, OPENING_VERSION, meta, arrays)
        meta, arrays = container.loads(data, OPENING_MAGIC, OPENING_VERSION, len(data))
        return meta, {k: np.array(v) for k, v in arrays.items()}  # writable copies for tampering

    def verify(self, challenge, meta, arrays, receipt=None, threads: int = 1):
        tok = key_tokenizer(self.key)
        return verify(self.key, receipt or self.receipt, challenge, meta, arrays, tok,
                      io_binding=tok is not None, threads=threads)


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
@pytest.mark.parametrize("tier", ["routine", "full", "deep"])
def test_round_trip_tiny(tiny_checkpoint, params, tier):
    flow = Flow(_qm(tiny_checkpoint), params=params)
    c = flow.challenge(tier)
    v = flow.verify(c, *flow.open(c))
    assert v.accepted, (v.reason, v.detail)
    if tier == "deep":
        assert c["positions"] == list(range(flow.receipt["trace"]["positions"]))


@pytest.mark.parametrize("profile", ["w16a16", "a8"])
def test_round_trip_other_profiles(tiny_qwen2, profile):
    flow = Flow(_qm(tiny_qwen2, profile), params=SAMPLED)
    c = flow.challenge("deep")
    v = flow.verify(c, *flow.open(c))
    assert v.accepted, (v.reason, v.detail)


def test_round_trip_smollm2_every_generated_position(smollm2):
    qm = smollm2.quantized(get_profile("w8a16"))
    tok = smollm2.tokenizer
    text = "Write a short story about a robot."
    prompt = tok.encode_chat([{"role": "user", "content": text}])
    flow = Flow(qm, tok, SAMPLED, prompt, max_tokens=64, eos=tuple(smollm2.cfg.eos_token_ids),
                request={"messages": [{"role": "user", "content": text}]})
    for tier, positions in (("full", "generated"), ("routine", None)):
        c = flow.challenge(tier, positions)
        v = flow.verify(c, *flow.open(c))
        assert v.accepted, (tier, v.reason, v.detail)
    assert len(flow.receipt["output_token_ids"]) >= 10


def test_key_file_round_trip_and_mode(tiny_llama, tmp_path):
    flow = Flow(_qm(tiny_llama))
    path = tmp_path / "k.key"
    save_key(flow.key, path)
    assert (path.stat().st_mode & 0o777) == 0o600
    again = load_key(path)
    assert again.meta == flow.key.meta and again.secret == flow.key.secret
    bad = tmp_path / "bad.key"
    bad.write_bytes(path.read_bytes()[:100])
    with pytest.raises(container.ContainerError):
        load_key(bad)


# --- first tamper tests -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def flow(tiny_llama_tied_scaled):
    return Flow(_qm(tiny_llama_tied_scaled), params=SAMPLED, max_tokens=24)


@pytest.mark.parametrize("matrix, code", [("qkv", "freivalds_qkv"), ("o", "freivalds_o"),
                                          ("gate_up", "freivalds_gate_up"),
                                          ("down", "freivalds_down")])
def test_flipped_accumulator(flow, matrix, code):
    c = flow.challenge("full")
    meta, arrays = flow.open(c)
    add_acc(arrays, f"z.1.{matrix}", (0, 3), 1)
    v = flow.verify(c, meta, arrays)
    assert not v.accepted and v.reason == code


def test_opening_carries_packed_accumulators(flow):
    """Every accumulator array of an honest full opening is uint8 [..., w] at its matrix's width
    (from the config and profile), decodes within its proven bound, and costs w of 8 bytes."""
    from commitllm.verifier.opening import _acc_matrix, acc_bound, acc_width, unpack_acc

    c = flow.challenge("full", positions="generated")
    meta, arrays = flow.open(c)
    names = [n for n in arrays if _acc_matrix(n)]
    assert {"z.lm"} < set(names) and any(n.startswith("zq.") for n in names)
    cfg, prof = flow.qm.cfg, flow.qm.profile
    for name in names:
        m = _acc_matrix(name)
        a = arrays[name]
        assert a.dtype == np.uint8 and a.shape[-1] == acc_width(cfg, prof, m) < 8, name
        assert np.abs(unpack_acc(a)).max() <= acc_bound(cfg, prof, m)
    assert flow.verify(c, meta, arrays).accepted


def test_flipped_lm_head_accumulator(flow):
    c = flow.challenge("full", positions="generated")
    meta, arrays = flow.open(c)
    add_acc(arrays, "z.lm", (2, 5), -1)
    assert flow.verify(c, meta, arrays).reason == "freivalds_lm_head"


def test_changed_output_token_is_caught_by_decode(flow):
    """A provider that changes token i and re-commits consistently still fails the decode check."""
    r = flow.receipt
    out = list(r["output_token_ids"])
    i = 5
    out[i] = (out[i] + 1) % flow.qm.cfg.vocab_size
    forged = receipt_for_tokens(flow.model, None, r["request"], r["nonce"], SAMPLED,
                                bytes.fromhex(flow.transcript["salt"]), r["manifest"]["limits"]["max_tokens"],
                                (), r["prompt_token_ids"], out)
    transcript = {**flow.transcript, "receipt": forged}
    c = flow.challenge("full", positions="generated", receipt=forged)
    v = flow.verify(c, *flow.open(c, transcript), receipt=forged)
    assert not v.accepted and v.reason == "decode"


def test_changed_token_in_receipt_breaks_its_hashes(flow):
    r = {**flow.receipt, "output_token_ids": list(flow.receipt["output_token_ids"])}
    r["output_token_ids"][0] ^= 1
    c = flow.challenge("routine")
    v = flow.verify(c, *flow.open(c), receipt=r)
    assert v.reason == "io_chain"


def test_changed_kv_row_at_early_position(flow):
    c = flow.challenge("deep")
    meta, arrays = flow.open(c)
    arrays["kv.0.v"][1, 0, 2] += 1  # position 1 of layer 0
    v = flow.verify(c, meta, arrays)
    assert v.reason == "merkle_kv"


def test_opening_with_another_model(flow, tiny_qwen2, tiny_llama_tied_scaled):
    """Weights B served, opening honest for B, receipt claiming model A: Freivalds rejects."""
    qm_b = _qm(tiny_llama_tied_scaled)
    rng = np.random.default_rng(3)
    layers = list(qm_b.layers)
    noisy = layers[0].qkv.q.astype(np.int16) + rng.integers(-2, 3, layers[0].qkv.q.shape)
    import dataclasses

    lin = dataclasses.replace(layers[0].qkv, q=np.clip(noisy, -127, 127).astype(np.int8))
    layers[0] = dataclasses.replace(layers[0], qkv=lin)
    model_b = ExactModel(dataclasses.replace(qm_b, layers=tuple(layers)))
    r = flow.receipt
    forged = receipt_for_tokens(model_b, None, r["request"], r["nonce"], SAMPLED,
                                bytes.fromhex(flow.transcript["salt"]),
                                r["manifest"]["limits"]["max_tokens"], (), r["prompt_token_ids"],
                                r["output_token_ids"])
    forged_manifest = dict(forged["manifest"], model_commitment=r["manifest"]["model_commitment"])
    from commitllm.verifier.receipt import build_receipt

    forged = build_receipt(forged_manifest, r["request"], r["nonce"], r["prompt_token_ids"],
                           r["output_token_ids"], "", forged["trace"])
    c = flow.challenge("full", receipt=forged)
    v = flow.verify(c, *flow.open(c, {**flow.transcript, "receipt": forged}, model_b),
                    receipt=forged)
    assert not v.accepted and v.reason in ("freivalds_qkv", "embedding")


def test_provider_refuses_to_open_a_receipt_it_cannot_reproduce(flow):
    r = {**flow.receipt, "trace": {**flow.receipt["trace"], "kv_root": "00" * 32}}
    with pytest.raises(OpenError):
        flow.open(flow.challenge("routine"), {**flow.transcript, "receipt": r})


def test_tampered_challenge_and_wrong_opening(flow):
    c = flow.challenge("routine")
    meta, arrays = flow.open(c)
    c2 = dict(c, positions=[0])
    assert flow.verify(c2, meta, arrays).reason == "challenge_invalid"
    other = flow.challenge("full")
    assert flow.verify(other, meta, arrays).reason == "opening_mismatch"


def test_wrong_seed_is_rejected(flow):
    c = flow.challenge("routine")
    meta, arrays = flow.open(c)
    assert flow.verify(c, dict(meta, seed=meta["seed"] + 1), arrays).reason == "seed_commitment"


def test_malformed_opening_never_crashes(flow):
    c = flow.challenge("routine")
    meta, arrays = flow.open(c)
    for name in list(arrays)[:12]:
        broken = dict(arrays)
        del broken[name]
        v = flow.verify(c, meta, broken)
        assert not v.accepted and v.reason
        broken = dict(arrays, **{name: np.zeros((1,), np.int8)})
        v = flow.verify(c, meta, broken)
        assert not v.accepted and v.reason


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory):
    from tinymodels import make_tiny_checkpoint

    return _qm(make_tiny_checkpoint(tmp_path_factory.mktemp("four"), "llama",
                                    overrides={"num_hidden_layers": 4}))


@pytest.mark.parametrize("tamper", [None, "z.2.down", "z.3.o+z.0.qkv", "kv.1.k",
                                    "kv.2.k+z.0.qkv", "resid.3.rows+z.1.down",
                                    "embed.q+z.0.gate_up", "z.1.pos+kv.3.v", "z.2.pos"])
def test_verdict_does_not_depend_on_threads(four_layers, tamper):
    """The challenged layers replayed on 1, 2 and 4 threads: the same verdict, reason, detail and
    list of checks; with tampering in two layers, the first layer's reason (as in one thread).
    With threads the replay runs while the Merkle proofs are hashed: a failed proof, then the
    embedding check, still come before any replay failure; position lists are refused before
    either."""
    flow = Flow(four_layers, params=SAMPLED)
    c = flow.challenge("full")
    assert len({int(k.split(".")[1]) for k in flow.open(c)[1] if k.startswith("z.") and
                k.split(".")[1].isdigit()}) == 4
    meta, arrays = flow.open(c)
    for name in (tamper or "").split("+"):
        if name.startswith("z.") and not name.endswith(".pos"):
            add_acc(arrays, name, (0, 0), 1)
        elif name:
            arrays[name].reshape(-1)[0] += 1
    got = []
    for n in (1, 2, 4):
        v = flow.verify(c, meta, arrays, threads=n)
        got.append((v.accepted, v.reason, v.detail, v.checks))
    assert got[0] == got[1] == got[2]
    assert got[0][0] is (tamper is None), got[0][1:3]
    if tamper == "z.3.o+z.0.qkv":
        assert "layers.0.qkv" in got[0][2]  # the first failing layer in order decides
    first = {"kv.2.k+z.0.qkv": "merkle_kv", "resid.3.rows+z.1.down": "merkle_residual",
             "embed.q+z.0.gate_up": "merkle_embedding", "z.1.pos+kv.3.v": "opening_mismatch",
             "z.2.pos": "opening_mismatch"}
    if tamper in first:
        assert got[0][1] == first[tamper], got[0][1:3]


def test_threads_must_be_positive(flow):
    c = flow.challenge("routine")
    with pytest.raises(ValueError, match="threads"):
        flow.verify(c, *flow.open(c), threads=0)


@pytest.mark.parametrize("tamper", [None, "z.1.gate_up", "kv.2.v", "resid.1.rows", "z.lm"])
def test_verdict_without_the_compiled_core_is_the_same(four_layers, tamper, monkeypatch):
    """COMMITLLM_NATIVE=0 (attention, Freivalds and the bridge all on their numpy routes): the
    same verdict, reason, detail and checks as with the compiled core, honest and tampered."""
    from commitllm.verifier import native

    flow = Flow(four_layers, params=SAMPLED)
    c = flow.challenge("full")
    meta, arrays = flow.open(c)
    if tamper and tamper.startswith("z."):
        add_acc(arrays, tamper, (-1, -1), 1)
    elif tamper:
        arrays[tamper].reshape(-1)[-1] += 1
    got = []
    for off in (False, True):
        monkeypatch.setattr(native, "_state", {})
        monkeypatch.setenv("COMMITLLM_NATIVE", "0" if off else "1")
        assert (native.lib() is None) == off or native.error()
        v = flow.verify(c, meta, arrays)
        got.append((v.accepted, v.reason, v.detail, v.checks))
    assert got[0] == got[1]
    assert got[0][0] is (tamper is None), got[0][1:3]
