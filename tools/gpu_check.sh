#!/usr/bin/env bash
# The GPU checks in one command, for a single-GPU machine (the device tool: run(command="bash
# tools/gpu_check.sh", carry=[".whl"], timeout_s=600)). Installs the wheels prepared here by
# tools/gpu_wheels.sh (DeepSpeed, Megatron-core, datasets, ...: the GPU machine has torch, transformers and
# peft but not these) into /tmp/site, then runs tools/gpu_check.py, which writes gpu_check.json (rewritten
# after every case), its logs and stdout.log to $OUT (or runs/gpu_check).
# First the kernels (skipped by --cpu): builds the csrc/ extension for the machine's torch (sm_80 + sm_90),
# runs tests/unit/ops (CUDA kernels vs CPU kernels bit for bit, the fused path vs the fp64 reference) with
# RASA_KERNELS=force, and bench/step_time.py --preset llama8b --device cuda (frozen base, PEFT LoRA r=8
# fp32 / bf16, PEFT LoRA r=39, RaSA fused with and without the extension and the reference path; adapter
# dropout 0 and 0.05) into kernels.json, kernel_tests.log and step_time_llama8b_*.json. The engine cases
# then share what is left of 470 s (--budget); exits non-zero if anything failed.
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
START=$SECONDS
KERNELS_RC=0
if [[ " $* " != *" --cpu "* ]]; then
  export RASA_EXTENSION_DIR=/tmp/rasa_extension
  cd "$ROOT"
  build_rc=0; tests_rc=0; bench_rc=0
  "$PY" -m rasa_megatron.ops.build --cuda > "$OUT_DIR/kernel_build.json" 2> "$OUT_DIR/kernel_build.log" || build_rc=$?
  build_s=$((SECONDS - START))
  if [ "$build_rc" = 0 ]; then
    RASA_KERNELS=force timeout 150 "$PY" -m pytest -q -p no:cacheprovider tests/unit/ops/test_cuda_kernels.py \
      tests/unit/ops/test_fused.py tests/unit/ops/test_kernels.py > "$OUT_DIR/kernel_tests.log" 2>&1 || tests_rc=$?
    for dropout in 0.0 0.05; do
      timeout 120 "$PY" bench/step_time.py --preset llama8b --device cuda --dtype bf16 --warmup 3 --steps 15 \
        --dropout "$dropout" --variants "frozen base" "PEFT LoRA r=8" "PEFT LoRA r=8 bf16" "PEFT LoRA r=39" \
        "RaSA r=8 k=1" "RaSA r=8 k=1, torch fallback" "RaSA r=8 k=1, reference path" \
        --out "$OUT_DIR/step_time_llama8b_dropout$dropout.json" >> "$OUT_DIR/step_time.log" 2>&1 || bench_rc=$?
    done
  fi
  "$PY" - "$OUT_DIR" "$build_rc" "$tests_rc" "$bench_rc" "$build_s" "$((SECONDS - START))" <<'PY'
import json, pathlib, sys
out, build_rc, tests_rc, bench_rc, build_s, total_s = sys.argv[1], *map(int, sys.argv[2:])
tail = lambda name: (pathlib.Path(out, name).read_text()[-1500:] if pathlib.Path(out, name).exists() else "")
report = {"build_rc": build_rc, "tests_rc": tests_rc, "bench_rc": bench_rc, "build_s": build_s, "seconds": total_s,
          "tests_tail": tail("kernel_tests.log"), "build_tail": tail("kernel_build.log") if build_rc else ""}
for path in sorted(pathlib.Path(out).glob("step_time_llama8b_*.json")):
    bench = json.loads(path.read_text())
    report[path.stem] = {k: bench.get(k) for k in ("ratio_to_frozen_base", "peak_step_over_frozen_gib", "median_ms",
                                                   "rasa_over_peft_lora_bf16", "fused_over_reference", "kernels")}
pathlib.Path(out, "kernels.json").write_text(json.dumps(report, indent=2))
print(json.dumps({k: v for k, v in report.items() if not k.endswith("tail")}, indent=2))
PY
  [ "$build_rc$tests_rc$bench_rc" = "000" ] || KERNELS_RC=1
fi
BUDGET=$((470 - (SECONDS - START)))
[ "$BUDGET" -ge 60 ] || BUDGET=60
set +e
"$PY" "$ROOT/tools/gpu_check.py" --out "$OUT_DIR" --budget "$BUDGET" "$@" 2>&1 | tee "$OUT_DIR/stdout.log"
CASES_RC=${PIPESTATUS[0]}
set -e
exit $((CASES_RC != 0 || KERNELS_RC != 0))
