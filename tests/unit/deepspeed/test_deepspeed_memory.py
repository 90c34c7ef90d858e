"""The DeepSpeed engine's memory table (dry run, rasa-memory) against DeepSpeed's own estimators."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rasa_megatron.deepspeed.memory import model_states_bytes_per_gpu
from rasa_megatron.training.dry_run import ParamCounts

ROOT = Path(__file__).resolve().parents[3]
CONFIGS = ROOT / "examples" / "configs"


@pytest.mark.parametrize("nodes,offload_opt,offload_params", [(8, False, False), (8, True, False), (8, True, True),
                                                             (1, False, False)])
def test_memory_estimate_agrees_with_deepspeed_for_full_adamw(nodes, offload_opt, offload_params):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    counts = ParamCounts(total=70_553_706_496, trainable=70_553_706_496, largest_layer=1_050_673_152)
    _, ds_gpu, _ = estimate_zero3_model_states_mem_needs(counts.total, counts.largest_layer, 8, nodes,
                                                         cpu_offload=offload_opt, cpu_offload_params=offload_params)
    ours = model_states_bytes_per_gpu(counts, 8 * nodes, 3, offload_opt, offload_params, "adamw")
    assert ours == ds_gpu


def test_memory_estimate_zero2_agrees_with_deepspeed():
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    counts = ParamCounts(total=8_030_261_248, trainable=8_030_261_248, largest_layer=525_336_576)
    _, ds_gpu = estimate_zero2_model_states_mem_needs(counts.total, 8, 1, cpu_offload=False)
    assert model_states_bytes_per_gpu(counts, 8, 2, optimizer="adamw") == ds_gpu


def test_memory_estimate_cli_prints_table_and_deepspeed_comparison():
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "memory_estimate.py"), "--model-config",
                           str(CONFIGS / "models" / "llama3_8b.json"), "--method", "full", "--optimizer", "adamw",
                           "--nodes", "1", "--compare-deepspeed"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    line = [l for l in proc.stdout.splitlines() if "DeepSpeed's estimator" in l][0]
    ds, ours = re.findall(r"([\d.]+) GiB", line)
    assert ds == ours
    assert "| ZeRO-3 + offload optimizer + params |" in proc.stdout
