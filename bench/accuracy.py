"""Accuracy of the exact engine's profiles against the transformers fp32 model, beside bf16 serving.

Real English text (default: the GPL-3 text that Debian's essential base-files package ships) is
tokenized as plain text, cut into windows that are each teacher-forced from their own start, and
every variant's logits are compared with transformers fp32 logits on the same ids:

- top-1 agreement: argmax(variant) == argmax(fp32), ties to the lowest id (np.argmax);
- mean KL(fp32 || variant) per position, from float64 log-softmax of the fp32 logits;
- perplexity exp(mean NLL) of the variant on the true next tokens.

Each window of W tokens gives W - 1 predicted positions (the last one has no next token).

    python bench/accuracy.py [--tokens 2048] [--window 512] [--out bench/results]
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make `bench` importable from the repo root
    sys.path.append(str(Path(__file__).resolve().parents[1]))  # last: kernels/ must not shadow HF kernels
from bench.common import RESULTS, md_table, provenance, provenance_md, write_results

DEFAULT_TEXT = Path("/usr/share/common-licenses/GPL-3")
ENGINE_PROFILES = ("w16a16", "w8a16", "a8")
ROW_CHUNK = 128  # rows of float64 log-softmax at a time: 128 x 49152 x 8 B = 48 MiB per array

LogitsFn = Callable[[list[int]], np.ndarray]  # ids [T] -> fp32 logits [T, V]


# ---- metrics ------------------------------------------------------------------------------------

@dataclass
class Tally:
    """Sums over predicted positions; the metrics are ratios of these sums."""

    n: int = 0  # predicted positions
    agree: int = 0  # positions whose argmax equals the fp32 argmax
    kl: float = 0.0  # sum over positions of KL(fp32 || variant), nats
    nll: float = 0.0  # sum of -log p(true next token), nats

    def __add__(self, o: Tally) -> Tally:
        return Tally(self.n + o.n, self.agree + o.agree, self.kl + o.kl, self.nll + o.nll)

    @property
    def agreement(self) -> float:
        """Top-1 agreement with fp32, percent."""
        return 100.0 * self.agree / self.n

    @property
    def mean_kl(self) -> float:
        return self.kl / self.n

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.n)

    def summary(self) -> dict:
        return asdict(self) | {"agreement_pct": self.agreement, "mean_kl": self.mean_kl,
                               "perplexity": self.perplexity}


def log_softmax64(logits: np.ndarray) -> np.ndarray:
    """float64 log-softmax over the last axis: [T, V] -> [T, V]."""
    x = np.asarray(logits, dtype=np.float64)
    m = x.max(-1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))


def compare(ids: list[int], ref_logits: np.ndarray, logits: np.ndarray) -> Tally:
    """Tally of `logits` [T, V] against the reference [T, V] at positions 0..T-2 of `ids` [T]."""
    if ref_logits.shape != logits.shape or logits.shape[0] != len(ids):
        raise ValueError(f"shapes differ: ids {len(ids)}, ref {ref_logits.shape}, "
                         f"variant {logits.shape}")
    t = Tally()
    for a in range(0, len(ids) - 1, ROW_CHUNK):
        b = min(a + ROW_CHUNK, len(ids) - 1)
        lp_ref, lp = log_softmax64(ref_logits[a:b]), log_softmax64(logits[a:b])  # [b-a, V]
        nxt = np.asarray(ids[a + 1:b + 1])
        t += Tally(n=b - a,
                   agree=int(np.sum(np.argmax(ref_logits[a:b], -1) == np.argmax(logits[a:b], -1))),
                   kl=float(np.sum(np.exp(lp_ref) * (lp_ref - lp))),
                   nll=float(-lp[np.arange(b - a), nxt].sum()))
    return t


# ---- text and models ----------------------------------------------------------------------------

def text_windows(ids: list[int], tokens: int, window: int) -> list[list[int]]:
    """The first `tokens` ids cut into windows of `window` (a shorter last window is dropped)."""
    if window < 2:
        raise ValueError(f"window must be >= 2, got {window}")
    if len(ids) < tokens:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than the {tokens} asked for")
    head = ids[:tokens]
    wins = [head[s:s + window] for s in range(0, tokens - window + 1, window)]
    if not wins:
        raise ValueError(f"--tokens {tokens} is shorter than one window of {window}")
    return wins


def hf_logits(model) -> LogitsFn:
    """Logits of a transformers causal LM, cast to fp32 (a bf16 model returns bf16 logits)."""
    import torch

    @torch.inference_mode()
    def run(ids: list[int]) -> np.ndarray:
        return model(input_ids=torch.tensor([ids])).logits[0].float().numpy()
    return run


def exact_logits(model, chunk: int) -> LogitsFn:
    """Teacher-forced logits of an ExactModel, prefilled in chunks of `chunk` tokens."""
    from commitllm.engine.generate import teacher_forced

    return lambda ids: teacher_forced(model, ids, chunk)


def reference_logits(model) -> LogitsFn:
    """Logits of the engine's own fp32 reference forward (a check of the loaded weights)."""
    return lambda ids: model.forward([ids])[0].numpy()


