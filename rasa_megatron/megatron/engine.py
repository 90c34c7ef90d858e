"""The Megatron-core engine of ``rasa-train`` (``engine: megatron``): RaSA fine-tuning of a HF
checkpoint as a Megatron-core GPTModel on a TP x PP (x VPP) x EP x DP layout, driven by Megatron's own
pipeline schedules.

The model chunks are wrapped in Megatron's ``DistributedDataParallel`` (fp32 gradient buffers of
the adapter parameters only: the base is frozen). Per optimizer step: the pipeline-sharded pools are
all-gathered once, Megatron's ``get_forward_backward_func()`` runs the micro-batches of this
data-parallel rank, and the schedule's ``finalize_model_grads_func``
(:func:`finalize_model_grads_with_rasa`) finishes the RaSA gradients (PP reduce-scatter, TP all-reduce
of partial grads) and then runs Megatron's own, whose DDP averages over data-parallel ranks, expert
adapters (MoE, expert parallel) over the ranks holding the same experts; the global gradient norm is
clipped over the model-parallel and expert-parallel groups; the adapter parameters (fp32) step with
LionW/AdamW on their ``main_grad``, or (``megatron.use_distributed_optimizer``) with Megatron's
distributed optimizer, which shards the AdamW states and the step over data-parallel ranks and
clips with its own global norm. The data plan, loss averaging, init, schedule, metrics and
checkpoint directories are the shared training layer's (:mod:`rasa_megatron.training`), so this
engine and the DeepSpeed one match the same single-process reference. At the end the adapter is
assembled on rank 0 (:func:`gather_hf_adapter`) and written in the project format and as a PEFT
LoRA export. Base weights stream from the checkpoint's safetensors: each rank reads only the
tensors its shards need.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from ..adapter import export_peft_lora, hf_model_with_adapter, save_adapter
from ..convert.dist_checkpoint import is_dist_checkpoint
from ..convert.hf_checkpoint import SafetensorsCheckpoint
from ..convert.megatron_weights import hf_to_megatron, transformer_config_from_hf
from ..training.control import StopRequest
from ..training.identity import mark_complete, run_identity
from ..training.data import load_tokenizer, micro_batches_for_rank, prepare_training_data
from ..training.loop import StepResult, preempted, resume_directory, run_steps, stop_file_path
from ..training.metrics import MetricsWriter
from ..training.model import compute_dtype
from ..training.optim import lr_scheduler, recipe_optimizer
from ..training.recipe import Recipe
from ..training.rng import ADAPTER_SEED_OFFSET, seed_everything
from .checkpoint import load_checkpoint, save_checkpoint
from .dist_checkpoint import (adapter_sharded_state_dict, load_dist_checkpoint, load_pretrained_checkpoint,
                              save_dist_checkpoint)
from .grads import clip_grad_norm, finalize_model_grads_with_rasa
from .hf_adapter import gather_hf_adapter
from .inject import apply_rasa_megatron
from .model import build_gpt_model
from .pools import gather_pipeline_pools


def padded_length(features: list[dict], multiple: int) -> int:
    """The longest sample of a micro-batch, rounded up to ``multiple`` (the TP size under sequence
    parallelism, whose sequence is split over the TP ranks)."""
    longest = max(len(f["input_ids"]) for f in features)
    return -(-longest // multiple) * multiple


def _pad_micro_batch(features: list[dict], seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Right padding to ``seq_len`` (:func:`padded_length`). The dataset's labels are HF-style (aligned
    with the inputs, shifted inside the HF loss); Megatron's GPTModel scores position ``t`` against
    ``labels[t]``, so they are shifted here: ``labels[t] = hf_labels[t + 1]``, and ``loss_mask``
    marks the positions whose next token has a label."""
    batch = len(features)
    input_ids = torch.full((batch, seq_len), pad_id, dtype=torch.long)
    labels = torch.zeros((batch, seq_len), dtype=torch.long)
    loss_mask = torch.zeros((batch, seq_len), dtype=torch.float32)
    for row, feature in enumerate(features):
        ids = torch.as_tensor(feature["input_ids"])[:seq_len]
        target = torch.as_tensor(feature["labels"])[1:seq_len + 1]  # next-token labels
        input_ids[row, :len(ids)] = ids
        valid = target >= 0
        labels[row, :len(target)] = torch.where(valid, target, torch.zeros_like(target))
        loss_mask[row, :len(target)] = valid.float()
    positions = torch.arange(seq_len).expand(batch, seq_len)
    return {"input_ids": input_ids, "labels": labels, "loss_mask": loss_mask, "position_ids": positions}


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    per_token = model(batch["input_ids"], batch["position_ids"], None, labels=batch["labels"])

    def loss_func(output):
        mask = batch["loss_mask"]
        loss = (output.float() * mask).sum() / mask.sum().clamp(min=1)
        return loss, {"loss": loss.detach().clone()}  # the schedule divides `loss` in place

    return per_token, loss_func


