"""tools/reproduce.py --quick end to end on the real SmolLM2-135M (2 ks + LoRA + full, 2 seeds,
2 steps), and the report's plain-words verdicts on constructed cases."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from rasa_megatron.cli.reproduce import main
from rasa_megatron.eval.reproduce import ReproduceOptions, quick_options, run_study, verdict

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.slow
def test_reproduce_quick_end_to_end(tmp_path, capsys):
    out = tmp_path / "study"
    assert main(["--out", str(out), "--quick", "--no-progress"]) == 0
    options = quick_options()
    variants = [v.name for v in options.variants()]
    assert variants == ["rasa_k0", "rasa_k1", "lora", "full"]
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == len(variants) * len(options.seeds) * (1 + len(options.eval_steps))
    assert {r["variant"] for r in rows} == set(variants) and {r["step"] for r in rows} == {"0", "1", "2"}
    for row in rows:
        assert 0.0 <= float(row["accuracy"]) <= 1.0 and float(row["probe_nll"]) > 0
        if row["step"] == "0":
            assert float(row["forgetting"]) == 0.0
    summary = list(csv.DictReader((out / "summary.csv").open()))
    params = {r["variant"]: int(r["trainable_parameters"]) for r in summary}
    assert abs(params["rasa_k1"] - params["lora"]) / params["lora"] < 0.01  # same budget (D adds r-k+Lk per layer)
    assert params["full"] > 50 * params["lora"]
    report = (out / "report.md").read_text()
    assert "| rasa_k1 |" in report and "Against LoRA, in plain words" in report
    assert all(f"- {v}:" in report for v in variants if v != "lora")
    for name in ("accuracy_vs_steps.png", "learning_vs_forgetting.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    runs = sorted((out / "runs").glob("*.json"))
    assert len(runs) == len(variants) * len(options.seeds)
    record = json.loads(runs[0].read_text())
    assert len(record["losses"]) == options.steps and record["eval_size"] == options.eval_size
    with pytest.raises(ValueError, match="another setting"):  # refuses to mix settings in one directory
        run_study(out, ReproduceOptions(**{**json.loads((out / "setting.json").read_text()), "steps": 3,
                                           "eval_steps": [3]}))


def test_verdicts_say_plainly_where_rasa_does_not_beat_lora():
    row = {"accuracy_minus_lora": [0.02, 0.01, 0.05], "forgetting_minus_lora": [-0.1, -0.2, -0.01]}
    assert verdict(row) == "learns more than LoRA on every seed; forgets less than LoRA on every seed"
    row = {"accuracy_minus_lora": [0.02, -0.01, 0.0], "forgetting_minus_lora": [0.1, 0.2, 0.01]}
    assert verdict(row).startswith("does not beat LoRA on accuracy (mixed across seeds, mean +0.003)")
    assert verdict(row).endswith("forgets more on every seed)")
    assert "tied on every seed" in verdict({"accuracy_minus_lora": [0.0, 0.0], "forgetting_minus_lora": [0.1, -0.1]})
    assert verdict({"variant": "lora"}) == ""


def test_bad_settings_exit_with_a_message(tmp_path):
    for args, message in ((["--ks", "9"], "ks must lie in 0..r=8"), (["--eval-steps", "40"], "eval_steps"),
                          (["--steps", "0"], "steps must be positive"),
                          (["--seeds", "0", "0"], "seeds must not repeat a value, got [0, 0]"),
                          (["--threads", "0"], "--threads must be positive, got 0")):
        result = subprocess.run([sys.executable, str(ROOT / "tools" / "reproduce.py"), "--out", str(tmp_path / "x"),
                                 *args], capture_output=True, text=True)
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert not (tmp_path / "x").exists()
    (tmp_path / "file").write_text("")
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "reproduce.py"), "--out", str(tmp_path / "file")],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "exists and is not a directory" in result.stderr
