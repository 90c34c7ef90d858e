"""The training layer both engines share: metrics rows and writer, checkpoint directories and resume
checks, the batch plan and its token counts, the step loop, and the data-set-size guard."""
import csv
import json
import math

import numpy as np
import pytest

from rasa_megatron.training.checkpoint import (atomic_write_text, check_resume_compatible, checkpoint_root,
                                               resolve_checkpoint, step_tag, write_latest)
from rasa_megatron.training.data import TrainingData, global_batch_plan
from rasa_megatron.training.loop import StepResult, run_steps
from rasa_megatron.training.metrics import METRIC_FIELDS, MetricsWriter, step_row
from rasa_megatron.training.optim import cosine_with_warmup
from rasa_megatron.training.recipe import Recipe


def _rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_step_row_counts_tokens_per_second_per_gpu_and_epoch_progress():
    row = step_row(6, 4, loss=2.5, lr=1e-3, grad_norm=0.5, tokens=1200, seconds=2.0, world_size=3)
    assert tuple(row) == METRIC_FIELDS
    assert row["epoch"] == 1.5 and row["tokens"] == 1200 and row["tokens_per_s_per_gpu"] == 200.0
    assert row["peak_mem_mib"] > 0


def test_metrics_writer_appends_and_a_resume_drops_the_steps_after_its_checkpoint(tmp_path):
    writer = MetricsWriter(tmp_path, total_steps=5, progress=False)
    for step in range(1, 5):
        writer.write(step_row(step, 4, float(step), 1e-3, 0.1, 10, 1.0, 1))
    writer.close()
    assert [int(r["step"]) for r in _rows(tmp_path / "metrics.csv")] == [1, 2, 3, 4]
    assert (tmp_path / "loss.png").stat().st_size > 0
    resumed = MetricsWriter(tmp_path, total_steps=5, initial_step=2, progress=False)  # checkpoint after step 2
    for step in range(3, 6):
        resumed.write(step_row(step, 4, 10.0 + step, 1e-3, 0.1, 10, 1.0, 1))
    resumed.close()
    rows = _rows(tmp_path / "metrics.csv")
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5] and list(rows[0]) == list(METRIC_FIELDS)
    assert [float(r["loss"]) for r in rows] == [1.0, 2.0, 13.0, 14.0, 15.0]


def test_a_writer_on_a_rank_that_does_not_log_writes_nothing(tmp_path):
    writer = MetricsWriter(tmp_path / "run", total_steps=2, enabled=False)
    writer.write(step_row(1, 1, 1.0, 1e-3, 0.1, 10, 1.0, 1))
    writer.close()
    assert not (tmp_path / "run").exists() and writer.rows == []


def test_checkpoint_naming_latest_and_resolution(tmp_path):
    root = checkpoint_root(tmp_path)
    assert root == tmp_path / "checkpoints" and step_tag(42) == "step0000042"
    (root / "step0000004").mkdir(parents=True)
    (root / "step0000004" / "manifest.json").write_text("{}")
    write_latest(root, "step0000004")
    assert (root / "latest").read_text() == "step0000004"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step0000004"]  # no temporary left
    assert resolve_checkpoint(root) == (root, "step0000004")
    assert resolve_checkpoint(root / "step0000004") == (root, "step0000004")
    with pytest.raises(FileNotFoundError, match="neither a DeepSpeed checkpoint root"):
        resolve_checkpoint(tmp_path)
    atomic_write_text(root / "latest", "step0000009")
    with pytest.raises(FileNotFoundError, match="'step0000009' not found"):
        resolve_checkpoint(root)


def test_resume_checks_name_every_difference():
    with pytest.raises(SystemExit, match=r"cannot resume: another layout \(tp 2 -> 1, pp 1 -> 2\)"):
        check_resume_compatible({"tp": 2, "pp": 1, "dp": 4}, {"tp": 1, "pp": 2, "dp": 4}, "another layout")
    check_resume_compatible({"tp": 2}, {"tp": 2}, "unused")


