"""Generation throughput: the exact engine (w8a16) against transformers fp32 `generate`.

Same machine, same chat-templated prompts (token ids from our tokenizer fed to both), greedy,
exactly `--new-tokens` new tokens per sequence (eos ignored: ours gets no eos ids, transformers gets
min_new_tokens = max_new_tokens), at batch 1 and batch 8. Transformers batches are left-padded with
an attention mask; ours takes the ragged prompts as they are.

Per configuration: one short warm-up run each, then timed runs, ours and transformers
alternating run by run (the machine's speed drifts); median and spread. Reported:
end-to-end tokens/s (new tokens / wall time, prefill included), time to first token (prefill and
the first pick), decode tokens/s over the remaining tokens, and the linear-layer work rate
2 * N_linear * tokens / time (N_linear: weights of every linear incl. the LM head; attention
excluded, under 4 % at these lengths).

    python bench/generate.py [--new-tokens 128] [--batches 1,8] [--runs 5] [--runs-batched 3]
                             [--long-prompt 2048] [--long-new-tokens 64] [--long-runs 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable from the repo root
    sys.path.append(str(Path(__file__).resolve().parents[1]))  # last: kernels/ must not shadow HF kernels
from bench.common import (
    RESULTS,
    md_table,
    provenance,
    provenance_md,
    time_interleaved,
    wait_for_quiet,
    write_results,
)

PROMPTS = (
    "Write a short poem about the sea.",
    "Explain how a refrigerator keeps food cold, in simple terms.",
    "Give me three tips for learning a new language.",
    "What is the difference between a virus and a bacterium?",
    "Summarize the plot of a heist movie you invent, in one paragraph.",
    "Write a Python function that checks whether a number is prime.",
    "List the planets of the solar system with one fact about each.",
    "Draft a polite email asking a colleague to review my report by Friday.",
)
WARMUP_TOKENS = 16  # the warm-up run only has to touch every code path once


@dataclass
class Run:
    """One generate call: wall seconds, seconds to the first new token, new tokens per sequence."""

    seconds: float
    ttft: float
    new_tokens: list[list[int]]


Generator = Callable[[list[list[int]], int], Run]  # (prompts, new tokens) -> Run


def linear_params(cfg) -> int:
    """Weights of every linear layer, the LM head included (what each token multiplies through)."""
    h, inter = cfg.hidden_size, cfg.intermediate_size
    per_layer = h * (cfg.q_size + 2 * cfg.kv_size) + cfg.q_size * h + 3 * h * inter
    return cfg.num_layers * per_layer + cfg.vocab_size * h


def exact_generator(model) -> Generator:
    """generate_exact, greedy, no eos: the time of the first on_token call is the TTFT."""
    from commitllm.engine.generate import generate_exact
    from commitllm.verifier.numerics.sampler import SamplingParams

    def run(prompts: list[list[int]], n: int) -> Run:
        first: list[float] = []
        t0 = time.perf_counter()
        res = generate_exact(model, prompts, SamplingParams(), n, (),
                             on_token=lambda i, t: first or first.append(time.perf_counter()))
        dt = time.perf_counter() - t0
        return Run(dt, first[0] - t0, [r.token_ids for r in res])
    return run


def hf_generator(model, pad_id: int) -> Generator:
    """transformers generate, greedy, left padding; a logits processor marks the first step."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    class FirstStep(LogitsProcessor):
        def __init__(self):
            self.at: float | None = None

        def __call__(self, input_ids, scores):
            if self.at is None:
                self.at = time.perf_counter()
            return scores

    @torch.inference_mode()
    def run(prompts: list[list[int]], n: int) -> Run:
        ids, mask = left_pad(prompts, pad_id)
        mark = FirstStep()
        t0 = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                             min_new_tokens=n, pad_token_id=pad_id,
                             logits_processor=LogitsProcessorList([mark]))
        dt = time.perf_counter() - t0
        return Run(dt, mark.at - t0, out[:, ids.shape[1]:].tolist())
    return run


