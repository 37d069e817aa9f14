"""The compiled forms of every kernel that the compile report (kernels/check.py) builds: each
kernel at each of its configs, for each operand width a profile uses."""

from __future__ import annotations

from ..verifier.numerics.norm import NORM_FRAC_BITS
from . import attention, gemm, quantize, rmsnorm_quant, rope_quant, swiglu_quant
from .launch import KernelVariant

QOUT = ((32639, "*i16"), (127, "*i8"))  # quantized outputs: 16-bit and 8-bit profiles
GEMM_PLANES = {"w8a16": (2, 1), "w16a16": (2, 2), "a8": (1, 1)}  # profile -> (X, W planes)


def _i32(*names: str) -> dict:
    return {n: "i32" for n in names}


def rmsnorm_quant_variants() -> list[KernelVariant]:
    types = dict(x_ptr="*fp32", w_ptr="*fp32", eps="fp32", y_ptr="*fp32", s_ptr="*fp32",
                 **_i32("H", "stride_x", "stride_y", "stride_q"))
    return [KernelVariant(f"rmsnorm_quant[b{c.block}w{c.num_warps},q{qmax}]",
                          rmsnorm_quant._rmsnorm_quant_kernel, dict(types, q_ptr=qt),
                          dict(QMAX=qmax, FRAC_BITS=NORM_FRAC_BITS, BLOCK=c.block, STORE_Y=True),
                          c.num_warps)
            for c in rmsnorm_quant.CONFIGS for qmax, qt in QOUT]


def swiglu_quant_variants() -> list[KernelVariant]:
    types = dict(gu_ptr="*fp32", act_ptr="*fp32", s_ptr="*fp32",
                 **_i32("F", "stride_gu", "stride_act", "stride_q"))
    return [KernelVariant(f"swiglu_quant[b{c.block}w{c.num_warps},q{qmax}]",
                          swiglu_quant._swiglu_quant_kernel, dict(types, q_ptr=qt),
                          dict(QMAX=qmax, BLOCK=c.block, STORE_ACT=True), c.num_warps)
            for c in rmsnorm_quant.CONFIGS for qmax, qt in QOUT]


def quantize_variants() -> list[KernelVariant]:
    types = dict(x_ptr="*fp32", s_ptr="*fp32", **_i32("K", "stride_x", "stride_q"))
    return [KernelVariant(f"quantize_rows[b{c.block}w{c.num_warps},q{qmax}]",
                          quantize._quantize_rows_kernel, dict(types, q_ptr=qt),
                          dict(QMAX=qmax, BLOCK=c.block), c.num_warps)
            for c in rmsnorm_quant.CONFIGS for qmax, qt in QOUT]


def rope_quant_variants() -> list[KernelVariant]:
    types = dict(qkv_ptr="*fp32", cos_ptr="*fp32", sin_ptr="*fp32", s_ptr="*fp32",
                 **_i32("HALF", "N_ROPE", "stride_x", "stride_cs", "stride_ot", "stride_oh",
                        "stride_st"))
    return [KernelVariant(f"rope_quant[d{2 * half},q{qmax}]", rope_quant._rope_quant_kernel,
                          dict(types, out_ptr=ot), dict(QMAX=qmax, BLOCK=half), 1)
            for half in (32, 64) for qmax, ot in QOUT]


def gemm_variants() -> list[KernelVariant]:
    """Full epilogue (bias, residual, trace): the superset of the code paths."""
    types = dict(w_ptr="*i8", sx_ptr="*fp32", sw_ptr="*fp32", bias_ptr="*fp32",
                 resid_ptr="*fp32", y_ptr="*fp32", z_ptr="*i64",
                 **_i32("M", "N", "K", "stride_xm", "stride_wp", "stride_wn", "stride_rm",
                        "stride_ym", "stride_zm"))
    out = []
    for c in gemm.CONFIGS:
        for prof, (xp, wp) in GEMM_PLANES.items():
            ce = dict(X_PLANES=xp, W_PLANES=wp, HAS_BIAS=True, HAS_RESID=True, TRACE=True,
                      BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k, GROUP_M=c.group_m)
            name = f"gemm[{c.block_m}x{c.block_n}x{c.block_k}w{c.num_warps}s{c.num_stages},{prof}]"
            out.append(KernelVariant(name, gemm._gemm_kernel,
                                     dict(types, x_ptr="*i16" if xp == 2 else "*i8"), ce,
                                     c.num_warps, c.num_stages))
    return out


def attention_variants(head_dims=(128, 64)) -> list[KernelVariant]:
    """Each config x sweep x head_dim (Llama-3 128, SmolLM2 64), for 16-bit and 8-bit K/V, and
    the paged-layout form of the decode configs; the combine per (BLOCK_M, warps, BLOCK_D)."""
    types = dict(sq_ptr="*fp32", qpos_ptr="*i32", sk_ptr="*fp32", sv_ptr="*fp32",
                 table_ptr="*i32", pmax_ptr="*i32", z_ptr="*i64", pm_ptr="*fp32",
                 acc_ptr="*i64", out_ptr="*fp32", scale="fp32", bt_ptr="*i32",
                 **_i32("window", "BS", "R", "G", "NKV", "S", "CHUNK", "N_SPLIT", "d",
                        "stride_qt", "stride_qh", "stride_sqt", "stride_sqh", "stride_kt",
                        "stride_kh", "stride_skt",
                        "stride_vt", "stride_vh", "stride_svt", "stride_ot"))
    sweeps = (("rowmax", attention._attn_rowmax_kernel, {}),
              ("sums", attention._attn_sums_kernel, {}),
              ("values", attention._attn_values_kernel, {"DIRECT": False}),
              ("values_direct", attention._attn_values_kernel, {"DIRECT": True}))
    out, combines = [], {}
    for c in attention.CONFIGS:
        for bd in head_dims:
            for planes, it in ((2, "*i16"), (1, "*i8")):
                ce = dict(KV_PLANES=planes, BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_D=bd)
                tag = f"{c.block_m}x{c.block_n}w{c.num_warps}s{c.num_stages},d{bd},kv{8 * planes}"
                tys = dict(types, q_ptr=it, k_ptr=it, v_ptr=it)
                out += [KernelVariant(f"attn_{name}[{tag}]", fn, tys,
                                      dict(ce, PAGED=False, **extra), c.num_warps, c.num_stages)
                        for name, fn, extra in sweeps]
                if c in attention.DECODE_CONFIGS:
                    out += [KernelVariant(f"attn_{name}_paged[{tag}]", fn, tys,
                                          dict(ce, PAGED=True, **extra), c.num_warps,
                                          c.num_stages) for name, fn, extra in sweeps]
            name = f"attn_combine[{c.block_m}w{c.num_warps},d{bd}]"
            combines[name] = KernelVariant(name, attention._attn_combine_kernel, types,
                                           dict(BLOCK_M=c.block_m, BLOCK_D=bd), c.num_warps)
    return out + list(combines.values())


def all_variants() -> list[KernelVariant]:
    """Every variant of every kernel."""
    return (rmsnorm_quant_variants() + quantize_variants() + rope_quant_variants()
            + swiglu_quant_variants()
            + gemm_variants() + attention_variants())


def quick_variants() -> list[KernelVariant]:
    """One variant per kernel function (the first config): a fast smoke subset."""
    seen, out = set(), []
    for v in all_variants():
        key = v.name.split("[")[0]
        if key not in seen:
            seen.add(key)
            out.append(v)
    return out
