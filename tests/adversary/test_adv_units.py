"""Attacks on the verifier's per-layer units (verify._units): a layer's K/V value ranges, its
trace proofs and its replay checked together, on `threads` threads, after check_types with the
K/V ranges deferred.

The rule under attack: the units may only answer "every check passed"; on anything else the
canonical order (verify._in_order: types, Merkle, embedding, layers; then the decode) decides. So
the verdict, its reason, its detail and the checks listed must be the same with verify.UNITS on
(1, 2 and 3 threads) and off, for openings that fail in several places at once: a failure the
units meet first (a later layer's replay, a K/V range in the last layer) must never be
reported before the one the canonical order meets first (an earlier type, range or proof).

* Single tampers of each kind the units reorder: a K/V value beyond kv_qmax (deferred range) in
  the first and the last challenged layer, a K/V row byte (Merkle), a residual row (Merkle),
  an accumulator byte (the replay), an embedding row, a K/V scale (a range check that is not
  deferred), and the LM head's accumulators (the decode, a task of the units' pool too).
* Pairs: a replay failure in an early layer with a Merkle failure in a later one (Merkle
  first), a deferred K/V range failure in the last layer with a Merkle failure in the first
  (the range: types come first), a replay failure with an embedding failure (embedding first).
* An honest opening: the units answer (the canonical route is never called) with the checks
  and timing parts the canonical route lists.
* A failed unit stops the others at their next step (an attacker's opening is not replayed
  twice in full).
* A forked child verifies with threads after its parent did (the process's pools are not
  inherited: before the fix the child waited forever on its parent's pool threads).
"""

from __future__ import annotations

import pytest

from commitllm.verifier import verify as verify_mod
from accs import add_acc

THREADS = (1, 2, 3)


@pytest.fixture(scope="module")
def flow(tiny_llama):
    from test_protocol import SAMPLED, Flow, _qm

    return Flow(_qm(tiny_llama, "w8a16"), params=SAMPLED, max_tokens=10)


@pytest.fixture(scope="module")
def opened(flow):
    c = flow.challenge("full")
    meta, arrays = flow.open(c)
    return c, meta, arrays


def _verdicts(flow, c, meta, arrays, monkeypatch) -> list:
    out = []
    for units, threads in [(True, t) for t in THREADS] + [(False, t) for t in THREADS]:
        monkeypatch.setattr(verify_mod, "UNITS", units)
        v = flow.verify(c, meta, arrays, threads=threads)
        out.append((v.accepted, v.reason, v.detail, v.checks))
    monkeypatch.setattr(verify_mod, "UNITS", True)
    return out


def _layers(c) -> list[int]:
    return sorted(c["layers"])


def _kv_range(flow, arrays, l: int) -> None:
    k = arrays[f"kv.{l}.k"]
    k[-1, 0, 0] = flow.qm.profile.kv_qmax + 1 if k.dtype.itemsize > 1 else -128


def _kv_byte(arrays, l: int) -> None:
    arrays[f"kv.{l}.v"][0, 0, 0] ^= 1


def _resid(arrays, l: int) -> None:
    arrays[f"resid.{l}.rows"][0, 0] += 1.0


def _acc(arrays, l: int) -> None:
    add_acc(arrays, f"z.{l}.o", (0, 0), 1)


def _embed(flow, arrays) -> None:
    arrays["embed.q"][0] = flow.qm.embed.q[(int(arrays["embed.ids"][0]) + 1)
                                           % flow.qm.cfg.vocab_size]


def _scale(arrays, l: int) -> None:
    arrays[f"kv.{l}.sk"][0, 0] = 0.0


def _lm(arrays) -> None:
    add_acc(arrays, "z.lm", (0, 0), 1)


