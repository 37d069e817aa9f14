"""Protocol costs on the default model: receipt and opening sizes, verifier time, commitment
overhead, re-execution time, and what the provider retains.

Per context (about N trace positions: a plain-text prompt of N - g tokens cut from --text, then g
generated tokens): --gen-runs generations with receipts (the first is audited), then per tier
(routine, full, deep) one challenge (fixed nonce), --open-runs openings by re-execution, the
opening's container bytes (what travels), and --verify-runs verifications of the deserialized
opening after one warm-up. Times are medians with spread = (max - min) / median.

- opening bytes per challenged position = container bytes / challenged positions, with a
  breakdown by kind (layer accumulators, K/V-sample accumulators, K/V rows, residual rows, LM-head
  accumulators, embedding rows, proofs, indices, container header);
- verifier ms per challenged position from Verdict.timing: Freivalds, attention replay, the rest
  of the replay (norms, RoPE, quantization, SwiGLU, sampling) and "other" = total minus those three
  (receipt hashes, IO chain and binding, Merkle proofs, embedding rows);
- receipt overhead = generate_with_receipts wall time / plain generate_exact wall time - 1 (runs
  alternating; from the medians, and from the fastest runs), which includes recording the
  residual rows during generation;
- commitment overhead = Signed.commit_seconds / Signed.gen_seconds, and its trace-only share
  (time inside trace_roots, wrapped during the call); the rest is the manifest and receipt
  (model commitment and tokenizer hashes are cached per model after the first request; a fresh
  Committer's manifest is timed alone to show it);
- re-execution relative to generation = open seconds / generation seconds of the same context;
- retained: the transcript store file, split into token ids, request and output text, and the rest
  (fixed size whatever the length: hashes, manifest, seed, salt).

A separate scenario (a chat prompt + g generated tokens, --overhead-runs runs) gives the
commitment overhead of a decode-dominated request with median and spread.

    python bench/protocol.py [--contexts 64,256,512] [--gen-tokens 32] [--deep-max 512]
                             [--gen-runs 3] [--open-runs 3] [--verify-runs 5]
                             [--deep-verify-runs 2] [--overhead-runs 5] [--out bench/results]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

if __package__ in (None, ""):  # run as a script: make `bench` importable from the repo root
    sys.path.append(str(Path(__file__).resolve().parents[1]))  # last: kernels/ must not shadow HF kernels
from bench.accuracy import DEFAULT_TEXT
from bench.common import (
    RESULTS,
    Timing,
    md_table,
    provenance,
    provenance_md,
    time_interleaved,
    time_runs,
    wait_for_quiet,
    write_results,
)

TIERS = ("routine", "full", "deep")
CHAT_PROMPT = "Write a short story about a robot."
PARTS = ("freivalds", "attention", "rest", "other", "total")
SPANS = ("merkle", "decode")  # overlapping spans: merkle within other, decode within the replay


@dataclass
class Setup:
    """What every measurement needs: the engine, the verifier's key and the request settings."""

    model: object  # ExactModel
    tokenizer: object | None  # provider's tokenizer (receipt text); None for token-only models
    key: object  # keys.keygen.Key
    io_tokenizer: object | None  # the key's tokenizer: the verifier's input/output binding
    params: object  # SamplingParams
    eos_ids: tuple[int, ...]
    before: Callable[[], object] = lambda: None  # ahead of each timed generation or opening


def load_setup(model: str, profile: str, temperature: float, seed: int,
               quiet: float = 0.0) -> Setup:
    """The default model quantized with `profile`, its cached key, greedy or sampled decoding;
    quiet > 0: before each timed generation or opening, wait (up to 5 s) until other processes
    use at most that share of the cores over half a second."""
    from commitllm.engine.exact.model import ExactModel
    from commitllm.engine.loader import load_model
    from commitllm.engine.receipts import cached_key
    from commitllm.keys.keygen import key_tokenizer
    from commitllm.verifier.numerics import get_profile
    from commitllm.verifier.numerics.sampler import SamplingParams

    lm = load_model(model)
    qm = lm.quantized(get_profile(profile))
    key = cached_key(qm, lm.tokenizer)
    eos = tuple(sorted(set(lm.cfg.eos_token_ids) | set(lm.tokenizer.eos_token_ids)))
    params = SamplingParams(temperature, 50, 0.95, seed) if temperature > 0 else SamplingParams()
    before = (lambda: wait_for_quiet(quiet, 5.0, sample=0.5)) if quiet > 0 else (lambda: None)
    return Setup(ExactModel(qm), lm.tokenizer, key, key_tokenizer(key), params, eos, before)


