"""Verifier before / after on one saved opening: alternating processes of two checkouts.

On this shared 2-core machine two runs of bench/anchors.py with the same code differ by 15-20 %
(other tenants, the state each process leaves), which hides a 10 % change between commits. This
script saves one 8B-shape opening (random model, bench/anchors.py's shapes) once, then times
`verify` on it in alternating child processes of this checkout and another (`--against DIR`: a
`git worktree` of the other commit), round after round, so both see the same machine states;
each round is the median of `--runs` verifications after one warm-up, at one thread (the compiled
core's row splits too) and at `--threads`.

    python bench/verify_ab.py --save /tmp/ab8b                      # build + open (~2 min)
    git worktree add /tmp/base <commit>
    python bench/verify_ab.py --data /tmp/ab8b --against /tmp/base  # alternate, write results

Writes bench/results/verify_ab.{json,md} (or --out): per round and side the medians, then the
median over rounds, the ratio after / before and the spread of each side.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable from the repo root
    sys.path.append(str(Path(__file__).resolve().parents[1]))  # last: kernels/ must not shadow
from bench.common import RESULTS, git_info, md_table, provenance, provenance_md, write_results

TIERS = ("routine", "full", "deep")
PARTS = ("freivalds", "attention", "rest", "merkle")
PACKAGE_DIRS = ("engine", "kernels", "keys", "verifier")  # pyproject's package-dir, under commitllm


def save(out: Path, layers: int, positions: int, gen_tokens: int = 4, shape: str = "8b",
         tiers: tuple[str, ...] = ("routine", "full"), chunk: int = 128) -> None:
    """The key, one receipt at `positions` trace positions and its openings at `tiers` (the
    prompt prefilled `chunk` positions at a time, as bench/anchors.py does: unchunked, a
    4,096-position prefill holds every head's scores at once, gigabytes, for many minutes)."""
    import numpy as np

    from bench.anchors import build_setup
    from bench.protocol import sign
    from commitllm.engine.open import build_opening
    from commitllm.keys.keygen import save_key
    from commitllm.verifier import challenge, container
    from commitllm.verifier.opening import OPENING_MAGIC, OPENING_VERSION

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    setup, _ = build_setup(shape, layers)
    save_key(setup.key, out / "key")
    prompt = np.random.default_rng(0).integers(2, setup.model.cfg.vocab_size,
                                               positions + 1 - gen_tokens).tolist()
    signed, _ = sign(setup, {"prompt": "verify_ab"}, prompt, gen_tokens, chunk)
    r, tr = signed.receipts[0], signed.transcripts[0]
    (out / "receipt.json").write_text(json.dumps(r))
    for tier in tiers:
        c = challenge.derive(setup.key.secret, r, tier, nonce=b"\x01" * 16)
        meta, arrays = build_opening(setup.model, tr, c)
        (out / f"{tier}.challenge.json").write_text(json.dumps(c))
        (out / f"{tier}.opening").write_bytes(container.dumps(OPENING_MAGIC, OPENING_VERSION,
                                                              meta, arrays))
    (out / "setup.json").write_text(json.dumps({"shape": shape, "layers": layers,
                                                "positions": r["trace"]["positions"]}))
    print(f"saved {out} ({time.perf_counter() - t0:.0f} s)")


def time_once(data: Path, tier: str, runs: int, threads: int) -> dict:
    """Child side: median ms of `runs` verifications (after one warm-up) at 1 and `threads`."""
    from commitllm.keys.keygen import load_key
    from commitllm.verifier import container, native
    from commitllm.verifier.opening import OPENING_MAGIC, OPENING_VERSION
    from commitllm.verifier.verify import verify

    key = load_key(data / "key")
    r = json.loads((data / "receipt.json").read_text())
    c = json.loads((data / f"{tier}.challenge.json").read_text())
    blob = (data / f"{tier}.opening").read_bytes()
    meta, arrays = container.loads(blob, OPENING_MAGIC, OPENING_VERSION, len(blob))
    out = {}
    for t in (1, threads):
        def one():
            if t == 1:
                with native.thread_budget(1):
                    return verify(key, r, c, meta, arrays, None, io_binding=False)
            return verify(key, r, c, meta, arrays, None, io_binding=False, threads=t)
        one()
        ms, parts = [], []
        for _ in range(runs):
            t0 = time.perf_counter()
            v = one()
            ms.append(1e3 * (time.perf_counter() - t0))
            parts.append(v.timing)
            if not v.accepted:
                raise SystemExit(f"{tier}: rejected ({v.reason}: {v.detail})")
        out[str(t)] = statistics.median(ms)
        # the verifier's timed parts, summed over its threads (work, not wall time)
        out[f"parts_{t}"] = {k: 1e3 * statistics.median(p[k] for p in parts)
                             for k in PARTS if k in parts[0]}
    return out


def _package_path(tree: Path, tmp: Path) -> str:
    """A folder holding `commitllm` as that checkout's source folders (no install needed)."""
    pkg = tmp / "commitllm"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_bytes((tree / "commitllm" / "__init__.py").read_bytes())
    for d in PACKAGE_DIRS:
        (pkg / d).symlink_to(tree / d)
    return str(tmp)


def _child(tree: Path, pkg: str, args, tier: str) -> dict:
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = pkg + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--data", str(args.data),
           "--tier", tier, "--runs", str(args.runs), "--threads", str(args.threads)]
    out = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True, timeout=600)
    if out.returncode:
        raise SystemExit(f"child in {tree} failed: {out.stderr.strip()[-400:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(args) -> dict:
    here = Path(__file__).resolve().parents[1]
    other = args.against.resolve()
    sides = {"before": (other, git_info(other)), "after": (here, git_info(here))}
    rounds = {tier: {"before": [], "after": []} for tier in args.tiers}
    with tempfile.TemporaryDirectory() as tmp:
        pkgs = {side: _package_path(tree, Path(tmp) / side) for side, (tree, _) in sides.items()}
        for i in range(args.rounds):
            for tier in args.tiers:
                order = ("before", "after") if i % 2 == 0 else ("after", "before")
                for side in order:
                    tree = sides[side][0]
                    got = _child(tree, pkgs[side], args, tier)
                    rounds[tier][side].append(got)
                    print(f"round {i + 1} {tier:>7} {side:>6}: " + ", ".join(
                        f"{k} thread{'s' if k != '1' else ''} {v:.1f} ms" for k, v in got.items()
                        if not k.startswith("parts")), flush=True)
    summary = {}
    for tier, by in rounds.items():
        summary[tier] = {}
        for t in ("1", str(args.threads)):
            b = [r[t] for r in by["before"]]
            a = [r[t] for r in by["after"]]
            summary[tier][t] = {"before_ms": statistics.median(b), "after_ms": statistics.median(a),
                                "ratio": statistics.median(a) / statistics.median(b),
                                "before_spread_ms": [min(b), max(b)],
                                "after_spread_ms": [min(a), max(a)],
                                "after_parts_ms": {k: statistics.median(r[f"parts_{t}"][k]
                                                                        for r in by["after"])
                                                   for k in by["after"][0][f"parts_{t}"]}}
    setup = json.loads((args.data / "setup.json").read_text())
    return {"provenance": provenance(), "setup": setup, "runs": args.runs,
            "rounds": args.rounds, "threads": args.threads, "loadavg_end": os.getloadavg(),
            "before": {"tree": str(other), **sides["before"][1]},
            "after": {"tree": str(here), **sides["after"][1]},
            "per_round": rounds, "summary": summary,
            "command": "python bench/verify_ab.py " + " ".join(sys.argv[1:])}


def render_md(d: dict) -> str:
    s = d["setup"]
    rows = []
    for tier, by in d["summary"].items():
        for t, f in by.items():
            rows.append([tier, t, f"{f['before_ms']:.1f}", f"{f['after_ms']:.1f}",
                         f"{f['ratio']:.2f}",
                         "{:.1f}-{:.1f}".format(*f["before_spread_ms"]),
                         "{:.1f}-{:.1f}".format(*f["after_spread_ms"])])
    return "\n".join([
        "# Verifier before / after, alternating processes on one saved opening", "",
        provenance_md(d["provenance"]), "",
        f"Opening: {s['shape']} shapes, {s['layers']} layers, {s['positions']} trace positions "
        f"(random model, bench/anchors.py's shapes). Before: {d['before']['commit']} "
        f"({d['before']['tree']}); after: {d['after']['commit']}"
        f"{' (dirty working tree)' if d['after'].get('dirty') else ''}. {d['rounds']} rounds, "
        f"the two sides in alternating order; each round the median of {d['runs']} "
        f"verifications after one warm-up, on one thread (the compiled core's row splits too) "
        f"and on {d['threads']} layer threads. Load average at the end "
        f"{[round(x, 2) for x in d['loadavg_end']]}. Command: `{d['command']}`.", "",
        md_table(["tier", "threads", "before ms (median of rounds)", "after ms", "after / before",
                  "before spread", "after spread"], rows), "",
        "The after side's timed parts (ms, summed over the verifier's threads: work, not wall "
        "time; Merkle includes building the trace tables), medians of rounds:", "",
        md_table(["tier", "threads", *PARTS],
                 [[tier, t, *(f"{f['after_parts_ms'].get(k, 0.0):.1f}" for k in PARTS)]
                  for tier, by in d["summary"].items() for t, f in by.items()]),
    ])


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--save", type=Path, help="build the opening into this folder and stop")
    ap.add_argument("--shape", default="8b", help="--save: a bench/anchors.py shape (8b, 70b; "
                                                  "tiny: tests)")
    ap.add_argument("--layers", type=int, default=10, help="--save: layers of the shape")
    ap.add_argument("--positions", type=int, default=1024, help="--save: trace positions")
    ap.add_argument("--chunk", type=int, default=128,
                    help="--save: prefill chunk (bounds the attention's memory)")
    ap.add_argument("--data", type=Path, help="a folder written by --save")
    ap.add_argument("--against", type=Path, help="the other checkout (before)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--runs", type=int, default=5, help="verifications per round and side")
    ap.add_argument("--threads", type=int, default=2, help="the second thread count timed")
    ap.add_argument("--tiers", default=None,
                    help="comma list of routine, full, deep (default: routine; with --save: "
                         "routine,full; deep opens every position: keep --positions small)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tier", default="routine", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.tiers = [t for t in (args.tiers or ("routine,full" if args.save else "routine"))
                  .split(",") if t]
    if any(t not in TIERS for t in args.tiers) or args.rounds < 1 or args.runs < 1 \
            or args.threads < 2:
        ap.error("tiers from routine, full, deep; rounds, runs >= 1; threads >= 2")
    if not args.save and not (args.data and (args.child or args.against)):
        ap.error("give --save DIR, or --data DIR with --against DIR")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.save:
        save(args.save, args.layers, args.positions, shape=args.shape, tiers=tuple(args.tiers),
             chunk=args.chunk)
        return 0
    if args.child:
        print(json.dumps(time_once(args.data, args.tier, args.runs, args.threads)))
        return 0
    d = compare(args)
    js, md = write_results(args.out, "verify_ab", d, render_md(d))
    print(render_md(d))
    print(f"wrote {js}, {md}")
    return 0


if __name__ == "__main__":
    for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_v, "1")
    sys.exit(main())
