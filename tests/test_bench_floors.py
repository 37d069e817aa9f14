"""bench/floors.py: every compiled call of a verification timed as run and warm, the routines
restored afterwards, only pure routines repeated, a repeat that answers otherwise refused; and
bench/anchors.py's scaling of those figures on a hand-computed case."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.append(str(Path(__file__).resolve().parents[1]))  # `bench`, last (kernels/ unshadowed)

from bench import anchors, floors
from commitllm.verifier import native


def _fake_lib(monkeypatch, **fns):
    so = SimpleNamespace(**fns)
    monkeypatch.setattr(native, "lib", lambda: so)
    return so


def test_pure_routines_repeat_and_impure_ones_do_not(monkeypatch):
    seen = {"ly_pre": 0, "b3_chain": 0}

    def ly_pre(*_a):
        seen["ly_pre"] += 1
        return 0

    def b3_chain(*_a):  # updates its chain in place: a repeat would hash the chain again
        seen["b3_chain"] += 1
        return 0
    so = _fake_lib(monkeypatch, ly_pre=ly_pre, b3_chain=b3_chain)
    with floors.compiled_calls(repeats=3) as calls:
        assert so.ly_pre(1, 2) == 0 and so.b3_chain(b"x") == 0
    assert seen == {"ly_pre": 4, "b3_chain": 1}
    assert so.ly_pre is ly_pre and so.b3_chain is b3_chain  # restored
    g = calls.by_group()
    assert g["layer"]["calls"] == 1 and g["receipt"]["calls"] == 1
    assert g["receipt"]["warm_ms"] == g["receipt"]["run_ms"]  # not repeated: as run
    assert calls.repeat_s > 0


def test_calls_under_the_decode_replay_are_counted_once_per_token(monkeypatch):
    so = _fake_lib(monkeypatch, fv_acc_linear=lambda *_a: 0)

    def replay_decode():  # the verifier's frame name: the LM head's linear, once per token
        return so.fv_acc_linear()
    with floors.compiled_calls(repeats=1) as calls:
        so.fv_acc_linear()  # a MoE layer's one-pass linear
        replay_decode()
        replay_decode()
    g = calls.by_group()
    assert g["freivalds"]["calls"] == 1 and g[floors.DECODE]["calls"] == 2


def test_the_one_call_layer_splits_its_attention_off(monkeypatch):
    """ly_layer times its attn_layer part itself (its struct's attn_seconds): as run, that part
    is counted under attention and the rest under the layer; warm, ly_pre, attn_layer and ly_post
    are repeated alone on the struct the call filled in (the layer's warm figure: ly_pre's and
    ly_post's)."""
    import ctypes
    import time

    class Part(ctypes.Structure):
        _fields_ = [("heads", ctypes.c_int64), ("n", ctypes.c_int64)]

    class Args(ctypes.Structure):
        _fields_ = [("pre", Part), ("att", Part), ("post", Part),
                    ("attn_seconds", ctypes.c_double)]
    seen = []

    def part(name: str, sleep: float):
        def fn(ref, *rest):
            seen.append((name, ctypes.addressof(ref._obj), rest))
            time.sleep(sleep)
            return 0
        return fn

    def ly_layer(ref):
        time.sleep(0.008)
        ref._obj.attn_seconds = 0.004
        return 0
    so = _fake_lib(monkeypatch, ly_layer=ly_layer, ly_pre=part("ly_pre", 0.001),
                   attn_layer=part("attn_layer", 0.002), ly_post=part("ly_post", 0.001))
    a = Args(att=Part(3, 2))
    with floors.compiled_calls(repeats=2) as calls:
        assert so.ly_layer(ctypes.byref(a)) == 0
    # each part twice, on its own sub-struct of the call's arguments, attn_layer over all rows
    assert [n for n, _, _ in seen] == ["ly_pre"] * 2 + ["ly_post"] * 2 + ["attn_layer"] * 2
    assert {(n, at) for n, at, _ in seen} == {
        ("ly_pre", ctypes.addressof(a.pre)), ("ly_post", ctypes.addressof(a.post)),
        ("attn_layer", ctypes.addressof(a.att))}
    assert {r for n, _, r in seen if n == "attn_layer"} == {(0, 6, 1)}
    g = calls.by_group()
    assert g["attention"]["calls"] == g["layer"]["calls"] == 1
    assert g["attention"]["run_ms"] == 4.0 and 2.0 <= g["attention"]["warm_ms"] < 20
    assert 4.0 <= g["layer"]["run_ms"] < 40 and 2.0 <= g["layer"]["warm_ms"] < 20
    seen.clear()  # a call that did not pass: not repeated, as run for both parts
    so = _fake_lib(monkeypatch, ly_layer=lambda ref: 1, ly_pre=part("ly_pre", 0),
                   attn_layer=part("attn_layer", 0), ly_post=part("ly_post", 0))
    with floors.compiled_calls(repeats=2) as calls:
        assert so.ly_layer(ctypes.byref(a)) == 1
    assert not seen
    g = calls.by_group()
    assert g["attention"]["warm_ms"] == g["attention"]["run_ms"]
    assert g["layer"]["warm_ms"] == g["layer"]["run_ms"]


def test_a_repeat_that_answers_otherwise_is_refused(monkeypatch):
    codes = iter([0, 1])
    so = _fake_lib(monkeypatch, attn_layer=lambda *_a: next(codes))
    fn = so.attn_layer
    with pytest.raises(RuntimeError, match="attn_layer answered 1 on a repeat"):
        with floors.compiled_calls(repeats=1):
            so.attn_layer()
    assert so.attn_layer is fn  # restored on the way out


def test_no_compiled_core_no_floors(monkeypatch):
    monkeypatch.setattr(native, "lib", lambda: None)
    assert floors.floor_figures(lambda: None, 1, 1) is None


def test_scale_floors_per_layer_and_once():
    # 2 layers measured, per challenged token: layer 3 / 2 ms (as run / warm), a MoE layer's
    # one-pass linears (freivalds) 0.5 / 0.25 and bridge calls 0.5 / 0.25, attention 4 / 3,
    # merkle 1 / 0.5, range 0.5 / 0.25, the LM head (decode) 1 / 0.5, receipt 0.25 / 0.25
    pp = {"layer": {"run_ms": 3.0, "warm_ms": 2.0}, "attention": {"run_ms": 4.0, "warm_ms": 3.0},
          "freivalds": {"run_ms": 0.5, "warm_ms": 0.25},
          "bridge": {"run_ms": 0.5, "warm_ms": 0.25},
          "merkle": {"run_ms": 1.0, "warm_ms": 0.5}, "range": {"run_ms": 0.5, "warm_ms": 0.25},
          "decode": {"run_ms": 1.0, "warm_ms": 0.5},
          "receipt": {"run_ms": 0.25, "warm_ms": 0.25}}
    f = anchors.scale_floors({"per_position": pp, "layers": 2, "glue_ms_per_position": 1.5,
                              "repeats": 3, "groups": 2}, layers=32)
    assert f["per_layer_ms"]["freivalds_bridge"] == {"run_ms": 2.0, "warm_ms": 1.25}
    # results from before the decode group: their freivalds and bridge groups were once per token
    old = anchors.scale_floors({"per_position": pp, "layers": 2, "glue_ms_per_position": 1.5,
                                "repeats": 3}, layers=32)
    assert old["per_layer_ms"]["freivalds_bridge"] == {"run_ms": 1.5, "warm_ms": 1.0}
    assert f["per_layer_ms"]["range"] == {"run_ms": 0.25, "warm_ms": 0.125}
    assert f["once_ms"] == {"run_ms": 1.25, "warm_ms": 0.75}
    # dyadic fractions throughout: the float arithmetic is exact, compared with ==
    assert f["compiled_ms"] == {"run_ms": 32 * 4.75 + 1.25, "warm_ms": 32 * 3.125 + 0.75}
    assert f["glue_ms"] == 1.5


@pytest.mark.skipif(native.lib() is None, reason="needs the compiled core")
def test_a_real_verification_under_the_timers(tmp_path):
    """The tiny shape end to end through tier_figures(floors=True): accepted, every per-layer
    part timed, the routines the same objects afterwards."""
    from bench.protocol import sign, tier_figures

    so = native.lib()
    before = {n: getattr(so, n) for n in ("ly_layer", "ly_pre", "attn_layer", "b3_rows",
                                          "br_minmax")}
    setup, _ = anchors.build_setup("tiny", 2)
    signed, _ = sign(setup, {"prompt": "floors"}, list(range(2, 20)), 3)
    t = tier_figures(setup, signed, "routine", 1, nonce=b"\x01" * 16, one_core=True, floors=True)
    f = t["floors"]
    assert t["accepted"] and f["accepted"] and f["positions"] == t["positions"]
    for g in ("layer", "attention", "merkle", "range"):
        assert f["per_position"][g]["calls"] >= 1
        assert f["per_position"][g]["run_ms"] > 0 and f["per_position"][g]["warm_ms"] > 0
    assert f["glue_ms_per_position"] >= 0
    assert {n: getattr(so, n) for n in before} == before


@pytest.mark.skipif(native.lib() is None, reason="needs the compiled core")
def test_read_rate_and_the_bytes_freivalds_bridge_reads():
    assert floors.read_rate(mib=16, runs=1) > 0
    # one layer of the key 4000 B over 4 tokens, 2 layers x 4 tokens of 16000 accumulator bytes
    t = {"positions": 4, "layers": 2,
         "breakdown_bytes": {"layer_acc": 12000, "kv_sample_acc": 4000, "kv_rows": 99}}
    assert anchors.fb_read_bytes({"key_layer_bytes": 4000}, t) == 1000 + 2000
    assert anchors.fb_read_bytes({}, t) is None
