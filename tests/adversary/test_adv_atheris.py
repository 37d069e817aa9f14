"""A short coverage-guided fuzz run (atheris) of the fuzz targets: no crash, no
accepted forgery. The long run is `python bench/fuzz.py --seconds N` (bench/results/fuzz.md).

Each run is its own process (libFuzzer ends the process it runs in). The structured `verify`
target runs under every profile (w8a16 by default, the others -m slow); the raw-bytes targets
under w8a16 (the parsers do not depend on the profile; challenge and request: -m slow, their
parsers' cases are in test_adv_typed.py and test_adv_request.py). Inputs per run:
ADVERSARY_ATHERIS_RUNS (default 600).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris")

HARNESS = Path(__file__).resolve().parent / "fuzz_harness.py"
RUNS = int(os.environ.get("ADVERSARY_ATHERIS_RUNS", "600"))
SLOW = [pytest.mark.slow]  # the other profiles' verify runs: -m slow (bench/fuzz.py runs all)
CASES = [("verify", "w8a16"), pytest.param("verify", "a8", marks=SLOW),
         pytest.param("verify", "w16a16", marks=SLOW), ("container", "w8a16"),
         ("receipt", "w8a16"), pytest.param("challenge", "w8a16", marks=SLOW),
         pytest.param("request", "w8a16", marks=SLOW)]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")  # the tiny model is built once, reused by every run


@pytest.mark.parametrize("target,profile", CASES)
def test_fuzz_short(target, profile, workdir):
    out = workdir / f"{target}-{profile}.json"
    p = subprocess.run([sys.executable, str(HARNESS), "--target", target, "--profile", profile,
                        "--runs", str(RUNS), "--seconds", "90", "--out", str(out),
                        "--workdir", str(workdir / "w")],
                       capture_output=True, text=True, timeout=400, cwd=workdir)
    assert out.exists(), p.stderr[-2000:]
    d = json.loads(out.read_text())
    assert d["inputs"] >= min(RUNS, 50), d  # the run did fuzz (not a start-up failure)
    assert d["crashes"] == 0, json.dumps(d["crash_sites"], indent=1)[:3000]
    assert d["forgeries"] == 0, json.dumps(d["forgery_examples"], indent=1)[:3000]
    assert p.returncode == 0, p.stderr[-2000:]
    honest = d["outcomes"].get("honest", 0)
    assert honest + d["outcomes"].get("rejected", 0) + d["outcomes"].get("parse", 0) == d["inputs"]