CASES = {
    "kv_range_first": (lambda f, a, ls: _kv_range(f, a, ls[0]), "opening_range"),
    "kv_range_last": (lambda f, a, ls: _kv_range(f, a, ls[-1]), "opening_range"),
    "kv_byte": (lambda f, a, ls: _kv_byte(a, ls[-1]), "merkle_kv"),
    "resid_row": (lambda f, a, ls: _resid(a, ls[-1]), "merkle_residual"),
    "accumulator": (lambda f, a, ls: _acc(a, ls[0]), "freivalds_o"),
    "embedding": (lambda f, a, ls: _embed(f, a), "merkle_embedding"),
    "kv_scale": (lambda f, a, ls: _scale(a, ls[0]), "opening_range"),
    "lm_head": (lambda f, a, ls: _lm(a), "freivalds_lm_head"),
    # pairs: the canonical order's first failure wins, not the one a unit meets first
    "replay_early_merkle_late": (lambda f, a, ls: (_acc(a, ls[0]), _kv_byte(a, ls[-1])),
                                 "merkle_kv"),
    "merkle_first_range_last": (lambda f, a, ls: (_kv_byte(a, ls[0]), _kv_range(f, a, ls[-1])),
                                "opening_range"),
    "replay_and_embedding": (lambda f, a, ls: (_acc(a, ls[-1]), _embed(f, a)),
                             "merkle_embedding"),
    "range_and_replay": (lambda f, a, ls: (_acc(a, ls[0]), _kv_range(f, a, ls[0])),
                         "opening_range"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_units_verdict_is_the_canonical_one(flow, opened, case, monkeypatch):
    c, meta, arrays = opened
    arrays = {k: v.copy() for k, v in arrays.items()}
    edit, code = CASES[case]
    edit(flow, arrays, _layers(c))
    calls = []
    real = verify_mod._in_order
    monkeypatch.setattr(verify_mod, "_in_order", lambda *a, **k: calls.append(1) or real(*a, **k))
    got = _verdicts(flow, c, meta, arrays, monkeypatch)
    assert all(g == got[0] for g in got), [g[1:3] for g in got]
    assert got[0][0] is False and got[0][1] == code, got[0][1:3]
    assert len(calls) == 2 * len(THREADS)  # every verdict is the canonical route's


def test_honest_opening_the_units_answer(flow, opened, monkeypatch):
    c, meta, arrays = opened
    got = _verdicts(flow, c, meta, arrays, monkeypatch)
    assert all(g == got[0] for g in got) and got[0][0] is True, got[0][1:3]

    def refuse(*a, **k):
        raise AssertionError("the canonical route ran on an honest opening")
    monkeypatch.setattr(verify_mod, "_in_order", refuse)
    for threads in THREADS:
        v = flow.verify(c, meta, arrays, threads=threads)
        assert v.accepted and v.checks == got[0][3], (v.reason, v.detail)
        assert v.timing["merkle"] > 0 and v.timing["attention"] > 0 and v.timing["freivalds"] > 0


def test_a_kv_range_is_checked_before_the_layer_reads_it(flow, opened, monkeypatch):
    """The deferred range check runs in the unit before the layer's proofs and replay: a K/V
    value beyond kv_qmax never reaches the hashing or the compiled attention through the units
    (the canonical route then rejects it in check_types)."""
    c, meta, arrays = opened
    arrays = {k: v.copy() for k, v in arrays.items()}
    l = _layers(c)[-1]
    _kv_range(flow, arrays, l)
    seen = []
    real_proofs, real_replay = verify_mod._check_proofs, verify_mod.replay_layer
    monkeypatch.setattr(verify_mod, "_check_proofs",
                        lambda proofs: seen.extend(p[1] for p in proofs) or real_proofs(proofs))
    monkeypatch.setattr(verify_mod, "replay_layer",
                        lambda ctx, layer, *a: seen.append(("replay", layer))
                        or real_replay(ctx, layer, *a))
    def canonical(*a, **k):
        raise verify_mod.Reject("canonical", "the units did not answer")
    monkeypatch.setattr(verify_mod, "_in_order", canonical)
    for threads in (1, 2):
        seen.clear()
        v = flow.verify(c, meta, arrays, threads=threads)
        assert v.reason == "canonical", (v.reason, v.detail)
        assert l not in seen and ("replay", l) not in seen, seen
        if threads == 1:
            # in order, the earlier layers' proofs ran (the hooks are live); on 2 threads the
            # failing unit may stop the others before any proof, so nothing else is asserted
            assert seen, seen


def test_layer_threads_lower_the_switch_interval_only_during_the_call(flow, opened, monkeypatch):
    import sys

    c, meta, arrays = opened
    before, seen = sys.getswitchinterval(), []
    real = verify_mod.replay_layer
    monkeypatch.setattr(verify_mod, "replay_layer",
                        lambda *a: seen.append(sys.getswitchinterval()) or real(*a))
    for threads in (1, 2):
        seen.clear()
        assert flow.verify(c, meta, arrays, threads=threads).accepted
        # the interpreter keeps the interval in whole microseconds
        want = before if threads == 1 else round(verify_mod.SWITCH_S * 1e6)
        assert seen and {x if threads == 1 else round(x * 1e6) for x in seen} == {want}
        assert sys.getswitchinterval() == before


def test_a_failed_unit_stops_the_others(flow, opened, monkeypatch):
    """A rejected opening costs little more than the canonical route: once one unit fails, the
    others stop at their next step (an attacker's opening is not replayed twice in full)."""
    import threading
    import time

    c, meta, arrays = opened
    seen, marks = [], []
    real_proofs, real_replay, real_order = (verify_mod._check_proofs, verify_mod.replay_layer,
                                            verify_mod._in_order)

    failing = threading.Event()

    def decode_fails(*a, **k):
        failing.set()
        raise verify_mod.Reject("decode_tampered", "the decode failed")

    def slow_proofs(proofs):
        # the decode task is taken before any layer's: wait for its failure, then give its
        # unit time to flag it (a fixed sleep alone lost this race on a loaded 2-core machine)
        failing.wait(30)
        time.sleep(0.05)
        return real_proofs(proofs)
    monkeypatch.setattr(verify_mod, "replay_decode", decode_fails)
    monkeypatch.setattr(verify_mod, "_check_proofs", slow_proofs)
    monkeypatch.setattr(verify_mod, "replay_layer",
                        lambda ctx, l, *a: seen.append((bool(marks), l)) or real_replay(ctx, l, *a))
    monkeypatch.setattr(verify_mod, "_in_order", lambda *a, **k: marks.append(1)
                        or real_order(*a, **k))
    v = flow.verify(c, meta, arrays, threads=2)
    assert v.reason == "decode_tampered" and marks
    assert [l for canonical, l in seen if not canonical] == []  # no unit replayed a layer
    assert [l for canonical, l in seen if canonical] == sorted(c["layers"])


def test_a_forked_child_verifies_with_threads_after_its_parent_did(flow, opened):
    """The layer pools (and the compiled core's row-split pools) are the process's; a forked
    child has none of their threads, so it starts its own instead of waiting on the parent's."""
    import os
    import time

    c, meta, arrays = opened
    assert flow.verify(c, meta, arrays, threads=2).accepted  # the parent's pools exist now
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only if a threaded verification completes
        try:
            code = 0 if flow.verify(c, meta, arrays, threads=2).accepted else 1
        except BaseException:
            code = 2
        os._exit(code)
    deadline = time.monotonic() + 120
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            raise AssertionError("the forked child hung on its parent's pools")
        time.sleep(0.05)
    assert os.waitstatus_to_exitcode(status) == 0
