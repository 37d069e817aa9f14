"""The built wheel and sdist hold the whole package (every folder with a module), and the wheel
nothing else. CI also installs the wheel into fresh environments (.ci/wheel_check.sh); this test
is the cheap part that runs in the default suite."""

from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import commitllm

ROOT = Path(__file__).resolve().parents[1]
ROOTS = {"commitllm": "commitllm", "commitllm/engine": "engine", "commitllm/kernels": "kernels",
         "commitllm/verifier": "verifier", "commitllm/keys": "keys"}


def _tree_modules() -> set[str]:
    """Every .py file under the mapped folders, as its path inside the wheel."""
    out = set()
    for inside, folder in ROOTS.items():
        for f in (ROOT / folder).rglob("*.py"):
            rel = f.relative_to(ROOT / folder)
            if "__pycache__" in rel.parts:
                continue
            if inside == "commitllm" and len(rel.parts) > 1:
                continue  # commitllm/ holds only __init__.py; the others are their own roots
            out.add(f"{inside}/{rel.as_posix()}")
    return out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    pytest.importorskip("setuptools", reason="the test extra installs setuptools")
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps",
                           "--no-build-isolation", "-q", "-w", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    (whl,) = out.glob("commitllm-*.whl")
    return zipfile.ZipFile(whl)


def test_wheel_holds_every_module(wheel):
    names = set(wheel.namelist())
    missing = _tree_modules() - names
    assert not missing, f"modules missing from the wheel: {sorted(missing)}"
    folders = {n.rsplit("/", 1)[0] for n in _tree_modules()}
    assert {"commitllm/engine/exact", "commitllm/verifier/numerics", "commitllm/engine/serve",
            "commitllm/engine/tp"} <= folders  # the folders a hand-written list once forgot


def test_wheel_holds_the_compiled_core_source(wheel):
    """The C sources and headers the verifier builds on first use ship; no prebuilt library."""
    names = set(wheel.namelist())
    src = Path(ROOT, "verifier", "native")
    want = {f"commitllm/verifier/native/{p.name}" for p in (*src.glob("*.c"), *src.glob("*.h"))}
    assert {"commitllm/verifier/native/attn.c", "commitllm/verifier/native/exact.h"} <= want
    assert want <= names, f"missing from the wheel: {sorted(want - names)}"
    assert not [n for n in names if n.endswith((".so", ".dylib", ".dll"))]


def test_wheel_holds_nothing_else(wheel):
    for n in wheel.namelist():
        top = n.split("/")[0]
        assert top == "commitllm" or top.endswith(".dist-info"), n
        assert not n.startswith(("commitllm/tests", "commitllm/bench", "commitllm/docs")), n
        assert "__pycache__" not in n, n


def test_wheel_metadata(wheel):
    (meta,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    text = wheel.read(meta).decode()
    assert f"Version: {commitllm.__version__}\n" in text
    base = [ln for ln in text.splitlines() if ln.startswith("Requires-Dist:") and "extra ==" not in ln]
    assert any("gguf" in ln for ln in base), "gguf must be a base dependency (verifier keygen)"
    assert not any(p in ln for ln in base for p in ("torch", "triton", "fastapi", "uvicorn"))
    (eps,) = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    ep = wheel.read(eps).decode()
    assert "commitllm = commitllm.verifier.cli:main" in ep
    assert "commitllm-engine = commitllm.engine.cli:main" in ep


def test_sdist_is_complete(tmp_path):
    pytest.importorskip("setuptools", reason="the test extra installs setuptools")
    # The checkout's own folders (kernels/, ...) must not shadow installed modules: drop '' (cwd).
    code = ("import sys; sys.path = [p for p in sys.path if p not in ('', '.')]; "
            "from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    name = proc.stdout.strip().splitlines()[-1]
    with tarfile.open(tmp_path / name) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout")
    wanted = {f for f in tracked.stdout.splitlines()
              if not f.startswith(".gitignore") and (ROOT / f).is_file()}
    missing = wanted - names
    assert not missing, f"tracked files missing from the sdist: {sorted(missing)}"
