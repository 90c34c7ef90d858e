"""Megatron distributed checkpoints (``torch_dist``: ``metadata.json`` + ``.metadata`` + ``*.distcp``) with
RaSA keys, read offline in one process without torch.distributed: the HF adapter of any layout.

The checkpoint stores every tensor in its global view, whatever layout wrote it (the RaSA layers' and
pools' ``sharded_state_dict``): adapter factors under the Megatron module that carries them, either
layer-stacked (``decoder.layers.self_attention.linear_qkv.adapters.q_proj.A_private: [L, r-k, in]``) or
per layer (``decoder.layers.3.…``, Megatron's ``non_homogeneous_layers``), pools under the layout-free
``rasa_pools.<module type>.A_shared: [L, k, in]`` / ``B_shared: [L, out, k]``. Only the adapter keys
are read (torch DCP, ``no_dist``); base weights and optimizer states stay on disk.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from ..config import RaSAConfig
from ..training.state_io import read_json

MEGATRON_METADATA = "metadata.json"
#: the Megatron module carrying an adapter -> the HF module type it adapts
ADAPTER_MODULES = {
    "self_attention.linear_qkv.adapters.q_proj": "self_attn.q_proj",
    "self_attention.linear_qkv.adapters.k_proj": "self_attn.k_proj",
    "self_attention.linear_qkv.adapters.v_proj": "self_attn.v_proj",
    "self_attention.linear_proj.adapter": "self_attn.o_proj",
    "mlp.linear_fc1.adapters.gate_proj": "mlp.gate_proj",
    "mlp.linear_fc1.adapters.up_proj": "mlp.up_proj",
    "mlp.linear_fc2.adapter": "mlp.down_proj",
}
_FACTOR = re.compile(r"^(?:model\d*\.)?decoder\.layers\.(?:(\d+)\.)?(.+)\.(A_private|B_private|diag)$")
_POOL = re.compile(r"^(?:model\d*\.)?rasa_pools\.(.+)\.(A_shared|B_shared)$")


def is_dist_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a Megatron distributed checkpoint directory (``metadata.json`` naming a backend)."""
    try:
        return "sharded_backend" in read_json(Path(path) / MEGATRON_METADATA)
    except (OSError, ValueError, TypeError):
        return False


