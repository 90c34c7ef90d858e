"""The optimizers and learning-rate schedule every entry point uses (paper: LionW, cosine with warm-up)."""
from __future__ import annotations

import math

import torch

OPTIMIZERS = ("lion", "adamw")


def make_torch_optimizer(name: str, params, lr: float, betas, weight_decay: float) -> torch.optim.Optimizer:
    """LionW (decoupled weight decay, the maintained ``lion-pytorch``) or torch AdamW."""
    if name == "lion":
        from lion_pytorch import Lion

        return Lion(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    raise ValueError(f"optimizer {name!r}; valid: {list(OPTIMIZERS)}")


def recipe_optimizer(train, params) -> torch.optim.Optimizer:
    """:func:`make_torch_optimizer` with a recipe's ``train`` section."""
    return make_torch_optimizer(train.optimizer, params, train.lr, train.betas, train.weight_decay)


def cosine_with_warmup(total_steps: int, warmup_ratio: float):
    """LR multiplier: linear warm-up over ``ceil(warmup_ratio * total)`` steps, then cosine to 0."""
    warmup = math.ceil(warmup_ratio * total_steps)

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return multiplier


def lr_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float):
    """A ``LambdaLR`` over :func:`cosine_with_warmup`."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(total_steps, warmup_ratio))
