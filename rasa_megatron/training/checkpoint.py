"""Checkpoint directories shared by both engines: naming, the save protocol, manifests, verification and
the choice of the checkpoint to resume from.

Layout (``output.dir``)::

    checkpoints/
      latest                 the tag of the newest verified checkpoint (durable, written last)
      step0000500/           one directory per saved optimizer step (``step{N:07d}``)
        manifest.json        every file of the directory with its size and sha256 (written last)
      .step0000510.tmp/      a save in progress (renamed to step0000510/ once complete)

The save protocol (:func:`save_checkpoint_dir`, collective): every rank writes its files into the
temporary directory (each file durably: temporary file, fsync, rename, fsync of the directory); the
ranks agree that every write succeeded; the files are hashed (shared over the ranks) into
``manifest.json``; rank 0 renames the directory into place, then moves ``latest``, then prunes to
``output.keep_last``. A failed write anywhere (a full disk) removes the partial directory, leaves the
previous checkpoint and ``latest`` as they were and stops the run naming the path and the space needed.
Resuming verifies the manifest of the chosen checkpoint and falls back to the previous valid one, with
a warning naming the damaged one.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
from pathlib import Path

import torch.distributed as dist

from .control import agree, control_group
from .state_io import fsync_directory, read_json, write_bytes_durably, write_json

CHECKPOINTS = "checkpoints"
LATEST = "latest"
MANIFEST = "manifest.json"
_TAG = re.compile(r"step(\d{7})")


class CheckpointWriteError(SystemExit):
    """A checkpoint could not be written (the message names the path, the cause and the space needed)."""


def checkpoint_root(out_dir: str | os.PathLike) -> Path:
    """``<out_dir>/checkpoints``."""
    return Path(out_dir) / CHECKPOINTS


def step_tag(step: int) -> str:
    """The directory name of the checkpoint after global step ``step``: ``step{step:07d}``."""
    return f"step{step:07d}"


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier(group=control_group())


def _gather(obj) -> list:
    """``obj`` of every rank (host-side, over the control group)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=control_group())
    return out


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """``text`` to ``path`` durably (temporary file, fsync, rename)."""
    write_bytes_durably(path, text.encode())


def write_latest(root: str | os.PathLike, tag: str) -> None:
    """Point ``<root>/latest`` at ``tag`` (after the checkpoint is complete and verified)."""
    atomic_write_text(Path(root) / LATEST, tag)


def directory_files(directory: Path, manifest: str = MANIFEST) -> list[str]:
    """Relative paths of the files under ``directory`` (not ``manifest``, not ``*.tmp``), sorted."""
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*")
                  if p.is_file() and p.name != manifest and not p.name.endswith(".tmp"))


def file_digest(path: Path) -> dict:
    """``{"size", "sha256"}`` of ``path`` (read in 4 MiB chunks; the file is fsynced on the way)."""
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            sha.update(chunk)
        os.fsync(handle.fileno())  # the engines' own files (DeepSpeed's) are made durable here too
    return {"size": path.stat().st_size, "sha256": sha.hexdigest()}


def write_manifest(tag_dir: str | os.PathLike) -> dict:
    """Hash every file of ``tag_dir`` (rank 0 lists them; rank ``r`` of ``W`` hashes files ``r, r + W,
    ...``: a shared filesystem) and write ``manifest.json`` on rank 0. Collective; a file no rank could
    hash raises OSError on every rank (naming it). Returns the manifest."""
    tag_dir = Path(tag_dir)
    rank, world = _rank_world()
    files = _gather(directory_files(tag_dir) if rank == 0 else None)[0]
    mine, errors = {}, []
    for name in files[rank::world]:
        try:
            mine[name] = file_digest(tag_dir / name)
        except OSError as err:
            errors.append(f"{tag_dir / name}: {err}")
    parts = _gather((mine, errors))
    errors = [e for _, part_errors in parts for e in part_errors]
    if errors:
        raise OSError(f"cannot hash {'; '.join(errors[:3])}")
    manifest = {"files": {name: entry for part, _ in parts for name, entry in part.items()}}
    if rank == 0:
        write_json(tag_dir / MANIFEST, manifest)
    return manifest


