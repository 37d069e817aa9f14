"""Digests of the numerics constants and of quantized weights (torch-free)."""

from __future__ import annotations

import blake3
import numpy as np

from .numerics import SPEC_VERSION, PROFILES
from .numerics import logprobs as lp
from .numerics import moe
from .numerics.attention import COEF_BITS, LOGIT_CLAMP
from .numerics.exp2 import (EXP2_DEGREE, EXP_TABLE_BITS, LOGIT_FRAC_BITS, NEG_LOG2E, SILU_CLAMP,
                            exp2_coefficients, softmax_table)
from .numerics.norm import NORM_FRAC_BITS
from .numerics.weights import QuantizedModel

TENSOR_DOMAIN = b"commitllm/tensor/v1\x00"


def array_digest(a: np.ndarray) -> str:
    """blake3 of a little-endian array with its dtype and shape."""
    a = np.ascontiguousarray(a)
    head = f"{a.dtype.str}|{','.join(map(str, a.shape))}".encode()
    h = blake3.blake3(TENSOR_DOMAIN)
    h.update(len(head).to_bytes(4, "little") + head)
    h.update(a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes())
    return h.hexdigest()


def numerics_constants() -> dict:
    """Every constant of the spec, with digests of its tables."""
    return {
        "spec_version": SPEC_VERSION,
        "profiles": {k: p.manifest() for k, p in PROFILES.items()},
        "norm_frac_bits": NORM_FRAC_BITS,
        "logit_frac_bits": LOGIT_FRAC_BITS,
        "logit_clamp": LOGIT_CLAMP,
        "exp_table_bits": EXP_TABLE_BITS,
        "softmax_table_blake3": array_digest(softmax_table()),
        "value_coef_bits": COEF_BITS,
        "exp2_degree": EXP2_DEGREE,
        "exp2_coefficients_f32_hex": [float(c).hex() for c in exp2_coefficients()],
        "silu_clamp": SILU_CLAMP,
        "neg_log2e_f32_hex": float(NEG_LOG2E).hex(),
        "moe": {"route_scale_f32_hex": float(moe.ROUTE_SCALE).hex(), "select": moe.SELECT_RULE,
                "combine": moe.COMBINE_RULE},
        "logprobs": {"frac_bits": lp.FRAC_BITS, "split": lp.SPLIT, "weight_bits": lp.WEIGHT_BITS,
                     "log_frac_bits": lp.LOG_FRAC_BITS, "max_distance": lp.MAX_DISTANCE,
                     "log2e_f64_hex": lp.LOG2E.hex(), "ln2_f64_hex": lp.LN2.hex(),
                     "tables_blake3": [array_digest(t) for t in lp.tables()]},
    }


def weights_digest(qm: QuantizedModel) -> str:
    """blake3 over the name-sorted digests of every quantized tensor."""
    h = blake3.blake3(b"commitllm/weights/v1\x00")
    for name, arr in sorted(qm.to_tensors().items()):
        h.update(name.encode() + b"\0" + bytes.fromhex(array_digest(arr)))
    return h.hexdigest()