def resolve_dist_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint directory of ``path``: itself, or under a Megatron-LM save root the iteration
    ``latest_checkpointed_iteration.txt`` names (``iter_0000500``)."""
    path = Path(path)
    tracker = path / "latest_checkpointed_iteration.txt"
    if not is_dist_checkpoint(path) and tracker.is_file():
        text = tracker.read_text().strip()
        path = path / ("release" if text == "release" else f"iter_{int(text):07d}")
    if not is_dist_checkpoint(path):
        raise FileNotFoundError(f"{path} is not a Megatron distributed checkpoint (no {MEGATRON_METADATA} "
                                "naming a sharded backend)")
    backend = read_json(path / MEGATRON_METADATA)["sharded_backend"]
    if backend != "torch_dist":
        raise ValueError(f"{path}: sharded backend {backend!r}; only 'torch_dist' checkpoints are read")
    return path


def _metadata(path: Path):
    from torch.distributed.checkpoint import FileSystemReader

    try:
        return FileSystemReader(str(path)).read_metadata()
    except Exception as err:  # noqa: BLE001 - torch raises several types for a missing or corrupt .metadata
        raise ValueError(f"{path}: the torch DCP metadata (.metadata) is missing or unreadable ({err})") from err


def _storage_problems(path: Path, metadata) -> list[str]:
    """Data files ``.metadata`` names that are missing or shorter than the items stored in them."""
    ends: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    problems = []
    for name, end in sorted(ends.items()):
        file = path / name
        if not file.is_file():
            problems.append(f"{name} is missing")
        elif file.stat().st_size < end:
            problems.append(f"{name} is truncated ({file.stat().st_size} of at least {end} bytes)")
    return problems


def _unsupported(keys) -> list[str]:
    """Keys this reader cannot convert: Transformer Engine / grouped-GEMM expert layers with adapters."""
    return sorted(k for k in keys if re.search(r"\.(experts|local_experts)\.", k)
                  and re.search(r"(A_private|B_private|diag|A_shared|B_shared)$", k))


def adapter_from_dist_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], RaSAConfig, Path]:
    """``(HF adapter tensors, its RaSAConfig, the checkpoint directory)`` of a ``torch_dist`` checkpoint
    with RaSA keys. ``alpha`` (which only sets the initial diagonal) is recorded as ``2 (r - k)``.
    Raises FileNotFoundError / ValueError naming a missing file, an unknown or unsupported adapter key,
    or a checkpoint without adapters."""
    from torch.distributed.checkpoint import FileSystemReader, load

    path = resolve_dist_checkpoint(path)
    metadata = _metadata(path)
    tensors_md = {k: v for k, v in metadata.state_dict_metadata.items() if hasattr(v, "size")}
    unsupported = _unsupported(tensors_md)
    if unsupported:
        raise ValueError(f"{path}: RaSA on MoE experts in a torch_dist checkpoint is not read yet ({unsupported[0]}, "
                         f"{len(unsupported)} keys); convert the engine's own checkpoint (checkpoints/stepN) instead")
    wanted, unknown = {}, []
    for key in tensors_md:
        if key.startswith("optimizer."):
            continue
        factor, pool = _FACTOR.match(key), _POOL.match(key)
        if factor and factor.group(2) in ADAPTER_MODULES:
            wanted[key] = ("factor", factor.group(1), ADAPTER_MODULES[factor.group(2)], factor.group(3))
        elif pool:
            wanted[key] = ("pool", None, pool.group(1), pool.group(2))
        elif factor or re.search(r"\.(A_private|B_private|A_shared|B_shared)$", key):
            unknown.append(key)
    if unknown:
        raise ValueError(f"{path}: adapter keys of modules this reader does not know: {unknown[:4]} (known: "
                         f"{', '.join(ADAPTER_MODULES)}; Transformer Engine specs are not supported)")
    if not wanted:
        raise ValueError(f"{path} holds no RaSA adapter keys (A_private, diag, rasa_pools.*): nothing to convert")
    state = {key: torch.empty(tuple(tensors_md[key].size), dtype=tensors_md[key].properties.dtype) for key in wanted}
    problems = _storage_problems(path, metadata)
    if problems:
        raise FileNotFoundError(f"{path}: {len(problems)} data files are missing or truncated: {'; '.join(problems[:4])}")
    try:
        load(state, storage_reader=FileSystemReader(str(path)), no_dist=True)
    except Exception as err:  # noqa: BLE001 - truncated .distcp files raise from deep inside torch
        raise ValueError(f"{path}: reading the adapter failed ({err.__class__.__name__}: {err}); "
                         "is a .distcp file truncated?") from err
    return _hf_adapter(state, wanted) + (path,)


def _hf_adapter(state: dict, wanted: dict) -> tuple[dict[str, torch.Tensor], RaSAConfig]:
    out: dict[str, torch.Tensor] = {}
    private, pool_rank, types = 0, 0, set()
    for key, (kind, layer, module_type, name) in wanted.items():
        tensor = state[key]
        types.add(module_type)
        if kind == "pool":
            layers, k = tensor.shape[0], tensor.shape[1 if name == "A_shared" else 2]
            pool_rank = k
            out[f"rasa_pools.{module_type}.{name}"] = (
                tensor.reshape(layers * k, tensor.shape[-1]) if name == "A_shared"
                else tensor.permute(1, 0, 2).reshape(tensor.shape[1], layers * k)).contiguous()
            continue
        if name == "A_private":
            private = tensor.shape[-2]
        if layer is not None:
            out[f"model.layers.{layer}.{module_type}.{name}"] = tensor
        else:
            for index in range(tensor.shape[0]):
                out[f"model.layers.{index}.{module_type}.{name}"] = tensor[index].clone()
    leaves = tuple(sorted({t.rsplit(".", 1)[-1] for t in types}))
    r = private + pool_rank
    return out, RaSAConfig(r=r, k=pool_rank, alpha=float(2 * max(private, 1)), target_modules=leaves)
