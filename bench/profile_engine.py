"""Where the exact engine's time goes: torch.profiler over decode steps and a long prefill.

Prints the top ops by self CPU time for batch 1 decode, batch 8 decode and one prefill, and writes
bench/results/profile_engine.{json,md} with the machine, date and commit.

    python bench/profile_engine.py [--prefill 3000] [--steps 16] [--label before]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

if __package__ in (None, ""):  # run as a script: make `bench` importable from the repo root
    sys.path.append(str(Path(__file__).resolve().parents[1]))
from bench.common import RESULTS, provenance, provenance_md, write_results  # noqa: E402
from commitllm.engine.exact.model import ExactModel, SeqCache  # noqa: E402
from commitllm.engine.generate import default_caches  # noqa: E402
from commitllm.engine.loader import load_model  # noqa: E402
from commitllm.verifier.numerics import get_profile  # noqa: E402


def _decode(model, batch: int, steps: int, prompt_len: int = 40):
    """Decode steps on the caches generate_exact gives such a batch (one paged pool from two
    sequences on, as serving and bench/generate.py run)."""
    prompts = [[1 + (7 * i + j) % 1000 for j in range(prompt_len)] for i in range(batch)]
    caches = default_caches(model, prompts, [steps + 2] * batch)
    model.forward(caches, prompts)
    toks = [[5 + i] for i in range(batch)]
    model.forward(caches, toks)  # warm
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            model.forward(caches, toks)
        dt = (time.perf_counter() - t0) / steps
    return prof, dt


def _prefill(model, n: int):
    ids = [1 + (13 * j) % 40000 for j in range(n)]
    with profile(activities=[ProfilerActivity.CPU], profile_memory=False) as prof:
        t0 = time.perf_counter()
        model.forward([SeqCache()], [ids])
        dt = time.perf_counter() - t0
    return prof, dt


def _table(prof, dt_ms: float, top: int = 15) -> tuple[list[dict], int]:
    ev = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in ev) or 1
    calls = sum(e.count for e in ev)
    rows = sorted(ev, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return [{"op": e.key, "calls": e.count, "self_share": round(e.self_cpu_time_total / total, 4)}
            for e in rows], calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prefill", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--label", default="")
    ap.add_argument("--profile", default="w8a16")
    ap.add_argument("--name", default="profile_engine", help="results file name under bench/results")
    a = ap.parse_args()
    torch.set_num_threads(2)
    loaded = load_model("default")
    model = ExactModel(loaded.quantized(get_profile(a.profile)))
    out = {"label": a.label, "cases": {}}
    for name, fn in (("decode batch 1", lambda: _decode(model, 1, a.steps)),
                     ("decode batch 8", lambda: _decode(model, 8, a.steps)),
                     (f"prefill {a.prefill}", lambda: _prefill(model, a.prefill))):
        prof, dt = fn()
        rows, calls = _table(prof, dt * 1e3)
        steps = a.steps if name.startswith("decode") else 1
        out["cases"][name] = {"ms_per_step": round(dt * 1e3, 2), "ops_per_step": calls // steps,
                              "top": rows}
        print(f"## {name}: {dt * 1e3:.1f} ms per step, {calls // steps} torch ops per step")
        for r in rows:
            print(f"  {r['self_share'] * 100:5.1f} %  {r['calls'] // steps:6d}/step  {r['op']}")
    prov = provenance()
    out = prov | out
    md = [f"# Exact engine profile {a.label}".rstrip(), "", provenance_md(prov)]
    for name, c in out["cases"].items():
        md += ["", f"## {name}: {c['ms_per_step']} ms per step, {c['ops_per_step']} torch ops",
               "", "| self CPU share | calls per step | op |", "|---|---|---|"]
        steps = a.steps if name.startswith("decode") else 1
        md += [f"| {r['self_share'] * 100:.1f} % | {r['calls'] // steps} | `{r['op']}` |"
               for r in c["top"]]
    write_results(RESULTS, a.name, out, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
