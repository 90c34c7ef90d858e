"""``rasa-convert hf-to-megatron``: a HF model (and optionally a RaSA adapter) -> a Megatron distributed
checkpoint (``torch_dist``) that ``megatron.core.dist_checkpointing.load`` loads at any layout.

A dist checkpoint stores every tensor in its global view, so it is written from the model built in
this one process at TP 1 x PP 1 (a gloo world of one, no torchrun): the GPTModel of the HF config
(this project's local spec, RaSA wrappers when an adapter is given) holds the HF weights
(``hf_to_megatron``) and the adapter (``load_hf_adapter_``), and Megatron's own ``sharded_state_dict``
and ``dist_checkpointing.save`` write it: the keys, shapes and replica structure are exactly those a
model built on the requested layout asks for, and dist-checkpoint resharding serves every other one.
Memory: the whole model once (as Megatron-Bridge's import); the requested ``--tp/--pp/--vpp/--ep`` are
checked against the model and recorded in ``checkpoint.json``.
"""
from __future__ import annotations

import contextlib
import copy
import os
import socket
from pathlib import Path

import torch

from ..adapter import CONFIG_FILE, PEFT_CONFIG_FILE, WEIGHTS_FILE, read_adapter_config
from ..config import RaSAConfig
from ..convert.hf_checkpoint import SafetensorsCheckpoint
from ..convert.megatron_weights import hf_to_megatron, transformer_config_from_hf
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


def hf_to_dist_checkpoint(hf_dir: str | os.PathLike, out: str | os.PathLike, tp: int = 1, pp: int = 1, vpp: int = 1,
                          ep: int = 1, adapter: str | os.PathLike | None = None, overwrite: bool = False,
                          make_vocab_size_divisible_by: int | None = None) -> dict:
    """Write the ``torch_dist`` checkpoint of the HF model in ``hf_dir`` (+ the project adapter ``adapter``)
    to ``out`` (staged, manifested, renamed into place). Returns what ``checkpoint.json`` records. Raises
    ValueError / FileNotFoundError / FileExistsError naming what does not fit, before writing anything.
    ``adapter``: the project adapter or a PEFT LoRA export. ``make_vocab_size_divisible_by``: pad the
    embedding and output layer with zero rows as Megatron-LM does (``megatron-to-hf`` truncates them again)."""
    from megatron.core import dist_checkpointing
    from transformers import AutoConfig

    from .hf_adapter import gather_hf_adapter, load_hf_adapter_
    from .inject import apply_rasa_megatron
    from .model import build_gpt_model

    hf_dir, out = Path(hf_dir), Path(out)
    if not (hf_dir / "config.json").is_file():
        raise FileNotFoundError(f"{hf_dir} has no config.json")
    hf_config = AutoConfig.from_pretrained(hf_dir)
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
                   "base_model": {"path": str(hf_dir)}, "layout": layout}
    state = hf_to_megatron(weights, hf_config, 0, 1)
    model_config = hf_config
    if make_vocab_size_divisible_by:
        padded = padded_vocab_size(hf_config.vocab_size, make_vocab_size_divisible_by, tp)
        model_config = copy.deepcopy(hf_config)
        model_config.vocab_size = padded
        for key in ("embedding.word_embeddings.weight", "output_layer.weight"):
            if key in state:
                rows = state[key]
                state[key] = torch.cat([rows, rows.new_zeros(padded - rows.shape[0], rows.shape[1])])
        description["padded_vocab_size"] = padded
    with _single_process_megatron():
        model = build_gpt_model(transformer_config_from_hf(hf_config), model_config)
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [key for key in missing if not key.endswith("_extra_state")]
        if missing or unexpected:
            raise ValueError(f"{hf_dir} does not fill the Megatron model: missing {missing[:4]}, unexpected {unexpected[:4]}")
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
        with staged_output(out, {"hf": str(hf_dir), "adapter": str(adapter) if adapter else None, "layout": layout},
                           overwrite) as tmp:
            dist_checkpointing.save(model.sharded_state_dict(), str(tmp))
            write_json(tmp / DESCRIPTION_FILE, description)
    return description

