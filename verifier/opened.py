"""The types of an opening, checked before anything reads it.

An opening's container header declares each array's dtype and shape, and a Merkle leaf covers
only an array's bytes: the same bytes read as uint8 instead of int8, or as big-endian floats,
mean other numbers. So nothing is taken from the header. `check_types` compares the opening
with `opening.array_specs` (built from the key's config and profile and the challenge's plan):
exactly the expected set of names, each with exactly the expected dtype (byte order included)
and shape, and values in the range the profile allows. Codes: `opening_type` (a name missing or
extra, a dtype or shape other than the key's), `opening_range` (a value outside its range: a
K/V value beyond +-kv_qmax, an embedding value beyond +-head_qmax, a non-finite, zero, negative,
subnormal or above-(fp32 max / kv_qmax) K/V scale, a non-finite residual or embedding scale), `opening_mismatch` (positions
or token ids other than the challenged ones: an opening for another challenge).
"""

from __future__ import annotations

import numpy as np

from .native.bridge import minmax
from .opening import Spec
from .replay import Reject

F32_TINY = np.finfo(np.float32).tiny  # the smallest positive normal fp32


def check_types(arrays, specs: dict[str, Spec], defer_range=frozenset()) -> None:
    """Raise Reject('opening_type' | 'opening_range') unless `arrays` is exactly `specs`.
    defer_range: names whose value range (Spec.lo / hi) is left to a later check_range (the
    verifier's per-layer units check a layer's K/V values just before they hash and replay it);
    their dtype, shape and every other check still run here."""
    if not isinstance(arrays, dict):
        raise Reject("opening_type", "the opening's arrays are not a name -> array table")
    names, want = set(arrays), set(specs)
    if names != want:
        extra, missing = sorted(names - want, key=str), sorted(want - names)
        raise Reject("opening_type", f"arrays differ from what the challenge opens: unknown "
                                     f"{[str(n)[:40] for n in extra[:4]]}, missing {missing[:4]}")
    for name in sorted(want):
        _check(name, arrays[name], specs[name], name not in defer_range)


def check_range(name: str, a, spec: Spec) -> None:
    """The value range check that check_types(defer_range=...) left out for `name`."""
    if spec.lo is not None and a.size:
        lo, hi = minmax(a)
        if lo < spec.lo or hi > spec.hi:
            raise Reject("opening_range", f"{name}: a value outside [{spec.lo}, {spec.hi}]")


def _check(name: str, a, spec: Spec, ranged: bool = True) -> None:
    if not isinstance(a, np.ndarray) or a.dtype.str != spec.dtype or a.dtype.byteorder == ">":
        got = getattr(a, "dtype", type(a).__name__)
        raise Reject("opening_type", f"{name}: dtype {got}, the key implies {spec.dtype}")
    if a.shape != spec.shape and (a.ndim != len(spec.shape) or any(  # equal: no wildcard to read
            w is not None and g != w for g, w in zip(a.shape, spec.shape))):
        raise Reject("opening_type", f"{name}: shape {a.shape}, the key implies "
                                     f"{tuple('n' if w is None else w for w in spec.shape)}")
    if spec.max_rows and a.shape[0] > spec.max_rows:
        raise Reject("opening_type", f"{name}: {a.shape[0]} proof hashes, at most "
                                     f"{spec.max_rows} can be needed")
    if spec.values is not None and a.tolist() != list(spec.values):
        raise Reject("opening_mismatch", f"{name}: not the challenged positions or token ids")
    if ranged:
        check_range(name, a, spec)
    if spec.finite and not np.all(np.isfinite(a)):
        raise Reject("opening_range", f"{name}: a non-finite value")
    if (spec.normal or spec.max_value is not None) and a.size:
        # two passes, no temporaries: min and max carry a NaN through, and every element lies
        # in [TINY, inf) exactly when the least is >= TINY and the greatest < inf
        lo, hi = float(a.min()), float(a.max())
        if spec.normal and not (lo >= F32_TINY and hi < np.inf):
            raise Reject("opening_range",
                         f"{name}: a scale that is not a finite positive normal fp32")
        if spec.max_value is not None and hi > spec.max_value:
            raise Reject("opening_range", f"{name}: a scale above fp32 max / qmax (no row "
                                          f"quantizes to it)")


__all__ = ["check_range", "check_types"]
