"""Recipes, dry runs, memory estimates, bad configs and SLURM templates (no training here)."""
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rasa_megatron.cli.train import dry_run_report
from rasa_megatron.training.dry_run import build_meta_model, count_model_params
from rasa_megatron.training.recipe import RecipeError, load_recipe, validate_recipe

ROOT = Path(__file__).resolve().parents[3]
CONFIGS = ROOT / "examples" / "configs"
RECIPES = ("llama3_70b_rasa", "mixtral_8x7b_rasa", "llama3_8b_rasa")


@pytest.mark.parametrize("name", RECIPES)
def test_shipped_recipes_follow_the_paper_and_dry_run(name):
    recipe = load_recipe(CONFIGS / f"{name}.yaml")
    t = recipe.train
    assert (t.global_batch_size, t.lr, list(t.betas), t.weight_decay, t.warmup_ratio, t.epochs, t.optimizer,
            t.precision) == (192, 5e-4, [0.9, 0.95], 0.0, 0.1, 8, "lion", "bf16")
    assert validate_recipe(recipe, world_size=64, require_data=False) == 3
    report = dry_run_report(recipe)
    model = build_meta_model(recipe)
    counts = count_model_params(model)
    config = json.loads((CONFIGS / "models" / f"{name.removesuffix('_rasa')}.json").read_text())
    L, r, k = config["num_hidden_layers"], recipe.adapter.r, recipe.adapter.k
    assert f"effective rank self_attn.q_proj: {r - k + L * k}" in report
    assert f"total {counts.total:,}" in report and "| ZeRO-3 |" in report
    # trainable = RaSA = LoRA-r budget + diagonals: sum over module types of L * (r (a + b) + r - k + L k)
    h, kv = config["hidden_size"], config["num_key_value_heads"] * (config["hidden_size"] // config["num_attention_heads"])
    inter = config["intermediate_size"]
    shapes = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
              "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    want = sum(L * (r * (a + b) + r - k + L * k) for name_, (a, b) in shapes.items()
               if name_ in recipe.adapter.target_modules)
    # stacked expert weights: the same per expert (E of them per layer)
    experts = config.get("num_local_experts", 0)
    expert_shapes = {"mlp.experts.gate_up_proj": (h, 2 * inter), "mlp.experts.down_proj": (inter, h)}
    assert sorted(recipe.adapter.target_parameters) == (sorted(expert_shapes) if experts else [])
    want += sum(L * experts * (r * (a + b) + r - k + L * k) for (a, b) in expert_shapes.values()) if experts else 0
    for path in recipe.adapter.target_parameters:
        assert f"effective rank {path}: {r - k + L * k}" in report
    assert counts.trainable == want


def test_llama70b_parameter_count_matches_the_published_size():
    counts = count_model_params(build_meta_model(load_recipe(CONFIGS / "llama3_70b_rasa.yaml")))
    assert 70.5e9 < counts.total - counts.trainable < 70.6e9  # Llama-3.1-70B: 70.55B parameters


def _write(tmp_path, data, name="r.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def _good(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n')
    return {"deepspeed": str(CONFIGS / "ds_zero3.json"), "model": {"config": str(CONFIGS / "models" / "llama3_8b.json"),
                                                                   "tokenizer": str(tmp_path)},
            "data": {"paths": [str(data)]}, "train": {"global_batch_size": 8, "micro_batch_size": 2}}


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d["train"].update(learning_rate=1e-4), "unknown key(s) ['train.learning_rate']"),
    (lambda d: d.update(optimiser="lion"), "unknown top-level key(s) ['optimiser']"),
    (lambda d: d["train"].update(global_batch_size=10), "global_batch_size=10 is not divisible by micro_batch_size x world_size = 2 x 2 = 4"),
    (lambda d: d["data"].update(paths=["/nonexistent/train.jsonl"]), "data path(s) not found: ['/nonexistent/train.jsonl']"),
    (lambda d: d.update(adapter={"method": "dora"}), "adapter.method='dora'"),
    (lambda d: d.update(adapter={"r": 4, "k": 5}), "0 <= k <= r=4, got k=5"),
    (lambda d: d["model"].update(path="/nonexistent/model"), "model.path '/nonexistent/model' does not exist"),
    (lambda d: d.update(output={"keep_last": 0}), "output.keep_last must be a positive integer or null, got 0"),
    (lambda d: d.update(output={"stop_signals": ["SIGFOO"]}), "output.stop_signals: 'SIGFOO' is not a signal"),
])
def test_bad_config_exits_2_before_any_work(tmp_path, mutate, message):
    data = _good(tmp_path)
    mutate(data)
    path = _write(tmp_path, data)
    out = tmp_path / "out"
    env = {**os.environ, "WORLD_SIZE": "2"}
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "pretrain_rasa.py"), "--config", str(path),
                           "--set", f"output.dir={out}"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr, proc.stderr
    assert not out.exists()


