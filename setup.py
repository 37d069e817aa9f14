"""Package layout: each top folder is a subpackage of `commitllm` (engine -> commitllm.engine,
...). Subpackages are found with find_packages, never listed by hand, so a new folder cannot be
left out of the wheel (tests/test_wheel.py checks the built wheel against the tree)."""

from setuptools import find_packages, setup

ROOTS = {"commitllm": "commitllm", "commitllm.engine": "engine", "commitllm.kernels": "kernels",
         "commitllm.verifier": "verifier", "commitllm.keys": "keys"}


def packages() -> list[str]:
    out = []
    for name, folder in ROOTS.items():
        out.append(name)
        out += [f"{name}.{sub}" for sub in find_packages(folder)]
    return out


# the compiled core's C sources and header, built on first use (commitllm/verifier/native/__init__.py)
setup(package_dir=ROOTS, packages=packages(), package_data={"commitllm.verifier.native": ["*.c", "*.h"]})
