"""Launcher helpers shared by the kernels: argument checks and output dtypes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import compat  # noqa: F401  -- Triton release differences, patched before any launch


def int_dtype(qmax: int) -> torch.dtype:
    """Storage type of a symmetric integer range: int8 up to 127, else int16."""
    if not 0 < qmax <= 32639:
        raise ValueError(f"qmax {qmax} outside (0, 32639]")
    return torch.int8 if qmax <= 127 else torch.int16


def check_tensor(name: str, t: torch.Tensor, dtype: torch.dtype | tuple, ndim: int,
                 shape: tuple | None = None, contiguous_last: bool = True) -> None:
    """Raise TypeError/ValueError unless t has the dtype, rank, shape and a unit last stride."""
    dtypes = dtype if isinstance(dtype, tuple) else (dtype,)
    if not isinstance(t, torch.Tensor) or t.dtype not in dtypes:
        got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
        raise TypeError(f"{name}: expected {' or '.join(map(str, dtypes))}, got {got}")
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dims, got shape {tuple(t.shape)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
    if contiguous_last and t.numel() and t.stride(-1) != 1:
        raise ValueError(f"{name}: last dimension must be contiguous (stride {t.stride()})")


def same_device(*tensors: torch.Tensor) -> None:
    """Raise ValueError unless all given tensors sit on one device."""
    devs = {t.device for t in tensors if t is not None}
    if len(devs) > 1:
        raise ValueError(f"tensors on several devices: {sorted(map(str, devs))}")


@dataclass(frozen=True)
class KernelVariant:
    """One compiled form of a kernel for the compile report: argument types, constexprs, launch
    options. `types` maps every runtime argument to a Triton type string ("*i8", "i32", "fp32")."""

    name: str
    fn: object  # the triton.JITFunction
    types: dict
    constexprs: dict
    num_warps: int
    num_stages: int = 1

    def signature(self) -> dict:
        """Argument name -> type, in the kernel's argument order (constexprs as "constexpr")."""
        names = self.fn.arg_names
        missing = [n for n in names if n not in self.types and n not in self.constexprs]
        if missing:
            raise ValueError(f"{self.name}: no type for {missing}")
        return {n: "constexpr" if n in self.constexprs else self.types[n] for n in names}