def test_recipe_overrides_and_good_recipe_validate(tmp_path):
    path = _write(tmp_path, _good(tmp_path))
    recipe = load_recipe(path, ["train.lr=3e-4", "adapter.k=2", "data.seq_len=128"])
    assert (recipe.train.lr, recipe.adapter.k, recipe.data.seq_len) == (3e-4, 2, 128)
    assert validate_recipe(recipe, world_size=2) == 2
    with pytest.raises(RecipeError, match="must look like section.key=value"):
        load_recipe(path, ["train.lr"])


FAKE_SCONTROL = r'''#!/usr/bin/env python3
import os, re, sys
if sys.argv[1] == "requeue":  # stands in for SLURM's requeue: record it
    open(os.environ["REQUEUED"], "a").write(" ".join(sys.argv[1:]) + "\n"); sys.exit(0)
assert sys.argv[1:3] == ["show", "hostnames"], sys.argv
for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?", sys.argv[3]):
    m = re.fullmatch(r"(.*)\[(.*)\]", part)
    if not m:
        print(part); continue
    for rng in m.group(2).split(","):
        lo, _, hi = rng.partition("-")
        for i in range(int(lo), int(hi or lo) + 1):
            print(f"{m.group(1)}{i:0{len(lo)}d}")
'''


@pytest.mark.parametrize("template,config", [("llama3_70b_rasa.sbatch", "llama3_70b_rasa.yaml"),
                                             ("mixtral_8x7b_rasa.sbatch", "mixtral_8x7b_rasa.yaml"),
                                             ("torchrun_srun.sbatch", "llama3_70b_rasa.yaml"),
                                             ("llama3_70b_rasa_megatron.sbatch", "llama3_70b_rasa_megatron.yaml"),
                                             ("mixtral_8x7b_rasa_megatron.sbatch", "mixtral_8x7b_rasa_megatron.yaml")])
def test_slurm_templates_render_hostfile_and_command(tmp_path, template, config):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "scontrol").write_text(FAKE_SCONTROL)  # stands in for SLURM's hostlist expansion
    (bindir / "scontrol").chmod(0o755 | stat.S_IXUSR)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu[001-004],gpu[010-013]",
           "SLURM_JOB_NUM_NODES": "8", "SLURM_JOB_ID": "4242", "SLURM_SUBMIT_DIR": str(ROOT),
           "RUN_DIR": str(tmp_path / "run"), "DRY_RUN": "1"}
    proc = subprocess.run(["bash", str(ROOT / "examples" / "slurm" / template), "--set", "train.lr=1e-4"],
                          capture_output=True, text=True, env=env, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    hosts = [f"gpu{i:03d}" for i in (1, 2, 3, 4, 10, 11, 12, 13)]
    assert (tmp_path / "run" / "hostfile").read_text().splitlines() == [f"{h} slots=8" for h in hosts]
    command = proc.stdout.strip().splitlines()[-1]
    port = str(20000 + 4242 % 20000)
    if template.startswith("torchrun"):
        assert command.startswith("srun --kill-on-bad-exit=1 torchrun --nnodes 8 --nproc_per_node 8")
        assert f"--rdzv_endpoint gpu001:{port}" in command
    else:
        assert command.startswith(f"deepspeed --num_nodes 8 --num_gpus 8 --hostfile {tmp_path / 'run' / 'hostfile'}")
        assert f"--master_addr gpu001 --master_port {port}" in command
    assert command.endswith(f"examples/pretrain_rasa.py --config examples/configs/{config} --resume auto "
                            f"--control-dir {tmp_path / 'run'} --set train.lr=1e-4")


def test_slurm_template_refuses_inconsistent_allocation(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "scontrol").write_text(FAKE_SCONTROL)
    (bindir / "scontrol").chmod(0o755)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu[001-004]",
           "SLURM_JOB_NUM_NODES": "8", "RUN_DIR": str(tmp_path / "run"), "DRY_RUN": "1"}
    proc = subprocess.run(["bash", str(ROOT / "examples" / "slurm" / "llama3_70b_rasa.sbatch")], capture_output=True,
                          text=True, env=env, timeout=60, cwd=ROOT)
    assert proc.returncode == 2 and "expands to 4 hosts but SLURM_JOB_NUM_NODES=8" in proc.stderr


