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
* ``qwen3``              RMSNorm over each q and k head, head_dim 24 != hidden / heads, tied head.
* ``mistral``            a sliding attention window of 5 keys (shorter than most test sequences).
* ``mixtral``            4 experts, 2 per token, a window of 6 keys.
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

import importlib.util
import os
import sys
from importlib import metadata
from pathlib import Path

# `python -m pytest` puts the checkout root on sys.path, where kernels/ (commitllm.kernels) would
# shadow Hugging Face's `kernels` package, which transformers (>= 5) imports when installed. The
# package is imported as `commitllm.*` only, so the root is dropped before anything else loads.
_ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT]

import pytest  # noqa: E402
from tinymodels import TINY_KINDS, make_tiny_checkpoint


class _InstalledKernelsFinder:
    """transformers >= 5.25 requires and imports the Hub's top-level `kernels` package; with the
    repository root on sys.path (`python -m pytest`, the bench tests) this checkout's kernels/
    folder shadowed it and every model load failed (ImportError: CUDAProperties). The installed
    distribution wins; our kernels are only ever imported as `commitllm.kernels`.
    (bench/gpu_bootstrap.py has the same finder for the GPU bench.)"""

    def find_spec(self, name, path=None, target=None):
        if name != "kernels":
            return None
        try:
            init = Path(metadata.distribution("kernels").locate_file("kernels/__init__.py"))
        except metadata.PackageNotFoundError:
            return None
        if not init.is_file():
            return None
        return importlib.util.spec_from_file_location(
            "kernels", init, submodule_search_locations=[str(init.parent)])


def pytest_configure(config) -> None:
    if not any(isinstance(f, _InstalledKernelsFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _InstalledKernelsFinder())
    if not os.environ.get("COMMITLLM_CACHE"):
        import tempfile

        os.environ["COMMITLLM_CACHE"] = tempfile.mkdtemp(prefix="commitllm-test-cache-")
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"


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
def tiny_qwen3(tmp_path_factory) -> Path:
    """Folder of the tiny Qwen3 (RMSNorm per q/k head, head_dim 24 != H / heads, tied head)."""
    return _session_checkpoint(tmp_path_factory, "qwen3")


@pytest.fixture(scope="session")
def tiny_mistral(tmp_path_factory) -> Path:
    """Folder of the tiny Mistral (sliding window of 5 keys)."""
    return _session_checkpoint(tmp_path_factory, "mistral")


@pytest.fixture(scope="session")
def tiny_mixtral(tmp_path_factory) -> Path:
    """Folder of the tiny Mixtral (4 experts, top 2, sliding window of 6 keys)."""
    return _session_checkpoint(tmp_path_factory, "mixtral")


@pytest.fixture(scope="session")
def tiny_qwen3_moe(tmp_path_factory) -> Path:
    """Folder of the tiny Qwen3-MoE (q/k norm, head_dim 24, 4 experts of width 48, top 2)."""
    return _session_checkpoint(tmp_path_factory, "qwen3_moe")


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


@pytest.fixture(params=[0, 1, 2], ids=["lanes", "avx2", "avx512"])
def hash_route(request):
    """hash.c's route under test (0: the portable lanes, 1: AVX2 registers, eight messages at a
    time, 2: AVX-512 registers; skipped where the CPU lacks it), the best one restored after.
    Test modules take it with `pytestmark = [..., pytest.mark.usefixtures("hash_route")]`."""
    from commitllm.verifier import native

    if native.lib() is None:
        pytest.skip(f"no compiled core: {native.error()}")
    if request.param > native.best_route():
        pytest.skip("this CPU has no " + ("AVX2" if request.param == 1 else "AVX-512 VNNI")
                    + " route")
    assert native.use_route(request.param) == request.param
    yield request.param
    native.use_route(-1)