def text_prompt(tokenizer, text: str, n: int) -> tuple[dict, list[int]]:
    """A request whose prompt is the text of the first n tokens of `text` (re-encoded, so the
    verifier's input binding re-derives exactly these ids; the count may differ by a token)."""
    s = tokenizer.decode(tokenizer.encode(text)[:n])
    return {"prompt": s}, tokenizer.encode(s)


def sign(setup: Setup, request: dict, prompt: list[int], gen_tokens: int,
         prefill_chunk: int = 0):
    """One generation with a receipt: (engine.receipts.Signed, seconds spent in trace_roots).

    trace_roots (the Merkle trees over residuals and K/V rows, the only per-token part of
    committing) is wrapped for the call, so its share of commit_seconds is measured, not inferred.
    """
    from commitllm.engine import receipts

    spent, inner = [], receipts.trace_roots

    def timed(*args):
        t0 = time.perf_counter()
        out = inner(*args)
        spent.append(time.perf_counter() - t0)
        return out

    with mock.patch.object(receipts, "trace_roots", timed):
        s = receipts.generate_with_receipts(setup.model, setup.tokenizer, [request],
                                            [prompt], setup.params, gen_tokens, setup.eos_ids,
                                            "bench-nonce", prefill_chunk=prefill_chunk)
    return s, sum(spent)


def _kind(name: str) -> str:
    if name.endswith((".proof", "layer_roots")):
        return "proofs"
    if name.endswith(".pos") or name == "embed.ids":
        return "indices"
    for prefix, k in (("z.lm", "lm_head_acc"), ("zq.", "kv_sample_acc"),
                      ("z.", "layer_acc"), ("kv.", "kv_rows"), ("resid.", "residual_rows"),
                      ("embed.", "embed_rows")):
        if name.startswith(prefix):
            return k
    return "other"


