"""The Megatron engine's checkpoints, read offline in one process: the HF adapter of any (TP, PP, VPP,
EP) layout, without building a model or starting torch.distributed.

A checkpoint directory (``checkpoints/step{N:07d}/``) holds, per rank, ``rank{r:05d}.safetensors`` +
``.json`` (its state; adapter tensors stored as ``s.adapter.<chunk>.<name>``) and
``rank{r:05d}.pieces.json`` (where each of its adapter tensors goes in the HF adapter), plus
``layout.json``, ``recipe.json``, ``run.json`` and ``manifest.json``. Only the adapter tensors named in
the pieces files are read (``safe_open``, one tensor at a time: optimizer states stay on disk).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..training.identity import RECIPE_FILE
from ..training.state_io import read_json

LAYOUT_FILE = "layout.json"
PIECES_SUFFIX = ".pieces.json"


def rank_name(rank: int) -> str:
    """``rank{rank:05d}``: the stem of a rank's files in a Megatron-engine checkpoint."""
    return f"rank{rank:05d}"


def assemble_hf_adapter(gathered: list[list[tuple]]) -> dict[str, torch.Tensor]:
    """The HF adapter (``adapter_state_dict`` keys) from every sending rank's pieces, each
    ``(hf key, tensor, tp dim or None, tp rank, pool rows or None, layer dim of the rows, expert or None)``
    (``rows``: a tensor or a list): TP shards concatenated along their dim, pipeline pool slices placed
    at their rows, experts stacked ``[E, ...]``. Raises ValueError naming a key whose TP shards, pool
    rows or experts are incomplete."""
    by_key: dict[tuple, dict] = {}
    for rank_pieces in gathered:
        for key, tensor, dim, tp_rank, rows, layer_dim, expert in rank_pieces:
            slot = by_key.setdefault((key, expert), {"dim": dim, "layer_dim": layer_dim, "parts": {}})
            row_id = None if rows is None else tuple(int(r) for r in (rows.tolist() if torch.is_tensor(rows) else rows))
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
        total = max(max(row_id) for row_id in blocks) + 1
        if sum(len(row_id) for row_id in blocks) != total:
            raise ValueError(f"{key}: pool rows missing from the pipeline slices (rows "
                             f"{sorted(r for row_id in blocks for r in row_id)} of {total})")
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


def adapter_from_megatron_checkpoint(tag_dir: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """``(HF adapter tensors, the run's recipe as a dict, {} without one)`` of a Megatron-engine checkpoint directory, on
    any layout. Raises FileNotFoundError naming a missing rank file, ValueError naming an incomplete or
    inconsistent piece."""
    from safetensors import safe_open

    tag_dir = Path(tag_dir)
    if not (tag_dir / LAYOUT_FILE).is_file():
        raise FileNotFoundError(f"{tag_dir} is not a Megatron-engine checkpoint: {LAYOUT_FILE} is missing")
    world = int(read_json(tag_dir / LAYOUT_FILE)["world_size"])
    missing = [str(tag_dir / f"{rank_name(r)}{suffix}") for r in range(world)
               for suffix in (".safetensors", PIECES_SUFFIX) if not (tag_dir / f"{rank_name(r)}{suffix}").is_file()]
    if missing:
        raise FileNotFoundError(f"{tag_dir}: the layout has {world} ranks but {len(missing)} rank files are "
                                f"missing: {', '.join(missing[:4])}")
    gathered = []
    for rank in range(world):
        records = read_json(tag_dir / f"{rank_name(rank)}{PIECES_SUFFIX}")
        pieces = []
        with safe_open(tag_dir / f"{rank_name(rank)}.safetensors", framework="pt") as handle:
            stored = set(handle.keys())
            for record in records:
                name = f"s.{record['tensor']}"
                if name not in stored:
                    raise ValueError(f"{tag_dir / rank_name(rank)}.safetensors has no tensor {name} "
                                     f"(for {record['key']})")
                pieces.append((record["key"], handle.get_tensor(name), record["dim"], record["tp_rank"],
                               record["rows"], record["layer_dim"], record["expert"]))
        gathered.append(pieces)
    recipe = read_json(tag_dir / RECIPE_FILE) if (tag_dir / RECIPE_FILE).is_file() else {}
    return assemble_hf_adapter(gathered), recipe
