"""Read an HF checkpoint folder (config.json + safetensors) into fp32 numpy arrays, torch-free.

The safetensors container is parsed here rather than through ``safetensors.numpy`` because numpy
has no bfloat16 and because every size is checked against the file before anything is allocated:
a truncated or corrupt file fails with one line naming the file and the tensor.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from .config import ModelConfig

_DTYPES = {"F32": (np.float32, 4), "F16": (np.float16, 2), "BF16": (np.uint16, 2),
           "F64": (np.float64, 8)}
_MAX_HEADER = 100 * 1024 * 1024  # the format's own cap on the JSON header


class CheckpointError(ValueError):
    """A checkpoint file that is missing, truncated, corrupt or does not match the config."""


def expert_names(cfg: ModelConfig, layer: int) -> tuple[str, list[tuple[str, str, str]]]:
    """HF names of layer `layer`'s router and of each expert's (gate, up, down) weights: Mixtral's
    block_sparse_moe.gate and experts.e.w1 / w3 / w2, Qwen3-MoE's mlp.gate and
    experts.e.gate_proj / up_proj / down_proj."""
    if cfg.family == "mixtral":
        m, names = f"model.layers.{layer}.block_sparse_moe.", ("w1", "w3", "w2")
    else:
        m, names = f"model.layers.{layer}.mlp.", ("gate_proj", "up_proj", "down_proj")
    return m + "gate.weight", [tuple(f"{m}experts.{e}.{n}.weight" for n in names)
                               for e in range(cfg.num_experts)]


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the model needs, by HF name, with its shape."""
    h, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h),
                                          "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, h)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes[p + "self_attn.q_proj.weight"] = (cfg.q_size, h)
        shapes[p + "self_attn.k_proj.weight"] = (cfg.kv_size, h)
        shapes[p + "self_attn.v_proj.weight"] = (cfg.kv_size, h)
        shapes[p + "self_attn.o_proj.weight"] = (h, cfg.q_size)
        if cfg.attention_bias:
            shapes[p + "self_attn.q_proj.bias"] = (cfg.q_size,)
            shapes[p + "self_attn.k_proj.bias"] = (cfg.kv_size,)
            shapes[p + "self_attn.v_proj.bias"] = (cfg.kv_size,)
        if cfg.qk_norm:
            shapes[p + "self_attn.q_norm.weight"] = (cfg.head_dim,)
            shapes[p + "self_attn.k_norm.weight"] = (cfg.head_dim,)
        if cfg.moe:  # the router, then each expert's gate, up and down
            router, experts = expert_names(cfg, i)
            shapes[router] = (cfg.num_experts, h)
            for gate, up, down in experts:
                shapes[gate], shapes[up], shapes[down] = (f, h), (f, h), (h, f)
            continue
        shapes[p + "mlp.gate_proj.weight"] = (f, h)
        shapes[p + "mlp.up_proj.weight"] = (f, h)
        shapes[p + "mlp.down_proj.weight"] = (h, f)
    return shapes


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """Return (tensor table, offset of the data section), validated against the file size."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file (no header)")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise CheckpointError(f"{path}: corrupt safetensors header (length {n})")
        try:
            table = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(table, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not an object)")
    table.pop("__metadata__", None)
    data_size = size - 8 - n
    for name, info in table.items():
        _check_entry(path, name, info, data_size)
    return table, 8 + n


def _check_entry(path: Path, name: str, info, data_size: int) -> None:
    try:
        dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
    except (TypeError, KeyError, ValueError):
        raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry") from None
    if dtype not in _DTYPES:
        raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype} "
                              f"(supported: {', '.join(_DTYPES)})")
    if not all(isinstance(d, int) and d >= 0 for d in shape):
        raise CheckpointError(f"{path}: tensor {name!r} has a malformed shape {shape}")
    nbytes = int(np.prod(shape, dtype=np.int64)) * _DTYPES[dtype][1]
    if not (0 <= start <= end <= data_size) or end - start != nbytes:
        raise CheckpointError(f"{path}: tensor {name!r} lies outside the file or has the wrong "
                              f"size (truncated file?)")


def read_tensor(path: Path, table: dict, data_start: int, name: str) -> np.ndarray:
    """One tensor as C-contiguous fp32 (BF16 and F16 widened exactly)."""
    info = table[name]
    np_dtype, _ = _DTYPES[info["dtype"]]
    start, end = info["data_offsets"]
    count = (end - start) // np.dtype(np_dtype).itemsize
    raw = np.fromfile(path, dtype=np_dtype, count=count, offset=data_start + start)
    if info["dtype"] == "BF16":
        raw = (raw.astype(np.uint32) << 16).view(np.float32)
    return np.ascontiguousarray(raw.astype(np.float32, copy=False).reshape(info["shape"]))


def checkpoint_files(folder: Path) -> dict[str, Path]:
    """Map each tensor name to the safetensors file holding it (single file or sharded index)."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: unreadable index ({e})") from None
        return {name: folder / fname for name, fname in weight_map.items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors file")
    out: dict[str, Path] = {}
    for f in files:
        for name in read_safetensors_header(f)[0]:
            out[name] = f
    return out


def locate_tensors(folder: str | Path, cfg: ModelConfig) -> dict[str, tuple[Path, dict, int]]:
    """Check that every expected tensor is present with its shape (headers only, no data read);
    returns name -> (file, header table, data offset) for read_tensor."""
    folder = Path(folder)
    where = checkpoint_files(folder)
    headers: dict[Path, tuple[dict, int]] = {}
    out: dict[str, tuple[Path, dict, int]] = {}
    for name, shape in expected_shapes(cfg).items():
        if name not in where:
            raise CheckpointError(f"{folder}: missing tensor {name!r}")
        path = where[name]
        if not path.exists():
            raise CheckpointError(f"{path}: no such file (named by the index for {name!r})")
        if path not in headers:
            headers[path] = read_safetensors_header(path)
        table, start = headers[path]
        if name not in table:
            raise CheckpointError(f"{path}: missing tensor {name!r}")
        got = tuple(table[name]["shape"])
        if got != shape:
            raise CheckpointError(f"{path}: tensor {name!r} has shape {got}, expected {shape}")
        out[name] = (path, table, start)
    return out


def read_located(located: dict[str, tuple[Path, dict, int]]) -> dict[str, np.ndarray]:
    """The fp32 data of tensors found by locate_tensors."""
    return {name: read_tensor(path, table, start, name)
            for name, (path, table, start) in located.items()}


def load_tensors(folder: str | Path, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Load every expected tensor as fp32, checking presence and shape."""
    return read_located(locate_tensors(folder, cfg))


def load_checkpoint(folder: str | Path) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """Config and fp32 tensors of an HF folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder")
    cfg = ModelConfig.from_hf(folder)
    return cfg, load_tensors(folder, cfg)
