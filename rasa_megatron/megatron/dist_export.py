"""``rasa-convert hf-to-megatron``: a HF model (and optionally a RaSA adapter) -> a Megatron distributed
checkpoint (``torch_dist``) that ``megatron.core.dist_checkpointing.load`` loads at any layout.

A dist checkpoint stores every tensor in its global view, so it is written from the model built in
this one process at TP 1 x PP 1 (a gloo world of one, no torchrun): the GPTModel of the HF config
(this project's local spec, RaSA wrappers when an adapter is given), its base on the meta device, the
adapter real (``load_hf_adapter_``); Megatron's own ``sharded_state_dict`` and ``dist_checkpointing.save``
write it, so the keys, shapes, replica ids and sharded objects are exactly those a model built on the
requested layout asks for, and dist-checkpoint resharding serves every other one. Memory: the base is
streamed (:func:`_streaming_strategy`): each base tensor is read from the safetensors
(``hf_to_megatron_sources``) and converted when torch DCP's serial writer writes it, so the peak is
about the largest tensor (plus its sources) and the adapter, not the model. The requested
``--tp/--pp/--vpp/--ep`` are checked against the model and recorded in ``checkpoint.json``.
"""
from __future__ import annotations

import contextlib
import copy
import os
import socket
from functools import partial
from pathlib import Path

import torch

from ..adapter import CONFIG_FILE, PEFT_CONFIG_FILE, WEIGHTS_FILE, read_adapter_config
from ..config import RaSAConfig
from ..convert.hf_checkpoint import SafetensorsCheckpoint
from ..convert.megatron_weights import hf_to_megatron_sources, transformer_config_from_hf
from ..convert.output import staged_output
from ..convert.peft_import import rasa_from_peft_lora
from ..parallel_layout import check_divisible, check_parallel_sizes
from ..training.identity import DESCRIPTION_FILE, DESCRIPTION_FORMAT, DESCRIPTION_VERSION
from ..training.state_io import write_json


def _read_rasa_adapter(adapter_dir: Path) -> tuple[dict[str, torch.Tensor], RaSAConfig]:
    """The project adapter in ``adapter_dir``, or a PEFT LoRA (a RaSA export, or any LoRA as k = 0) turned
    into RaSA tensors with the same per-layer updates (``convert.peft_import``)."""
    from safetensors.torch import load_file

    if (adapter_dir / PEFT_CONFIG_FILE).is_file() and not (adapter_dir / CONFIG_FILE).is_file():
        return rasa_from_peft_lora(adapter_dir)
    meta = read_adapter_config(adapter_dir)
    return load_file(adapter_dir / WEIGHTS_FILE), RaSAConfig.from_dict(meta["rasa_config"])


