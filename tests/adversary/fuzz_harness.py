"""Coverage-guided fuzzing of the verifier with atheris (libFuzzer), one target per process.

    python tests/adversary/fuzz_harness.py --target verify --profile a8 --runs 2000 \
        --seconds 60 --out stats.json

The verifier's modules (commitllm.verifier.*) are instrumented for coverage; the engine that builds
the honest exchange is not. The harness never stops at the first failure: every input's outcome is
counted, every crash (an exception escaping a parser's contract or verify()) and every accepted
forgery is recorded with its site and a sample input (hex, first 4 KiB), and the statistics are
written to --out as JSON after every event, every second and when the run ends (the harness ends
it itself after --runs inputs or --seconds: libFuzzer's own exit skips Python's atexit). Exit
status 0 when there was no crash and no forgery, 1 otherwise, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

import fuzz_glue  # noqa: E402  (sets nothing up at import: environment() does)

fuzz_glue.environment()


def _site(exc: BaseException) -> str:
    """file:line of the innermost project frame (where a crash happened)."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "/verifier/" in f.filename or "/commitllm/" in f.filename
            or "/keys/" in f.filename] or frames
    f = ours[-1] if ours else None
    where = f"{Path(f.filename).name}:{f.lineno}" if f else "?"
    return f"{type(exc).__name__} at {where}"


class Stats:
    def __init__(self, out: Path | None, target: str, profile: str, tier: str):
        self.out, self.t0, self.last = out, time.time(), 0.0
        self.doc = {"target": target, "profile": profile, "tier": tier, "inputs": 0,
                    "outcomes": {}, "reasons": {}, "crashes": 0, "crash_sites": {},
                    "forgeries": 0, "forgery_examples": [], "seconds": 0.0}

    def count(self, outcome: str, reason: str | None) -> None:
        d = self.doc
        d["inputs"] += 1
        d["outcomes"][outcome] = d["outcomes"].get(outcome, 0) + 1
        if reason:
            d["reasons"][reason] = d["reasons"].get(reason, 0) + 1
        self.flush()

    def crash(self, exc: BaseException, data: bytes) -> None:
        d, site = self.doc, _site(exc)
        d["crashes"] += 1
        s = d["crash_sites"].setdefault(site, {"count": 0, "message": str(exc)[:300],
                                               "input_hex": data[:4096].hex()})
        s["count"] += 1
        self.count("crash", None)
        self.flush(force=True)

    def forgery(self, exc: BaseException, data: bytes) -> None:
        d = self.doc
        d["forgeries"] += 1
        if len(d["forgery_examples"]) < 20:
            d["forgery_examples"].append({"what": str(exc)[:500], "input_hex": data[:4096].hex()})
        self.count("forgery", None)
        self.flush(force=True)

    def flush(self, force: bool = False) -> None:
        now = time.time()
        if self.out is None or not (force or now - self.last > 1.0):
            return
        self.last = now
        self.doc["seconds"] = round(now - self.t0, 2)
        tmp = self.out.with_suffix(".part")
        tmp.write_text(json.dumps(self.doc, indent=1))
        os.replace(tmp, self.out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", required=True, choices=["container", "receipt", "challenge",
                                                       "request", "verify"])
    p.add_argument("--profile", default="w8a16", choices=list(fuzz_glue.PROFILES))
    p.add_argument("--tier", default="full", choices=["routine", "full", "deep"])
    p.add_argument("--runs", type=int, default=1000, help="inputs to try (libFuzzer -runs)")
    p.add_argument("--seconds", type=int, default=60, help="wall-clock limit (-max_total_time)")
    p.add_argument("--seed", type=int, default=1, help="libFuzzer's random seed")
    p.add_argument("--out", type=Path, help="statistics file (JSON)")
    p.add_argument("--workdir", help="where the tiny model and corpus go (default: a temp dir)")
    a = p.parse_args(argv)
    if a.runs < 1 or a.seconds < 1:
        p.error("--runs and --seconds must be positive")

    import atheris

    with atheris.instrument_imports(include=["commitllm.verifier", "commitllm.keys"]):
        import commitllm.verifier.challenge  # noqa: F401
        import commitllm.verifier.container  # noqa: F401
        import commitllm.verifier.opening  # noqa: F401
        import commitllm.verifier.receipt  # noqa: F401
        import commitllm.verifier.replay  # noqa: F401
        import commitllm.verifier.safejson  # noqa: F401
        import commitllm.verifier.verify  # noqa: F401
    import fuzz_targets

    work = Path(a.workdir or tempfile.mkdtemp(prefix="commitllm-fuzz-"))
    honest = fuzz_glue.build(a.profile, a.tier, str(work))
    corpus = work / f"corpus-{a.target}"
    corpus.mkdir(parents=True, exist_ok=True)
    for i, s in enumerate(fuzz_targets.seeds(honest, a.target)):
        (corpus / f"seed{i}").write_bytes(s)
    stats = Stats(a.out, a.target, a.profile, a.tier)

    def finish() -> None:  # libFuzzer ends the process with exit(); the verdict is ours
        stats.flush(True)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1 if stats.doc["crashes"] or stats.doc["forgeries"] else 0)

    atexit.register(finish)

    def one_input(data: bytes) -> None:
        try:
            outcome, reason = fuzz_targets.run(honest, a.target, data)
        except fuzz_targets.Forgery as e:
            stats.forgery(e, data)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as e:  # noqa: BLE001  (a crash: counted, the run goes on)
            stats.crash(e, data)
        else:
            stats.count(outcome, reason)
        d = stats.doc
        if d["inputs"] >= a.runs or time.time() - stats.t0 >= a.seconds:
            finish()

    # -max_len: libFuzzer otherwise caps mutated inputs at the largest seed (or 4 KiB).
    max_len = max(4096, max(len(s) for s in fuzz_targets.seeds(honest, a.target)) * 2)
    args = [sys.argv[0], f"-runs={a.runs + 1000}", f"-max_total_time={a.seconds + 60}", f"-seed={a.seed}",
            f"-max_len={max_len}", "-rss_limit_mb=6144", "-timeout=30", "-print_final_stats=0",
            str(corpus)]
    atheris.Setup(args, one_input)
    atheris.Fuzz()  # never returns: one_input ends the process through finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