def load_hf(source: Path, dtype_name: str):
    """A transformers model from an HF folder or a .gguf file, in float32 or bfloat16."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    source = Path(source)
    if source.suffix.lower() == ".gguf":
        return AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name,
                                                    dtype=dtype).eval()
    return AutoModelForCausalLM.from_pretrained(str(source), dtype=dtype).eval()


# ---- the evaluation ----------------------------------------------------------------------------

@dataclass
class VariantResult:
    name: str
    windows: list[Tally]  # one per window
    seconds: float  # wall-clock time of the forward passes and the comparison
    hits: np.ndarray  # bool [positions]: top-1 equal to fp32's, all windows in order

    @property
    def tally(self) -> Tally:
        total = Tally()
        for t in self.windows:
            total += t
        return total


Factory = Callable[[], LogitsFn]  # builds a variant's model when called


def evaluate(windows: list[list[int]], reference: LogitsFn, variants: dict[str, Factory],
             log: Callable[[str], None] = lambda s: None) -> list[VariantResult]:
    """fp32 reference first (its own tally: 100 % agreement, KL 0), then each variant in turn.

    Variants are factories, built one at a time so that only one model is in memory besides the
    reference logits.
    """
    t0 = time.perf_counter()
    refs = [reference(w) for w in windows]
    out = [VariantResult("fp32", [compare(w, r, r) for w, r in zip(windows, refs)],
                         time.perf_counter() - t0,
                         np.concatenate([top1_hits(r, r) for r in refs]))]
    log(_line(out[-1]))
    for name, make in variants.items():
        t0 = time.perf_counter()
        fn = make()
        tallies, hits = [], []
        for w, r in zip(windows, refs):
            x = fn(w)
            tallies.append(compare(w, r, x))
            hits.append(top1_hits(r, x))
        out.append(VariantResult(name, tallies, time.perf_counter() - t0, np.concatenate(hits)))
        log(_line(out[-1]))
        del fn
    return out


def top1_hits(ref: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """bool [T - 1]: argmax equal to the reference's at each predicted position of a window."""
    return np.argmax(ref[:-1], -1) == np.argmax(logits[:-1], -1)


def paired(a: np.ndarray, b: np.ndarray) -> dict:
    """Top-1 difference a - b in points on the same positions, with a 95 % interval from the
    discordant positions (McNemar: only positions where exactly one of the two misses count)."""
    only_a, only_b, n = int(np.sum(a & ~b)), int(np.sum(~a & b)), len(a)
    diff = 100.0 * (only_a - only_b) / n
    half = 100.0 * 1.96 * math.sqrt(only_a + only_b) / n
    return {"only_first": only_a, "only_second": only_b, "positions": n, "diff_points": diff,
            "ci95_points": [diff - half, diff + half]}


def _line(r: VariantResult) -> str:
    t = r.tally
    return (f"{r.name:>22}: top-1 {t.agreement:6.2f} %  KL {t.mean_kl:.6f}  ppl {t.perplexity:8.4f}"
            f"  ({r.seconds:.1f} s)")


@dataclass(frozen=True)
class Bar:
    name: str
    value: float
    limit: float
    ok: bool