def breakdown(arrays: dict, total: int) -> dict:
    """Opening bytes by kind; the container header is what the arrays do not account for."""
    out: dict[str, int] = {}
    for name, a in arrays.items():
        out[_kind(name)] = out.get(_kind(name), 0) + int(a.nbytes)
    out["header"] = total - sum(out.values())
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def v1_extra_bytes(arrays: dict) -> dict:
    """By kind, the bytes the same opening's accumulators would add as int64 (opening version 1)
    over their packed widths (version 2): count x (8 - w) for each packed array (u8 [..., w])."""
    import numpy as np

    from commitllm.verifier.opening import _acc_matrix

    out: dict[str, int] = {}
    for name, a in arrays.items():
        if _acc_matrix(name) and a.dtype == np.uint8 and a.ndim >= 2:
            w = a.shape[-1]
            out[_kind(name)] = out.get(_kind(name), 0) + (a.size // w) * (8 - w)
    return out


def verify_parts(timing: dict) -> dict:
    """Verdict.timing (seconds) as the five reported parts; other = total - the replay parts."""
    replay = timing["freivalds"] + timing["attention"] + timing["rest"]
    return {"freivalds": timing["freivalds"], "attention": timing["attention"],
            "rest": timing["rest"], "other": timing["total"] - replay, "total": timing["total"],
            **{k: timing.get(k, 0.0) for k in SPANS}}


def tier_figures(setup: Setup, signed, tier: str, verify_runs: int, nonce: bytes,
                 warmup: int = 1, open_runs: int = 1, also_threads: int = 0,
                 one_core: bool = False, floors: bool = False) -> dict:
    """Challenge, open (`open_runs` timed runs), serialize, verify (`verify_runs` timed runs after
    `warmup` untimed ones) one receipt at one tier; with also_threads > 1, the verification timed
    again with that many layer threads (its verdict must be the one-thread verdict), the compiled
    core's row splits on every core. one_core: the first timing on one thread throughout (the
    compiled core's attention, hashing and GEMM row splits too), else they use every core.
    floors: one more verification on one thread with every compiled call timed as run and warm
    (bench/floors.py), under "floors"; its verdict must be the timed runs'."""
    from commitllm.engine.open import build_opening
    from commitllm.verifier import challenge, container
    from commitllm.verifier.opening import OPENING_MAGIC, OPENING_VERSION
    from commitllm.verifier.verify import verify

    r, tr = signed.receipts[0], signed.transcripts[0]
    c = challenge.derive(setup.key.secret, r, tier, nonce=nonce)
    open_t, opened = time_interleaved({"open": lambda i: build_opening(setup.model, tr, c)},
                                      open_runs, warmup=0, before=setup.before)["open"]
    meta, arrays = opened[-1]
    del opened
    data = container.dumps(OPENING_MAGIC, OPENING_VERSION, meta, arrays)
    parts = breakdown(arrays, len(data))
    extra = v1_extra_bytes(arrays)
    del arrays
    m2, a2 = container.loads(data, OPENING_MAGIC, OPENING_VERSION, len(data))
    io = setup.io_tokenizer is not None  # a key without a tokenizer: io_binding unchecked
    from commitllm.verifier import native

    def run(threads: int = 1):
        return verify(setup.key, r, c, m2, a2, setup.io_tokenizer, io_binding=io, threads=threads)
    with native.thread_budget(1) if one_core else contextlib.nullcontext():
        verify_t, verdicts = time_runs(lambda i: run(), verify_runs, warmup=warmup)
    threaded = None
    if also_threads > 1:
        t_thr, v_thr = time_runs(lambda i: run(also_threads), verify_runs, warmup=warmup)
        if {(v.accepted, v.reason) for v in v_thr} != {(v.accepted, v.reason) for v in verdicts}:
            raise SystemExit(f"{tier}: the verdict with {also_threads} threads differs")
        threaded = {"threads": also_threads,
                    **Timing(tuple(1e3 * v.timing["total"] for v in v_thr)).to_dict()}
    n = len(c["positions"])
    floor = None
    if floors:
        from bench.floors import floor_figures

        floor = floor_figures(run, n, len(c["layers"]))
        if floor is not None and floor["accepted"] != all(v.accepted for v in verdicts):
            raise SystemExit(f"{tier}: the verdict under the floor timers differs")
    per_pos = {p: Timing(tuple(1e3 * verify_parts(v.timing)[p] / n for v in verdicts)).to_dict()
               for p in PARTS + SPANS}
    bad = [v for v in verdicts if not v.accepted]
    return {"tier": tier, "positions": n, "layers": len(c["layers"]),
            "decode_positions": len(c["decode_positions"]),
            "kv_rows_per_layer": c["positions"][-1] + 1,
            "kv_sample_per_layer": max((len(s) for s in c["kv_sample"].values()), default=0),
            "opening_bytes": len(data), "bytes_per_position": len(data) / n,
            "breakdown_bytes": parts, "open_s": open_t.median,
            "opening_bytes_v1": len(data) + sum(extra.values()),
            "breakdown_bytes_v1": {k: v + extra.get(k, 0) for k, v in parts.items()},
            "open_timing_s": open_t.to_dict(),
            "verify_ms_per_position": per_pos, "verify_runs": verify_runs, "warmup": warmup,
            "verify_ms": Timing(tuple(1e3 * v.timing["total"] for v in verdicts)).to_dict(),
            "verify_ms_threaded": threaded, "floors": floor,
            "contention": _worst(open_t.contention, verify_t.contention),
            "accepted": not bad,
            "reject": None if not bad else f"{bad[0].reason}: {bad[0].detail}"}


def _worst(*shares: float | None) -> float | None:
    """The largest contention share measured (None when none could be measured)."""
    known = [x for x in shares if x is not None]
    return max(known) if known else None


def json_len(obj) -> int:
    """Bytes of obj in json.dumps' default form (what the transcript store writes)."""
    return len(json.dumps(obj).encode())


def retained_figures(transcript: dict) -> dict:
    """The transcript store file for this receipt, split into what it consists of."""
    from commitllm.engine.commit import TranscriptStore

    r = transcript["receipt"]
    with tempfile.TemporaryDirectory() as d:
        salt = bytes.fromhex(transcript["salt"])
        path = TranscriptStore(Path(d)).put(r, transcript["seed"], salt,
                                            {"model": "default", "profile": "w8a16"})
        size = path.stat().st_size
    ids = json_len(r["prompt_token_ids"]) + json_len(r["output_token_ids"])
    texts = json_len(r["request"]) + json_len(r["text"])
    tokens = len(r["prompt_token_ids"]) + len(r["output_token_ids"])
    return {"store_bytes": size, "token_id_bytes": ids, "text_bytes": texts,
            "minus_token_ids": size - ids, "fixed_bytes": size - ids - texts, "tokens": tokens}


def retained_per_extra_token(contexts: list[dict]) -> float | None:
    """Growth of the store's non-transcript bytes per extra token, shortest to longest context
    (0 when the provider keeps nothing per token beyond the transcript)."""
    if len(contexts) < 2:
        return None
    a, b = contexts[0]["retained"], contexts[-1]["retained"]
    return (b["fixed_bytes"] - a["fixed_bytes"]) / (b["tokens"] - a["tokens"])


def receipt_figures(r: dict) -> dict:
    """Receipt bytes (compact JSON, as `generate --json` carries it) and its fixed part."""
    size = json_len(r)
    variable = (json_len(r["prompt_token_ids"]) + json_len(r["output_token_ids"])
                + json_len(r["request"]) + json_len(r["text"]))
    return {"bytes": size, "fixed_bytes": size - variable}


def sign_runs(setup: Setup, request: dict, prompt: list[int], gen_tokens: int,
              runs: int) -> tuple[object, dict]:
    """`runs` generations with receipts, alternating with as many plain generations (no
    recording, no commitment): the first Signed, and timings (median, spread) of both, of
    generate_with_receipts' generation and commit parts and of trace_roots, with the overheads."""
    from commitllm.engine.generate import generate_exact

    def plain(_i: int):
        return generate_exact(setup.model, [prompt], setup.params, gen_tokens, setup.eos_ids)

    timed = time_interleaved({"plain": plain,
                              "signed": lambda i: sign(setup, request, prompt, gen_tokens)},
                             runs, warmup=0, before=setup.before)
    (plain_t, _), (signed_t, signed) = timed["plain"], timed["signed"]
    gen = Timing(tuple(x.gen_seconds for x, _ in signed))
    commit = Timing(tuple(x.commit_seconds for x, _ in signed))
    trace = Timing(tuple(t for _, t in signed))
    pct = [100 * x.commit_seconds / x.gen_seconds for x, _ in signed]
    trace_pct = [100 * t / x.gen_seconds for x, t in signed]
    first = signed[0][0]
    return first, {
        "prompt_tokens": len(prompt), "output_tokens": len(first.receipts[0]["output_token_ids"]),
        "runs": runs, "gen_s": gen.median, "commit_s": commit.median, "trace_s": trace.median,
        "plain_s": plain_t.median, "signed_s": signed_t.median,
        "receipt_overhead_pct": 100 * (signed_t.median / plain_t.median - 1),
        # min over runs: the least disturbed run of each, robust to a burst of other jobs
        "receipt_overhead_min_pct": 100 * (min(signed_t.runs) / min(plain_t.runs) - 1),
        "gen_timing_s": gen.to_dict(), "commit_timing_s": commit.to_dict(),
        "trace_timing_s": trace.to_dict(), "plain_timing_s": plain_t.to_dict(),
        "signed_timing_s": signed_t.to_dict(), "overhead_pct_runs": pct,
        "contention": _worst(plain_t.contention, signed_t.contention),
        "overhead_pct": statistics.median(pct), "trace_overhead_pct": statistics.median(trace_pct)}


def context_figures(setup: Setup, request: dict, prompt: list[int], gen_tokens: int,
                    tiers: tuple[str, ...], verify_runs: int, deep_verify_runs: int = 2,
                    gen_runs: int = 1, open_runs: int = 1) -> dict:
    """Generations with receipts, then every tier's opening and verification of the first one
    (the deep tier: `deep_verify_runs` runs without a separate warm-up; seconds per run)."""
    load = os.getloadavg()
    s, gen = sign_runs(setup, request, prompt, gen_tokens, gen_runs)
    r = s.receipts[0]
    out = gen | {"positions": r["trace"]["positions"], "loadavg": load,
                 "receipt": receipt_figures(r), "retained": retained_figures(s.transcripts[0]),
                 "tiers": {}}
    for i, tier in enumerate(tiers):
        runs, warm = (deep_verify_runs, 0) if tier == "deep" else (verify_runs, 1)
        f = tier_figures(setup, s, tier, runs, nonce=bytes([i]) * 16, warmup=warm,
                         open_runs=open_runs)
        out["tiers"][tier] = f | {"open_over_gen": f["open_s"] / gen["gen_s"]}
        _print_tier(out, f)
    return out


def manifest_seconds(setup: Setup, runs: int = 3) -> dict:
    """Time of a fresh Committer's manifest (what every generate_with_receipts call builds): the
    model commitment and tokenizer hashes come from per-model caches after the first request."""
    from commitllm.engine.commit import Committer

    def once(_i: int):
        Committer(setup.model, setup.tokenizer).manifest(setup.params, None, 1, ())
    return time_runs(once, runs, warmup=0)[0].to_dict()


def warm_up(setup: Setup, prompt: list[int]) -> None:
    """The first forward pass is several times slower than later ones: run the flow once."""
    s, _ = sign(setup, {"prompt": "warm-up"}, prompt, 4)
    tier_figures(setup, s, "routine", 1, b"w" * 16)


def _print_tier(ctx: dict, f: dict) -> None:
    ms = f["verify_ms_per_position"]
    verdict = "accepted" if f["accepted"] else f"REJECTED {f['reject']}"
    print(f"  {ctx['positions']:4d} positions {f['tier']:>7}: {f['positions']:3d} x "
          f"{f['layers']} layers, opening {f['opening_bytes'] / 1e6:8.2f} MB "
          f"({f['bytes_per_position'] / 1e3:7.1f} kB/position), open {f['open_s']:.1f} s, "
          f"verify {ms['total']['median']:.2f} ms/position, {verdict}", flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", default="64,256,512", help="target trace positions per context")
    ap.add_argument("--gen-tokens", type=int, default=32, help="generated tokens per context")
    ap.add_argument("--deep-max", type=int, default=512,
                    help="deep tier only up to this many positions (~1.4 MB per position)")
    ap.add_argument("--verify-runs", type=int, default=5, help="timed verifications per tier")
    ap.add_argument("--deep-verify-runs", type=int, default=2,
                    help="timed verifications of the deep tier (no separate warm-up)")
    ap.add_argument("--overhead-runs", type=int, default=5, help="runs of the overhead scenario")
    ap.add_argument("--gen-runs", type=int, default=3, help="generations per context")
    ap.add_argument("--open-runs", type=int, default=3, help="openings per tier")
    ap.add_argument("--quiet", type=float, default=0.25,
                    help="before timed generations and openings, wait (<= 5 s) until other "
                         "processes use at most this share of the cores (0: do not wait)")
    ap.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="plain text for the prompts")
    ap.add_argument("--model", default="default")
    ap.add_argument("--profile", default="w8a16")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--out", type=Path, default=RESULTS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start, load0 = time.perf_counter(), os.getloadavg()
    setup = load_setup(args.model, args.profile, args.temperature, seed=1, quiet=args.quiet)
    tok, text = setup.tokenizer, args.text.read_text()
    chat_ids = tok.encode_chat([{"role": "user", "content": CHAT_PROMPT}])
    warm_up(setup, chat_ids)
    cm = manifest_seconds(setup)
    print(f"manifest of a fresh Committer {cm['median']:.3f} s", flush=True)
    chat_request = {"messages": [{"role": "user", "content": CHAT_PROMPT}]}
    _, over = sign_runs(setup, chat_request, chat_ids, args.gen_tokens, args.overhead_runs)
    print(f"overhead (chat prompt + {over['output_tokens']} tokens): "
          f"{over['overhead_pct']:.1f} % median of {over['runs']}", flush=True)
    contexts = []
    for n in (int(c) for c in args.contexts.split(",")):
        request, prompt = text_prompt(tok, text, n + 1 - args.gen_tokens)
        tiers = tuple(t for t in TIERS if t != "deep" or n <= args.deep_max)
        contexts.append(context_figures(setup, request, prompt, args.gen_tokens, tiers,
                                        args.verify_runs, args.deep_verify_runs,
                                        args.gen_runs, args.open_runs))
    settings = {"model": args.model, "profile": args.profile, "gen_tokens": args.gen_tokens,
                "sampling": setup.params.manifest(), "deep_max": args.deep_max,
                "verify_runs": args.verify_runs, "deep_verify_runs": args.deep_verify_runs,
                "gen_runs": args.gen_runs, "open_runs": args.open_runs, "quiet": args.quiet,
                "text": str(args.text),
                "config": setup.model.qm.cfg.to_hf_dict()}
    data = {"benchmark": "protocol", "provenance": provenance(), "settings": settings,
            "loadavg": {"start": load0, "end": os.getloadavg()}, "manifest_s": cm,
            "overhead": over, "contexts": contexts,
            "retained_bytes_per_extra_token": retained_per_extra_token(contexts),
            "elapsed_s": time.perf_counter() - start}
    js, md = write_results(args.out, "protocol", data, render_md(data))
    print(f"wrote {js} and {md} ({data['elapsed_s']:.0f} s)")
    return 0 if all(t["accepted"] for c in contexts for t in c["tiers"].values()) else 1


# ---- report -------------------------------------------------------------------------------------

def render_md(d: dict) -> str:
    """The report as Markdown: provenance, settings, the tables, the notes."""
    return "\n\n".join([
        "# Protocol costs: receipts, openings, verification, commitment overhead",
        provenance_md(d["provenance"]), _settings_md(d),
        "## Openings and verification per tier\n\n" + _tier_table(d["contexts"]),
        ("verify parts: Freivalds (every opened matmul), attention (replay over the opened K/V "
         "rows), rest (norms, RoPE, quantization, SwiGLU, residual chain, decode policy), other "
         "(receipt hashes, IO chain, tokenizer binding, Merkle proofs, embedding rows). open s: "
         "build_opening (re-execution of the whole transcript, trace trees, proofs), median; "
         "open / gen: that over the context's median generation time."),
        "## Opening bytes by kind (MB)\n\n" + _breakdown_table(d["contexts"]),
        "## Generation, commitment, receipt, retained state\n\n" + _context_table(d["contexts"]),
        _overhead_md(d), f"Total run time {d['elapsed_s']:.0f} s.",
    ])


def _settings_md(d: dict) -> str:
    s, la, cfg = d["settings"], d["loadavg"], d["settings"]["config"]
    return (f"Model {s['model']} ({cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, "
            f"vocab {cfg['vocab_size']}), profile {s['profile']}, sampling {s['sampling']}. "
            f"Contexts: a plain-text prompt cut from `{s['text']}` plus {s['gen_tokens']} "
            f"generated tokens, {s['gen_runs']} generations with receipts each (the first is "
            f"audited) alternating with as many plain ones. One "
            f"challenge per tier (fixed nonce), {s['open_runs']} openings (re-execution), "
            f"{s['verify_runs']} timed verifications after a warm-up ({s['deep_verify_runs']} "
            f"without one for the deep tier). Times are medians; spread = (max - min) / median. "
            f"Deep tier only up to {s['deep_max']} positions. Load average (1, 5, 15 min) at start "
            f"{_la(la['start'])}, at end {_la(la['end'])}. The machine is shared with other jobs "
            f"(timings taken under heavy load were 10-50 times slower): before each timed "
            f"generation and opening the bench waits (at most 5 s) until others use at most "
            f"{100 * s['quiet']:.0f} % of the cores, and 'contention' is the largest share of the "
            f"cores other processes used during a row's timed runs. Times are upper bounds.")


def _tier_table(contexts: list[dict]) -> str:
    head = ["positions", "tier", "challenged pos x layers", "opening", "as v1 (int64 acc.)",
            "per position",
            *(f"verify {p} ms/pos" for p in PARTS), "verify ms", "verify spread", "open s",
            "open spread", "open / gen", "contention", "accepted"]
    rows = []
    for c in contexts:
        for t in c["tiers"].values():
            ms = t["verify_ms_per_position"]
            rows.append([c["positions"], t["tier"], f"{t['positions']} x {t['layers']}",
                         f"{t['opening_bytes'] / 1e6:.2f} MB",
                         _v1_mb(t), f"{t['bytes_per_position'] / 1e3:.0f} kB",
                         *(f"{ms[p]['median']:.2f}" for p in PARTS),
                         f"{t['verify_ms']['median']:.0f}",
                         f"{100 * ms['total']['spread']:.0f} %", f"{t['open_s']:.2f}",
                         f"{100 * t['open_timing_s']['spread']:.0f} %",
                         f"{t['open_over_gen']:.2f}", _pct(t["contention"]),
                         "yes" if t["accepted"] else "**NO**"])
    return md_table(head, rows)


def _v1_mb(t: dict) -> str:
    """The opening's size with int64 accumulators (version 1), and the packed one's saving."""
    v1 = t.get("opening_bytes_v1")
    if not v1:
        return "-"
    return f"{v1 / 1e6:.2f} MB (-{100 * (1 - t['opening_bytes'] / v1):.0f} %)"


def _breakdown_table(contexts: list[dict]) -> str:
    kinds = sorted({k for c in contexts for t in c["tiers"].values() for k in t["breakdown_bytes"]})
    rows = [[c["positions"], t["tier"], *(f"{t['breakdown_bytes'].get(k, 0) / 1e6:.2f}"
                                          for k in kinds)]
            for c in contexts for t in c["tiers"].values()]
    return md_table(["positions", "tier", *kinds], rows)


def _context_table(contexts: list[dict]) -> str:
    head = ["positions", "prompt + generated", "plain gen s", "gen s", "gen spread", "commit s",
            "of which trace s", "receipt overhead", "receipt overhead (min)", "commit / gen",
            "trace / gen", "receipt B",
            "receipt fixed B", "store B", "store - token ids B", "store fixed B", "contention"]
    rows = []
    for c in contexts:
        rt = c["retained"]
        rows.append([c["positions"], f"{c['prompt_tokens']} + {c['output_tokens']}",
                     f"{c['plain_s']:.2f}", f"{c['gen_s']:.2f}",
                     f"{100 * c['gen_timing_s']['spread']:.0f} %",
                     f"{c['commit_s']:.2f}", f"{c['trace_s']:.3f}",
                     f"{c['receipt_overhead_pct']:.1f} %",
                     f"{c['receipt_overhead_min_pct']:.1f} %", f"{c['overhead_pct']:.1f} %",
                     f"{c['trace_overhead_pct']:.1f} %", c["receipt"]["bytes"],
                     c["receipt"]["fixed_bytes"], rt["store_bytes"], rt["minus_token_ids"],
                     rt["fixed_bytes"], _pct(c["contention"])])
    return md_table(head, rows)


def _overhead_md(d: dict) -> str:
    o, cm = d["overhead"], d["manifest_s"]
    return (f"Overhead scenario (chat prompt of {o['prompt_tokens']} tokens + "
            f"{o['output_tokens']} generated, {o['runs']} runs alternating with plain "
            f"generations): plain {o['plain_s']:.2f} s, with receipts {o['signed_s']:.2f} s "
            f"(+{o['receipt_overhead_pct']:.1f} %; fastest runs "
            f"+{o['receipt_overhead_min_pct']:.1f} %) = generation {o['gen_s']:.2f} s + commit "
            f"{o['commit_s']:.2f} s; commit / gen = {o['overhead_pct']:.1f} % median "
            f"({min(o['overhead_pct_runs']):.1f}-{max(o['overhead_pct_runs']):.1f} %), trace-only "
            f"(time in trace_roots) {o['trace_overhead_pct']:.1f} %. The rest of commit is the "
            f"manifest and receipt: a fresh Committer's manifest (model commitment and tokenizer "
            f"hashes cached per model after the first request) takes {cm['median']:.3f} s alone "
            f"(median of {len(cm['runs'])}).\n\n"
            f"Retained by the provider: the transcript store file = token ids + request and "
            f"output text (the transcript) + a fixed part (receipt hashes, manifest, seed, salt). "
            f"The fixed part grows by {_fmt(d['retained_bytes_per_extra_token'])} bytes per extra "
            f"token from the shortest to the longest context (a digit more in trace.positions at "
            f"most): nothing per token beyond the transcript.")


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f} %"


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _la(t) -> str:
    return ", ".join(f"{x:.1f}" for x in t)


if __name__ == "__main__":
    sys.exit(main())
