"""Dry runs: the recipe's model on the meta device (no weights), its parameters, effective ranks and
the engine's per-GPU memory table (rows from ``rasa_megatron.deepspeed.memory`` or
``rasa_megatron.megatron.memory``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..inject import adapted_module_types, apply_rasa, rasa_config_of
from .recipe import Recipe

GIB = 2**30


@dataclass(frozen=True)
class ParamCounts:
    total: int
    trainable: int
    largest_layer: int


def count_model_params(model: nn.Module) -> ParamCounts:
    """Total, trainable and largest single-module parameter counts (shared tensors once; meta OK)."""
    seen = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in seen.values())
    trainable = sum(p.numel() for p in seen.values() if p.requires_grad)
    largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)
    return ParamCounts(total, trainable, largest)


def build_meta_model(recipe: Recipe):
    """The recipe's model on the meta device (config only) with its adapter applied."""
    from transformers import AutoConfig, AutoModelForCausalLM

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
    config = rasa_config_of(model)
    return {path: config.effective_rank(mtype.num_layers) for path, mtype in adapted_module_types(model).items()}


def memory_row(setup: str, states_bytes: float, activation_bytes: float) -> dict:
    """One table row: GiB per GPU and whether it fits A100-40GB / -80GB with 10% headroom."""
    total = states_bytes + activation_bytes
    return {"setup": setup, "model_states_gib": states_bytes / GIB, "activations_gib": activation_bytes / GIB,
            "total_gib": total / GIB, "fits_40gb": total < 40e9 * 0.9, "fits_80gb": total < 80e9 * 0.9}


def dry_run_report(recipe: Recipe, memory_rows: Callable[[nn.Module, Recipe, int], list[dict]], nodes: int = 8,
                   gpus_per_node: int = 8) -> str:
    """Text report: parameters, effective ranks, the launch and ``memory_rows(model, recipe, num_gpus)``."""
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
    data_parallel = recipe.data_parallel_size(num_gpus)
    per_step = t.micro_batch_size * data_parallel
    grad_accum = t.global_batch_size // per_step if per_step and t.global_batch_size % per_step == 0 else None
    lines.append(f"launch: {nodes} nodes x {gpus_per_node} GPUs = {num_gpus}; global batch {t.global_batch_size} = "
                 f"micro {t.micro_batch_size} x {data_parallel} data-parallel x grad-accum {grad_accum}; "
                 f"seq_len {recipe.data.seq_len}; optimizer {t.optimizer}; gradient checkpointing {t.gradient_checkpointing}")
    lines.append("| setup | model states GiB/GPU | activations GiB/GPU | total GiB/GPU | A100-40GB | A100-80GB |")
    lines.append("|---|---|---|---|---|---|")
    for row in memory_rows(model, recipe, num_gpus):
        lines.append(f"| {row['setup']} | {row['model_states_gib']:.1f} | {row['activations_gib']:.1f} | "
                     f"{row['total_gib']:.1f} | {'fits' if row['fits_40gb'] else 'no'} | "
                     f"{'fits' if row['fits_80gb'] else 'no'} |")
    return "\n".join(lines)
