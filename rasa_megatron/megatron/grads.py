"""Finishing RaSA gradients once per optimizer step, and the global gradient norm as Megatron takes it.

:func:`finalize_rasa_grads` does RaSA's two reductions (the pipeline pools' reduce-scatter and one
coalesced TP all-reduce of the partial gradients of replicated factors); :func:`finalize_model_grads_with_rasa`
runs it before Megatron's own ``finalize_model_grads`` (data-parallel reduction).
"""
from __future__ import annotations

import itertools
import math

import torch
import torch.distributed as dist
from torch import nn

from .ddp import check_megatron_ddp
from .layers import ShardedRaSA
from .pools import reduce_scatter_pipeline_pool_grads
from .sharding import PARTIAL_GRAD_ATTR, as_chunks, default_group


def partial_grad_parameters(module) -> list[nn.Parameter]:
    """Trainable RaSA parameters whose gradient is a partial sum over the TP group, each once
    (pools included, also when the module holds only the adapters' unregistered references)."""
    seen, out = set(), []
    for root in as_chunks(module):
        pools = [m.pool.parameters() for m in root.modules() if isinstance(m, ShardedRaSA) and m.pool is not None]
        for param in itertools.chain(root.parameters(), *pools):
            if getattr(param, PARTIAL_GRAD_ATTR, False) and param.requires_grad and id(param) not in seen:
                seen.add(id(param))
                out.append(param)
    return out


def finalize_rasa_grads(model, tp_group=None, pp_group=None) -> dict[str, int]:
    """Finish the RaSA gradients of one optimizer step, in one place; call after the backward passes
    of all micro-batches and before Megatron's ``finalize_model_grads`` (which then averages over
    data-parallel replicas as for any parameter):

    1. pipeline-sharded pools: one reduce-scatter over the PP group turns each stage's full-pool
       gradient into the summed gradient of its own slices;
    2. parameters with TP-partial gradients (``rasa_tp_partial_grad``): one coalesced all-reduce
       over the TP group.

    Reads/writes ``param.main_grad`` when Megatron's DDP gave one, else ``param.grad``. Returns the
    number of collectives issued, ``{"pp_reduce_scatter": 0|1, "tp_all_reduce": 0|1}``.
    """
    counts = {"pp_reduce_scatter": reduce_scatter_pipeline_pool_grads(model, pp_group), "tp_all_reduce": 0}
    tp_group = tp_group if tp_group is not None else default_group("tp")
    if dist.get_world_size(tp_group) == 1:
        return counts
    grads = []
    for param in partial_grad_parameters(model):
        grad = getattr(param, "main_grad", None)
        grad = param.grad if grad is None else grad
        if grad is not None:
            grads.append(grad)
    counts["tp_all_reduce"] = all_reduce_coalesced(grads, tp_group)
    return counts


def all_reduce_coalesced(grads: list[torch.Tensor], group, divide_by: int = 1) -> int:
    """Sum ``grads`` over ``group`` in one flat all-reduce (then divide by ``divide_by``), in place.
    Returns the number of collectives issued (0 when there is nothing to reduce)."""
    if not grads:
        return 0
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=group)
    if divide_by != 1:
        flat /= divide_by
    for grad, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        grad.copy_(synced)
    return 1


def finalize_model_grads_with_rasa(model, *args, **kwargs):
    """Megatron's ``finalize_model_grads`` preceded by :func:`finalize_rasa_grads`; set it as
    ``config.finalize_model_grads_func`` so Megatron's schedules finish RaSA gradients too (the RaSA
    step writes into ``main_grad`` before Megatron's data-parallel reduction reads it)."""
    from megatron.core.distributed import finalize_model_grads

    check_megatron_ddp(model)
    finalize_rasa_grads(model)
    return finalize_model_grads(model, *args, **kwargs)


finalize_model_grads_with_rasa.finalizes_rasa_grads = True  # what the layers' check_gradient_finalisation looks for


def global_grad_norm(params: list, parallel_state) -> float:
    """Global L2 norm of ``params``' gradients as Megatron's optimizers take it: its parameter filter
    (shared and TP-duplicate parameters dropped by their attributes) and ``get_grad_norm_fp32``, dense
    parameters over the model-parallel group, expert parameters (``allreduce = False``) over the
    expert tensor x expert x pipeline group, combined."""
    from megatron.core.optimizer.clip_grads import get_grad_norm_fp32
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
    from megatron.core.transformer.module import param_is_not_shared

    counted = [p for p in params if p.grad is not None and param_is_not_shared(p)
               and param_is_not_tensor_parallel_duplicate(p)]
    dense = get_grad_norm_fp32([p.grad for p in counted if getattr(p, "allreduce", True)],
                               grad_stats_parallel_group=parallel_state.get_model_parallel_group())
    expert = get_grad_norm_fp32([p.grad for p in counted if not getattr(p, "allreduce", True)],
                                grad_stats_parallel_group=parallel_state.get_expert_tensor_model_pipeline_parallel_group())
    return math.hypot(dense, expert)


def clip_grad_norm(params: list, max_norm: float, parallel_state) -> float:
    """:func:`global_grad_norm`, then Megatron's ``clip_grad_by_total_norm_fp32`` scales the grads in
    place when it is above ``max_norm``. Returns the norm before clipping."""
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    norm = global_grad_norm(params, parallel_state)
    if max_norm:
        clip_grad_by_total_norm_fp32([p for p in params if p.grad is not None], max_norm, norm)
    return norm
