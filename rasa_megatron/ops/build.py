"""Build the ``rasa::`` torch extension (``csrc/``) with ``torch.utils.cpp_extension``.

    python -m rasa_megatron.ops.build            # CPU kernels, plus CUDA kernels when a CUDA toolkit is found
    python -m rasa_megatron.ops.build --cpu-only
    python path/to/rasa_megatron/ops/build.py --out DIR   # the same, runnable by file path in any torch env

The library goes to a cache folder keyed by the torch build, the Python version and a hash of the
sources (``$RASA_EXTENSION_DIR``, default ``~/.cache/rasa_megatron/extensions``), with a ``build.json``
naming what it holds; :mod:`rasa_megatron.ops.dispatch` loads it from there at run time and never
builds unless ``RASA_KERNELS=force``. This module imports only torch and the standard library.

CUDA: ``CUDA_HOME`` must name the toolkit (the folder holding ``bin/nvcc``); the CUDA headers that a
pip-installed CUDA torch keeps in ``site-packages/nvidia/cu13/include`` (cuBLAS, cuSPARSE, ...) are
added to the include path. ``--arch`` (default ``8.0 9.0``: A100, H100/H200) sets the SASS targets.
Device code is compiled with ``--fmad=false`` so its rounding equals the CPU kernels'.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import uuid
from pathlib import Path

NAME = "rasa_ops"
CSRC = Path(__file__).resolve().parents[2] / "csrc"
CPU_SOURCES = ("rasa_ops.cpp",)
CUDA_SOURCES = ("rasa_ops_cuda.cu",)
HEADERS = ("philox.h",)
OPS = ("keep_mask", "dropout_cast", "masked_add_", "dropout_cast_add_")
DEFAULT_ARCHES = ("8.0", "9.0+PTX")  # SASS for A100 and H100/H200, PTX that newer GPUs JIT-compile


def sources_present() -> bool:
    """Whether ``csrc/`` is here (a source checkout or an editable install; a wheel ships none)."""
    return all((CSRC / name).exists() for name in (*CPU_SOURCES, *CUDA_SOURCES, *HEADERS))


def source_hash() -> str:
    """sha256 (first 16 hex digits) over every source and header, so a changed source is rebuilt."""
    if not sources_present():
        raise FileNotFoundError(f"the extension sources are not in {CSRC} (a wheel install ships none: build "
                                "from a source checkout, or install with RASA_FORCE_BUILD=1)")
    digest = hashlib.sha256()
    for name in (*CPU_SOURCES, *CUDA_SOURCES, *HEADERS):
        digest.update(name.encode() + b"\0" + (CSRC / name).read_bytes())
    return digest.hexdigest()[:16]


def torch_tag() -> str:
    import torch

    return f"torch-{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}"


def extension_dir(root: str | os.PathLike | None = None) -> Path:
    """``<root>/<torch build>-<source hash>``: where this torch's build of these sources lives."""
    base = Path(root or os.environ.get("RASA_EXTENSION_DIR") or Path.home() / ".cache" / "rasa_megatron" / "extensions")
    return base / f"{torch_tag()}-{source_hash()}"


def library_path(root=None) -> Path:
    return extension_dir(root) / f"{NAME}.so"


def read_manifest(root=None) -> dict | None:
    """The ``build.json`` of this torch's build, or None when there is none (or no sources to key it)."""
    try:
        return json.loads((extension_dir(root) / "build.json").read_text())
    except (OSError, ValueError):
        return None


def _cuda_include_dirs() -> list[str]:
    import torch

    site = Path(torch.__file__).resolve().parents[1]
    return [str(path) for path in sorted((site / "nvidia").glob("cu*/include")) if path.is_dir()]


def _is_toolkit(folder: Path) -> bool:
    return (folder / "bin" / "nvcc").exists() and any((folder / lib / "libcudart.so").exists() for lib in ("lib64", "lib"))


