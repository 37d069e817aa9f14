"""Helpers shared by the kernel tests (imported by name: pytest puts this folder on sys.path)."""

from __future__ import annotations

import numpy as np
import torch


def as_np(v) -> np.ndarray:
    return v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)


def assert_bits_equal(got, want, name: str = "value") -> None:
    """dtype, shape and every byte equal (so -0.0 != +0.0); on mismatch, say where and how."""
    a, b = as_np(got), as_np(want)
    assert a.dtype == b.dtype, f"{name}: dtype {a.dtype} vs {b.dtype}"
    assert a.shape == b.shape, f"{name}: shape {a.shape} vs {b.shape}"
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    if a.tobytes() == b.tobytes():
        return
    ua = a.view(f"u{a.itemsize}") if a.dtype.kind == "f" else a
    ub = b.view(f"u{b.itemsize}") if b.dtype.kind == "f" else b
    bad = np.argwhere(ua != ub)
    i = tuple(bad[0])
    raise AssertionError(f"{name}: {len(bad)} of {a.size} differ, first at {i}: "
                         f"kernel {a[i]!r} spec {b[i]!r}")
