"""Run-time choice between the ``rasa::`` extension kernels and their torch fallbacks.

``RASA_KERNELS`` (read on every call, so tests and benchmarks can switch it):

* ``auto`` (default): load the extension built for this torch and these sources if it is in the cache
  (``python -m rasa_megatron.ops.build`` puts it there; nothing is built at run time) and use its
  kernel for a tensor's device when one is registered, else the torch fallback;
* ``off``: always the torch fallback (:mod:`rasa_megatron.ops.philox`: the same masks, bit for bit);
* ``force``: build the extension if it is missing and fail when it has no kernel for the device.

``RASA_FUSED=0`` makes the layers run the reference path (``functional.rasa_linear`` through autograd)
instead of :mod:`rasa_megatron.ops.fused`; the benchmark compares the two.
"""
from __future__ import annotations

import os
import threading

import torch

from .philox import dropout_cast as torch_dropout_cast, dropout_cast_add_ as torch_dropout_cast_add_
from .philox import keep_mask as torch_keep_mask, masked_add_ as torch_masked_add_

MODES = ("auto", "off", "force")
_lock = threading.Lock()
_state: dict = {"loaded": None, "fake_registered": False, "missing": False}


def kernel_mode() -> str:
    mode = os.environ.get("RASA_KERNELS", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"RASA_KERNELS must be one of {list(MODES)}, got {os.environ.get('RASA_KERNELS')!r}")
    return mode


def fused_enabled() -> bool:
    """Whether the layers use the fused autograd path (``RASA_FUSED``, default on)."""
    value = os.environ.get("RASA_FUSED", "1").strip().lower()
    if value not in ("0", "1", "true", "false", "on", "off", ""):
        raise ValueError(f"RASA_FUSED must be 0 or 1, got {value!r}")
    return value in ("1", "true", "on", "")


def _registered(op: str, key: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"rasa::{op}", key)
    except RuntimeError:  # the operator is not defined: the library is not loaded
        return False


def _register_fakes() -> None:
    """Meta/fake kernels so ``torch.compile`` traces the ops (registered once, after the library loads)."""
    if _state["fake_registered"]:
        return

    @torch.library.register_fake("rasa::keep_mask")
    def _keep_mask_fake(x, seed, offset, threshold):
        return torch.empty_like(x, dtype=torch.bool)

    @torch.library.register_fake("rasa::dropout_cast")
    def _dropout_cast_fake(x, seed, offset, threshold, scale, dtype):
        return torch.empty_like(x, dtype=dtype)

    @torch.library.register_fake("rasa::masked_add_")
    def _masked_add_fake(out, src, seed, offset, threshold, scale):
        return None

    @torch.library.register_fake("rasa::dropout_cast_add_")
    def _dropout_cast_add_fake(out, src, x, seed, offset, threshold, scale, dtype):
        return torch.empty_like(x)

    _state["fake_registered"] = True


def _packaged_library():
    """``(path, manifest)`` of an extension compiled into the package by ``RASA_FORCE_BUILD=1 pip install``."""
    import glob
    import json
    from pathlib import Path

    here = Path(__file__).resolve().parent
    found = sorted(glob.glob(str(here / "_rasa_ops*.so")))
    try:
        manifest = json.loads((here / "_rasa_ops.json").read_text())
    except (OSError, ValueError):
        return None
    return (Path(found[0]), manifest) if found else None


def _cached_library(build_if_missing: bool):
    """The cache's library for this torch and these sources (built first if asked), or None."""
    from .build import build, library_path, read_manifest, sources_present

    if not sources_present():
        return None

    def usable() -> bool:
        manifest = read_manifest()
        return manifest is not None and manifest.get("torch") == torch.__version__ and library_path().exists()

    if not usable() and build_if_missing:
        build()
    return library_path() if usable() else None


def load_extension(build_if_missing: bool = False) -> str | None:
    """Load the extension for this torch (once per process): one compiled into the package
    (``RASA_FORCE_BUILD=1``), else the cache's; return its path, or None if there is none (remembered,
    so the ops do not search again on every call)."""
    with _lock:
        if _state["loaded"] is not None:
            return _state["loaded"]
        if _registered("dropout_cast", "CPU") or _registered("dropout_cast", "CUDA"):
            _state["loaded"] = "(loaded by the caller)"  # e.g. cpp_extension.load in this process
        else:
            packaged = _packaged_library()
            path = packaged[0] if packaged is not None and packaged[1].get("torch") == torch.__version__ else None
            if path is None:
                if _state["missing"] and not build_if_missing:
                    return None
                path = _cached_library(build_if_missing)
            if path is None:
                _state["missing"] = True
                return None
            torch.ops.load_library(str(path))
            _state["loaded"] = str(path)
        _register_fakes()
        return _state["loaded"]


