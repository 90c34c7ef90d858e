"""The DeepSpeed engine: ZeRO-2/3 training of a tiny Llama with RaSA on 2 CPU processes (gloo) against
a single-process plain-PyTorch reference; resume; pool gather counts; checkpoint export.

Tolerances (fp32 throughout): losses within rel 1e-5. Adapters within abs 1e-5, except that with
Lion (update = lr * sign(c)) an element whose c is ~1e-9 may take the other sign in the sharded run
(different reduction order): we allow at most 0.5% of the elements to differ, each by at most
2 x the peak lr. With AdamW every element must agree within 1e-5.
"""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from engine_helpers import (ROOT, assert_adapters_close, launch, make_recipe, read_losses, read_metric,  # noqa: E402
                            tiny_checkpoint)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def zero3_run(workspace, tmp_path_factory):
    out = tmp_path_factory.mktemp("z3") / "run"
    recipe = make_recipe(workspace, out)
    launch(recipe, 2)
    return recipe, out


def test_zero3_two_processes_match_single_process_reference(zero3_run):
    from reference import reference_run

    from rasa_megatron.training.recipe import load_recipe

    recipe_path, out = zero3_run
    recipe = load_recipe(recipe_path)
    ref_losses, ref_adapter, ref_norms = reference_run(recipe, recipe.train.max_steps)
    np.testing.assert_allclose(read_losses(out), ref_losses, rtol=1e-5)
    np.testing.assert_allclose(read_metric(out, "grad_norm"), ref_norms, rtol=1e-5)  # fp32 gradient communication
    saved = load_file(out / "adapter" / "rasa_adapter.safetensors")
    assert_adapters_close(saved, ref_adapter, "lion", recipe.train.lr)
    # the PEFT export written under ZeRO-3 holds [A_i; A_S] and [B_i | B_S] * D_i of the same values
    peft = load_file(out / "peft_adapter" / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"
    want = torch.cat([ref_adapter["model.layers.1.self_attn.q_proj.A_private"],
                      ref_adapter["rasa_pools.self_attn.q_proj.A_shared"]])
    assert peft[key].shape == want.shape
    assert (peft[key] - want).abs().max() <= 2 * recipe.train.lr + 1e-6


def test_zero2_adamw_via_deepspeed_launcher_matches_reference(workspace, tmp_path):
    from reference import reference_run

    from rasa_megatron.training.recipe import load_recipe

    out = tmp_path / "run"
    recipe_path = make_recipe(workspace, out, "ds_zero2.json", train={"optimizer": "adamw", "max_steps": 3})
    launch(recipe_path, 2, launcher="deepspeed")
    recipe = load_recipe(recipe_path)
    ref_losses, ref_adapter, ref_norms = reference_run(recipe, 3)
    np.testing.assert_allclose(read_losses(out), ref_losses, rtol=1e-5)
    np.testing.assert_allclose(read_metric(out, "grad_norm"), ref_norms, rtol=1e-5)
    assert_adapters_close(load_file(out / "adapter" / "rasa_adapter.safetensors"), ref_adapter, "adamw", recipe.train.lr)


def test_zero3_tiny_mixtral_experts_match_reference(workspace, tmp_path):
    """RaSA on attention and on the fused expert weights of a tiny Mixtral (4 experts, top-2) under
    ZeRO-3 with the sparse-MoE block as a leaf module, 2 processes vs the single-process reference;
    the PEFT export written under ZeRO-3 reproduces the reference adapter's logits in real PEFT."""
    from peft import PeftModel
    from reference import reference_run
    from transformers import AutoModelForCausalLM

    from rasa_megatron import load_adapter
    from rasa_megatron.training.recipe import load_recipe

    out = tmp_path / "run"
    experts = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    recipe_path = make_recipe(workspace, out, model={"path": tiny_checkpoint(workspace, "tiny_mixtral")},
                          adapter={"target_modules": ["q_proj", "v_proj"], "target_parameters": experts},
                          train={"max_steps": 3})
    proc = launch(recipe_path, 2)
    assert "ZeRO-3 leaf modules: MixtralSparseMoeBlock" in proc.stdout + proc.stderr
    recipe = load_recipe(recipe_path)
    ref_losses, ref_adapter, ref_norms = reference_run(recipe, 3)
    np.testing.assert_allclose(read_losses(out), ref_losses, rtol=1e-5)
    np.testing.assert_allclose(read_metric(out, "grad_norm"), ref_norms, rtol=1e-5)  # fp32 gradient communication
    saved = load_file(out / "adapter" / "rasa_adapter.safetensors")
    assert saved["rasa_pools.mlp.experts.down_proj.A_shared"].shape == (4, 2, 48)
    assert_adapters_close(saved, ref_adapter, "lion", recipe.train.lr)
    assert saved["model.layers.1.mlp.experts.gate_up_proj.B_private"].abs().max() > 0
    tokens = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = load_adapter(AutoModelForCausalLM.from_pretrained(recipe.model.path), out / "adapter").eval()(tokens).logits
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(recipe.model.path),
                                               out / "peft_adapter").eval()
        torch.testing.assert_close(peft_model(tokens).logits, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ds_config", ["ds_zero2.json", "ds_zero3.json"], ids=["zero2", "zero3"])
def test_resume_reproduces_uninterrupted_run(workspace, tmp_path, ds_config):
    """Interrupt after step 2 of 4 and resume: steps 3-4 match the uninterrupted run (dropout on,
    so RNG restore matters); rel 1e-6 on the losses, and the final adapters are equal. Then a kill
    after the final checkpoint but before the exports (complete.json, adapter/ and peft_adapter/ gone):
    the resume makes no step and writes the same adapter. Under ZeRO-2 DeepSpeed maps parameters to
    their optimizer-state fragments only at the first step(), so a resume without a step crashed there."""
    import shutil

    extra = {"adapter": {"dropout": 0.1}, "train": {"max_steps": 4}}
    full = tmp_path / "full"
    launch(make_recipe(workspace, full, ds_config, **extra), 2)
    part = tmp_path / "part"
    recipe = make_recipe(workspace, part, ds_config, **extra)
    launch(recipe, 2, "--stop-after", "2")
    assert len(read_losses(part)) == 2
    launch(recipe, 2, "--resume")
    np.testing.assert_allclose(read_losses(part), read_losses(full), rtol=1e-6)
    a = load_file(full / "adapter" / "rasa_adapter.safetensors")
    b = load_file(part / "adapter" / "rasa_adapter.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    (part / "complete.json").unlink()
    shutil.rmtree(part / "adapter")
    shutil.rmtree(part / "peft_adapter")
    launch(recipe, 2, "--resume")
    assert (part / "complete.json").is_file() and len(read_losses(part)) == 4
    c = load_file(part / "adapter" / "rasa_adapter.safetensors")
    assert max((a[k] - c[k]).abs().max().item() for k in a) <= 1e-6


def test_portable_resume_on_a_different_world_size(zero3_run, workspace, tmp_path):
    """Interrupt a 2-process run after step 2, resume it on 1 process from the portable adapter +
    optimizer state: steps 3-4 match the uninterrupted 2-process run (rel 1e-5)."""
    _, full = zero3_run
    part = tmp_path / "part"
    recipe = make_recipe(workspace, part)
    launch(recipe, 2, "--stop-after", "2")
    assert (part / "checkpoints" / "step0000002" / "portable" / "portable_state.safetensors").is_file()
    launch(recipe, 1, "--resume", "--portable")
    np.testing.assert_allclose(read_losses(part), read_losses(full), rtol=1e-5)
    import csv

    with open(part / "metrics.csv", newline="") as a, open(full / "metrics.csv", newline="") as b:
        assert [r["lr"] for r in csv.DictReader(a)] == [r["lr"] for r in csv.DictReader(b)]


def test_pool_is_gathered_once_per_step_not_per_layer(workspace, tmp_path):
    """With persistence off for everything else and no reuse window (every other parameter is
    gathered at each use), each pool is all-gathered once per optimizer step; registered only as
    an external parameter of its layers it would be gathered at every layer's use."""
    ds = json.loads((ROOT / "examples" / "configs" / "ds_zero3.json").read_text())
    ds["zero_optimization"].update(stage3_param_persistence_threshold=0, stage3_max_reuse_distance=0,
                                   stage3_prefetch_bucket_size=0)
    ds_path = tmp_path / "ds_strict.json"
    ds_path.write_text(json.dumps(ds))
    counts = {}
    for mode in ("resident", "registered"):
        out = tmp_path / mode
        recipe = make_recipe(workspace, out, str(ds_path), train={"global_batch_size": 8, "micro_batch_size": 2})
        result = tmp_path / f"{mode}.json"
        import os
        import subprocess

        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        proc = subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2",
                               str(Path(__file__).parent / "gather_count_worker.py"), str(recipe), str(result), mode],
                              capture_output=True, text=True, timeout=600, env=env)
        assert proc.returncode == 0, proc.stderr[-6000:]
        counts[mode] = json.loads(result.read_text())
    resident, registered = counts["resident"], counts["registered"]
    steps, layers = resident["steps"], resident["num_layers"]
    assert len(resident["pool"]) == 14  # A_shared and B_shared of 7 module types
    assert set(resident["pool"].values()) == {steps}, resident["pool"]
    assert min(registered["pool"].values()) >= 2 * layers * steps, registered["pool"]
    # base weights are gathered at every use in both modes (forward, recompute, backward)
    assert min(resident["base"].values()) >= steps