def check_bars(res: dict[str, Tally], bf16: str = "bf16", w16: str = "w16a16",
               w8: str = "w8a16") -> list[Bar]:
    """The quality bars of the design, each against the bf16 serving baseline."""
    b, hi, lo = res[bf16], res[w16], res[w8]
    ppl_rel = abs(lo.perplexity / b.perplexity - 1) * 100
    return [
        Bar("w16a16 top-1 >= bf16 top-1 (pct)", hi.agreement, b.agreement,
            hi.agreement >= b.agreement),
        Bar("w8a16 top-1 >= bf16 top-1 - 1.5 points (pct)", lo.agreement, b.agreement - 1.5,
            lo.agreement >= b.agreement - 1.5),
        Bar("w8a16 mean KL <= 0.01", lo.mean_kl, 0.01, lo.mean_kl <= 0.01),
        Bar("w8a16 perplexity within 1 % of bf16 (abs. relative difference, pct)", ppl_rel, 1.0,
            ppl_rel <= 1.0),
    ]


# ---- the command line --------------------------------------------------------------------------

def engine_variants(loaded, profiles: list, chunk: int) -> dict[str, Factory]:
    """One factory per numerics profile (a Profile object), built from the loaded model."""
    from commitllm.engine.exact.model import ExactModel

    return {p.name: (lambda p=p: exact_logits(ExactModel(loaded.quantized(p)), chunk))
            for p in profiles}


# One step at a time. Hybrids: the w16a16 model with some matrices replaced by their int8 version
# (int8 values are exact in the int16 path, so only those matrices change). Profiles: w8a16 with
# one more component at 8 bits. "embed" is the input embedding and "lm_head" the LM head, even
# where the checkpoint ties them.
MATRICES = ("embed", "lm_head", "qkv", "o", "gate_up", "down")
QLAYER_PARTS = ("qkv", "o", "gate_up", "down")
HYBRIDS = {"w16a16 + int8 embed & LM head": ("embed", "lm_head"),
           "w16a16 + int8 qkv": ("qkv",), "w16a16 + int8 o": ("o",),
           "w16a16 + int8 gate_up": ("gate_up",), "w16a16 + int8 down": ("down",),
           "w8a16 + int8 LM head": ("lm_head", *QLAYER_PARTS),
           "w8a16 + int8 embed": ("embed", *QLAYER_PARTS)}


DIAGNOSIS_NOTE = (
    "One-step rows: `w16a16 + int8 X` is w16a16 with only matrix X (in every layer) quantized to "
    "int8 per output channel; `w8a16 + int8 LM head` / `+ int8 embed` is w8a16 with that one of "
    "the tied embedding's two uses at int8; `w8a16-head8` (embedding and LM head at int8: the "
    "w8a16 before commit 48afbe2), `w8a16-kv8` (Q/K/V at 8 bits) and `w8a16-act8` (linear "
    "inputs at 8 bits) are w8a16 with that one component narrowed. Each differs from its base in "
    "one step.")


def one_more_8bit_profiles() -> list:
    """w8a16 with 8-bit embedding/LM-head rows, or 8-bit Q/K/V, or 8-bit linear inputs."""
    from commitllm.verifier.numerics.profiles import QMAX8, QMAX16, Profile

    return [Profile("w8a16-head8", QMAX8, QMAX16, QMAX16, QMAX8),
            Profile("w8a16-kv8", QMAX8, QMAX16, QMAX8, QMAX16),
            Profile("w8a16-act8", QMAX8, QMAX8, QMAX16, QMAX16)]


def hybrid(base, donor, parts: tuple[str, ...]):
    """`base` (a QuantizedModel with 16-bit weights) with the matrices in `parts` from `donor`."""
    from dataclasses import replace

    from commitllm.verifier.numerics.weights import QLinear

    if base.embed.q.dtype.itemsize < donor.embed.q.dtype.itemsize or \
            base.layers[0].qkv.q.dtype.itemsize < donor.layers[0].qkv.q.dtype.itemsize or \
            not set(parts) <= set(MATRICES):
        raise ValueError("the base must have the wider weights; parts must be in MATRICES")

    def take(lin, like):
        return QLinear(lin.q.astype(like.q.dtype), lin.s, lin.bias)

    embed = take(donor.embed, base.embed) if "embed" in parts else base.embed
    if base.cfg.tie_word_embeddings and ("embed" in parts) == ("lm_head" in parts):
        lm = embed  # still tied
    else:
        lm = take(donor.lm_head, base.lm_head) if "lm_head" in parts else base.lm_head
    layers = tuple(replace(b, **{k: take(getattr(d, k), getattr(b, k))
                                 for k in parts if k in QLAYER_PARTS})
                   for b, d in zip(base.layers, donor.layers))
    return replace(base, embed=embed, layers=layers, lm_head=lm)


