"""The Megatron engine's resume checkpoints: per-rank adapter shards, optimizer, scheduler and RNG,
on the layout that wrote them (for resharding use Megatron's dist checkpoint, see sharding.py).

``checkpoints/step{N:07d}/rank{rank:05d}.safetensors`` + ``.json`` per rank (nothing pickled) and
``rank{rank:05d}.pieces.json`` (where its adapter tensors go in the HF adapter, so the checkpoint converts
offline, see ``convert/megatron_checkpoint.py``), then (rank 0) ``layout.json`` and the run's records, through the shared save protocol (verified manifest,
``latest`` last, ``output.keep_last``).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from ..convert.megatron_checkpoint import LAYOUT_FILE, PIECES_SUFFIX, rank_name
from ..training.checkpoint import check_resume_compatible, checkpoint_root, save_checkpoint_dir
from ..training.identity import write_run_record
from ..training.rng import rng_state, set_rng_state
from ..training.state_io import load_state, read_json, save_state, write_json
from .hf_adapter import piece_records


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


def _rank_name() -> str:
    return rank_name(dist.get_rank())


def save_checkpoint(recipe, identity: dict, step: int, chunks: list, optimizers: list, schedulers: list,
                    parallel_state) -> Path:
    """Every rank writes its adapter shards, its torch optimizers' states (with Megatron's distributed
    optimizer: this rank's shards), the schedulers' states and RNG (the generators and Megatron's
    tracker states: dropout streams continue exactly); rank 0 the layout and the run's records."""
    from megatron.core import tensor_parallel

    def write(directory: Path) -> None:
        state = {"step": step, "optimizers": [o.state_dict() for o in optimizers],
                 "schedulers": [s.state_dict() for s in schedulers],
                 "rng": {**rng_state(), "megatron_tracker": tensor_parallel.get_cuda_rng_tracker().get_states()},
                 "adapter": {name: p.detach() for name, p in adapter_parameters(chunks).items()}}
        save_state(directory, _rank_name(), state)
        names = {id(p): f"adapter.{name}" for name, p in adapter_parameters(chunks).items()}
        write_json(directory / f"{_rank_name()}{PIECES_SUFFIX}", piece_records(chunks, names))
        if dist.get_rank() == 0:
            run_layout = layout(parallel_state, recipe.megatron.use_distributed_optimizer)
            write_json(directory / LAYOUT_FILE, run_layout)
            write_run_record(directory, recipe, identity, step, run_layout)

    return save_checkpoint_dir(checkpoint_root(recipe.output.dir), step, write, recipe.output.keep_last)


def load_checkpoint(recipe, tag_dir: Path, chunks: list, optimizers: list, schedulers: list, parallel_state) -> int:
    """Restore ``tag_dir`` (chosen, verified and identity-checked by ``resume_directory``) on the same
    layout; returns the global step to continue from. Refuses another layout or adapter shape, naming it."""
    from megatron.core import tensor_parallel

    tag_dir = Path(tag_dir)
    if not (tag_dir / LAYOUT_FILE).is_file():
        raise SystemExit(f"error: cannot resume: {tag_dir} is not a Megatron-engine checkpoint (no {LAYOUT_FILE})")
    check_resume_layout(read_json(tag_dir / LAYOUT_FILE), layout(parallel_state, recipe.megatron.use_distributed_optimizer))
    state = load_state(tag_dir, _rank_name())
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
    tensor_parallel.get_cuda_rng_tracker().set_states(state["rng"]["megatron_tracker"])
    return int(state["step"])
