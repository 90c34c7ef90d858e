"""The world-size-independent training state of a DeepSpeed run (``--resume --portable``): the trainable
parameters' fp32 masters and per-element optimizer states by parameter name, gathered and written by
rank 0 as safetensors + JSON, and loaded into a fresh engine of any world size (ZeRO-2 or -3).

DeepSpeed's universal-checkpoint converter cannot be used instead: for ZeRO-3 it assumes Adam's
``exp_avg_sq`` and fails on Lion's state.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from ..training.state_io import write_bytes_durably, write_json
from .zero3 import is_zero3_param

PORTABLE_WEIGHTS = "portable_state.safetensors"
PORTABLE_META = "portable_state.json"


def _inner_optimizer(engine):
    optimizer = engine.optimizer
    return getattr(optimizer, "optimizer", optimizer)


def optimizer_state_keys(engine) -> list[str]:
    """Per-element optimizer state names (``exp_avg`` for Lion; ``exp_avg``, ``exp_avg_sq`` for AdamW)."""
    keys = set()
    for state in _inner_optimizer(engine).state.values():
        keys.update(k for k, v in state.items() if torch.is_tensor(v) and v.numel() > 1)
    return sorted(keys)


def _create_optimizer_states(engine, keys: list[str], step) -> None:
    """Zero optimizer state on DeepSpeed's flat fp32 partitions (what the optimizer steps on), with a
    step counter in the form the optimizer keeps it.

    A pre-created state must be complete: DeepSpeed's FusedAdam / FusedLion and DeepSpeedCPUAdam /
    CPU Lion create ``state['step']`` only for an empty state and then do ``state['step'] += 1``
    (a Python int, handed to their kernels); torch's Adam/AdamW keep a tensor."""
    inner = _inner_optimizer(engine)
    for attr in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups", "fp32_groups_flat_partition"):
        flats = getattr(engine.optimizer, attr, None)
        if flats:
            break
    else:
        flats = [p for group in inner.param_groups for p in group["params"]]
    step = int(step or 0)
    tensor_step = isinstance(inner, torch.optim.Optimizer) and type(inner).__module__.startswith("torch.optim")
    for flat in flats:
        state = inner.state[flat]
        for key in keys:
            state.setdefault(key, torch.zeros_like(flat))
        state.setdefault("step", torch.tensor(float(step)) if tensor_step else step)


def _link_optimizer_fragments(engine) -> None:
    """ZeRO-1/2 (and DeepSpeed's bf16 optimizer) map every parameter to its fragment of the optimizer
    state lazily, at the first ``step()``; until then ``safe_get/set_full_optimizer_state`` dereference
    an unset fragment (``TypeError: argument of type 'NoneType' is not iterable``). A resume that makes no
    step before saving (a finished run, or a kill after the final checkpoint) hits it; link now."""
    optimizer = engine.optimizer
    if hasattr(optimizer, "_lazy_init_hp_params_optimizer_state"):
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()


def save_portable_state(engine, directory: str | os.PathLike, meta: dict) -> None:
    """World-size-independent training state of the trainable parameters: fp32 masters and
    per-element optimizer states by parameter name (gathered: collective), plus ``meta`` (step,
    scheduler, ...). Rank 0 writes ``portable_state.safetensors`` + ``.json`` durably.

    Meant for adapters (small): the engine's checkpoint for RaSA / LoRA runs, read back without
    unpickling anything.
    """
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    from safetensors.torch import save

    rank = dist.get_rank() if dist.is_initialized() else 0
    tensors = {}
    keys = optimizer_state_keys(engine)
    for name, param in engine.module.named_parameters():
        if not param.requires_grad:
            continue
        tensors[f"param/{name}"] = safe_get_full_fp32_param(param).detach().float().cpu().contiguous()
        for key in keys:
            value = safe_get_full_optimizer_state(param, key)
            if value is not None:
                tensors[f"state/{key}/{name}"] = value.detach().float().cpu().contiguous()
    steps = {v["step"].item() if torch.is_tensor(v["step"]) else v["step"]
             for v in _inner_optimizer(engine).state.values() if "step" in v}
    if rank == 0:  # no collective after this point: a failed write is agreed on by the caller's save protocol
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_bytes_durably(directory / PORTABLE_WEIGHTS, save(tensors))
        write_json(directory / PORTABLE_META,
                   {**meta, "optimizer_state_keys": keys, "optimizer_step": max(steps) if steps else None})


def load_portable_state(engine, directory: str | os.PathLike) -> dict:
    """Load :func:`save_portable_state` output into a fresh engine of any world size (collective).
    Names, shapes and optimizer-state names must match (else ValueError). Returns the meta dict."""
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
    from safetensors.torch import load_file

    directory = Path(directory)
    if not (directory / PORTABLE_META).is_file():
        raise FileNotFoundError(f"{directory / PORTABLE_META} not found: not a portable training state")
    meta = json.loads((directory / PORTABLE_META).read_text())
    tensors = load_file(directory / PORTABLE_WEIGHTS)
    params = {n: p for n, p in engine.module.named_parameters() if p.requires_grad}
    saved = {k.removeprefix("param/") for k in tensors if k.startswith("param/")}
    if saved != set(params):
        raise ValueError(f"portable state does not match the model's trainable parameters: missing "
                         f"{sorted(set(params) - saved)[:5]}, unexpected {sorted(saved - set(params))[:5]}")
    keys = optimizer_state_keys(engine)
    if not keys:  # a fresh engine whose optimizer creates its state lazily (Lion, AdamW): create it
        _create_optimizer_states(engine, meta["optimizer_state_keys"], meta.get("optimizer_step"))
        keys = optimizer_state_keys(engine)
        _link_optimizer_fragments(engine)
    if keys != meta["optimizer_state_keys"]:
        raise ValueError(f"optimizer state {meta['optimizer_state_keys']} was saved, this optimizer has {keys}")
    for name, param in params.items():
        full = tensors[f"param/{name}"]
        shape = tuple(getattr(param, "ds_shape", param.shape))
        if tuple(full.shape) != shape:
            raise ValueError(f"{name}: saved shape {tuple(full.shape)}, model {shape}")
        safe_set_full_fp32_param(param, full.to(engine.device))
        for key in keys:
            safe_set_full_optimizer_state(param, tensors[f"state/{key}/{name}"].to(engine.device), key)
    # the compute copies (bf16 or fp32) follow the masters
    trainable = list(params.values())
    zero3 = [p for p in trainable if is_zero3_param(p)]
    with (deepspeed.zero.GatheredParameters(zero3, modifier_rank=0) if zero3 else contextlib.nullcontext()):
        with torch.no_grad():
            for name, param in params.items():
                param.data.copy_(tensors[f"param/{name}"].to(param.dtype).reshape(param.data.shape))
    if meta.get("optimizer_step") is not None:
        for state in _inner_optimizer(engine).state.values():
            if "step" in state:
                state["step"] = (torch.full_like(state["step"], meta["optimizer_step"]) if torch.is_tensor(state["step"])
                                 else int(meta["optimizer_step"]))  # DeepSpeed's kernels take an int step
    return meta
