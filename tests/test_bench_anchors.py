"""bench/anchors.py stays runnable: its scaling formula on a hand-computed case, and its pipeline
end to end at a tiny shape (build, generate, challenge, open, verify, results, plot, README
block)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.append(str(Path(__file__).resolve().parents[1]))  # `bench` (last: kernels/ must not shadow)

from bench import anchors
from commitllm.verifier.numerics import get_profile
from commitllm.verifier.opening import acc_width


def _tier(tier: str, layers: int, positions: int, ms: dict, breakdown: dict, total: int) -> dict:
    return {"tier": tier, "layers": layers, "positions": positions, "opening_bytes": total,
            "breakdown_bytes": breakdown,
            "verify_ms_per_position": {k: {"min": v, "median": v} for k, v in ms.items()}}


def test_scale_tier_splits_per_layer_and_once_per_token():
    # 2 layers measured: freivalds 3 (1 of it LM head), rest 2 (0.5 decode), attention 4,
    # merkle 1, other 0.5 -> total 10.5; per layer: bridge (3 + 2 - 1.5) / 2 = 1.75,
    # attention 2, merkle 0.5; once = 10.5 - 3 - 4 - 2 - 1 + 1.5 = 2.
    ms = {"freivalds": 3.0, "attention": 4.0, "rest": 2.0, "merkle": 1.0, "decode": 1.5,
          "other": 1.5, "total": 10.5}
    b = {"layer_acc": 600, "kv_rows": 200, "lm_head_acc": 150, "header": 50}
    full = anchors.scale_tier(_tier("full", 2, 4, ms, b, 1000), full_layers=32)
    assert full["layers"] == 32
    assert full["per_layer_ms"] == {"freivalds_bridge": 1.75, "attention": 2.0, "merkle": 0.5}
    # every input above is a dyadic fraction, so this float arithmetic is exact: compared with ==
    assert full["once_ms"] == 2.0
    assert full["verify_ms"] == 32 * 4.25 + 2.0
    assert full["opening_bytes"] == 200 + 800 * 16  # per-layer kinds x 32 / 2
    routine = anchors.scale_tier(_tier("routine", 2, 4, ms, b, 1000), full_layers=32)
    assert routine["layers"] == 10 and routine["freivalds_bridge_ms"] == 17.5
    short = anchors.scale_tier(_tier("routine", 2, 4, ms, b, 1000), full_layers=6)
    assert short["layers"] == 6  # routine never asks for more layers than the model has


def test_the_threaded_full_tier_scales_as_the_one_core_figure():
    # one core: 40 ms per token measured over 10 layers, scaled to 32 layers: 120 ms per token;
    # 2 threads: 200 ms for 8 tokens = 25 per token, x 120 / 40 -> 75 (dyadic-exact inputs)
    t = {"positions": 8, "verify_ms_threaded": {"threads": 2, "median": 200.0, "min": 200.0},
         "verify_ms_per_position": {"total": {"median": 40.0, "min": 40.0}},
         "scaled": {"verify_ms": 120.0}}
    assert anchors.threaded_full_ms(t) == 75.0


def test_goal_margin():
    assert anchors._goal("g", 30.0, 20.0) == {"goal": "g", "measured": 30.0, "limit": 20.0,
                                              "met": False, "over_by": 0.5, "floor": None,
                                              "reported": False, "memory": None}
    assert anchors._goal("g", 0.0, 0.01)["met"]


def test_anchors_pipeline_tiny(tmp_path):
    out = tmp_path / "results"
    rc = anchors.main(["--shapes", "tiny", "--contexts", "12,30", "--gen-tokens", "3",
                       "--deep-max", "12", "--verify-runs", "1", "--gen-threads", "1",
                       "--out", str(out)])
    assert rc == 0
    d = json.loads((out / "anchors.json").read_text())
    assert (out / "anchors.png").stat().st_size > 0 and "## Measured" in (out / "anchors.md").read_text()
    (s,) = d["shapes"]
    assert [c["positions"] for c in s["contexts"]] == [12, 30]
    assert set(s["contexts"][0]["tiers"]) == {"routine", "full", "deep"}
    assert set(s["contexts"][1]["tiers"]) == {"routine", "full"}  # deep only up to 12
    for c in s["contexts"]:
        assert c["retained"]["store_bytes"] > 0 and c["gen_s"] > 0
        for t in c["tiers"].values():
            assert t["accepted"] and t["scaled"]["layers"] == (10 if t["tier"] == "routine" else 12)
    assert s["retained_bytes_per_extra_token"] is not None
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{anchors.BEGIN}\nold\n{anchors.END}\n\nafter\n")
    anchors.update_readme(d, readme)
    text = readme.read_text()
    assert "old" not in text and "after" in text and "python bench/anchors.py" in text
    anchors.update_readme(d, readme)  # idempotent: one block
    assert readme.read_text() == text and text.count(anchors.BEGIN) == 1
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit):
        anchors.update_readme(d, readme)


def test_anchors_pipeline_tiny_moe(tmp_path):
    """The MoE shape's run: its own results file (the dense figures untouched), every tier
    accepted, the opening carrying the router and k experts per challenged (layer, position)."""
    out = tmp_path / "results"
    (out).mkdir()
    (out / "anchors.json").write_text("{}")
    rc = anchors.main(["--shapes", "tiny-moe,tiny-qwen3-moe", "--contexts", "12",
                       "--gen-tokens", "3", "--deep-max", "12", "--verify-runs", "1",
                       "--gen-threads", "1", "--out", str(out)])
    assert rc == 0 and (out / "anchors.json").read_text() == "{}"
    d = json.loads((out / "anchors_moe.json").read_text())
    assert "Protocol costs at tiny-moe / tiny-qwen3-moe" in (out / "anchors_moe.md").read_text()
    for s, (fam, experts, k, f) in zip(d["shapes"], [("mixtral", 4, 2, 48),
                                                      ("qwen3_moe", 8, 3, 32)]):
        tiers = s["contexts"][0]["tiers"]
        assert set(tiers) == {"routine", "full", "deep"}
        assert all(t["accepted"] for t in tiers.values())
        cfg = anchors.llama_config(s["shape"], 1)
        assert (cfg.family, cfg.num_experts, cfg.experts_per_token) == (fam, experts, k)
        # per challenged (layer, position): qkv, o, router, and k x (gate_up + down), each at its
        # packed width (opening version 2), and 8 bytes each as int64 (version 1)
        w = {m: acc_width(cfg, get_profile("w8a16"), m)
             for m in ("qkv", "o", "router", "gate_up", "down")}
        n = {"qkv": cfg.q_size + 2 * cfg.kv_size, "o": 64, "router": experts,
             "gate_up": k * 2 * f, "down": k * 64}
        per = sum(w[m] * n[m] for m in n)
        full = tiers["full"]
        assert full["breakdown_bytes"]["layer_acc"] == per * full["positions"] * full["layers"]
        assert full["breakdown_bytes_v1"]["layer_acc"] == \
            8 * sum(n.values()) * full["positions"] * full["layers"]


def test_anchors_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        anchors.parse_args(["--shapes", "13b"])
    with pytest.raises(SystemExit):  # a MoE shape is run apart from the dense ones
        anchors.parse_args(["--shapes", "8b,mixtral"])
    with pytest.raises(SystemExit):
        anchors.parse_args(["--contexts", "3", "--gen-tokens", "4"])


def test_freivalds_compare_runs(monkeypatch):
    from bench import common

    calls = []
    monkeypatch.setattr(common, "time_runs", lambda fn, runs: (calls.append(fn(0)) or
                                                                common.Timing((0.002,)), None))
    rows = anchors.freivalds_compare(runs=1)
    assert [r["matrix"] for r in rows] == ["qkv", "o", "gate_up", "down"]
    assert all(r["numpy_ms"] == 2.0 and r["compiled_ms"] == 2.0 for r in rows)
    assert len(calls) == 8
    for slow, fast in zip(calls[::2], calls[1::2]):  # both routes give the same residues
        assert all(np.array_equal(a, b) for a, b in zip(slow, fast))


def test_floors_measure_and_render(monkeypatch):
    monkeypatch.setattr(anchors, "GOAL_CONTEXT", 64)
    f = anchors.measure_floors(runs=1)
    assert f["rows"] == 64 and f["leaf_bytes"] == 2 * 8 * 128 * 2 + 2 * 8 * 4 + 19 + 2 + 8
    assert all(f[k] > 0 for k in ("leaf_hashes_ms", "leaf_hashes_py_ms", "stream_ms",
                                  "multiproof_ms", "multiproof_py_ms", "pack_ms", "call_ms",
                                  "leaf_gb_s"))
    text = anchors._floors_md({"floors": f})
    assert "63 node hashes" in text and "blake3-py one leaf per call" in text
    assert anchors._floors_md({"floors": {"rows": 1}}) == ""  # a result from before the core
    assert anchors._floors_md({}) == ""


def test_bridge_compare_checks_bits_and_times_both(monkeypatch):
    from bench import common

    def fake_time_runs(fn, runs):
        assert fn(0) is None  # the timed calls drop their outputs (no kept fresh pages)
        return common.Timing((2e-6,)), None
    monkeypatch.setattr(common, "time_runs", fake_time_runs)
    rows = anchors.bridge_compare(rows=2, runs=1)
    assert len(rows) == 8 and all(r["numpy_us"] == 2.0 == r["compiled_us"] for r in rows)


def test_the_runs_table_takes_medians_ranges_and_counts(tmp_path):
    """bench/anchors_runs.py on two hand-made runs: each figure, the median, the range and how
    many met each limit; a missing run is one line on stderr and exit 1."""
    import json

    from bench import anchors_runs

    def run(fb_worst: float, full_ms: float, two: float, full_two: float | None) -> dict:
        goals = [{"goal": "8b: Freivalds x", "measured": fb_worst},
                 {"goal": "70b: Freivalds x", "measured": 100.0},
                 {"goal": "8b: full routine x", "measured": 30.0},
                 {"goal": "8b: full tier x", "measured": full_ms},
                 {"goal": "8b: the same on 2 x", "measured": two}]
        if full_two is not None:  # a run older than the column has no such goal
            goals.append({"goal": "8b: the full tier on 2 x", "measured": full_two})
        tiers = {t: {"scaled": {"per_layer_ms": {"freivalds_bridge": 0.1}}}
                 for t in ("routine", "full")}
        return {"goals": goals, "provenance": {"date": "2026-12-07T18:17:00", "git":
                                                {"commit": "abcdef0123"}},
                "shapes": [{"shape": "8b", "contexts": [{"positions": 1024, "loadavg": [0.5],
                                                         "tiers": tiers}]}]}
    for name, args in (("a", (60.0, 14.0, 24.0, None)), ("b", (70.0, 16.0, 26.0, 9.0))):
        for kind in ("full", "routine10"):
            (tmp_path / f"{name}.{kind}.json").write_text(json.dumps(run(*args)))
    out = anchors_runs.table(tmp_path, ["a", "b"]).splitlines()
    assert out[2].startswith("| a | 18:17 | abcdef0 | 0.50 | 60.00 | 100.00 | 100.00 | 100.00 |")
    assert out[4].startswith("| median |  |  |  | 65.00 |")
    assert "| 60.00-70.00 |" in out[5]
    assert out[2].endswith("| 14.00 | 24.00 | 14.00 | - |")  # a: no threaded full-tier goal
    assert out[3].endswith("| 16.00 | 26.00 | 16.00 | 9.00 |")
    assert out[4].endswith("| 9.00 |") and out[5].endswith("| 9.00-9.00 |")
    assert out[6] == "| met (of 2) |  |  |  | 1 | - | - | 2 | - | 1 | 1 | 1 | - |"
    assert anchors_runs.main([str(tmp_path), "missing"]) == 1
