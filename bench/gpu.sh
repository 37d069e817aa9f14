#!/usr/bin/env bash
# The lent GPU machine's one command (docs/KERNELS.md, "GPU first contact"):
#
#   bash bench/gpu.sh [DIR] [gpu.py options]
#
# DIR defaults to $OUT/gpu when $OUT is set (the device tool's returned folder), else
# bench/results/gpu. Writes DIR/gpu_env.txt (nvidia-smi, versions, what the bootstrap unpacked),
# DIR/gpu_log.txt (everything printed), DIR/gpu.json and DIR/gpu.md. The whole run gets
# GPU_BUDGET_S seconds (default 470); if the process loses the CUDA context (exit 3) and more
# than 60 s are left, a fresh process resumes the steps that did not finish.
# Missing wheels (blake3) come from bench/gpu_wheels/ (bench/gpu_bootstrap.py); no network.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
DIR="bench/results/gpu"
if [ -n "${OUT:-}" ]; then DIR="$OUT/gpu"; fi
if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then DIR="$1"; shift; fi
BUDGET="${GPU_BUDGET_S:-470}"
mkdir -p "$DIR"
unset TRITON_INTERPRET
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
start=$SECONDS
{
  echo "== $(date -u +%FT%TZ) bench/gpu.sh in $(pwd), commit ${COMMITLLM_COMMIT:-unknown}"
  nvidia-smi || echo "(no nvidia-smi)"
  "$PY" -c 'import sys, torch, triton; print(sys.version); print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available()); print("triton", triton.__version__)'
  "$PY" bench/gpu_bootstrap.py
} 2>&1 | tee "$DIR/gpu_env.txt"
"$PY" bench/gpu.py --out "$DIR" --budget "$BUDGET" "$@" 2>&1 | tee "$DIR/gpu_log.txt"
rc=${PIPESTATUS[0]}
left=$((BUDGET - (SECONDS - start)))
if [ "$rc" = 3 ] && [ "$left" -gt 60 ]; then
  echo "== CUDA context lost: resuming the remaining steps in a fresh process ($left s left)" \
    | tee -a "$DIR/gpu_log.txt"
  "$PY" bench/gpu.py --out "$DIR" --budget "$left" --resume "$@" 2>&1 | tee -a "$DIR/gpu_log.txt"
  rc=${PIPESTATUS[0]}
fi
echo "== exit $rc after $((SECONDS - start)) s; results in $DIR (gpu.json, gpu.md)"
exit "$rc"
