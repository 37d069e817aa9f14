"""The fused route's attention step, before and after, in one process on one saved opening.

Since 2026-12-07 the fused layer route takes its attention step (the derived K/V rows against
the opened ones, the keys seen all opened, query planes, scales, ranges, the attention, the
output layout) in one compiled call, `native.layer.attend` (attn.c's attn_layer), instead of
the step route's `replay._attend` (some twenty numpy steps around attn_fused_rows). Both give
the same bits (tests/test_attn_layer.py), so the one can stand in for the other: this script
verifies the same opening with either in turn, alternating (ABBA) in one process, so both see
the same machine states on this shared machine, and reports the medians, ratio and spread of
whole verifications.

    python bench/verify_ab.py --save /tmp/ab8b --shape 8b --layers 10 --positions 1024
    python bench/attend_ab.py --data /tmp/ab8b

Writes bench/results/attend_ab.{json,md} (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable from the repo root
    sys.path.append(str(Path(__file__).resolve().parents[1]))
from bench.common import RESULTS, md_table, provenance, provenance_md, write_results

COMMAND = "python bench/attend_ab.py"


def _step_attend(cfg, profile, q, k, v, pos, n, kv, n_threads=None):
    """layer.attend's contract on the step route's code: the output, or None where it rejects."""
    from commitllm.verifier import replay

    ctx = replay.Ctx(None, cfg, profile, None, None, replay.Timer())
    try:
        return replay._attend(ctx, 0, pos, n, q, k, v, {0: kv}, time.perf_counter())
    except replay.Reject:
        return None


def measure(data: Path, tiers: list[str], runs: int, threads: list[int]) -> list[dict]:
    from commitllm.keys.keygen import load_key
    from commitllm.verifier import container, native
    from commitllm.verifier.native import layer
    from commitllm.verifier.opening import OPENING_MAGIC, OPENING_VERSION
    from commitllm.verifier.verify import verify

    key = load_key(data / "key")
    receipt = json.loads((data / "receipt.json").read_text())
    compiled = layer.attend
    out = []
    try:
        for tier in tiers:
            c = json.loads((data / f"{tier}.challenge.json").read_text())
            blob = (data / f"{tier}.opening").read_bytes()
            meta, arrays = container.loads(blob, OPENING_MAGIC, OPENING_VERSION, len(blob))
            for th in threads:
                ms = {"step": [], "compiled": []}
                with native.thread_budget(th):
                    for i in range(2 * runs + 2):  # ABBA order; the first pair is a warm-up
                        side = ("step", "compiled", "compiled", "step")[i % 4]
                        layer.attend = _step_attend if side == "step" else compiled
                        t0 = time.perf_counter()
                        v = verify(key, receipt, c, meta, arrays, None, io_binding=False,
                                   threads=th)
                        dt = 1e3 * (time.perf_counter() - t0)
                        if not v.accepted:
                            raise SystemExit(f"{tier}: rejected ({v.reason})")
                        if i >= 2:
                            ms[side].append(dt)
                row = {"tier": tier, "threads": th, "runs": runs}
                for side, xs in ms.items():
                    row[side] = {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}
                row["ratio"] = row["compiled"]["median"] / row["step"]["median"]
                print(f"{tier} threads={th}: step route's attention {row['step']['median']:.1f} "
                      f"ms, compiled {row['compiled']['median']:.1f} ms, ratio "
                      f"{row['ratio']:.3f}", flush=True)
                out.append(row)
    finally:
        layer.attend = compiled
    return out


def render_md(d: dict) -> str:
    head = ["tier", "threads", "step route's attention ms (median)", "attn_layer ms", "ratio",
            "step spread", "attn_layer spread"]
    rows = [[r["tier"], r["threads"], f"{r['step']['median']:.1f}",
             f"{r['compiled']['median']:.1f}", f"{r['ratio']:.3f}",
             f"{r['step']['min']:.1f}-{r['step']['max']:.1f}",
             f"{r['compiled']['min']:.1f}-{r['compiled']['max']:.1f}"] for r in d["rows"]]
    setup = d["setup"]
    return (f"# The fused route's attention step: one compiled call against the step route's\n\n"
            f"{provenance_md(d['provenance'])}\n"
            f"Opening: {setup.get('shape')} shapes, {setup.get('layers')} layers, "
            f"{setup.get('positions')} trace positions (bench/verify_ab.py --save). Whole "
            f"verifications of one opening in one process, the fused route's attention step "
            f"taken by `native.layer.attend` (attn_layer) or by the step route's "
            f"`replay._attend`, alternating ABBA; {d['rows'][0]['runs']} runs per side after a "
            f"warm-up pair. Load average at the end {d['loadavg']}. Command: "
            f"`{d['command']}`.\n\n" + md_table(head, rows))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, required=True,
                    help="a folder written by bench/verify_ab.py --save")
    ap.add_argument("--tiers", default="routine,full")
    ap.add_argument("--runs", type=int, default=11, help="verifications per side and setting")
    ap.add_argument("--threads", default="1,2", help="verifier threads, comma-separated")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    setup = json.loads((args.data / "setup.json").read_text())
    rows = measure(args.data, args.tiers.split(","), args.runs,
                   [int(t) for t in args.threads.split(",")])
    d = {"provenance": provenance(), "setup": setup, "rows": rows,
         "loadavg": list(os.getloadavg()),
         "command": COMMAND + f" --data {args.data} --runs {args.runs}"}
    js, md = write_results(args.out, "attend_ab", d, render_md(d))
    print(f"wrote {js}, {md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
