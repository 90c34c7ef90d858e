"""bench/step_time.py runs end to end on a tiny config and reports every variant."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_step_time_bench_reports_all_variants(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "step_time.py"), "--layers", "2", "--hidden", "64",
                           "--intermediate", "128", "--heads", "4", "--kv-heads", "2", "--vocab", "256", "--seq", "16",
                           "--batch", "2", "--warmup", "1", "--steps", "2", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert set(result["median_ms"]) == {"frozen base", "LoRA r=8 (ours, k=0)", "PEFT LoRA r=8", "RaSA r=8 k=1",
                                        "RaSA r=8 k=1, reference path"}
    assert all(t > 0 for t in result["median_ms"].values())
    assert result["ratio_to_frozen_base"]["frozen base"] == 1.0
    assert "| RaSA r=8 k=1 |" in proc.stdout
    assert result["fused_over_reference"] > 0 and result["kernels"]["cpu"] in (True, False)