def cuda_toolkit() -> str | None:
    """The CUDA toolkit to build with: ``$CUDA_HOME`` (or ``$CUDA_PATH``) if set, else ``/usr/local/cuda``,
    ``/usr/local/cuda-*`` (newest first), else the folder above ``nvcc`` on PATH; a toolkit must hold
    ``bin/nvcc`` and ``libcudart.so`` (an ``nvcc`` wrapper script outside the toolkit is not one)."""
    import glob
    import shutil

    for name in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(name):
            return os.environ[name] if _is_toolkit(Path(os.environ[name])) else None
    candidates = [Path("/usr/local/cuda")] + [Path(p) for p in sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(os.path.realpath(nvcc)).parents[1])
    return next((str(c) for c in candidates if _is_toolkit(c)), None)


def build(cuda: bool | None = None, arches=DEFAULT_ARCHES, root=None, verbose: bool = False) -> Path:
    """Compile and load the extension; return its folder (holding the library and ``build.json``).

    Args:
        cuda: compile the CUDA kernels too; None: when torch is a CUDA build and a toolkit is found.
        arches: compute capabilities for the CUDA kernels, e.g. ``("8.0", "9.0")``.
    """
    import torch
    from torch.utils import cpp_extension

    toolkit = cuda_toolkit()
    if toolkit is not None:  # what cpp_extension found at import may be an nvcc wrapper's folder
        cpp_extension.CUDA_HOME = toolkit
    if cuda is None:
        cuda = torch.version.cuda is not None and cuda_toolkit() is not None
    if cuda and torch.version.cuda is None:
        raise RuntimeError(f"torch {torch.__version__} is a CPU build: it cannot build CUDA kernels (use --cpu-only)")
    if cuda and cuda_toolkit() is None:
        raise RuntimeError("no CUDA toolkit found: set CUDA_HOME to the folder holding bin/nvcc and lib64/libcudart.so "
                           f"(CUDA_HOME={os.environ.get('CUDA_HOME')!r}; or use --cpu-only)")
    bad = [a for a in arches if not a.removesuffix("+PTX").replace(".", "").isdigit() or "." not in a]
    if bad:
        raise ValueError(f"CUDA arches must look like '8.0', '9.0' or '9.0+PTX', got {bad}")
    folder = extension_dir(root)
    folder.mkdir(parents=True, exist_ok=True)
    sources = [str(CSRC / s) for s in CPU_SOURCES + (CUDA_SOURCES if cuda else ())]
    previous = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(arches)
    try:
        cpp_extension.load(
            name=NAME, sources=sources, build_directory=str(folder), is_python_module=False, with_cuda=cuda,
            extra_cflags=["-O3"], extra_include_paths=[str(CSRC)] + (_cuda_include_dirs() if cuda else []),
            extra_cuda_cflags=["-O3", "--fmad=false"], verbose=verbose)
    finally:
        if previous is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = previous
    kernels = {op: [key for key in ("CPU", "CUDA") if torch._C._dispatch_has_kernel_for_dispatch_key(f"rasa::{op}", key)]
               for op in OPS}
    manifest = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "python": sys.version.split()[0],
                "sources_sha256": source_hash(), "cuda_kernels": bool(cuda), "cuda_arches": list(arches) if cuda else [],
                "library": f"{NAME}.so", "kernels": kernels}
    tmp = folder / f"build.json.{os.getpid()}.{uuid.uuid4().hex}.tmp"  # ranks may build at once
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, folder / "build.json")
    return folder


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--cpu-only", action="store_true", help="build the CPU kernels only")
    group.add_argument("--cuda", action="store_true", help="require the CUDA kernels (fail without a toolkit)")
    parser.add_argument("--arch", nargs="+", default=list(DEFAULT_ARCHES), help="CUDA compute capabilities")
    parser.add_argument("--out", default=None, help="cache root (default $RASA_EXTENSION_DIR or ~/.cache/...)")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    try:
        folder = build(cuda=False if args.cpu_only else (True if args.cuda else None), arches=tuple(args.arch),
                       root=args.out, verbose=args.verbose)
    except (RuntimeError, ValueError, OSError, ImportError) as error:
        print(f"rasa extension build failed: {error}", file=sys.stderr)
        return 1
    print(json.dumps({"folder": str(folder), **json.loads((folder / "build.json").read_text())}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
