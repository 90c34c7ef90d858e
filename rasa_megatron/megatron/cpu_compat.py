"""Run Megatron-core 0.16 on a CPU-only torch (tests, CPU smoke runs); never used when CUDA is there.

Megatron's GPU paths name the CUDA device directly in a few places that a CPU run reaches:
``torch.cuda.current_device()`` (rotary embedding, sequence-parallel collectives, p2p shapes),
``torch.cuda.synchronize()`` (p2p, the dist-checkpoint writer), ``torch.zeros(..., device="cuda")``
(the token counter of its schedules), ``Tensor.cuda()`` (the tied-embedding sync between the first
and last pipeline stage), the CUDA RNG tracker's ``fork`` (dropout regions), and the MoE
router reads ``moe_utils.te_general_gemm``, defined only when Transformer Engine imports. Megatron's
optimizers (``get_megatron_optimizer``, the distributed optimizer, gradient clipping) make their
scalars with ``torch.tensor/zeros(..., device="cuda")`` and accept only parameters whose
``Tensor.type()`` is ``torch.cuda.{Float,Half,BFloat16}Tensor``: inside ``megatron.core.optimizer``
(and the local multi-tensor fallbacks of ``megatron.core.utils``) ``device="cuda"`` means the CPU,
and ``Tensor.type()`` called from ``megatron.core.optimizer`` names the CPU type's CUDA twin. Each is
redirected to the CPU / the default RNG / the plain matmul path, and nothing else is changed: the
schedules, p2p, layers, optimizers and checkpointing that run are Megatron's own.
"""
from __future__ import annotations

import contextlib
import sys
import types

import torch

_ENABLED = False


def enable_cpu_megatron() -> bool:
    """Apply the redirections once (no-op, returning False, when CUDA is available)."""
    global _ENABLED
    if torch.cuda.is_available():
        return False
    if _ENABLED:
        return True
    from megatron.core import tensor_parallel, utils
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.transformer.moe import moe_utils

    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # a CPU-only torch has no other device
    tensor_parallel.get_cuda_rng_tracker().fork = lambda *args, **kwargs: contextlib.nullcontext()
    moe_utils.te_general_gemm = getattr(moe_utils, "te_general_gemm", None)
    for module in (schedules, optimizer, distrib_optimizer, clip_grads, utils):
        module.torch = _CpuDeviceTorch("torch")
    torch.Tensor.type = _optimizer_sees_cuda_types(torch.Tensor.type)
    _ENABLED = True
    return True


class _CpuDeviceTorch(types.ModuleType):
    """``torch`` as seen by the Megatron modules that name ``device="cuda"`` when making a tensor:
    those tensors land on the CPU; everything else is torch itself."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def zeros(*args, device=None, **kwargs):
        return torch.zeros(*args, device="cpu" if device == "cuda" else device, **kwargs)

    @staticmethod
    def tensor(*args, device=None, **kwargs):
        return torch.tensor(*args, device="cpu" if device == "cuda" else device, **kwargs)


def _optimizer_sees_cuda_types(tensor_type):
    """``Tensor.type()`` that answers ``torch.cuda.FloatTensor`` for a CPU ``torch.FloatTensor`` when
    (and only when) the caller is in ``megatron.core.optimizer``, whose type checks want GPU tensors."""
    def type_(self, *args, **kwargs):
        name = tensor_type(self, *args, **kwargs)
        if args or kwargs or self.device.type != "cpu":
            return name
        caller = sys._getframe(1).f_globals.get("__name__", "")
        return name.replace("torch.", "torch.cuda.", 1) if caller.startswith("megatron.core.optimizer") else name

    return type_
