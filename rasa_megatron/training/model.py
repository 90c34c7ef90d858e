"""The recipe's Hugging Face model with its adapter, built the same way for every engine."""
from __future__ import annotations

import torch

from ..inject import apply_rasa
from .recipe import Recipe
from .rng import ADAPTER_SEED_OFFSET, seed_everything


def compute_dtype(recipe: Recipe) -> torch.dtype:
    """bf16 or fp32, from ``train.precision``."""
    return torch.bfloat16 if recipe.train.precision == "bf16" else torch.float32


def build_hf_model(recipe: Recipe):
    """HF causal LM from ``model.path`` (weights) or ``model.config`` (random init) in the recipe's
    precision, with the recipe's adapter in fp32 (drawn after ``seed_everything(seed + 1)``, so every
    rank and engine starts from the same adapter; fp32 so that a pool's gradient, a sum over all L
    layers, is not accumulated in bf16) and gradient checkpointing when the recipe asks for it.
    Under an active ``transformers.integrations.HfDeepSpeedConfig`` the weights are built by
    ``zero.Init`` (ZeRO-3 partitioned)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = compute_dtype(recipe)
    m = recipe.model
    seed_everything(recipe.train.seed)
    if m.path is not None:
        kwargs = {"gguf_file": m.gguf_file} if m.gguf_file else {}
        model = AutoModelForCausalLM.from_pretrained(m.path, dtype=dtype, **kwargs)
    else:
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(m.config), dtype=dtype)
    model.config.use_cache = False
    rasa_config = recipe.rasa_config()
    if rasa_config is not None:  # fp32 adapter on a bf16 base (PEFT's autocast_adapter_dtype, the Megatron path)
        seed_everything(recipe.train.seed + ADAPTER_SEED_OFFSET)
        apply_rasa(model, rasa_config, adapter_dtype=torch.float32)
    if recipe.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model
