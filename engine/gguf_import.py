"""Import a llama.cpp GGUF file: config, fp32 tensors under HF names, tokenizer; or convert it to
an HF folder (``config.json``, ``model.safetensors``, tokenizer files) that the verifier reads.

Dequantization is ``gguf.quants.dequantize`` (numpy). Two llama.cpp conventions are undone here:
GGUF lists shapes fastest-moving dimension first (the reverse of numpy), and for the ``llama`` arch
the converter permutes the rows of q and k so that each head's RoPE pairs sit next to each other
(ggml's interleaved rotation) instead of half a head apart (HF's rotate_half). Mixtral is the
``llama`` arch with ``expert_count`` / ``expert_used_count`` and each layer's experts stacked into
one [experts, rows, cols] tensor per matrix (``ffn_gate_exps``, ``ffn_up_exps``,
``ffn_down_exps``, the router ``ffn_gate_inp``); they are split back into HF's per-expert
matrices, and routing fields that would change llama.cpp's softmax top-k are refused.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q
from safetensors.numpy import save_file

from ..verifier.checkpoint import expected_shapes, expert_names
from ..verifier.config import ConfigError, ModelConfig, RopeScaling
from ..verifier.tokenizer import Tokenizer, TokenizerError, TokenizerSpec

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "qwen3moe": "Qwen3MoeForCausalLM"}
MOE_ARCHS = {"llama": "MixtralForCausalLM", "qwen3moe": "Qwen3MoeForCausalLM"}  # expert_count
SUPPORTED_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1,
                   Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)
_TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
              "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
_BLOCK_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
                "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
# llama.cpp's Mixtral (arch llama with expert_count) and Qwen3-MoE (qwen3moe): each layer's
# experts stacked into one [E, rows, cols] tensor per matrix; HF keeps one matrix per expert.
_EXPERT_SLOTS = {"ffn_gate_exps": 0, "ffn_up_exps": 1, "ffn_down_exps": 2}
# Mixture-of-experts fields whose other values would change the routing (llama.cpp defaults)
_MOE_DEFAULTS = {"expert_shared_count": 0, "expert_group_count": 0,
                 "expert_gating_func": int(gguf.ExpertGatingFuncType.SOFTMAX),
                 "expert_weights_scale": 1.0}
_ROPE_FREQS = "rope_freqs.weight"  # llama3 frequency factors, turned back into config fields
# Llama 3.x values; llama.cpp's converter reads the same defaults when the config omits them.
_LLAMA3_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192}


class GGUFError(ValueError):
    """A GGUF file that is missing, truncated, corrupt, or describes an unsupported model."""


def hf_name(gguf_name: str) -> str | None:
    """The HF tensor name of a GGUF tensor name, or None if it has none."""
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if m is None or m[2] not in _BLOCK_NAMES:
        return None
    return f"model.layers.{m[1]}.{_BLOCK_NAMES[m[2]]}.{m[3]}"


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (its ``permute``).

    Per head of d rows, HF orders rows as (half, i) with half in {0, 1}, i < d/2; the GGUF holds
    them as (i, half). So GGUF row h*d + 2*i + half is HF row h*d + half*(d/2) + i.
    """
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise GGUFError(f"cannot un-permute {rows} rows into {n_heads} heads of even size")
    d = rows // n_heads
    out = w.reshape(n_heads, d // 2, 2, *w.shape[1:]).swapaxes(1, 2)  # (heads, 2, d/2, ...)
    return np.ascontiguousarray(out.reshape(w.shape))


def _open(path: Path) -> gguf.GGUFReader:
    if not path.is_file():
        raise GGUFError(f"{path}: {'not a file' if path.exists() else 'no such file'}")
    try:
        reader = gguf.GGUFReader(path)
    except (OSError, ValueError, IndexError, KeyError, TypeError, UnicodeDecodeError,
            OverflowError) as e:
        raise GGUFError(f"{path}: not a readable GGUF file, truncated or corrupt "
                        f"({type(e).__name__}: {e})") from None
    for t in reader.tensors:  # the reader maps lazily: check every tensor lies inside the file
        if t.data.nbytes != t.n_bytes:
            raise GGUFError(f"{path}: tensor {t.name!r} is truncated")
    return reader


def _metadata(reader: gguf.GGUFReader, path: Path) -> dict:
    try:
        return {name: field.contents() for name, field in reader.fields.items()}
    except (ValueError, IndexError, UnicodeDecodeError) as e:
        raise GGUFError(f"{path}: corrupt metadata ({e})") from None


def _req(meta: dict, key: str):
    if meta.get(key) is None:
        raise GGUFError(f"missing metadata field {key!r}")
    return meta[key]


def _f32(x) -> float:
    """GGUF stores floats as fp32; use the shortest decimal that rounds to it (1e-05, not
    9.999999747378752e-06), which is what the original config.json said."""
    return float(str(np.float32(x)))


def _refuse_unsupported(meta: dict, arch: str) -> None:
    k = lambda s: f"{arch}.{s}"
    if meta.get(k("expert_count")):
        if arch not in MOE_ARCHS:
            raise GGUFError(f"mixture-of-experts models other than Mixtral (arch llama) and "
                            f"Qwen3-MoE (qwen3moe) are not supported (field {k('expert_count')!r})")
        for field, default in _MOE_DEFAULTS.items():
            if meta.get(k(field), default) != default:
                raise GGUFError(f"mixture-of-experts routing {field} = {meta[k(field)]!r} is not "
                                f"Mixtral's ({default!r}); unsupported (field {k(field)!r})")
    if meta.get(k("attention.sliding_window")):
        raise GGUFError("sliding-window attention is not supported "
                        f"(field {k('attention.sliding_window')!r})")
    if meta.get(k("rope.scaling.type"), "none") != "none":
        raise GGUFError(f"rope scaling {meta[k('rope.scaling.type')]!r} is not supported "
                        f"(field {k('rope.scaling.type')!r})")


def _head_dim(meta: dict, arch: str, hidden: int, heads: int) -> int:
    key_len = meta.get(f"{arch}.attention.key_length")
    head_dim = int(key_len) if key_len is not None else hidden // heads
    for field in ("attention.value_length", "rope.dimension_count"):
        value = meta.get(f"{arch}.{field}")
        if value is not None and int(value) != head_dim:
            raise GGUFError(f"field '{arch}.{field}' = {value} differs from head_dim {head_dim}; "
                            "only full-width rotary heads with equal k/v widths are supported")
    return head_dim


def _kv_heads(meta: dict, arch: str, heads: int) -> int:
    kv = meta.get(f"{arch}.attention.head_count_kv", heads)
    if isinstance(kv, list):  # per-layer counts: fine only when they are all the same
        if len(set(kv)) != 1:
            raise GGUFError(f"per-layer kv head counts are not supported "
                            f"(field '{arch}.attention.head_count_kv')")
        kv = kv[0]
    return int(kv)


def hf_config_dict(meta: dict, tensor_names: set[str]) -> dict:
    """The HF ``config.json`` fields the GGUF metadata describes (llama.*, qwen2.* or qwen3.*
    keys)."""
    arch = _req(meta, "general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFError(f"unsupported architecture {arch!r} (field 'general.architecture'); "
                        f"supported: {sorted(ARCHITECTURES)}")
    _refuse_unsupported(meta, arch)
    k = lambda s: _req(meta, f"{arch}.{s}")
    hidden, heads = int(k("embedding_length")), int(k("attention.head_count"))
    vocab = meta.get(f"{arch}.vocab_size") or len(_req(meta, "tokenizer.ggml.tokens"))
    eos = [meta.get(f"tokenizer.ggml.{t}_token_id") for t in ("eos", "eot", "eom")]
    moe = {}
    if arch == "qwen3moe":  # llama.cpp renormalizes the top-k weights, every layer sparse
        moe = {"num_experts": int(k("expert_count")),
               "num_experts_per_tok": int(k("expert_used_count")),
               "moe_intermediate_size": int(k("expert_feed_forward_length")),
               "norm_topk_prob": True}
    elif meta.get(f"{arch}.expert_count"):  # Mixtral: llama with experts, no sliding window
        moe = {"architectures": ["MixtralForCausalLM"], "sliding_window": None,
               "num_local_experts": int(k("expert_count")),
               "num_experts_per_tok": int(k("expert_used_count"))}
    return {
        "architectures": [ARCHITECTURES[arch]],
        "vocab_size": int(vocab), "hidden_size": hidden,
        "intermediate_size": int(k("feed_forward_length")),
        "num_hidden_layers": int(k("block_count")), "num_attention_heads": heads,
        "num_key_value_heads": _kv_heads(meta, arch, heads),
        "head_dim": _head_dim(meta, arch, hidden, heads),
        "rms_norm_eps": _f32(k("attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(meta.get(f"{arch}.rope.freq_base", 10000.0)),  # llama.cpp's default
        "max_position_embeddings": int(k("context_length")),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": list(dict.fromkeys(int(e) for e in eos if e is not None)),
    } | moe


def llama3_factors(theta: float, head_dim: int, s: RopeScaling) -> np.ndarray:
    """llama.cpp's ``rope_freqs`` for llama3 scaling: the divisor of each RoPE frequency."""
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / freqs
    orig = s.original_max_position_embeddings
    smooth = (orig / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    mid = 1 / ((1 - smooth) / s.factor + smooth)
    out = np.where(wavelen > orig / s.low_freq_factor, s.factor, mid)
    return np.where(wavelen < orig / s.high_freq_factor, 1.0, out)


def _rope_scaling(meta: dict, raw: dict, factors: np.ndarray) -> dict | None:
    """Recover llama3 ``rope_scaling`` from a ``rope_freqs.weight`` tensor, or refuse."""
    if np.all(factors == 1.0):
        return None
    arch = meta["general.architecture"]
    orig = meta.get(f"{arch}.rope.scaling.original_context_length")
    fields = {**_LLAMA3_DEFAULTS, "factor": float(factors.max())}
    if orig is not None:
        fields["original_max_position_embeddings"] = int(orig)
    want = llama3_factors(raw["rope_theta"], raw["head_dim"], RopeScaling(**fields))
    # llama.cpp computes the factors in fp32 torch, we in fp64: 1e-5 covers that rounding and
    # still tells apart any other factor/low/high/original combination.
    if factors.shape != want.shape or not np.allclose(factors, want, rtol=1e-5, atol=0):
        raise GGUFError(f"tensor {_ROPE_FREQS!r} is not llama3 rope scaling with {fields}; "
                        "unsupported rope scaling")
    return {"rope_type": "llama3", **fields}


def dequantize(t, path: Path) -> np.ndarray:
    """One GGUF tensor as C-contiguous fp32 in numpy (HF) dimension order."""
    if t.tensor_type not in SUPPORTED_TYPES:
        raise GGUFError(f"{path}: tensor {t.name!r} has unsupported type {t.tensor_type.name} "
                        f"(supported: {', '.join(q.name for q in SUPPORTED_TYPES)})")
    w = gguf.quants.dequantize(t.data, t.tensor_type)
    if t.tensor_type == Q.F32:
        w = np.array(w)  # a view of the file's memory map otherwise
    w = w.astype(np.float32, copy=False).reshape(tuple(int(n) for n in reversed(t.shape)))
    if not np.isfinite(w).all():
        raise GGUFError(f"{path}: tensor {t.name!r} holds NaN or Inf (corrupt scales?)")
    return w


def _load_tensors(reader: gguf.GGUFReader, cfg: ModelConfig, path: Path) -> dict[str, np.ndarray]:
    """Every tensor under its HF name, shape-checked, q/k un-permuted for llama."""
    shapes = expected_shapes(cfg)
    out: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        if t.name == _ROPE_FREQS:
            continue  # already folded into cfg.rope_scaling
        stacked = _expert_names(t.name, cfg)
        if stacked is not None:
            _put_experts(out, t, stacked, shapes, path)
            continue
        name = hf_name(t.name)
        if name is None or name not in shapes:
            what = f"{name} is not part of this {cfg.family} model" if name else "no HF name"
            raise GGUFError(f"{path}: unexpected tensor {t.name!r} ({what}; unsupported)")
        shape = tuple(int(n) for n in reversed(t.shape))
        if shape != shapes[name]:
            raise GGUFError(f"{path}: tensor {t.name!r} has shape {shape}, expected "
                            f"{shapes[name]} for {name!r}")
        w = dequantize(t, path)
        if cfg.family in ("llama", "mixtral") and name.endswith(("q_proj.weight",
                                                                 "k_proj.weight")):
            w = unpermute_rows(w, cfg.num_heads if "q_proj" in name else cfg.num_kv_heads)
        out[name] = w
    missing = [n for n in shapes if n not in out]
    if missing:
        raise GGUFError(f"{path}: missing {len(missing)} tensor(s), first {missing[0]!r}")
    return out


def _expert_names(gguf_name: str, cfg: ModelConfig) -> list[str] | None:
    """The HF names of a stacked expert tensor's matrices, expert by expert, or the router's
    (one name); None: not a tensor of the experts."""
    m = re.fullmatch(r"blk\.(\d+)\.(ffn_(?:gate|up|down)_exps|ffn_gate_inp)\.weight", gguf_name)
    if m is None or not cfg.moe:
        return None
    router, experts = expert_names(cfg, int(m[1]))
    if m[2] == "ffn_gate_inp":
        return [router]
    return [names[_EXPERT_SLOTS[m[2]]] for names in experts]


def _put_experts(out: dict, t, names: list[str], shapes: dict, path: Path) -> None:
    """Split a stacked [E, rows, cols] expert tensor into its E matrices under their HF names
    (the router: one matrix)."""
    if names[0] not in shapes:
        raise GGUFError(f"{path}: unexpected tensor {t.name!r} (its layer is not part of this "
                        f"model; unsupported)")
    shape = tuple(int(n) for n in reversed(t.shape))
    if t.name.endswith("ffn_gate_inp.weight"):
        if shape != shapes[names[0]]:
            raise GGUFError(f"{path}: tensor {t.name!r} has shape {shape}, expected "
                            f"{shapes[names[0]]} for {names[0]!r}")
        out[names[0]] = dequantize(t, path)
        return
    want = (len(names), *shapes[names[0]])
    if shape != want:
        raise GGUFError(f"{path}: tensor {t.name!r} has shape {shape}, expected {want}")
    w = dequantize(t, path)
    for e, name in enumerate(names):
        out[name] = np.ascontiguousarray(w[e])


def _config(reader: gguf.GGUFReader, meta: dict, path: Path) -> ModelConfig:
    names = {t.name for t in reader.tensors}
    try:
        raw = hf_config_dict(meta, names)
        if _ROPE_FREQS in names:
            t = next(t for t in reader.tensors if t.name == _ROPE_FREQS)
            raw["rope_scaling"] = _rope_scaling(meta, raw, dequantize(t, path).astype(np.float64))
        return ModelConfig.from_dict(raw)
    except (GGUFError, ConfigError) as e:
        raise GGUFError(f"{path}: {e}") from None


def _spec(meta: dict, path: Path) -> TokenizerSpec:
    try:
        return TokenizerSpec.from_metadata(meta)
    except TokenizerError as e:
        raise GGUFError(f"{path}: {e}") from None


def read_gguf(path: str | Path) -> tuple[ModelConfig, dict[str, np.ndarray], TokenizerSpec]:
    """(config, fp32 tensors by HF name, tokenizer metadata) of a GGUF file."""
    path = Path(path)
    reader = _open(path)
    meta = _metadata(reader, path)
    cfg, spec = _config(reader, meta, path), _spec(meta, path)  # fail before the slow part
    return cfg, _load_tensors(reader, cfg, path), spec


def read_gguf_tokenizer(path: str | Path) -> TokenizerSpec:
    """Only the tokenizer metadata of a GGUF file (no tensor is read)."""
    path = Path(path)
    return _spec(_metadata(_open(path), path), path)


def _write_folder(folder: Path, cfg: ModelConfig, tensors: dict, tok: Tokenizer) -> None:
    (folder / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2) + "\n")
    gen = {k: v for k, v in cfg.to_hf_dict().items() if k in ("bos_token_id", "eos_token_id")}
    (folder / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    tok.save(folder)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _is_nonempty_dir(p: Path) -> bool:
    return p.is_dir() and any(p.iterdir())


def convert_gguf(gguf_path: str | Path, outdir: str | Path, overwrite: bool = False) -> Path:
    """Write an HF folder for a GGUF file, atomically: all of it appears at ``outdir`` or none."""
    gguf_path, outdir = Path(gguf_path), Path(outdir)
    if outdir.exists() and not outdir.is_dir():
        raise GGUFError(f"{outdir}: exists and is not a folder")
    if _is_nonempty_dir(outdir) and not overwrite:
        raise GGUFError(f"{outdir}: folder exists and is not empty (pass overwrite=True)")
    cfg, tensors, spec = read_gguf(gguf_path)
    try:
        tok = Tokenizer.from_gguf(spec)
    except TokenizerError as e:
        raise GGUFError(f"{gguf_path}: {e}") from None
    outdir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{outdir.name}.tmp-", dir=outdir.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it 0700; the result is an ordinary model folder
        _write_folder(tmp, cfg, tensors, tok)
        _move_into_place(tmp, outdir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return outdir


def _move_into_place(tmp: Path, outdir: Path) -> None:
    """Rename ``tmp`` to ``outdir``; an existing ``outdir`` is set aside first, restored on error."""
    if not _is_nonempty_dir(outdir):
        os.replace(tmp, outdir)  # rename(2) replaces an empty folder or creates the name
        return
    old = Path(tempfile.mkdtemp(prefix=f".{outdir.name}.old-", dir=outdir.parent))
    os.replace(outdir, old)
    try:
        os.replace(tmp, outdir)
    except BaseException:
        os.replace(old, outdir)
        raise
    shutil.rmtree(old, ignore_errors=True)
