"""Detection probability of cheating providers under routine-tier audits.

A cheat confined to some layers or positions is caught only when a challenge reaches it. For each
cheating provider (its commitments internally consistent, see tests/adversary/) and each challenge
size, this bench derives many routine-tier challenges (fresh verifier nonces), and measures:

- audited: the fraction of full audits (challenge, opening by the cheating provider, verify) that
  reject, with a 95 % Wilson interval and the reason codes seen;
- predicted: the fraction of challenges (many more, no opening) that reach the cheat, by the
  cheat's own coverage rule; every audited trial is also checked against its prediction;
- exact: the closed form of that coverage under the challenge derivation, where one exists.

Challenge sizes are varied through the routine tier's constants (challenge.ROUTINE_POSITIONS,
ROUTINE_LAYERS): k positions (one of them a decode position) and m of L layers.

    python bench/adversary.py [--audits 60] [--predict 4000] [--out bench/results]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make `bench` importable from the repo root
    sys.path.append(str(Path(__file__).resolve().parents[1]))  # last: kernels/ must not shadow HF kernels
from bench.common import RESULTS, md_table, provenance, provenance_md, write_results

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "adversary"))
sys.path.insert(1, str(Path(__file__).resolve().parents[1] / "tests"))  # accs.py, which advworld uses
import advattn
import advcheats as cheats
from advworld import SAMPLED, World
from commitllm.engine import open as open_mod
from commitllm.verifier import challenge as ch
from commitllm.verifier.config import ModelConfig
from commitllm.verifier.numerics import get_profile
from commitllm.verifier.numerics.weights import quantize_model
from commitllm.verifier.opening import MATRICES, Plan

LAYERS = 16  # enough layers that the routine tier (10 layers) samples them
PROMPT, NEW = 24, 40  # 63 committed positions, 40 of them decode positions
POSITION_SWEEP = (1, 2, 4, 8, 16)
LAYER_SWEEP = (1, 2, 4, 8, 10, 16)
KV_POS, SUB_POS = 10, 6  # the K/V row replaced, the prompt token substituted


def bench_model(layers: int = LAYERS):
    """A random Llama-shaped model (tiny widths, `layers` deep), w8a16."""
    cfg = ModelConfig(family="llama", vocab_size=128, hidden_size=64, intermediate_size=96,
                      num_layers=layers, num_heads=4, num_kv_heads=2, head_dim=16,
                      rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=256,
                      tie_word_embeddings=False, attention_bias=False)
    return quantize_model(cfg, cheats.random_tensors(cfg, seed=11), get_profile("w8a16"))


@dataclass
class Cheat:
    """A cheating provider, how it serves, and which challenges reach it."""

    name: str
    what: str
    serve: Callable[[World], tuple]  # world -> (served, provider)
    hit: Callable[[dict], bool]  # challenge -> does it reach the cheat
    exact: Callable[[int, int, int], float] | None = None  # (k, m, L) -> P(detect)


def _miss_positions(n: int, first_decode: int, k: int, bad: set[int]) -> float:
    """P(no challenged position in `bad`): one decode position uniform in [fd, n), then the first
    k - 1 of a uniform random ordering of range(n) (challenge._positions)."""
    decode = range(first_decode, n)
    p_dec = 1 - len(bad & set(decode)) / len(decode)
    r = min(k, n) - 1
    return p_dec * math.comb(n - len(bad), r) / math.comb(n, r)


def cheats_for(world: World, lazy_sizes=(1, 3, 6, 12)) -> list[Cheat]:
    n, fd, L = world.n_positions, world.first_decode, world.qm.cfg.num_layers
    swap, kvl = 2 * L // 3, L // 3  # the layer model B differs in; the layer of the K/V row
    out = [
        Cheat("one-layer-swap", f"model B = A with one weight of layer {swap}'s down moved by "
              "one step, every position",
              lambda w: _served(w, cheats.perturbed(w.qm, swap, "down")),
              lambda c: swap in c["layers"], lambda k, m, L: m / L),
        Cheat("last-layer-swap", f"model B = A with one weight of the last layer ({L - 1})'s "
              "down moved: the final residual every decode check starts from",
              lambda w: _served(w, cheats.perturbed(w.qm, L - 1, "down")),
              lambda c: L - 1 in c["layers"], lambda k, m, L: m / L),
        Cheat("model-swap", "model B = A with one weight moved in every layer's down",
              lambda w: _served(w, cheats.perturbed_everywhere(w.qm)), lambda c: True,
              lambda k, m, L: 1.0),
        Cheat("kv-row", f"one K/V row (position {KV_POS}, layer {kvl}) not derived from its "
              "residual",
              lambda w: _served(w, advattn.kv_cheat(w.qm, kvl, advattn.kv_row_changed(KV_POS))),
              lambda c: kvl in c["layers"] and (KV_POS in c["positions"]
                                                or KV_POS in c["kv_sample"][str(kvl)])),
        Cheat("prompt-substitution", f"prompt token at position {SUB_POS} replaced in the "
              "computation (the receipt names the client's)", _substituted,
              lambda c: SUB_POS in c["positions"] or (
                  0 in c["layers"] and SUB_POS in c["kv_sample"]["0"])),  # every opened x_0 row
    ]
    rng = np.random.default_rng(5)
    for size in lazy_sizes:
        bad = {int(p) for p in rng.choice(np.arange(8, n), size, replace=False)}
        out.append(Cheat(
            f"lazy-{size}", f"window-4 attention in every layer at {size} of {n} positions "
                            f"({100 * size / n:.0f} %)",
            lambda w, bad=bad: _served(w, advattn.attention_cheat(w.qm, "window", None, bad)),
            lambda c, bad=bad: bool(bad & set(c["positions"])),
            lambda k, m, L, bad=bad: 1 - _miss_positions(n, fd, k, bad)))
    return out


def _served(world: World, provider):
    return world.serve(provider), provider


def _substituted(world: World):
    ran = list(world.prompt)
    ran[SUB_POS] = (ran[SUB_POS] + 1) % world.qm.cfg.vocab_size
    computed = world.serve(prompt=ran)  # generated on what it really ran
    return world.shadow(computed, world.prompt), world.honest


@contextmanager
def reexecute_once():
    """Openings re-execute the whole transcript each time (engine/open.py); a provider's re-run
    is deterministic, so within this bench one full re-run per (model, tokens) is kept and each
    opening takes its rows from it. Same bytes, a fraction of the time."""
    runs, orig = {}, open_mod.reexecute

    def reexecute(model, tokens, p, guard=nullcontext):
        key = (id(model), tuple(tokens))
        if key not in runs:
            every = list(range(len(tokens)))
            full = Plan({}, {}, {l: every for l in range(model.cfg.num_layers)}, {}, [], [])
            runs[key] = (model, orig(model, tokens, full, guard))
        cache, resid, z = runs[key][1]
        want = {l: sorted(set(p.z.get(l, [])) | set(p.zq.get(l, []))) for l in p.z}
        return cache, resid, {(m, l): z[(m, l)][rows] for l, rows in want.items()
                              for m in MATRICES}

    open_mod.reexecute = reexecute
    try:
        yield
    finally:
        open_mod.reexecute = orig


@contextmanager
def routine(k: int, m: int):
    """The routine tier with k positions and m layers."""
    saved = ch.ROUTINE_POSITIONS, ch.ROUTINE_LAYERS
    ch.ROUTINE_POSITIONS, ch.ROUTINE_LAYERS = k, m
    try:
        yield
    finally:
        ch.ROUTINE_POSITIONS, ch.ROUTINE_LAYERS = saved


def _nonce(i: int, salt: int) -> bytes:
    return (salt * 1_000_003 + i).to_bytes(16, "little")


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a binomial proportion."""
    if n == 0:
        return (0.0, 1.0)
    p = hits / n
    d = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, mid - half), min(1.0, mid + half))


