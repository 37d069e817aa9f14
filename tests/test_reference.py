"""The fp32 reference forward against transformers on the tiny random checkpoints."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from commitllm.engine.reference import ReferenceModel  # noqa: E402
from commitllm.engine.rope_freqs import inv_freq  # noqa: E402
from commitllm.verifier.config import ModelConfig  # noqa: E402

from tinymodels import make_tiny_checkpoint  # noqa: E402

SEQ_LEN = 40
BATCH = 2
NEW_TOKENS = 20
# fp32 against fp32 with different summation orders (HF adds a finite mask instead of -inf, builds
# inv_freq in fp32 steps, ...): observed max 7.7e-6 on logits up to |7| (fp32 ulp there: 4.8e-7).
HF_TOL = 1e-4
# Same code, but the BLAS reduces a [1, H] row in another order than a [T, H] block, and the large
# tiny-model weights (std 0.2) amplify those last-bit differences over the layers: observed max
# 1.3e-5; transformers' own cached-vs-uncached logits differ by 1.1e-5 on the same checkpoints.
INCREMENTAL_TOL = 5e-5


def _hf_model(folder):
    """transformers' own model for the folder, fp32, eager attention, never downloading."""
    return transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager", local_files_only=True).eval()


def _random_ids(vocab: int, seed: int, batch: int = BATCH, length: int = SEQ_LEN):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=gen)  # [B, T]


def assert_close_logits(got: torch.Tensor, want: torch.Tensor, tol: float, what: str) -> None:
    """Fail with the worst (batch, position, token) and the worst difference of every position.
    Only for the fp32 reference (verifier/reference.py) against transformers, two float programs
    that sum in different orders: neither is a committed value (the exact engine, the torch
    backend and the verifier are compared with ==, bit for bit, elsewhere)."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    diff = (got - want).abs()  # [B, T, V]
    worst = float(diff.max())
    if worst <= tol:
        return
    b, t, v = np.unravel_index(int(diff.argmax()), diff.shape)
    per_pos = diff.amax(dim=(0, 2))  # [T]
    bad = [(int(i), f"{float(per_pos[i]):.2e}") for i in torch.nonzero(per_pos > tol).flatten()]
    raise AssertionError(f"{what}: max |diff| {worst:.3e} > {tol} at batch {b}, position {t}, "
                         f"token {v} (got {float(got[b, t, v]):.6f}, want "
                         f"{float(want[b, t, v]):.6f}); positions over tolerance: {bad}")


def test_reference_matches_transformers(tiny_checkpoint):
    ref = ReferenceModel.from_checkpoint(tiny_checkpoint)
    ids = _random_ids(ref.cfg.vocab_size, seed=10)
    with torch.inference_mode():
        want = _hf_model(tiny_checkpoint)(ids).logits  # [B, T, V]
    got = ref.forward(ids)
    assert got.dtype == torch.float32
    assert float(got.std()) > 0.5, "logits are nearly flat: the tiny weights are too small"
    assert_close_logits(got, want, HF_TOL, f"reference vs transformers ({tiny_checkpoint.name})")


def test_config_matches_transformers(tiny_checkpoint):
    """Our reading of config.json agrees with transformers' on what the forward depends on."""
    cfg = ModelConfig.from_hf(tiny_checkpoint)
    hf = transformers.AutoConfig.from_pretrained(tiny_checkpoint, local_files_only=True)
    assert cfg.rope_theta == hf.rope_parameters["rope_theta"]
    assert cfg.head_dim == getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    assert cfg.tie_word_embeddings == hf.tie_word_embeddings
    assert (cfg.rope_scaling is None) == (hf.rope_parameters["rope_type"] == "default")


def test_incremental_matches_full(tiny_checkpoint):
    ref = ReferenceModel.from_checkpoint(tiny_checkpoint)
    ids = _random_ids(ref.cfg.vocab_size, seed=11)
    full = ref.forward(ids)  # [B, T, V]
    prompt = 7
    logits, cache = ref.prefill(ids[:, :prompt])
    steps = [logits]
    for t in range(prompt, SEQ_LEN):
        logits, cache = ref.decode_step(ids[:, t], cache)
        steps.append(logits)
    assert cache.length == SEQ_LEN
    got = torch.stack(steps, dim=1)  # [B, T - prompt + 1, V]
    assert_close_logits(got, full[:, prompt - 1:], INCREMENTAL_TOL, "prefill + decode vs full")


