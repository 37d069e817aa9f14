"""Compile report: every kernel at every config for sm_80 and sm_90, without a GPU.

For each variant: registers, stack (spill) bytes and shared memory from the cubin
(`cuobjdump -res-usage`, shipped in the Triton wheel) and Triton's dynamic shared memory; and a scan
of the PTX for instructions the exactness contract forbids (approximate transcendentals and
divisions, FMA contraction, flush-to-zero, float atomics, half-precision intermediates, float
MMAs). `main` prints the table (or JSON) and returns non-zero on any finding or compile failure.

Must run with TRITON_INTERPRET unset: the interpreter replaces the kernels' JIT functions.
"""

from __future__ import annotations

import json as _json
import os
import re
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

# (pattern, reason): a PTX line matching the pattern violates the exactness contract
FORBIDDEN = (
    (r"\b(fma|mad)\.[\w.]*f(16|32|64)\b", "fused multiply-add on floats (rounding differs)"),
    (r"\.approx\b", "approximate instruction (ex2/lg2/sin/cos/rcp/rsqrt/sqrt/div/tanh.approx)"),
    (r"\bdiv\.full\b", "div.full.f32 is not correctly rounded"),
    (r"\.ftz\b", "flush-to-zero (subnormals are honoured by the spec)"),
    (r"\b(atom|red)(\.[\w]+)*\.(f16|bf16|f32|f64|f16x2|bf16x2)\b",
     "float atomic (order-dependent)"),
    (r"\bcvt\.[\w.]*\b(f16|bf16|tf32|e4m3|e5m2)", "half/bf16/fp8 intermediate"),
    (r"\b(w?gmma|mma)\.[\w.]*\.(f16|bf16|tf32|f32|f64|e4m3|e5m2)\b", "float matrix multiply"),
    (r"\b(add|sub|mul)\.f(32|64)\b", "float op without explicit rounding (ptxas may contract it)"),
)
_RES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


@dataclass
class VariantReport:
    """One kernel variant compiled for one target."""

    name: str
    cc: int
    ok: bool
    regs: int = 0
    stack: int = 0  # bytes of stack frame: spills (the kernels use no local arrays)
    local: int = 0
    static_smem: int = 0
    dyn_smem: int = 0  # Triton's dynamic shared memory (pipeline buffers, layout conversions)
    findings: list = field(default_factory=list)  # "reason: ptx line"
    error: str = ""


def cuobjdump() -> str:
    """Path of the cuobjdump that ships inside the Triton wheel."""
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not path.exists():
        raise FileNotFoundError(f"cuobjdump not found at {path}")
    return str(path)


def scan_ptx(ptx: str) -> list[str]:
    """Forbidden-instruction findings in PTX text, one 'reason: line' each (comments ignored)."""
    out = []
    for line in ptx.splitlines():
        code = line.split("//", 1)[0].strip()
        if not code or code.startswith("."):
            continue
        for pat, reason in FORBIDDEN:
            if re.search(pat, code):
                out.append(f"{reason}: {code}")
    return out


def resource_usage(cubin: bytes) -> dict:
    """REG/STACK/SHARED/LOCAL of the cubin's kernel from `cuobjdump -res-usage`."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([cuobjdump(), "-res-usage", f.name], capture_output=True,
                              text=True, check=True).stdout
    m = _RES.search(text)
    if not m:
        raise RuntimeError(f"no resource line in cuobjdump output:\n{text}")
    regs, stack, shared, local = map(int, m.groups())
    return dict(regs=regs, stack=stack, static_smem=shared, local=local)


def compile_variant(v, cc: int) -> VariantReport:
    """Compile one variant for sm_<cc> (fp fusion off, pointers/strides 16-divisible as a real
    launch would specialize them) and report its resources and findings."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    try:
        sig = v.signature()
        names = list(sig)
        attrs = {(names.index(n),): [["tt.divisibility", 16]] for n, t in sig.items()
                 if t.startswith("*") or n.startswith("stride")}
        src = ASTSource(v.fn, sig, constexprs=v.constexprs, attrs=attrs)
        ck = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                            options=dict(num_warps=v.num_warps, num_stages=v.num_stages,
                                         enable_fp_fusion=False))
        rep = VariantReport(v.name, cc, True, dyn_smem=int(ck.metadata.shared),
                            **resource_usage(ck.asm["cubin"]))
        rep.findings = scan_ptx(ck.asm["ptx"])
        rep.ok = not rep.findings
        return rep
    except Exception as e:  # noqa: BLE001 -- a compile failure is a result to report
        return VariantReport(v.name, cc, False, error=f"{type(e).__name__}: {e}"[:2000])


def check_all(ccs=(80, 90), variants=None, jobs: int | None = None) -> list[VariantReport]:
    """Compile every kernel variant for every compute capability; one report per (variant, cc)."""
    from triton import knobs

    if knobs.runtime.interpret:
        raise RuntimeError("kernels check needs TRITON_INTERPRET unset (the interpreter "
                           "replaces the JIT functions)")
    if variants is None:
        from .variants import all_variants

        variants = all_variants()
    work = [(v, cc) for v in variants for cc in ccs]
    with ThreadPoolExecutor(jobs or min(4, os.cpu_count() or 1)) as pool:
        return list(pool.map(lambda a: compile_variant(*a), work))


def format_table(reports: list[VariantReport]) -> str:
    """Plain-text table, one row per (variant, cc), then the findings and errors."""
    head = f"{'kernel':<52} {'sm':>3} {'regs':>4} {'spill':>5} {'smem':>6} {'status':<6}"
    rows = [head, "-" * len(head)]
    for r in reports:
        status = "ok" if r.ok else ("FAIL" if r.error else "FORBID")
        smem = r.static_smem + r.dyn_smem
        rows.append(f"{r.name:<52} {r.cc:>3} {r.regs:>4} {r.stack:>5} {smem:>6} {status:<6}")
    for r in reports:
        for f in r.findings[:5]:
            rows.append(f"  {r.name} sm_{r.cc}: {f}")
        if r.error:
            rows.append(f"  {r.name} sm_{r.cc}: compile error: {r.error.splitlines()[0]}")
    bad = sum(not r.ok for r in reports)
    rows.append(f"{len(reports)} compiled variants, {bad} with findings or errors")
    return "\n".join(rows)


def main(json: bool = False, ccs=(80, 90)) -> int:
    """Print the compile report (table or JSON); exit code 0 clean, 1 findings, 2 compile errors."""
    reports = check_all(ccs)
    if json:
        print(_json.dumps([asdict(r) for r in reports], indent=1))
    else:
        print(format_table(reports))
    if any(r.error for r in reports):
        return 2
    return 1 if any(r.findings for r in reports) else 0


if __name__ == "__main__":
    import sys

    sys.exit(main(json="--json" in sys.argv))
