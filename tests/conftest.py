"""Shared fixtures: tiny random HF checkpoints, built with transformers and saved as HF folders.

Each folder holds ``config.json``, ``generation_config.json`` and ``model.safetensors`` (fp32) and
no tokenizer: load it with ``verifier.checkpoint.load_checkpoint`` or, on the transformers side,
with ``AutoModelForCausalLM.from_pretrained(folder)``; feed token ids directly.

The kinds (see ``TINY_KINDS``) cover what the engine must get right:

* ``llama``              GQA 4/2 heads, untied LM head.
* ``llama_tied_scaled``  tied embeddings, llama3 rope scaling whose band edges fall inside the
                         frequency table (keep / blend / divide all occur), rope_theta 5e5, and
                         head_dim 24 != hidden / heads.
* ``qwen2``              q/k/v biases (random, non-zero), rope_theta 1e6.
* ``odd``                odd sizes: hidden 40, 5 heads over 1 K/V head, intermediate 72, vocab 101.

Weights are redrawn after HF's own init, larger than HF's defaults (linear N(0, 0.2), norms
1 + 0.1 N(0, 1)) so the logits are far from flat and argmax ties do not happen by accident.

``config.json`` is written in the Hub's layout (top-level ``rope_theta`` and ``rope_scaling``),
which is what real checkpoints carry; transformers 5 itself would write a ``rope_parameters``
object instead. ``make_tiny_checkpoint(..., rope_format="transformers5")`` keeps that newer layout.

transformers never downloads here: ``pytest_configure`` sets ``HF_HUB_OFFLINE=1`` before anything
imports it, and torch/transformers are imported lazily so torch-free verifier tests still collect.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

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
    "odd": dict(family="llama", hidden_size=40, num_attention_heads=5, num_key_value_heads=1,
                intermediate_size=72, vocab_size=101, rope_theta=10000.0, rms_norm_eps=1e-6,
                tie_word_embeddings=False),
}
_SEEDS = {"llama": 1, "llama_tied_scaled": 2, "qwen2": 3, "odd": 4}
LINEAR_STD = 0.2  # std of every linear weight, bias and embedding row
NORM_NOISE = 0.1  # norm weights are 1 + NORM_NOISE * N(0, 1)


def pytest_configure(config) -> None:
    if not os.environ.get("COMMITLLM_CACHE"):
        import tempfile

        os.environ["COMMITLLM_CACHE"] = tempfile.mkdtemp(prefix="commitllm-test-cache-")
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"


def make_tiny_checkpoint(folder: Path, kind: str, rope_format: str = "hub") -> Path:
    """Build the tiny random model ``kind`` (a key of TINY_KINDS) and save it as an HF folder.

    rope_format: "hub" writes top-level rope_theta/rope_scaling (as real checkpoints do);
    "transformers5" keeps the ``rope_parameters`` object transformers 5 writes.
    """
    import torch  # lazy: verifier-only test runs need no torch

    if kind not in TINY_KINDS:
        raise ValueError(f"unknown tiny checkpoint kind {kind!r}; known: {sorted(TINY_KINDS)}")
    if rope_format not in ("hub", "transformers5"):
        raise ValueError(f"rope_format must be 'hub' or 'transformers5', got {rope_format!r}")
    torch.manual_seed(_SEEDS[kind])
    model = _build_model(kind)
    _randomize(model, torch.Generator().manual_seed(_SEEDS[kind]))
    folder = Path(folder)
    model.save_pretrained(folder)
    if rope_format == "hub":
        _write_hub_rope_keys(folder / "config.json")
    return folder


def _build_model(kind: str):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    spec = dict(TINY_KINDS[kind])
    config_cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[spec.pop("family")]
    config = config_cls(**_COMMON, **spec)
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


def _session_checkpoint(tmp_path_factory, kind: str) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp(f"tiny_{kind}"), kind)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """Folder of the tiny Llama (GQA 4/2, untied head)."""
    return _session_checkpoint(tmp_path_factory, "llama")


@pytest.fixture(scope="session")
def tiny_llama_tied_scaled(tmp_path_factory) -> Path:
    """Folder of the tiny Llama with tied embeddings, llama3 rope scaling and head_dim 24."""
    return _session_checkpoint(tmp_path_factory, "llama_tied_scaled")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    """Folder of the tiny Qwen2 (random q/k/v biases)."""
    return _session_checkpoint(tmp_path_factory, "qwen2")


@pytest.fixture(scope="session")
def tiny_odd(tmp_path_factory) -> Path:
    """Folder of the tiny Llama with odd sizes (hidden 40, 5 heads, 1 K/V head, vocab 101)."""
    return _session_checkpoint(tmp_path_factory, "odd")


@pytest.fixture(scope="session", params=sorted(TINY_KINDS))
def tiny_checkpoint(request) -> Path:
    """Each tiny kind in turn (parametrized; the test id names the kind), sharing the folders."""
    return request.getfixturevalue(f"tiny_{request.param}")


@pytest.fixture(scope="session")
def smollm2():
    """The real default model (SmolLM2-135M-Instruct GGUF), converted once per session into the
    cache named by COMMITLLM_CACHE (a session temp dir unless the caller set one)."""
    from commitllm.engine.loader import load_model

    return load_model("default")
