"""Make this checkout runnable on a machine with no network and no `pip install -e .`: the lent GPU
machine has Python 3.12, torch, Triton, transformers, numpy, safetensors, tokenizers, jinja2,
typer, rich and mpmath, but no blake3 and no installed commitllm.

- Missing modules come from the wheels in bench/gpu_wheels/ (they travel in the working tree):
  the wheel whose tags match this interpreter is unpacked (a wheel is a zip file; no pip, no
  build step) into a site folder that is put first on sys.path.
- `commitllm.engine`, `.kernels`, `.verifier`, `.keys` live at the repository root under other
  names (pyproject's package-dir); without an install, the root is appended to
  `commitllm.__path__` so the subpackages resolve to the folders.
- transformers >= 5.25 imports the Hub's `kernels` package, which this checkout's `kernels/`
  (and `bench/kernels.py`) shadow when the root or bench/ is on sys.path: the installed one wins.

    python bench/gpu_bootstrap.py [--site DIR]    # prints what it did; exit 1 if still missing
"""

from __future__ import annotations

import importlib
import importlib.util
import platform
import sys
import zipfile
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WHEELS = Path(__file__).resolve().parent / "gpu_wheels"
DEFAULT_SITE = REPO / ".gpu_site"
NEEDED = {"blake3": "blake3"}  # module -> distribution (the wheel file's first field)


def wheel_matches(name: str, version: tuple[int, int] | None = None,
                  machine: str | None = None) -> bool:
    """Whether a wheel file name's tags fit this interpreter: cp<maj><min> (or py3 / abi3 from an
    older cp), and a linux platform of this machine's architecture (or `any`)."""
    if not name.endswith(".whl"):
        return False
    parts = name[:-4].split("-")
    if len(parts) < 5:
        return False
    py, abi, plat = parts[-3], parts[-2], parts[-1]
    maj, mnr = version or sys.version_info[:2]
    mach = machine or platform.machine()
    py_ok = any(t == f"cp{maj}{mnr}" or t in ("py3", f"py{maj}{mnr}") for t in py.split("."))
    if not py_ok and abi == "abi3":
        py_ok = any(t.startswith("cp3") and int(t[3:] or 0) <= mnr for t in py.split("."))
    plat_ok = plat == "any" or any(p.startswith(("manylinux", "linux")) and p.endswith(mach)
                                   for p in plat.split("."))
    return py_ok and plat_ok


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
        return True
    except ImportError:
        return False


def ensure_wheels(site: Path = DEFAULT_SITE, wheels: Path = WHEELS,
                  needed: dict = NEEDED) -> list[str]:
    """Unpack the matching wheel of every missing module into `site` and put `site` first on
    sys.path; returns what was done, one line each. Raises ImportError if a module stays missing."""
    done = []
    missing = [m for m in needed if not _importable(m)]
    if not missing:
        return done
    site = Path(site)
    if str(site) not in sys.path:
        sys.path.insert(0, str(site))
        importlib.invalidate_caches()
    for module in missing:
        if _importable(module):  # unpacked by an earlier run
            done.append(f"{module}: from {site}")
            continue
        dist = needed[module]
        cands = sorted(p for p in wheels.glob(f"{dist}-*.whl") if wheel_matches(p.name))
        if not cands:
            raise ImportError(f"{module} is not installed and {wheels} has no {dist} wheel for "
                              f"Python {platform.python_version()} on {platform.machine()}")
        site.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(cands[-1]) as z:
            z.extractall(site)
        importlib.invalidate_caches()
        importlib.import_module(module)
        done.append(f"{module}: unpacked {cands[-1].name} into {site}")
    return done


def ensure_package(repo: Path = REPO) -> str | None:
    """Make `commitllm.engine/.kernels/.verifier/.keys` importable from the checkout; returns what
    was done (None when the package was installed already)."""
    try:
        import commitllm.verifier  # noqa: F401
        return None
    except ImportError:
        pass
    if str(repo) not in sys.path:
        sys.path.insert(0, str(repo))
    import commitllm

    if str(repo) not in commitllm.__path__:
        commitllm.__path__.append(str(repo))
    importlib.invalidate_caches()
    import commitllm.verifier  # noqa: F401,F811

    return f"commitllm subpackages resolved from {repo} (no install)"


class InstalledKernelsFinder:
    """Resolves the top-level name `kernels` to the installed Hugging Face `kernels` distribution
    (transformers >= 5.25 requires and imports it) instead of this checkout's kernels/ folder or
    bench/kernels.py, which shadow it whenever the repository root or bench/ is on sys.path."""

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


def prefer_installed_kernels() -> None:
    """Put InstalledKernelsFinder first on sys.meta_path (once)."""
    if not any(isinstance(f, InstalledKernelsFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, InstalledKernelsFinder())


def ensure(site: Path = DEFAULT_SITE) -> list[str]:
    """All of the above; the lines say what was done."""
    prefer_installed_kernels()
    done = ensure_wheels(site)
    pkg = ensure_package()
    return done + ([pkg] if pkg else [])


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--site", type=Path, default=DEFAULT_SITE)
    args = ap.parse_args(argv)
    for p in sorted(WHEELS.glob("*.whl")):
        tag = "  (matches)" if wheel_matches(p.name) else ""
        print(f"wheel {p.name} {p.stat().st_size} B{tag}")
    try:
        lines = ensure(args.site)
    except ImportError as e:
        print(f"bootstrap failed: {e}")
        return 1
    print("\n".join(lines) or "nothing to do: every module is importable")
    return 0


if __name__ == "__main__":
    sys.exit(main())