def test_megatron_recipe_layout_is_validated():
    recipe = load_recipe(CONFIGS / "llama3_70b_rasa_megatron.yaml")
    assert recipe.engine == "megatron" and recipe.megatron.tensor_model_parallel_size == 8
    assert validate_recipe(recipe, world_size=64, require_data=False) == 192 // (1 * 4)  # DP 4: 48 micro-batches
    with pytest.raises(RecipeError, match=r"world size 60 is not divisible by tensor x pipeline parallel = 8 x 2"):
        validate_recipe(recipe, world_size=60, require_data=False)
    recipe.megatron.pipeline_model_parallel_size = 3
    with pytest.raises(RecipeError, match=r"num_hidden_layers = 80 is not divisible by pipeline-parallel size = 3"):
        validate_recipe(recipe, world_size=48, require_data=False)
    recipe.megatron.pipeline_model_parallel_size, recipe.megatron.expert_model_parallel_size = 2, 2
    with pytest.raises(RecipeError, match=r"expert_model_parallel_size = 2 needs a MoE model"):
        validate_recipe(recipe, world_size=64, require_data=False)
    recipe.megatron.expert_model_parallel_size = 1
    recipe.megatron.use_distributed_optimizer = True  # Megatron's distributed optimizer is Adam(W)/SGD only
    with pytest.raises(RecipeError, match=r"use_distributed_optimizer: true needs train.optimizer: adamw.*'lion'"):
        validate_recipe(recipe, world_size=64, require_data=False)
    recipe.train.optimizer = "adamw"
    assert validate_recipe(recipe, world_size=64, require_data=False) == 192 // (1 * 4)
    recipe.megatron.use_distributed_optimizer = "yes"
    with pytest.raises(RecipeError, match=r"megatron.use_distributed_optimizer must be true or false, got 'yes'"):
        validate_recipe(recipe, world_size=64, require_data=False)


