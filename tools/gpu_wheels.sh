#!/usr/bin/env bash
# Prepares, here (no GPU needed), the wheels tools/gpu_check.sh installs on the GPU machine (Python 3.12,
# x86-64), which has torch, transformers, peft, tokenizers and safetensors but no DeepSpeed, Megatron-core
# or datasets. DeepSpeed is published as an sdist only: its pure-Python wheel is built here
# (DS_BUILD_OPS=0: the ops are JIT-built on the GPU machine). Versions are those of .venv (tools/env.sh).
# Writes .whl/ (git-ignored; carry it: run(carry=[".whl"], ...)).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$ROOT/.venv/bin/python"
DEST="$ROOT/.whl"
rm -rf "$DEST" && mkdir -p "$DEST"
version() { "$PY" -m pip show "$1" 2>/dev/null | sed -n 's/^Version: //p'; }
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "deepspeed==$(version deepspeed)"
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_31_x86_64 --platform manylinux_2_34_x86_64 --platform manylinux_2_35_x86_64)
for pkg in megatron-core datasets dill multiprocess hjson pydantic pydantic-core annotated-types \
           typing-inspection typing-extensions packaging lion-pytorch; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$DEST" "$pkg==$(version "$pkg")"
done
du -sh "$DEST"; ls "$DEST"
