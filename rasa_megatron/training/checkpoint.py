"""Checkpoint directories shared by both engines: naming, the atomic ``latest`` pointer, atomic
file writes and the resume-compatibility check.

Layout (``output.dir``)::

    checkpoints/
      latest                 the tag of the newest complete checkpoint (written last, atomically)
      step0000500/           one directory per saved optimizer step (``step{N:07d}``)

What each engine writes inside a step directory is its own (DeepSpeed engine states, or per-rank
adapter shards for the Megatron engine); ``latest`` only moves once every rank has written.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .recipe import Recipe

CHECKPOINTS = "checkpoints"
LATEST = "latest"
RECIPE_FILE = "recipe.json"
#: recipe values a checkpoint's data position and adapter depend on: a resume must keep them
RESUME_KEYS = (("train", "global_batch_size"), ("train", "seed"), ("data", "mode"), ("data", "seq_len"),
               ("data", "group_by_length"), ("adapter", "method"), ("adapter", "r"), ("adapter", "k"),
               ("adapter", "alpha"), ("adapter", "target_modules"), ("adapter", "target_parameters"))


def checkpoint_root(out_dir: str | os.PathLike) -> Path:
    """``<out_dir>/checkpoints``."""
    return Path(out_dir) / CHECKPOINTS


def step_tag(step: int) -> str:
    """The directory name of the checkpoint after global step ``step``: ``step{step:07d}``."""
    return f"step{step:07d}"


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_latest(root: str | os.PathLike, tag: str) -> None:
    """Point ``<root>/latest`` at ``tag`` (atomic; call after every rank has written ``tag``)."""
    atomic_write_text(Path(root) / LATEST, tag)


def resolve_checkpoint(path: str | os.PathLike, tag: str | None = None) -> tuple[Path, str]:
    """``(root, tag)`` of a checkpoint given its root (with ``latest``) or a tag directory.

    A tag directory is recognised by DeepSpeed's ``*model_states.pt`` files or by the Megatron
    engine's ``layout.json``. Raises FileNotFoundError naming what is missing.
    """
    path = Path(path)
    if tag is None and not (path / LATEST).is_file() and (any(path.glob("*model_states.pt"))
                                                          or (path / "layout.json").is_file()):
        return path.parent, path.name
    if tag is None:
        if not (path / LATEST).is_file():
            raise FileNotFoundError(f"{path} is neither a DeepSpeed checkpoint root (no 'latest' file) nor a tag "
                                    "directory (no *model_states.pt)")
        tag = (path / LATEST).read_text().strip()
    if not (path / tag).is_dir():
        raise FileNotFoundError(f"checkpoint tag {tag!r} not found under {path}")
    return path, tag


def check_resume_compatible(saved: dict, current: dict, why: str) -> None:
    """Refuse to resume when a value the checkpoint depends on changed, naming every difference
    (``key old -> new``); ``why`` says what would go wrong. Raises SystemExit."""
    differ = {key: (saved.get(key), value) for key, value in current.items() if saved.get(key) != value}
    if differ:
        what = ", ".join(f"{key} {old} -> {new}" for key, (old, new) in differ.items())
        raise SystemExit(f"error: cannot resume: {why} ({what})")


def write_recipe_record(tag_dir: str | os.PathLike, recipe: Recipe) -> None:
    """``<tag_dir>/recipe.json``: the recipe that wrote the checkpoint (rank 0 calls it)."""
    atomic_write_text(Path(tag_dir) / RECIPE_FILE, json.dumps(recipe.to_dict(), indent=2))


def check_resume_recipe(tag_dir: str | os.PathLike, recipe: Recipe) -> None:
    """Refuse to resume ``tag_dir`` with a recipe whose :data:`RESUME_KEYS` differ from those that wrote
    it (another global batch, seed, data shaping or adapter), naming each; checkpoints without a
    ``recipe.json`` are not checked."""
    record = Path(tag_dir) / RECIPE_FILE
    if not record.is_file():
        return
    saved, current = json.loads(record.read_text()), recipe.to_dict()
    check_resume_compatible({f"{s}.{k}": saved.get(s, {}).get(k) for s, k in RESUME_KEYS},
                            {f"{s}.{k}": current[s][k] for s, k in RESUME_KEYS},
                            f"{tag_dir} was written by a run with other settings; the data position or the adapter "
                            "would not match")