def test_torch_dist_save_format_and_pretrained_checkpoint_are_validated(tmp_path):
    """output.save_format and megatron.pretrained_checkpoint: bad values are refused, naming them and what
    would be valid."""
    recipe = load_recipe(CONFIGS / "llama3_70b_rasa_megatron.yaml")
    recipe.train.optimizer = "adamw"
    recipe.output.save_format = "torch_dist"
    assert validate_recipe(recipe, world_size=64, require_data=False) == 192 // 4
    recipe.megatron.use_distributed_optimizer = True  # Megatron's fully reshardable optimizer checkpoint
    assert validate_recipe(recipe, world_size=64, require_data=False) == 192 // 4
    recipe.megatron.use_distributed_optimizer = False
    recipe.output.save_format = "distcp"
    with pytest.raises(RecipeError, match=r"output.save_format='distcp'; valid: \['native', 'torch_dist'\]"):
        validate_recipe(recipe, world_size=64, require_data=False)
    recipe.output.save_format = "native"
    # a Megatron-LM save root: the iteration its tracker names now (a resume names the same checkpoint)
    (tmp_path / "root" / "iter_0000500").mkdir(parents=True)
    (tmp_path / "root" / "iter_0000500" / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    (tmp_path / "root" / "latest_checkpointed_iteration.txt").write_text("500\n")
    recipe.megatron.pretrained_checkpoint = str(tmp_path / "root")
    validate_recipe(recipe, world_size=64, require_data=False)
    assert recipe.megatron.pretrained_checkpoint == str(tmp_path / "root" / "iter_0000500")
    (tmp_path / "root" / "latest_checkpointed_iteration.txt").write_text("soon")
    recipe.megatron.pretrained_checkpoint = str(tmp_path / "root")
    with pytest.raises(RecipeError, match=r"latest_checkpointed_iteration.txt holds 'soon'"):
        validate_recipe(recipe, world_size=64, require_data=False)
    recipe.megatron.pretrained_checkpoint = str(tmp_path)
    with pytest.raises(RecipeError, match=r"pretrained_checkpoint .* is not a Megatron distributed checkpoint"):
        validate_recipe(recipe, world_size=64, require_data=False)
    deepspeed = load_recipe(CONFIGS / "llama3_8b_rasa.yaml")
    deepspeed.output.save_format = "torch_dist"
    with pytest.raises(RecipeError, match=r"save_format: torch_dist is the Megatron engine's"):
        validate_recipe(deepspeed, world_size=8, require_data=False)
    deepspeed.output.save_format, deepspeed.megatron.pretrained_checkpoint = "native", str(tmp_path)
    with pytest.raises(RecipeError, match=r"megatron.pretrained_checkpoint is read by engine: megatron"):
        validate_recipe(deepspeed, world_size=8, require_data=False)


def test_megatron_moe_layout_is_validated():
    mixtral = load_recipe(CONFIGS / "mixtral_8x7b_rasa_megatron.yaml")
    assert mixtral.engine == "megatron" and mixtral.megatron.expert_model_parallel_size == 8
    assert validate_recipe(mixtral, world_size=64, require_data=False) == 192 // 64
    mixtral.megatron.expert_model_parallel_size = 3
    with pytest.raises(RecipeError, match=r"data-parallel size 64 .* not divisible by "
                                          r"megatron.expert_model_parallel_size = 3"):
        validate_recipe(mixtral, world_size=64, require_data=False)
    with pytest.raises(RecipeError, match=r"num_local_experts = 8 is not divisible by "
                                          r"megatron.expert_model_parallel_size = 3"):
        validate_recipe(mixtral, world_size=48, require_data=False)
    mixtral.megatron.expert_model_parallel_size, mixtral.megatron.tensor_model_parallel_size = 8, 2
    with pytest.raises(RecipeError, match=r"tensor_model_parallel_size = 2 needs megatron.sequence_parallel: true"):
        validate_recipe(mixtral, world_size=64, require_data=False)
    mixtral.megatron.sequence_parallel = True
    assert validate_recipe(mixtral, world_size=64, require_data=False) == 192 // 32


STOPPABLE_RUN = r"""
import json, os, pathlib, sys, time
run = pathlib.Path(os.environ["RUN_DIR"])
(run / "started").touch()
while not (run / "STOP").exists():  # what every training rank checks after its optimizer step
    time.sleep(0.05)
(run / "preempted.json").write_text(json.dumps({"step": 3, "reason": "stop file"}))
sys.exit(99)
"""


def test_slurm_templates_turn_the_time_limit_signal_into_a_checkpoint_and_a_requeue(tmp_path):
    """The templates' run_with_requeue: USR1 to the batch shell (SLURM's --signal=B:USR1@120) becomes the
    STOP file the training ranks poll; once the run has stopped and written preempted.json, the job is
    requeued (scontrol requeue <job id>) and the script exits 0. The training command here is a stand-in
    that honours the stop file as the ranks do (the engines' own stop handling is tested in
    tests/distributed/test_fault_tolerance.py)."""
    import signal
    import time

    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "scontrol").write_text(FAKE_SCONTROL)
    (bindir / "scontrol").chmod(0o755)
    run = tmp_path / "run"
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu[001-002]",
           "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_ID": "77", "RUN_DIR": str(run), "REQUEUED": str(tmp_path / "requeued")}
    script = f"source {ROOT / 'examples' / 'slurm' / '_common.sh'}; run_with_requeue {sys.executable} -c '{STOPPABLE_RUN}'"
    shell = subprocess.Popen(["bash", "-c", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (run / "started").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    shell.send_signal(signal.SIGUSR1)
    out, err = shell.communicate(timeout=60)
    assert shell.returncode == 0, err
    assert (tmp_path / "requeued").read_text() == "requeue 77\n" and "requeueing job 77" in out
    assert (run / "STOP").exists()
