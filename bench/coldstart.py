"""Cold start of `commitllm verify`: a fresh process per verification, against the same
verification repeated inside one process.

The SmolLM2 default model, a routine challenge of one receipt (generated, keyed, challenged and
opened with the CLIs, as a user would). Timed, as medians of --runs each:
  - first: `commitllm verify` as a fresh process with an empty build cache ($COMMITLLM_CACHE),
    as on a new machine (an opening this small starts the compiled core's build in the
    background and verifies on the numpy route; the build is awaited off the clock);
  - fresh: `commitllm verify` as a fresh process with the cache in place (every later run);
  - warm: verify() called again in one process that has already verified once (imports, key,
    tables and the loaded core in memory);
  - import: a fresh `python -c "import commitllm.verifier.cli"` (the interpreter and imports).
The goal (issue 17), "a fresh process within 1.5x of its warm time": first within 1.5x of
fresh (no multi-second build on the first run), reported with fresh / warm (the interpreter,
imports and one-time tables of a process against a verification alone).

Writes bench/results/coldstart.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, md_table, provenance, provenance_md, write_results  # noqa: E402

GOAL_RATIO = 1.5


def _bin(name: str) -> str:
    path = Path(sys.executable).with_name(name)
    return str(path) if path.exists() else (shutil.which(name) or name)


def _run(cmd: list[str], env: dict, cwd: Path, check: bool = True) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=900)
    dt = time.perf_counter() - t0
    if check and proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} failed ({proc.returncode}): "
                         f"{(proc.stderr or proc.stdout).strip()[-400:]}")
    return dt


def prepare(work: Path, env: dict, max_tokens: int) -> dict:
    """A receipt, a key, a routine challenge and its opening, made with the CLIs."""
    eng, cli = _bin("commitllm-engine"), _bin("commitllm")
    _run([eng, "generate", "Name three rivers in Europe.", "--max-tokens", str(max_tokens),
          "--receipt", "r.json", "--store", "transcripts", "--nonce", "cold-1"], env, work)
    _run([cli, "keygen", "--model", "default", "--out", "v.key"], env, work)
    _run([cli, "challenge", "--key", "v.key", "--receipt", "r.json", "--tier", "routine",
          "--out", "c.json"], env, work)
    _run([eng, "open", "--store", "transcripts", "--challenge", "c.json", "--out", "o.bin"],
         env, work)
    return {"verify": [cli, "verify", "--key", "v.key", "--receipt", "r.json", "--challenge",
                       "c.json", "--opening", "o.bin", "--nonce", "cold-1"],
            "opening_bytes": (work / "o.bin").stat().st_size}


def _wait_for_build(folder: Path, limit_s: float = 120.0) -> None:
    """Until the background build the first run started has put its library in place."""
    t0 = time.perf_counter()
    while not list(folder.glob("native-*.so")):
        if time.perf_counter() - t0 > limit_s:
            raise SystemExit(f"no compiled core appeared in {folder} within {limit_s:.0f} s")
        time.sleep(0.1)


def warm_times(work: Path, runs: int) -> list[float]:
    """verify() repeated in this process after one untimed call (the CLI's own loading steps,
    then only the verification timed)."""
    from commitllm.keys.keygen import key_tokenizer, load_key
    from commitllm.verifier import container
    from commitllm.verifier.opening import OPENING_MAGIC, OPENING_VERSION
    from commitllm.verifier.verify import verify

    key = load_key(work / "v.key")
    tok = key_tokenizer(key)
    receipt = json.loads((work / "r.json").read_text())
    challenge = json.loads((work / "c.json").read_text())
    data = (work / "o.bin").read_bytes()
    out = []
    for i in range(runs + 1):
        t0 = time.perf_counter()
        meta, arrays = container.loads(data, OPENING_MAGIC, OPENING_VERSION, len(data))
        v = verify(key, receipt, challenge, meta, arrays, tok, expected_nonce="cold-1")
        if not v.accepted:
            raise SystemExit(f"warm verify rejected: {v.reason} {v.detail}")
        if i:
            out.append(time.perf_counter() - t0)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5, help="timed runs of each kind")
    ap.add_argument("--max-tokens", type=int, default=16, help="generated tokens in the receipt")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    with tempfile.TemporaryDirectory(prefix="commitllm-coldstart-") as tmp:
        work = Path(tmp)
        env = dict(os.environ, COMMITLLM_CACHE=str(work / "cache"))
        env.pop("COMMITLLM_NATIVE", None)
        print("preparing a receipt, key, routine challenge and opening (SmolLM2)...", flush=True)
        prep = prepare(work, env, args.max_tokens)
        first = []
        for i in range(args.runs):  # each on an empty build cache of its own
            e = dict(env, COMMITLLM_CACHE=str(work / f"empty-{i}"))
            first.append(_run(prep["verify"], e, work))
            _wait_for_build(work / f"empty-{i}" / "native")  # off the clock, before the next
        fresh = [_run(prep["verify"], env, work) for _ in range(args.runs)]
        imp = [_run([sys.executable, "-c", "import commitllm.verifier.cli"], env, work)
               for _ in range(args.runs)]
        os.environ["COMMITLLM_CACHE"] = env["COMMITLLM_CACHE"]
        warm = warm_times(work, args.runs)
    med = {k: statistics.median(v) for k, v in
           (("first", first), ("fresh", fresh), ("warm", warm), ("import", imp))}
    data = {"benchmark": "coldstart", "provenance": provenance(),
            "settings": {"runs": args.runs, "max_tokens": args.max_tokens, "tier": "routine",
                         "model": "SmolLM2-135M-Instruct (default)"},
            "opening_bytes": prep["opening_bytes"],
            "seconds": {"first": first, "fresh": fresh, "warm": warm, "import": imp},
            "median_s": med, "fresh_over_warm": med["fresh"] / med["warm"],
            "first_over_fresh": med["first"] / med["fresh"], "goal_ratio": GOAL_RATIO,
            "met": med["first"] / med["fresh"] <= GOAL_RATIO}
    md = render_md(data)
    write_results(args.out, "coldstart", data, md)
    print(md)
    return 0


def render_md(d: dict) -> str:
    m = d["median_s"]
    rows = [[k, f"{1e3 * m[k]:.0f}", f"{1e3 * min(d['seconds'][k]):.0f}",
             f"{1e3 * max(d['seconds'][k]):.0f}"] for k in ("first", "fresh", "import", "warm")]
    over = 100 * (d["first_over_fresh"] / d["goal_ratio"] - 1)
    verdict = "met" if d["met"] else f"missed by {over:.0f} %"
    return "\n".join([
        "# Cold start of `commitllm verify` (SmolLM2, routine tier)", "",
        provenance_md(d["provenance"]), "",
        f"{d['settings']['runs']} runs each, opening {d['opening_bytes'] / 1e6:.1f} MB. first: a "
        "fresh process on an empty build cache (it starts the compiled core's build in the "
        "background and verifies on the numpy route); fresh: a fresh process "
        "with the cache in place; import: `python -c \"import commitllm.verifier.cli\"`; warm: "
        "verify() repeated in one process (the opening parsed each time).", "",
        md_table(["kind", "median ms", "min ms", "max ms"], rows), "",
        f"first / fresh = {d['first_over_fresh']:.2f} (goal <= {d['goal_ratio']}: {verdict}); "
        f"fresh / warm = {d['fresh_over_warm']:.2f} (interpreter, imports, key, tokenizer and "
        "one-time tables against the verification alone). "
        f"Reproduce: `python bench/coldstart.py`.", ""])


if __name__ == "__main__":
    raise SystemExit(main())
