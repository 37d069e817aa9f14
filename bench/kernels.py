"""Kernel microbenchmarks at Llama-3-8B shapes, against torch._int_mm and bf16 SDPA.

On a GPU: `triton.testing.do_bench` medians (warm-up then timed repetitions, ms) of each exact
kernel and its baseline, with achieved bandwidth / integer-op rate from the byte and op formulas
below. Without a GPU (this is stated in the output): no times at all; the compile report (registers,
spills, shared memory, forbidden-instruction scan for sm_80/sm_90) and the roofline floor of every
kernel and baseline on an A100-80GB and an H100 SXM, time >= max(bytes / bandwidth, ops / peak).

Peak figures (dense, no sparsity), from the vendor datasheets:
  A100-80GB SXM: HBM2e 2.039 TB/s, INT8 tensor 624 TOPS, BF16 tensor 312 TFLOPS
                 (NVIDIA A100 datasheet; 312 is the BF16 figure, INT8 dense is twice that)
  H100 SXM:      HBM3 3.35 TB/s, INT8 tensor 1979 TOPS, BF16 tensor 989 TFLOPS
                 (NVIDIA H100 datasheet, SXM5 column, sparsity figures halved)

    python bench/kernels.py [--report all|quick|none] [--seq 4096]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable from the repo root
    sys.path.append(str(Path(__file__).resolve().parents[1]))  # last: kernels/ must not shadow HF kernels
from bench.common import RESULTS, md_table, provenance, provenance_md, write_results

GPUS = {  # name: (bytes/s, int8 ops/s, bf16 flops/s)
    "A100-80GB-SXM": (2.039e12, 624e12, 312e12),
    "H100-SXM": (3.35e12, 1979e12, 989e12),
}
H, KV, F, NH, NKV, D, V = 4096, 1024, 14336, 32, 8, 128, 128256  # Llama-3-8B


def gemm_cases(tokens=(1, 16, 512)) -> list[dict]:
    """Every linear of a Llama-3-8B layer (+ LM head) at w8a16: int16 x (2 planes), int8 W; the
    LM head keeps 16-bit rows in w8a16 (profile head_qmax), so 2 x 2 plane products there."""
    out = []
    for m in tokens:
        for name, n, k, wb in (("qkv", H + 2 * KV, H, 1), ("o", H, H, 1), ("gate_up", 2 * F, H, 1),
                               ("down", H, F, 1), ("lm_head", V, H, 2)):
            ours = dict(bytes=m * k * 2 + n * k * wb + m * n * 4 + 8 * n + m * 4,
                        ops=2 * 2 * wb * m * n * k, kind="int8")
            base = dict(bytes=m * k + n * k + m * n * 4, ops=2 * m * n * k, kind="int8")
            out.append(dict(kernel="gemm w8a16", shape=f"{name} M={m} N={n} K={k}",
                            m=m, n=n, k=k, ours=ours, baseline=("torch._int_mm int8", base)))
    return out


def attention_cases(seq: int) -> list[dict]:
    """Decode (1 query, cache of `seq`) and prefill (causal, seq queries), 16-bit Q/K/V.

    Decode bytes: K is read by each of the three sweeps (separate launches; no L2 reuse assumed)
    and V once. Prefill bytes: compulsory traffic only (Q, K, V once, fp32 out): it is
    compute-bound. Ops count int8 MMA work: 4 plane products per score in each of 3 sweeps, 4 per
    value product, decode rows padded to the 16-row tile."""
    kv_bytes = seq * NKV * D * 2
    rows_pad = 16  # a decode program pads the GQA group (4 rows) to the 16-row MMA tile
    # three sweeps read K (scores recomputed), the third also V; 4 int8 MMAs per plane product
    dec_ops = NKV * (3 * 4 + 4) * 2 * rows_pad * seq * D
    pre_pairs = NH * seq * (seq + 1) // 2  # visible (query, key) pairs per head, causal
    pre_ops = (3 * 4 + 4) * 2 * pre_pairs * D
    return [
        dict(kernel="attention decode", shape=f"S={seq} nh={NH} nkv={NKV} d={D}", seq=seq,
             t=1, ours=dict(bytes=4 * kv_bytes + seq * NKV * 8, ops=dec_ops, kind="int8"),
             baseline=("SDPA bf16", dict(bytes=2 * seq * NKV * D * 2, ops=4 * NH * seq * D,
                                         kind="bf16"))),
        dict(kernel="attention prefill", shape=f"T=S={seq} nh={NH} nkv={NKV} d={D}", seq=seq,
             t=seq, ours=dict(bytes=2 * kv_bytes + seq * NH * D * (2 + 4), ops=pre_ops,
                              kind="int8"),
             baseline=("SDPA bf16 causal", dict(bytes=2 * kv_bytes + 2 * seq * NH * D * 2,
                                                ops=4 * pre_pairs * D, kind="bf16"))),
    ]


def row_cases(tokens=(1, 512)) -> list[dict]:
    """Memory-bound row kernels: bytes read + written per call."""
    out = []
    for m in tokens:
        out += [dict(kernel="rmsnorm_quant", shape=f"T={m} H={H}", ours=dict(
                    bytes=m * H * (4 + 2) + H * 4, ops=0, kind="int8"), baseline=None),
                dict(kernel="swiglu_quant", shape=f"T={m} F={F}", ours=dict(
                    bytes=m * F * (8 + 2), ops=0, kind="int8"), baseline=None),
                dict(kernel="rope_quant", shape=f"T={m} heads={NH + 2 * NKV} d={D}", ours=dict(
                    bytes=m * (NH + 2 * NKV) * D * (4 + 2) + m * D * 4, ops=0, kind="int8"),
                    baseline=None)]
    return out


def floor_s(work: dict, gpu: str) -> float:
    """Roofline floor in seconds: max(bytes / bandwidth, ops / peak of the work's kind)."""
    bw, int8, bf16 = GPUS[gpu]
    return max(work["bytes"] / bw, work["ops"] / (int8 if work["kind"] == "int8" else bf16))


def roofline(cases: list[dict]) -> list[dict]:
    rows = []
    for c in cases:
        row = dict(kernel=c["kernel"], shape=c["shape"], bytes=c["ours"]["bytes"],
                   ops=c["ours"]["ops"])
        for g in GPUS:
            row[f"floor_us_{g}"] = floor_s(c["ours"], g) * 1e6
            if c["baseline"]:
                row["baseline"] = c["baseline"][0]
                row[f"baseline_floor_us_{g}"] = floor_s(c["baseline"][1], g) * 1e6
        rows.append(row)
    return rows


def gpu_times(cases: list[dict]) -> list[dict]:
    """do_bench medians (ms) of our kernels and the baselines (needs CUDA)."""
    import torch
    from commitllm.kernels import attention, gemm
    from triton.testing import do_bench

    out = []
    dev = "cuda"
    for c in cases:
        if c["kernel"] == "gemm w8a16":
            m, n, k = c["m"], c["n"], c["k"]
            qx = torch.randint(-32639, 32640, (m, k), dtype=torch.int16, device=dev)
            w = torch.randint(-127, 128, (1, n, k), dtype=torch.int8, device=dev)
            sx, sw = torch.rand(m, device=dev), torch.rand(n, device=dev)
            ours = do_bench(lambda qx=qx, w=w, sx=sx, sw=sw: gemm.linear(qx, w, sx, sw))
            a8 = torch.randint(-127, 128, (max(m, 17), k), dtype=torch.int8, device=dev)
            base = do_bench(lambda a8=a8, w=w: torch._int_mm(a8, w[0].t()))
        elif c["kernel"].startswith("attention"):
            ours, base = _bench_attention(c, do_bench, attention, dev)
        else:
            continue
        out.append(dict(kernel=c["kernel"], shape=c["shape"], ours_ms=ours, baseline_ms=base,
                        baseline=c["baseline"][0]))
    return out


def _bench_attention(c: dict, do_bench, attention, dev: str):
    import torch
    import torch.nn.functional as fn

    s, t = c["seq"], c["t"]
    q = torch.randint(-32639, 32640, (t, NH, D), dtype=torch.int16, device=dev)
    k = torch.randint(-32639, 32640, (s, NKV, D), dtype=torch.int16, device=dev)
    v = torch.randint(-32639, 32640, (s, NKV, D), dtype=torch.int16, device=dev)
    sq, sk = torch.rand(t, NH, device=dev) * 1e-4, torch.rand(s, NKV, device=dev) * 1e-4
    pos = torch.arange(s - t, s, dtype=torch.int32, device=dev)
    ours = do_bench(lambda: attention.attention(q, sq, k, sk, v, sk, pos, 32639))
    qb = torch.randn(1, NH, t, D, dtype=torch.bfloat16, device=dev)
    kb = torch.randn(1, NKV, s, D, dtype=torch.bfloat16, device=dev)
    base = do_bench(lambda: fn.scaled_dot_product_attention(qb, kb, kb, is_causal=t > 1,
                                                            enable_gqa=True))
    return ours, base


def compile_report(which: str) -> list[dict]:
    if which == "none":
        return []
    from dataclasses import asdict

    from commitllm.kernels import check, variants

    vs = variants.all_variants() if which == "all" else variants.quick_variants()
    return [asdict(r) for r in check.check_all(variants=vs)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--report", choices=("all", "quick", "none"), default="all")
    ap.add_argument("--seq", type=int, default=4096)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    cases = gemm_cases() + attention_cases(args.seq) + attention_cases(8 * args.seq)[:1] \
        + row_cases()
    import torch

    has_gpu = torch.cuda.is_available()
    times = gpu_times(cases) if has_gpu else []
    data = dict(provenance=provenance(), gpu=torch.cuda.get_device_name() if has_gpu else None,
                note=None if has_gpu else ("no GPU on this machine: no kernel times were measured;"
                                           " the figures are roofline floors from datasheet peaks"),
                peaks=GPUS, roofline=roofline(cases), times=times,
                compile_report=compile_report(args.report))
    md = _markdown(data, time.perf_counter() - t0)
    js, mdp = write_results(RESULTS, "kernels", data, md)
    print(md)
    print(f"\nwrote {js} and {mdp}")
    return 0


def _markdown(data: dict, elapsed: float) -> str:
    parts = ["# Exact kernels: Llama-3-8B shapes", "", provenance_md(data["provenance"]), ""]
    parts.append(f"**{data['note']}**" if data["note"] else f"GPU: {data['gpu']}")
    gpus = list(GPUS)
    rows = [[r["kernel"], r["shape"], f"{r['bytes'] / 1e6:.2f}", f"{r['ops'] / 1e9:.2f}"]
            + [f"{r[f'floor_us_{g}']:.1f}" for g in gpus]
            + [r.get("baseline", "-")]
            + [f"{r[f'baseline_floor_us_{g}']:.1f}" if r.get("baseline") else "-" for g in gpus]
            for r in data["roofline"]]
    parts += ["", "Roofline floors (us): time >= max(bytes / HBM bandwidth, ops / dense peak).", "",
              md_table(["kernel", "shape", "MB", "Gop"] + [f"floor {g}" for g in gpus]
                       + ["baseline"] + [f"baseline floor {g}" for g in gpus], rows)]
    if data["times"]:
        parts += ["", md_table(["kernel", "shape", "ours ms", "baseline", "baseline ms"],
                               [[t["kernel"], t["shape"], f"{t['ours_ms']:.4f}", t["baseline"],
                                 f"{t['baseline_ms']:.4f}"] for t in data["times"]])]
    rep = data["compile_report"]
    if rep:
        bad = [r for r in rep if not r["ok"]]
        parts += ["", (f"Compile report: {len(rep)} variants (sm_80, sm_90), {len(bad)} with "
                       "findings or errors."), "",
                  md_table(["variant", "sm", "regs", "spill B", "smem B", "ok"],
                           [[r["name"], r["cc"], r["regs"], r["stack"],
                             r["static_smem"] + r["dyn_smem"], r["ok"]] for r in rep])]
    parts += ["", f"Total run time {elapsed:.0f} s."]
    return "\n".join(parts)


if __name__ == "__main__":
    sys.exit(main())
