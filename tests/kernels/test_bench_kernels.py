"""bench/kernels.py stays runnable: its roofline formulas on hand-computed cases (no GPU needed).

pytest.approx: the floors are float seconds from byte and operation counts divided by
bandwidths; they are estimates printed by the bench, not committed values."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.append(str(Path(__file__).resolve().parents[2]))  # `bench` (last: kernels/ must not shadow)

from bench import kernels as bk  # noqa: E402


def test_floor_is_max_of_bandwidth_and_compute():
    mem = {"bytes": 3.35e9, "ops": 1.0, "kind": "int8"}  # 1 ms of HBM traffic
    comp = {"bytes": 1.0, "ops": 1979e9, "kind": "int8"}  # 1 ms of int8 MMA
    assert bk.floor_s(mem, "H100-SXM") == pytest.approx(1e-3)
    assert bk.floor_s(comp, "H100-SXM") == pytest.approx(1e-3)
    assert bk.floor_s(dict(comp, kind="bf16"), "H100-SXM") == pytest.approx(1979 / 989 * 1e-3)


def test_gemm_case_counts_two_planes():
    case = next(c for c in bk.gemm_cases((1,)) if c["shape"].startswith("o "))
    m, n, k = 1, 4096, 4096
    assert case["ours"]["ops"] == 2 * 2 * m * n * k  # int16 activation = two int8 MMAs
    assert case["baseline"][1]["ops"] == 2 * m * n * k
    assert case["ours"]["bytes"] > n * k  # at least the int8 weight


def test_roofline_rows_cover_every_case():
    cases = bk.gemm_cases() + bk.attention_cases(1024) + bk.row_cases()
    rows = bk.roofline(cases)
    assert len(rows) == len(cases)
    for r in rows:
        assert all(r[f"floor_us_{g}"] > 0 for g in bk.GPUS)
