"""Coverage-guided fuzzing of the verifier: every target under every profile, for a time each.

    python bench/fuzz.py --seconds 120        # 5 targets x 3 profiles x 120 s = 30 min

Runs tests/adversary/fuzz_harness.py (atheris) once per (target, profile) in its own process, then
writes bench/results/fuzz.json and fuzz.md: inputs tried, outcomes, reason codes, crashes (must be
0) and accepted forgeries (must be 0), with each crash site and forgery example. Exit 1 when any
run found a crash or a forgery.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, md_table, provenance, provenance_md, write_results  # noqa: E402

HARNESS = Path(__file__).resolve().parents[1] / "tests" / "adversary" / "fuzz_harness.py"
TARGETS = ("verify", "container", "receipt", "challenge", "request")
PROFILES = ("w8a16", "a8", "w16a16")


def run_one(target: str, profile: str, tier: str, seconds: int, runs: int, seed: int,
            work: Path) -> dict:
    out = work / f"{target}-{profile}.json"
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, str(HARNESS), "--target", target, "--profile", profile,
                        "--tier", tier, "--seconds", str(seconds), "--runs", str(runs),
                        "--seed", str(seed), "--out", str(out), "--workdir", str(work / "w")],
                       capture_output=True, text=True, timeout=seconds + 300, cwd=work)
    if not out.exists():  # the harness died before its first statistics
        return {"target": target, "profile": profile, "tier": tier, "inputs": 0, "crashes": 1,
                "forgeries": 0, "crash_sites": {"harness died": {
                    "count": 1, "message": (p.stderr or p.stdout)[-500:]}},
                "outcomes": {}, "reasons": {}, "forgery_examples": [], "seconds": 0.0}
    d = json.loads(out.read_text())
    d["wall_s"] = round(time.perf_counter() - t0, 1)
    d["exit"] = p.returncode
    return d


def markdown(res: dict, prov: dict) -> str:
    rows = [[r["target"], r["profile"], r["tier"], r["inputs"], r["crashes"], r["forgeries"],
             r["outcomes"].get("honest", 0), r["outcomes"].get("rejected", 0),
             r["outcomes"].get("parse", 0), f"{r['seconds']:.0f}"] for r in res["runs"]]
    tot = res["total"]
    lines = ["# Coverage-guided fuzzing of the verifier (atheris)", "", provenance_md(prov), "",
             f"`python bench/fuzz.py --seconds {res['seconds_each']}`: each target under each "
             "profile in its own process, the verifier's modules instrumented for coverage. "
             "`honest`: accepted and equal to the honest exchange; `rejected`: a Verdict with a "
             "reason code; `parse`: refused by the parser's own error (JSONError, "
             "ContainerError); a crash is any other exception, a forgery is an accepted exchange "
             "that differs from the honest one (tests/adversary/fuzz_glue.py).", "",
             f"**Total: {tot['inputs']:,} inputs, {tot['crashes']} crashes, "
             f"{tot['forgeries']} accepted forgeries.**", "",
             md_table(["target", "profile", "tier", "inputs", "crashes", "forgeries", "honest",
                       "rejected", "parse", "s"], rows), ""]
    reasons: dict = {}
    for r in res["runs"]:
        for k, v in r["reasons"].items():
            reasons[k] = reasons.get(k, 0) + v
    lines += ["Reason codes over all runs: " + ", ".join(
        f"{k} {v:,}" for k, v in sorted(reasons.items(), key=lambda x: -x[1])), ""]
    for r in res["runs"]:
        for site, s in r["crash_sites"].items():
            lines.append(f"- crash ({r['target']}, {r['profile']}): {site} x{s['count']}: "
                         f"{s['message'][:200]}")
        for f in r["forgery_examples"][:5]:
            lines.append(f"- forgery ({r['target']}, {r['profile']}): {f['what'][:300]}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=60, help="seconds per (target, profile)")
    ap.add_argument("--runs", type=int, default=10**9, help="inputs per (target, profile) at most")
    ap.add_argument("--tier", default="full", choices=["routine", "full", "deep"])
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--profiles", default=",".join(PROFILES))
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args(argv)
    targets, profiles = a.targets.split(","), a.profiles.split(",")
    bad = [t for t in targets if t not in TARGETS] + [p for p in profiles if p not in PROFILES]
    if bad or a.seconds < 1:
        ap.error(f"unknown target or profile: {', '.join(bad)}" if bad else "--seconds >= 1")
    runs = []
    with tempfile.TemporaryDirectory(prefix="commitllm-fuzz-") as tmp:
        for p in profiles:
            for t in targets:
                r = run_one(t, p, a.tier, a.seconds, a.runs, a.seed, Path(tmp))
                runs.append(r)
                print(f"{t:10s} {p:7s} {r['inputs']:>9,} inputs  {r['crashes']} crashes  "
                      f"{r['forgeries']} forgeries  ({r['seconds']:.0f} s)", flush=True)
    total = {k: sum(r[k] for r in runs) for k in ("inputs", "crashes", "forgeries")}
    res = {"seconds_each": a.seconds, "tier": a.tier, "total": total, "runs": runs}
    prov = provenance()
    js, md = write_results(a.out, "fuzz", {"provenance": prov, **res}, markdown(res, prov))
    print(f"total {total['inputs']:,} inputs, {total['crashes']} crashes, "
          f"{total['forgeries']} forgeries; wrote {js} and {md}")
    return 1 if total["crashes"] or total["forgeries"] else 0


if __name__ == "__main__":
    sys.exit(main())
