"""Differences between the Triton releases the kernels run under (3.6 on the lent GPU machines,
3.9 in development), patched or guarded in one place. Imported by `launch.py`, so by every kernel
module, before any launch.

- Interpreter (`TRITON_INTERPRET=1`): a scalar is a shape-(1,) numpy array. Triton 3.6 converts it
  to a Python int with `int(data)`, which NumPy >= 2.4 refuses ("only 0-dimensional arrays can be
  converted"); 3.9 squeezes first. Loop bounds computed in a kernel (`range(lo, hi, BLOCK_N)` in
  attention.py) need that conversion, so the interpreter's tensor patch gets 3.9's `__index__`.
  Compiled kernels are not affected.

`triton_version()` is what the compile report and the GPU bench record.
"""

from __future__ import annotations

import functools

import numpy as np
import triton


def triton_version() -> tuple[int, int]:
    """(major, minor) of the installed Triton."""
    major, minor = triton.__version__.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def _index(self) -> int:
    return int(np.asarray(self.handle.data).squeeze())


def patch_interpreter() -> bool:
    """Give the interpreter's tensors a NumPy-2-safe `__index__` (what Triton 3.9 does). Returns
    whether the interpreter module had the patch point (it is looked up at every launch)."""
    try:
        from triton.runtime import interpreter
    except ImportError:  # pragma: no cover - every supported release has it
        return False
    orig = getattr(interpreter, "_patch_lang_tensor", None)
    if orig is None or getattr(orig, "_commitllm", False):
        return orig is not None

    @functools.wraps(orig)
    def patched(tensor, scope, *args, **kwargs):
        out = orig(tensor, scope, *args, **kwargs)
        scope.set_attr(tensor, "__index__", _index)
        return out

    patched._commitllm = True
    interpreter._patch_lang_tensor = patched
    return True


patch_interpreter()
