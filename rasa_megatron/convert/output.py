"""Conversion outputs that are whole or absent, and verifiable afterwards.

A converter writes into :func:`staged_outputs`' temporary sibling directories; when it returns, every
file is hashed (and fsynced) into each ``conversion_manifest.json`` (source, layout, tool version, size
and sha256 of every file), and all directories are renamed to their targets in one short step, or none
is. An exception removes the temporary directories and leaves existing targets as they were. An existing
target is replaced only with ``overwrite``. :func:`check_output` re-verifies a written directory (``rasa-convert check``).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

from .. import __version__
from ..training.checkpoint import check_file, directory_files, file_digest
from ..training.state_io import fsync_directory, read_json, write_json

MANIFEST = "conversion_manifest.json"
FORMAT_VERSION = 1


def refuse_existing(target: str | os.PathLike, overwrite: bool) -> None:
    """Raise FileExistsError when ``target`` exists and ``overwrite`` is off (call before any work)."""
    target = Path(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; pass --overwrite to replace it")
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory; refusing to replace it")


def refuse_overlapping(targets, inputs=()) -> None:
    """Raise ValueError when an output lies inside another output or inside an input, or an input inside
    an output (replacing one would delete the other)."""
    outs = [Path(t).resolve() for t in targets]
    for i, out in enumerate(outs):
        for j, other in enumerate(outs):
            if i != j and (out == other or other in out.parents):
                raise ValueError(f"output {out} lies inside (or is) output {other}; give separate directories")
        for source in inputs:
            source = Path(source).resolve()
            if out == source or source in out.parents or out in source.parents:
                raise ValueError(f"output {out} overlaps the input {source}; write it elsewhere")


def _manifest(tmp: Path, source: dict) -> None:
    files = {name: file_digest(tmp / name) for name in directory_files(tmp, MANIFEST)}
    write_json(tmp / MANIFEST, {"format_version": FORMAT_VERSION, "tool": f"rasa_megatron {__version__}",
                                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                "source": source, "files": files})
    for directory in {tmp, *((tmp / name).parent for name in files)}:  # the new entries are durable
        fsync_directory(directory)


def _commit(staged: dict[Path, Path], overwrite: bool) -> None:
    """Rename every staged directory to its target in one short step; an existing target (only with
    ``overwrite``) is set aside first and deleted at the end. A failure puts every target back as it was."""
    for target in staged:
        refuse_existing(target, overwrite)
    moved: list[tuple[Path, Path | None]] = []
    try:
        for target, tmp in staged.items():
            old = None
            if target.exists():
                old = target.with_name(f".{target.name}.old-{os.getpid()}")
                os.replace(target, old)
            moved.append((target, old))
            os.replace(tmp, target)
            fsync_directory(target.parent)
    except BaseException:
        for target, old in reversed(moved):
            if target.exists() and target != old:
                shutil.rmtree(target, ignore_errors=True)
            if old is not None and old.exists():
                os.replace(old, target)
        raise
    for _, old in moved:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_outputs(targets: dict[str, str | os.PathLike], source: dict, overwrite: bool = False,
                   inputs=()) -> Iterator[dict[str, Path]]:
    """Yield ``{name: temporary directory beside its target}`` to write into; when the block succeeds
    every one gets its manifest (``source``: what was converted) and all are renamed to their targets
    together, or none is (a failure removes the temporary directories and leaves existing targets as
    they were). Outputs may not overlap each other or ``inputs``."""
    paths = {name: Path(target) for name, target in targets.items()}
    refuse_overlapping(paths.values(), inputs)
    for target in paths.values():
        refuse_existing(target, overwrite)
    created = [target.parent for target in paths.values() if not target.parent.exists()]
    tmps: dict[str, Path] = {}
    try:
        for name, target in paths.items():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmps[name] = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        yield dict(tmps)
        for tmp in tmps.values():
            _manifest(tmp, source)
        _commit({paths[name]: tmp for name, tmp in tmps.items()}, overwrite)
        created = []
    finally:
        for tmp in tmps.values():
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        for parent in sorted(created, key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                parent.rmdir()  # only if still empty


@contextlib.contextmanager
def staged_output(target: str | os.PathLike, source: dict, overwrite: bool = False) -> Iterator[Path]:
    """:func:`staged_outputs` of one directory."""
    with staged_outputs({"out": target}, source, overwrite) as tmps:
        yield tmps["out"]


def check_output(directory: str | os.PathLike) -> list[str]:
    """What is wrong with a conversion output against its manifest: a missing or unreadable manifest, a
    missing file, another size or sha256, a file the manifest does not list. Empty when intact."""
    directory = Path(directory)
    try:
        entries = read_json(directory / MANIFEST)["files"]
        entries.items()
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return [f"{directory / MANIFEST} is missing or unreadable ({err.__class__.__name__})"]
    problems = [problem for name, want in sorted(entries.items())
                if (problem := check_file(directory / name, want))]
    problems += [f"{directory / name} is not in the manifest" for name in directory_files(directory, MANIFEST)
                 if name not in entries]
    return problems