@contextlib.contextmanager
def _single_process_megatron():
    """A gloo world of one with Megatron's parallel state at TP 1 x PP 1 (CPU stand-ins without CUDA)."""
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel

    from .cpu_compat import enable_cpu_megatron

    owned = not dist.is_initialized()
    if owned:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    elif dist.get_world_size() != 1:
        raise RuntimeError("hf-to-megatron runs in one process; call it outside torchrun")
    if not torch.cuda.is_available():
        enable_cpu_megatron()
    parallel_state.initialize_model_parallel(1, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()
        if owned:
            dist.destroy_process_group()


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Megatron-LM's ``--make-vocab-size-divisible-by``: the vocabulary rounded up to a multiple of
    ``divisible_by x tp``."""
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


#: ``--dtype`` of the written base weights
BASE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _base_dtype(name: str, hf_config) -> torch.dtype:
    if name == "auto":
        configured = getattr(hf_config, "dtype", None)  # transformers 5 (torch_dtype before)
        configured = getattr(torch, configured) if isinstance(configured, str) else configured
        return configured if configured in BASE_DTYPES.values() else torch.float32
    if name not in BASE_DTYPES:
        raise ValueError(f"dtype {name!r}; valid: auto, {', '.join(BASE_DTYPES)}")
    return BASE_DTYPES[name]


def _plan_lines(hf_dir: Path, out: Path, overwrite: bool, base_names: dict, model, base_dtype, layout) -> list[str]:
    """What ``hf-to-megatron`` would write, and the memory it needs (the largest base tensor three times:
    its HF sources, the converted tensor, the written view; plus the adapter)."""
    def nbytes(tensor):
        return tensor.numel() * tensor.element_size()

    base = sum(nbytes(t) for t in base_names.values())
    largest_name, largest = max(((name, nbytes(t)) for name, t in base_names.items()), key=lambda item: item[1])
    base_ids = {id(t) for t in base_names.values()}
    adapter = sum(nbytes(p) for p in model.parameters() if id(p) not in base_ids)
    gib = 2 ** 30
    lines = [f"source: {hf_dir}", f"output: {out} (torch_dist: metadata.json, .metadata, one .distcp, common.pt, "
             "checkpoint.json, conversion_manifest.json)",
             f"layout it is meant for: TP{layout['tensor_model_parallel_size']} x PP{layout['pipeline_model_parallel_size']}"
             f" x VPP{layout['virtual_pipeline_model_parallel_size']} x EP{layout['expert_model_parallel_size']} "
             "(any other loads by resharding)",
             f"base: {len(base_names)} tensors, {base / gib:.3f} GiB in {str(base_dtype).removeprefix('torch.')}",
             f"adapter: {adapter / gib:.4f} GiB (fp32)",
             f"memory bound: about {(3 * largest + adapter) / gib:.3f} GiB + the Python / Megatron baseline "
             f"(3 x the largest base tensor, {largest_name}, plus the adapter), independent of depth"]
    if out.exists() and not overwrite:
        lines.append(f"{out} exists: pass --overwrite to replace it")
    return lines


def _zero_padded(source, rows: int) -> torch.Tensor:
    tensor = source()
    return torch.cat([tensor, tensor.new_zeros(rows - tensor.shape[0], *tensor.shape[1:])])


def _streaming_strategy(source_of: dict):
    """Megatron's ``torch_dist`` save strategy writing the base weights one tensor at a time: the model
    holds them on the meta device, and each write item's data is read and converted (``source_of``:
    ``{id(meta parameter): its source function}``) when torch DCP's serial writer asks for it, then
    taken as the same view (``as_strided``) Megatron's entry holds of its parameter (a swiglu half,
    a layer slice), so keys, shapes, replica ids and sharded objects stay exactly Megatron's. The
    (small) adapter tensors are real and written as they are."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.strategies.torch import (MCoreSavePlanner, TorchDistSaveShardedStrategy,
                                                                   _replace_state_dict_keys_with_sharded_keys,
                                                                   mcore_to_pyt_state_dict)
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as dcp_save

    class StreamingPlanner(MCoreSavePlanner):
        def __init__(self, regions: dict, **kwargs):
            super().__init__(**kwargs)
            self.regions = regions  # (key, global offset) -> (source, shape, dtype, the entry's view of it)
            self.last = (None, None)  # the last source converted: the two swiglu halves of fc1 come in turn

        def resolve_data(self, write_item):
            chunk = write_item.tensor_data.chunk if write_item.tensor_data is not None else None
            region = self.regions.get((write_item.index.fqn, tuple(chunk.offsets))) if chunk is not None else None
            if region is None:  # sharded objects, adapter tensors: as they are
                return super().resolve_data(write_item)
            source, shape, dtype, (size, stride, offset) = region
            if self.last[0] is not source:
                self.last = (None, None)  # the previous tensor freed first
                full = source().to(dtype).contiguous()  # the model's dtype, as load_state_dict would cast
                self.last = (source, full if full.storage_offset() == 0 else full.clone())  # as_strided's
            full = self.last[1]  # offset is absolute in the storage
            if tuple(full.shape) != shape:
                raise ValueError(f"{write_item.index.fqn}: the HF weights give {list(full.shape)}, the Megatron model "
                                 f"holds {list(shape)}")
            return full.as_strided(size, stride, offset).reshape(chunk.sizes).clone()

    class StreamingStrategy(TorchDistSaveShardedStrategy):
        def save(self, sharded_state_dict, checkpoint_dir):  # synchronous, torch's writer: one item at a time
            regions = {}
            for entry in nested_values(sharded_state_dict):
                if isinstance(entry, ShardedTensor) and entry.data.device.type == "meta":
                    root = entry.data if entry.data._base is None else entry.data._base
                    if id(root) not in source_of:
                        raise RuntimeError(f"{entry.key}: no source tensor for this base entry")
                    view = (tuple(entry.data.shape), entry.data.stride(), entry.data.storage_offset())
                    regions[(entry.key, tuple(entry.global_offset))] = (source_of[id(root)], tuple(root.shape), root.dtype,
                                                                      view)
            sharded_state_dict, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict,
                                                                                   self.keep_only_main_replica)
            dcp_save(mcore_to_pyt_state_dict(sharded_state_dict, False),
                     storage_writer=FileSystemWriter(str(checkpoint_dir), thread_count=1, sync_files=True),
                     planner=StreamingPlanner(regions, dedup_replicated_tensors=not self.keep_only_main_replica,
                                              flatten_state_dict=False))

    return StreamingStrategy("torch_dist", 1)


