"""Linear shell: every matmul is checked by Freivalds against the key, and every dequantization
is re-executed with the key's scales and biases, so an integer accumulator, a scale or a bias that
differs from the committed model is caught, even when the provider commits consistently."""

from __future__ import annotations

import numpy as np
import pytest
from advcheats import biased, scaled, tapped
from accs import acc, add_acc, set_acc
from advworld import assert_rejected
from commitllm.engine.open import build_opening
from commitllm.verifier.freivalds import P

# (matrix, layer, output column): one accumulator column off at every position
FAMILIES = [("qkv", 0, 5), ("o", 1, 3), ("gate_up", 0, 100), ("down", 1, 7), ("lm_head", None, 9)]
IDS = [f[0] for f in FAMILIES]


@pytest.mark.parametrize("matrix, layer, col", FAMILIES, ids=IDS)
def test_flipped_accumulator_committed_consistently(world, matrix, layer, col):
    """The provider's GEMM returns z + 1 in one column; it generates, commits and opens with it."""
    p = tapped(world.qm, layer, matrix, col, 1)
    s = world.serve(p)
    assert_rejected(world.audit(s, p), f"freivalds_{matrix}")


@pytest.mark.parametrize("matrix, layer, col", FAMILIES, ids=IDS)
def test_flipped_accumulator_in_opening(world, matrix, layer, col):
    """An honest run whose opening carries one accumulator off by one, at a middle position."""
    c = world.challenge(world.served, "deep")
    meta, arrays = world.open(world.served, c)
    name = "z.lm" if matrix == "lm_head" else f"z.{layer}.{matrix}"
    add_acc(arrays, name, (len(arrays[name]) // 2, col), -1)
    assert_rejected(world.verify(world.served, c, meta, arrays), f"freivalds_{matrix}")


@pytest.mark.parametrize("matrix, layer, col", FAMILIES, ids=IDS)
def test_accumulator_aliased_modulo_the_freivalds_prime(world, matrix, layer, col):
    """The provider computes with z + P (P = 2^61 - 1, the Freivalds modulus) in one column,
    consistently: r.z == v.x mod P still holds, and on the LM head token `col`'s logit dominates.
    The packed opening (version 2) cannot carry z + P: the engine refuses to pack it, and its
    low w bytes (all a cheater can send) fail Freivalds."""
    p = tapped(world.qm, layer, matrix, col, P)
    s = world.serve(p)
    assert s.receipt["trace"] != world.served.receipt["trace"]  # the cheat changed the run
    if matrix == "lm_head":
        assert set(s.output) == {col}  # every output token forced to `col`
    assert_rejected(world.audit(s, p), f"freivalds_{matrix}")
    c = world.challenge(s, "deep")
    with p.running() as model, pytest.raises(OverflowError, match="more than"):
        build_opening(model, s.transcript, c)


# (matrix, layer, factor, code): the first check whose input the wrong scale changes
SCALES = [("qkv", 0, 2.0, "kv_mismatch"),  # K/V rows: same ints, doubled row scales
          ("o", 0, -1.0, "freivalds_gate_up"),  # h differs: the MLP input of the provider
          ("gate_up", 1, 2.0, "freivalds_down"),  # SwiGLU output differs
          ("down", 1, -1.0, "residual_chain"),  # the layer output itself
          ("lm_head", None, -1.0, "decode")]  # logits negated: other tokens sampled


@pytest.mark.parametrize("matrix, layer, factor, code", SCALES,
                         ids=[f"{m}-x{f:g}" for m, _, f, _ in SCALES])
def test_scale_changed_and_used(world, matrix, layer, factor, code):
    p = scaled(world.qm, layer, matrix, factor)
    s = world.serve(p)
    assert_rejected(world.audit(s, p), code)


# (channel of the fused qkv output, code): Q channels reach the attention output, K/V the cache
BIASES = [(3, "freivalds_o"), (64 + 3, "kv_mismatch"), (64 + 32 + 5, "kv_mismatch")]


@pytest.mark.parametrize("channel, code", BIASES, ids=["q", "k", "v"])
def test_qwen2_bias_changed(qwen_world, channel, code):
    w = qwen_world
    assert w.qm.cfg.q_size == 64 and w.qm.cfg.kv_size == 32
    p = biased(w.qm, 1, channel, 0.5)
    s = w.serve(p)
    assert_rejected(w.audit(s, p), code)


@pytest.fixture(params=["compiled-best", "compiled-plain", "numpy"])
def freivalds_route(request, monkeypatch):
    """The verifier's Freivalds dot products in the compiled core (its best SIMD route, or plain
    C) or in numpy float64 limbs: each must reach the same verdict for the same reason."""
    from commitllm.verifier import freivalds, native
    if request.param == "numpy":
        monkeypatch.setattr(freivalds, "USE_NATIVE", False)
    elif native.lib() is None:
        pytest.skip(f"no compiled core: {native.error()}")
    else:
        monkeypatch.setattr(freivalds, "USE_NATIVE", True)
        native.use_route(0 if request.param == "compiled-plain" else -1)
    yield request.param
    if native.lib() is not None:
        native.use_route(-1)


# a changed accumulator by these amounts: the smallest, the old 31-bit primes' alias, a 2^31
# carry (the compiled core's lo/hi split), and P itself (passes modulo P; a packed opening can
# only carry its low bytes, which do not)
DELTAS = [1, -1, 2**31 - 1, 2**31, P]


@pytest.mark.parametrize("tier", ["routine", "full"])
@pytest.mark.parametrize("delta", DELTAS, ids=str)
def test_forged_accumulator_rejected_by_every_freivalds_route(world, freivalds_route, tier, delta):
    """One opened accumulator moved by delta, in each matrix the tier opens, is refused on every
    Freivalds route; the honest opening is accepted on each."""
    c = world.challenge(world.served, tier)
    meta, arrays = world.open(world.served, c)
    honest = world.verify(world.served, c, meta, arrays)
    assert honest.accepted, honest.reason
    names = sorted(n for n in arrays if n.startswith("z.") and not n.endswith(".pos"))
    assert "z.lm" in names and len(names) >= 5
    for name in names:
        bad = {k: v.copy() for k, v in arrays.items()}
        z = acc(bad, name)
        z[len(z) // 2, z.shape[1] // 3] += delta
        set_acc(bad, name, z, wrap=True)  # beyond the width: its low bytes, as a cheater sends
        matrix = "lm_head" if name == "z.lm" else name.split(".")[-1]
        assert_rejected(world.verify(world.served, c, meta, bad), f"freivalds_{matrix}")


@pytest.fixture(params=["bridge-compiled", "bridge-spec"])
def bridge_route(request, monkeypatch):
    """The replay's elementwise steps in the compiled core (native/bridge.c) or in the numpy
    spec: every tamper must meet the same verdict for the same reason on both."""
    from commitllm.verifier import native
    from commitllm.verifier.native import bridge
    if request.param == "bridge-spec":
        monkeypatch.setattr(bridge, "lib", lambda: None)
    elif native.lib() is None:
        pytest.skip(f"no compiled core: {native.error()}")
    return request.param


def _bound(world, name: str) -> int:
    """K * qmax_x * qmax_w of the matrix an opened accumulator array belongs to."""
    cfg, prof = world.qm.cfg, world.qm.profile
    matrix = "lm_head" if name == "z.lm" else name.split(".")[-1]
    k = {"qkv": cfg.hidden_size, "o": cfg.q_size, "gate_up": cfg.hidden_size,
         "down": cfg.intermediate_size, "lm_head": cfg.hidden_size}[matrix]
    return k * prof.act_qmax * prof.matrix_qmax(matrix)


# accumulators beyond the range the verifier proves: just over the bound (finite, and it
# would dequantize to a plausible value), and the ends of what the packed width holds (2^53 and
# the int64 ends no longer have a representation: test_packed_width_holds_nothing_wider)
EDGES = ["bound+1", "-bound-1", "width-max", "width-min"]


@pytest.mark.parametrize("edge", EDGES)
def test_accumulator_beyond_its_bound_rejected_on_every_route(world, freivalds_route,
                                                               bridge_route, edge):
    """One opened accumulator set beyond K * qmax_x * qmax_w, in each matrix a full opening
    holds, is refused as that matrix's Freivalds failure, on every Freivalds and bridge route
    (the bound is checked inside the dot products now, before any residue is compared)."""
    c = world.challenge(world.served, "full")
    meta, arrays = world.open(world.served, c)
    honest = world.verify(world.served, c, meta, arrays)
    assert honest.accepted, honest.reason
    names = sorted(n for n in arrays if n.startswith("z.") and not n.endswith(".pos"))
    for name in names:
        b = _bound(world, name)
        top = 1 << (8 * arrays[name].shape[-1] - 1)
        value = {"bound+1": b + 1, "-bound-1": -b - 1, "width-max": top - 1,
                 "width-min": -top}[edge]
        bad = {k: v.copy() for k, v in arrays.items()}
        z = acc(bad, name)
        z[0, 1] = value
        set_acc(bad, name, z)
        matrix = "lm_head" if name == "z.lm" else name.split(".")[-1]
        v = world.verify(world.served, c, meta, bad)
        assert_rejected(v, f"freivalds_{matrix}")
        assert "exceeds the bound" in v.detail


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("tier", ["routine", "deep"])
def test_forged_accumulator_rejected_with_either_bridge(world, bridge_route, tier, threads):
    """The honest opening is accepted, and a one-off accumulator refused, with the bridge in C
    and in numpy, on one thread and with the layers replayed while the proofs are hashed; with
    a K/V row changed too, the Merkle proof is the reason on every route (it comes first)."""
    c = world.challenge(world.served, tier)
    meta, arrays = world.open(world.served, c)
    honest = world.verify(world.served, c, meta, arrays, threads=threads)
    assert honest.accepted, honest.reason
    for name in ("z.0.gate_up", "z.1.down", "z.lm"):
        if name not in arrays:
            continue
        bad = {k: v.copy() for k, v in arrays.items()}
        add_acc(bad, name, (-1, 2), 1)
        matrix = "lm_head" if name == "z.lm" else name.split(".")[-1]
        assert_rejected(world.verify(world.served, c, meta, bad, threads=threads),
                        f"freivalds_{matrix}")
        bad["kv.1.v"][0, 0, 0] ^= 1
        assert_rejected(world.verify(world.served, c, meta, bad, threads=threads), "merkle_kv")


def test_packed_width_holds_nothing_wider(world):
    """Each accumulator array's width is the fewest bytes that hold [-B, B] for its matrix's
    proven bound B, from the key: B itself packs, the first value beyond the width does not,
    and every byte pattern of that width decodes to a value inside it (so 2^53 or an int64 end
    cannot be sent at all; values between B and the width's end are refused by Freivalds)."""
    from commitllm.verifier.opening import acc_width, pack_acc, unpack_acc

    c = world.challenge(world.served, "full")
    _, arrays = world.open(world.served, c)
    for name in sorted(n for n in arrays if n.startswith("z.") and not n.endswith(".pos")):
        b, w = _bound(world, name), arrays[name].shape[-1]
        matrix = "lm_head" if name == "z.lm" else name.split(".")[-1]
        assert w == acc_width(world.qm.cfg, world.qm.profile, matrix) < 8
        assert b < 1 << (8 * w - 1) and b >= 1 << (8 * w - 9)  # the fewest bytes
        assert unpack_acc(pack_acc(np.array([b, -b]), w)).tolist() == [b, -b]
        for v in (1 << (8 * w - 1), -(1 << (8 * w - 1)) - 1, 2**53, 2**63 - 1, -2**63):
            with pytest.raises(OverflowError):
                pack_acc(np.array([v]), w)
        every = np.arange(256, dtype=np.uint8)[:, None].repeat(w, 1)  # 0x00.., 0x01.., 0xff..
        got = unpack_acc(every)
        assert got.min() >= -(1 << (8 * w - 1)) and got.max() < 1 << (8 * w - 1)
