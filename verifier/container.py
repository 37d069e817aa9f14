"""The binary container of keys and openings: magic, version, then a safetensors payload whose
``__metadata__`` holds one JSON document. Every size is checked before anything is allocated."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
from safetensors.numpy import save

from . import safejson
from .atomic import atomic_write


_ALLOWED = {"F32": np.float32, "F64": np.float64, "I8": np.int8, "I16": np.int16,
            "I32": np.int32, "I64": np.int64, "U8": np.uint8, "U64": np.uint64}
_SIZES = {"F32": 4, "F64": 8, "I8": 1, "I16": 2, "I32": 4, "I64": 8, "U8": 1, "U64": 8}
MAX_HEADER = 64 * 1024 * 1024
MAX_TENSORS = 8192  # a deep opening of a 32-layer model holds ~450 arrays; a key ~300
MAX_DIMS = 4  # the widest array either holds: K/V rows [n, heads, head_dim]
MAX_NAME = 256


class ContainerError(ValueError):
    """A file that is not a container of the expected kind, or is malformed."""


class ContainerVersionError(ContainerError):
    """A container of the expected kind written in another format version."""


def dumps(magic: bytes, version: int, meta: dict, arrays: dict[str, np.ndarray]) -> bytes:
    payload = save({k: np.ascontiguousarray(v) for k, v in arrays.items()},
                   metadata={"json": json.dumps(meta, sort_keys=True)})
    return magic + struct.pack("<I", version) + payload


def write(path: Path, magic: bytes, version: int, meta: dict, arrays: dict, mode: int = 0o644):
    """Atomic write (temp file + rename) with the given permission bits."""
    atomic_write(path, dumps(magic, version, meta, arrays), mode=mode)


def loads(data: bytes, magic: bytes, version: int, max_bytes: int) -> tuple[dict, dict]:
    """(meta, arrays) from bytes; raises ContainerError with a reason on anything unexpected."""
    if len(data) > max_bytes:
        raise ContainerError(f"larger than the {max_bytes}-byte limit")
    head = len(magic) + 4
    if len(data) < head + 8 or data[:len(magic)] != magic:
        raise ContainerError("wrong magic (not this kind of file)")
    (ver,) = struct.unpack("<I", data[len(magic):head])
    if ver != version:
        raise ContainerVersionError(f"unsupported version {ver} (expected {version})")
    (n,) = struct.unpack("<Q", data[head:head + 8])
    if n > MAX_HEADER or head + 8 + n > len(data):
        raise ContainerError("corrupt header length")
    try:  # both JSON documents through the bounded parser (depth, number length, duplicates)
        table = safejson.loads(data[head + 8:head + 8 + n], max_bytes=MAX_HEADER)
        if not isinstance(table, dict):
            raise ContainerError("corrupt header (not an object)")
        if len(table) > MAX_TENSORS + 1:
            raise ContainerError(f"{len(table) - 1} tensors (at most {MAX_TENSORS})")
        meta = safejson.loads(table.pop("__metadata__")["json"], max_bytes=MAX_HEADER)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        if isinstance(e, ContainerError):
            raise
        raise ContainerError(f"corrupt header ({e})") from None
    if not isinstance(meta, dict):
        raise ContainerError("corrupt header")
    return meta, _arrays(data, head + 8 + n, table)


def _arrays(data: bytes, start: int, table: dict) -> dict:
    size = len(data) - start
    out = {}
    for name, info in table.items():
        if not isinstance(info, dict) or info.get("dtype") not in _ALLOWED:
            raise ContainerError(f"tensor {name!r}: unsupported or missing dtype")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if len(name) > MAX_NAME or set(info) - {"dtype", "shape", "data_offsets"}:
            raise ContainerError(f"tensor {name[:40]!r}: malformed entry")
        if (not isinstance(shape, list) or len(shape) > MAX_DIMS
                or not all(_is_int(d) and d >= 0 for d in shape)
                or not isinstance(offsets, list) or len(offsets) != 2
                or not all(_is_int(o) for o in offsets)):
            raise ContainerError(f"tensor {name[:40]!r}: malformed entry")
        count = math.prod(shape)  # Python integers: no wrap-around, whatever the dims claim
        a, b = offsets
        if not (0 <= a <= b <= size) or b - a != count * _SIZES[info["dtype"]]:
            raise ContainerError(f"tensor {name[:40]!r}: outside the payload or wrong size")
        out[name] = np.frombuffer(data, dtype=_ALLOWED[info["dtype"]], count=count,
                                  offset=start + a).reshape(shape)
    return out


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def read(path: Path, magic: bytes, version: int, max_bytes: int) -> tuple[dict, dict]:
    path = Path(path)
    try:
        if path.stat().st_size > max_bytes:
            raise ContainerError(f"{path}: larger than the {max_bytes}-byte limit")
        data = path.read_bytes()
    except OSError as e:
        raise ContainerError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        return loads(data, magic, version, max_bytes)
    except ContainerError as e:
        raise type(e)(f"{path}: {e}") from None


__all__ = ["ContainerError", "ContainerVersionError", "dumps", "loads", "read", "write"]
