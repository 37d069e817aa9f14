"""GGUF import: the real SmolLM2 Q4_1 file against transformers' GGUF loader, synthetic GGUFs
written from the tiny HF checkpoints (a small llama.cpp-style writer below), corrupt files, and
the atomic HF-folder conversion.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import gguf
import numpy as np
import pytest
from commitllm.engine import gguf_import
from commitllm.engine.gguf_import import GGUFError, convert_gguf, read_gguf, unpermute_rows
from commitllm.engine.loader import ModelNotFound, default_gguf
from commitllm.verifier.tokenizer import Tokenizer
from commitllm.verifier.checkpoint import expert_names, load_checkpoint
from commitllm.verifier.config import ModelConfig
from gguf import GGMLQuantizationType as Q


def smollm2_gguf() -> Path:
    try:
        return default_gguf()
    except ModelNotFound as e:
        pytest.skip(str(e))


def assert_same(name: str, got: np.ndarray, want: np.ndarray) -> None:
    """Bitwise equality; on failure say where and by how much."""
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    assert got.dtype == want.dtype, f"{name}: dtype {got.dtype} != {want.dtype}"
    if not np.array_equal(got, want):
        diff = np.abs(got.astype(np.float64) - want)
        at = np.unravel_index(np.argmax(diff), diff.shape)
        n = int((got != want).sum())
        raise AssertionError(f"{name}: {n} of {got.size} differ; worst at {at}: "
                             f"{got[at]!r} vs {want[at]!r} (|diff| {diff[at]:.3g})")


# --- a minimal llama.cpp-style writer (HF folder -> GGUF) -------------------------------------

def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf ``LlamaModel.permute``, written as an explicit row index map:
    HF row h*d + half*(d/2) + i goes to GGUF row h*d + 2*i + half."""
    d = w.shape[0] // n_heads
    out = np.empty_like(w)
    for h in range(n_heads):
        for half in range(2):
            for i in range(d // 2):
                out[h * d + 2 * i + half] = w[h * d + half * (d // 2) + i]
    return out


def llama3_rope_freqs_fp32(cfg: ModelConfig) -> np.ndarray:
    """llama.cpp's rope_freqs.weight for llama3 scaling, in fp32 as its converter computes it."""
    s, dim = cfg.rope_scaling, cfg.head_dim
    freqs = 1.0 / (np.float32(cfg.rope_theta) ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    out = []
    for f in freqs:
        wavelen = np.float32(2 * math.pi) / f
        orig = s.original_max_position_embeddings
        if wavelen < orig / s.high_freq_factor:
            out.append(1.0)
        elif wavelen > orig / s.low_freq_factor:
            out.append(s.factor)
        else:
            smooth = (orig / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
            out.append(1 / ((1 - smooth) / s.factor + smooth))
    return np.array(out, dtype=np.float32)


_TO_GGUF = {v: k for k, v in gguf_import._BLOCK_NAMES.items()}
_TOP = {v: k for k, v in gguf_import._TOP_NAMES.items()}


def gguf_tensor_name(hf: str) -> str:
    if hf in _TOP:
        return _TOP[hf]
    _, _, layer, *mid, leaf = hf.split(".")
    return f"blk.{layer}.{_TO_GGUF['.'.join(mid)]}.{leaf}"


def write_gguf(path: Path, cfg: ModelConfig, tensors: dict[str, np.ndarray],
               qtype: Q = Q.F32, extra_meta: dict | None = None, skip: tuple = (),
               arch: str | None = None) -> Path:
    """Write ``tensors`` (HF names, fp32) as llama.cpp would; weights in ``qtype``. Mixtral is
    arch llama with its expert counts and each layer's experts stacked per matrix."""
    arch = arch or {"mixtral": "llama", "qwen3_moe": "qwen3moe"}.get(cfg.family, cfg.family)
    w = gguf.GGUFWriter(str(path), arch)
    meta = {f"{arch}.context_length": cfg.max_position_embeddings,
            f"{arch}.embedding_length": cfg.hidden_size, f"{arch}.block_count": cfg.num_layers,
            f"{arch}.feed_forward_length": cfg.intermediate_size,
            f"{arch}.attention.head_count": cfg.num_heads,
            f"{arch}.attention.head_count_kv": cfg.num_kv_heads,
            f"{arch}.attention.key_length": cfg.head_dim,
            f"{arch}.attention.value_length": cfg.head_dim,
            f"{arch}.rope.dimension_count": cfg.head_dim,
            f"{arch}.rope.freq_base": float(cfg.rope_theta),
            f"{arch}.attention.layer_norm_rms_epsilon": float(cfg.rms_norm_eps),
            "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
            "tokenizer.ggml.tokens": [f"t{i}" for i in range(cfg.vocab_size)],
            "tokenizer.ggml.token_type": [1] * cfg.vocab_size, "tokenizer.ggml.merges": [],
            "tokenizer.ggml.bos_token_id": cfg.bos_token_id,
            "tokenizer.ggml.eos_token_id": cfg.eos_token_ids[0],
            "tokenizer.chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}
    if cfg.rope_scaling is not None:
        orig = cfg.rope_scaling.original_max_position_embeddings
        meta[f"{arch}.rope.scaling.original_context_length"] = orig
    if cfg.moe:
        meta |= {f"{arch}.expert_count": cfg.num_experts,
                 f"{arch}.expert_used_count": cfg.experts_per_token,
                 f"{arch}.expert_feed_forward_length": cfg.intermediate_size}
        tensors = stack_experts(tensors, cfg)
    meta.update(extra_meta or {})
    for key, value in meta.items():
        if key not in skip and value is not None:
            _add_kv(w, key, value)
    for name, t in tensors.items():
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            t = llama_cpp_permute(t, cfg.num_heads if "q_proj" in name else cfg.num_kv_heads)
        gname = name if name.startswith("blk.") else gguf_tensor_name(name)
        _add_tensor(w, gname, t, qtype if t.ndim >= 2 else Q.F32)
    if cfg.rope_scaling is not None:
        w.add_tensor("rope_freqs.weight", llama3_rope_freqs_fp32(cfg))
    _finish(w)
    return path


def stack_experts(tensors: dict[str, np.ndarray], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """llama.cpp's converter for Mixtral and Qwen3-MoE: the experts' gate / up / down of each
    layer as one stacked [E, rows, cols] tensor, blk.L.ffn_gate_exps / ffn_up_exps /
    ffn_down_exps, and the router as blk.L.ffn_gate_inp."""
    out = {n: t for n, t in tensors.items() if ".experts." not in n}
    for layer in range(cfg.num_layers):
        router, experts = expert_names(cfg, layer)
        if router in out:
            out[f"blk.{layer}.ffn_gate_inp.weight"] = out.pop(router)
        for j, gname in enumerate(("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")):
            parts = [tensors.get(names[j]) for names in experts]
            if all(p is not None for p in parts):  # (a test may leave some out)
                out[f"blk.{layer}.{gname}.weight"] = np.stack(parts)
    return out


def _finish(w: gguf.GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _add_kv(w: gguf.GGUFWriter, key: str, value) -> None:
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    else:
        w.add_array(key, value)


def _add_tensor(w: gguf.GGUFWriter, name: str, t: np.ndarray, qtype: Q) -> None:
    if qtype == Q.F32:
        w.add_tensor(name, np.ascontiguousarray(t, dtype=np.float32))
    else:
        w.add_tensor(name, gguf.quants.quantize(t, qtype), raw_dtype=qtype)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tiny_llama) -> tuple[Path, ModelConfig, dict]:
    """The tiny Llama as an F32 GGUF, with its HF config and tensors."""
    cfg, tensors = load_checkpoint(tiny_llama)
    path = write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", cfg, tensors)
    return path, cfg, tensors


# --- synthetic GGUFs --------------------------------------------------------------------------

@pytest.mark.parametrize("n_heads,d", [(1, 2), (3, 64), (4, 24), (5, 8)])
def test_unpermute_inverts_llama_cpp_permute(n_heads, d):
    w = np.random.default_rng(0).standard_normal((n_heads * d, 7)).astype(np.float32)
    permuted = llama_cpp_permute(w, n_heads)
    assert_same("rows", unpermute_rows(permuted, n_heads), w)
    assert n_heads * d == 2 or not np.array_equal(permuted, w)  # the permutation is not a no-op


def test_hf_folder_through_gguf_round_trips(tmp_path, tiny_checkpoint):
    """HF -> (llama.cpp layout) GGUF -> read_gguf gives back the same config and tensors, for
    every tiny kind: GQA, tied + llama3 scaling + head_dim 24, qwen2 biases, odd sizes."""
    cfg, tensors = load_checkpoint(tiny_checkpoint)
    if cfg.moe:  # llama.cpp's Mixtral: arch llama, experts stacked, no window (llama has none)
        cfg = replace(cfg, sliding_window=None)
    if cfg.sliding_window is not None:  # llama.cpp has no Mistral architecture with its window
        for arch, extra in (("mistral", {}), ("llama", {"llama.attention.sliding_window": 5})):
            path = write_gguf(tmp_path / f"{arch}.gguf", cfg, tensors, arch=arch, extra_meta=extra)
            with pytest.raises(GGUFError, match="architecture 'mistral'|sliding-window"):
                read_gguf(path)
        return
    got_cfg, got, spec = read_gguf(write_gguf(tmp_path / "m.gguf", cfg, tensors))
    assert got_cfg == cfg
    assert sorted(got) == sorted(tensors)
    for name in tensors:
        assert_same(name, got[name], tensors[name])
    assert spec.eos_ids == cfg.eos_token_ids and spec.bos_id == cfg.bos_token_id


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.F16, Q.BF16])
def test_quantized_weights_dequantize_as_gguf_does(tmp_path, tiny_llama, qtype):
    """Each 2-D weight reads back as gguf's dequantize(quantize(w)), un-permuted where needed."""
    cfg, tensors = load_checkpoint(tiny_llama)
    _, got, _ = read_gguf(write_gguf(tmp_path / "q.gguf", cfg, tensors, qtype=qtype))
    for name, w in tensors.items():
        want = w
        if w.ndim == 2:
            heads = {"q_proj": cfg.num_heads, "k_proj": cfg.num_kv_heads}.get(name.split(".")[-2])
            stored = llama_cpp_permute(w, heads) if heads else w
            want = gguf.quants.dequantize(gguf.quants.quantize(stored, qtype), qtype)
            want = (unpermute_rows(want, heads) if heads else want).astype(np.float32)
        assert_same(name, got[name], want)


def _random_blocks(qtype: Q, n_blocks: int, rng) -> np.ndarray:
    """Random block bytes whose fp16 scale fields hold small finite values."""
    nbytes = gguf.GGML_QUANT_SIZES[qtype][1]
    raw = rng.integers(0, 256, size=(n_blocks, nbytes), dtype=np.uint8)
    scale_at = {Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q8_0: [0], Q.Q2_K: [80, 82], Q.Q3_K: [108],
                Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208]}[qtype]
    for at in scale_at:
        scales = rng.uniform(-0.05, 0.05, n_blocks).astype(np.float16)
        raw[:, at:at + 2] = scales.view(np.uint8).reshape(n_blocks, 2)
    return raw


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K,
                                   Q.Q6_K])
def test_dequantize_matches_transformers_torch_kernels(tmp_path, qtype):
    """Two independent implementations (gguf-py numpy, transformers torch) agree bit for bit on
    random blocks, K-quants included (no quantizer for those exists in gguf-py)."""
    torch = pytest.importorskip("torch")
    from transformers.integrations.gguf import dequant

    block = gguf.GGML_QUANT_SIZES[qtype][0]
    rows, cols = 3, 2 * 256  # two K-blocks, or sixteen 32-blocks, per row
    raw = _random_blocks(qtype, rows * cols // block, np.random.default_rng(int(qtype)))
    w = gguf.GGUFWriter(str(tmp_path / "b.gguf"), "llama")
    w.add_tensor("x", raw.reshape(rows, -1), raw_dtype=qtype)
    _finish(w)
    (t,) = gguf.GGUFReader(tmp_path / "b.gguf").tensors
    ours = gguf_import.dequantize(t, tmp_path / "b.gguf")
    theirs = dequant.dequantize(torch.from_numpy(raw.reshape(-1)), int(qtype)).numpy()
    assert_same(qtype.name, ours, theirs.reshape(rows, cols))


def test_llama3_rope_scaling_is_recovered_from_rope_freqs(tmp_path, tiny_llama_tied_scaled):
    cfg, tensors = load_checkpoint(tiny_llama_tied_scaled)
    got, _, _ = read_gguf(write_gguf(tmp_path / "s.gguf", cfg, tensors))
    assert got.rope_scaling == cfg.rope_scaling
    # llama.cpp does not write the original context length; 8192 is then assumed and does not fit
    path = write_gguf(tmp_path / "t.gguf", cfg, tensors,
                      skip=("llama.rope.scaling.original_context_length",))
    with pytest.raises(GGUFError, match="rope_freqs.weight"):
        read_gguf(path)


@pytest.mark.parametrize("meta,field", [
    ({"general.architecture": "gemma"}, "general.architecture"),
    ({"llama.expert_count": 8}, "llama.expert_used_count"),
    ({"llama.expert_count": 8, "llama.expert_used_count": 2, "llama.expert_gating_func": 2},
     "llama.expert_gating_func"),
    ({"llama.expert_count": 8, "llama.expert_used_count": 2, "llama.expert_shared_count": 1},
     "llama.expert_shared_count"),
    ({"llama.rope.scaling.type": "yarn"}, "llama.rope.scaling.type"),
    ({"llama.attention.sliding_window": 4096}, "llama.attention.sliding_window"),
    ({"llama.rope.dimension_count": 8}, "llama.rope.dimension_count"),
    ({"llama.attention.head_count_kv": [2, 4]}, "llama.attention.head_count_kv"),
    ({"llama.embedding_length": None}, "llama.embedding_length"),
    ({"tokenizer.ggml.model": None}, "tokenizer.ggml.model"),
])
def test_unsupported_or_missing_metadata_is_refused_by_name(tmp_path, tiny_llama, meta, field):
    cfg, tensors = load_checkpoint(tiny_llama)
    skip = tuple(k for k, v in meta.items() if v is None)
    path = tmp_path / "bad.gguf"
    if meta.get("general.architecture"):  # GGUFWriter writes the arch itself
        write_gguf(path, cfg, tensors, arch=meta["general.architecture"])
    else:
        write_gguf(path, cfg, tensors, extra_meta={k: v for k, v in meta.items() if v}, skip=skip)
    with pytest.raises(GGUFError, match=field.replace(".", r"\.")) as e:
        read_gguf(path)
    assert str(path) in str(e.value)


def test_unknown_tensor_and_llama_bias_are_refused(tmp_path, tiny_llama):
    cfg, tensors = load_checkpoint(tiny_llama)
    extra = {**tensors, "model.layers.0.self_attn.q_proj.bias": np.zeros(cfg.q_size, np.float32)}
    with pytest.raises(GGUFError, match="q_proj.bias"):
        read_gguf(write_gguf(tmp_path / "b.gguf", cfg, extra))
    missing = {k: v for k, v in tensors.items() if "layers.1.mlp.up_proj" not in k}
    with pytest.raises(GGUFError, match="missing 1 tensor.*layers.1.mlp.up_proj"):
        read_gguf(write_gguf(tmp_path / "m.gguf", cfg, missing))
    wrong = {**tensors, "model.norm.weight": np.ones(cfg.hidden_size + 1, np.float32)}
    with pytest.raises(GGUFError, match="output_norm.weight.*shape"):
        read_gguf(write_gguf(tmp_path / "w.gguf", cfg, wrong))


def test_mixtral_stacked_experts(tmp_path, tiny_mixtral, tiny_llama):
    """llama.cpp's Mixtral layout: a quantized stacked expert tensor reads back as each expert's
    dequantize(quantize(w)); a stack of the wrong shape, a missing stack, a stack in a dense
    model and expert counts on another architecture are refused by name."""
    cfg, tensors = load_checkpoint(tiny_mixtral)
    cfg = replace(cfg, sliding_window=None)
    got_cfg, got, _ = read_gguf(write_gguf(tmp_path / "h.gguf", cfg, tensors, qtype=Q.F16))
    assert got_cfg == cfg and sorted(got) == sorted(tensors)
    for name, w in tensors.items():
        if ".experts." in name:
            assert_same(name, got[name], w.astype(np.float16).astype(np.float32))
    down1 = "model.layers.1.block_sparse_moe.experts.{}.w2.weight"
    short = {n: t for n, t in tensors.items() if not n.startswith(down1.split("{")[0])
             or ".w2." not in n}
    short["blk.1.ffn_down_exps.weight"] = np.stack([tensors[down1.format(e)]
                                                    for e in range(cfg.num_experts - 1)])
    with pytest.raises(GGUFError, match=r"ffn_down_exps.*shape \(3, 64, 48\), expected \(4,"):
        read_gguf(write_gguf(tmp_path / "s.gguf", cfg, short))
    gone = {n: t for n, t in tensors.items()
            if not ("layers.0.block_sparse_moe.experts" in n and ".w3." in n)}
    with pytest.raises(GGUFError, match=r"missing 4 tensor.*layers\.0\.block_sparse_moe\."
                                        r"experts\.0\.w3"):
        read_gguf(write_gguf(tmp_path / "g.gguf", cfg, gone))
    dcfg, dense = load_checkpoint(tiny_llama)
    extra = {**dense, "blk.0.ffn_gate_exps.weight": np.zeros((2, 8, dcfg.hidden_size), "f4")}
    with pytest.raises(GGUFError, match="ffn_gate_exps.*unsupported"):
        read_gguf(write_gguf(tmp_path / "d.gguf", dcfg, extra))
    qwen = write_gguf(tmp_path / "q.gguf", cfg, tensors, arch="qwen2")
    with pytest.raises(GGUFError, match="other than Mixtral.*qwen2.expert_count"):
        read_gguf(qwen)


# --- corrupt files ----------------------------------------------------------------------------

def _data_end(path: Path) -> int:
    return max(int(t.data_offset) + int(t.n_bytes) for t in gguf.GGUFReader(path).tensors)


def test_every_truncation_of_a_small_gguf_fails_clearly(tmp_path, tiny_gguf):
    path, _, _ = tiny_gguf
    data, end = path.read_bytes(), _data_end(path)
    cuts = sorted({0, 3, 4, 8, 23, 24, 100, end - 1, *range(0, end, max(1, end // 40))})
    for n in cuts:
        bad = tmp_path / f"cut_{n}.gguf"
        bad.write_bytes(data[:n])
        with pytest.raises(GGUFError) as e:
            read_gguf(bad)
        assert str(bad) in str(e.value) and "\n" not in str(e.value), n


@pytest.mark.parametrize("where", ["metadata", "last_byte"])  # the tiny sweep covers the rest
def test_truncated_real_gguf_fails_clearly(tmp_path, where):
    src = smollm2_gguf()
    size = src.stat().st_size
    n = {"metadata": 1000, "last_byte": size - 1}[where]
    bad = tmp_path / "truncated.gguf"
    with src.open("rb") as fh:
        bad.write_bytes(fh.read(n))
    with pytest.raises(GGUFError, match="truncated") as e:
        read_gguf(bad)
    assert str(bad) in str(e.value)


def test_not_gguf_missing_and_folder_fail_clearly(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"this is not a GGUF file" * 50)
    for path in (junk, tmp_path / "missing.gguf", tmp_path):
        with pytest.raises(GGUFError) as e:
            read_gguf(path)
        assert str(path) in str(e.value)


def test_inf_scale_is_refused(tmp_path, tiny_llama):
    cfg, tensors = load_checkpoint(tiny_llama)
    path = write_gguf(tmp_path / "q.gguf", cfg, tensors, qtype=Q.Q8_0)
    t = next(t for t in gguf.GGUFReader(path).tensors if t.name == "blk.0.ffn_up.weight")
    data = bytearray(path.read_bytes())
    data[int(t.data_offset):int(t.data_offset) + 2] = np.float16(np.inf).tobytes()
    path.write_bytes(bytes(data))
    with pytest.raises(GGUFError, match="blk.0.ffn_up.weight.*Inf"):
        read_gguf(path)


# --- the real SmolLM2 file against transformers -----------------------------------------------

@pytest.fixture(scope="module")
def smollm2() -> tuple[ModelConfig, dict, object]:
    return read_gguf(smollm2_gguf())


@pytest.fixture(scope="module")
def transformers_state(smollm2) -> dict[str, np.ndarray]:
    """transformers' own GGUF loader (dequantize + reverse-permute), fp32."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    path = smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                 dtype=torch.float32)
    return {k: v.numpy() for k, v in model.state_dict().items()}


def test_smollm2_config(smollm2):
    cfg, _, spec = smollm2
    assert (cfg.family, cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (
        "llama", 30, 576, 9, 3)
    assert (cfg.intermediate_size, cfg.vocab_size, cfg.head_dim) == (1536, 49152, 64)
    assert (cfg.rope_theta, cfg.rms_norm_eps, cfg.max_position_embeddings) == (1e5, 1e-5, 8192)
    assert cfg.tie_word_embeddings and cfg.rope_scaling is None and not cfg.attention_bias
    assert (cfg.bos_token_id, cfg.eos_token_ids) == (1, (2,))
    assert (spec.model, spec.pre, len(spec.tokens)) == ("gpt2", "smollm", 49152)


# 20 s of transformers' own GGUF dequantization; the end-to-end check that needs these tensors
# (tests/test_reference_smollm2.py: logits equal transformers') runs by default: -m slow.
@pytest.mark.slow
def test_smollm2_tensors_equal_transformers(smollm2, transformers_state):
    """Same Q4_1/Q8_0 data, same float formula (d * q + m in fp32): equal bit for bit, q/k
    un-permuted included. lm_head is transformers' tied alias of the embedding."""
    _, tensors, _ = smollm2
    assert set(transformers_state) - set(tensors) == {"lm_head.weight"}
    for name, w in tensors.items():
        assert_same(name, w, transformers_state[name])


# --- conversion to an HF folder ---------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_folder(tmp_path_factory, smollm2) -> Path:
    out = tmp_path_factory.mktemp("convert") / "smollm2"
    assert convert_gguf(smollm2_gguf(), out) == out
    return out


def test_converted_folder_round_trips_through_load_checkpoint(smollm2, smollm2_folder):
    cfg, tensors, spec = smollm2
    got_cfg, got = load_checkpoint(smollm2_folder)
    assert got_cfg == cfg and sorted(got) == sorted(tensors)
    for name in tensors:
        assert_same(name, got[name], tensors[name])
    tok = Tokenizer.from_folder(smollm2_folder)
    assert tok.tokenizer_hash() == Tokenizer.from_gguf(spec).tokenizer_hash()
    assert tok.chat_template == spec.chat_template and tok.eos_token_ids == (2,)
    config = json.loads((smollm2_folder / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    assert sorted(p.name for p in smollm2_folder.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json"]


def _siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir())


def test_convert_refuses_a_non_empty_folder(tmp_path, tiny_gguf):
    path, cfg, _ = tiny_gguf
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(GGUFError, match="not empty"):
        convert_gguf(path, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    convert_gguf(path, out, overwrite=True)
    assert not (out / "keep.txt").exists() and load_checkpoint(out)[0] == cfg
    assert _siblings(out) == ["out"]  # no temporary folder left behind


def test_convert_into_an_empty_folder(tmp_path, tiny_gguf):
    path, cfg, _ = tiny_gguf
    (tmp_path / "out").mkdir()
    convert_gguf(path, tmp_path / "out")
    assert load_checkpoint(tmp_path / "out")[0] == cfg


@pytest.mark.parametrize("existing", [False, True])
def test_failed_convert_leaves_nothing_half_written(tmp_path, tiny_gguf, monkeypatch, existing):
    path, _, _ = tiny_gguf
    out = tmp_path / "out"
    if existing:
        out.mkdir()
        (out / "keep.txt").write_text("mine")

    def broken_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(gguf_import, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        convert_gguf(path, out, overwrite=True)
    assert _siblings(out) == (["out"] if existing else [])
    if existing:
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
