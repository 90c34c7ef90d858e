"""RaSA under DeepSpeed ZeRO (stages 2 and 3): resident pools, gathered saves, fp32 masters.

Why the pool needs care under ZeRO-3: ZeRO-3 gathers a parameter when a module that owns it
starts its forward and releases it when the module ends. A pool (``model.rasa_pools.<type>``) is
used by all ``L`` layers of its module type but owned by none of them, so left alone it is either
never gathered (the layers would read an empty partition) or, registered as an external parameter
of each layer, gathered and released ``L`` times forward and again backward. Pools are tiny
(``L k (a + b)`` numbers per module type), so :func:`keep_pools_resident` makes them *persistent*
ZeRO-3 parameters: gathered once, kept on every rank, and re-gathered once after each optimizer
step (DeepSpeed's own persistence mechanism, the one it uses for small parameters). Their gradient
is still reduce-scattered and their fp32 master and optimizer state stay partitioned.

Saving (the classic PEFT + ZeRO-3 failure is an empty or partial adapter file): only the adapter
parameters are gathered, never the base model, and the values written are DeepSpeed's fp32 master
copies, not the bf16 compute copies.
"""
from __future__ import annotations

import contextlib
import os
from collections import Counter

import torch
import torch.distributed as dist
from torch import nn

from ..adapter import export_peft_lora, save_adapter
from ..inject import POOLS_ATTR, adapter_state_dict, rasa_layers


def is_zero3_param(param: torch.Tensor) -> bool:
    """Whether ``param`` is partitioned by DeepSpeed ZeRO-3."""
    return hasattr(param, "ds_id")


def pool_parameters(model: nn.Module) -> list[nn.Parameter]:
    """All pool parameters (``A_shared``, ``B_shared`` of every module type), each once."""
    pools = getattr(model, POOLS_ATTR, None)
    return [] if pools is None else list(pools.parameters())


