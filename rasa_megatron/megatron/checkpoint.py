"""The Megatron engine's resume checkpoints: per-rank adapter shards, optimizer, scheduler and RNG,
on the layout that wrote them (for resharding use Megatron's dist checkpoint, see sharding.py).

``checkpoints/step{N:07d}/rank{rank:05d}.pt`` per rank, then (rank 0) ``layout.json`` and the
run's ``recipe.json``, then ``checkpoints/latest``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist

from ..training.checkpoint import (CHECKPOINTS, LATEST, atomic_torch_save, atomic_write_text, check_resume_compatible,
                                   check_resume_recipe, checkpoint_root, step_tag, write_latest, write_recipe_record)
from ..training.rng import rng_state, set_rng_state

LAYOUT_FILE = "layout.json"


def layout(parallel_state, distributed_optimizer: bool) -> dict:
    """What per-rank checkpoint state depends on: the parallel layout and the optimizer's sharding."""
    return {"world_size": dist.get_world_size(), "use_distributed_optimizer": distributed_optimizer,
            "tensor_model_parallel_size": parallel_state.get_tensor_model_parallel_world_size(),
            "pipeline_model_parallel_size": parallel_state.get_pipeline_model_parallel_world_size(),
            "virtual_pipeline_model_parallel_size": parallel_state.get_virtual_pipeline_model_parallel_world_size() or 1,
            "expert_model_parallel_size": parallel_state.get_expert_model_parallel_world_size()}


def check_resume_layout(saved: dict, current: dict) -> None:
    """Refuse to resume per-rank state on another parallel layout, naming what differs."""
    check_resume_compatible(saved, current, "the checkpoint was written on another layout; per-rank adapter and "
                                            "optimizer shards resume on the layout that wrote them")


def adapter_parameters(chunks: list) -> dict[str, torch.nn.Parameter]:
    """``{"<chunk>.<name>": parameter}`` of the trainable (adapter) parameters: what a checkpoint holds."""
    return {f"{v}.{name}": p for v, chunk in enumerate(chunks) for name, p in chunk.named_parameters()
            if p.requires_grad}


def save_checkpoint(recipe, step: int, chunks: list, optimizers: list, schedulers: list, parallel_state) -> Path:
    """Every rank writes its adapter shards, its torch optimizers' states (with Megatron's distributed
    optimizer: this rank's shards), the schedulers' states and RNG (the generators and Megatron's
    tracker states: dropout streams continue exactly) atomically: temporary file, then rename; after
    all ranks wrote, rank 0 writes ``layout.json``, the recipe and then ``latest``."""
    root = checkpoint_root(recipe.output.dir)
    tag_dir = root / step_tag(step)
    tag_dir.mkdir(parents=True, exist_ok=True)
    from megatron.core import tensor_parallel

    rng = {**rng_state(), "megatron_tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    state = {"step": step, "optimizers": [o.state_dict() for o in optimizers],
             "schedulers": [s.state_dict() for s in schedulers], "rng": rng,
             "adapter": {name: p.detach().cpu() for name, p in adapter_parameters(chunks).items()}}
    atomic_torch_save(state, tag_dir / f"rank{dist.get_rank():05d}.pt")
    dist.barrier()
    if dist.get_rank() == 0:
        atomic_write_text(tag_dir / LAYOUT_FILE,
                          json.dumps(layout(parallel_state, recipe.megatron.use_distributed_optimizer)))
        write_recipe_record(tag_dir, recipe)
        write_latest(root, tag_dir.name)
    dist.barrier()
    return tag_dir


def load_checkpoint(recipe, path: Path, chunks: list, optimizers: list, schedulers: list, parallel_state) -> int:
    """Restore what :func:`save_checkpoint` wrote (``path``: the checkpoints root with ``latest``, or a
    ``step*`` directory) on the same layout; returns the global step to continue from."""
    path = Path(path)
    if (path / LATEST).is_file():
        path = path / (path / LATEST).read_text().strip()
    if not (path / LAYOUT_FILE).is_file():
        raise SystemExit(f"error: cannot resume: {path} is not a Megatron-engine checkpoint (no {LAYOUT_FILE}; "
                         f"expected {CHECKPOINTS}/latest or a {CHECKPOINTS}/step* directory)")
    check_resume_layout(json.loads((path / LAYOUT_FILE).read_text()),
                        layout(parallel_state, recipe.megatron.use_distributed_optimizer))
    check_resume_recipe(path, recipe)
    state = torch.load(path / f"rank{dist.get_rank():05d}.pt", weights_only=False, map_location="cpu")
    params = adapter_parameters(chunks)
    if set(params) != set(state["adapter"]):
        raise SystemExit(f"error: cannot resume: the checkpoint's adapter does not fit this model "
                         f"(differs in {sorted(set(params) ^ set(state['adapter']))[:3]})")
    with torch.no_grad():
        for name, param in params.items():
            if param.shape != state["adapter"][name].shape:
                raise SystemExit(f"error: cannot resume: {name} is {tuple(state['adapter'][name].shape)} in the "
                                 f"checkpoint, {tuple(param.shape)} in this model (another adapter config?)")
            param.copy_(state["adapter"][name])
    if len(state["optimizers"]) != len(optimizers):
        raise SystemExit(f"error: cannot resume: the checkpoint holds {len(state['optimizers'])} optimizer states, "
                         f"this run has {len(optimizers)}")
    for optimizer, saved in zip(optimizers, state["optimizers"]):
        optimizer.load_state_dict(saved)
    for scheduler, saved in zip(schedulers, state["schedulers"]):
        scheduler.load_state_dict(saved)
    set_rng_state(state["rng"])
    from megatron.core import tensor_parallel

    tensor_parallel.get_cuda_rng_tracker().set_states(state["rng"]["megatron_tracker"])
    return int(state["step"])