def _hf_greedy(folder, prompt: list[int], eos_id: int | None) -> list[int]:
    hf = _hf_model(folder)
    hf.generation_config.eos_token_id = eos_id  # None: never stop early
    hf.generation_config.pad_token_id = 0  # silences the "setting pad_token_id" warning
    with torch.inference_mode():
        out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=NEW_TOKENS)
    return out[0, len(prompt):].tolist()


def test_greedy_matches_transformers(tiny_checkpoint):
    ref = ReferenceModel.from_checkpoint(tiny_checkpoint)
    prompt = _random_ids(ref.cfg.vocab_size, seed=12, batch=1, length=9)[0].tolist()
    got = ref.generate_greedy(prompt, NEW_TOKENS, eos_ids=())
    assert len(got) == NEW_TOKENS
    assert got == _hf_greedy(tiny_checkpoint, prompt, eos_id=None)


def test_greedy_stops_on_eos_and_keeps_it(tiny_llama):
    ref = ReferenceModel.from_checkpoint(tiny_llama)
    prompt = _random_ids(ref.cfg.vocab_size, seed=13, batch=1, length=5)[0].tolist()
    free = ref.generate_greedy(prompt, NEW_TOKENS)
    eos = free[len(free) // 2]
    got = ref.generate_greedy(prompt, NEW_TOKENS, eos_ids=(ref.cfg.vocab_size + 5, eos))
    assert got == free[: free.index(eos) + 1]
    assert got == _hf_greedy(tiny_llama, prompt, eos_id=eos)
    assert ref.generate_greedy(prompt, 0) == []


def test_greedy_ties_pick_lowest_id(tiny_llama):
    """Zero every LM-head row: all logits tie, so greedy must pick token 0 every time."""
    ref = ReferenceModel.from_checkpoint(tiny_llama)
    ref.weights["lm_head.weight"].zero_()
    assert ref.generate_greedy([3, 4, 5], 4) == [0, 0, 0, 0]


@pytest.mark.parametrize("bad, message", [
    ([[1, 2, 3], [4, 5]], "equal lengths"),
    ([], "non-empty"),
    ([1, 2, 500], "outside the vocabulary"),
    ([1, -1], "outside the vocabulary"),
])
def test_bad_token_ids_are_refused(tiny_odd, bad, message):
    ref = ReferenceModel.from_checkpoint(tiny_odd)
    with pytest.raises(ValueError, match=message):
        ref.forward(bad)


def test_missing_tensor_is_refused(tiny_odd):
    from commitllm.verifier.checkpoint import load_checkpoint

    cfg, tensors = load_checkpoint(tiny_odd)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj.weight"):
        ReferenceModel(cfg, tensors)


def test_llama3_inv_freq_matches_transformers(tiny_llama_tied_scaled):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = ModelConfig.from_hf(tiny_llama_tied_scaled)
    hf_cfg = transformers.AutoConfig.from_pretrained(tiny_llama_tied_scaled, local_files_only=True)
    want, scaling = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")  # fp32 [d/2]
    ours = inv_freq(cfg)  # float64 [d/2]
    assert ours.dtype == np.float64 and scaling == 1.0
    # a tolerance on the reference only: HF's fp32 inv_freq is not what we commit (the RoPE
    # table's digest and bits are ours, mpmath rounded once, tested with == elsewhere).
    # HF rounds to fp32 after each of pow, divide and the blend; we round once at the end. HF's
    # chain is off by up to 4 fp32 ulps on this table (measured), i.e. up to 8 * 2^-23 relative.
    np.testing.assert_allclose(ours, want.double().numpy(), rtol=8 * 2.0**-23, atol=0)
    _assert_all_llama3_bands_occur(cfg)


def _assert_all_llama3_bands_occur(cfg: ModelConfig) -> None:
    """The fixture's scaling must keep, blend and divide at least one frequency each."""
    unscaled = ModelConfig.from_dict({**cfg.to_hf_dict(), "rope_scaling": None})
    wavelen = 2 * np.pi / inv_freq(unscaled)  # [d/2]
    rs = cfg.rope_scaling
    short = rs.original_max_position_embeddings / rs.high_freq_factor
    long = rs.original_max_position_embeddings / rs.low_freq_factor
    assert (wavelen < short).any() and (wavelen > long).any()
    assert ((wavelen >= short) & (wavelen <= long)).any()


def test_default_inv_freq_matches_transformers(tiny_qwen2):
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    hf_cfg = transformers.AutoConfig.from_pretrained(tiny_qwen2, local_files_only=True)
    want, _ = Qwen2RotaryEmbedding.compute_default_rope_parameters(hf_cfg)
    ours = inv_freq(ModelConfig.from_hf(tiny_qwen2))
    # HF: fp32 pow then fp32 divide; ours: float64. Same few-ulp bound as for llama3 (the
    # reference comparison only, as above).
    np.testing.assert_allclose(ours, want.double().numpy(), rtol=8 * 2.0**-23, atol=0)


def test_transformers5_rope_layout_is_read(tmp_path):
    """A config.json written by transformers 5 keeps rope_theta/scaling inside rope_parameters."""
    folder = make_tiny_checkpoint(tmp_path, "llama_tied_scaled", rope_format="transformers5")
    cfg = ModelConfig.from_hf(folder)
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling is not None and cfg.rope_scaling.factor == 8.0


def _qwen3_raw(**extra) -> dict:
    raw = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 128,
           "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 24,
           "rms_norm_eps": 1e-6, "rope_theta": 1e6, "max_position_embeddings": 256,
           "sliding_window": None, "use_sliding_window": False, "attention_bias": False,
           "layer_types": ["full_attention"] * 2}
    return raw | extra


