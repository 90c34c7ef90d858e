"""Megatron distributed checkpoints (``torch_dist``) in the Megatron engine: resume checkpoints that
reshard (``output.save_format: torch_dist``) and model initialisation from one
(``megatron.pretrained_checkpoint``).

A resume checkpoint ``checkpoints/step{N:07d}/`` holds, through ``megatron.core.dist_checkpointing``,
the adapter entries of every chunk's own ``sharded_state_dict`` (the frozen base comes from the model
again) and the torch optimizer's per-parameter states laid out like their parameters
(``optimizer.state.<exp_avg|...>.<parameter key>``, Megatron's ``optim_state_to_sharding_state``), so
both load on any TP x PP x VPP x DP layout; beside them ``rank{r:05d}.safetensors/.json`` (step, LR
schedulers, optimizer hyperparameters and scalar states such as AdamW's ``step``, RNG) and the run's
records (``checkpoint.json`` with the layout). On the layout that wrote it every rank restores its own
RNG (dropout streams continue exactly); on another one the dropout streams are reseeded from
``(seed, step)`` (masks then differ from an uninterrupted run's, as they must: their shapes differ).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from ..convert.dist_checkpoint import resolve_dist_checkpoint
from ..convert.megatron_checkpoint import rank_name
from ..training.checkpoint import checkpoint_root, save_checkpoint_dir
from ..training.control import agree
from ..training.identity import DESCRIPTION_FILE, write_run_record
from ..training.rng import rng_state, set_rng_state
from ..training.state_io import load_state, read_json, save_state
from .checkpoint import layout
from .sharding import layout_free_key

def _sharded_entries(chunk) -> dict:
    """The ShardedTensor / ShardedTensorFactory entries of ``chunk.sharded_state_dict()`` (no objects)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    return {key: entry for key, entry in chunk.sharded_state_dict().items()
            if isinstance(entry, (ShardedTensor, ShardedTensorFactory))}


def _stored_key(entry) -> str:
    """The key an entry is stored under (pool factories build layout-free keys)."""
    return layout_free_key(entry.key)


def _split_entries(chunks: list) -> tuple[dict, dict]:
    """``(base, adapter)``: each ``{"chunk{v}": {key: entry}}``, the frozen and the trainable entries of
    each chunk's sharded state dict."""
    trainable = {id(p) for chunk in chunks for p in chunk.parameters() if p.requires_grad}
    base, adapter = {}, {}
    for v, chunk in enumerate(chunks):
        base[f"chunk{v}"], adapter[f"chunk{v}"] = {}, {}
        for key, entry in _sharded_entries(chunk).items():
            (adapter if id(entry.data) in trainable else base)[f"chunk{v}"][key] = entry
    return base, adapter


def adapter_sharded_state_dict(chunks: list) -> dict:
    """``{"chunk{v}": {key: entry}}``: the trainable (adapter) entries of each chunk's sharded state dict
    (MoE experts' with the expert axis and expert-data-parallel replica ids Megatron's SequentialMLP
    gives them). Raises ValueError when a trainable parameter has no entry."""
    trainable = {id(p): name for chunk in chunks for name, p in chunk.named_parameters() if p.requires_grad}
    _, entries = _split_entries(chunks)
    covered = {id(e.data) for chunk_entries in entries.values() for e in chunk_entries.values()}
    missing = [name for key, name in trainable.items() if key not in covered]
    if missing:
        raise ValueError(f"output.save_format: torch_dist: {len(missing)} adapter parameters have no "
                         f"dist-checkpoint entry ({missing[:3]}): use output.save_format: native")
    return entries


def _optimizer_params(optimizer) -> list[torch.nn.Parameter]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _split_optimizer_state(optimizer) -> tuple[dict, dict, list[str]]:
    """``(per-parameter tensor states {index: {name: tensor}}, scalar states {name: tensor}, tensor state
    names)`` of a torch optimizer; scalar states (AdamW's ``step``) must agree over the parameters."""
    state = optimizer.state_dict()["state"]
    tensors, scalars = {}, {}
    for index, param_state in state.items():
        tensors[index] = {}
        for name, value in param_state.items():
            if torch.is_tensor(value) and value.dim() > 0:
                tensors[index][name] = value
                continue
            value = torch.as_tensor(value)
            if name in scalars and not torch.equal(scalars[name], value):
                raise ValueError(f"optimizer state {name!r} differs between parameters; it cannot be resharded")
            scalars[name] = value
    names = sorted({name for param_state in tensors.values() for name in param_state})
    return tensors, scalars, names


