"""bench/gpu.py, the prepared GPU first-contact run, works before any GPU is lent: its dry run (the
Triton interpreter on the CPU, tiny shapes and models) runs every step through the wrapper
bench/gpu.sh, the kernels equal the spec, the interpreted Triton backend's receipts and openings
equal the torch engine's byte for byte and verify; a step over its time box is stopped and
reported; the comparisons and goal bookkeeping fail when they should."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import gpu, gpu_bootstrap  # noqa: E402


def _run(args: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHON"] = sys.executable  # the wrapper's interpreter
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=env)


# The whole GPU script on the CPU (30 s here): run it with -m slow before a GPU session.
@pytest.mark.slow
def test_dry_run_through_the_wrapper(tmp_path):
    out = tmp_path / "gpu"
    p = _run(["bash", "bench/gpu.sh", str(out), "--dry-run"], timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    data = json.loads((out / "gpu.json").read_text())
    st = data["steps"]
    assert {k: v["status"] for k, v in st.items()} == {
        "env": "done", "exactness": "passed", "receipts": "passed", "timings": "done",
        "e2e": "done", "serve": "passed"}
    ex = st["exactness"]["cases"]
    assert len(ex) == st["exactness"]["n_cases"] and all(c["equal"] for c in ex)
    kernels = {c["kernel"] for c in ex}
    assert kernels == {"rmsnorm_quant", "quantize_rows", "swiglu_quant", "rope_quant", "gemm",
                       "attention decode", "attention prefill", "attention decode window",
                       "attention prefill window"}
    assert {c["width"] for c in ex if c["kernel"] == "rmsnorm_quant"} == {32639, 127}
    runs = st["receipts"]["runs"]
    assert {r["model"] for r in runs} == {"smollm2-tiny", "llama3-tiny", "mixtral-tiny"}
    assert {r["sampling"] for r in runs} == {"greedy", "sampled"}
    for r in runs:
        assert r["tokens_equal"] and r["receipts_identical"] == r["receipts"] == r["batch"]
        assert r["openings"] and all(o["identical"] and o["accepted"] for o in r["openings"])
    assert all("ours_ms" in r for r in st["timings"]["rows"])
    assert {r["batch"] for r in st["e2e"]["rows"]} >= {2}
    assert [r["requests"] for r in st["serve"]["rows"]] == [2]
    assert all(r["together_identical"] and r["one_per_step_identical"]
               for r in st["serve"]["rows"])
    md = (out / "gpu.md").read_text()
    assert "Dry run on the CPU" in md and "## Cross-hardware receipts" in md
    assert "## Serving's path" in md
    assert "GPU bench: CPU dry run" in p.stdout  # the one-screen summary
    assert (out / "gpu_env.txt").is_file() and (out / "gpu_log.txt").is_file()
    assert data["steps"]["env"]["source_sha256"] == gpu.source_digest()


def test_time_box_stops_a_step_and_the_run_goes_on(tmp_path):
    p = _run([sys.executable, "bench/gpu.py", "--dry-run", "--out", str(tmp_path),
              "--steps", "exactness,timings", "--box-scale", "0.0001"])
    assert p.returncode == 1, p.stdout[-2000:] + p.stderr[-2000:]
    st = json.loads((tmp_path / "gpu.json").read_text())["steps"]
    ex = st["exactness"]
    assert ex["status"] == "timeout" and "time box" in ex["error"]
    assert len(ex["cases"]) < ex["n_cases"]
    assert st["timings"]["status"] == "timeout"
    assert "receipts" not in st and "e2e" not in st  # not asked for
    # --resume keeps finished steps: timeouts are final, only the missing step runs
    p = _run([sys.executable, "bench/gpu.py", "--dry-run", "--out", str(tmp_path), "--resume",
              "--steps", "exactness,timings"])
    st2 = json.loads((tmp_path / "gpu.json").read_text())
    assert st2["runs"] == 2 and st2["steps"]["exactness"]["status"] == "timeout"


def test_bits_equal_is_byte_equality():
    a = np.array([0.0, 1.0], dtype=np.float32)
    assert gpu.bits_equal(a, a.copy()) == (True, "")
    ok, why = gpu.bits_equal(np.array([-0.0, 1.0], dtype=np.float32), a)
    assert not ok and "1 of 2 differ" in why
    assert not gpu.bits_equal(a.astype(np.float64), a)[0]
    assert not gpu.bits_equal(a[:1], a)[0]
    nan1 = np.array([np.nan], dtype=np.float32)
    nan2 = nan1.view(np.uint32).copy()
    nan2[0] ^= 1
    assert not gpu.bits_equal(nan1, nan2.view(np.float32))[0]  # payloads differ: not equal


def test_goals_met_and_missed():
    peaks = (4.8e12, 1979e12, 989e12)
    rows = [dict(kernel="attention decode", shape="S=4096 nh=32", ours_ms=1.5, sdpa_ms=1.0),
            dict(kernel="gemm w8a16", shape="qkv M=1 N=6144 K=4096", hbm_share=0.85),
            dict(kernel="gemm w8a16", shape="o M=1 N=4096 K=4096", hbm_share=0.5),
            dict(kernel="gemm w8a16", shape="o M=16 N=4096 K=4096", hbm_share=0.1)]
    g = gpu.goals(rows, peaks)
    assert g["attention_decode_4k"]["met"] is False and g["attention_decode_4k"]["ratio"] == 1.5
    assert g["gemm_m1_hbm"]["worst"] == 0.5 and not g["gemm_m1_hbm"]["met"]
    assert set(g["gemm_m1_hbm"]["shares"]) == {"qkv", "o"}  # M = 16 is not an M = 1 GEMM
    rows[0]["ours_ms"], rows[2]["hbm_share"] = 1.2, 0.9
    g = gpu.goals(rows, peaks)
    assert g["attention_decode_4k"]["met"] and g["gemm_m1_hbm"]["met"]
    assert gpu.peaks_for("NVIDIA H200")[0] == "H200"
    assert gpu.peaks_for("NVIDIA H100 80GB HBM3")[0] == "H100"
    assert gpu.peaks_for("Tesla T4") == (None, None)


def test_wheel_tags_and_bundled_wheels():
    name = "blake3-1.0.11-cp312-cp312-manylinux_2_17_x86_64.manylinux2014_x86_64.whl"
    assert gpu_bootstrap.wheel_matches(name, (3, 12), "x86_64")
    assert not gpu_bootstrap.wheel_matches(name, (3, 11), "x86_64")
    assert not gpu_bootstrap.wheel_matches(name, (3, 12), "aarch64")
    assert gpu_bootstrap.wheel_matches("x-1.0-cp38-abi3-manylinux2014_x86_64.whl", (3, 12),
                                       "x86_64")
    assert gpu_bootstrap.wheel_matches("x-1.0-py3-none-any.whl", (3, 12), "x86_64")
    wheels = sorted(p.name for p in gpu_bootstrap.WHEELS.glob("*.whl"))
    assert any(gpu_bootstrap.wheel_matches(w, (3, 12), "x86_64") for w in wheels)  # lent machine
    assert sum(p.stat().st_size for p in gpu_bootstrap.WHEELS.glob("*")) < 4 * 2**20


def test_bootstrap_unpacks_blake3_for_a_bare_interpreter(tmp_path):
    """A Python whose site-packages are hidden (-S, no blake3, no commitllm install) imports the
    verifier after the bootstrap unpacked the bundled wheel."""
    if not any(gpu_bootstrap.wheel_matches(p.name) for p in gpu_bootstrap.WHEELS.glob("*.whl")):
        return  # no bundled wheel for this interpreter (the lent machine's 3.12 is checked above)
    code = (
        "import sys; sys.path.insert(0, 'bench'); import gpu_bootstrap as g\n"
        "try:\n    import blake3\n    raise SystemExit('blake3 visible before the bootstrap')\n"
        "except ImportError:\n    pass\n"
        f"print(g.ensure_wheels(g.Path({str(tmp_path)!r}), needed={{'blake3': 'blake3'}}))\n"
        "import blake3; print(blake3.__file__)\n")
    p = _run([sys.executable, "-S", "-c", code])
    assert p.returncode == 0, p.stdout + p.stderr
    assert "unpacked blake3-" in p.stdout and str(tmp_path) in p.stdout


def test_markdown_and_summary_of_a_gpu_document():
    """What a GPU run writes (fields the dry run leaves empty) renders without error."""
    rows = [dict(kernel="attention decode", shape="S=4096 nh=32 nkv=8 d=128", bytes=1, ops=1,
                 ours_ms=0.02, sdpa_ms=0.01, sdpa_backend="flash", tb_s=1.7, tops=0.1,
                 hbm_share=0.35, floor_us=7.0, ours_over_sdpa=2.0),
            dict(kernel="gemm w8a16", shape="qkv M=1 N=6144 K=4096", bytes=1, ops=1,
                 ours_ms=0.01, int_mm_ms=0.009, bf16_ms=0.012, hbm_share=0.81,
                 ours_over_int_mm=1.1, ours_over_bf16=0.8),
            dict(kernel="gemm w8a16", shape="o M=1 N=4096 K=4096", bytes=1, ops=1,
                 error="RuntimeError: self.size(0) needs to be greater than 16")]
    data = {"started": "2026-12-03T18:00:00Z", "total_s": 400.0, "budget_s": 470.0, "steps": {
        "env": dict(status="done", gpu="NVIDIA H200", driver="570.1", cuda_runtime="12.8",
                    torch="2.11.0", triton="3.6.0", capability=[9, 0], gpu_memory_gib=139.8,
                    sm_count=132, git={"commit": None}, commit_env="abc", source_sha256="f" * 64),
        "exactness": dict(status="failed", n_cases=3, cases=[
            dict(kernel="gemm", config="16x64x128w4s4s4", shape="(1, 1, 1)", width="x127w127",
                 equal=False, detail="z: 1 of 1 differ"),
            dict(kernel="gemm", config="picked,bias=0", shape="(1, 1, 1)", width="x127w127",
                 equal=True, detail="")], precompile={"kernels": 2, "seconds": 1.0}),
        "receipts": dict(status="timeout", error="stopped: over its time box", runs=[
            dict(model="llama3-8b-shapes-2-layers", batch=8, sampling="sampled", new_tokens=64)]),
        "timings": dict(status="done", rows=rows, gpu="NVIDIA H200", peaks_from="H200",
                        goals=gpu.goals(rows, (4.8e12, 1979e12, 989e12))),
        "e2e": dict(status="error", error="RuntimeError: x", rows=[
            dict(model="smollm2-135m-shapes", batch=32, prompt=32, new=64, ours_ttft_s=0.1,
                 hf_ttft_s=0.05, ours_decode_tok_s=100.0, hf_decode_tok_s=400.0,
                 ours_over_hf_decode=0.25),
            dict(model="smollm2-135m-shapes", batch=1, prompt=2048, new=1, kind="ttft",
                 ours_ttft_s=0.3, hf_ttft_s=0.1)])}}
    md = gpu.markdown(data)
    assert "NVIDIA H200" in md and "MISSED" in md and "z: 1 of 1 differ" in md
    assert "| receipts | timeout |" in md
    s = gpu.summary(data)
    assert "1/2 bit-equal" in s and "attention_decode_4k: missed" in s and "TTFT@2048" in s
