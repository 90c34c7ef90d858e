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
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from .adapter import export_peft_lora, save_adapter
from .inject import POOLS_ATTR, adapter_state_dict, rasa_layers


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
    from .experts import RaSAExpertWeights

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


def rng_state() -> dict:
    import random

    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():  # adapter dropout on the GPU draws from this device's generator
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def rng_file(checkpoint_dir: str | os.PathLike, tag: str, rank: int) -> Path:
    return Path(checkpoint_dir) / tag / f"rasa_rng_rank{rank:05d}.pt"


def resolve_checkpoint(path: str | os.PathLike, tag: str | None = None) -> tuple[Path, str]:
    """``(root, tag)`` of a DeepSpeed checkpoint given its root (with ``latest``) or a tag directory."""
    path = Path(path)
    if tag is None and not (path / "latest").is_file() and any(path.glob("*model_states.pt")):
        return path.parent, path.name
    if tag is None:
        if not (path / "latest").is_file():
            raise FileNotFoundError(f"{path} is neither a DeepSpeed checkpoint root (no 'latest' file) nor a tag "
                                    "directory (no *model_states.pt)")
        tag = (path / "latest").read_text().strip()
    if not (path / tag).is_dir():
        raise FileNotFoundError(f"checkpoint tag {tag!r} not found under {path}")
    return path, tag


def adapter_tensors_from_zero_checkpoint(path: str | os.PathLike, tag: str | None = None
                                         ) -> tuple[dict[str, torch.Tensor], dict]:
    """fp32 adapter tensors (trainable parameters only, never the base) of a ZeRO-2/3 checkpoint
    and the RaSA config stored beside them (``rasa_config.json`` in the tag directory)."""
    import json

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    root, tag = resolve_checkpoint(path, tag)
    config_file = root / tag / "rasa_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: this checkpoint was not written by "
                                "rasa_megatron.trainer (or is a full fine-tuning checkpoint without adapters)")
    tensors = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag, exclude_frozen_parameters=True)
    return {k: v.float().contiguous() for k, v in tensors.items()}, json.loads(config_file.read_text())


def assign_adapter_tensors_(model: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """Put ``tensors`` (keys of :func:`adapter_state_dict`) into the adapter of ``model``, which may
    live on the meta device; names and shapes must match exactly (else ValueError listing them)."""
    params = adapter_state_dict(model)
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the model's adapter: missing {missing[:5]} "
                         f"({len(missing)} in all), unexpected {unexpected[:5]} ({len(unexpected)} in all)")
    bad = [f"{k}: checkpoint {tuple(tensors[k].shape)} vs model {tuple(p.shape)}" for k, p in params.items()
           if tuple(tensors[k].shape) != tuple(p.shape)]
    if bad:
        raise ValueError(f"adapter shapes differ: {bad[:5]}")
    modules = dict(model.named_modules())
    for key, value in tensors.items():
        owner, _, name = key.rpartition(".")
        module = modules[owner]
        old = getattr(module, name)
        if old.device.type == "meta":
            setattr(module, name, nn.Parameter(value.to(old.dtype), requires_grad=old.requires_grad))
        else:
            with torch.no_grad():
                old.copy_(value.to(old.dtype))
    return model


PORTABLE_WEIGHTS = "portable_state.safetensors"
PORTABLE_META = "portable_state.json"


def _inner_optimizer(engine):
    optimizer = engine.optimizer
    return getattr(optimizer, "optimizer", optimizer)


def optimizer_state_keys(engine) -> list[str]:
    """Per-element optimizer state names (``exp_avg`` for Lion; ``exp_avg``, ``exp_avg_sq`` for AdamW)."""
    keys = set()
    for state in _inner_optimizer(engine).state.values():
        keys.update(k for k, v in state.items() if torch.is_tensor(v) and v.numel() > 1)
    return sorted(keys)


def _create_optimizer_states(engine, keys: list[str], step) -> None:
    """Zero optimizer state on DeepSpeed's flat fp32 partitions (what the optimizer steps on)."""
    inner = _inner_optimizer(engine)
    for attr in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups", "fp32_groups_flat_partition"):
        flats = getattr(engine.optimizer, attr, None)
        if flats:
            break
    else:
        flats = [p for group in inner.param_groups for p in group["params"]]
    for flat in flats:
        state = inner.state[flat]
        for key in keys:
            state.setdefault(key, torch.zeros_like(flat))
        if step is not None and isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            state.setdefault("step", torch.tensor(float(step)))


