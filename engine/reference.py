"""fp32 reference forward of a Llama/Qwen2/Qwen3/Mistral/Mixtral decoder in plain torch.

This is NOT the exact path. It exists to prove that checkpoint loading and the architecture are
right: on tiny random checkpoints it matches transformers (eager attention, fp32) to 1e-4. To get
there it copies HF's dtype choices: weights and activations fp32; RMSNorm as
``w * (x * rsqrt(mean(x^2) + eps))``; RoPE angles ``position * inv_freq`` computed in fp32 from an
fp32 ``inv_freq`` (HF builds inv_freq in fp32 steps; ours is the float64 table of ``rope_freqs``
rounded once to fp32, a few ulps apart) with ``rotate_half`` pairing (i, i + d/2); scores
``(q @ k^T) * d^-0.5``; softmax in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from commitllm.verifier.checkpoint import expected_shapes, expert_names, load_checkpoint
from commitllm.verifier.config import ModelConfig

from .rope_freqs import inv_freq

TokenIds = torch.Tensor | Sequence[int] | Sequence[Sequence[int]]


@dataclass(frozen=True)
class KVCache:
    """Keys (after RoPE) and values of every layer for the positions seen so far."""

    keys: tuple[torch.Tensor, ...]  # one per layer, [B, kv_heads, S, d]
    values: tuple[torch.Tensor, ...]  # one per layer, [B, kv_heads, S, d]

    @property
    def length(self) -> int:
        """S, the number of positions already in the cache."""
        return self.keys[0].shape[2]


class ReferenceModel:
    """A Llama/Qwen2 decoder holding fp32 torch copies of the checkpoint tensors (HF names)."""

    def __init__(self, cfg: ModelConfig, tensors: dict[str, np.ndarray]) -> None:
        self.cfg = cfg
        self.weights = _to_torch(cfg, tensors)  # HF name -> fp32 tensor
        self.inv_freq = torch.from_numpy(inv_freq(cfg).astype(np.float32))  # [d/2]
        self.scaling = cfg.head_dim**-0.5  # python float, as HF's ``self.scaling``

    @classmethod
    def from_checkpoint(cls, folder: str | Path) -> "ReferenceModel":
        """Load an HF folder (config.json + safetensors)."""
        return cls(*load_checkpoint(folder))

    # ---- public entry points --------------------------------------------------------------

    @torch.inference_mode()
    def forward(self, token_ids: TokenIds) -> torch.Tensor:
        """Logits of every position of full, equal-length sequences. fp32 [B, T, V]."""
        logits, _ = self._run(self._batch(token_ids), None)
        return logits

    @torch.inference_mode()
    def prefill(self, token_ids: TokenIds) -> tuple[torch.Tensor, KVCache]:
        """Run the prompts; return the last position's logits [B, V] and the cache."""
        logits, cache = self._run(self._batch(token_ids), None)
        return logits[:, -1], cache

    @torch.inference_mode()
    def decode_step(self, tokens: torch.Tensor | Sequence[int] | int,
                    cache: KVCache) -> tuple[torch.Tensor, KVCache]:
        """Feed one token per sequence at position cache.length; logits [B, V] and the new cache."""
        ids = self._batch(torch.as_tensor(tokens, dtype=torch.long).reshape(-1, 1))  # [B, 1]
        if ids.shape[0] != cache.keys[0].shape[0]:
            raise ValueError(f"decode_step got {ids.shape[0]} tokens for a cache of batch "
                             f"{cache.keys[0].shape[0]}")
        logits, cache = self._run(ids, cache)
        return logits[:, -1], cache

    @torch.inference_mode()
    def generate_greedy(self, prompt_ids: Sequence[int], max_new_tokens: int,
                        eos_ids: Sequence[int] = ()) -> list[int]:
        """Greedy continuation of one prompt: argmax (ties -> lowest id), stops after an eos id.

        Returns only the new tokens; a final eos token is included.
        """
        out: list[int] = []
        if max_new_tokens <= 0:
            return out
        logits, cache = self.prefill([list(prompt_ids)])
        while True:
            # torch.argmax returns the first maximal index, i.e. the lowest id on a tie
            token = int(torch.argmax(logits[0]))
            out.append(token)
            if token in eos_ids or len(out) == max_new_tokens:
                return out
            logits, cache = self.decode_step([token], cache)

    # ---- the forward pass -----------------------------------------------------------------

    def _run(self, ids: torch.Tensor, cache: KVCache | None) -> tuple[torch.Tensor, KVCache]:
        """ids [B, T] at positions start..start+T-1 -> logits [B, T, V] and the extended cache."""
        start = 0 if cache is None else cache.length
        cos, sin = self._rope(start, ids.shape[1])  # [T, d] each
        x = self.weights["model.embed_tokens.weight"][ids]  # [B, T, H]
        keys, values = [], []
        for i in range(self.cfg.num_layers):
            past = None if cache is None else (cache.keys[i], cache.values[i])
            x, k, v = self._layer(i, x, cos, sin, past)
            keys.append(k)
            values.append(v)
        x = _rms_norm(x, self.weights["model.norm.weight"], self.cfg.rms_norm_eps)
        logits = F.linear(x, self._lm_head())  # [B, T, V]
        return logits, KVCache(tuple(keys), tuple(values))

    def _layer(self, i: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               past: tuple[torch.Tensor, torch.Tensor] | None):
        """One decoder block. x [B, T, H] -> (x [B, T, H], all keys, all values [B, kvh, S, d])."""
        p = f"model.layers.{i}."
        eps = self.cfg.rms_norm_eps
        h = _rms_norm(x, self.weights[p + "input_layernorm.weight"], eps)
        q, k, v = self._qkv(p, h, cos, sin)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)  # [B, kvh, S, d]
            v = torch.cat([past[1], v], dim=2)
        a = self._attention(q, k, v)  # [B, T, nh*d]
        x = x + F.linear(a, self.weights[p + "self_attn.o_proj.weight"])
        h = _rms_norm(x, self.weights[p + "post_attention_layernorm.weight"], eps)
        return x + self._mlp(i, h), k, v

    def _qkv(self, p: str, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Projections, head split and RoPE. h [B, T, H] -> q [B, nh, T, d], k, v [B, kvh, T, d]."""
        b, t, _ = h.shape
        heads = {"q": self.cfg.num_heads, "k": self.cfg.num_kv_heads, "v": self.cfg.num_kv_heads}
        out = []
        for name, n in heads.items():
            w = self.weights[f"{p}self_attn.{name}_proj.weight"]
            bias = self.weights.get(f"{p}self_attn.{name}_proj.bias")
            y = F.linear(h, w, bias).view(b, t, n, self.cfg.head_dim)
            norm = self.weights.get(f"{p}self_attn.{name}_norm.weight")  # Qwen3: per head
            if norm is not None:
                y = _rms_norm(y, norm, self.cfg.rms_norm_eps)
            out.append(y.transpose(1, 2))
        q, k, v = out
        return _apply_rope(q, cos, sin), _apply_rope(k, cos, sin), v

    def _attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal GQA (under a sliding window, a query at p sees keys j > p - window only).
        q [B, nh, T, d], k, v [B, kvh, S, d] (queries are the last T of S)."""
        b, _, t, _ = q.shape
        s = k.shape[2]
        k = k.repeat_interleave(self.cfg.group_size, dim=1)  # [B, nh, S, d]
        v = v.repeat_interleave(self.cfg.group_size, dim=1)
        scores = torch.matmul(q, k.transpose(2, 3)) * self.scaling  # [B, nh, T, S]
        query_pos = torch.arange(s - t, s)[:, None]  # [T, 1]
        future = torch.arange(s)[None, :] > query_pos  # [T, S]
        if self.cfg.sliding_window is not None:
            future |= torch.arange(s)[None, :] <= query_pos - self.cfg.sliding_window
        scores = scores.masked_fill(future, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
        out = torch.matmul(probs, v)  # [B, nh, T, d]
        return out.transpose(1, 2).reshape(b, t, -1)

    def _mlp(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """SwiGLU: down(silu(gate(h)) * up(h)). [B, T, H] -> [B, T, H]; Mixtral: the router's
        softmax over every expert, the top k renormalized, each token through its k experts."""
        if self.cfg.moe:
            return self._experts(i, h)
        p = f"model.layers.{i}."
        gate = F.linear(h, self.weights[p + "mlp.gate_proj.weight"])  # [B, T, F]
        up = F.linear(h, self.weights[p + "mlp.up_proj.weight"])
        return F.linear(F.silu(gate) * up, self.weights[p + "mlp.down_proj.weight"])

    def _experts(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        w, (router, names) = self.weights, expert_names(self.cfg, layer)
        x = h.reshape(-1, h.shape[-1])
        probs = torch.softmax(F.linear(x, w[router]), dim=-1, dtype=torch.float32)
        top, idx = torch.topk(probs, self.cfg.experts_per_token, dim=-1)
        top = top / top.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(x)
        for e in range(self.cfg.num_experts):
            rows, slot = torch.where(idx == e)
            if len(rows) == 0:
                continue
            gate, up, down = names[e]
            y = F.silu(F.linear(x[rows], w[gate])) * F.linear(x[rows], w[up])
            out.index_add_(0, rows, F.linear(y, w[down]) * top[rows, slot, None])
        return out.reshape(h.shape)

    def _rope(self, start: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, d] for positions start..start+T-1, fp32 as in HF's rotary embedding."""
        pos = torch.arange(start, start + t, dtype=torch.float32)  # [T]
        freqs = pos[:, None] * self.inv_freq[None, :]  # [T, d/2]
        emb = torch.cat([freqs, freqs], dim=-1)  # [T, d]
        return emb.cos(), emb.sin()

    def _lm_head(self) -> torch.Tensor:
        """[V, H]: the embedding matrix when tied."""
        name = "model.embed_tokens.weight" if self.cfg.tie_word_embeddings else "lm_head.weight"
        return self.weights[name]

    def _batch(self, token_ids: TokenIds) -> torch.Tensor:
        """Token ids as a checked LongTensor [B, T]; a flat list or 1-D tensor is one sequence."""
        if not isinstance(token_ids, (torch.Tensor, np.ndarray)) and _ragged(token_ids):
            lengths = sorted({len(s) for s in token_ids})
            raise ValueError(f"sequences must have equal lengths, got lengths {lengths}")
        ids = torch.as_tensor(token_ids, dtype=torch.long)
        if ids.dim() == 1:
            ids = ids[None, :]
        if ids.dim() != 2 or ids.numel() == 0:
            raise ValueError(f"token ids must be a non-empty [B, T] batch, got shape "
                             f"{tuple(ids.shape)}")
        bad = (ids < 0) | (ids >= self.cfg.vocab_size)
        if bad.any():
            raise ValueError(f"token id {int(ids[bad][0])} is outside the vocabulary "
                             f"[0, {self.cfg.vocab_size})")
        return ids


def _rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """HF RMSNorm in fp32: w * (x * rsqrt(mean(x^2) + eps)). [..., H] -> [..., H]."""
    variance = x.pow(2).mean(-1, keepdim=True)
    return w * (x * torch.rsqrt(variance + eps))


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, rotate_half pairing i with i + d/2. x [B, n, T, d]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def _ragged(token_ids: Sequence) -> bool:
    """A list of sequences whose lengths differ."""
    if not token_ids or not isinstance(token_ids[0], (list, tuple, np.ndarray, torch.Tensor)):
        return False
    return len({len(s) for s in token_ids}) > 1


def _to_torch(cfg: ModelConfig, tensors: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Check every expected tensor is present with its shape; wrap as fp32 torch tensors."""
    out = {}
    for name, shape in expected_shapes(cfg).items():
        if name not in tensors:
            raise ValueError(f"missing tensor {name!r}")
        a = np.ascontiguousarray(tensors[name], dtype=np.float32)
        if a.shape != shape:
            raise ValueError(f"tensor {name!r} has shape {a.shape}, expected {shape}")
        # from_numpy shares memory (no copy of a multi-GB model); it needs a writable array
        out[name] = torch.from_numpy(a if a.flags.writeable else a.copy())
    return out
