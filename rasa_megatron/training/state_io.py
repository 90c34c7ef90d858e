"""Durable, pickle-free files for checkpoints: every byte a checkpoint holds goes through
:func:`write_bytes_durably` (temporary file, fsync, rename, fsync of the directory), and nested training
state (optimizer and scheduler state dicts, RNG states) is stored as ``<name>.safetensors`` (its tensors)
plus ``<name>.json`` (everything else), read back without unpickling anything.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch


def _write(handle, data: bytes) -> None:
    """The one place checkpoint bytes are written (the fault-injection tests replace it)."""
    handle.write(data)


def fsync_directory(path: str | os.PathLike) -> None:
    """Make a rename or a new file in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_durably(path: str | os.PathLike, data: bytes) -> None:
    """``data`` to a temporary file beside ``path``, flushed and fsynced, then renamed into place and the
    directory fsynced: a reader sees the old file or the whole new one. A failed write (ENOSPC, ...)
    removes the temporary file and re-raises."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as handle:
            _write(handle, data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def write_json(path: str | os.PathLike, obj) -> None:
    write_bytes_durably(path, json.dumps(obj, indent=1, sort_keys=True).encode())


def read_json(path: str | os.PathLike):
    return json.loads(Path(path).read_text())


def _split(obj, tensors: dict, where: str):
    """JSON-able form of ``obj`` with its tensors (and NumPy arrays) moved to ``tensors``."""
    if torch.is_tensor(obj):
        tensors[where] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": where}
    if isinstance(obj, np.ndarray):
        tensors[where] = torch.from_numpy(obj.astype(np.int64) if obj.dtype.kind in "ui" else obj.copy())
        return {"__ndarray__": where, "dtype": str(obj.dtype)}
    if isinstance(obj, dict):
        if all(isinstance(key, str) for key in obj):
            return {"__dict__": {key: _split(value, tensors, f"{where}.{key}") for key, value in obj.items()}}
        return {"__items__": [[_split(key, tensors, f"{where}.k{i}"), _split(value, tensors, f"{where}.{i}")]
                              for i, (key, value) in enumerate(obj.items())]}
    if isinstance(obj, (list, tuple)):
        items = [_split(value, tensors, f"{where}.{i}") for i, value in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    if isinstance(obj, torch.dtype):
        return {"__dtype__": str(obj).removeprefix("torch.")}
    raise TypeError(f"{where}: {type(obj).__name__} cannot be stored in a checkpoint (tensors, numbers, strings, "
                    "lists, tuples and dicts can)")


def _join(obj, tensors: dict):
    if isinstance(obj, list):
        return [_join(value, tensors) for value in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        return tensors[obj["__ndarray__"]].numpy().astype(obj["dtype"])
    if "__dict__" in obj:
        return {key: _join(value, tensors) for key, value in obj["__dict__"].items()}
    if "__items__" in obj:
        return {_join(key, tensors): _join(value, tensors) for key, value in obj["__items__"]}
    if "__tuple__" in obj:
        return tuple(_join(value, tensors) for value in obj["__tuple__"])
    if "__dtype__" in obj:
        return getattr(torch, obj["__dtype__"])
    raise ValueError(f"not a stored state: {sorted(obj)}")


def save_state(directory: str | os.PathLike, name: str, state) -> list[Path]:
    """``state`` (nested dicts / lists / tuples of tensors, arrays and plain values) as
    ``<name>.safetensors`` + ``<name>.json`` in ``directory``, durably; returns the two paths."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split(state, tensors, "s")
    directory = Path(directory)
    weights, meta = directory / f"{name}.safetensors", directory / f"{name}.json"
    write_bytes_durably(weights, save(tensors))
    write_json(meta, skeleton)
    return [weights, meta]


def load_state(directory: str | os.PathLike, name: str, device: str | torch.device = "cpu"):
    """What :func:`save_state` stored (tensors on ``device``); nothing is unpickled."""
    from safetensors.torch import load_file

    directory = Path(directory)
    tensors = load_file(directory / f"{name}.safetensors", device=str(device))
    return _join(read_json(directory / f"{name}.json"), tensors)
