#!/usr/bin/env bash
# The GPU checks in one command, for a single-GPU machine (the device tool: run(command="bash
# tools/gpu_check.sh", carry=[".whl"], timeout_s=600)). Installs the wheels prepared here by
# tools/gpu_wheels.sh (DeepSpeed, Megatron-core, datasets, ...: the GPU machine has torch, transformers and
# peft but not these) into /tmp/site, then runs tools/gpu_check.py, which writes gpu_check.json (rewritten
# after every case), its logs and stdout.log to $OUT (or runs/gpu_check). The cases share a budget of
# 480 s (--budget); exits non-zero if any case fails. `--cpu` (passed on) checks the script on a CPU.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
OUT_DIR="${OUT:-$ROOT/runs/gpu_check}"
mkdir -p "$OUT_DIR"
if [[ " $* " == *" --cpu "* ]]; then
  :  # the script checked on this machine, with its own environment (.venv)
elif compgen -G "$ROOT/.whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$ROOT"/.whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "error: no wheels in $ROOT/.whl: run tools/gpu_wheels.sh here and carry .whl (run(carry=[\".whl\"]))" >&2
  exit 2
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" "$ROOT/tools/gpu_check.py" --out "$OUT_DIR" "$@" 2>&1 | tee "$OUT_DIR/stdout.log"
