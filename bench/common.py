"""Shared benchmark helpers: machine and commit provenance, timing, atomic result files.

Every result file records where and from what it was measured (machine, date, commit, dirty flag,
package versions), so a figure can always be traced back to the code that produced it.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

from bench.gpu_bootstrap import prefer_installed_kernels
from commitllm.verifier.atomic import atomic_write

# transformers >= 5.25 imports the Hub's top-level `kernels` package; run as `python bench/x.py`,
# bench/kernels.py (and the root's kernels/) shadowed it and every model load failed
prefer_installed_kernels()

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
PACKAGES = ("commitllm", "torch", "transformers", "numpy", "gguf", "tokenizers")


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else platform.processor()."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict:
    """Platform, CPU model, logical cores, memory and torch's thread count."""
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "cpu": cpu_model(), "cores": os.cpu_count()}
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        info["memory_gib"] = round(pages * size / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    return info


def git_info(repo: Path = REPO) -> dict:
    """HEAD commit and whether the working tree differs from it (None when git is unavailable)."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True,
                                 timeout=30, check=False)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status)}


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict:
    """Installed version of each named distribution (None when missing)."""
    out = {}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = None
    return out


def provenance() -> dict:
    """Everything a result file carries besides its figures."""
    return {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine_info(), "git": git_info(), "packages": package_versions()}


def provenance_md(p: dict) -> str:
    """The provenance block as Markdown bullet points."""
    m, g = p["machine"], p["git"]
    dirty = " (dirty working tree)" if g.get("dirty") else ""
    pk = ", ".join(f"{k} {v}" for k, v in p["packages"].items() if v)
    return "\n".join([
        f"- date: {p['date']}",
        (f"- machine: {m['cpu']}, {m['cores']} cores, {m.get('memory_gib', '?')} GiB, "
         f"{m['platform']}, Python {m['python']}, torch threads {m.get('torch_threads', '?')}"),
        f"- commit: {g.get('commit')}{dirty}",
        f"- packages: {pk}",
    ])


def write_results(out_dir: Path, name: str, data: dict, markdown: str) -> tuple[Path, Path]:
    """Write ``name.json`` and ``name.md`` under out_dir, each atomically."""
    js, md = Path(out_dir) / f"{name}.json", Path(out_dir) / f"{name}.md"
    atomic_write(js, json.dumps(data, indent=2, sort_keys=False) + "\n")
    atomic_write(md, markdown.rstrip() + "\n")
    return js, md


def cpu_counters() -> tuple[float, float | None]:
    """(CPU seconds used by this process, all threads; CPU seconds the whole machine has been
    busy, from /proc/stat, or None off Linux)."""
    t = os.times()
    own = t.user + t.system
    try:
        f = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        jiffies = [int(x) for x in f]
        busy = sum(jiffies) - jiffies[3] - jiffies[4]  # all but idle and iowait
        return own, busy / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return own, None


Probe = Callable[[], tuple[float, float | None]]


def others_share(seconds: float, probe: Probe = cpu_counters,
                 sleep: Callable[[float], None] = time.sleep) -> float | None:
    """Share of all cores that other processes used over the next `seconds` (None off Linux)."""
    (c0, b0) = probe()
    sleep(seconds)
    (c1, b1) = probe()
    if b0 is None or b1 is None:
        return None
    return max(0.0, (b1 - b0) - (c1 - c0)) / (seconds * (os.cpu_count() or 1))


def wait_for_quiet(threshold: float, max_wait: float, sample: float = 2.0,
                   share: Callable[[float], float | None] = others_share,
                   clock: Callable[[], float] = time.monotonic) -> float | None:
    """Wait until other processes use at most `threshold` of the cores over a `sample`-second
    window, or until `max_wait` seconds have passed; returns the last share measured."""
    deadline = clock() + max_wait
    while True:
        s = share(sample)
        if s is None or s <= threshold or clock() >= deadline:
            return s


@dataclass(frozen=True)
class Timing:
    """The timed runs (warm-ups excluded): wall seconds, this process's CPU seconds, and the CPU
    seconds other processes used meanwhile (a shared machine's contention; None if unknown)."""

    runs: tuple[float, ...]
    cpu: tuple[float, ...] = ()
    foreign: tuple[float | None, ...] = ()
    discarded: int = 0  # runs repeated because other jobs disturbed them

    @property
    def median(self) -> float:
        return statistics.median(self.runs)

    @property
    def spread(self) -> float:
        """(max - min) / median: the relative range of the timed runs."""
        return (max(self.runs) - min(self.runs)) / self.median if self.median > 0 else 0.0

    @property
    def contention(self) -> float | None:
        """Other processes' CPU seconds over all timed runs, per wall second and core."""
        if not self.foreign or any(f is None for f in self.foreign):
            return None
        return sum(self.foreign) / (sum(self.runs) * (os.cpu_count() or 1))

    def to_dict(self) -> dict:
        return asdict(self) | {"median": self.median, "min": min(self.runs),
                               "max": max(self.runs), "spread": self.spread,
                               "contention": self.contention}


def _timed(fn: Callable[[int], object], i: int, clock: Callable[[], float], probe: Probe):
    (c0, b0), t0 = probe(), clock()
    out = fn(i)
    t1, (c1, b1) = clock(), probe()
    foreign = None if b0 is None or b1 is None else max(0.0, (b1 - b0) - (c1 - c0))
    return out, t1 - t0, c1 - c0, foreign


def time_runs(fn: Callable[[int], object], runs: int, warmup: int = 1,
              clock: Callable[[], float] = time.perf_counter,
              probe: Probe = cpu_counters) -> tuple[Timing, list]:
    """Call fn(i) for `warmup` untimed then `runs` timed calls; returns the timing and the
    timed calls' return values. fn gets the run index (warm-ups get negative indices)."""
    timing, outs = time_interleaved({"": fn}, runs, warmup, clock, probe)[""]
    return timing, outs


def time_interleaved(fns: dict[str, Callable[[int], object]], runs: int, warmup: int = 1,
                     clock: Callable[[], float] = time.perf_counter,
                     probe: Probe = cpu_counters,
                     before: Callable[[], object] = lambda: None,
                     accept: Callable[[float, float | None], bool] = lambda wall, foreign: True,
                     retries: int = 0) -> dict[str, tuple[Timing, list]]:
    """Like time_runs for several contenders, alternating them run by run (A B A B ...) so that a
    drift of the machine's speed (other jobs coming and going) hits every contender alike.

    `before` runs ahead of each timed call, untimed (e.g. wait_for_quiet). A run that
    `accept(wall_s, other_jobs_cpu_s)` rejects is repeated, up to `retries` times (the last
    attempt is kept); Timing.discarded counts the repeats."""
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    for w in range(warmup):
        for fn in fns.values():
            fn(-1 - w)
    rec: dict[str, list[tuple]] = {k: [] for k in fns}
    discarded = dict.fromkeys(fns, 0)
    for i in range(runs):
        for name, fn in fns.items():
            for attempt in range(retries + 1):
                before()
                r = _timed(fn, i, clock, probe)
                if accept(r[1], r[3]) or attempt == retries:
                    break
                discarded[name] += 1
            rec[name].append(r)
    return {k: (Timing(*(tuple(col) for col in list(zip(*r))[1:]), discarded=discarded[k]),
                [x[0] for x in r]) for k, r in rec.items()}


def md_table(header: list[str], rows: list[list]) -> str:
    """A Markdown table (cells already formatted as strings)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def serving_model(name: str, tmp: Path):
    """What `serve --model` takes for a bench's --model: 'tiny' builds the tiny random test model
    with a character tokenizer (tests/tinymodels.py) under tmp; anything else is passed on."""
    if name != "tiny":
        return name
    sys.path.insert(0, str(REPO / "tests"))
    from tinymodels import make_tiny_chat_model

    return make_tiny_chat_model(Path(tmp) / "tiny")


def record_model_run(out_dir: Path, name: str, model: str, run: dict, markdown) -> dict:
    """Add one model's run to OUT/NAME.json (the other models' entries kept) and rewrite
    NAME.{json,md}; markdown(data) renders the whole file. Returns the data written."""
    path = Path(out_dir) / f"{name}.json"
    try:
        data = json.loads(path.read_text())
        data["models"]
    except (OSError, ValueError, KeyError):
        data = {"models": {}}
    data["models"][model] = run | {"provenance": provenance()}
    data["provenance"] = provenance()
    write_results(out_dir, name, data, markdown(data))
    return data
