"""RoPE inverse frequencies in float64 numpy, with Llama 3.1 ("llama3") scaling.

Pure numpy and float64 on purpose: the exact engine builds its cos/sin tables from these numbers on
the host, and the verifier rebuilds the same tables without torch. The formulas follow
``transformers.modeling_rope_utils._compute_llama3_parameters`` step by step (HF evaluates them in
float32; here they are float64, so the two agree to a few float32 ulps, not bit for bit).
"""

from __future__ import annotations

import math

import numpy as np

from commitllm.verifier.config import ModelConfig, RopeScaling


def inv_freq(cfg: ModelConfig) -> np.ndarray:
    """theta^(-2i/d) for i < d/2, llama3-scaled when the config asks for it. float64 [d/2]."""
    base = default_inv_freq(cfg.rope_theta, cfg.head_dim)
    if cfg.rope_scaling is None:
        return base
    return llama3_scale(base, cfg.rope_scaling)


def default_inv_freq(theta: float, head_dim: int) -> np.ndarray:
    """Unscaled RoPE frequencies 1 / theta^(2i/d). float64 [d/2]."""
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"head_dim must be positive and even, got {head_dim}")
    exponents = np.arange(0, head_dim, 2, dtype=np.float64) / head_dim  # [d/2]
    return 1.0 / (float(theta) ** exponents)


def llama3_scale(freqs: np.ndarray, rs: RopeScaling) -> np.ndarray:
    """Llama 3.1 scaling: keep short wavelengths, divide long ones by factor, blend in between.

    With L = original_max_position_embeddings and wavelength w = 2*pi / f:
      w < L / high_freq_factor  -> f
      w > L / low_freq_factor   -> f / factor
      otherwise                 -> (1 - s) * f / factor + s * f,  s = (L / w - low) / (high - low)
    """
    if not rs.high_freq_factor > rs.low_freq_factor:
        raise ValueError(f"llama3 rope scaling needs high_freq_factor > low_freq_factor, got "
                         f"{rs.high_freq_factor} <= {rs.low_freq_factor}")
    old_len = float(rs.original_max_position_embeddings)
    low_wavelen = old_len / rs.low_freq_factor
    high_wavelen = old_len / rs.high_freq_factor
    wavelen = 2 * math.pi / freqs  # [d/2]
    scaled = np.where(wavelen > low_wavelen, freqs / rs.factor, freqs)
    smooth = (old_len / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(is_medium, smoothed, scaled)
