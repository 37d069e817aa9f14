"""The compiled calls of one verification, each timed as it ran and again with its data in cache.

A goal the verifier misses is either overhead (Python and numpy around the compiled core, memory
stalls) or a floor (the arithmetic a call must do). `compiled_calls()` tells them apart on a real
verification: while it is active every call into the compiled core (verifier/native) is timed as
the verifier makes it ("as run": cold caches, the opening's bytes coming from memory), and each
call of a pure routine is then repeated `repeats` times on the very same arguments, the fastest
repeat kept ("warm": the routine's arithmetic with its inputs in cache, no Python). So a part's
time splits into

    warm (its compiled arithmetic) + (as run - warm) (waiting on memory) + glue (the rest),

all measured. Only routines that read their inputs and write separate outputs are repeated (a
repeat gives the same bytes again); the rest (b3_chain updates its chain in place, the route
setters) are timed as run only. The verdict of a verification under compiled_calls() is the
verifier's, but its own timing is not a figure: the repeats run inside the timed calls.
"""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

# routine -> the part of the audit it serves (what bench/anchors.py reports per layer-token)
GROUPS = {
    "ly_pre": "layer", "ly_post": "layer",  # Freivalds + bridge of a dense layer, fused route
    # the whole dense layer in one call: its attn_layer seconds (the call measures them) are
    # counted under "ly_layer:attention", the rest (the gathers, Freivalds + bridge, the
    # comparison) under ly_layer
    "ly_layer": "layer", "ly_layer:attention": "attention",
    "attn_layer": "attention", "attn_fused_rows": "attention", "attn_fused": "attention",
    "attn_coefs": "attention", "attn_pack": "attention", "dequant_planes": "attention",
    "b3_rows": "merkle", "b3_multiproof": "merkle",
    # a proof group in one call: its leaves, the K/V range check folded into their hashing, the
    # walk and the root (the unit route); without it the range check is br_minmax's, before
    "b3_proof": "merkle",
    "br_minmax": "range",  # the K/V value range check before hashing
    "fv_acc_linear": "freivalds", "fv_dot": "freivalds", "acc_unpack": "freivalds",
    "br_rmsnorm": "bridge", "br_quantize": "bridge", "br_dequant": "bridge",
    "br_swiglu": "bridge", "br_rope": "bridge", "gemm_i16i8": "bridge",
    "b3_chain": "receipt",
}
# routines whose outputs are separate from their inputs: repeating one rewrites the same bytes
PURE = frozenset(GROUPS) - {"b3_chain"}
# ly_layer runs ly_pre, attn_layer and ly_post on one struct (layer.h): as run, its attention
# part is the seconds it measures itself (attn_seconds), counted under "ly_layer:attention"; warm,
# each part is repeated alone on the struct the call left filled in, so that the attention does
# not sweep the post-attention part's inputs out of cache between its repeats
LAYER_PARTS = ("ly_pre", "attn_layer", "ly_post")
# a call made while the verifier replays the LM head and decode policy (once per token, not per
# layer) is counted in this group whatever the routine
DECODE = "decode"
_DECODE_FRAMES = frozenset({"replay_decode", "_replay_decode"})


def _in_decode() -> bool:
    """Whether a frame of the verifier's decode replay is on the calling stack."""
    f = sys._getframe(1)
    while f is not None:
        if f.f_code.co_name in _DECODE_FRAMES:
            return True
        f = f.f_back
    return False


@dataclass
class Calls:
    """Seconds per routine: as run (every call) and warm (each call's fastest repeat)."""

    run_s: dict = field(default_factory=dict)
    warm_s: dict = field(default_factory=dict)
    count: dict = field(default_factory=dict)
    repeat_s: float = 0.0  # the repeats' own seconds (not the verification's)

    def add(self, name: str, run: float, warm: float | None, decode: bool = False) -> None:
        key = (name, decode)
        self.run_s[key] = self.run_s.get(key, 0.0) + run
        self.count[key] = self.count.get(key, 0) + 1
        if warm is not None:
            self.warm_s[key] = self.warm_s.get(key, 0.0) + warm

    def by_group(self) -> dict:
        """{group: {"calls", "run_ms", "warm_ms"}}; warm_ms is run_ms for routines not repeated;
        calls under the decode replay in group DECODE."""
        out: dict = {}
        for key, run in self.run_s.items():
            name, decode = key
            g = out.setdefault(DECODE if decode else GROUPS[name],
                               {"calls": 0, "run_ms": 0.0, "warm_ms": 0.0})
            g["calls"] += self.count[key]
            g["run_ms"] += 1e3 * run
            g["warm_ms"] += 1e3 * self.warm_s.get(key, run)
        return out