def _data(lengths, global_batch=4, steps_per_epoch=None, total=7, group_by_length=False):
    lengths = np.asarray(lengths)
    return TrainingData([{"input_ids": [0] * n} for n in lengths], lengths, global_batch, seed=3,
                        group_by_length=group_by_length, steps_per_epoch=steps_per_epoch or len(lengths) // global_batch, total_steps=total)


def test_training_data_plans_each_epoch_and_counts_tokens():
    data = _data(np.arange(1, 13))
    assert data.steps_per_epoch == 3
    for step in range(7):
        want = global_batch_plan(data.lengths, 4, 3, step // 3, False)[step % 3]
        assert np.array_equal(data.global_batch(step), want)
        assert data.tokens(want) == int(sum(data.lengths[i] for i in want))
    assert sorted(data.global_batch(0)) != sorted(data.global_batch(3))  # epoch 1 is reshuffled
    grouped = _data(np.arange(1, 13), group_by_length=True)  # one mega-batch: each batch 4 similar lengths
    assert sorted(np.concatenate([grouped.global_batch(s) for s in range(3)])) == list(range(12))
    assert all(np.ptp(grouped.lengths[grouped.global_batch(s)]) == 3 for s in range(3))
    assert [len(s["input_ids"]) for s in data.samples([0, 11])] == [1, 12]


def test_step_loop_logs_each_step_and_saves_at_multiples_below_the_stop(tmp_path):
    data = _data(np.arange(1, 13))
    seen, saved = [], []

    def step_fn(step, global_batch):
        seen.append((step, tuple(global_batch)))
        return StepResult(loss=float(step), grad_norm=0.5, lr=0.1 * step)

    writer = MetricsWriter(tmp_path, total_steps=6, initial_step=1, progress=False)
    rows = run_steps(data, step_fn, start=1, stop=6, world_size=2, writer=writer, save_every=2, save_fn=saved.append).rows
    writer.close()
    assert [s for s, _ in seen] == [1, 2, 3, 4, 5] and saved == [2, 4]  # 6 is the caller's (stop)
    assert all(batch == tuple(data.global_batch(s)) for s, batch in seen)
    assert [r["step"] for r in rows] == [2, 3, 4, 5, 6]
    assert [r["tokens"] for r in rows] == [data.tokens(data.global_batch(s)) for s in range(1, 6)]
    assert [r["loss"] for r in rows] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert [int(r["step"]) for r in _rows(tmp_path / "metrics.csv")] == [2, 3, 4, 5, 6]


@pytest.mark.parametrize("request_at,want_saved", [(3, [2, 4]), (4, [2, 4, 5])])
def test_a_stop_request_ends_the_loop_after_a_checkpoint_of_that_step(tmp_path, request_at, want_saved):
    """A stop file appearing during step ``request_at`` (0-based): the loop finishes that step, writes its
    checkpoint unless the periodic one just did, and returns the step it stopped after."""
    from rasa_megatron.training.control import StopRequest

    data = _data(np.arange(1, 13), total=8)
    saved = []

    def step_fn(step, global_batch):
        if step == request_at:
            (tmp_path / "STOP").touch()
        return StepResult(loss=1.0, grad_norm=0.5, lr=0.1)

    writer = MetricsWriter(tmp_path, total_steps=8, progress=False)
    result = run_steps(data, step_fn, 0, 8, 1, writer, save_every=2, save_fn=saved.append,
                       stop_request=StopRequest([], tmp_path / "STOP"))
    writer.close()
    assert result.stopped_step == request_at + 1 and saved == want_saved
    assert [r["step"] for r in result.rows] == list(range(1, request_at + 2))


def test_cosine_schedule_warms_up_then_decays_to_zero():
    multiplier = cosine_with_warmup(total_steps=10, warmup_ratio=0.2)  # 2 warm-up steps
    assert [multiplier(s) for s in (0, 1)] == [1 / 3, 2 / 3]
    assert multiplier(2) == 1.0 and multiplier(10) == pytest.approx(0.0, abs=1e-12)
    assert multiplier(6) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))


def test_a_data_set_smaller_than_one_global_batch_is_refused(tmp_path):
    from transformers import AutoTokenizer

    from rasa_megatron.models import smollm2_gguf_path
    from rasa_megatron.training.data import prepare_training_data

    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(5)))
    recipe = Recipe()
    recipe.data.paths, recipe.train.global_batch_size = [str(path)], 8
    with pytest.raises(SystemExit, match=r"5 training samples is fewer than one global batch \(8\)"):
        prepare_training_data(recipe, tokenizer)
    recipe.train.global_batch_size, recipe.train.max_steps = 4, None
    data = prepare_training_data(recipe, tokenizer)
    assert (data.steps_per_epoch, data.total_steps) == (1, 8)  # 8 epochs (the recipe default) of one step
