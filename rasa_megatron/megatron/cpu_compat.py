"""Run Megatron-core 0.16 on a CPU-only torch (tests, CPU smoke runs); never used when CUDA is there.

Megatron's GPU paths name the CUDA device directly in a few places that a CPU run reaches:
``torch.cuda.current_device()`` (rotary embedding, sequence-parallel collectives, p2p shapes),
``torch.cuda.synchronize()`` (p2p, the dist-checkpoint writer), ``torch.zeros(..., device="cuda")``
(the token counter of its schedules), ``Tensor.cuda()`` (the tied-embedding sync between the first
and last pipeline stage), the CUDA generator states of ``tensor_parallel.random`` (the RNG tracker
and activation recompute save, set and fork them), and the MoE router reads
``moe_utils.te_general_gemm``, defined only when Transformer Engine imports. Megatron's
optimizers (``get_megatron_optimizer``, the distributed optimizer, gradient clipping) make their
scalars with ``torch.tensor/zeros(..., device="cuda")`` and accept only parameters whose
``Tensor.type()`` is ``torch.cuda.{Float,Half,BFloat16}Tensor``: inside ``megatron.core.optimizer``
(and the local multi-tensor fallbacks of ``megatron.core.utils``) ``device="cuda"`` means the CPU,
and ``Tensor.type()`` called from ``megatron.core.optimizer`` names the CPU type's CUDA twin. Each is
redirected to the CPU / the plain matmul path, and nothing else is changed: the schedules, p2p,
layers, optimizers, RNG tracker, recompute and checkpointing that run are Megatron's own.

The RNG stand-in: on a CPU-only torch the generator that draws dropout masks of CPU tensors is the
CPU default generator, so it plays the device generator's part. ``model_parallel_cuda_manual_seed``
seeds it and adds the tracker's named states (``model-parallel-rng`` differs per TP rank, as on a
GPU), ``tracker.fork(name)`` really swaps that named state in and out, and recompute saves and
restores it with the tracker's states. So an unseeded tracker fails on CPU as it does on a GPU
(``cuda rng state model-parallel-rng is not added``), and dropout inside recomputed layers draws the
same masks twice. Megatron's warning that the CPU state changed inside a fork is dropped: here the
forked state *is* the CPU state.
"""
from __future__ import annotations

import logging
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
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import random as megatron_random
    from megatron.core.transformer.moe import moe_utils

    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # a CPU-only torch has no other device
    moe_utils.te_general_gemm = getattr(moe_utils, "te_general_gemm", None)
    for module in (schedules, optimizer, distrib_optimizer, clip_grads, utils):
        module.torch = _CpuDeviceTorch("torch")
    torch.Tensor.type = _optimizer_sees_cuda_types(torch.Tensor.type)
    megatron_random.torch = _CpuDeviceTorch("torch", cuda=_CpuGenerator("torch.cuda"))
    megatron_random._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    megatron_random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)
    logging.getLogger(megatron_random.__name__).addFilter(
        lambda record: "CPU RNG state changed within GPU RNG context" not in record.getMessage())
    _ENABLED = True
    return True


class _CpuDeviceTorch(types.ModuleType):
    """``torch`` as seen by the Megatron modules that name ``device="cuda"`` when making a tensor:
    those tensors land on the CPU; ``torch.cuda`` is ``cuda`` when given; everything else is torch itself."""

    def __init__(self, name: str, cuda: types.ModuleType | None = None):
        super().__init__(name)
        if cuda is not None:
            self.cuda = cuda

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


class _CpuGenerator(types.ModuleType):
    """``torch.cuda`` as seen by ``megatron.core.tensor_parallel.random``: its generator calls act on the
    CPU default generator (the one that draws CPU tensors' dropout masks); everything else is torch.cuda."""

    get_rng_state = staticmethod(lambda device="cuda": torch.get_rng_state())
    set_rng_state = staticmethod(lambda new_state, device="cuda": torch.set_rng_state(new_state))
    manual_seed = staticmethod(torch.manual_seed)

    def __getattr__(self, name):
        return getattr(torch.cuda, name)