def keep_pools_resident(engine, persistent: bool = True) -> list[nn.Parameter]:
    """Make every RaSA pool a persistent ZeRO-3 parameter of ``engine`` (no-op below stage 3).

    Each pool is registered as an external parameter of the layers that read it (so DeepSpeed's
    coordinator knows who needs it) and marked ``ds_persist`` and added to the engine's persistent
    list, which DeepSpeed all-gathers once after every optimizer step. With ``persistent=False``
    only the registration is done (correct, but each pool is gathered and released by every layer:
    the behaviour this function exists to avoid; kept for the collective-count test). Returns the
    pool params.
    """
    import deepspeed

    model = engine.module
    pools = pool_parameters(model)
    if not pools or not all(is_zero3_param(p) for p in pools):
        return pools
    offload = getattr(engine.optimizer, "parameter_offload", None)
    persistent_list = getattr(offload, "persistent_parameters", None)
    if persistent_list is None:
        raise RuntimeError("this DeepSpeed version does not expose optimizer.parameter_offload.persistent_parameters; "
                           "keep_pools_resident supports DeepSpeed ZeRO-3 >= 0.14")
    for reader, pool in pool_readers(model):
        for param in (pool.A_shared, pool.B_shared):
            deepspeed.zero.register_external_parameter(reader, param)
    if not persistent:
        return pools
    known = {id(p) for p in persistent_list}
    for param in pools:
        param.ds_persist = True
        if id(param) not in known:
            persistent_list.append(param)
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    unavailable = [p for p in pools if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
    if unavailable:
        unavailable[0].all_gather(unavailable)
    return pools


def pool_readers(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """``(module whose forward hooks must fetch the pool, pool)`` for every adapter unit.

    A :class:`RaSALinear` reads its pool in its own forward. A stacked-expert adapter is called from
    its :class:`RaSAExperts`' forward; and when an ancestor is a ZeRO-3 leaf module (the sparse-MoE
    block), DeepSpeed fetches parameters only at the outermost leaf (its own, recursively, plus its
    external ones), so the pool is registered there.
    """
    from ..experts import RaSAExpertWeights

    try:
        from deepspeed.utils import z3_leaf_module
    except ImportError:  # pragma: no cover - DeepSpeed < 0.14
        def z3_leaf_module(module):
            return False
    modules = dict(model.named_modules())
    pairs = []
    for name, unit in rasa_layers(model).items():
        if unit.pool is None:
            continue
        reader_name = name.rpartition(".")[0] if isinstance(unit, RaSAExpertWeights) else name
        parts = reader_name.split(".")
        for depth in range(1, len(parts) + 1):  # outermost leaf ancestor wins
            ancestor = ".".join(parts[:depth])
            if z3_leaf_module(modules[ancestor]):
                reader_name = ancestor
                break
        pairs.append((modules[reader_name], unit.pool))
    return pairs


class AllGatherCounter:
    """Counts, per parameter, how often ZeRO-3 all-gathers it (wraps each parameter's gather hooks
    and counts a parameter when a gather is issued for it while it is partitioned).

    Use as a context manager around training steps; ``counts[name]`` is the number of all-gather
    calls that included parameter ``name``.
    """

    def __init__(self, model: nn.Module):
        self.named = {name: p for name, p in model.named_parameters() if is_zero3_param(p)}
        self.counts: Counter = Counter()
        self._originals = {}

    def __enter__(self):
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        names = {id(p): n for n, p in self.named.items()}

        def wrap(param, attr):
            original = getattr(param, attr)

            def counted(*args, **kwargs):
                params = args[0] if args and args[0] is not None else kwargs.get("param_list") or [param]
                for p in params:  # DeepSpeed skips params already gathered or in flight: so do we
                    if id(p) in names and p.ds_status == ZeroParamStatus.NOT_AVAILABLE:
                        self.counts[names[id(p)]] += 1
                return original(*args, **kwargs)

            self._originals[(id(param), attr)] = (param, attr, original)
            setattr(param, attr, counted)

        # the coordinator calls params[0].all_gather_coalesced(params); the post-step persistent
        # gather calls params[0].all_gather(params): wrapping the first element's is enough, but
        # every parameter may be first, so wrap all.
        for param in self.named.values():
            wrap(param, "all_gather_coalesced")
            wrap(param, "all_gather")
        return self

    def __exit__(self, *exc):
        for param, attr, original in self._originals.values():
            setattr(param, attr, original)
        self._originals.clear()
        return False


def _gathered(params: list[nn.Parameter]):
    import deepspeed

    zero3 = [p for p in params if is_zero3_param(p)]
    return deepspeed.zero.GatheredParameters(zero3, modifier_rank=None) if zero3 else contextlib.nullcontext()


@contextlib.contextmanager
def full_precision_adapter(engine):
    """Context in which ``engine.module``'s adapter parameters hold their full fp32 master values
    on every rank (collective: every rank must enter). The base model is never gathered."""
    from deepspeed.utils import safe_get_full_fp32_param

    model = engine.module
    params = list(adapter_state_dict(model).values())
    with _gathered(params):
        masters = []
        for param in params:
            master = safe_get_full_fp32_param(param) if engine.optimizer is not None else None
            masters.append(param.data.float().clone() if master is None else master.detach().clone())
        originals = [p.data for p in params]
        for param, master, original in zip(params, masters, originals):
            param.data = master.to(original.device).reshape(original.shape)
        try:
            yield model
        finally:
            for param, original in zip(params, originals):
                param.data = original


def save_adapter_distributed(engine, adapter_dir: str | os.PathLike | None,
                             peft_dir: str | os.PathLike | None = None) -> None:
    """Write the project adapter and/or the PEFT LoRA export of a DeepSpeed-trained model.

    Collective: every rank gathers the adapter parameters (fp32 masters); rank 0 writes, atomically;
    all ranks wait for the files before returning.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    with full_precision_adapter(engine) as model:
        if rank == 0:
            if adapter_dir is not None:
                save_adapter(model, adapter_dir)
            if peft_dir is not None:
                export_peft_lora(model, peft_dir)
    if dist.is_initialized():
        dist.barrier()