def left_pad(prompts: list[list[int]], pad_id: int):
    """Left-padded ids [B, L] and attention mask [B, L] (int64)."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def measure(gens: dict[str, Generator], prompts: list[list[int]], batch: int, n: int,
            runs: int, quiet: dict | None = None) -> list[dict]:
    """Per generator: a warm-up run, then `runs` timed runs of `batch` prompts (run i starts at
    prompt i * batch), the generators alternating run by run. quiet (keyword arguments of
    time_interleaved: before / accept / retries) keeps other jobs' CPU use out of the figures."""
    def pick(i: int) -> list[list[int]]:
        return [prompts[(max(i, 0) * batch + j) % len(prompts)] for j in range(batch)]

    for gen in gens.values():
        gen(pick(0), WARMUP_TOKENS)  # warm-up: a short run touches every code path
    timed = time_interleaved({k: (lambda i, g=g: g(pick(i), n)) for k, g in gens.items()},
                             runs, warmup=0, **(quiet or {}))
    rows = []
    for name, (timing, outs) in timed.items():
        for r in outs:
            if any(len(t) != n for t in r.new_tokens):
                raise RuntimeError(f"{name}: expected exactly {n} new tokens per sequence, got "
                                   f"{[len(t) for t in r.new_tokens]}")
        rows.append({"engine": name} | summarize(timing.to_dict(), [r.ttft for r in outs], batch, n)
                    | {"outputs": [r.new_tokens for r in outs]})
    return rows


def summarize(timing: dict, ttfts: list[float], batch: int, n: int) -> dict:
    """Tokens/s figures from the timed runs' median wall time and median TTFT, and tokens per
    CPU-second of this process (less sensitive to other jobs on a shared machine)."""
    import statistics

    med, ttft = timing["median"], statistics.median(ttfts)
    decode = batch * (n - 1) / (med - ttft) if n > 1 and med > ttft else float("nan")
    cpu = statistics.median(timing["cpu"]) if timing.get("cpu") else float("nan")
    if not cpu > 0:  # os.times() ticks are 10 ms: a tiny run can read 0 CPU seconds
        cpu = float("nan")
    return {"batch": batch, "new_tokens": n, "timing_s": timing, "ttft_s": ttfts,
            "ttft_median_s": ttft, "tokens_per_s": batch * n / med,
            "tokens_per_s_min": batch * n / timing["max"],
            "tokens_per_s_max": batch * n / timing["min"], "decode_tokens_per_s": decode,
            "tokens_per_cpu_s": batch * n / cpu}


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two sequences share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def quiet_policy(wait: float, share: float, retries: int, sample: float = 2.0) -> dict:
    """time_interleaved arguments: before each run wait up to `wait` s for other jobs to use at
    most `share` of the cores; repeat (up to `retries` times) a run during which they used more."""
    if wait <= 0:
        return {}
    cores = os.cpu_count() or 1
    return {"before": lambda: wait_for_quiet(share, wait, sample),
            "accept": lambda wall, foreign: foreign is None or foreign <= share * wall * cores,
            "retries": retries}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    ap.add_argument("--runs", type=int, default=5, help="timed runs at batch 1")
    ap.add_argument("--runs-batched", type=int, default=3, help="timed runs at batch > 1")
    ap.add_argument("--profile", default="w8a16", help="numerics profile of the exact engine")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--quiet-wait", type=float, default=120.0,
                    help="before each timed run, wait up to this many seconds for other jobs to "
                         "use at most --quiet-share of the cores (a shared machine)")
    ap.add_argument("--quiet-share", type=float, default=0.25)
    ap.add_argument("--quiet-retries", type=int, default=3,
                    help="with --quiet-wait: repeat a run that other jobs disturbed, this often")
    ap.add_argument("--long-prompt", type=int, default=2048,
                    help="tokens of real text in the long-prompt case at batch 1 (0: skip it)")
    ap.add_argument("--long-new-tokens", type=int, default=64)
    ap.add_argument("--long-runs", type=int, default=2, help="timed runs of the long-prompt case")
    ap.add_argument("--long-text", type=Path, default=Path("/usr/share/common-licenses/GPL-3"),
                    help="text the long prompt is cut from")
    ap.add_argument("--out", type=Path, default=RESULTS)
    return ap.parse_args(argv)


