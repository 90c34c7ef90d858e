"""Megatron RaSA shards <-> the single-process Hugging Face adapter (``adapter_state_dict`` keys).

:func:`load_hf_adapter_` copies this rank's slices of a HF adapter into a Megatron model;
:func:`gather_hf_adapter` assembles every rank's shards (TP shards concatenated, pipeline pool slices
placed at their layers' rows, experts stacked ``[E, ...]``) back into the HF adapter on one rank,
from which ``save_adapter``, ``export_peft_lora`` and merged exports work as for any HF model.
"""
from __future__ import annotations

import torch

from ..convert.megatron_checkpoint import assemble_hf_adapter
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


def _adapter_pieces(model_chunks, clone: bool = True) -> list[tuple]:
    """This rank's adapter tensors as ``(hf key, tensor, tp dim or None, tp rank, pool rows or None,
    layer dim of the rows, expert or None)``; ``clone=False``: the parameters themselves."""
    pieces, seen_pools = [], set()

    def take(tensor):
        return tensor.detach().cpu().clone() if clone else tensor

    for key, unit in megatron_rasa_units(model_chunks).items():
        index, path = key[:2]
        expert = key[2] if len(key) == 3 else None
        column = unit.parallel == COLUMN
        prefix = f"model.layers.{index}.{path}"
        for name, dim in (("A_private", None if column else 1), ("B_private", 0 if column else None), ("diag", None)):
            tensor = getattr(unit, name)
            if tensor is not None:
                pieces.append((f"{prefix}.{name}", take(tensor), dim, unit.tp_rank, None, None, expert))
        pool = unit.pool
        if pool is not None and id(pool) not in seen_pools:
            seen_pools.add(id(pool))
            rows = pool.owned_rows()
            pieces.append((f"rasa_pools.{path}.A_shared", take(pool.A_shared), None if column else 1, pool.tp_rank,
                           rows, 0, expert))
            pieces.append((f"rasa_pools.{path}.B_shared", take(pool.B_shared), 0 if column else None, pool.tp_rank,
                           rows, 1, expert))
    return pieces


def piece_records(model_chunks, parameter_names: dict[int, str]) -> list[dict]:
    """JSON records of :func:`pieces_to_send` for a checkpoint: where each piece goes in the HF adapter
    (``key``, TP ``dim`` and ``tp_rank``, pool ``rows`` and ``layer_dim``, ``expert``) and which saved
    tensor holds it (``tensor``: its name in ``parameter_names``, by parameter id). An offline reader
    feeds them to :func:`assemble_hf_adapter` without building a model."""
    sends = _sender_filter()
    records = []
    for key, tensor, dim, tp_rank, rows, layer_dim, expert in _adapter_pieces(model_chunks, clone=False):
        if not sends(expert):
            continue
        records.append({"key": key, "tensor": parameter_names[id(tensor)], "dim": dim, "tp_rank": tp_rank,
                        "rows": None if rows is None else [int(r) for r in rows.tolist()],
                        "layer_dim": layer_dim, "expert": expert})
    return records


def _sender_filter():
    """``sends(expert)``: whether this rank sends a piece (dense: data-parallel rank 0, whose replica is
    every replica's value; expert: expert-data-parallel rank 0)."""
    from megatron.core import parallel_state

    dense = parallel_state.get_data_parallel_rank() == 0
    expert = parallel_state.get_expert_data_parallel_rank() == 0
    return lambda piece_expert: dense if piece_expert is None else expert


def pieces_to_send(model_chunks) -> list[tuple]:
    """This rank's share of the adapter for :func:`gather_hf_adapter`: its dense pieces when it is on
    data-parallel rank 0 (every other data-parallel replica holds the same values), its expert pieces
    when it is on expert-data-parallel rank 0 (the replica of its experts that is sent)."""
    sends = _sender_filter()
    return [piece for piece in _adapter_pieces(model_chunks) if sends(piece[6])]


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
    return assemble_hf_adapter(gathered)
