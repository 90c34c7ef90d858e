"""Conversion outputs that are whole or absent, and verifiable afterwards.

A converter writes into :func:`staged_output`'s temporary sibling directory; when it returns, every file
is hashed (and fsynced) into ``conversion_manifest.json`` (source, layout, tool version, size and sha256 of
every file), the directory is fsynced and renamed to the target, and the parent fsynced. An exception
removes the temporary directory and leaves an existing target untouched. An existing target is replaced
only with ``overwrite``. :func:`check_output` re-verifies a written directory (``rasa-convert check``).
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


@contextlib.contextmanager
def staged_output(target: str | os.PathLike, source: dict, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``target`` to write into; on success manifest it (``source``:
    what was converted, e.g. ``{"checkpoint": ..., "layout": {...}}``) and rename it to ``target``."""
    target = Path(target)
    refuse_existing(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        files = {name: file_digest(tmp / name) for name in directory_files(tmp, MANIFEST)}
        write_json(tmp / MANIFEST, {"format_version": FORMAT_VERSION, "tool": f"rasa_megatron {__version__}",
                                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                    "source": source, "files": files})
        for directory in {tmp, *((tmp / name).parent for name in files)}:  # the new entries are durable
            fsync_directory(directory)
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        fsync_directory(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


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
