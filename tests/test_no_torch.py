"""The verifier side imports and runs with torch and triton unavailable."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BLOCKER = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'triton', 'transformers'):
            raise ImportError('blocked for this test: ' + name)
        return None
sys.meta_path.insert(0, _Block())
"""


def _run_blocked(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    script = tmp_path / "blocked.py"
    script.write_text(BLOCKER + code)
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)


def test_blocker_really_blocks(tmp_path):
    proc = _run_blocked("import torch\n", tmp_path)
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
