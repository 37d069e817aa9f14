"""Kernel tests run on the Triton interpreter (no GPU here): TRITON_INTERPRET must be set before
any kernel module is imported, because `triton.jit` reads it when it decorates the kernels.

The interpreter is bit-faithful for integer ops and correctly rounded fp32/fp64 ops, which is all
the kernels use; what it cannot show (registers, PTX) is covered by test_check.py, which compiles
for sm_80/sm_90 in a subprocess without the interpreter.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"
