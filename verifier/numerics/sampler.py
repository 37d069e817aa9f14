"""The canonical decode policy: greedy argmax, or seeded sampling on integer softmax weights."""

from __future__ import annotations

import math
from dataclasses import dataclass

import blake3
import numpy as np

from .exp2 import LOGIT_FRAC_BITS, table_weights

F32 = np.float32
LOG2E = F32(1.4426950408889634)
TOP_P_BITS = 24  # top-p is compared as the integer rint(p * 2^24)
SAMPLE_DOMAIN = b"commitllm/sample/v2\x00"  # v2: the client's nonce enters every draw
NONCE_DOMAIN = b"commitllm/nonce/v1\x00"
F32_TINY = float(np.finfo(np.float32).tiny)  # the smallest positive normal fp32
F32_MAX = float(np.finfo(np.float32).max)


@dataclass(frozen=True)
class SamplingParams:
    """Decode policy. temperature == 0 means greedy; then top_k/top_p/seed are unused."""

    temperature: float = 0.0  # > 0 samples
    top_k: int = 0  # 0 keeps every token
    top_p: float = 1.0  # in (0, 1]
    seed: int = 0  # unsigned 64-bit
    nonce: str = ""  # the client's nonce (the receipt's): every draw depends on it

    def __post_init__(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not (
                t == 0 or (math.isfinite(t) and F32_TINY <= t <= F32_MAX)):
            raise ValueError(f"temperature must be 0 or a positive normal fp32 value, got {t}")
        if not isinstance(self.nonce, str):
            raise ValueError("nonce must be a string")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k}")
        if isinstance(self.top_p, bool) or not (0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not (
                0 <= self.seed < 2**64):
            raise ValueError(f"seed must be in [0, 2^64), got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def manifest(self) -> dict:
        return {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p}


def greedy(logits: np.ndarray) -> int:
    """argmax of fp32 logits [V], ties to the lowest id."""
    if not np.all(np.isfinite(logits)):
        raise FloatingPointError("non-finite logit")
    return int(np.argmax(logits))


def sampling_weights(logits: np.ndarray, temperature: float) -> np.ndarray:
    """w[v] int64: u = (l / f32(T)) * f32(log2 e), L = rint(u * 256), w = table(max L - L)."""
    u = (logits / F32(temperature)).astype(F32) * LOG2E
    fixed = np.clip(np.rint(u * F32(1 << LOGIT_FRAC_BITS)), -2**30, 2**30).astype(np.int64)
    return table_weights(np.max(fixed) - fixed)


def nonce_digest(nonce: str) -> bytes:
    """H(nonce) = blake3(nonce domain || UTF-8 of the nonce), 32 bytes."""
    return blake3.blake3(NONCE_DOMAIN + nonce.encode("utf-8")).digest()


def draw(seed: int, position: int, nonce: str = "") -> int:
    """64 uniform bits from blake3(domain || seed || H(nonce) || position), little-endian.
    The nonce is the client's: a provider that tries seeds cannot steer a draw it cannot
    predict before the client's request arrives, and a sample drawn for one client's nonce does
    not replay under another's."""
    msg = (SAMPLE_DOMAIN + seed.to_bytes(8, "little") + nonce_digest(nonce)
           + position.to_bytes(8, "little"))
    return int.from_bytes(blake3.blake3(msg).digest()[:8], "little")


def candidates(w: np.ndarray, top_k: int, top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """Token ids kept by top-k then top-p, in order (weight desc, id asc), and their weights.

    top-p keeps the shortest prefix whose weight sum S satisfies S * 2^24 >= rint(p * 2^24) * Z,
    Z the weight of the top-k set (exact integers).
    """
    order = np.argsort(-w, kind="stable")  # stable: equal weights stay in id order
    if top_k:
        order = order[:top_k]
    ws = w[order]
    if top_p < 1:
        p_fixed = int(np.rint(np.float64(top_p) * 2**TOP_P_BITS))
        cum = np.cumsum(ws)
        need = np.int64(p_fixed) * cum[-1]
        n = int(np.argmax((cum << TOP_P_BITS) >= need)) + 1
        order, ws = order[:n], ws[:n]
    return order, ws


def sample(logits: np.ndarray, params: SamplingParams, position: int) -> int:
    """The token at sequence index `position` under `params` (greedy when temperature is 0)."""
    if params.greedy:
        return greedy(logits)
    if not np.all(np.isfinite(logits)):
        raise FloatingPointError("non-finite logit")
    ids, ws = candidates(sampling_weights(logits, params.temperature), params.top_k, params.top_p)
    cum = np.cumsum(ws)
    r = (draw(params.seed, position, params.nonce) * int(cum[-1])) >> 64  # uniform in [0, sum),
    # bias < 2^-30
    return int(ids[int(np.searchsorted(cum, r, side="right"))])
