"""The compile report: kernels compile for sm_80/sm_90 without a GPU, their PTX holds no forbidden
instruction, and the scanner does flag forbidden ones. Compiling needs TRITON_INTERPRET unset, so
those tests run in a subprocess (this folder's conftest sets it for the interpreter tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from commitllm.kernels import check

GOOD_PTX = """
    mul.rn.f32 %r1, %r2, %r3;   // comment with fma.rn.f32 is ignored
    add.rn.f64 %rd1, %rd2, %rd3;
    div.rn.f32 %r4, %r5, %r6;
    sqrt.rn.f64 %rd4, %rd5;
    mad.lo.s32 %r7, %r8, %r9, %r10;
    mma.sync.aligned.m16n8k32.row.col.satfinite.s32.s8.s8.s32 {%r1}, {%r2}, {%r3}, {%r4};
    wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8 {%r1}, %rd1, %rd2, 1;
    atom.global.add.s32 %r1, [%rd1], 1;
    cvt.rn.f32.s64 %r1, %rd1;
    max.f32 %r1, %r2, %r3;
"""
BAD_PTX = {
    "fma.rn.f32 %r1, %r2, %r3, %r4;": "fused",
    "fma.rn.f64 %rd1, %rd2, %rd3, %rd4;": "fused",
    "ex2.approx.f32 %r1, %r2;": "approximate",
    "ex2.approx.ftz.f32 %r1, %r2;": "approximate",
    "lg2.approx.f32 %r1, %r2;": "approximate",
    "div.full.f32 %r1, %r2, %r3;": "div.full",
    "div.approx.f32 %r1, %r2, %r3;": "approximate",
    "sqrt.approx.f32 %r1, %r2;": "approximate",
    "rsqrt.approx.f32 %r1, %r2;": "approximate",
    "sin.approx.f32 %r1, %r2;": "approximate",
    "cos.approx.f32 %r1, %r2;": "approximate",
    "atom.global.add.f32 %r1, [%rd1], %r2;": "float atomic",
    "red.global.add.f32 [%rd1], %r2;": "float atomic",
    "mul.rn.ftz.f32 %r1, %r2, %r3;": "flush-to-zero",
    "cvt.rn.bf16.f32 %rs1, %r1;": "half",
    "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%r1}, {%r2}, {%r3}, {%r4};": "float",
    "mul.f32 %r1, %r2, %r3;": "explicit rounding",
}


def test_scan_ptx_accepts_exact_instructions():
    assert check.scan_ptx(GOOD_PTX) == []


@pytest.mark.parametrize("line,reason", BAD_PTX.items())
def test_scan_ptx_flags_forbidden(line, reason):
    found = check.scan_ptx(f"    {line}\n")
    assert found and any(reason in f for f in found), found


def _run(code: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def test_quick_variants_compile_clean():
    """One variant of every kernel function, sm_80 and sm_90: compiles, no findings."""
    res = _run("""
        import json
        from dataclasses import asdict
        from commitllm.kernels import check, variants
        reps = check.check_all(variants=variants.quick_variants())
        print(json.dumps([asdict(r) for r in reps]))
    """)
    assert res.returncode == 0, res.stderr[-3000:]
    reps = json.loads(res.stdout.splitlines()[-1])
    names = {r["name"].split("[")[0] for r in reps}
    assert names == {"rmsnorm_quant", "quantize_rows", "rope_quant", "swiglu_quant", "gemm",
                     "attn_rowmax",
                     "attn_sums", "attn_values", "attn_values_direct", "attn_combine",
                     "attn_rowmax_paged", "attn_sums_paged", "attn_values_paged",
                     "attn_values_direct_paged"}
    assert {r["cc"] for r in reps} == {80, 90}
    for r in reps:
        assert r["ok"] and not r["error"] and not r["findings"], r
        assert 0 < r["regs"] <= 255


def test_check_flags_a_bad_kernel(tmp_path):
    """A kernel with fp32 `/`, tl.exp, tl.sqrt and a float atomic is reported, exit code 1."""
    (tmp_path / "badkernel.py").write_text(textwrap.dedent("""
        import triton
        import triton.language as tl

        @triton.jit
        def bad(x_ptr, y_ptr, BLOCK: tl.constexpr):
            i = tl.arange(0, BLOCK)
            x = tl.load(x_ptr + i)
            y = tl.exp(x) / (tl.sqrt(x) + 1.0)
            tl.atomic_add(y_ptr, tl.sum(y, axis=0))
    """))
    res = _run(f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        import badkernel
        from commitllm.kernels import check
        from commitllm.kernels.launch import KernelVariant
        v = KernelVariant("bad", badkernel.bad, dict(x_ptr="*fp32", y_ptr="*fp32"),
                          dict(BLOCK=128), 4)
        r = check.compile_variant(v, 80)
        print("OK" if r.ok else "FLAGGED")
        for f in r.findings:
            print(f)
    """)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    assert "FLAGGED" in out
    for reason in ("approximate", "div.full", "float atomic"):
        assert reason in out, out


@pytest.mark.slow
def test_all_variants_compile_clean():
    """Every kernel at every config for sm_80 and sm_90 (about 2-3 minutes on 2 cores)."""
    res = _run("""
        from commitllm.kernels import check
        raise SystemExit(check.main(json=True))
    """, timeout=1800)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    reps = json.loads(res.stdout)
    assert len(reps) >= 100 and all(r["ok"] for r in reps)
