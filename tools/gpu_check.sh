#!/usr/bin/env bash
# The GPU checks in one command, for a single-GPU machine (the device tool: run(command="bash
# tools/gpu_check.sh", carry=[".whl"])). Installs the wheels prepared here by tools/gpu_wheels.sh
# (DeepSpeed, Megatron-core, datasets, ...: the GPU machine has torch, transformers and peft but not
# these) into /tmp/site, then runs tools/gpu_check.py, which writes gpu_check.json and gpu_check.log to
# $OUT (or runs/gpu_check). Finishes in about 8 minutes; exits non-zero if any case fails.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
if compgen -G "$ROOT/.whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$ROOT"/.whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec "$PY" "$ROOT/tools/gpu_check.py" --out "${OUT:-$ROOT/runs/gpu_check}" "$@"
