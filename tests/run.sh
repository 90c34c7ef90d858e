#!/usr/bin/env bash
# The project's test command: sets up .venv if needed (tools/env.sh), then runs the whole suite,
# slow tests included. Extra arguments go to pytest (e.g. `bash tests/run.sh -m "not slow"`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/tools/env.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m pytest "$@"
