"""The Megatron engine (``engine: megatron`` in examples/pretrain_rasa.py) on 2-4 CPU processes (gloo)
against the same single-process plain-PyTorch reference as the DeepSpeed engine (tests/distributed/
reference.py): TP, PP x VPP, EP and MoE layouts, Megatron's distributed optimizer, bf16, resume.

Tolerances (fp32, AdamW): losses and gradient norms within rel 1e-5, adapters within abs 1e-5.
"""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from engine_helpers import (assert_adapters_close, launch, make_megatron_recipe, read_losses, read_metric,  # noqa: E402
                            tiny_checkpoint)

pytestmark = pytest.mark.slow


MOE_ADAPTER = {"target_modules": ["q_proj", "v_proj"],
               "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]}


DISTRIBUTED_OPTIMIZER = {"use_distributed_optimizer": True}


TP2 = {"tensor_model_parallel_size": 2}
PP2_VPP2 = {"pipeline_model_parallel_size": 2, "virtual_pipeline_model_parallel_size": 2}
EP2 = {"expert_model_parallel_size": 2}


@pytest.mark.parametrize("layout,model,adapter,nproc", [
    (TP2, "tiny_llama", {}, 2),
    (PP2_VPP2, "tiny_llama4", {}, 2),
    (EP2, "tiny_mixtral", MOE_ADAPTER, 2),
    ({"pipeline_model_parallel_size": 2}, "tiny_mixtral", MOE_ADAPTER, 2),
    ({"tensor_model_parallel_size": 2, "sequence_parallel": True}, "tiny_mixtral", MOE_ADAPTER, 2),
    ({"tensor_model_parallel_size": 2, **DISTRIBUTED_OPTIMIZER}, "tiny_llama", {}, 2),
    ({"pipeline_model_parallel_size": 2, **DISTRIBUTED_OPTIMIZER}, "tiny_llama4", {}, 4),
    ({"expert_model_parallel_size": 2, **DISTRIBUTED_OPTIMIZER}, "tiny_mixtral", MOE_ADAPTER, 2),
    ({"tensor_model_parallel_size": 2, "sequence_parallel": True, **DISTRIBUTED_OPTIMIZER}, "tiny_mixtral",
     MOE_ADAPTER, 2)],
    ids=["tp2", "pp2_vpp2", "ep2_dp2", "moe_pp2", "moe_tp2_sp", "tp2_distopt", "pp2_dp2_distopt", "ep2_dp2_distopt",
         "moe_tp2_sp_distopt"])
def test_megatron_engine_matches_single_process_reference(workspace, tmp_path, layout, model, adapter, nproc):
    """`examples/pretrain_rasa.py` with `engine: megatron` (Megatron's own pipeline schedule and DDP,
    CPU compatibility redirections only) on 2 processes vs the same single-process HF reference as the
    DeepSpeed runs: AdamW, 3 steps, losses rel 1e-5 and the saved adapter within 1e-5. ep2_dp2: tiny
    Mixtral, experts split over 2 expert-parallel ranks that are also 2 data-parallel ranks (different
    micro-batches): DDP averages the attention adapters over both and leaves each expert's adapters on
    its rank (``allreduce = False``). moe_pp2: the expert pools sharded over 2 pipeline stages;
    moe_tp2_sp: attention tensor-parallel with sequence parallelism, experts whole on each TP rank
    (expert TP 1). ``*_distopt``: Megatron's distributed optimizer (``get_megatron_optimizer``; its
    own global-norm clipping, engaged by max_grad_norm 0.05) instead of torch AdamW: pp2_dp2 on 4
    processes shards the AdamW states of each stage's adapters (pool slices included) over 2
    data-parallel ranks; ep2_dp2 chains a dense and an expert distributed optimizer."""
    from reference import reference_run

    from rasa_megatron.convert.megatron_checkpoint import adapter_from_megatron_checkpoint
    from rasa_megatron.training.recipe import load_recipe

    out = tmp_path / "run"
    train = {"optimizer": "adamw", "max_steps": 3, **({"max_grad_norm": 0.05} if layout.get("use_distributed_optimizer")
                                                      else {})}
    recipe_path = make_megatron_recipe(workspace, out, train=train, megatron=layout,
                                   model={"path": tiny_checkpoint(workspace, model)}, adapter=adapter)
    launch(recipe_path, nproc)
    recipe = load_recipe(recipe_path)
    assert recipe.engine == "megatron"
    ref_losses, ref_adapter, ref_norms = reference_run(recipe, 3)
    np.testing.assert_allclose(read_losses(out), ref_losses, rtol=1e-5)
    np.testing.assert_allclose(read_metric(out, "grad_norm"), ref_norms, rtol=1e-5)
    assert_adapters_close(load_file(out / "adapter" / "rasa_adapter.safetensors"), ref_adapter, "adamw", recipe.train.lr)
    assert (out / "peft_adapter" / "adapter_model.safetensors").is_file()
    # the final checkpoint, read offline in this process (no model, no torch.distributed), is the adapter
    # the run gathered and saved, bit for bit
    offline, _ = adapter_from_megatron_checkpoint(out / "checkpoints" / "step0000003")
    saved = load_file(out / "adapter" / "rasa_adapter.safetensors")
    assert sorted(offline) == sorted(saved), sorted(set(offline) ^ set(saved))[:4]
    assert all(torch.equal(offline[key], saved[key]) for key in saved)
    if layout in (TP2, PP2_VPP2, EP2):  # and converts offline: merged + PEFT logits equal the RaSA model's
        _convert_and_verify(out / "checkpoints", tiny_checkpoint(workspace, model), tmp_path / "hf")


def _convert_and_verify(checkpoint, base, out, **kwargs):
    """``megatron-to-hf`` of an engine checkpoint with --verify at fp32 tolerances (1e-5: the same fp32
    arithmetic in another order); returns the report."""
    from rasa_megatron.convert.hf_export import export_engine_checkpoint
    from rasa_megatron.convert.verify import Tolerance

    report = export_engine_checkpoint(checkpoint, base, merged=out / "merged", peft=out / "peft",
                                      adapter=out / "adapter", verify=True, progress=False,
                                      tolerance=Tolerance(max_kl=1e-8, min_top1=1.0, atol=1e-5), **kwargs)
    for name in ("merged", "peft"):
        assert report["verify"][name]["passed"] and report["verify"][name]["max_abs_diff"] < 1e-5, report["verify"]
    return report


def test_megatron_engine_with_dropout_and_recompute_draws_the_hf_models_masks(workspace, tmp_path):
    """One process, adapter dropout 0.1, activation recompute (Megatron's CheckpointFunction with the
    RNG tracker seeded; the frozen embedding's output made to require grad), micro-batch 1 (Megatron's
    [s, b, h] and HF's [b, s, h] then lay the masks out alike), each micro-batch padded to its own
    length: every adapter draws its mask in HF module order from the same generator state as the HF
    reference (reseeded after its init as the engine seeds its dropout streams), so losses and the
    adapter equal the reference (rel 1e-5 / abs 1e-5). Without recompute support or with one mask
    shared by q/k/v this fails."""
    from reference import reference_run

    from rasa_megatron.training.recipe import load_recipe

    out = tmp_path / "run"
    recipe_path = make_megatron_recipe(workspace, out, adapter={"dropout": 0.1},
                                       train={"optimizer": "adamw", "max_steps": 2, "micro_batch_size": 1,
                                              "gradient_checkpointing": True})
    launch(recipe_path, 1)
    recipe = load_recipe(recipe_path)
    ref_losses, ref_adapter, ref_norms = reference_run(recipe, 2, dropout_seed=recipe.train.seed)
    np.testing.assert_allclose(read_losses(out), ref_losses, rtol=1e-5)
    np.testing.assert_allclose(read_metric(out, "grad_norm"), ref_norms, rtol=1e-5)
    assert_adapters_close(load_file(out / "adapter" / "rasa_adapter.safetensors"), ref_adapter, "adamw",
                          recipe.train.lr)


@pytest.mark.parametrize("distributed_optimizer", [False, True], ids=["torch_adamw", "distopt"])
def test_megatron_engine_bf16_tracks_the_fp32_reference(workspace, tmp_path, distributed_optimizer):
    """precision: bf16 (the production recipes' setting) at TP2: bf16 base weights and
    activations, fp32 adapters, fp32 gradient buffers and optimizer (torch AdamW or Megatron's
    distributed optimizer): the run completes and its losses and gradient norms stay within bf16
    distance (rel 1e-4 / 1e-2) of the fp32 single-process reference; the saved adapter is fp32."""
    from reference import reference_run

    from rasa_megatron.training.recipe import load_recipe

    out = tmp_path / "run"
    recipe_path = make_megatron_recipe(workspace, out, train={"optimizer": "adamw", "max_steps": 3, "precision": "bf16"},
                                   megatron={"tensor_model_parallel_size": 2,
                                             "use_distributed_optimizer": distributed_optimizer},
                                   model={"path": tiny_checkpoint(workspace, "tiny_llama")})
    launch(recipe_path, 2)
    recipe = load_recipe(recipe_path)
    recipe.train.precision = "fp32"
    ref_losses, _, ref_norms = reference_run(recipe, 3)
    np.testing.assert_allclose(read_losses(out), ref_losses, rtol=1e-4)  # measured 5e-6: the loss is ~ln(vocab)
    np.testing.assert_allclose(read_metric(out, "grad_norm"), ref_norms, rtol=1e-2)  # measured 1.8e-3
    adapter = load_file(out / "adapter" / "rasa_adapter.safetensors")
    assert all(t.dtype == torch.float32 for t in adapter.values())


@pytest.mark.parametrize("distributed_optimizer,save_format", [(False, "native"), (True, "native"),
                                                                (False, "torch_dist"), (True, "torch_dist")],
                         ids=["torch_adamw", "distopt", "torch_dist", "torch_dist_distopt"])
def test_megatron_engine_resume_reproduces_uninterrupted_run(workspace, tmp_path, distributed_optimizer, save_format):
    """engine: megatron at PP2 (1F1B over 2 stages, pipeline-sharded pools): stop after step 2 of 4
    (checkpoint: per-rank adapter shards, optimizer, scheduler, RNG), resume with --resume: steps 3-4
    and the final adapter equal the uninterrupted run (adapter dropout on, so the RNG restore
    matters; rel 1e-6 / abs 1e-6). ``distopt``: the state saved is that of the torch AdamW inside
    Megatron's distributed optimizer. ``torch_dist``: the same through a Megatron distributed
    checkpoint on its own layout (every rank's RNG restored). A native checkpoint resumed on another
    layout is refused, naming the difference."""
    extra = {"adapter": {"dropout": 0.1}, "train": {"optimizer": "adamw", "max_steps": 4},
             "megatron": {"pipeline_model_parallel_size": 2, "use_distributed_optimizer": distributed_optimizer},
             "model": {"path": tiny_checkpoint(workspace, "tiny_llama4")}, "output": {"save_format": save_format}}

    full = tmp_path / "full"
    launch(make_megatron_recipe(workspace, full, **extra), 2)
    part = tmp_path / "part"
    recipe = make_megatron_recipe(workspace, part, **extra)
    launch(recipe, 2, "--stop-after", "2")
    assert len(read_losses(part)) == 2 and (part / "checkpoints" / "latest").read_text() == "step0000002"
    assert not (part / "adapter").exists()
    launch(recipe, 2, "--resume")
    np.testing.assert_allclose(read_losses(part), read_losses(full), rtol=1e-6)
    a = load_file(full / "adapter" / "rasa_adapter.safetensors")
    b = load_file(part / "adapter" / "rasa_adapter.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    if save_format == "torch_dist":
        assert (part / "checkpoints" / "step0000002" / "metadata.json").is_file()
        # a run with the other kind of optimizer cannot take the torch_dist checkpoint's optimizer state
        other = make_megatron_recipe(workspace, tmp_path / "other", **{**extra, "output": {"save_format": "native"},
                                                         "megatron": {**extra["megatron"],
                                                                      "use_distributed_optimizer": not distributed_optimizer}})
        proc = launch(other, 2, "--resume", str(part / "checkpoints" / "step0000002"), check=False)
        want = f"set megatron.use_distributed_optimizer: {str(distributed_optimizer).lower()}"
        assert proc.returncode != 0 and want in proc.stderr, proc.stderr[-2000:]
        return

    from rasa_megatron.megatron.checkpoint import check_resume_layout

    saved = json.loads((part / "checkpoints" / "step0000002" / "layout.json").read_text())
    assert saved["pipeline_model_parallel_size"] == 2 and saved["world_size"] == 2
    assert saved["use_distributed_optimizer"] is distributed_optimizer
    with pytest.raises(SystemExit, match=f"use_distributed_optimizer {distributed_optimizer} -> {not distributed_optimizer}"):
        check_resume_layout(saved, {**saved, "use_distributed_optimizer": not distributed_optimizer})
    with pytest.raises(SystemExit, match=r"pipeline_model_parallel_size 2 -> 1, tensor_model_parallel_size 1 -> 2"
                                         r"|tensor_model_parallel_size 1 -> 2, pipeline_model_parallel_size 2 -> 1"):
        check_resume_layout(saved, {**saved, "pipeline_model_parallel_size": 1, "tensor_model_parallel_size": 2})


@pytest.mark.parametrize("max_steps", [None, 3], ids=["epochs", "max_steps"])
def test_megatron_engine_refuses_a_data_set_smaller_than_one_global_batch(workspace, tmp_path, max_steps):
    """64 samples and a global batch of 128: the engine stops before any step with a message naming both
    numbers, non-zero, and writes no adapter (it used to save an untrained adapter and exit 0, or divide
    by zero with max_steps)."""
    out = tmp_path / "run"
    recipe = make_megatron_recipe(workspace, out, train={"global_batch_size": 128, "max_steps": max_steps})
    proc = launch(recipe, 1, check=False)
    assert proc.returncode != 0
    assert "64 training samples is fewer than one global batch (128)" in proc.stdout + proc.stderr
    assert not (out / "adapter").exists() and not (out / "metrics.csv").exists()


def test_a_tp2_pp2_checkpoint_converts_offline_and_every_bad_input_is_refused(workspace, tmp_path, monkeypatch,
                                                                               capsys):
    """A TP 2 x PP 2 run (4 processes) -> ``rasa-convert megatron-to-hf`` in this process: the adapter is
    the one the run saved, bit for bit; the merged model (sharded, index of the shards written, tokenizer
    copied) loads in transformers with no missing or unexpected keys and, like the PEFT adapter in real
    peft, gives the RaSA model's logits within 1e-5; the manifest re-verifies and a flipped byte fails
    ``check``; a dry run writes nothing; every bad input exits 2 naming it and writes nothing; a failure
    mid-write leaves neither output nor temporary directory; a failed --verify exits 1 and writes nothing."""
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    from rasa_megatron.cli.convert import main

    out = tmp_path / "run"
    base = tiny_checkpoint(workspace, "tiny_llama4")
    recipe_path = make_megatron_recipe(workspace, out, train={"optimizer": "adamw", "max_steps": 2},
                                       megatron={"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2},
                                       model={"path": base})
    launch(recipe_path, 4)
    checkpoint = out / "checkpoints"
    described = json.loads((checkpoint / "step0000002" / "checkpoint.json").read_text())
    assert described["layout"]["tensor_model_parallel_size"] == described["layout"]["pipeline_model_parallel_size"] == 2
    r, k = described["rasa_config"]["r"], described["rasa_config"]["k"]
    hf = tmp_path / "hf"
    targets = {name: hf / name for name in ("merged", "adapter", "peft")}
    flags = [f"--{name}={path}" for name, path in targets.items()]
    convert = ["megatron-to-hf", str(checkpoint), "--hf-config", base]
    assert main([*convert, *flags, "--dry-run", "--max-shard-size", "40KB"]) == 0
    assert not hf.exists()
    report = _convert_and_verify(checkpoint, base, hf, tokenizer=workspace / "tokenizer", max_shard_size=40_000)
    assert report["max_lora_rank"] == r - k + 4 * k  # L = 4
    saved = load_file(out / "adapter" / "rasa_adapter.safetensors")
    converted = load_file(targets["adapter"] / "rasa_adapter.safetensors")
    assert sorted(converted) == sorted(saved) and all(torch.equal(converted[k], saved[k]) for k in saved)
    index = json.loads((targets["merged"] / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert (targets["merged"] / "tokenizer_config.json").is_file()
    _, info = AutoModelForCausalLM.from_pretrained(targets["merged"], output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert main(["check", str(targets["merged"])]) == 0
    shard = sorted(targets["merged"].glob("model-*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert main(["check", str(targets["merged"])]) == 1

    def refused(args, message, code=2):
        before = sorted(p.name for p in tmp_path.iterdir())
        capsys.readouterr()
        assert main(args) == code
        assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, no temporary left
        assert message in capsys.readouterr().err

    fresh = [f"--merged={tmp_path / 'new'}"]
    refused([*convert, *flags], "exists; pass --overwrite")
    wider = tmp_path / "wider"
    AutoConfig.from_pretrained(base).__class__(**{**AutoConfig.from_pretrained(base).to_dict(),
                                                  "intermediate_size": 96}).save_pretrained(wider)
    refused(["megatron-to-hf", str(checkpoint), "--hf-config", str(wider), *fresh], "does not fit the model")
    mixtral = tmp_path / "mixtral"
    AutoConfig.from_pretrained(workspace / "tiny_mixtral.json").save_pretrained(mixtral)
    refused(["megatron-to-hf", str(checkpoint), "--hf-config", str(mixtral), *fresh], "does not fit the model")
    refused([*convert, *fresh, "--base", str(tmp_path / "nowhere")], "nowhere")
    damaged = tmp_path / "damaged"
    shutil.copytree(checkpoint / "step0000002", damaged)
    (damaged / "rank00003.safetensors").unlink()
    refused(["megatron-to-hf", str(damaged), "--hf-config", base, *fresh], "rank00003.safetensors")
    shutil.copytree(checkpoint / "step0000002", damaged, dirs_exist_ok=True)
    rank_file = damaged / "rank00001.safetensors"
    rank_file.write_bytes(rank_file.read_bytes()[:-64])
    refused(["megatron-to-hf", str(damaged), "--hf-config", base, *fresh], "rank00001.safetensors")
    refused([*convert, *fresh, "--verify", "--verify-kl", "-1"], "--verify failed", code=1)

    import safetensors.torch

    real_save = safetensors.torch.save_file
    calls = []

    def failing_save(tensors, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    refused([*convert, *fresh, "--max-shard-size", "40KB"], "No space left on device")
    assert len(calls) == 2



def _initial_adapter(workspace, tmp_path, extra: dict) -> dict:
    """The recipe's adapter init with seeded non-zero B (so every factor matters), saved to
    ``tmp_path / "adapter"``; returns its tensors."""
    from rasa_megatron import adapter_state_dict, save_adapter
    from rasa_megatron.training.model import build_hf_model
    from rasa_megatron.training.recipe import load_recipe

    model = build_hf_model(load_recipe(make_megatron_recipe(workspace, tmp_path / "init", **extra)))
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("B_private", "B_shared")):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    save_adapter(model, tmp_path / "adapter")
    return {key: value.detach().clone() for key, value in adapter_state_dict(model).items()}


def _check_resumed_run(out, recipe_path, initial: dict, base, tmp_path):
    """A 4-step run from ``initial``, stopped and resumed: losses and gradient norms equal the HF
    reference (rel 1e-5), the adapter within 1e-5, the final checkpoint read offline equal to it bit for
    bit with the same RaSA config, and the merge onto the run's pretrained_checkpoint base (read a layer
    at a time) equal bit for bit to the merge onto the HF weights it was converted from. Returns
    ``(offline checkpoint, the pretrained merge's report)``."""
    from reference import reference_run

    from rasa_megatron.convert.hf_export import export_engine_checkpoint, read_engine_checkpoint
    from rasa_megatron.training.recipe import load_recipe

    recipe = load_recipe(recipe_path)
    ref_losses, ref_adapter, ref_norms = reference_run(recipe, 4, initial_adapter=initial)
    np.testing.assert_allclose(read_losses(out), ref_losses, rtol=1e-5)
    np.testing.assert_allclose(read_metric(out, "grad_norm"), ref_norms, rtol=1e-5)
    saved = load_file(out / "adapter" / "rasa_adapter.safetensors")
    assert_adapters_close(saved, ref_adapter, "adamw", recipe.train.lr)
    offline = read_engine_checkpoint(out / "checkpoints")
    assert sorted(offline.tensors) == sorted(saved) and all(torch.equal(offline.tensors[k], saved[k]) for k in saved)
    assert offline.rasa_config.to_dict() == recipe.rasa_config().to_dict()
    report = export_engine_checkpoint(out / "checkpoints", base, merged=tmp_path / "m_pretrained", progress=False)
    export_engine_checkpoint(out / "checkpoints", base, merged=tmp_path / "m_hf", base=base, progress=False)
    a, b = (load_file(tmp_path / name / "model.safetensors") for name in ("m_pretrained", "m_hf"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    return offline, report


def test_hf_to_megatron_then_the_engine_trains_and_resumes_a_torch_dist_checkpoint_on_another_layout(workspace,
                                                                                                      tmp_path):
    """HF base + an adapter (the recipe's init with non-zero B) -> ``rasa-convert hf-to-megatron --tp 2
    --pp 2`` -> ``engine: megatron`` initialised from it (``megatron.pretrained_checkpoint``) at TP2 x PP2
    (4 processes) with ``output.save_format: torch_dist``, stopped after step 2 of 4, resumed at TP1 x PP1
    x DP2 (2 processes: adapter and AdamW states resharded from pipeline-sharded pools and TP shards to
    whole ones on two data-parallel ranks): all four losses and gradient norms equal the single-process
    HF reference started from that adapter (rel 1e-5), the final adapter within 1e-5 (fp32; the same
    arithmetic in another order), and the final torch_dist checkpoint converts offline to that adapter
    bit for bit. Without the optimizer-state reshard, step 3 would differ."""

    from rasa_megatron.cli.convert import main as convert

    base, dist_ckpt, out = tiny_checkpoint(workspace, "tiny_llama4"), tmp_path / "dist", tmp_path / "run"
    extra = {"train": {"optimizer": "adamw", "max_steps": 4}, "model": {"path": base},
             "output": {"save_format": "torch_dist"}}
    initial = _initial_adapter(workspace, tmp_path, extra)
    assert convert(["hf-to-megatron", str(base), str(dist_ckpt), "--tp", "2", "--pp", "2",
                    "--adapter", str(tmp_path / "adapter")]) == 0

    pretrained = {"pretrained_checkpoint": str(dist_ckpt)}
    first = make_megatron_recipe(workspace, out, megatron={"tensor_model_parallel_size": 2,
                                                           "pipeline_model_parallel_size": 2, **pretrained}, **extra)
    proc = launch(first, 4, "--stop-after", "2")
    assert "base weights and RaSA adapter" in proc.stderr
    step2 = out / "checkpoints" / "step0000002"
    assert (step2 / "metadata.json").is_file() and not list(step2.glob("*.pieces.json"))
    second = make_megatron_recipe(workspace, out, megatron=pretrained, **extra)
    proc = launch(second, 2, "--resume")
    assert "resharded" in proc.stderr

    offline, report = _check_resumed_run(out, first, initial, base, tmp_path)
    assert offline.description["checkpoint"].endswith("step0000004")
    assert f"base weights: the torch_dist checkpoint {dist_ckpt}" in "\n".join(report["plan"])
    # a padded vocabulary, or the checkpoint of another model, is refused before any step, naming it
    assert convert(["hf-to-megatron", str(base), str(tmp_path / "padded"), "--make-vocab-size-divisible-by",
                    "1000"]) == 0
    for checkpoint, message in ((tmp_path / "padded", "its vocabulary is padded to 50000 rows"),
                                (dist_ckpt, "cannot load the pretrained weights from")):
        other = tmp_path / f"refused_{checkpoint.name}"
        model = {"path": tiny_checkpoint(workspace, "tiny_llama" if checkpoint == dist_ckpt else "tiny_llama4")}
        proc = launch(make_megatron_recipe(workspace, other, megatron={"pretrained_checkpoint": str(checkpoint)},
                                           **{**extra, "model": model}), 1, check=False)
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-3000:]
        if checkpoint == dist_ckpt:
            assert "Global shape mismatch" in proc.stderr.split(message)[1].splitlines()[0]
        assert not (other / "metrics.csv").exists()


@pytest.mark.parametrize("distributed_optimizer", [False, True], ids=["torch_adamw", "distopt"])
def test_a_mixtral_expert_adapter_goes_hf_to_megatron_trains_at_ep2_and_resumes_on_another_layout(
        workspace, tmp_path, distributed_optimizer):
    """RaSA on attention and on every MoE expert (tiny Mixtral): HF base + an adapter with non-zero B ->
    ``rasa-convert hf-to-megatron --ep 2`` -> ``engine: megatron`` from it at EP2 (2 processes, each
    holding 2 of the 4 experts and their pools) with ``output.save_format: torch_dist``, stopped after
    step 2 of 4 -> resumed at PP2 x EP1 (every expert on both stages, the expert pools sharded over the
    stages; ``distopt``: TP2 + SP): losses and gradient norms equal the single-process HF reference from that adapter (rel
    1e-5), the final adapter within 1e-5, the final checkpoint read offline equals it bit for bit, and
    the merge onto the pretrained checkpoint's base equals the merge onto the HF base bit for bit.
    ``distopt``: Megatron's distributed optimizer (a dense and an expert one, chained; the dense AdamW
    states sharded over the 2 data-parallel ranks at EP2), its state saved in Megatron's fully
    reshardable format, with gradient clipping engaged (max_grad_norm 0.05), resumed at TP2 + SP
    instead (attention TP-split, every expert whole on both TP ranks: the expert adapters' entries are
    split over the expert TP group, not the dense one)."""

    from rasa_megatron.cli.convert import main as convert

    base, dist_ckpt, out = tiny_checkpoint(workspace, "tiny_mixtral"), tmp_path / "dist", tmp_path / "run"
    train = {"optimizer": "adamw", "max_steps": 4, **({"max_grad_norm": 0.05} if distributed_optimizer else {})}
    extra = {"train": train, "model": {"path": base}, "adapter": MOE_ADAPTER, "output": {"save_format": "torch_dist"}}
    initial = _initial_adapter(workspace, tmp_path, extra)
    assert convert(["hf-to-megatron", str(base), str(dist_ckpt), "--ep", "2", "--adapter", str(tmp_path / "adapter")]) == 0

    pretrained = {"pretrained_checkpoint": str(dist_ckpt), "use_distributed_optimizer": distributed_optimizer}
    first = make_megatron_recipe(workspace, out, megatron={**EP2, **pretrained}, **extra)
    proc = launch(first, 2, "--stop-after", "2")
    assert "base weights and RaSA adapter" in proc.stderr
    resumed_at = ({"tensor_model_parallel_size": 2, "sequence_parallel": True} if distributed_optimizer
                  else {"pipeline_model_parallel_size": 2})
    second = make_megatron_recipe(workspace, out, megatron={**resumed_at, **pretrained}, **extra)
    proc = launch(second, 2, "--resume")
    assert "resharded" in proc.stderr

    _check_resumed_run(out, first, initial, base, tmp_path)