def has_kernel(device: torch.device | str) -> bool:
    """Whether the ops will run the extension's kernel for ``device`` under the current ``RASA_KERNELS``."""
    from .build import OPS

    mode = kernel_mode()
    if mode == "off":
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(torch.device(device).type)
    loaded = load_extension(build_if_missing=mode == "force")
    ok = loaded is not None and key is not None and all(_registered(op, key) for op in OPS)
    if mode == "force" and not ok:
        raise RuntimeError(f"RASA_KERNELS=force but the rasa extension has no kernel for device {device} "
                           f"(library: {loaded or 'not built'}); build it with `python -m rasa_megatron.ops.build` "
                           "(`--cuda` for CUDA kernels; a library already loaded in this process stays loaded: "
                           "restart after rebuilding) or set RASA_KERNELS=auto for the torch fallback")
    return ok


def keep_mask(x: torch.Tensor, seed: int, offset: int, threshold: int) -> torch.Tensor:
    """Bool ``[x.shape]``: the elements dropout keeps under ``(seed, offset)``."""
    if has_kernel(x.device):
        return torch.ops.rasa.keep_mask(x.contiguous(), seed, offset, threshold)
    return torch_keep_mask(x, seed, offset, threshold)


def dropout_cast(x: torch.Tensor, seed: int, offset: int, threshold: int, scale: float,
                 dtype: torch.dtype) -> torch.Tensor:
    """``dropout(x)`` under ``(seed, offset)``, cast to ``dtype`` (one rounding)."""
    if has_kernel(x.device):
        return torch.ops.rasa.dropout_cast(x.contiguous(), seed, offset, threshold, scale, dtype)
    return torch_dropout_cast(x, seed, offset, threshold, scale, dtype)


def masked_add_(out: torch.Tensor, src: torch.Tensor, seed: int, offset: int, threshold: int, scale: float) -> None:
    """``out += dropout(src)`` in place under ``(seed, offset)`` (the dropout backward, accumulated)."""
    if has_kernel(out.device) and out.is_contiguous():
        torch.ops.rasa.masked_add_(out, src.contiguous(), seed, offset, threshold, scale)
    else:
        torch_masked_add_(out, src, seed, offset, threshold, scale)


def fused_enabled_for(x: torch.Tensor, dropout: float = 0.0) -> bool:
    """Whether a layer should take the fused path for input ``x``: ``RASA_FUSED`` on, no autocast (the
    fused Function picks its dtypes itself), and no active dropout under CUDA-graph capture (the Philox
    seed / offset are drawn in Python and would be frozen into the graph: the reference path's torch
    dropout is graph-safe)."""
    if not fused_enabled() or torch.is_autocast_enabled(x.device.type):
        return False
    return not (dropout > 0 and x.is_cuda and torch.cuda.is_current_stream_capturing())


def draw_dropout_seed(device: torch.device | str) -> tuple[int, int]:
    """``(seed, offset)`` for one dropout mask, drawn from the device's default generator.

    CUDA: the generator's Philox seed and offset, the offset advanced by 4 (the next draw gets another
    offset; our counters carry a tag bit torch's never do, so they never reuse torch's random numbers;
    under Megatron's RNG tracker ``fork()`` this is the forked state).
    CPU: a 62-bit seed drawn from the default generator (offset 0), so ``torch.manual_seed`` and the
    trackers' state swaps reproduce it."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        generator = torch.cuda.default_generators[index]
        offset = generator.get_offset()
        generator.set_offset(offset + 4)
        return generator.initial_seed() & (2 ** 63 - 1), offset
    return int(torch.randint(0, 2 ** 62, (), dtype=torch.int64).item()), 0


def dropout_cast_add_(out: torch.Tensor, src: torch.Tensor, x: torch.Tensor, seed: int, offset: int, threshold: int,
                      scale: float) -> torch.Tensor:
    """The dropout backward in one pass over one mask: ``out += dropout(src)`` in place, returns ``dropout(x)``."""
    if has_kernel(out.device) and out.is_contiguous():
        return torch.ops.rasa.dropout_cast_add_(out, src.contiguous(), x.contiguous(), seed, offset, threshold, scale,
                                                x.dtype)
    return torch_dropout_cast_add_(out, src, x, seed, offset, threshold, scale, x.dtype)
