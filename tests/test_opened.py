"""opened.check_types' scale checks (K/V scales: finite positive normal fp32, at most fp32 max /
qmax) decide exactly as the elementwise formulas they replaced: np.all(isfinite(a) & (a >= TINY))
and max(a) > limit, on arrays with every kind of special value."""

from __future__ import annotations

import numpy as np
import pytest

from commitllm.verifier.opened import F32_TINY, check_types
from commitllm.verifier.opening import Spec
from commitllm.verifier.replay import Reject

LIMIT = float(np.finfo(np.float32).max) / 32767
SPECIALS = np.array([np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0, F32_TINY, F32_TINY / 2,
                     np.nextafter(F32_TINY, np.float32(0)), -1.0, 1.0, LIMIT,
                     np.nextafter(np.float32(LIMIT), np.float32(np.inf)),
                     np.finfo(np.float32).max], np.float32)


def _old(a: np.ndarray, spec: Spec) -> str | None:
    if spec.finite and not np.all(np.isfinite(a)):
        return "finite"
    if spec.normal and not np.all(np.isfinite(a) & (a >= F32_TINY)):
        return "normal"
    if spec.max_value is not None and a.size and float(a.max()) > spec.max_value:
        return "max"
    return None


def _new(a: np.ndarray, spec: Spec) -> str | None:
    try:
        check_types({"s": a}, {"s": spec})
    except Reject as e:
        assert e.code == "opening_range"
        return ("finite" if "non-finite" in e.detail else
                "normal" if "normal" in e.detail else "max")
    return None


def _cases(seed: int, n: int = 400):
    rng = np.random.default_rng(seed)
    yield np.zeros(0, np.float32)
    for v in SPECIALS:
        yield np.full(5, v, np.float32)
        yield np.array([1.0, v, 2.0], np.float32)
    for _ in range(n):
        size = int(rng.integers(1, 40))
        a = rng.uniform(1e-3, 10.0, size).astype(np.float32)
        k = int(rng.integers(0, 4))
        if k:
            a[rng.integers(0, size, k)] = rng.choice(SPECIALS, k)
        yield a


@pytest.mark.parametrize("spec", [
    Spec("<f4", (None,), normal=True, max_value=LIMIT), Spec("<f4", (None,), normal=True),
    Spec("<f4", (None,), max_value=LIMIT), Spec("<f4", (None,), finite=True, normal=True)],
    ids=["normal+max", "normal", "max", "finite+normal"])
def test_scale_checks_decide_as_the_elementwise_formulas(spec):
    seen = set()
    for i, a in enumerate(_cases(7)):
        want, got = _old(a, spec), _new(a, spec)
        assert got == want, (i, a, want, got)
        seen.add(want)
    assert None in seen and len(seen) >= 2  # both verdicts met