def load(profile: str):
    """Our exact model, the transformers fp32 model, the chat prompts, the pad id, N_linear."""
    import torch
    from commitllm.engine.exact.model import ExactModel
    from commitllm.engine.loader import default_gguf, load_model
    from commitllm.verifier.numerics import get_profile

    from bench.accuracy import load_hf

    loaded = load_model("default")
    ours = ExactModel(loaded.quantized(get_profile(profile)))
    hf = load_hf(default_gguf(), "float32")
    tok = loaded.tokenizer
    prompts = [tok.encode_chat([{"role": "user", "content": t}]) for t in PROMPTS]
    pad = hf.generation_config.pad_token_id
    pad = pad if pad is not None else loaded.cfg.eos_token_ids[0]
    return ours, hf, prompts, pad, linear_params(loaded.cfg), torch.get_num_threads(), tok


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    ours, hf, prompts, pad, n_lin, threads, tok = load(args.profile)

    quiet = quiet_policy(args.quiet_wait, args.quiet_share, args.quiet_retries)
    gens = {f"commitllm exact ({args.profile})": exact_generator(ours),
            "transformers fp32": hf_generator(hf, pad)}
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        runs = args.runs if batch == 1 else args.runs_batched
        for r in measure(gens, prompts, batch, args.new_tokens, runs, quiet):
            r["gop_per_s"] = r["tokens_per_s"] * 2 * n_lin / 1e9
            rows.append(r | {"case": "chat"})
            print(_line(r), flush=True)
    if args.long_prompt:
        ids = tok.encode(args.long_text.read_text(encoding="utf-8"))
        if len(ids) < args.long_prompt:
            raise SystemExit(f"{args.long_text}: {len(ids)} tokens, fewer than --long-prompt")
        long = [ids[:args.long_prompt]]
        for r in measure(gens, long, 1, args.long_new_tokens, args.long_runs, quiet):
            r["gop_per_s"] = r["tokens_per_s"] * 2 * n_lin / 1e9
            rows.append(r | {"case": f"prompt {args.long_prompt}"})
            print(_line(r), flush=True)
    data = _report(args, prompts, rows, n_lin, threads, time.perf_counter() - start)
    for c in data["ratios"]:
        print(f"{c['case']}, batch {c['batch']}: ours / transformers = {c['tokens_per_s_ratio']:.3f} "
              f"(end-to-end tokens/s), TTFT ratio {c['ttft_ratio']:.3f}")
    js, md = write_results(args.out, "generate", data, render_md(data))
    print(f"wrote {js} and {md} ({data['elapsed_s']:.0f} s)")
    return 0


def _line(r: dict) -> str:
    t = r["timing_s"]
    return (f"{r['engine']:>26} batch {r['batch']}: {r['tokens_per_s']:7.2f} tok/s "
            f"(median of {len(t['runs'])}, spread {100 * t['spread']:.1f} %), TTFT "
            f"{r['ttft_median_s']:.3f} s, decode {r['decode_tokens_per_s']:.2f} tok/s, "
            f"{r['tokens_per_cpu_s']:.2f} tok/CPU-s, other jobs {_pct(t['contention'])}")


def _report(args, prompts, rows, n_lin, threads, elapsed) -> dict:
    ratios = []
    for case, batch in dict.fromkeys((r["case"], r["batch"]) for r in rows):
        ours, hf = (r for r in rows if r["batch"] == batch and r["case"] == case)
        ratios.append({"case": case, "batch": batch,
                       "tokens_per_s_ratio": ours["tokens_per_s"] / hf["tokens_per_s"],
                       "decode_ratio": ours["decode_tokens_per_s"] / hf["decode_tokens_per_s"],
                       "ttft_ratio": ours["ttft_median_s"] / hf["ttft_median_s"],
                       "tokens_per_cpu_s_ratio": ours["tokens_per_cpu_s"] / hf["tokens_per_cpu_s"]})
    b1 = [r for r in rows if r["batch"] == 1 and r["case"] == "chat"]
    # outputs: per run, per sequence; batch 1 has one sequence per run
    agree = ([common_prefix(a[0], b[0]) for a, b in zip(b1[0]["outputs"], b1[1]["outputs"])]
             if len(b1) == 2 else [])
    for r in rows:
        r["outputs"] = [[len(t) for t in o] for o in r.pop("outputs")]  # keep only the lengths
    return {"benchmark": "generate", "provenance": provenance(),
            "settings": {"new_tokens": args.new_tokens, "greedy": True, "eos": "ignored",
                         "warmup_tokens": WARMUP_TOKENS, "profile": args.profile,
                         "torch_threads": threads, "quiet_wait_s": args.quiet_wait,
                         "quiet_share": args.quiet_share, "quiet_retries": args.quiet_retries,
                         "prompt_lengths": [len(p) for p in prompts], "prompts": list(PROMPTS),
                         "linear_params": n_lin, "long_prompt": args.long_prompt,
                         "long_new_tokens": args.long_new_tokens, "long_runs": args.long_runs,
                         "long_text": str(args.long_text)},
            "results": rows, "ratios": ratios,
            "batch1_common_prefix_tokens": agree, "elapsed_s": round(elapsed, 1)}


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f} %"