def seed_dropout_streams(seed: int) -> None:
    """Seed the device generator (dropout in data-parallel regions: the column adapters, whose input is
    the same on every TP rank) and Megatron's RNG tracker states (``model-parallel-rng``: differs per
    TP rank, for the row adapters' input shards and attention dropout; ``expert-parallel-rng``), with
    a different seed per pipeline stage (``seed + 100 * pp_rank``, as Megatron-LM), so stages do not
    repeat each other's masks. On a CPU-only torch the device generator is the CPU one (cpu_compat)."""
    from megatron.core import parallel_state, tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(seed + 100 * parallel_state.get_pipeline_model_parallel_rank())


def build_optimizer(recipe: Recipe, ddp_chunks: list, params: list):
    """The adapter optimizer -> ``(optimizer, torch_optimizers)``: a torch LionW/AdamW over ``params``
    (then ``torch_optimizers == [optimizer]``), or with ``megatron.use_distributed_optimizer``
    Megatron's ``get_megatron_optimizer`` (AdamW, every parameter decayed as in the other paths,
    ``clip_grad = train.max_grad_norm``) over the DDP chunks, whose torch optimizers over this rank's
    shards (dense and expert parameters) take the LR schedule and the checkpointed state."""
    t = recipe.train
    if recipe.megatron.use_distributed_optimizer:
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        config = OptimizerConfig(optimizer="adam", lr=t.lr, weight_decay=t.weight_decay, adam_beta1=t.betas[0],
                                 adam_beta2=t.betas[1], adam_eps=1e-8, clip_grad=t.max_grad_norm or 0.0,
                                 use_distributed_optimizer=True, params_dtype=torch.float32)
        # config_overrides={}: no Megatron default of skipping weight decay on 1-D parameters (RaSA's D)
        optimizer = get_megatron_optimizer(config, ddp_chunks, config_overrides={})
        return optimizer, [o.optimizer for o in getattr(optimizer, "chained_optimizers", [optimizer])]
    optimizer = recipe_optimizer(t, params)
    return optimizer, [optimizer]


def build_chunks(recipe: Recipe, hf_config, parallel_state, cuda: bool):
    """This rank's GPTModel chunks with the base weights streamed from ``model.path`` and the
    recipe's adapter (drawn after the same seeds as the DeepSpeed engine's: the same init on every
    layout), and their TransformerConfig."""
    mg, t = recipe.megatron, recipe.train
    vpp, ep = mg.virtual_pipeline_model_parallel_size, mg.expert_model_parallel_size
    tp, pp = mg.tensor_model_parallel_size, mg.pipeline_model_parallel_size
    tp_rank, pp_rank = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_pipeline_model_parallel_rank()
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    dtype = compute_dtype(recipe)
    moe = bool(getattr(hf_config, "num_local_experts", None))
    pretrained = mg.pretrained_checkpoint
    tconfig = transformer_config_from_hf(hf_config, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                         sequence_parallel=mg.sequence_parallel, params_dtype=dtype,
                                         bf16=dtype == torch.bfloat16,
                                         # base weights come from a checkpoint: no random init to overwrite
                                         perform_initialization=recipe.model.path is None and pretrained is None,
                                         **({"expert_model_parallel_size": ep, "expert_tensor_parallel_size": 1}
                                            if moe else {}),
                                         **({"virtual_pipeline_model_parallel_size": vpp} if vpp > 1 else {}))
    if t.gradient_checkpointing:  # Megatron's full recompute of every layer (re-entrant CheckpointFunction)
        tconfig.recompute_granularity, tconfig.recompute_method, tconfig.recompute_num_layers = "full", "uniform", 1
    seed_everything(t.seed)
    base = SafetensorsCheckpoint(recipe.model.path) if recipe.model.path and pretrained is None else None
    chunks = []
    for v in range(vpp):
        model = build_gpt_model(tconfig, hf_config, pre_process=pp_rank == 0 and v == 0,
                                post_process=pp_rank == pp - 1 and v == vpp - 1,
                                sdpa_attention=mg.attention == "sdpa", vp_stage=v if vpp > 1 else None)
        if base is not None:
            state = hf_to_megatron(base, hf_config, tp_rank, tp, pp_rank, pp, v, vpp, ep_rank=ep_rank, ep_size=ep)
            missing, unexpected = model.load_state_dict(state, strict=False)
            missing = [m for m in missing if not m.endswith("_extra_state")]
            if missing or unexpected:
                raise RuntimeError(f"checkpoint does not fit the Megatron model: missing {missing[:3]}, "
                                   f"unexpected {unexpected[:3]}")
        chunks.append(model.cuda() if cuda else model)
    seed_everything(t.seed + ADAPTER_SEED_OFFSET)
    apply_rasa_megatron(chunks, recipe.rasa_config(), adapter_dtype=torch.float32)
    if cuda:
        for chunk in chunks:
            chunk.cuda()
    if pretrained is not None:  # the base (and the adapter, when the checkpoint holds one) from torch_dist
        with_adapter = load_pretrained_checkpoint(chunks, pretrained, hf_config)
        if dist.get_rank() == 0:
            print(f"initialised from {pretrained}: base weights" + (" and RaSA adapter" if with_adapter else ""),
                  file=sys.stderr, flush=True)
    return chunks, tconfig