def check_file(path: Path, want) -> str | None:
    """What is wrong with ``path`` against its manifest entry ``want`` (None when it matches)."""
    try:
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != want["size"]:
            return f"{path} has {path.stat().st_size} bytes, the manifest says {want['size']}"
        if file_digest(path)["sha256"] != want["sha256"]:
            return f"{path} does not match its sha256 in the manifest"
    except (OSError, KeyError, TypeError) as err:
        return f"{path} cannot be checked ({err.__class__.__name__}: {err})"
    return None


def verify_checkpoint(tag_dir: str | os.PathLike) -> list[str]:
    """What is wrong with ``tag_dir`` against its manifest (missing manifest or file, size, sha256);
    an empty list when it is intact. Collective (the files are hashed over the ranks; every rank
    reaches the same gather whatever it finds)."""
    tag_dir = Path(tag_dir)
    rank, world = _rank_world()
    problems = []
    try:
        entries = sorted(read_json(tag_dir / MANIFEST)["files"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        problems.append(f"{tag_dir / MANIFEST} is missing or unreadable ({err.__class__.__name__}): an interrupted save")
        entries = []
    for name, want in entries[rank::world]:
        problem = check_file(tag_dir / name, want)
        if problem:
            problems.append(problem)
    return sorted({p for part in _gather(problems) for p in part})


def checkpoint_size(tag_dir: str | os.PathLike) -> int:
    """Bytes of a checkpoint by its manifest (0 without one)."""
    try:
        return sum(entry["size"] for entry in read_json(Path(tag_dir) / MANIFEST)["files"].values())
    except (OSError, ValueError, KeyError):
        return 0


def checkpoint_tags(root: str | os.PathLike) -> list[str]:
    """Complete-looking checkpoint directories under ``root``, newest first (``latest``'s first)."""
    root = Path(root)
    tags = sorted((p.name for p in root.glob("step*") if p.is_dir() and _TAG.fullmatch(p.name)), reverse=True)
    latest = (root / LATEST).read_text().strip() if (root / LATEST).is_file() else None
    return ([latest] if latest in tags else []) + [t for t in tags if t != latest]


def select_checkpoint(path: str | os.PathLike) -> Path | None:
    """The checkpoint to resume from (collective): ``path`` is a checkpoint directory (refused, naming
    the bad file, unless intact) or a checkpoints root (the newest intact checkpoint, ``latest``'s
    first; a damaged one is reported by path and the previous one used). None when the root holds no
    intact checkpoint."""
    path = Path(path)
    rank, _ = _rank_world()
    if _TAG.fullmatch(path.name):
        problems = verify_checkpoint(path)
        if problems:
            raise SystemExit(f"error: cannot resume from {path}: {'; '.join(problems[:3])}")
        return path
    for tag in checkpoint_tags(path):
        problems = verify_checkpoint(path / tag)
        if not problems:
            return path / tag
        if rank == 0:
            print(f"warning: skipping damaged checkpoint {path / tag}: {'; '.join(problems[:3])}; trying the "
                  "previous one", file=sys.stderr, flush=True)
    return None


def set_aside_newer_checkpoints(root: str | os.PathLike, chosen: str) -> list[str]:
    """Rename the checkpoints of ``root`` newer than ``chosen`` (a damaged newest one, or those past an
    explicitly chosen older step) to ``abandoned.stepN``, so that neither pruning nor a later fallback
    mixes them into the resumed run; rank 0, then a barrier. Returns the renamed tags."""
    root = Path(root)
    rank, _ = _rank_world()
    newer = [tag for tag in checkpoint_tags(root) if tag > chosen]
    if rank == 0:
        for tag in newer:
            aside = root / f"abandoned.{tag}"
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(root / tag, aside)
            print(f"warning: {root / tag} is newer than the checkpoint resumed from; moved to {aside}",
                  file=sys.stderr, flush=True)
        if newer:
            fsync_directory(root)
    _barrier()
    return newer


def resolve_checkpoint(path: str | os.PathLike, tag: str | None = None) -> tuple[Path, str]:
    """``(root, tag)`` of a checkpoint given its root (with ``latest``) or a tag directory (one with a
    manifest or DeepSpeed's ``*model_states.pt``). Raises FileNotFoundError naming what is missing."""
    path = Path(path)
    if tag is None and not (path / LATEST).is_file() and ((path / MANIFEST).is_file()
                                                          or any(path.glob("*model_states.pt"))):
        return path.parent, path.name
    if tag is None:
        if not (path / LATEST).is_file():
            raise FileNotFoundError(f"{path} is neither a DeepSpeed checkpoint root (no 'latest' file) nor a tag "
                                    "directory (no manifest.json or *model_states.pt)")
        tag = (path / LATEST).read_text().strip()
    if not (path / tag).is_dir():
        raise FileNotFoundError(f"checkpoint tag {tag!r} not found under {path}")
    return path, tag


def prune_checkpoints(root: str | os.PathLike, keep_last: int | None, keep: str) -> list[str]:
    """Remove all but the newest ``keep_last`` checkpoints, never ``keep`` (the one just written) nor a
    newer one; rank 0. Returns the removed."""
    if not keep_last:
        return []
    removed = [tag for tag in checkpoint_tags(root)[keep_last:] if tag != keep and tag < keep]
    for tag in removed:
        shutil.rmtree(Path(root) / tag, ignore_errors=True)
    return removed


def save_checkpoint_dir(root: str | os.PathLike, step: int, write_fn, keep_last: int | None = None) -> Path:
    """The save protocol (collective, see the module docstring). ``write_fn(directory)`` writes this
    rank's files of the checkpoint after step ``step`` into ``directory``; returns the final directory."""
    root = Path(root)
    rank, _ = _rank_world()
    tag = step_tag(step)
    tmp, final = root / f".{tag}.tmp", root / tag
    previous = checkpoint_tags(root)
    if rank == 0:
        for stale in root.glob(".step*.tmp"):  # this step's and those of killed saves: one save at a time
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    error = None
    try:
        write_fn(tmp)
    except Exception as err:  # noqa: BLE001 - every rank must reach the agreement below, then all stop
        error = err
    if agree(0.0 if error else 1.0, "min"):
        try:
            write_manifest(tmp)
        except OSError as err:
            error = err
        if error is None and rank == 0:
            try:
                if final.exists():  # a re-save of this step (a resumed run's final checkpoint)
                    shutil.rmtree(final)
                os.replace(tmp, final)
                fsync_directory(root)
                write_latest(root, tag)
            except OSError as err:
                error = err
    failures = [f"rank {r}: {e}" for r, e in enumerate(_gather(None if error is None else str(error))) if e]
    if failures:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        _barrier()
        usage = shutil.disk_usage(root)
        needed = checkpoint_size(root / previous[0]) if previous else 0
        kept = f"{root / previous[0]} and {root / LATEST} are intact" if previous else "no earlier checkpoint exists"
        raise CheckpointWriteError(
            f"error: could not write checkpoint {final} ({'; '.join(failures)}); the partial checkpoint was removed "
            f"and {kept}. A checkpoint of this run takes about {needed / 2**20:.1f} MiB; "
            f"{usage.free / 2**20:.1f} MiB are free on the filesystem of {root}")
    if rank == 0:
        prune_checkpoints(root, keep_last, keep=tag)
    _barrier()
    return final


def check_resume_compatible(saved: dict, current: dict, why: str) -> None:
    """Refuse to resume when a value the checkpoint depends on changed, naming every difference
    (``key old -> new``); ``why`` says what would go wrong. Raises SystemExit."""
    differ = {key: (saved.get(key), value) for key, value in current.items() if saved.get(key) != value}
    if differ:
        what = ", ".join(f"{key} {old} -> {new}" for key, (old, new) in differ.items())
        raise SystemExit(f"error: cannot resume: {why} ({what})")
