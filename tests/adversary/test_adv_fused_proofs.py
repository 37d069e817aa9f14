"""Tamper family: a layer's Merkle proofs and K/V range check in one compiled call per proof
group (hash.c's b3_proof, verify._prepare_proofs, prepared before the layer units run).

The call folds the deferred K/V range check into the leaf hashing, walks the multiproof and
compares the root; the unit route takes only "passed" from it, and anything else goes to the
canonical checks, which decide with their reason. A dishonest provider would want a value the
range check exists for (one the engine committed consistently: every proof holds) to slip
through the folded check; a man in the middle edits opened K/V values, scales, residual rows or
proof hashes. Each opening is verified with the folded call and without it (the unit then runs
check_range and the proofs from Python): the verdict, reason, detail and checks must be the
same and the expected rejection, in every profile, at the routine and full tiers, on 1 and 2
threads. With the ranges left out of the folded call, the committed cheat is ACCEPTED: the
fold is what stops it on the unit route."""

from __future__ import annotations

import numpy as np
import pytest
from advcheats import kv_beyond_qmax
from commitllm.verifier import commitment, native
from commitllm.verifier import verify as verify_mod

pytestmark = pytest.mark.skipif(native.lib() is None, reason="the compiled core is not built")


def _verdicts(w, s, c, meta, arrays, monkeypatch, threads):
    """(folded, unfolded) verdicts and the folded calls' answers."""
    answers, run = [], native.proof_run

    def spied(p, *a, **k):
        answers.append(run(p, *a, **k))
        return answers[-1]
    out = []
    for folded in (True, False):
        with monkeypatch.context() as mp:
            mp.setattr(native, "proof_run", spied)
            if not folded:
                mp.setattr(verify_mod, "_prepare_proofs", lambda *a: None)
            v = w.verify(s, c, meta, {k: a.copy() for k, a in arrays.items()}, threads=threads)
        out.append((v.accepted, v.reason, v.detail, v.checks))
    return out, answers


@pytest.mark.parametrize("threads", [1, 2])
def test_a_committed_value_beyond_the_range_is_caught_by_the_folded_check(pworld, monkeypatch,
                                                                          threads):
    s, c, meta, arrays = kv_beyond_qmax(pworld)
    got, answers = _verdicts(pworld, s, c, meta, arrays, monkeypatch, threads)
    assert got[0] == got[1] and not got[0][0] and got[0][1] == "opening_range", got[0][1:3]
    assert answers and False in answers  # the folded call ran and said no
    # mutation: the ranges dropped from the folded call -> the unit route accepts the cheat
    prepare = commitment.prepare_proof
    monkeypatch.setattr(verify_mod, "prepare_proof",
                        lambda *a: prepare(*a[:7], None))
    v = pworld.verify(s, c, meta, arrays, threads=threads)
    assert v.accepted, (v.reason, v.detail)


def _flip_k(a, l):
    k = a[f"kv.{l}.k"]
    k[1, 0, 0] = k[1, 0, 0] - 1 if k[1, 0, 0] > 0 else k[1, 0, 0] + 1  # still in range


def _flip_bits(name):
    def edit(a, l):
        b = a[name.format(l=l)].view(np.uint8).reshape(-1)
        b[b.size // 2] ^= 0x10
    return edit


# (name, edit, code): a man in the middle's edits of an honest opening
EDITS = [
    ("k-value-in-range", _flip_k, "merkle_kv"),
    ("sk-bit", _flip_bits("kv.{l}.sk"), "merkle_kv"),
    ("v-bit", _flip_bits("kv.{l}.v"), None),  # a bit of V may leave the range: either code
    ("kv-proof-bit", _flip_bits("kv.{l}.proof"), "merkle_kv"),
    ("resid-proof-bit", _flip_bits("resid.{l}.proof"), "merkle_residual"),
    ("resid-row-ulp", lambda a, l: a[f"resid.{l}.rows"].__setitem__(
        (0, 1), np.nextafter(a[f"resid.{l}.rows"][0, 1], np.float32(np.inf))), "merkle_residual"),
]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("tier", ["routine", "full"])
@pytest.mark.parametrize("name,edit,code", EDITS, ids=[e[0] for e in EDITS])
def test_edited_openings_get_the_same_verdict_folded_or_not(pworld, monkeypatch, name, edit,
                                                           code, tier, threads):
    kind = "resid" if name.startswith("resid") else "kv"
    for i in range(20):  # a proof edit needs a layer with proof hashes (the key decides)
        c = pworld.challenge(pworld.served, tier, nonce=i.to_bytes(16, "little"))
        meta, arrays = pworld.open(pworld.served, c, pworld.honest)
        layers = [l for l in reversed(c["layers"])
                  if "proof" not in name or arrays[f"{kind}.{l}.proof"].size]
        if layers:
            break
    else:
        pytest.skip("every challenge opened every leaf: no proof hashes to edit")
    arrays = {k: a.copy() for k, a in arrays.items()}
    edit(arrays, layers[0])
    got, answers = _verdicts(pworld, pworld.served, c, meta, arrays, monkeypatch, threads)
    assert got[0] == got[1], (got[0][1:3], got[1][1:3])
    assert not got[0][0], name
    assert got[0][1] == code if code else got[0][1] in ("merkle_kv", "opening_range"), got[0][1:3]
    assert answers  # the folded calls ran (another unit may have stopped the route first)


@pytest.mark.parametrize("tier", ["routine", "full"])
def test_the_honest_opening_takes_the_folded_call_for_every_group(pworld, monkeypatch, tier):
    c = pworld.challenge(pworld.served, tier)
    meta, arrays = pworld.open(pworld.served, c, pworld.honest)
    got, answers = _verdicts(pworld, pworld.served, c, meta, arrays, monkeypatch, 1)
    assert got[0] == got[1] and got[0][0], got[0][1:3]
    groups = sum(1 for k in arrays if k.endswith(".proof") and k.split(".")[0] in ("kv", "resid"))
    assert len(answers) == groups and all(answers), (len(answers), groups)
