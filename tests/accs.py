"""Opened accumulators as tests edit them. Openings carry accumulators packed (opening version 2:
uint8 [..., w], w-byte two's complement, verifier/opening.py); a test that changes an
accumulator's value decodes, edits and re-packs it at the same width."""

from __future__ import annotations

import numpy as np

from commitllm.verifier.opening import pack_acc, unpack_acc


def acc(arrays: dict, name: str) -> np.ndarray:
    """The int64 values of the opened accumulator array `name`."""
    return unpack_acc(arrays[name])


def set_acc(arrays: dict, name: str, z: np.ndarray, wrap: bool = False) -> None:
    """Store int64 values z as `name`, packed at the width the opening used: OverflowError for a
    value that width cannot hold (the packed format has no way to say it), or with wrap its low
    w bytes, all a cheating provider can send."""
    w = arrays[name].shape[-1]
    z = np.asarray(z, np.int64)
    arrays[name] = low_bytes(z, w) if wrap else pack_acc(z, w)


def low_bytes(z: np.ndarray, w: int) -> np.ndarray:
    """The low w bytes of each int64 value (pack_acc without its range check): what a cheating
    provider whose values exceed the width can put on the wire."""
    return np.ascontiguousarray(np.asarray(z, "<i8")[..., None].view(np.uint8)[..., :w])


def add_acc(arrays: dict, name: str, index, delta: int, wrap: bool = False) -> None:
    """accumulator `name`[index] += delta (wrap: see set_acc)."""
    z = acc(arrays, name)
    z[index] += delta
    set_acc(arrays, name, z, wrap)
