"""Tensor-parallel throughput: tokens/s of the exact engine at TP 1, 2 and 3 (gloo, CPU processes
on this machine), and a check that every degree produced the same token ids.

Two models: SmolLM2-135M-Instruct (9 heads over 3 K/V heads: TP 1 and 3 divide, TP 2 does not)
and a random model of SmolLM2's sizes with 12 heads over 6 K/V heads (head_dim 48), which splits
by 2 and 3. Throughput depends on the shapes, not on the weights' values. Greedy, eos ignored,
`--new-tokens` per run, batch 1, one untimed warm-up, the median of `--runs`.

On a 2-core CPU no speed-up is expected (the ranks share the same cores and every layer adds four
collectives); the point of TP here is that the results are the same bits. The engine's TP path is
CPU-only (torch backend over gloo): there is no GPU figure until the Triton backend is sharded.

    python bench/tp.py [--tp 1,2,3] [--new-tokens 32] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable from the repo root
    sys.path.append(str(Path(__file__).resolve().parents[1]))  # last: kernels/ must not shadow HF kernels
from bench.common import RESULTS, md_table, provenance, provenance_md, time_runs, write_results

PROMPT = "Explain how a refrigerator keeps food cold, in simple terms."
SPLITTABLE = {"hidden_size": 576, "num_attention_heads": 12, "num_key_value_heads": 6,
              "head_dim": 48, "intermediate_size": 1536, "num_hidden_layers": 30,
              "vocab_size": 49152, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
              "rope_theta": 100000.0, "tie_word_embeddings": True, "bos_token_id": 1,
              "eos_token_id": 2, "hidden_act": "silu"}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tp", default="1,2,3", help="degrees to run (those that do not divide a "
                                                 "model's shapes are reported as refused)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--timeout", type=float, default=120.0, help="collective timeout, seconds")
    p.add_argument("--out", type=Path, default=RESULTS)
    return p.parse_args(argv)


def splittable_model(folder: Path) -> Path:
    """A random Llama of SmolLM2's sizes with 12/6 heads, saved as an HF folder (fp32)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**SPLITTABLE), dtype=torch.float32)
    model.save_pretrained(folder)
    return folder


class CommClock:
    """Wall seconds rank 0 spends inside collectives (its Comm's methods, wrapped on the
    instance): the transfer itself and the wait for the other ranks to arrive."""

    def __init__(self, comm):
        self.seconds, self.calls = 0.0, 0
        for name in ("sum_", "max_", "gather", "broadcast"):
            setattr(comm, name, self._wrap(getattr(comm, name)))

    def _wrap(self, fn):
        def timed(t):
            t0 = time.perf_counter()
            try:
                return fn(t)
            finally:
                self.seconds += time.perf_counter() - t0
                self.calls += 1
        return timed


def in_collectives(model, run) -> tuple[float, int]:
    """(share of one run's wall time rank 0 spent in collectives, collectives per run)."""
    clock = CommClock(model.comm)
    t0 = time.perf_counter()
    run(0)
    return clock.seconds / (time.perf_counter() - t0), clock.calls


def collective_ms(model, n: int = 100) -> float:
    """Milliseconds per small collective: n empty commands (two broadcasts each) to the ranks.
    A decode step at TP > 1 makes 4 per layer plus 3 (command, logits gather)."""
    model.heartbeat()
    t0 = time.perf_counter()
    for _ in range(n):
        model.heartbeat()
    return (time.perf_counter() - t0) * 1e3 / (2 * n)