def measure(world: World, cheat: Cheat, served, provider, k: int, m: int, audits: int,
            predict: int, salt: int) -> dict:
    """Audited and predicted detection rates of one cheat at one challenge size."""
    with routine(k, m):
        pred = sum(cheat.hit(world.challenge(served, "routine", nonce=_nonce(i, salt)))
                   for i in range(predict))
        rejected, agree, reasons = 0, 0, {}
        for i in range(audits):
            c = world.challenge(served, "routine", nonce=_nonce(i, salt))
            v = world.verify(served, c, *world.open(served, c, provider))
            rejected += not v.accepted
            agree += (not v.accepted) == cheat.hit(c)
            if not v.accepted:
                reasons[v.reason] = reasons.get(v.reason, 0) + 1
    lo, hi = wilson(rejected, audits)
    L = world.qm.cfg.num_layers
    return {"k": k, "m": m, "audits": audits, "rejected": rejected,
            "audited": rejected / audits if audits else None, "ci95": [lo, hi],
            "predicted": pred / predict if predict else None, "predict_n": predict,
            "exact": cheat.exact(k, m, L) if cheat.exact else None,
            "agree": agree, "reasons": reasons}


def run(audits: int, predict: int, layers: int = LAYERS, prompt_len: int = PROMPT,
        new: int = NEW, lazy_sizes=(1, 3, 6, 12), position_sweep=POSITION_SWEEP,
        layer_sweep=LAYER_SWEEP, progress=print) -> dict:
    qm = bench_model(layers)
    prompt = [int(t) for t in np.random.default_rng(3).integers(3, 128, prompt_len)]
    world = World(qm, params=SAMPLED, prompt=prompt, max_tokens=new)
    out = {"model": {"layers": layers, "hidden": 64, "heads": "4/2", "vocab": 128,
                     "positions": world.n_positions, "prompt": prompt_len, "generated": new,
                     "profile": "w8a16", "sampling": SAMPLED.manifest()},
           "routine_kv_sample": ch.ROUTINE_KV_SAMPLE, "cheats": []}
    for ci, cheat in enumerate(cheats_for(world, lazy_sizes)):
        t0 = time.perf_counter()
        served, provider = cheat.serve(world)
        sweeps = {"positions": [(k, min(ch.ROUTINE_LAYERS, layers)) for k in position_sweep]}
        if cheat.name in ("one-layer-swap", "last-layer-swap", "kv-row"):
            sweeps["layers"] = [(4, m) for m in layer_sweep if m <= layers]
        with reexecute_once():
            rows = {s: [measure(world, cheat, served, provider, k, m, audits, predict,
                                97 * ci + j) for j, (k, m) in enumerate(pairs)]
                    for s, pairs in sweeps.items()}
        out["cheats"].append({"name": cheat.name, "what": cheat.what, **rows,
                              "seconds": round(time.perf_counter() - t0, 1)})
        progress(f"{cheat.name}: {out['cheats'][-1]['seconds']} s")
    return out


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f} %"


