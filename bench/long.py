"""Long-context scoring: the exact engine against transformers fp32 (and bf16) on the same ids.

Real English text (default: the GPL-3 text Debian's base-files ships, about 8k SmolLM2 tokens) is
tokenized as plain text and its first N tokens (default 4096 and 7000; SmolLM2's context is 8192)
are teacher-forced from the start in one pass per engine. Each (engine, N) runs in its own
process, so its peak resident memory (ru_maxrss, model load included) is its own. Reported: the
time of the forward passes (load excluded), peak RSS, and per band of 1,024 positions the top-1
agreement with fp32 and the mean negative log-likelihood of the text.

    python bench/long.py [--lengths 4096,7000] [--chunk 512] [--no-bf16]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make `bench` importable from the repo root
    sys.path.append(str(Path(__file__).resolve().parents[1]))
from bench.common import RESULTS, md_table, provenance, provenance_md, write_results  # noqa: E402

DEFAULT_TEXT = Path("/usr/share/common-licenses/GPL-3")
BAND = 1024
ENGINES = ("exact", "fp32", "bf16")


def _child(engine: str, n: int, text: Path, chunk: int, profile: str, out: Path) -> None:
    """Score the first n tokens with one engine; write argmax, log-probs, time and peak RSS."""
    import torch

    from commitllm.engine.generate import next_logprobs, teacher_forced_scores
    from commitllm.engine.loader import default_gguf, load_model

    torch.set_num_threads(int(os.environ.get("LONG_THREADS", "2")))
    loaded = load_model("default")
    ids = loaded.tokenizer.encode(text.read_text(encoding="utf-8"), add_special_tokens=False)
    if len(ids) < n:
        raise SystemExit(f"{text}: {len(ids)} tokens, fewer than the {n} asked for")
    ids = ids[:n]
    if engine == "exact":
        from commitllm.engine.exact.model import ExactModel
        from commitllm.verifier.numerics import get_profile

        model = ExactModel(loaded.quantized(get_profile(profile)))
        del loaded
        t0 = time.perf_counter()
        top, lp = teacher_forced_scores(model, ids, chunk)
        seconds = time.perf_counter() - t0
    else:
        from bench.accuracy import load_hf

        del loaded
        model = load_hf(default_gguf(), {"fp32": "float32", "bf16": "bfloat16"}[engine])
        t0 = time.perf_counter()
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([ids])).logits[0].float().numpy()
        seconds = time.perf_counter() - t0
        top, lp = logits.argmax(-1), next_logprobs(logits[:-1], ids[1:])
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    np.savez(out, top=np.asarray(top, np.int64), lp=lp)
    out.with_suffix(".json").write_text(json.dumps({"seconds": seconds, "peak_rss": rss}))


def run_one(engine: str, n: int, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.npz"
        cmd = [sys.executable, __file__, "--child", engine, "--n", str(n), "--text", str(args.text),
               "--chunk", str(args.chunk), "--profile", args.profile, "--out", str(out)]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        wall = time.perf_counter() - t0
        meta = json.loads(out.with_suffix(".json").read_text())
        data = np.load(out)
        return {"engine": engine, "n": n, "seconds": meta["seconds"], "wall_s": wall,
                "peak_rss_gib": meta["peak_rss"] / 2**30, "top": data["top"], "lp": data["lp"]}


def bands(runs: dict, n: int) -> list[dict]:
    """Per 1,024 positions: top-1 agreement with fp32 and mean NLL, for each engine."""
    rows = []
    for a in range(0, n - 1, BAND):
        b = min(n - 1, a + BAND)
        row = {"positions": f"{a}-{b - 1}"}
        for name, r in runs.items():
            row[f"nll {name}"] = float(-r["lp"][a:b].mean())
            if name != "fp32" and "fp32" in runs:
                row[f"top-1 {name} = fp32"] = float(np.mean(r["top"][a:b] == runs["fp32"]["top"][a:b]))
        rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="4096,7000", help="comma-separated token counts")
    ap.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="a UTF-8 English text file")
    ap.add_argument("--chunk", type=int, default=512, help="exact engine prefill chunk")
    ap.add_argument("--profile", default="w8a16")
    ap.add_argument("--no-bf16", action="store_true", help="skip transformers bf16")
    ap.add_argument("--child", choices=ENGINES, help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        _child(args.child, args.n, args.text, args.chunk, args.profile, args.out)
        return 0
    engines = [e for e in ENGINES if not (args.no_bf16 and e == "bf16")]
    t_all, results = time.perf_counter(), []
    for n in [int(x) for x in args.lengths.split(",")]:
        runs = {}
        for e in engines:
            r = run_one(e, n, args)
            print(f"{n} tokens, {e}: {r['seconds']:.1f} s forward, peak RSS "
                  f"{r['peak_rss_gib']:.2f} GiB", flush=True)
            runs[e] = r
        results.append({"n": n, "bands": bands(runs, n), "engines": [
            {k: v for k, v in r.items() if k not in ("top", "lp")} for r in runs.values()]})
    prov = provenance()
    data = prov | {"text": str(args.text), "chunk": args.chunk, "profile": args.profile,
                   "results": results, "total_s": time.perf_counter() - t_all}
    md = ["# Long-context scoring: exact engine vs transformers", "", provenance_md(prov), "",
          f"Text {args.text}, first N tokens teacher-forced from the start, one process per "
          f"engine and length (peak RSS includes the model load); exact engine {args.profile}, "
          f"prefill chunk {args.chunk}; transformers one forward pass over all N.", ""]
    for res in results:
        e = {r["engine"]: r for r in res["engines"]}
        md += [f"## {res['n']} tokens", "", md_table(
            ["engine", "forward s", "peak RSS GiB", "time / fp32"],
            [[k, f"{r['seconds']:.1f}", f"{r['peak_rss_gib']:.2f}",
              f"{r['seconds'] / e['fp32']['seconds']:.2f}" if "fp32" in e else ""]
             for k, r in e.items()]), ""]
        cols = list(res["bands"][0])
        md += [md_table(cols, [[row[c] if isinstance(row[c], str) else f"{row[c]:.4f}"
                                for c in cols] for row in res["bands"]]), ""]
    write_results(RESULTS, "long", data, "\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