def measure(name: str, model_arg: str, degrees: list[int], args) -> list[dict]:
    import torch
    from commitllm.engine.exact.model import ExactModel
    from commitllm.engine.generate import generate_exact
    from commitllm.engine.loader import load_model
    from commitllm.engine.tp.launch import start
    from commitllm.engine.tp.shard import ShapeError, make_plan
    from commitllm.verifier.numerics import get_profile
    from commitllm.verifier.numerics.sampler import SamplingParams

    loaded = load_model(model_arg, need_tokenizer=False)
    prof = get_profile("w8a16")
    qm = loaded.quantized(prof)
    prompt = [list(range(100, 100 + 13))]  # token ids: the random model has no tokenizer
    rows = []
    for tp in degrees:
        try:
            make_plan(loaded.cfg, 0, tp)
        except ShapeError as e:
            rows.append({"model": name, "tp": tp, "refused": str(e)})
            print(f"{name} TP {tp}: refused ({e})", flush=True)
            continue
        threads = torch.get_num_threads()  # start() gives rank 0 its share of the cores
        eng = None if tp == 1 else start(model_arg, lambda: qm, loaded.cfg, tp, args.timeout)
        model = ExactModel(qm) if eng is None else eng.model
        run = lambda i, m=model: generate_exact(
            m, prompt, SamplingParams(), args.new_tokens, ())[0].token_ids
        try:
            timing, outs = time_runs(run, args.runs)
            latency = None if eng is None else collective_ms(eng.model)
            share, calls = (None, None) if eng is None else in_collectives(eng.model, run)
        finally:
            if eng is not None:
                eng.close()
            torch.set_num_threads(threads)
        rows.append({"model": name, "tp": tp, "tokens_per_s": args.new_tokens / timing.median,
                     "torch_threads_rank0": torch.get_num_threads(),
                     "collective_ms": latency, "collectives_per_run": calls,
                     "share_of_time_in_collectives": share,
                     "timing_s": timing.to_dict(), "token_ids": outs[0],
                     "same_ids_every_run": all(o == outs[0] for o in outs)})
        print(f"{name} TP {tp}: {rows[-1]['tokens_per_s']:.2f} tokens/s "
              f"(median of {args.runs}, spread {100 * timing.spread:.0f} %)", flush=True)
    ran = [r for r in rows if "token_ids" in r]
    for r in ran:
        r["same_ids_as_tp1"] = r["token_ids"] == ran[0]["token_ids"] if ran else None
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0, load_before = time.perf_counter(), _loadavg()
    degrees = [int(x) for x in args.tp.split(",")]
    rows = measure("SmolLM2-135M (9/3 heads)", "default", degrees, args)
    with tempfile.TemporaryDirectory(prefix="tp-bench-") as tmp:
        folder = splittable_model(Path(tmp))
        rows += measure("random, SmolLM2 sizes, 12/6 heads", str(folder), degrees, args)
    data = {"benchmark": "tp", "provenance": provenance(),
            "settings": {"new_tokens": args.new_tokens, "runs": args.runs, "batch": 1,
                         "greedy": True, "profile": "w8a16", "backend": "gloo (CPU)",
                         "degrees": degrees},
            "load_average_1_5_15": {"before": load_before, "after": _loadavg()},
            "results": rows, "elapsed_s": round(time.perf_counter() - t0, 1)}
    js, md = write_results(args.out, "tp", data, render_md(data))
    print(f"wrote {js} and {md}")
    return 0 if all(r.get("same_ids_as_tp1", True) for r in rows) else 1


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def render_md(d: dict) -> str:
    rows = []
    for r in d["results"]:
        if "refused" in r:
            rows.append([r["model"], r["tp"], "refused", "", "", "", "", "", r["refused"]])
            continue
        t = r["timing_s"]
        other = "n/a" if t["contention"] is None else f"{100 * t['contention']:.0f} %"
        rows.append([r["model"], r["tp"], f"{r['tokens_per_s']:.2f}",
                     f"{100 * t['spread']:.0f} %", other,
                     "yes" if r["same_ids_as_tp1"] and r["same_ids_every_run"] else "NO",
                     "" if r["collective_ms"] is None else f"{r['collective_ms']:.2f}",
                     "" if r["share_of_time_in_collectives"] is None else
                     f"{100 * r['share_of_time_in_collectives']:.0f} % "
                     f"({r['collectives_per_run']} calls)", ""])
    s = d["settings"]
    return "\n\n".join([
        "# Tensor parallelism: throughput and identical outputs across degrees",
        provenance_md(d["provenance"]),
        (f"- batch {s['batch']}, greedy, {s['new_tokens']} new tokens per run (eos ignored), "
         f"median of {s['runs']} runs after one warm-up; profile {s['profile']}; {s['backend']}"),
        (f"- machine load average (1, 5, 15 min) before: {d['load_average_1_5_15']['before']}, "
         f"after: {d['load_average_1_5_15']['after']}"),
        md_table(["model", "TP", "tokens/s", "spread", "CPU of other processes", "same ids as TP 1",
                  "ms per collective (idle)", "time in collectives", "note"], rows),
        ("\"CPU of other processes\" counts the follower ranks too (they are other processes), so "
         "at TP > 1 it is not only foreign load (at TP 1 it is: other jobs on this shared machine). On a "
         "2-core machine the ranks share the cores: no speed-up is expected, the figure shows the "
         "cost of the collectives: a decode step makes 4 per layer (a MAX and a SUM for `o` and for "
         "`down`) plus a command broadcast and the logits gather, each a round trip between "
         "processes. \"ms per collective (idle)\" is the round trip of an empty command; \"time in "
         "collectives\" is the share of one run's wall time rank 0 spent inside collectives, "
         "waiting for the other ranks included (their compute runs on the same cores). Receipts and openings are checked byte for byte by "
         "tests/test_tp.py."),
        f"Total run time {d['elapsed_s']:.0f} s.",
    ])


if __name__ == "__main__":
    sys.exit(main())
