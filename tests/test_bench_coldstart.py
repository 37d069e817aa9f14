"""bench/coldstart.py: its report from a results dict, and its argument check (the timed runs
themselves generate with the engine and are run by hand: `python bench/coldstart.py`)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.append(str(Path(__file__).resolve().parents[1]))  # `bench`, last (kernels/ shadows)

from bench import coldstart  # noqa: E402


def _data(first, fresh, warm):
    secs = {"first": [first], "fresh": [fresh], "warm": [warm], "import": [0.1]}
    machine = {"cpu": "c", "cores": 2, "platform": "p", "python": "3"}
    return {"provenance": {"date": "d", "machine": machine, "git": {}, "packages": {}},
            "settings": {"runs": 1}, "opening_bytes": 4_000_000, "seconds": secs,
            "median_s": {k: v[0] for k, v in secs.items()},
            "fresh_over_warm": fresh / warm, "first_over_fresh": first / fresh,
            "goal_ratio": coldstart.GOAL_RATIO, "met": first / fresh <= coldstart.GOAL_RATIO}


def test_report_says_met_or_by_how_much():
    assert "goal <= 1.5: met" in coldstart.render_md(_data(0.62, 0.6, 0.012))
    assert "missed by 100 %" in coldstart.render_md(_data(1.8, 0.6, 0.012))


def test_runs_must_be_positive():
    with pytest.raises(SystemExit):
        coldstart.main(["--runs", "0"])
