"""The table of several bench/anchors.py runs: each run's goal figures, their medians, ranges and
how many runs met each limit (the machine is shared: one run's figure is not the figure).

    python bench/anchors_runs.py bench/results/anchors_runs_stop41 [RUN ...]

The folder holds, per run, `<run>.full.json` (a `python bench/anchors.py` run) and
`<run>.routine10.json` (`--shapes 8b --contexts 1024 --layers 10 --verify-threads 2
--deep-max 0`); the runs are the ones named, else every `<run>.full.json` there. Prints a
markdown table.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def _goal(d: dict, prefix: str, missing: bool = False) -> float | None:
    """The measured figure of the run's goal named by prefix; None when `missing` allows a run
    that lacks it (a column newer than the run), else StopIteration."""
    got = next((g["measured"] for g in d["goals"] if g["goal"].startswith(prefix)), None)
    if got is None and not missing:
        raise StopIteration(f"no goal {prefix!r}")
    return got


def _fb(d: dict, shape: str, positions: int, tier: str) -> float:
    s = next(s for s in d["shapes"] if s["shape"] == shape)
    c = next(c for c in s["contexts"] if c["positions"] == positions)
    return 1e3 * c["tiers"][tier]["scaled"]["per_layer_ms"]["freivalds_bridge"]


# (heading, which run, figure, limit or None)
COLUMNS = [
    ("8B F+B worst, us (65)", "full", lambda d: _goal(d, "8b: Freivalds"), 65),
    ("8B F+B at 1,024 routine, us", "full", lambda d: _fb(d, "8b", 1024, "routine"), None),
    ("8B F+B at 1,024 full, us", "full", lambda d: _fb(d, "8b", 1024, "full"), None),
    ("70B F+B worst, us (126)", "full", lambda d: _goal(d, "70b: Freivalds"), 126),
    ("8B routine one core, ms (reported)", "full", lambda d: _goal(d, "8b: full routine"), None),
    ("8B full tier, ms/token (15)", "full", lambda d: _goal(d, "8b: full tier"), 15),
    ("8B routine 2 threads, 10 layers, ms (25)", "routine10",
     lambda d: _goal(d, "8b: the same on 2"), 25),
    ("8B full tier, 10 layers measured, ms/token (15)", "routine10",
     lambda d: _goal(d, "8b: full tier"), 15),
    ("8B full tier 2 threads, 10 layers, ms/token (reported)", "routine10",
     lambda d: _goal(d, "8b: the full tier on 2", missing=True), None),
]


def table(folder: Path, runs: list[str]) -> str:
    lines = ["| run | written (UTC) | commit | load at start | "
             + " | ".join(c[0] for c in COLUMNS) + " |", "|" + "---|" * (4 + len(COLUMNS))]
    values: list[list[float]] = [[] for _ in COLUMNS]
    for run in runs:
        d = {k: json.loads((folder / f"{run}.{k}.json").read_text()) for k in ("full", "routine10")}
        p = d["full"]["provenance"]
        load = d["full"]["shapes"][0]["contexts"][0]["loadavg"][0]
        cells = []
        for i, (_, which, figure, _) in enumerate(COLUMNS):
            got = figure(d[which])
            if got is not None:
                values[i].append(got)
            cells.append("-" if got is None else f"{got:.2f}")
        lines.append(f"| {run} | {p['date'][11:16]} | {p['git']['commit'][:7]} | {load:.2f} | "
                     + " | ".join(cells) + " |")
    if len(runs) > 1:
        pad = "|  |  |  | "
        lines += ["| median " + pad + " | ".join(f"{statistics.median(v):.2f}" if v else "-"
                                                 for v in values) + " |",
                  "| range " + pad + " | ".join(f"{min(v):.2f}-{max(v):.2f}" if v else "-"
                                                for v in values) + " |",
                  f"| met (of {len(runs)}) " + pad
                  + " | ".join("-" if c[3] is None else str(sum(x <= c[3] for x in v))
                               for c, v in zip(COLUMNS, values)) + " |"]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    folder = Path(argv[0])
    runs = argv[1:] or sorted(p.name[:-len(".full.json")] for p in folder.glob("*.full.json"))
    try:
        print(table(folder, runs))
    except (OSError, ValueError, KeyError, StopIteration) as e:
        print(f"anchors_runs: {folder}: {e!r}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
