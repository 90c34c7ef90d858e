"""A checkpoint of the DeepSpeed engine -> the project adapter, a PEFT LoRA adapter or a merged Hugging
Face model, offline and on CPU.

Only the trainable (adapter) parameters are read, as fp32 masters: from the checkpoint's portable state
(safetensors) or, for ZeRO-2/3 shards written by DeepSpeed itself, DeepSpeed's
``get_fp32_state_dict_from_zero_checkpoint``. The adapter and PEFT outputs need no base weights (the
model skeleton is built on the meta device from the base's config or the run's model config); the
merged model is streamed from the base's files tensor by tensor (convert/merged.py).
"""
from __future__ import annotations

import json
import os

import torch

from ..training.checkpoint import resolve_checkpoint

RASA_CONFIG_FILE = "rasa_config.json"
PORTABLE_DIR, PORTABLE_WEIGHTS = "portable", "portable_state.safetensors"  # the DeepSpeed engine's names


def adapter_tensors_from_zero_checkpoint(path: str | os.PathLike, tag: str | None = None
                                         ) -> tuple[dict[str, torch.Tensor], dict]:
    """fp32 adapter tensors (trainable parameters only, never the base) of a DeepSpeed-engine checkpoint
    and the RaSA config stored beside them (``rasa_config.json`` in the tag directory): from its portable
    state (``portable/portable_state.safetensors``, the engine's checkpoint of an adapter run), or from
    DeepSpeed ZeRO-2/3 shards (``get_fp32_state_dict_from_zero_checkpoint``) when it has none."""
    from safetensors.torch import load_file

    root, tag = resolve_checkpoint(path, tag)
    config_file = root / tag / RASA_CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: this checkpoint was not written by "
                                "rasa_megatron.deepspeed (or is a full fine-tuning checkpoint without adapters)")
    portable = root / tag / PORTABLE_DIR / PORTABLE_WEIGHTS
    if portable.is_file():
        tensors = {key.removeprefix("param/"): value for key, value in load_file(portable).items()
                   if key.startswith("param/")}
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        tensors = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag, exclude_frozen_parameters=True)
    return {k: v.float().contiguous() for k, v in tensors.items()}, json.loads(config_file.read_text())
