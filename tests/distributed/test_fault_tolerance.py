"""Multi-day runs on 2 CPU processes (gloo), both engines: kills at random moments followed by resumes,
a torn newest checkpoint, a finished run resumed, a stop signal and a stop file, a full disk, and
resumes of another run refused. "Equal" means equal to the uninterrupted run of the same recipe
(adapter dropout on, so the RNG restore matters): per-step losses rel 1e-6 with every step logged
once, final adapter 1e-6.
"""
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from engine_helpers import (ROOT, SCRIPT, launch, make_megatron_recipe, make_recipe, read_losses,  # noqa: E402
                            tiny_checkpoint)

pytestmark = pytest.mark.slow
STEPS = 8
EXTRA = {"adapter": {"dropout": 0.1}, "train": {"max_steps": STEPS, "optimizer": "adamw"}, "output": {"save_every": 2}}


def engine_model(engine, workspace):
    """The tiny Llama each engine runs (PP2 needs 4 layers)."""
    return tiny_checkpoint(workspace, "tiny_llama4") if engine == "megatron" else tiny_checkpoint(workspace)


def engine_recipe(engine, workspace, out, **sections):
    """The 2-process run of ``engine``: PP2 for megatron, ZeRO-3 for deepspeed; ``sections`` override."""
    defaults = dict(EXTRA)
    if engine == "megatron":
        defaults |= {"megatron": {"pipeline_model_parallel_size": 2},
                     "model": {"path": str(engine_model(engine, workspace))}}
    merged = {key: {**defaults.get(key, {}), **sections.get(key, {})} for key in {*defaults, *sections}}
    make = make_megatron_recipe if engine == "megatron" else make_recipe
    return make(workspace, out, **merged)