def test_qwen3_config_fields():
    from commitllm.verifier.config import ModelConfig

    cfg = ModelConfig.from_dict(_qwen3_raw())
    assert cfg.family == "qwen3" and cfg.qk_norm and not cfg.attention_bias
    assert cfg.head_dim == 24 and cfg.q_size == 96  # head_dim from the file, not H / heads
    assert ModelConfig.from_dict(cfg.to_hf_dict()) == cfg


@pytest.mark.parametrize("extra, field", [
    ({"attention_bias": True}, "attention_bias"),
    ({"use_sliding_window": True, "sliding_window": 4096}, "sliding_window"),
    ({"layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
])
def test_qwen3_unsupported_fields_refused(extra, field):
    from commitllm.verifier.config import ConfigError, ModelConfig

    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_dict(_qwen3_raw(**extra))


def test_qwen3_missing_head_norm_refused(tiny_qwen3):
    """A Qwen3 checkpoint without its q/k norm weights is refused by name."""
    from commitllm.verifier.checkpoint import CheckpointError, expected_shapes, load_checkpoint

    cfg, _ = load_checkpoint(tiny_qwen3)
    assert "model.layers.0.self_attn.q_norm.weight" in expected_shapes(cfg)
    folder = tiny_qwen3.parent / "qwen3_no_norm"
    import shutil

    from safetensors.numpy import load_file, save_file

    shutil.copytree(tiny_qwen3, folder, dirs_exist_ok=True)
    f = next(folder.glob("*.safetensors"))
    t = load_file(str(f))
    t.pop("model.layers.1.self_attn.k_norm.weight")
    save_file(t, str(f))
    with pytest.raises(CheckpointError, match="k_norm"):
        load_checkpoint(folder)


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}


@pytest.mark.parametrize("theta, scaling", [
    (5e-324, None), (1e-310, None), (float("nan"), None), (float("inf"), None), (0.0, None),
    (500000.0, LLAMA3 | {"factor": float("nan")}), (500000.0, LLAMA3 | {"factor": 1e-320}),
    (500000.0, LLAMA3 | {"factor": 0.5}), (500000.0, LLAMA3 | {"high_freq_factor": 1.0}),
    (500000.0, LLAMA3 | {"low_freq_factor": 0.0}), (500000.0, LLAMA3 | {"factor": "x"}),
    (500000.0, LLAMA3 | {"high_freq_factor": float("inf")}),
    (500000.0, LLAMA3 | {"original_max_position_embeddings": 0}),
])
def test_rope_settings_that_give_nan_tables_are_refused(theta, scaling):
    """A subnormal, zero or non-finite rope_theta, and llama3 scaling with a NaN, zero,
    subnormal or compressing factor, equal low and high factors (a division by zero), a
    non-numeric or infinite field: each would build NaN RoPE tables (or nothing llama3 means),
    so the config is refused with one line instead (an independent attacker's finding)."""
    from commitllm.verifier.config import ConfigError, ModelConfig

    raw = _qwen3_raw() | {"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                          "rope_theta": theta, "rope_scaling": scaling}
    with pytest.raises(ConfigError, match="rope"):
        ModelConfig.from_dict(raw)


def test_llama3_rope_settings_round_trip():
    from commitllm.verifier.config import ModelConfig

    raw = _qwen3_raw() | {"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                          "rope_theta": 500000.0, "rope_scaling": LLAMA3}
    cfg = ModelConfig.from_dict(raw)
    assert cfg.rope_scaling.factor == 8.0 and ModelConfig.from_dict(cfg.to_hf_dict()) == cfg