@contextmanager
def compiled_calls(repeats: int = 3):
    """Time every call into the compiled core while active (see the module docstring); yields
    a Calls. One thread only: the routines are wrapped on the shared library object, so the
    caller keeps the verification on one thread (threads=1, native.thread_budget(1))."""
    from commitllm.verifier import native

    so = native.lib()
    if so is None:
        raise RuntimeError(f"the floors need the compiled core: {native.error()}")
    calls = Calls()
    saved = {}
    for name in GROUPS:
        fn = getattr(so, name, None)
        if fn is None:
            continue
        saved[name] = fn

        def timed(*args, _fn=fn, _name=name):
            decode = _in_decode()
            t0 = time.perf_counter()
            code = _fn(*args)
            run = time.perf_counter() - t0
            if _name == "ly_layer":
                _layer_parts(calls, saved, args[0]._obj, code, run, repeats, decode)
                return code
            warm = None
            if _name in PURE and repeats > 0:
                warm = _fastest(calls, lambda: _fn(*args), code, _name, repeats)
            calls.add(_name, run, warm, decode)
            return code
        setattr(so, name, timed)
    try:
        yield calls
    finally:
        for name, fn in saved.items():
            setattr(so, name, fn)


def _fastest(calls: Calls, call, code, name: str, repeats: int) -> float:
    """The fastest of `repeats` runs of call(), each of which must answer `code`."""
    best = None
    for _ in range(repeats):
        t1 = time.perf_counter()
        again = call()
        t1 = time.perf_counter() - t1
        calls.repeat_s += t1
        best = t1 if best is None else min(best, t1)
        if again != code:
            raise RuntimeError(f"{name} answered {again} on a repeat, {code} first")
    return best


def _layer_parts(calls: Calls, raw: dict, a, code, run: float, repeats: int,
                 decode: bool) -> None:
    """One ly_layer call as run (its attention part: attn_seconds, which it measures) and warm:
    when it passed, each of its three parts repeated alone on the struct it left filled in (the
    raw routines: nothing timed twice); its warm layer part is then ly_pre's and ly_post's (the
    row gathers and the output comparison, a few microseconds, are left out). A call that did
    not pass is not repeated (a part may not have run): as run for both."""
    import ctypes

    warm, warm_att = run - a.attn_seconds, a.attn_seconds  # (not repeated: as run)
    if code == 0 and repeats > 0 and all(n in raw for n in LAYER_PARTS):
        rows = a.att.heads * a.att.n
        warm = (_fastest(calls, lambda: raw["ly_pre"](ctypes.byref(a.pre)), 0, "ly_pre",
                         repeats)
                + _fastest(calls, lambda: raw["ly_post"](ctypes.byref(a.post)), 0, "ly_post",
                           repeats))
        warm_att = _fastest(calls, lambda: raw["attn_layer"](ctypes.byref(a.att), 0, rows, 1),
                            0, "attn_layer", repeats)
    calls.add("ly_layer:attention", a.attn_seconds, warm_att, decode)
    calls.add("ly_layer", run - a.attn_seconds, warm, decode)


def floor_figures(run_verify, positions: int, layers: int, repeats: int = 3,
                  runs: int = 3) -> dict | None:
    """`runs` verifications (run_verify() -> Verdict, on one thread) under compiled_calls: per
    group and challenged position the compiled milliseconds as run and warm, the Python / numpy
    glue (a verification's wall time less every compiled call as run and less the repeats) and
    the verdict; each figure the least of the runs (the machine is shared). None without the
    compiled core (nothing to time)."""
    from commitllm.verifier import native

    if native.lib() is None:
        return None
    runs, best, glue, verdicts = max(1, runs), {}, [], set()
    for _ in range(runs):
        with native.thread_budget(1), compiled_calls(repeats) as calls:
            t0 = time.perf_counter()
            v = run_verify()
            wall = time.perf_counter() - t0
        verdicts.add(bool(v.accepted))
        groups = calls.by_group()
        glue.append(1e3 * (wall - calls.repeat_s) - sum(g["run_ms"] for g in groups.values()))
        for k, g in groups.items():
            b = best.setdefault(k, dict(g))
            for w in ("run_ms", "warm_ms"):
                b[w] = min(b[w], g[w])
    if len(verdicts) != 1:
        raise RuntimeError("the verdict changed between verifications under the timers")
    per = {k: {"calls": g["calls"], "run_ms": g["run_ms"] / positions,
               "warm_ms": g["warm_ms"] / positions} for k, g in best.items()}
    return {"accepted": verdicts.pop(), "positions": positions, "layers": layers,
            "repeats": repeats, "runs": runs, "per_position": per, "groups": 2,
            "compiled_ms_per_position": sum(g["run_ms"] for g in per.values()),
            "glue_ms_per_position": max(min(glue), 0.0) / positions}


def read_rate(mib: int = 256, runs: int = 3) -> float | None:
    """The machine's read rate from memory, GB/s: the compiled min/max pass (the K/V range
    check's) over `mib` MiB of int16 not in cache (another 64 MiB written before each run sweeps
    the caches), the fastest of `runs`. None without the compiled core."""
    import numpy as np

    from commitllm.verifier import native
    from commitllm.verifier.native.bridge import minmax

    if native.lib() is None:
        return None
    a = np.ones(mib << 19, np.int16)  # written: its pages are mapped before timing
    sweep = np.empty(64 << 20, np.uint8)
    best = None
    for _ in range(max(1, runs)):
        sweep.fill(1)
        t0 = time.perf_counter()
        minmax(a)
        dt = time.perf_counter() - t0
        best = dt if best is None else min(best, dt)
    return a.nbytes / best / 1e9