def run(recipe: Recipe, stop_step: int | None = None, resume: str | os.PathLike | None = None,
        portable: bool = False, progress: bool = True, control_dir: str | os.PathLike | None = None) -> int:
    """Train with Megatron-core; returns the exit status (0, or ``EXIT_PREEMPTED`` after a honoured stop
    request). ``resume``: see :func:`~rasa_megatron.training.loop.resume_directory` (same layout;
    ``portable`` resumes are the DeepSpeed engine's). A run stopped by ``stop_step`` before the end
    saves a checkpoint instead of the final adapter; the end writes the final checkpoint, the adapter,
    the PEFT export and ``complete.json``."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from transformers import AutoConfig

    from .cpu_compat import enable_cpu_megatron

    if portable:
        raise ValueError("engine: megatron resumes on the layout that wrote the checkpoint (portable resumes are "
                         "engine: deepspeed's)")
    cuda = torch.cuda.is_available()
    if recipe.megatron.attention == "local" and not cuda:
        raise SystemExit("error: megatron.attention: local is Megatron's DotProductAttention, which needs CUDA; "
                         "on this machine use megatron.attention: sdpa")
    if cuda:  # before the process group: NCCL binds each rank to its current device
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    else:
        enable_cpu_megatron()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    mg, t = recipe.megatron, recipe.train
    vpp = mg.virtual_pipeline_model_parallel_size
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=mg.tensor_model_parallel_size,
                                             pipeline_model_parallel_size=mg.pipeline_model_parallel_size,
                                             virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None,
                                             expert_model_parallel_size=mg.expert_model_parallel_size,
                                             expert_tensor_parallel_size=1)
    tp_rank, pp_rank = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_pipeline_model_parallel_rank()
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    hf_config = AutoConfig.from_pretrained(recipe.model.path or recipe.model.config)
    chunks, tconfig = build_chunks(recipe, hf_config, parallel_state, cuda)
    pad_multiple = mg.tensor_model_parallel_size if mg.sequence_parallel else 1
    # Megatron's DDP over the adapter parameters (fp32 grad buffers; no overlap: check_megatron_ddp)
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               use_distributed_optimizer=mg.use_distributed_optimizer)
    ddp_chunks = [DistributedDataParallel(tconfig, ddp_config, chunk, disable_bucketing=v > 0)
                  for v, chunk in enumerate(chunks)]
    tconfig.finalize_model_grads_func = finalize_model_grads_with_rasa
    tconfig.batch_p2p_comm = cuda  # gloo has no batched isend/irecv
    params = [p for chunk in chunks for p in chunk.parameters() if p.requires_grad]
    optimizer, torch_optimizers = build_optimizer(recipe, ddp_chunks, params)

    tokenizer = load_tokenizer(recipe)
    data = prepare_training_data(recipe, tokenizer, dist.get_rank(), barrier=dist.barrier)
    schedulers = [lr_scheduler(o, data.total_steps, t.warmup_ratio) for o in torch_optimizers]
    forward_backward = get_forward_backward_func()
    seed_dropout_streams(t.seed)  # after the adapter init, which draws from the CPU generator on every layout
    identity = run_identity(recipe, data.sha256)
    stop_request = StopRequest(recipe.output.stop_signals, stop_file_path(recipe, control_dir), recipe.output.max_minutes)
    start = resumed_from = 0
    stop = data.total_steps if stop_step is None else min(data.total_steps, stop_step)
    torch_dist = recipe.output.save_format == "torch_dist"
    if torch_dist:  # before any step: every adapter parameter must have a dist-checkpoint entry
        try:
            adapter_sharded_state_dict(chunks)
        except ValueError as err:
            raise SystemExit(f"error: {err}") from err
    tag_dir = resume_directory(recipe, resume, stop, identity)
    if tag_dir is not None:
        if is_dist_checkpoint(tag_dir):  # torch_dist: the step's optimizer (Megatron's or torch's) reshards
            start = load_dist_checkpoint(recipe, tag_dir, chunks, [optimizer], schedulers, parallel_state)
        else:  # native: the torch optimizers' per-rank state
            start = load_checkpoint(recipe, tag_dir, chunks, torch_optimizers, schedulers, parallel_state)
        resumed_from = start

    def save(step):
        if torch_dist:
            return save_dist_checkpoint(recipe, identity, step, chunks, [optimizer], schedulers, parallel_state)
        return save_checkpoint(recipe, identity, step, chunks, torch_optimizers, schedulers, parallel_state)

    def step_fn(step, global_batch) -> StepResult:
        micro = [data.samples(indices) for indices in micro_batches_for_rank(global_batch, t.micro_batch_size,
                                                                               dp_rank, dp_size)]
        lengths = [padded_length(features, pad_multiple) for features in micro]
        if mg.pipeline_model_parallel_size > 1:  # one activation shape for the step's p2p, known to every stage
            lengths = [max(lengths)] * len(lengths)
        batches = [_pad_micro_batch(features, length, tokenizer.pad_token_id) for features, length in zip(micro, lengths)]
        if cuda:
            batches = [{k: v.cuda() for k, v in b.items()} for b in batches]
        for chunk in ddp_chunks:
            chunk.zero_grad_buffer()
        gather_pipeline_pools(ddp_chunks)
        iterators = [iter(batches) for _ in chunks] if vpp > 1 else iter(batches)
        losses = forward_backward(forward_step_func=_forward_step, data_iterator=iterators,
                                  model=ddp_chunks if vpp > 1 else ddp_chunks[0], num_microbatches=len(batches),
                                  seq_length=max(lengths), micro_batch_size=t.micro_batch_size, forward_only=False)
        lr = torch_optimizers[0].param_groups[0]["lr"]
        if mg.use_distributed_optimizer:  # Megatron's step: clip by its global norm, step the shards, gather
            _, norm, _ = optimizer.step()
        else:
            for param in params:  # the optimizer steps on DDP's reduced fp32 gradient (as Megatron's fp32 path)
                param.grad = param.main_grad
            norm = clip_grad_norm(params, t.max_grad_norm, parallel_state)
            optimizer.step()
        for scheduler in schedulers:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        # the step's loss: mean over this rank's micro-batches (last stage), then over data-parallel ranks
        loss = torch.stack([x["loss"] for x in losses]).double().mean() if losses else \
            torch.zeros((), dtype=torch.float64)
        loss = loss.to(params[0].device)
        dist.all_reduce(loss, group=parallel_state.get_data_parallel_group())
        return StepResult(loss.item() / dp_size, float(norm), lr)

    logs = pp_rank == mg.pipeline_model_parallel_size - 1 and tp_rank == 0 and dp_rank == 0
    writer = MetricsWriter(recipe.output.dir, stop, start, enabled=logs, progress=progress, desc="megatron")
    try:
        result = run_steps(data, step_fn, start, stop, dist.get_world_size(), writer, recipe.output.save_every, save,
                           stop_request)
    finally:
        writer.close()
    if result.stopped_step is not None:
        return preempted(recipe, control_dir, result, stop_request)
    if resumed_from != stop:  # the checkpoint at the stop (or the end), unless the run resumed from it
        save(stop)
    if stop < data.total_steps:  # stopped early: a checkpoint to resume from, not the final adapter
        return 0
    adapter = gather_hf_adapter(chunks)
    if adapter is not None and recipe.output.save_adapter:
        out_dir = Path(recipe.output.dir)
        hf_model = hf_model_with_adapter(hf_config, recipe.rasa_config(), adapter)
        save_adapter(hf_model, out_dir / "adapter")
        if recipe.output.export_peft:
            export_peft_lora(hf_model, out_dir / "peft_adapter", base_model_name_or_path=recipe.model.path)
    if dist.get_rank() == 0:
        mark_complete(recipe.output.dir, recipe, data.total_steps)
    dist.barrier()
    return 0
