"""Run Megatron-core 0.16 on a CPU-only torch (tests, CPU smoke runs); never used when CUDA is there.

Megatron's GPU paths name the CUDA device directly in a few places that a CPU run reaches:
``torch.cuda.current_device()`` (rotary embedding, sequence-parallel collectives, p2p shapes),
``torch.cuda.synchronize()`` (p2p, the dist-checkpoint writer), ``torch.zeros(..., device="cuda")``
(the token counter of its schedules), ``Tensor.cuda()`` (the tied-embedding sync between the first
and last pipeline stage), the CUDA RNG tracker's ``fork`` (dropout regions), and the MoE
router reads ``moe_utils.te_general_gemm``, defined only when Transformer Engine imports. Each is
redirected to the CPU / the default RNG / the plain matmul path, and nothing else is changed: the
schedules, p2p, layers and checkpointing that run are Megatron's own.
"""
from __future__ import annotations

import contextlib
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
    from megatron.core import tensor_parallel
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.transformer.moe import moe_utils

    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # a CPU-only torch has no other device
    tensor_parallel.get_cuda_rng_tracker().fork = lambda *args, **kwargs: contextlib.nullcontext()
    moe_utils.te_general_gemm = getattr(moe_utils, "te_general_gemm", None)
    real_torch = torch

    class _SchedulesTorch(types.ModuleType):
        """``torch`` as seen by Megatron's schedules: ``zeros(device="cuda")`` lands on the CPU."""

        def __getattr__(self, name):
            return getattr(real_torch, name)

        @staticmethod
        def zeros(*args, device=None, **kwargs):
            return real_torch.zeros(*args, device="cpu" if device == "cuda" else device, **kwargs)

    schedules.torch = _SchedulesTorch("torch")
    _ENABLED = True
    return True
