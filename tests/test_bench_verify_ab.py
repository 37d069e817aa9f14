"""bench/verify_ab.py stays runnable: it saves an opening of the tiny shape and times this
checkout against itself in alternating child processes (each side loads commitllm from its own
folders), writing its results with both commits and the ratio."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.append(str(Path(__file__).resolve().parents[1]))  # `bench`, last: kernels/ must not shadow

from bench import verify_ab

REPO = Path(__file__).resolve().parents[1]


def test_save_then_compare_a_checkout_with_itself(tmp_path):
    data = tmp_path / "data"
    verify_ab.main(["--save", str(data), "--shape", "tiny", "--layers", "2", "--positions", "24"])
    assert json.loads((data / "setup.json").read_text())["layers"] == 2
    out = tmp_path / "out"
    assert verify_ab.main(["--data", str(data), "--against", str(REPO), "--rounds", "2",
                           "--runs", "1", "--tiers", "routine,full", "--out", str(out)]) == 0
    d = json.loads((out / "verify_ab.json").read_text())
    assert d["before"]["commit"] == d["after"]["commit"] and d["rounds"] == 2
    for tier in ("routine", "full"):
        assert len(d["per_round"][tier]["before"]) == len(d["per_round"][tier]["after"]) == 2
        for t in ("1", "2"):
            f = d["summary"][tier][t]
            assert f["before_ms"] > 0 and f["after_ms"] > 0
            assert f["ratio"] == f["after_ms"] / f["before_ms"]
            assert set(f["after_parts_ms"]) == set(verify_ab.PARTS)
            assert all(x >= 0 for x in f["after_parts_ms"].values())
    md = (out / "verify_ab.md").read_text()
    assert "| routine | 2 |" in md and "after / before" in md and "| merkle |" in md


@pytest.mark.parametrize("argv", [[], ["--data", "x"], ["--data", "x", "--against", "y",
                                                          "--tiers", "deeper"],
                                  ["--data", "x", "--against", "y", "--threads", "1"]])
def test_bad_arguments_exit_with_usage(argv):
    with pytest.raises(SystemExit) as e:
        verify_ab.parse_args(argv)
    assert e.value.code == 2