def start(recipe, nproc, *extra, log: Path):
    """The run (torchrun and its workers), not waited for; its output goes to ``log``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    command = [str(Path(sys.executable).parent / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", str(SCRIPT),
               "--config", str(recipe), *extra]
    with open(log, "a") as handle:
        return subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                start_new_session=True)


def kill_job(proc) -> None:
    """kill -9 of torchrun and every process it started (torch's elastic agent puts its workers in
    sessions of their own), as a node failure would."""
    import psutil

    try:
        family = psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]
    except psutil.NoSuchProcess:
        family = []
    for member in family:
        try:
            member.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=60)
    proc.wait(timeout=60)


def steps_logged(out):
    try:
        return [int(line.split(",")[0]) for line in (out / "metrics.csv").read_text().splitlines()[1:]]
    except FileNotFoundError:
        return []


def assert_same_run(out, full):
    assert steps_logged(out) == list(range(1, STEPS + 1))
    np.testing.assert_allclose(read_losses(out), read_losses(full), rtol=1e-6)
    a, b = (load_file(d / "adapter" / "rasa_adapter.safetensors") for d in (out, full))
    assert set(a) == set(b) and max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


@pytest.fixture(scope="module", params=["deepspeed", "megatron"])
def uninterrupted(request, workspace, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param) / "full"
    launch(engine_recipe(request.param, workspace, out), 2)
    return request.param, out


def test_kills_at_random_moments_then_resumes_reproduce_the_run(uninterrupted, workspace, tmp_path):
    """Three kill -9 of the whole job (torchrun and workers) at seeded random moments: each run is killed a
    random 1-3 steps past the checkpoint it resumed from, plus a random fraction of a second (so before,
    during or after a save), then resumed with --resume auto; the finished run resumed again exits 0 at
    once and rewrites nothing."""
    engine, full = uninterrupted
    out = tmp_path / "run"
    recipe = engine_recipe(engine, workspace, out)
    rng = random.Random(20261204)  # kills 3, 2 and 1 steps past the resume points
    kills = [(rng.randint(1, 3), round(rng.uniform(0.0, 1.5), 2)) for _ in range(3)]
    print(f"kills (steps past the resume point, extra seconds): {kills}")
    for steps_past, extra_seconds in kills:
        latest = out / "checkpoints" / "latest"
        resumed_at = int(latest.read_text()[4:]) if latest.is_file() else 0
        stale = steps_logged(out)  # rows of the killed run past its checkpoint, until this run truncates them
        proc = start(recipe, 2, "--resume", "auto", log=tmp_path / "killed.log")
        while proc.poll() is None and (steps_logged(out) == stale or max(steps_logged(out), default=0)
                                       < resumed_at + steps_past):
            time.sleep(0.05)
        time.sleep(extra_seconds)
        kill_job(proc)
        print(f"killed {steps_past} steps + {extra_seconds} s past step {resumed_at}: logged {steps_logged(out)}")
    launch(recipe, 2, "--resume", "auto")
    assert_same_run(out, full)
    files = [p for p in out.rglob("*") if p.is_file()]
    mtimes = {p: p.stat().st_mtime_ns for p in files}
    again = launch(recipe, 2, "--resume")
    assert "run complete" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == mtimes


def test_a_torn_newest_checkpoint_is_reported_and_the_previous_one_used(uninterrupted, workspace, tmp_path):
    """Stop after step 4 (checkpoints 2 and 4), cut the newest checkpoint's main file in half: --resume
    names the damaged file, falls back to step 2 and reproduces the run; asked for by path, the damaged
    checkpoint is refused, naming the file."""
    engine, full = uninterrupted
    out = tmp_path / "run"
    recipe = engine_recipe(engine, workspace, out)
    launch(recipe, 2, "--stop-after", "4")
    newest = out / "checkpoints" / "step0000004"
    victim = newest / ("rank00000.safetensors" if engine == "megatron" else "portable/portable_state.safetensors")
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    refused = launch(recipe, 2, "--resume", str(newest), check=False)
    assert refused.returncode != 0 and f"cannot resume from {newest}" in refused.stdout + refused.stderr
    assert str(victim) in refused.stdout + refused.stderr
    resumed = launch(recipe, 2, "--resume")
    assert f"skipping damaged checkpoint {newest}" in resumed.stderr and str(victim) in resumed.stderr
    assert "resuming from " + str(out / "checkpoints" / "step0000002") in resumed.stderr
    assert_same_run(out, full)


def test_a_stop_request_checkpoints_exits_99_and_a_requeue_resumes(uninterrupted, workspace, tmp_path):
    """DeepSpeed: SIGUSR1 sent to both training processes; Megatron: the STOP file the SLURM templates'
    trap creates. Every rank finishes its step, the run writes that step's checkpoint and
    preempted.json, and the workers exit with status 99; --resume auto (what a requeued job runs)
    completes the run as if nothing happened."""
    import psutil

    engine, full = uninterrupted
    out = tmp_path / "run"
    recipe = engine_recipe(engine, workspace, out)
    log = tmp_path / "stopped.log"
    proc = start(recipe, 2, "--resume", "auto", log=log)
    while len(steps_logged(out)) < 2 and proc.poll() is None:
        time.sleep(0.2)
    if engine == "deepspeed":
        workers = [c for c in psutil.Process(proc.pid).children(recursive=True) if "pretrain_rasa.py" in " ".join(c.cmdline())]
        assert len(workers) == 2
        for worker in workers:
            worker.send_signal(signal.SIGUSR1)
    else:
        (out / "STOP").touch()
    proc.wait(timeout=600)
    output = log.read_text()
    assert proc.returncode != 0 and "exitcode  : 99" in output, output[-3000:]
    marker = json.loads((out / "preempted.json").read_text())
    stopped = marker["step"]
    assert 2 <= stopped < STEPS and (out / "checkpoints" / "latest").read_text() == f"step{stopped:07d}"
    assert marker["reason"] == ("signal SIGUSR1" if engine == "deepspeed" else f"stop file {out / 'STOP'}")
    assert steps_logged(out) == list(range(1, stopped + 1)) and not (out / "adapter").exists()
    launch(recipe, 2, "--resume", "auto")
    assert_same_run(out, full)


def test_a_full_disk_stops_the_run_and_keeps_the_previous_checkpoint(uninterrupted, workspace, tmp_path):
    """Rank 0's writes fail with ENOSPC part-way through the second checkpoint (a writer that raises after
    N bytes): the run stops with an error naming the checkpoint, the cause and the free space; the partial
    directory is gone, step 2 and latest are intact; resuming (with space again) reproduces the run."""
    engine, full = uninterrupted
    out = tmp_path / "run"
    recipe = engine_recipe(engine, workspace, out)
    first = json.loads((full / "checkpoints" / "step0000002" / "manifest.json").read_text())["files"]
    limit = int(1.5 * sum(entry["size"] for name, entry in first.items() if "rank00001" not in name))  # rank 0's
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "RASA_TEST_FAIL_AFTER_BYTES": str(limit)}
    proc = subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2",
                           str(Path(__file__).parent / "full_disk_worker.py"), "--config", str(recipe)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "could not write checkpoint" in log and "No space left on device" in log, log[-4000:]
    assert "step0000002 and" in log and "MiB are free" in log
    checkpoints = out / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step0000002" and not list(checkpoints.glob(".step*"))
    assert sorted(p.name for p in checkpoints.glob("step*")) == ["step0000002"]
    launch(recipe, 2, "--resume")
    assert_same_run(out, full)


@pytest.mark.parametrize("engine", ["deepspeed", "megatron"])
def test_resuming_another_run_is_refused_before_any_step(engine, workspace, tmp_path):
    """A checkpoint after step 2, then --resume with another model (other weights of the same shapes):
    the engine refuses before any step, naming it. Another RaSA config, data set or global batch are
    refused by the same check (``run_identity`` of the changed recipe against the checkpoint's
    ``run.json``, what both engines call), here in this process, each naming what differs."""
    import torch
    from transformers import AutoModelForCausalLM

    from rasa_megatron.training.data import load_tokenizer, prepare_training_data
    from rasa_megatron.training.identity import check_resume_identity, run_identity
    from rasa_megatron.training.recipe import load_recipe

    out = tmp_path / "run"
    launch(engine_recipe(engine, workspace, out), 2, "--stop-after", "2")
    other_model = tmp_path / "other_llama"
    model = AutoModelForCausalLM.from_pretrained(engine_model(engine, workspace))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.01)
    model.save_pretrained(other_model)
    proc = launch(engine_recipe(engine, workspace, out, model={"path": str(other_model)}), 2, "--resume", check=False)
    assert proc.returncode != 0 and "model (config and weight files, sha256)" in proc.stdout + proc.stderr, \
        (proc.stdout + proc.stderr)[-2000:]
    assert steps_logged(out) == [1, 2]
    other_data = tmp_path / "other.jsonl"
    other_data.write_text("".join(line.replace("The answer", "So the answer") + "\n"
                                  for line in (workspace / "sft.jsonl").read_text().splitlines()))
    cases = {"adapter": ({"adapter": {"r": 8}}, "adapter.r 4 -> 8"),
             "data": ({"data": {"paths": [str(other_data)]}}, "tokenised data (sha256)"),
             "batch": ({"train": {"global_batch_size": 16}}, "train.global_batch_size 8 -> 16")}
    checkpoint = out / "checkpoints" / "step0000002"
    for name, (change, message) in cases.items():
        recipe = load_recipe(engine_recipe(engine, workspace, tmp_path / name, **change))
        data = prepare_training_data(recipe, load_tokenizer(recipe))
        with pytest.raises(SystemExit, match=re.escape(message)):
            check_resume_identity(checkpoint, run_identity(recipe, data.sha256))
    same = load_recipe(engine_recipe(engine, workspace, tmp_path / "same"))
    check_resume_identity(checkpoint, run_identity(same, prepare_training_data(same, load_tokenizer(same)).sha256))
