#!/usr/bin/env bash
# The default job (README): set up .venv if needed, then fine-tune SmolLM2-135M with RaSA on CPU.
# Arguments go to examples/finetune_default.py (e.g. --method lora, --method full --name full).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/tools/env.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/python" examples/finetune_default.py "$@"
