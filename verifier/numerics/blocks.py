"""Row blocks for the elementwise passes of the spec: the same ops in the same order, one block
of rows at a time, so their scratch arrays stay in cache instead of each pass streaming the whole
[T, N] array through memory (and faulting in fresh pages for every temporary)."""

from __future__ import annotations

BLOCK_ELEMS = 1 << 16  # elements per block: a few fp32/fp64 scratch blocks fit in a 512 KiB L2


def block_rows(rows: int, width: int) -> int:
    """Rows per block: at most BLOCK_ELEMS elements (at least one row, at most `rows` if any)."""
    return max(1, min(rows, BLOCK_ELEMS // max(width, 1)))


def row_blocks(rows: int, width: int):
    """Slices of consecutive rows, block_rows(rows, width) rows each (the last one fewer)."""
    step = block_rows(rows, width)
    for i in range(0, rows, step):
        yield slice(i, min(i + step, rows))