def test_a_training_step_reads_the_device_once(workspace, tmp_path):
    """The DeepSpeed step sums the micro-batch losses on the engine's device, all-reduces that tensor
    (an NCCL collective takes device tensors only; a CPU tensor raises at the first step) and reads it
    back together with the gradient norm: one device-to-host read per optimizer step from
    rasa_megatron's own code (counted over 2 steps of 2 micro-batches on each of 2 processes)."""
    import os
    import subprocess

    out = tmp_path / "run"
    recipe = make_recipe(workspace, out)
    result = tmp_path / "reads.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2",
                           str(Path(__file__).parent / "host_sync_worker.py"), str(recipe), str(result)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-6000:]
    reads = json.loads(result.read_text())
    assert reads["reads"] == reads["steps"], reads["where"]
    assert reads["where"] == ["engine.py:train_step:tolist"]


def test_zero_checkpoint_export_cli(zero3_run, tmp_path):
    """tools/zero_checkpoint_export.py: adapter from the ZeRO-3 shards == the adapter saved live;
    the merged model's logits == base + RaSA adapter's logits (fp32, 1e-5)."""
    import subprocess

    from transformers import AutoModelForCausalLM

    from rasa_megatron import load_adapter

    _, out = zero3_run
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "zero_checkpoint_export.py"), str(out / "checkpoints"),
                           "--adapter", str(tmp_path / "adapter"), "--merged", str(tmp_path / "merged")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    live = load_file(out / "adapter" / "rasa_adapter.safetensors")
    offline = load_file(tmp_path / "adapter" / "rasa_adapter.safetensors")
    assert set(live) == set(offline)
    assert all(torch.equal(live[k], offline[k]) for k in live)
    recipe = json.loads((out / "checkpoints" / "step0000004" / "recipe.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(recipe["model"]["path"], dtype=torch.float32)
    adapted = load_adapter(base, out / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted(ids).logits, atol=1e-5, rtol=0)


def test_zero_checkpoint_export_refuses_non_checkpoint(tmp_path):
    import subprocess

    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "zero_checkpoint_export.py"), str(tmp_path),
                           "--adapter", str(tmp_path / "a")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "neither a DeepSpeed checkpoint root" in proc.stderr
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("optimizer", ["adamw", "lion"], ids=["cpu_adam", "cpu_lion"])
def test_portable_resume_with_deepspeeds_cpu_optimizers(workspace, tmp_path, optimizer):
    """Optimizer offload (ds_zero3_offload_optimizer.json): DeepSpeed's own CPU optimizers (DeepSpeedCPUAdam,
    DeepSpeedCPULion, JIT-built) step the offloaded fp32 masters; they create ``state['step']`` only for an
    empty state, so the portable loader must create complete states. A 2-process run stopped after step 2
    of 3 and resumed --portable on 1 process equals the uninterrupted 2-process run (losses rel 1e-5,
    adapter 1e-5 with AdamW, Lion's sign flips bounded as in the other Lion tests)."""
    extra = {"train": {"optimizer": optimizer, "max_steps": 3}}
    full = tmp_path / "full"
    launch(make_recipe(workspace, full, "ds_zero3_offload_optimizer.json", **extra), 2)
    part = tmp_path / "part"
    recipe = make_recipe(workspace, part, "ds_zero3_offload_optimizer.json", **extra)
    launch(recipe, 2, "--stop-after", "2")
    launch(recipe, 1, "--resume", "--portable")
    np.testing.assert_allclose(read_losses(part), read_losses(full), rtol=1e-5)
    assert_adapters_close(load_file(part / "adapter" / "rasa_adapter.safetensors"),
                          load_file(full / "adapter" / "rasa_adapter.safetensors"), optimizer, 2e-3)


@pytest.mark.parametrize("ds_config", ["ds_zero2.json", "ds_zero3.json"], ids=["zero2", "zero3"])
def test_bf16_tracks_the_fp32_reference(workspace, tmp_path, ds_config):
    """precision: bf16 (the shipped recipes' setting) under ZeRO-2 and ZeRO-3 on 2 processes, AdamW, 3
    steps: bf16 base weights and activations, fp32 adapter (so the pool's gradient, a sum over the
    layers, is not accumulated in bf16) and fp32 gradient communication; the losses and gradient norms
    stay within bf16 distance of the fp32 single-process reference, and the saved adapter is fp32."""
    from reference import reference_run

    from rasa_megatron.training.recipe import load_recipe

    out = tmp_path / "run"
    recipe_path = make_recipe(workspace, out, ds_config, train={"optimizer": "adamw", "max_steps": 3, "precision": "bf16"})
    launch(recipe_path, 2)
    recipe = load_recipe(recipe_path)
    recipe.train.precision = "fp32"
    ref_losses, _, ref_norms = reference_run(recipe, 3)
    np.testing.assert_allclose(read_losses(out), ref_losses, rtol=1e-4)  # measured 3e-6 (ZeRO-2), 6e-6 (ZeRO-3)
    # measured 5.4e-3 (ZeRO-2: DeepSpeed casts every parameter of a non-zero.Init model to bf16) and 1.6e-3
    # (ZeRO-3: the adapter stays fp32); a bf16 adapter with bf16 gradient communication gave 2.0e-2
    np.testing.assert_allclose(read_metric(out, "grad_norm"), ref_norms, rtol=1e-2)
    adapter = load_file(out / "adapter" / "rasa_adapter.safetensors")
    assert all(t.dtype == torch.float32 for t in adapter.values())
