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
from pathlib import Path

import torch

from ..training.checkpoint import resolve_checkpoint

RASA_CONFIG_FILE = "rasa_config.json"
RECIPE_FILE = "recipe.json"
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


def export_zero_checkpoint(checkpoint: str | os.PathLike, adapter_dir=None, peft_dir=None, merged_dir=None,
                           base: str | None = None, tag: str | None = None, overwrite: bool = False) -> int:
    """Write the requested outputs of a ZeRO checkpoint (root with ``latest`` or a tag directory) through
    :func:`~rasa_megatron.convert.hf_export.export_engine_checkpoint` (staged, manifested outputs; the
    merged model streamed from the base's files).

    ``base``: the base HF checkpoint dir (default: the run's ``model.path`` / ``model.config`` from
    the checkpoint's ``recipe.json``); ``merged_dir`` needs base weights. Raises FileNotFoundError /
    ValueError naming what is missing or does not fit, before writing anything. Returns the number
    of adapter tensors exported."""
    from .hf_export import export_engine_checkpoint

    if not (adapter_dir or peft_dir or merged_dir):
        raise ValueError("give at least one output: an adapter, a PEFT or a merged directory")
    root, tag = resolve_checkpoint(checkpoint, tag)
    recipe_file = root / tag / RECIPE_FILE
    run_model = json.loads(recipe_file.read_text())["model"] if recipe_file.is_file() else {}
    config_source = base or run_model.get("path") or run_model.get("config")
    if config_source is None or not Path(config_source).exists():
        raise FileNotFoundError(f"no model config found (tried {config_source!r}); pass the base model directory")
    weights = base or run_model.get("path")
    if merged_dir and not weights:
        raise ValueError("a merged model needs base weights: pass the base model directory")
    report = export_engine_checkpoint(root / tag, config_source, merged=merged_dir, adapter=adapter_dir,
                                      peft=peft_dir, base=weights, overwrite=overwrite)
    return report["adapter_tensors"]