def save_portable_state(engine, directory: str | os.PathLike, meta: dict) -> None:
    """World-size-independent training state of the trainable parameters: fp32 masters and
    per-element optimizer states by parameter name (gathered: collective), plus ``meta`` (step,
    scheduler, ...). Rank 0 writes ``portable_state.safetensors`` + ``.json`` atomically.

    Meant for adapters (small); DeepSpeed's own checkpoint remains the same-world-size resume.
    """
    import json

    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    from safetensors.torch import save_file

    rank = dist.get_rank() if dist.is_initialized() else 0
    tensors = {}
    keys = optimizer_state_keys(engine)
    for name, param in engine.module.named_parameters():
        if not param.requires_grad:
            continue
        tensors[f"param/{name}"] = safe_get_full_fp32_param(param).detach().float().cpu().contiguous()
        for key in keys:
            value = safe_get_full_optimizer_state(param, key)
            if value is not None:
                tensors[f"state/{key}/{name}"] = value.detach().float().cpu().contiguous()
    steps = {v["step"].item() if torch.is_tensor(v["step"]) else v["step"]
             for v in _inner_optimizer(engine).state.values() if "step" in v}
    if rank == 0:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".{PORTABLE_WEIGHTS}.tmp"
        save_file(tensors, tmp)
        os.replace(tmp, directory / PORTABLE_WEIGHTS)
        meta = {**meta, "optimizer_state_keys": keys, "optimizer_step": max(steps) if steps else None}
        tmp = directory / f".{PORTABLE_META}.tmp"
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, directory / PORTABLE_META)
    if dist.is_initialized():
        dist.barrier()


def load_portable_state(engine, directory: str | os.PathLike) -> dict:
    """Load :func:`save_portable_state` output into a fresh engine of any world size (collective).
    Names, shapes and optimizer-state names must match (else ValueError). Returns the meta dict."""
    import json

    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
    from safetensors.torch import load_file

    directory = Path(directory)
    if not (directory / PORTABLE_META).is_file():
        raise FileNotFoundError(f"{directory / PORTABLE_META} not found: not a portable training state")
    meta = json.loads((directory / PORTABLE_META).read_text())
    tensors = load_file(directory / PORTABLE_WEIGHTS)
    params = {n: p for n, p in engine.module.named_parameters() if p.requires_grad}
    saved = {k.removeprefix("param/") for k in tensors if k.startswith("param/")}
    if saved != set(params):
        raise ValueError(f"portable state does not match the model's trainable parameters: missing "
                         f"{sorted(set(params) - saved)[:5]}, unexpected {sorted(saved - set(params))[:5]}")
    keys = optimizer_state_keys(engine)
    if not keys:  # a fresh engine whose optimizer creates its state lazily (Lion, AdamW): create it
        _create_optimizer_states(engine, meta["optimizer_state_keys"], meta.get("optimizer_step"))
        keys = optimizer_state_keys(engine)
    if keys != meta["optimizer_state_keys"]:
        raise ValueError(f"optimizer state {meta['optimizer_state_keys']} was saved, this optimizer has {keys}")
    for name, param in params.items():
        full = tensors[f"param/{name}"]
        shape = tuple(getattr(param, "ds_shape", param.shape))
        if tuple(full.shape) != shape:
            raise ValueError(f"{name}: saved shape {tuple(full.shape)}, model {shape}")
        safe_set_full_fp32_param(param, full.to(engine.device))
        for key in keys:
            safe_set_full_optimizer_state(param, tensors[f"state/{key}/{name}"].to(engine.device), key)
    # the compute copies (bf16 or fp32) follow the masters
    trainable = list(params.values())
    zero3 = [p for p in trainable if is_zero3_param(p)]
    with (deepspeed.zero.GatheredParameters(zero3, modifier_rank=0) if zero3 else contextlib.nullcontext()):
        with torch.no_grad():
            for name, param in params.items():
                param.data.copy_(tensors[f"param/{name}"].to(param.dtype).reshape(param.data.shape))
    if meta.get("optimizer_step") is not None:
        for state in _inner_optimizer(engine).state.values():
            if "step" in state:
                state["step"] = (torch.full_like(state["step"], meta["optimizer_step"]) if torch.is_tensor(state["step"])
                                 else meta["optimizer_step"])
    return meta
