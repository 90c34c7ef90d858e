"""A small pipeline driver over gloo for CPU tests of real Megatron GPTModel stages.

The model-level equality tests drive the real model chunks (``pre_process``/``post_process``,
``set_input_tensor``) in this all-forward-then-all-backward (GPipe) order, including virtual
pipeline chunks, so they can read the last stage's logits and gradients after every step directly.
Training (``engine: megatron``) uses Megatron's own schedules, tested through the training entry.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def virtual_stage_order(pp_size: int, vpp_size: int) -> list[tuple[int, int]]:
    """The model's stages in execution order: ``(chunk, pp rank)``, chunk-major (Megatron's layout)."""
    return [(chunk, rank) for chunk in range(vpp_size) for rank in range(pp_size)]


def _forward_stages(chunks, micro_batches, pp_group, hidden_shape, dtype, with_labels: bool):
    """Forward every micro-batch through this rank's virtual stages in pipeline order, receiving each
    stage's input from the previous stage and sending its output to the next; yields
    ``(position, input tensor or None, output, is_last_stage)`` per stage run on this rank."""
    pp_size, me = dist.get_world_size(pp_group), dist.get_rank(pp_group)
    ranks = dist.get_process_group_ranks(pp_group)
    order = virtual_stage_order(pp_size, len(chunks))
    for mb in micro_batches:
        for position, (chunk_index, rank) in enumerate(order):
            if rank != me:
                continue
            last = position == len(order) - 1
            inp = None
            if position:
                inp = torch.empty(hidden_shape, dtype=dtype)
                dist.recv(inp, src=ranks[order[position - 1][1]], group=pp_group)
                inp.requires_grad_(torch.is_grad_enabled())
            model = chunks[chunk_index]
            model.set_input_tensor(inp)
            out = model(input_ids=mb["input_ids"], position_ids=mb["position_ids"], attention_mask=None,
                        labels=mb["labels"] if last and with_labels else None)
            if not last:
                dist.send(out.detach().contiguous(), dst=ranks[order[position + 1][1]], group=pp_group)
            yield position, inp, out, last


def forward_backward(chunks, micro_batches, pp_group, hidden_shape, dtype, loss_fn):
    """Run forward and backward of every micro-batch through every stage; returns the last stage's
    per-micro-batch losses (on the rank holding it; [] elsewhere).

    Args:
        chunks: this rank's model chunks (virtual stages in order).
        micro_batches: list of dicts with ``input_ids``, ``position_ids``, ``labels`` ([b, s]).
        hidden_shape: ``[s, b, h]`` of the activations passed between stages.
        loss_fn: ``(per-token loss [b, s]) -> scalar`` for one micro-batch (already scaled).
    """
    ranks = dist.get_process_group_ranks(pp_group)
    order = virtual_stage_order(dist.get_world_size(pp_group), len(chunks))
    saved, losses = [], []  # saved: per stage run on this rank, (position, input tensor, output)
    for position, inp, out, last in _forward_stages(chunks, micro_batches, pp_group, hidden_shape, dtype, True):
        if last:
            out = loss_fn(out)
            losses.append(out.detach())
        saved.append((position, inp, out))
    for position, inp, out in reversed(saved):
        if position == len(order) - 1:
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
    return [out for _, _, out, last in _forward_stages(chunks, micro_batches, pp_group, hidden_shape, dtype, False)
            if last]