def render_md(d: dict) -> str:
    """The report as Markdown: provenance, settings, the throughput table, the ratios."""
    s = d["settings"]
    rows = [[r["engine"], r.get("case", "chat"), r["batch"], f"{r['tokens_per_s']:.2f}",
             f"{r['tokens_per_s_min']:.2f}-{r['tokens_per_s_max']:.2f}",
             f"{100 * r['timing_s']['spread']:.1f} %", len(r["timing_s"]["runs"]),
             f"{r['ttft_median_s']:.3f}", f"{r['decode_tokens_per_s']:.2f}",
             f"{r['gop_per_s']:.2f}", f"{r['tokens_per_cpu_s']:.2f}",
             _pct(r["timing_s"]["contention"]), r["timing_s"].get("discarded", 0)]
            for r in d["results"]]
    ratios = [[c.get("case", "chat"), c["batch"], f"{c['tokens_per_s_ratio']:.3f}", f"{c['decode_ratio']:.3f}",
               f"{c['ttft_ratio']:.3f}", f"{c['tokens_per_cpu_s_ratio']:.3f}"]
              for c in d["ratios"]]
    return "\n\n".join([
        "# Generation throughput: exact engine vs transformers fp32",
        provenance_md(d["provenance"]),
        _settings_md(s),
        md_table(["engine", "case", "batch", "tokens/s (median)", "range", "spread", "runs",
                  "TTFT s (median)", "decode tokens/s", "GOP/s", "tokens per CPU-s",
                  "other jobs' CPU", "runs repeated"], rows),
        md_table(["case", "batch", "ours / transformers tokens/s", "decode ratio", "TTFT ratio",
                  "tokens per CPU-s ratio"], ratios),
        ("\"other jobs' CPU\": CPU time that other processes on the machine used during the "
         "timed runs, as a share of all cores (from /proc/stat minus this process's own CPU time); "
         "on a shared machine it says how much the wall-clock figures are disturbed. Tokens per "
         "CPU-s (this process's user + system time) is less sensitive to it, not immune."),
        (f"Greedy outputs at batch 1, tokens shared before the first difference (ours vs "
         f"transformers fp32): {d['batch1_common_prefix_tokens']}."),
        f"Total run time {d['elapsed_s']:.0f} s.",
    ])


def _settings_md(s: dict) -> str:
    return (
        f"SmolLM2-135M-Instruct, {len(s['prompts'])} chat prompts of {min(s['prompt_lengths'])}-"
        f"{max(s['prompt_lengths'])} tokens (batch 1: run i uses prompt i; batch 8: all), greedy, "
        f"exactly {s['new_tokens']} new tokens per sequence (eos ignored). One warm-up run of "
        f"{s['warmup_tokens']} tokens each, then timed runs, the two engines alternating. "
        f"tokens/s = batch x new tokens / wall time (prefill included); decode = batch x (new - 1)"
        f" / (wall - TTFT); GOP/s = tokens/s x 2 x {s['linear_params'] / 1e6:.1f} M linear weights "
        f"(integer ops for ours, fp32 FLOPs for transformers; attention excluded). torch threads "
        f"{s['torch_threads']}; before each timed run, waited up to {s['quiet_wait_s']:.0f} s for "
        f"other jobs to use <= {100 * s['quiet_share']:.0f} % of the cores, and repeated (up to "
        f"{s.get('quiet_retries', 0)} times) a run during which they used more (0 s: no waiting, "
        f"no repeats)." + (
            f" Case 'prompt {s['long_prompt']}': the first {s['long_prompt']} tokens of "
            f"{s['long_text']} as one prompt (no chat template), {s['long_new_tokens']} new "
            f"tokens, {s['long_runs']} timed runs; its TTFT is the long prefill."
            if s.get("long_prompt") else ""))


if __name__ == "__main__":
    sys.exit(main())
