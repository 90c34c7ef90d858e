"""A Hugging Face checkpoint directory read tensor by tensor (each rank reads only what its shards need)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..parallel_layout import check_divisible


class _StackedExperts:
    """Lazy ``[E, ...]`` view of one layer's experts in a Mixtral checkpoint as saved on disk (one
    tensor per expert); ``view[e]`` reads expert ``e`` only, so an expert-parallel rank reads its experts."""

    def __init__(self, checkpoint: "SafetensorsCheckpoint", keys_of_expert):
        self.checkpoint, self.keys_of_expert = checkpoint, keys_of_expert

    def __getitem__(self, expert: int) -> torch.Tensor:
        return torch.cat([self.checkpoint[key] for key in self.keys_of_expert(expert)])


class SafetensorsCheckpoint:
    """Read-on-access mapping over a HF checkpoint directory's ``*.safetensors`` (sharded or not).

    Keys are those of the transformers-5 model in memory. Mixtral checkpoints on disk (the hub's and
    what ``save_pretrained`` writes) keep the original names, which transformers converts at load time
    (its ``conversion_mapping``: ``block_sparse_moe.`` -> ``mlp.``, per-expert ``w1``/``w3`` -> rows
    ``[gate ; up]`` of ``experts.gate_up_proj[e]``, ``w2`` -> ``experts.down_proj[e]``); the same
    mapping is applied here, expert by expert (see :class:`_StackedExperts`).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.bytes_read = 0
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            self.where = json.loads(index.read_text())["weight_map"]
        else:
            from safetensors import safe_open

            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"no *.safetensors weights in {self.path}")
            self.where = {}
            for file in files:
                with safe_open(file, "pt") as handle:
                    self.where.update({key: file.name for key in handle.keys()})

    def _on_disk(self, key: str):
        """The on-disk source of an in-memory Mixtral MoE key: a key, a :class:`_StackedExperts`, or None."""
        prefix, sep, leaf = key.partition(".mlp.")
        moe = f"{prefix}.block_sparse_moe."
        if not sep or f"{moe}gate.weight" not in self.where:
            return None
        if leaf == "gate.weight":
            return f"{moe}gate.weight"
        if leaf == "experts.gate_up_proj":
            return _StackedExperts(self, lambda e: (f"{moe}experts.{e}.w1.weight", f"{moe}experts.{e}.w3.weight"))
        if leaf == "experts.down_proj":
            return _StackedExperts(self, lambda e: (f"{moe}experts.{e}.w2.weight",))
        return None

    def __contains__(self, key) -> bool:
        return key in self.where or self._on_disk(key) is not None

    def __getitem__(self, key: str):
        return self.read(key)

    def read(self, key: str, dim: int | None = None, part: int = 0, parts: int = 1):
        """Tensor ``key``, or only its ``part``-th of ``parts`` contiguous chunks along ``dim``
        (safetensors' ``get_slice``: the other chunks are never read). An in-memory Mixtral expert key
        gives a :class:`_StackedExperts` when read whole. Adds what it read to ``bytes_read``."""
        from safetensors import safe_open

        if key not in self.where:
            source = self._on_disk(key)
            if source is None:
                raise KeyError(f"{key} not in the checkpoint {self.path}")
            if isinstance(source, _StackedExperts):  # stored one tensor per expert: parts = experts
                if dim not in (None, 0):
                    raise ValueError(f"{key} is stored per expert; it can be read whole or by expert (dim 0)")
                return source if dim is None else source[part].unsqueeze(0)
            return self.read(source, dim, part, parts)
        with safe_open(self.path / self.where[key], "pt") as handle:
            if dim is None:
                tensor = handle.get_tensor(key)
            else:
                view = handle.get_slice(key)
                length = view.get_shape()[dim]
                size = check_divisible(length, parts, f"dim {dim} of {key}", "the number of parts")
                index = [slice(None)] * len(view.get_shape())
                index[dim] = slice(part * size, (part + 1) * size)
                tensor = view[tuple(index)]
        self.bytes_read += tensor.numel() * tensor.element_size()
        return tensor

    def get(self, key, default=None):
        return self[key] if key in self else default