def markdown(res: dict, prov: dict) -> str:
    mdl = res["model"]
    lines = [
        "# Detection probability of cheating providers (routine-tier audits)", "",
        provenance_md(prov), "",
        (f"Model: random Llama shape, {mdl['layers']} layers, hidden {mdl['hidden']}, heads "
        f"{mdl['heads']}, vocab {mdl['vocab']}, {mdl['profile']}; one request: {mdl['prompt']} "
        f"prompt + {mdl['generated']} sampled tokens = {mdl['positions']} committed positions. "
        f"Routine tier: k positions (one a decode position), m of {mdl['layers']} layers, "
        f"{res['routine_kv_sample']} sampled K/V rows per layer. `audited`: full audits rejected "
        "(95 % Wilson interval); `predicted`: challenges reaching the cheat by its coverage rule; "
        "`exact`: closed form; `agree`: audits whose verdict equals the prediction."), ""]
    for c in res["cheats"]:
        lines += [f"## {c['name']}", "", c["what"], ""]
        for sweep in ("positions", "layers"):
            if sweep not in c:
                continue
            rows = [[r["k"], r["m"], _pct(r["audited"]),
                     f"[{100 * r['ci95'][0]:.0f}, {100 * r['ci95'][1]:.0f}]",
                     _pct(r["predicted"]), _pct(r["exact"]), f"{r['agree']}/{r['audits']}",
                     ", ".join(f"{k} {v}" for k, v in sorted(r["reasons"].items())) or "-"]
                    for r in c[sweep]]
            lines += [md_table(["k positions", "m layers", "audited", "95 % CI", "predicted",
                                "exact", "agree", "reasons"], rows), ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--audits", type=int, default=60, help="full audits per configuration")
    ap.add_argument("--predict", type=int, default=4000, help="challenges per configuration "
                                                               "for the predicted rate")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    res = run(args.audits, args.predict)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    prov = provenance()
    md = markdown(res, prov) + f"\nTotal run time {res['seconds']} s.\n"
    js, mdp = write_results(args.out, "adversary", {"provenance": prov, **res}, md)
    print(f"wrote {js} and {mdp}")


if __name__ == "__main__":
    main()
