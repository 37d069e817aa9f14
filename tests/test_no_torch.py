"""The verifier side imports and runs with every engine-only package unavailable (what a
verifier-only install, the wheel without extras, lacks)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

# The engine extra and the test extra: nothing the base install does not bring.
ENGINE_ONLY = ("torch", "triton", "transformers", "accelerate", "fastapi", "starlette", "uvicorn",
               "openai", "httpx", "matplotlib", "hypothesis", "pytest")

BLOCKER = f"""
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {ENGINE_ONLY!r}:
            raise ImportError('blocked for this test: ' + name)
        return None
sys.meta_path.insert(0, _Block())
"""


def _run_blocked(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    script = tmp_path / "blocked.py"
    script.write_text(BLOCKER + code)
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("name", ENGINE_ONLY)
def test_blocker_really_blocks(tmp_path, name):
    proc = _run_blocked(f"import {name}\n", tmp_path)
    assert proc.returncode != 0 and "blocked for this test" in proc.stderr


def test_verifier_imports_without_torch(tmp_path):
    code = """
import importlib, pkgutil, commitllm.verifier as v
for m in pkgutil.walk_packages(v.__path__, 'commitllm.verifier.'):
    importlib.import_module(m.name)
import commitllm.keys
print('ok')
"""
    proc = _run_blocked(code, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_verifier_cli_runs_without_torch(tmp_path, tiny_qwen2):
    code = f"""
import sys
from commitllm.verifier.cli import app
sys.argv = ['commitllm', 'inspect', {str(tiny_qwen2)!r}, '--json']
app()
"""
    proc = _run_blocked(code, tmp_path)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["config"]["model_type"] == "qwen2"
    assert len(info["weights_blake3"]) == 64


def test_keygen_from_a_gguf_without_torch(tmp_path, tiny_llama):
    """keygen --model FILE.gguf (what --model default does with the embedded GGUF) converts the
    GGUF and builds the key on the base install alone: gguf is a base dependency."""
    from test_gguf import write_gguf

    from commitllm.verifier.checkpoint import load_checkpoint

    cfg, tensors = load_checkpoint(tiny_llama)
    path = write_gguf(tmp_path / "tiny.gguf", cfg, tensors)
    key = tmp_path / "k.key"
    code = f"""
import os, sys
os.environ['COMMITLLM_CACHE'] = {str(tmp_path / 'cache')!r}
from commitllm.verifier.cli import app
sys.argv = ['commitllm', 'keygen', '--model', {str(path)!r}, '--out', {str(key)!r}, '--public']
app()
"""
    proc = _run_blocked(code, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)["model_commitment"]) == 64
    assert key.stat().st_mode & 0o077 == 0
