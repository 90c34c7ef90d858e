"""A small pipeline driver over gloo for CPU tests of real Megatron GPTModel stages.

Megatron-core's schedules (`pipeline_parallel/schedules.py`) and p2p code allocate with
``device="cuda"`` and cannot run on a CPU-only torch, so the CPU tests drive the real model chunks
(``pre_process``/``post_process``, ``set_input_tensor``) with this all-forward-then-all-backward
(GPipe) order, including virtual pipeline chunks. Production training uses Megatron's schedules.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def virtual_stage_order(pp_size: int, vpp_size: int) -> list[tuple[int, int]]:
    """The model's stages in execution order: ``(chunk, pp rank)``, chunk-major (Megatron's layout)."""
    return [(chunk, rank) for chunk in range(vpp_size) for rank in range(pp_size)]


def forward_backward(chunks, micro_batches, pp_group, hidden_shape, dtype, loss_fn):
    """Run forward and backward of every micro-batch through every stage; returns the last stage's
    per-micro-batch losses (on the rank holding it; [] elsewhere).

    Args:
        chunks: this rank's model chunks (virtual stages in order).
        micro_batches: list of dicts with ``input_ids``, ``position_ids``, ``labels`` ([b, s]).
        hidden_shape: ``[s, b, h]`` of the activations passed between stages.
        loss_fn: ``(per-token loss [b, s]) -> scalar`` for one micro-batch (already scaled).
    """
    pp_size, me = dist.get_world_size(pp_group), dist.get_rank(pp_group)
    ranks = dist.get_process_group_ranks(pp_group)
    order = virtual_stage_order(pp_size, len(chunks))
    saved = []  # per (micro-batch, virtual stage on this rank): (input tensor, output)
    losses = []
    for mb in micro_batches:
        for position, (chunk_index, rank) in enumerate(order):
            if rank != me:
                continue
            model = chunks[chunk_index]
            first, last = position == 0, position == len(order) - 1
            inp = None
            if not first:
                inp = torch.empty(hidden_shape, dtype=dtype)
                dist.recv(inp, src=ranks[order[position - 1][1]], group=pp_group)
                inp.requires_grad_(True)
            model.set_input_tensor(inp)
            out = model(input_ids=mb["input_ids"], position_ids=mb["position_ids"], attention_mask=None,
                        labels=mb["labels"] if last else None)
            if last:
                out = loss_fn(out)
                losses.append(out.detach())
            else:
                dist.send(out.detach().contiguous(), dst=ranks[order[position + 1][1]], group=pp_group)
            saved.append((position, inp, out))
    for position, inp, out in reversed(saved):
        last = position == len(order) - 1
        if last:
            out.backward()
        else:
            grad = torch.empty_like(out)
            dist.recv(grad, src=ranks[order[position + 1][1]], group=pp_group)
            out.backward(grad)
        if position != 0:
            dist.send(inp.grad.contiguous(), dst=ranks[order[position - 1][1]], group=pp_group)
    return losses


@torch.no_grad()
def forward_only(chunks, micro_batches, pp_group, hidden_shape, dtype):
    """Forward of every micro-batch without labels; the last stage's outputs (logits) on its rank."""
    pp_size, me = dist.get_world_size(pp_group), dist.get_rank(pp_group)
    ranks = dist.get_process_group_ranks(pp_group)
    order = virtual_stage_order(pp_size, len(chunks))
    outputs = []
    for mb in micro_batches:
        for position, (chunk_index, rank) in enumerate(order):
            if rank != me:
                continue
            model = chunks[chunk_index]
            inp = None
            if position:
                inp = torch.empty(hidden_shape, dtype=dtype)
                dist.recv(inp, src=ranks[order[position - 1][1]], group=pp_group)
            model.set_input_tensor(inp)
            out = model(input_ids=mb["input_ids"], position_ids=mb["position_ids"], attention_mask=None)
            if position == len(order) - 1:
                outputs.append(out)
            else:
                dist.send(out.contiguous(), dst=ranks[order[position + 1][1]], group=pp_group)
    return outputs
