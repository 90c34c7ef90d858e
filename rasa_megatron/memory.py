"""Dry runs and per-GPU memory estimates for the recipes (no weights, meta device); the Megatron
layout's estimate is :func:`megatron_memory_row`.

Model states follow DeepSpeed's own estimator (``estimate_zero3_model_states_mem_needs`` /
``estimate_zero2_model_states_mem_needs``), generalised from "every parameter is trained with
Adam" to frozen + trainable parameters and to Lion:

* a frozen parameter costs its bf16 copy, 2 bytes (partitioned under ZeRO-3);
* a trainable one costs DeepSpeed's 18 bytes with AdamW (2 bf16 grad + 4 fp32 grad + 4 fp32
  master + 8 for two moments; partitioned under ZeRO-2 and -3, on top of its bf16 copy under
  ZeRO-2 as in DeepSpeed's estimator) and 14 bytes with Lion (one moment);
* ZeRO-3 keeps ``4 x largest layer`` bytes of gathered parameters live; optimizer offload moves
  everything but the bf16 parameters to CPU, parameter offload those too.

For full fine-tuning with AdamW the numbers equal DeepSpeed's estimator exactly (tested).
Activations assume activation checkpointing at every decoder layer and SDPA/flash attention
(no ``s^2`` term): ``2 s b h`` bytes kept per layer, ``34 s b h`` for the one layer being
recomputed (Korthikanti et al. 2022, Table 2, without the attention-score term), plus the logits
(``6 s b V``: bf16 logits and their fp32 copy for the loss).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

GIB = 2**30
TRAINABLE_BYTES = {"adamw": 18, "lion": 14}


@dataclass(frozen=True)
class ParamCounts:
    total: int
    trainable: int
    largest_layer: int


def count_model_params(model: nn.Module) -> ParamCounts:
    """Total, trainable and largest single-module parameter counts (shared tensors once; meta OK)."""
    seen = {}
    for param in model.parameters():
        seen[id(param)] = param
    total = sum(p.numel() for p in seen.values())
    trainable = sum(p.numel() for p in seen.values() if p.requires_grad)
    largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)
    return ParamCounts(total, trainable, largest)


def model_states_bytes_per_gpu(counts: ParamCounts, num_gpus: int, stage: int, offload_optimizer: bool = False,
                               offload_params: bool = False, optimizer: str = "adamw") -> int:
    """GPU bytes for parameters, gradients and optimizer states (DeepSpeed's accounting)."""
    if optimizer not in TRAINABLE_BYTES:
        raise ValueError(f"optimizer={optimizer!r}; valid: {sorted(TRAINABLE_BYTES)}")
    frozen = counts.total - counts.trainable
    per_trainable = TRAINABLE_BYTES[optimizer]
    if stage == 3:
        live = 4 * counts.largest_layer
        if offload_params:
            return live
        if offload_optimizer:
            return live + int(2 * counts.total / num_gpus)
        return live + int((2 * frozen + per_trainable * counts.trainable) / num_gpus)
    if stage in (1, 2):
        if offload_optimizer:
            return 2 * counts.total
        return 2 * counts.total + int(per_trainable * counts.trainable / num_gpus)
    if stage == 0:
        return 2 * counts.total + per_trainable * counts.trainable
    raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3, got {stage}")


def activation_bytes_per_gpu(config, micro_batch_size: int, seq_len: int, checkpointing: bool = True) -> int:
    """Activation bytes of one micro-batch (bf16), see the module docstring."""
    h, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    tokens = micro_batch_size * seq_len
    logits = 6 * tokens * vocab
    if checkpointing:
        return 2 * tokens * h * layers + 34 * tokens * h + logits
    return 34 * tokens * h * layers + logits


def build_meta_model(recipe):
    """The recipe's model on the meta device (config only) with its adapter applied."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .inject import apply_rasa

    source = recipe.model.config or recipe.model.path  # the dry run never needs weights
    config = AutoConfig.from_pretrained(source)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    rasa_config = recipe.rasa_config()
    if rasa_config is not None:
        apply_rasa(model, rasa_config, adapter_dtype=torch.bfloat16)
    return model


def effective_ranks(model) -> dict[str, int]:
    """RaSA effective rank ``r - k + L k`` per module type."""
    from .inject import adapted_module_types, rasa_config_of

    config = rasa_config_of(model)
    return {path: config.effective_rank(mtype.num_layers) for path, mtype in adapted_module_types(model).items()}


def memory_table(counts: ParamCounts, model_config, micro_batch_size: int, seq_len: int, num_gpus: int,
                 optimizer: str, checkpointing: bool = True) -> list[dict]:
    """Per-GPU GiB for each ZeRO stage / offload choice at ``num_gpus`` GPUs."""
    activations = activation_bytes_per_gpu(model_config, micro_batch_size, seq_len, checkpointing)
    rows = []
    for label, stage, off_opt, off_par in (("ZeRO-2", 2, False, False), ("ZeRO-3", 3, False, False),
                                           ("ZeRO-3 + offload optimizer", 3, True, False),
                                           ("ZeRO-3 + offload optimizer + params", 3, True, True)):
        states = model_states_bytes_per_gpu(counts, num_gpus, stage, off_opt, off_par, optimizer)
        total = states + activations
        rows.append({"setup": label, "model_states_gib": states / GIB, "activations_gib": activations / GIB,
                     "total_gib": total / GIB, "fits_40gb": total < 40e9 * 0.9, "fits_80gb": total < 80e9 * 0.9})
    return rows


MEGATRON_TRAINABLE_BYTES = {"adamw": 16, "lion": 12}  # fp32 adapter + fp32 main_grad + moments


def megatron_memory_row(model, recipe) -> dict:
    """Per-GPU GiB of the busiest rank for ``engine: megatron`` (the first pipeline stage).

    Frozen bf16 weights (2 bytes): dense ones split over TP x PP, stacked experts over EP x PP
    (expert TP is 1). Adapters (fp32 value, fp32 ``main_grad`` of Megatron's DDP, optimizer moments:
    12 bytes with Lion, 16 with AdamW) counted as if replicated over TP (an upper bound: B of column
    and A of row layers are split). Activations as :func:`activation_bytes_per_gpu`, with 1F1B: the
    first stage keeps the checkpointed layer inputs of PP micro-batches in flight (``2 s b h`` for each
    of its ``L / PP`` layers, ``PP`` times = ``L`` layers' worth), divided by TP under sequence
    parallelism; the recomputed layer ``34 s b h / TP``; logits ``6 s b V / TP`` (the last stage's,
    counted here too as an upper bound)."""
    mg, t = recipe.megatron, recipe.train
    tp, pp, ep = mg.tensor_model_parallel_size, mg.pipeline_model_parallel_size, mg.expert_model_parallel_size
    dense = experts = trainable_dense = trainable_experts = 0
    for name, param in model.named_parameters():
        is_expert = ".mlp.experts." in name
        if param.requires_grad:
            trainable_experts += param.numel() if is_expert else 0
            trainable_dense += 0 if is_expert else param.numel()
        elif is_expert:
            experts += param.numel()
        else:
            dense += param.numel()
    per_trainable = MEGATRON_TRAINABLE_BYTES[t.optimizer]
    states = (2 * dense / (tp * pp) + 2 * experts / (ep * pp)
              + per_trainable * (trainable_dense / pp + trainable_experts / (ep * pp)))
    config = model.config
    tokens = t.micro_batch_size * recipe.data.seq_len
    h, layers = config.hidden_size, config.num_hidden_layers
    kept = 2 * tokens * h * (layers if t.gradient_checkpointing else 17 * layers)
    activations = (kept / (tp if mg.sequence_parallel else 1) + 34 * tokens * h / tp
                   + 6 * tokens * config.vocab_size / tp)
    total = states + activations
    layout = f"Megatron TP{tp} x PP{pp}" + (f" x EP{ep}" if ep > 1 else "") + (" + SP" if mg.sequence_parallel else "")
    return {"setup": layout, "model_states_gib": states / GIB, "activations_gib": activations / GIB,
            "total_gib": total / GIB, "fits_40gb": total < 40e9 * 0.9, "fits_80gb": total < 80e9 * 0.9}


def dry_run_report(recipe, nodes: int = 8, gpus_per_node: int = 8) -> str:
    """Text report: parameters, effective ranks and the per-GPU memory table of a recipe."""
    model = build_meta_model(recipe)
    counts = count_model_params(model)
    num_gpus = nodes * gpus_per_node
    t = recipe.train
    lines = [f"model: {type(model).__name__} ({recipe.model.config or recipe.model.path})",
             f"parameters: total {counts.total:,}  trainable {counts.trainable:,} "
             f"({100 * counts.trainable / counts.total:.3f}%)  largest module {counts.largest_layer:,}",
             f"adapter: {recipe.adapter.method} r={recipe.adapter.r} k={recipe.rasa_config().k if recipe.rasa_config() else '-'}"]
    if recipe.rasa_config() is not None:
        for path, rank in effective_ranks(model).items():
            lines.append(f"  effective rank {path}: {rank}")
    megatron = recipe.engine == "megatron"
    mg = recipe.megatron
    data_parallel = num_gpus // (mg.tensor_model_parallel_size * mg.pipeline_model_parallel_size) if megatron \
        else num_gpus
    per_step = t.micro_batch_size * data_parallel
    grad_accum = t.global_batch_size // per_step if per_step and t.global_batch_size % per_step == 0 else None
    lines.append(f"launch: {nodes} nodes x {gpus_per_node} GPUs = {num_gpus}; global batch {t.global_batch_size} = "
                 f"micro {t.micro_batch_size} x {data_parallel} data-parallel x grad-accum {grad_accum}; "
                 f"seq_len {recipe.data.seq_len}; optimizer {t.optimizer}; gradient checkpointing {t.gradient_checkpointing}")
    lines.append("| setup | model states GiB/GPU | activations GiB/GPU | total GiB/GPU | A100-40GB | A100-80GB |")
    lines.append("|---|---|---|---|---|---|")
    rows = [megatron_memory_row(model, recipe)] if megatron else \
        memory_table(counts, model.config, t.micro_batch_size, recipe.data.seq_len, num_gpus, t.optimizer,
                     t.gradient_checkpointing)
    for row in rows:
        lines.append(f"| {row['setup']} | {row['model_states_gib']:.1f} | {row['activations_gib']:.1f} | "
                     f"{row['total_gib']:.1f} | {'fits' if row['fits_40gb'] else 'no'} | "
                     f"{'fits' if row['fits_80gb'] else 'no'} |")
    return "\n".join(lines)
