"""Progress of the slow first-run steps (GGUF conversion, quantization, key building), shown by
the command lines: a line when a step starts and when it ends, and a bar on a terminal where the
step reports its parts. Silent unless a CLI called `use(console)`: library callers see nothing."""

from __future__ import annotations

import time
from contextlib import contextmanager

_console = None


def use(console) -> None:
    """Report steps on this rich console (the CLIs' stderr console)."""
    global _console
    _console = console


@contextmanager
def step(what: str, total: int | None = None):
    """Announce `what`; yields advance(n=1) for a step of `total` parts (bar on a terminal)."""
    if _console is None:
        yield lambda n=1: None
        return
    _console.print(f"{what} ...", highlight=False, markup=False)
    t0 = time.perf_counter()
    if total and _console.is_terminal:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

        with Progress("  ", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=_console, transient=True) as bar:
            task = bar.add_task(what, total=total)
            yield lambda n=1: bar.advance(task, n)
    else:
        yield lambda n=1: None
    _console.print(f"{what}: done in {time.perf_counter() - t0:.1f} s", highlight=False,
                   markup=False)