def diagnosis_variants(loaded, chunk: int) -> dict[str, Factory]:
    """The hybrids and the one-more-8-bit profiles above."""
    from commitllm.engine.exact.model import ExactModel
    from commitllm.verifier.numerics import get_profile

    int8_all = one_more_8bit_profiles()[0]  # int8 weights everywhere, 16-bit activations and K/V

    def make(parts):
        m = hybrid(loaded.quantized(get_profile("w16a16")), loaded.quantized(int8_all), parts)
        return exact_logits(ExactModel(m), chunk)

    out = {name: (lambda parts=parts: make(parts)) for name, parts in HYBRIDS.items()}
    return out | engine_variants(loaded, one_more_8bit_profiles(), chunk)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=2048, help="tokens of text to score")
    ap.add_argument("--window", type=int, default=512, help="tokens per teacher-forced window")
    ap.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="a UTF-8 English text file")
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for accuracy.json/.md")
    ap.add_argument("--profiles", default=",".join(ENGINE_PROFILES),
                    help="comma-separated engine profiles (must include w16a16 and w8a16 for "
                         "the bars)")
    ap.add_argument("--diagnose", action="store_true",
                    help="also run one-step variants (which matrix, K/V or activations cost what)")
    ap.add_argument("--only", default="",
                    help="comma-separated substrings: run only the variants whose name has one")
    ap.add_argument("--name", default="accuracy", help="results file name (NAME.json, NAME.md)")
    ap.add_argument("--no-sanity", action="store_true",
                    help="skip the engine's own fp32 reference (a check of the loaded weights)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from commitllm.engine.loader import default_gguf, load_model
    from commitllm.engine.reference import ReferenceModel
    from commitllm.verifier.numerics import get_profile

    start = time.perf_counter()
    text = args.text.read_text(encoding="utf-8")
    loaded = load_model("default")
    ids = loaded.tokenizer.encode(text, add_special_tokens=False)
    windows = text_windows(ids, args.tokens, args.window)
    gguf = default_gguf()
    print(f"text {args.text}: {len(ids)} tokens; scoring {len(windows)} x {args.window}",
          flush=True)
    fp32 = hf_logits(load_hf(gguf, "float32"))
    variants: dict[str, Factory] = {"bf16": lambda: hf_logits(load_hf(gguf, "bfloat16"))}
    if not args.no_sanity:
        variants["commitllm fp32 reference"] = lambda: reference_logits(
            ReferenceModel(loaded.cfg, loaded.tensors))
    profiles = [get_profile(p) for p in args.profiles.split(",") if p]
    variants |= engine_variants(loaded, profiles, args.window)
    if args.diagnose:
        variants |= diagnosis_variants(loaded, args.window)
    if args.only:
        keep = [k for k in args.only.split(",") if k]
        variants = {n: f for n, f in variants.items() if any(k in n for k in keep)}
    results = evaluate(windows, fp32, variants, log=lambda s: print(s, flush=True))
    tallies = {r.name: r.tally for r in results}
    bars = check_bars(tallies) if {"w16a16", "w8a16"} <= tallies.keys() else []
    for b in bars:
        print(f"{'PASS' if b.ok else 'FAIL'}  {b.name}: {b.value:.4f} (limit {b.limit:.4f})")
    pairs = paired_vs(results, "bf16")
    for c in pairs:
        print(f"{c['variant']} - bf16 top-1: {c['diff_points']:+.2f} points, 95 % interval "
              f"[{c['ci95_points'][0]:+.2f}, {c['ci95_points'][1]:+.2f}]")
    elapsed = time.perf_counter() - start
    data = _report(args, text, ids, windows, results, bars, elapsed) | {"paired_vs_bf16": pairs}
    js, md = write_results(args.out, args.name, data, render_md(data))
    print(f"wrote {js} and {md} ({elapsed:.0f} s)")
    return 0 if all(b.ok for b in bars) else 1


def paired_vs(results: list[VariantResult], base: str) -> list[dict]:
    """paired() of each engine profile against the `base` variant, when both were run."""
    by = {r.name: r for r in results}
    if base not in by:
        return []
    return [{"variant": n} | paired(by[n].hits, by[base].hits)
            for n in ENGINE_PROFILES if n in by]


def _report(args, text, ids, windows, results, bars, elapsed) -> dict:
    from commitllm.engine.loader import default_gguf

    return {
        "benchmark": "accuracy",
        "provenance": provenance(),
        "model": default_gguf().name,
        "reference": "transformers fp32 (AutoModelForCausalLM from the GGUF, dequantized)",
        "baselines": {"bf16": "transformers from the same GGUF with dtype=bfloat16: weights "
                              "rounded to bf16, bf16 compute (sdpa attention), logits cast to "
                              "fp32 for the comparison",
                      "commitllm fp32 reference": "the engine's own fp32 float forward on the "
                                                  "converted checkpoint: a check that both sides "
                                                  "load the same weights"},
        "text": {"path": str(args.text), "sha256": hashlib.sha256(text.encode()).hexdigest(),
                 "tokens_in_text": len(ids), "tokenization": "plain text, no special tokens"},
        "windows": len(windows), "window": args.window,
        "predicted_positions": sum(len(w) - 1 for w in windows),
        "variants": [{"name": r.name, "seconds": round(r.seconds, 2)} | r.tally.summary()
                     | {"window_agreement_pct": [round(t.agreement, 3) for t in r.windows]}
                     for r in results],
        "bars": [asdict(b) for b in bars],
        "elapsed_s": round(elapsed, 1),
    }


def _paired_md(pairs: list[dict]) -> str:
    if not pairs:
        return ""
    rows = [[c["variant"], f"{c['diff_points']:+.2f}",
             f"[{c['ci95_points'][0]:+.2f}, {c['ci95_points'][1]:+.2f}]", c["only_first"],
             c["only_second"]] for c in pairs]
    return ("Top-1 against bf16 on the same positions (paired; the interval counts only the "
            "positions where exactly one of the two misses fp32's argmax):\n\n" + md_table(
                ["variant", "top-1 minus bf16 (points)", "95 % interval",
                 "positions only it gets", "positions only bf16 gets"], rows))


def render_md(d: dict) -> str:
    """The report as Markdown: provenance, the table, the bars."""
    rows = [[v["name"], f"{v['agreement_pct']:.2f} %", f"{v['mean_kl']:.6f}",
             f"{v['perplexity']:.4f}", f"{v['seconds']:.1f}"] for v in d["variants"]]
    bars = [[("PASS" if b["ok"] else "**FAIL**"), b["name"], f"{b['value']:.4f}",
             f"{b['limit']:.4f}"] for b in d["bars"]]
    t = d["text"]
    return "\n\n".join([
        "# Accuracy against transformers fp32",
        provenance_md(d["provenance"]),
        (f"Model {d['model']}; reference: {d['reference']}. Text `{t['path']}` (sha256 "
        f"{t['sha256'][:16]}..., {t['tokens_in_text']} tokens, {t['tokenization']}); "
        f"{d['windows']} windows of {d['window']} tokens, each teacher-forced from its own start: "
        f"{d['predicted_positions']} predicted positions. Top-1 is argmax agreement with fp32; KL "
        f"is the mean KL(fp32 || variant) from float64 log-softmax; perplexity is on the true "
        f"next tokens."),
        "Baselines: " + "; ".join(f"{k}: {v}" for k, v in d.get("baselines", {}).items()) + ".",
        md_table(["variant", "top-1 vs fp32", "mean KL", "perplexity", "wall s"], rows),
        md_table(["bar", "check", "value", "limit"], bars) if bars else "(no bars checked)",
        _paired_md(d.get("paired_vs_bf16", [])),
        DIAGNOSIS_NOTE if any(v["name"] in HYBRIDS for v in d["variants"]) else "",
        (f"Total run time {d['elapsed_s']:.0f} s (wall times are of a shared 2-core machine and "
         f"include quantizing a profile the first time). {d.get('note') or ''}"),
    ])


if __name__ == "__main__":
    sys.exit(main())
