"""Megatron RaSA shards <-> the single-process Hugging Face adapter (``adapter_state_dict`` keys).

:func:`load_hf_adapter_` copies this rank's slices of a HF adapter into a Megatron model;
:func:`gather_hf_adapter` assembles every rank's shards (TP shards concatenated, pipeline pool slices
placed at their layers' rows, experts stacked ``[E, ...]``) back into the HF adapter on one rank,
from which ``save_adapter``, ``export_peft_lora`` and merged exports work as for any HF model.
"""
from __future__ import annotations

import torch

from .inject import megatron_rasa_units
from .sharding import COLUMN


def load_hf_adapter_(model_chunks, hf_adapter: dict[str, torch.Tensor], layers_path: str = "model.layers") -> None:
    """Copy this rank's slices of a single-process HF RaSA adapter (``adapter_state_dict`` keys:
    ``model.layers.{i}.self_attn.q_proj.A_private``, ``rasa_pools.self_attn.q_proj.A_shared``, ...) in."""
    for key, unit in megatron_rasa_units(model_chunks).items():
        index, path = key[:2]
        prefix = f"{layers_path}.{index}.{path}"
        pool = f"rasa_pools.{path}"
        names = (f"{prefix}.A_private", f"{prefix}.B_private", f"{pool}.A_shared", f"{pool}.B_shared", f"{prefix}.diag")
        tensors = [hf_adapter.get(name) for name in names]
        if len(key) == 3:  # stacked expert tensors [E, ...]: this expert's slice
            tensors = [None if t is None else t[key[2]] for t in tensors]
        unit.load_full_(*tensors)


def _adapter_pieces(model_chunks) -> list[tuple]:
    """This rank's adapter tensors as ``(hf key, tensor, tp dim or None, tp rank, pool rows or None,
    layer dim of the rows, expert or None)``."""
    pieces, seen_pools = [], set()
    for key, unit in megatron_rasa_units(model_chunks).items():
        index, path = key[:2]
        expert = key[2] if len(key) == 3 else None
        column = unit.parallel == COLUMN
        prefix = f"model.layers.{index}.{path}"
        for name, dim in (("A_private", None if column else 1), ("B_private", 0 if column else None), ("diag", None)):
            tensor = getattr(unit, name)
            if tensor is not None:
                pieces.append((f"{prefix}.{name}", tensor.detach().cpu().clone(), dim, unit.tp_rank, None, None, expert))
        pool = unit.pool
        if pool is not None and id(pool) not in seen_pools:
            seen_pools.add(id(pool))
            rows = pool.owned_rows()
            pieces.append((f"rasa_pools.{path}.A_shared", pool.A_shared.detach().cpu().clone(),
                           None if column else 1, pool.tp_rank, rows, 0, expert))
            pieces.append((f"rasa_pools.{path}.B_shared", pool.B_shared.detach().cpu().clone(),
                           0 if column else None, pool.tp_rank, rows, 1, expert))
    return pieces


def pieces_to_send(model_chunks) -> list[tuple]:
    """This rank's share of the adapter for :func:`gather_hf_adapter`: its dense pieces when it is on
    data-parallel rank 0 (every other data-parallel replica holds the same values), its expert pieces
    when it is on expert-data-parallel rank 0 (the replica of its experts that is sent)."""
    from megatron.core import parallel_state

    dense = parallel_state.get_data_parallel_rank() == 0
    expert = parallel_state.get_expert_data_parallel_rank() == 0
    return [piece for piece in _adapter_pieces(model_chunks) if (dense if piece[6] is None else expert)]


def gather_hf_adapter(model_chunks, dst: int = 0) -> dict[str, torch.Tensor] | None:
    """The single-process HF RaSA adapter (``adapter_state_dict`` keys) assembled on rank ``dst`` from
    the shards: TP shards concatenated, pipeline pool slices placed at their layers' rows, experts
    stacked ``[E, ...]``. Collective over the world (every rank calls it); None on other ranks.

    Only the ranks of :func:`pieces_to_send` send (the model-parallel group of data-parallel rank 0,
    plus the expert-parallel ranks of expert-data-parallel rank 0), over a gloo group: the pickled
    shards travel through host memory, never staged on a GPU. The inverse of
    :func:`load_hf_adapter_`; save the result with the HF model via ``load_adapter``-compatible
    files or export it (PEFT, merged) from a HF model."""
    import torch.distributed as dist

    pieces = pieces_to_send(model_chunks)
    senders = [None] * dist.get_world_size()
    dist.all_gather_object(senders, bool(pieces) or dist.get_rank() == dst)
    ranks = [rank for rank, sends in enumerate(senders) if sends]
    group = dist.new_group(ranks, backend="gloo")  # collective over the world, as new_group must be
    if dist.get_rank() not in ranks:
        return None
    gathered = [None] * len(ranks) if dist.get_rank() == dst else None
    dist.gather_object(pieces, gathered, dst=dst, group=group)
    dist.destroy_process_group(group)
    if gathered is None:
        return None
    by_key: dict[tuple, dict] = {}
    for rank_pieces in gathered:
        for key, tensor, dim, tp_rank, rows, layer_dim, expert in rank_pieces:
            slot = by_key.setdefault((key, expert), {"dim": dim, "layer_dim": layer_dim, "parts": {}})
            row_id = None if rows is None else tuple(rows.tolist())
            slot["parts"].setdefault(row_id, {})[tp_rank] = tensor
    assembled: dict[tuple, torch.Tensor] = {}
    for (key, expert), slot in by_key.items():
        blocks = {}
        for row_id, shards in slot["parts"].items():
            ranks = sorted(shards)
            if slot["dim"] is None:
                blocks[row_id] = shards[ranks[0]]
            else:
                if ranks != list(range(len(ranks))):
                    raise ValueError(f"{key}: tensor-parallel shards {ranks} are incomplete")
                blocks[row_id] = torch.cat([shards[r] for r in ranks], dim=slot["dim"])
        if None in blocks:
            assembled[(key, expert)] = blocks[None]
            continue
        layer_dim = slot["layer_dim"]
        total = sum(len(row_id) for row_id in blocks)
        shape = list(next(iter(blocks.values())).shape)
        shape[layer_dim] = total
        full = torch.full(shape, float("nan"), dtype=next(iter(blocks.values())).dtype)
        for row_id, block in blocks.items():
            full.index_copy_(layer_dim, torch.tensor(row_id), block)
        if torch.isnan(full).any():
            raise ValueError(f"{key}: pool rows missing from the gathered pipeline slices")
        assembled[(key, expert)] = full
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, torch.Tensor]] = {}
    for (key, expert), tensor in assembled.items():
        if expert is None:
            out[key] = tensor
        else:
            experts.setdefault(key, {})[expert] = tensor
    for key, per_expert in experts.items():
        if sorted(per_expert) != list(range(len(per_expert))):
            raise ValueError(f"{key}: experts {sorted(per_expert)} are incomplete")
        out[key] = torch.stack([per_expert[e] for e in range(len(per_expert))])
    return out
