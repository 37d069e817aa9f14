"""lm-evaluation-harness against `commitllm-engine serve` (continuous batching): two local tasks
(a generate-until task with stop sequences and a multiple-choice task scored by log-likelihood,
i.e. token-id prompts with echo and logprobs), run with 1 and with N concurrent requests. The
pass condition (exit 1 otherwise): the run completes at every concurrency, every sample's answer
is the same at every concurrency (so equal to the requests sent one at a time), and
`commitllm audit --rate 1` accepts every receipt the server produced.

Needs the `lm_eval` command (`pip install "lm-eval[api]" transformers` in any venv; give it with
--lm-eval or $LM_EVAL). Results go to OUT/lm_eval.{json,md} with machine, commit and load.

    python bench/lm_eval.py [--model default|tiny] [--concurrency 1,4] [--lm-eval PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.append(str(Path(__file__).resolve().parents[1]))  # last: kernels/ must not shadow HF kernels
from bench.common import (RESULTS, md_table, others_share, provenance_md, record_model_run,
                          serving_model)
from bench.serve_load import free_port, keygen, start_server

# Small, local, answerable tasks (no dataset downloads). gen: a short answer ended by a newline or
# a period; mc: pick the right completion by log-likelihood.
GEN_ROWS = [{"q": f"Question: What is {a} plus {b}?\nAnswer:", "a": f" {a + b}"}
            for a, b in ((2, 3), (10, 5), (7, 8), (20, 22), (1, 1), (6, 6))]
MC_ROWS = [
    {"q": "The capital of France is", "choices": [" Paris", " Rome", " Berlin"], "label": 0},
    {"q": "Water freezes at zero degrees", "choices": [" Kelvin", " Celsius", " Newton"],
     "label": 1},
    {"q": "The opposite of hot is", "choices": [" blue", " loud", " cold"], "label": 2},
    {"q": "A week has seven", "choices": [" days", " hours", " years"], "label": 0},
    {"q": "The sun rises in the", "choices": [" west", " east", " north"], "label": 1},
    {"q": "Bees make", "choices": [" honey", " milk", " silk"], "label": 0},
]
TINY_GEN = [{"q": "ab", "a": "c"}, {"q": "ba", "a": "b"}, {"q": "cab", "a": "a"}]
TINY_MC = [{"q": "ab", "choices": ["c", "d", "e"], "label": 0},
           {"q": "ba", "choices": ["a", "b", "c"], "label": 1}]


def write_tasks(d: Path, tiny: bool) -> None:
    gen, mc = (TINY_GEN, TINY_MC) if tiny else (GEN_ROWS, MC_ROWS)
    for name, rows in (("gen", gen), ("mc", mc)):
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = lambda name: (  # noqa: E731
        f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {d / name}.jsonl\n"
        "test_split: test\ndoc_to_text: \"{{q}}\"\n")
    until = '["b", "\\n"]' if tiny else '["\\n", "."]'
    (d / "commitllm_gen.yaml").write_text(
        "task: commitllm_gen\n" + common("gen") + "output_type: generate_until\n"
        "doc_to_target: \"{{a}}\"\n"
        f"generation_kwargs:\n  until: {until}\n  max_gen_toks: 8\n"
        "metric_list:\n  - metric: exact_match\n")
    (d / "commitllm_mc.yaml").write_text(
        "task: commitllm_mc\n" + common("mc") + "output_type: multiple_choice\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{label}}\"\n"
        "metric_list:\n  - metric: acc\n")


def run_lm_eval(exe: str, url: str, tokenizer: Path, tasks: Path, out: Path, concurrent: int,
                max_length: int) -> tuple[dict, dict, float]:
    """(scores by task, responses by task, seconds)."""
    args = (f"model=served,base_url={url}/v1/completions,tokenizer_backend=huggingface,"
            f"tokenizer={tokenizer},max_length={max_length},num_concurrent={concurrent},"
            "max_retries=1")
    t0 = time.perf_counter()
    run = subprocess.run([exe, "--model", "local-completions", "--model_args", args,
                          "--include_path", str(tasks), "--tasks", "commitllm_gen,commitllm_mc",
                          "--log_samples", "--output_path", str(out)],
                         capture_output=True, text=True, timeout=3600, cwd=out.parent)
    wall = time.perf_counter() - t0
    if run.returncode != 0:
        raise RuntimeError(f"lm_eval failed:\n{run.stderr[-3000:]}")
    res = json.loads(next(out.rglob("results_*.json")).read_text())["results"]
    scores = {t: {k: v for k, v in r.items() if isinstance(v, (int, float))}
              for t, r in res.items()}
    responses = {}
    for f in out.rglob("samples_*.jsonl"):
        task = f.name.split("samples_")[1].rsplit("_", 1)[0]
        rows = sorted((json.loads(x) for x in f.read_text().splitlines()),
                      key=lambda s: s["doc_id"])
        responses[task] = [s["filtered_resps"] for s in rows]
    return scores, responses, wall


def audit_server(url: str, key: Path) -> dict:
    run = subprocess.run([sys.executable, "-c", "from commitllm.verifier.cli import app; app()",
                          "audit", "--server", url, "--key", str(key), "--rate", "1",
                          "--tier", "routine", "--json"], capture_output=True, text=True,
                         timeout=3600)
    doc = json.loads(run.stdout)
    rows = doc["rows"]
    return {"exit": run.returncode, "audited": len(rows),
            "accepted": sum(1 for r in rows if r["accepted"]),
            "rejected": [f"{r.get('receipt_id', '?')[:12]}: {r.get('reason')}" for r in rows
                         if not r["accepted"]][:10]}


def measure(args) -> dict:
    from commitllm.engine.loader import resolve_model

    runs = []
    with tempfile.TemporaryDirectory(prefix="lm-eval-") as tmp:
        tmp = Path(tmp)
        model = serving_model(args.model, tmp)
        folder = Path(model) if model != "default" else resolve_model("default")
        write_tasks(tmp, args.model == "tiny")
        keygen(model, tmp / "key")
        for c in args.concurrency:
            port = free_port()
            proc = start_server(model, tmp / f"store-{c}", port, "--served-name", "served")
            url = f"http://127.0.0.1:{port}"
            try:
                load = others_share(2.0)
                print(f"lm-eval at {c} concurrent ...", file=sys.stderr, flush=True)
                scores, responses, wall = run_lm_eval(args.lm_eval, url, folder, tmp,
                                                      tmp / f"out-{c}", c, args.max_length)
                with __import__("urllib.request").request.urlopen(f"{url}/v1/stats") as r:
                    stats = json.loads(r.read())
                audit = audit_server(url, tmp / "key")
            finally:
                proc.terminate()
                proc.wait(timeout=60)
            runs.append({"concurrent": c, "scores": scores, "responses": responses,
                         "wall_s": wall, "requests": stats["requests"],
                         "largest_batch": stats["largest_batch"],
                         "mean_batch": stats["mean_batch"], "audit": audit,
                         "others_share_before": load})
    base = runs[0]["responses"]
    for r in runs:
        r["same_answers_as_first"] = r["responses"] == base
    return {"model": args.model, "runs": runs}


def markdown(data: dict) -> str:
    parts = ["# lm-evaluation-harness against the server (bench/lm_eval.py)",
             provenance_md(data["provenance"]),
             "lm-eval's `local-completions` model against `commitllm-engine serve` (continuous "
             "batching, prefix cache on): a generate-until task with stop sequences and a "
             "multiple-choice task by log-likelihood (token-id prompts, echo, logprobs), both "
             "from local files written by the script; then `commitllm audit --rate 1` over "
             "every receipt the server made. 'same answers' compares every sample's response "
             "with the first (lowest) concurrency's."]
    for m in data["models"].values():
        rows = []
        for r in m["runs"]:
            sc = "; ".join(f"{t}: " + ", ".join(f"{k.split(',')[0]} {v:.3f}"
                                                 for k, v in s.items()
                                                 if "stderr" not in k and k != "sample_len")
                           for t, s in sorted(r["scores"].items()))
            a = r["audit"]
            rows.append([r["concurrent"], sc, f"{r['wall_s']:.1f}", r["requests"],
                         f"{r['mean_batch']:.2f} / {r['largest_batch']}",
                         "yes" if r["same_answers_as_first"] else "NO",
                         f"{a['accepted']}/{a['audited']}"])
        parts.append(f"## {m['model']}")
        parts.append(md_table(["concurrent", "scores", "wall (s)", "requests",
                               "batch mean / max", "same answers", "receipts accepted"], rows))
    return "\n\n".join(parts)


def _csv(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default", help="default, tiny, or an HF folder")
    ap.add_argument("--concurrency", type=_csv, default=[1, 4])
    ap.add_argument("--lm-eval", default=os.environ.get("LM_EVAL") or shutil.which("lm_eval"))
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if not args.lm_eval:
        print("error: the lm_eval command was not found (--lm-eval PATH or $LM_EVAL)",
              file=sys.stderr)
        return 2
    if args.model == "tiny":
        args.max_length = min(args.max_length, 256)
    run = measure(args)
    data = record_model_run(args.out, "lm_eval", args.model, run, markdown)
    print(markdown(data))
    ok = all(r["same_answers_as_first"] and r["audit"]["exit"] == 0
             and r["audit"]["accepted"] == r["audit"]["audited"] > 0 for r in run["runs"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
