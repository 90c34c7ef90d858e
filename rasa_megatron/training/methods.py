"""The three fine-tuning methods the single-process jobs compare on one loaded HF model: RaSA
(this package), PEFT LoRA at the same r and alpha (the same parameter budget), full fine-tuning."""
from __future__ import annotations

from torch import nn

from ..config import LLAMA_LINEARS, RaSAConfig
from ..inject import apply_rasa

METHODS = ("rasa", "lora", "full")


def prepare_method(model: nn.Module, method: str, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                   k: int | None = None, target_modules=LLAMA_LINEARS) -> nn.Module:
    """Put ``method`` on the loaded base model and return the model to train (PEFT wraps it)."""
    if method == "rasa":
        return apply_rasa(model, RaSAConfig(r=r, k=k, alpha=alpha, dropout=dropout,
                                            target_modules=list(target_modules)))
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}")
        return get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                                                target_modules=list(target_modules), task_type="CAUSAL_LM"))
    if method == "full":
        for param in model.parameters():
            param.requires_grad_(True)
        return model
    raise ValueError(f"method {method!r}; valid: {list(METHODS)}")