def hf_to_dist_checkpoint(hf_dir: str | os.PathLike, out: str | os.PathLike, tp: int = 1, pp: int = 1, vpp: int = 1,
                          ep: int = 1, adapter: str | os.PathLike | None = None, overwrite: bool = False,
                          make_vocab_size_divisible_by: int | None = None, dtype: str = "auto",
                          dry_run: bool = False) -> dict:
    """Write the ``torch_dist`` checkpoint of the HF model in ``hf_dir`` (+ the project adapter ``adapter``)
    to ``out`` (staged, manifested, renamed into place). Returns what ``checkpoint.json`` records. Raises
    ValueError / FileNotFoundError / FileExistsError naming what does not fit, before writing anything.
    ``adapter``: the project adapter or a PEFT LoRA export. ``make_vocab_size_divisible_by``: pad the
    embedding and output layer with zero rows as Megatron-LM does (``megatron-to-hf`` truncates them again).
    ``dtype``: the base weights' dtype, ``auto`` (the HF config's ``dtype``, fp32 when it names none) or
    one of :data:`BASE_DTYPES`; the adapter stays fp32 (the optimizer's masters). ``dry_run``: check
    everything, write nothing, and return the description with ``"plan"`` (lines: tensors, bytes,
    the memory bound)."""
    from megatron.core import dist_checkpointing
    from transformers import AutoConfig

    from .hf_adapter import gather_hf_adapter, load_hf_adapter_
    from .inject import apply_rasa_megatron
    from .model import build_gpt_model

    hf_dir, out = Path(hf_dir), Path(out)
    if not (hf_dir / "config.json").is_file():
        raise FileNotFoundError(f"{hf_dir} has no config.json")
    hf_config = AutoConfig.from_pretrained(hf_dir)
    base_dtype = _base_dtype(dtype, hf_config)
    check_parallel_sizes(hf_config, tp, pp, vpp)
    if getattr(hf_config, "num_local_experts", None):
        check_divisible(hf_config.num_local_experts, ep, "num_local_experts", "the expert-parallel size")
    elif ep != 1:
        raise ValueError(f"--ep {ep} needs a MoE model; {hf_config.model_type} has no experts")
    tensors, rasa_config = _read_rasa_adapter(Path(adapter)) if adapter else ({}, None)
    weights = SafetensorsCheckpoint(hf_dir)
    layout = {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
              "virtual_pipeline_model_parallel_size": vpp, "expert_model_parallel_size": ep}
    description = {"format": DESCRIPTION_FORMAT, "format_version": DESCRIPTION_VERSION, "engine": "torch_dist",
                   "step": 0, "method": "rasa" if rasa_config else "base",
                   "rasa_config": rasa_config.to_dict() if rasa_config else None,
                   "base_model": {"path": str(hf_dir)}, "layout": layout,
                   "base_dtype": str(base_dtype).removeprefix("torch.")}
    sources = hf_to_megatron_sources(weights, hf_config, 0, 1)
    model_config = hf_config
    if make_vocab_size_divisible_by:
        padded = padded_vocab_size(hf_config.vocab_size, make_vocab_size_divisible_by, tp)
        model_config = copy.deepcopy(hf_config)
        model_config.vocab_size = padded
        for key in ("embedding.word_embeddings.weight", "output_layer.weight"):
            if key in sources:
                sources[key] = partial(_zero_padded, sources[key], padded)
        description["padded_vocab_size"] = padded
    with _single_process_megatron():
        with torch.device("meta"):  # the base as shapes only: each tensor is read when it is written
            model = build_gpt_model(transformer_config_from_hf(hf_config, params_dtype=base_dtype), model_config)
        base_names = {name: param for name, param in model.state_dict(keep_vars=True).items()
                      if not name.endswith("_extra_state")}
        missing, unexpected = sorted(set(base_names) - set(sources)), sorted(set(sources) - set(base_names))
        if missing or unexpected:
            raise ValueError(f"{hf_dir} does not fill the Megatron model: missing {missing[:4]}, unexpected {unexpected[:4]}")
        source_of = {id(param): sources[name] for name, param in base_names.items()}
        if rasa_config is not None:
            apply_rasa_megatron([model], rasa_config)
            try:
                load_hf_adapter_([model], tensors)
                placed = gather_hf_adapter([model])
            except (ValueError, RuntimeError, TypeError) as err:
                raise ValueError(f"the adapter {adapter} does not fit the model of {hf_dir}: {err}") from err
            off = sorted(set(placed) ^ set(tensors)) + [k for k in placed if k in tensors
                                                        and not torch.equal(placed[k], tensors[k].to(placed[k].dtype))]
            if off:
                raise ValueError(f"the adapter {adapter} does not fit the model of {hf_dir}: {off[:4]} "
                                 f"({len(off)} keys) not placed as given")
        if dry_run:
            return {**description, "plan": _plan_lines(hf_dir, out, overwrite, base_names, model, base_dtype, layout)}
        with staged_output(out, {"hf": str(hf_dir), "adapter": str(adapter) if adapter else None, "layout": layout},
                           overwrite) as tmp:
            dist_checkpointing.save(model.sharded_state_dict(), str(tmp), sharded_strategy=_streaming_strategy(source_of))
            write_json(tmp / DESCRIPTION_FILE, description)
    return description