def _sharded_optimizer_state(optimizer, model_entries: dict, tensors: dict) -> dict:
    """Megatron's sharding of ``tensors`` ({index: {name: tensor}}) like the parameters they belong to."""
    from megatron.core.dist_checkpointing.optimizer import (get_param_id_to_sharded_param_map,
                                                            optim_state_to_sharding_state)

    state = {"state": tensors, "param_groups": []}
    optim_state_to_sharding_state(state, get_param_id_to_sharded_param_map(model_entries,
                                                                            _optimizer_params(optimizer)))
    return state["state"]


#: Megatron's distributed-optimizer checkpoint format that reshards over every dimension: the flat
#: per-rank shards gathered and laid out like their parameters (``optimizer.state.<exp_avg|exp_avg_sq|
#: param>.<parameter key>``, ``param`` the fp32 master), as the replicated optimizer's states are
DISTOPT_METADATA = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}


def _instances(optimizer) -> list:
    """The distributed-optimizer instances of Megatron's (possibly chained: dense + expert) optimizer."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


@torch.no_grad()
def _initialise_adam_states(optimizer) -> None:
    """Zero AdamW states (``step`` included) in torch AdamW inside Megatron's distributed optimizer
    before a load: without Apex / Transformer Engine its ``state_dict`` reads every parameter's
    ``step`` and fails before the first step (the load then overwrites all of them). With Apex / TE
    (fused Adam, step in the parameter groups) nothing is done."""
    from megatron.core.optimizer.distrib_optimizer import HAVE_APEX_OR_TE

    for inner in [o.optimizer for o in _instances(optimizer)]:
        if HAVE_APEX_OR_TE or not isinstance(inner, torch.optim.Adam | torch.optim.AdamW):
            continue
        for group in inner.param_groups:
            for param in group["params"]:
                if not inner.state[param]:
                    inner.state[param].update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(param),
                                              exp_avg_sq=torch.zeros_like(param))


def _optimizer_sharded_state(recipe, optimizer, model_entries: dict, is_loading: bool) -> tuple[dict, dict]:
    """``(the optimizer's entries in the dist checkpoint, what the per-rank file holds)``: Megatron's
    distributed optimizer's own ``sharded_state_dict`` (fully reshardable), or the torch optimizer's
    per-parameter states sharded like their parameters plus its scalar states and hyperparameters."""
    if recipe.megatron.use_distributed_optimizer:
        if is_loading:
            _initialise_adam_states(optimizer)
        return optimizer.sharded_state_dict(model_entries, is_loading=is_loading, metadata=DISTOPT_METADATA), {}
    if is_loading:
        raise AssertionError("the torch optimizer's load is built by load_dist_checkpoint")
    tensors, scalars, names = _split_optimizer_state(optimizer)
    groups = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.state_dict()["param_groups"]]
    return (_sharded_optimizer_state(optimizer, model_entries, tensors),
            {"param_groups": groups, "optimizer_scalars": scalars, "optimizer_states": names})


def save_dist_checkpoint(recipe, identity: dict, step: int, chunks: list, optimizers: list, schedulers: list,
                         parallel_state) -> Path:
    """The resume checkpoint after ``step`` in ``torch_dist`` format (collective; the shared save
    protocol: staged, manifested, ``latest`` last, ``output.keep_last``). ``optimizers``: ``[the step's
    optimizer]``, the torch optimizer or Megatron's distributed optimizer."""
    from megatron.core import dist_checkpointing, tensor_parallel

    (optimizer,) = optimizers
    run_layout = layout(parallel_state, recipe.megatron.use_distributed_optimizer)

    def write(directory: Path) -> None:
        model_entries = adapter_sharded_state_dict(chunks)
        optimizer_entries, optimizer_record = _optimizer_sharded_state(recipe, optimizer, model_entries, False)
        dist_checkpointing.save({"model": model_entries, "optimizer": optimizer_entries}, str(directory))
        save_state(directory, rank_name(dist.get_rank()),
                   {"step": step, "schedulers": [s.state_dict() for s in schedulers], **optimizer_record,
                    "rng": {**rng_state(), "megatron_tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}})
        if dist.get_rank() == 0:
            write_run_record(directory, recipe, identity, step, {**run_layout, "save_format": "torch_dist"})

    return save_checkpoint_dir(checkpoint_root(recipe.output.dir), step, write, recipe.output.keep_last)


def _load(sharded: dict, path: Path, what: str) -> dict:
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    try:
        return dist_checkpointing.load(sharded, str(path))
    except (Exception, CheckpointException) as err:  # noqa: BLE001 - shape / key mismatches surface deep in DCP
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]  # DCP: per-rank tracebacks
        raise SystemExit(f"error: cannot load {what} from {path}: {lines[-1] if lines else err.__class__.__name__} "
                         "(another model or adapter config?)") from err


def _targets(entries: dict) -> dict:
    """``{(chunk, key): the tensor an entry fills}``, taken before loading (which replaces the entries)."""
    return {(chunk, key): entry.data for chunk, chunk_entries in entries.items() for key, entry in chunk_entries.items()}


@torch.no_grad()
def _copy_loaded(targets: dict, loaded: dict) -> None:
    for (chunk, key), tensor in targets.items():
        tensor.copy_(loaded[chunk][key])


def load_dist_checkpoint(recipe, tag_dir: Path, chunks: list, optimizers: list, schedulers: list,
                         parallel_state) -> int:
    """Restore a ``torch_dist`` resume checkpoint on this (any) layout; returns the step to continue from.
    ``optimizers``: ``[the step's optimizer]`` as for :func:`save_dist_checkpoint`; the checkpoint must
    have been written with the same kind (replicated torch or distributed)."""
    from megatron.core import tensor_parallel

    tag_dir = Path(tag_dir)
    (optimizer,) = optimizers
    saved_layout = read_json(tag_dir / DESCRIPTION_FILE)["layout"]
    distributed = recipe.megatron.use_distributed_optimizer
    if bool(saved_layout.get("use_distributed_optimizer")) != distributed:
        kind = "the replicated torch" if distributed else "Megatron's distributed"
        raise SystemExit(f"error: cannot resume {tag_dir}: it holds the state of {kind} optimizer; set "
                         f"megatron.use_distributed_optimizer: {str(not distributed).lower()} (as the run that wrote it)")
    current = {**layout(parallel_state, distributed), "save_format": "torch_dist"}
    same_layout = saved_layout == current
    own = load_state(tag_dir, rank_name(dist.get_rank() if same_layout else 0))
    model_entries = adapter_sharded_state_dict(chunks)
    targets = _targets(model_entries)
    if distributed:
        optimizer_entries, _ = _optimizer_sharded_state(recipe, optimizer, model_entries, True)
    else:
        params = _optimizer_params(optimizer)
        templates = {i: {name: torch.empty_like(p) for name in own["optimizer_states"]} for i, p in enumerate(params)}
        optimizer_entries = _sharded_optimizer_state(optimizer, model_entries, templates)
    loaded = _load({"model": model_entries, "optimizer": optimizer_entries}, tag_dir,
                   "the adapter and optimizer state")
    _copy_loaded(targets, loaded["model"])
    if distributed:
        _load_distributed_optimizer(optimizer, loaded["optimizer"], tag_dir)
    else:
        _load_torch_optimizer(optimizer, own, loaded["optimizer"])
    for scheduler, saved in zip(schedulers, own["schedulers"], strict=True):
        scheduler.load_state_dict(saved)
    step = int(own["step"])
    if same_layout:
        set_rng_state(own["rng"])
        tensor_parallel.get_cuda_rng_tracker().set_states(own["rng"]["megatron_tracker"])
    else:
        seed = recipe.train.seed + 1_000_003 * step
        torch.manual_seed(seed)
        tensor_parallel.model_parallel_cuda_manual_seed(seed + 100 * parallel_state.get_pipeline_model_parallel_rank())
        if dist.get_rank() == 0:
            print(f"resuming {tag_dir} (written at {_layout_text(saved_layout)}) at {_layout_text(current)}: "
                  "adapter and optimizer state resharded; dropout streams reseeded from (seed, step)",
                  file=sys.stderr, flush=True)
    return step


def _load_distributed_optimizer(optimizer, loaded, tag_dir: Path) -> None:
    """Megatron's ``load_state_dict`` in its two parts per instance: hyperparameters, ``step`` and grad
    scaler, then the fully reshardable parameter state with torch AdamW's per-parameter ``step`` set
    aside meanwhile (megatron-core 0.16 copies every state the torch optimizer holds from the loaded
    ones, which leave ``step`` out: a KeyError without Apex / Transformer Engine), each ``step`` then
    given back as a tensor of its own."""
    instances = _instances(optimizer)
    states = [loaded] if len(instances) == 1 else [loaded[index] for index in sorted(loaded)]
    for instance, state in zip(instances, states, strict=True):
        state = dict(state)
        param_state, kind = state.pop("param_state"), state.pop("param_state_sharding_type")
        if kind != DISTOPT_METADATA["distrib_optim_sharding_type"]:
            raise SystemExit(f"error: cannot resume {tag_dir}: the distributed optimizer's state is stored as {kind!r}, expected "
                             f"{DISTOPT_METADATA['distrib_optim_sharding_type']!r}")
        instance.load_state_dict(state)
        steps = {param: param_states.pop("step") for param, param_states in instance.optimizer.state.items()
                 if "step" in param_states}
        try:
            instance.load_parameter_state_from_fully_reshardable(param_state)
        finally:
            for param, step in steps.items():  # one tensor per parameter: Megatron's load hands every
                instance.optimizer.state[param]["step"] = step.clone()  # parameter the same one, which torch
                # AdamW then increments once per parameter in place (its bias correction runs ahead)
    if hasattr(optimizer, "_synchronize_steps") and len(instances) > 1:
        optimizer._synchronize_steps()


def _load_torch_optimizer(optimizer, own: dict, loaded: dict) -> None:
    """The torch optimizer's state: per-parameter tensors from the dist checkpoint, scalar states and
    hyperparameters from the per-rank record."""
    params = _optimizer_params(optimizer)
    state = {i: {**{name: loaded[i][name] for name in own["optimizer_states"]},
                 **{name: value.clone() for name, value in own["optimizer_scalars"].items()}}
             for i in range(len(params))}
    groups = optimizer.state_dict()["param_groups"]
    if len(groups) != len(own["param_groups"]):
        raise SystemExit(f"error: cannot resume: the checkpoint's optimizer has {len(own['param_groups'])} "
                         f"parameter groups, this run's {len(groups)}")
    groups = [{**saved, "params": group["params"]} for group, saved in zip(groups, own["param_groups"])]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _layout_text(values: dict) -> str:
    return (f"TP{values['tensor_model_parallel_size']} x PP{values['pipeline_model_parallel_size']} x "
            f"VPP{values['virtual_pipeline_model_parallel_size']} x EP{values['expert_model_parallel_size']}, "
            f"world {values['world_size']}")


def load_pretrained_checkpoint(chunks: list, path, hf_config) -> bool:
    """Fill this rank's chunks from the ``torch_dist`` checkpoint ``path``: every base tensor (required),
    and the RaSA adapter when the checkpoint holds one (else the recipe's init stays). Returns whether an
    adapter was loaded. Raises SystemExit naming a missing key, a padded vocabulary or a shape mismatch."""
    from torch.distributed.checkpoint import FileSystemReader

    path = resolve_dist_checkpoint(path)
    stored = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    embedding = stored.get("embedding.word_embeddings.weight")
    if embedding is not None and embedding.size[0] != hf_config.vocab_size:
        raise SystemExit(f"error: megatron.pretrained_checkpoint {path}: its vocabulary is padded to "
                         f"{embedding.size[0]} rows, the model has vocab_size {hf_config.vocab_size}; convert "
                         "without --make-vocab-size-divisible-by")
    base, adapter = _split_entries(chunks)
    every = [e for part in (base, adapter) for entries in part.values() for e in entries.values()]
    # every rank decides alike (stages hold different keys): a refusal on one rank only would leave the
    # others waiting in the collective load
    has_adapter = bool(agree(float(any(_stored_key(e) in stored for entries in adapter.values()
                                       for e in entries.values())), "max"))
    wanted = every if has_adapter else [e for entries in base.values() for e in entries.values()]
    missing = sorted({_stored_key(e) for e in wanted if _stored_key(e) not in stored})
    if agree(float(bool(missing)), "max"):
        raise SystemExit(f"error: megatron.pretrained_checkpoint {path} lacks tensors this model needs"
                         + (f" ({len(missing)} on this rank: {missing[:3]})" if missing else " on another rank")
                         + ": is it of another model" + (" or adapter config?" if has_adapter else "?"))
    request = {**base, **({f"adapter_{k}": v for k, v in adapter.items()} if has_adapter else {})}
    targets = _targets(request)
    _copy_loaded(targets, _load(request, path, "the pretrained weights"))
    return has_adapter
