"""Tiny random HF checkpoints for tests (see tests/conftest.py for the fixtures and the kinds).

A module of its own, not conftest.py: test files import it by a name no other folder shadows.
"""

from __future__ import annotations

import json
from pathlib import Path

_COMMON = dict(num_hidden_layers=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
               hidden_act="silu")

TINY_KINDS: dict[str, dict] = {
    "llama": dict(family="llama", hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=96, vocab_size=128, rope_theta=10000.0, rms_norm_eps=1e-5,
                  tie_word_embeddings=False),
    "llama_tied_scaled": dict(
        family="llama", hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
        intermediate_size=96, vocab_size=128, rope_theta=500000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        # wavelengths 6.3 / 18.7 / 55.8 / ...: below 32/4, between, above 32/1
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=32)),
    "qwen2": dict(family="qwen2", hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=96, vocab_size=128, rope_theta=1000000.0, rms_norm_eps=1e-6,
                  tie_word_embeddings=False),
    "qwen3": dict(family="qwen3", hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=24, intermediate_size=96, vocab_size=128, rope_theta=1000000.0,
                  rms_norm_eps=1e-6, tie_word_embeddings=True),
    # a window of 5 keys: every test sequence longer than 5 tokens exercises it
    "mistral": dict(family="mistral", hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=96, vocab_size=128, rope_theta=1000000.0, rms_norm_eps=1e-5,
                    tie_word_embeddings=False, sliding_window=5),
    # 4 experts, 2 per token, and a window of 6 keys (Mixtral is Mistral's attention)
    "mixtral": dict(family="mixtral", hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=48, vocab_size=128, rope_theta=1000000.0, rms_norm_eps=1e-5,
                    tie_word_embeddings=False, sliding_window=6, num_local_experts=4,
                    num_experts_per_tok=2),
    # Qwen3's per-head q/k norm (head_dim 24 != 64 / 4) and 4 experts of width 48, 2 per token
    "qwen3_moe": dict(family="qwen3_moe", hidden_size=64, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=24, intermediate_size=96,
                      moe_intermediate_size=48, vocab_size=128, rope_theta=1000000.0,
                      rms_norm_eps=1e-6, tie_word_embeddings=False, num_experts=4,
                      num_experts_per_tok=2, norm_topk_prob=True),
    "odd": dict(family="llama", hidden_size=40, num_attention_heads=5, num_key_value_heads=1,
                intermediate_size=72, vocab_size=101, rope_theta=10000.0, rms_norm_eps=1e-6,
                tie_word_embeddings=False),
}
_SEEDS = {"llama": 1, "llama_tied_scaled": 2, "qwen2": 3, "odd": 4, "qwen3": 5, "mistral": 6,
          "mixtral": 7, "qwen3_moe": 8}
LINEAR_STD = 0.2  # std of every linear weight, bias and embedding row
NORM_NOISE = 0.1  # norm weights are 1 + NORM_NOISE * N(0, 1)


def make_tiny_checkpoint(folder: Path, kind: str, rope_format: str = "hub",
                         overrides: dict | None = None) -> Path:
    """Build the tiny random model ``kind`` (a key of TINY_KINDS) and save it as an HF folder.

    overrides: config fields replacing the kind's (e.g. head counts that divide by 2 and 3).
    rope_format: "hub" writes top-level rope_theta/rope_scaling (as real checkpoints do);
    "transformers5" keeps the ``rope_parameters`` object transformers 5 writes.
    """
    import torch  # lazy: verifier-only test runs need no torch

    if kind not in TINY_KINDS:
        raise ValueError(f"unknown tiny checkpoint kind {kind!r}; known: {sorted(TINY_KINDS)}")
    if rope_format not in ("hub", "transformers5"):
        raise ValueError(f"rope_format must be 'hub' or 'transformers5', got {rope_format!r}")
    torch.manual_seed(_SEEDS[kind])
    model = _build_model(kind, overrides)
    _randomize(model, torch.Generator().manual_seed(_SEEDS[kind]))
    folder = Path(folder)
    model.save_pretrained(folder)
    if rope_format == "hub":
        _write_hub_rope_keys(folder / "config.json")
    return folder


def _build_model(kind: str, overrides: dict | None = None):
    import torch
    from transformers import (AutoModelForCausalLM, LlamaConfig, MistralConfig, MixtralConfig,
                              Qwen2Config, Qwen3Config, Qwen3MoeConfig)

    spec = dict(TINY_KINDS[kind]) | (overrides or {})
    config_cls = {"llama": LlamaConfig, "qwen2": Qwen2Config,
                  "qwen3": Qwen3Config, "mistral": MistralConfig,
                  "mixtral": MixtralConfig, "qwen3_moe": Qwen3MoeConfig}[spec.pop("family")]
    config = config_cls(**(_COMMON | spec))
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                            attn_implementation="eager")


def _randomize(model, gen) -> None:
    """Redraw every parameter: norms 1 + 0.1 N(0,1), everything else N(0, 0.2) (biases too)."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():  # a tied LM head is listed once
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + NORM_NOISE * noise)
            else:
                p.copy_(LINEAR_STD * noise)


def _write_hub_rope_keys(path: Path) -> None:
    """Rewrite transformers 5's ``rope_parameters`` as top-level rope_theta / rope_scaling."""
    raw = json.loads(path.read_text())
    rope = dict(raw.pop("rope_parameters"))
    raw["rope_theta"] = rope.pop("rope_theta")
    if rope.get("rope_type", "default") != "default":
        raw["rope_scaling"] = rope
    path.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")




CHAR_CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
                      "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def write_char_tokenizer(folder: Path, vocab_size: int = 128) -> Path:
    """A character tokenizer (one ASCII character per id; 0 <unk>, 1 <s>, 2 </s>) with a chat
    template, written next to a tiny checkpoint so it can be served as text."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    specials = {0: "<unk>", 1: "<s>", 2: "</s>"}
    vocab = {specials.get(i, chr(i)): i for i in range(vocab_size)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.add_special_tokens([AddedToken(specials[i], special=True) for i in (0, 1, 2)])
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    folder = Path(folder)
    tok.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
              "chat_template": CHAR_CHAT_TEMPLATE}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    return folder


def make_tiny_chat_model(folder: Path, kind: str = "llama") -> Path:
    """A tiny checkpoint with a character tokenizer and a chat template (servable, keyable)."""
    return write_char_tokenizer(make_tiny_checkpoint(folder, kind),
                                TINY_KINDS[kind]["vocab_size"])
