"""Shard helpers shared by the Megatron RaSA layers and pools: TP slices of full-size factors, Megatron's
tensor-parallel marks, the dist-checkpoint entries of the wrappers and the process-group defaults.

A factor read by every TP rank on the side of a partial sum (column ``A`` and ``D``, row ``B`` and
``D``) is tagged ``rasa_tp_partial_grad`` (:data:`PARTIAL_GRAD_ATTR`): its gradient is a partial sum
over TP, completed once per step by :func:`rasa_megatron.megatron.grads.finalize_rasa_grads`.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from ..parallel_layout import check_divisible

COLUMN, ROW = "column", "row"
PARTIAL_GRAD_ATTR = "rasa_tp_partial_grad"


def as_chunks(model) -> list:
    """This rank's model chunks as a list (``model``: one chunk or a list/tuple of virtual-pipeline chunks)."""
    return list(model) if isinstance(model, (list, tuple)) else [model]


def shard_of(full: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    """The ``rank``-th of ``size`` contiguous chunks of ``full`` along ``dim`` (a copy)."""
    check_divisible(full.shape[dim], size, f"dim {dim} of a {list(full.shape)} tensor", "the tensor-parallel size")
    return full.chunk(size, dim=dim)[rank].clone()


def local_shard(full: torch.Tensor, factor: str, parallel: str, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This TP rank's part of a full-size factor: ``A`` is split on ``in`` (dim 1) in a row layer,
    ``B`` on ``out`` (dim 0) in a column layer; the other factor is replicated (returned as is)."""
    dim = {("A", ROW): 1, ("B", COLUMN): 0}.get((factor, parallel))
    return full if dim is None else shard_of(full, dim, tp_rank, tp_size)


def dist_ckpt_groups(metadata):
    from megatron.core import parallel_state
    from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

    metadata = ensure_metadata_has_dp_cp_group(metadata)
    return parallel_state.get_tensor_model_parallel_group(), metadata["dp_cp_group"], metadata


def wrapper_sharded_state_dict(base_layer, adapter_tensors: dict, tp_axes: dict, prefix: str, sharded_offsets,
                                metadata) -> dict:
    """Dist-checkpoint entries of a RaSA wrapper: the base layer's own entries under the checkpoint
    keys a plain Megatron model uses (``...linear_qkv.weight``), plus the adapter tensors (TP-sharded
    on ``tp_axes``, replicated otherwise, with Megatron's replica ids)."""
    from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

    tp_group, dp_cp_group, metadata = dist_ckpt_groups(metadata)
    # the base layer's own group: an MoE expert's linear is split over the expert TP group (size 1 here),
    # not the dense one, and its adapter with it (Megatron's SequentialMLP then sets the replica ids)
    tp_group = getattr(base_layer, "tp_group", None) or tp_group
    entries = base_layer.sharded_state_dict(prefix + "base_layer.", sharded_offsets, metadata)
    for entry in entries.values():
        if hasattr(entry, "key") and entry.key.startswith(prefix + "base_layer."):
            entry.key = prefix + entry.key[len(prefix + "base_layer."):]
    entries.update(make_sharded_tensors_for_checkpoint(adapter_tensors, prefix, tp_axes, sharded_offsets,
                                                       tp_group=tp_group, dp_cp_group=dp_cp_group))
    return entries


def accept_plain_base_keys(wrapper: nn.Module) -> None:
    """Let ``wrapper.load_state_dict`` take a plain Megatron state dict: ``<prefix>weight`` (and the
    base layer's other own entries) load into ``<prefix>base_layer.weight``."""
    def rename(module, state_dict, prefix, *args):
        for name in list(module.base_layer.state_dict(keep_vars=True)):
            plain, wrapped = prefix + name, f"{prefix}base_layer.{name}"
            if plain in state_dict and wrapped not in state_dict:
                state_dict[wrapped] = state_dict.pop(plain)

    wrapper.register_load_state_dict_pre_hook(rename)


def mark_partial_grad(*params: nn.Parameter) -> None:
    for param in params:
        setattr(param, PARTIAL_GRAD_ATTR, True)


def mark_tp_sharded(param: nn.Parameter, dim: int) -> None:
    """Megatron's tensor-parallel attributes on a TP-sharded factor, so Megatron's optimizer (gradient
    norm, distributed optimizer) counts each shard once, as it does for the base weights."""
    from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes

    set_tensor_model_parallel_attributes(param, is_parallel=True, dim=dim, stride=1)


def layout_free_key(key: str) -> str:
    """A pool registered on a layer (models built from ``rasa_layer_spec``) gets the key
    ``<model>.decoder.layers.[n.]rasa_pools...`` from Megatron's TransformerBlock (``n``, that rank's
    first layer, with non-homogeneous layers). The pool spans all layers and is registered on the
    model chunk by ``apply_rasa_megatron``, so both store it as ``<model>.rasa_pools...``: the key
    depends neither on the layout nor on how RaSA was put in."""
    return re.sub(r"(^|\.)decoder\.layers\.(?:\d+\.)?rasa_pools\.", r"\1rasa_pools.", key)


def default_group(kind: str):
    from megatron.core import parallel_state

    return (parallel_state.get_tensor_model_parallel_group() if kind == "tp"
            else parallel_state.get_pipeline_model_parallel_group())
