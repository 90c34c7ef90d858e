"""Single-process, unsharded, plain-PyTorch reference for the DeepSpeed runs (no DeepSpeed at all).

Same model construction, adapter init, batch plan, loss averaging (mean over the global batch's
micro-batches), global-norm clipping, optimizer and schedule as the recipe; only the engine differs.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from rasa_megatron import adapter_state_dict
from rasa_megatron.adapter import assign_adapter_tensors_
from rasa_megatron.training.data import collate, global_batch_plan, load_raw_dataset, load_tokenizer, tokenize_dataset
from rasa_megatron.training.model import build_hf_model
from rasa_megatron.training.optim import cosine_with_warmup
from rasa_megatron.training.recipe import Recipe


def reference_run(recipe: Recipe, steps: int, dropout_seed: int | None = None,
                  initial_adapter: dict[str, torch.Tensor] | None = None
                  ) -> tuple[list[float], dict[str, torch.Tensor], list[float]]:
    """Losses per global step, the final adapter tensors (fp32) and the global gradient norm (before
    clipping) per step. ``dropout_seed``: reseed torch after building the model (the Megatron engine
    seeds its dropout streams after the adapter init), so both draw the same dropout masks.
    ``initial_adapter``: start from these adapter tensors instead of the recipe's init."""
    from lion_pytorch import Lion

    tokenizer = load_tokenizer(recipe)
    dataset = tokenize_dataset(load_raw_dataset(recipe.data.paths), tokenizer, recipe.data)
    lengths = np.array([len(ids) for ids in dataset["input_ids"]])
    t = recipe.train
    steps_per_epoch = len(dataset) // t.global_batch_size
    total = t.max_steps or math.ceil(t.epochs * steps_per_epoch)
    model = build_hf_model(recipe)
    if initial_adapter is not None:
        assign_adapter_tensors_(model, initial_adapter)
    model.train()
    if dropout_seed is not None:
        torch.manual_seed(dropout_seed)
    params = [p for p in model.parameters() if p.requires_grad]
    if t.optimizer == "lion":
        optimizer = Lion(params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(total, t.warmup_ratio))
    losses, norms = [], []
    for step in range(steps):
        epoch = step // steps_per_epoch
        plan = global_batch_plan(lengths, t.global_batch_size, t.seed, epoch, recipe.data.group_by_length)
        micro = plan[step % steps_per_epoch].reshape(-1, t.micro_batch_size)
        total_loss = 0.0
        for indices in micro:
            batch = collate([dataset[int(i)] for i in indices], tokenizer.pad_token_id)
            loss = model(**batch).loss
            (loss / len(micro)).backward()
            total_loss += loss.item() / len(micro)
        norms.append(torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm).item())
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total_loss)
    return losses, {k: v.detach().float().clone() for k, v in adapter_state_dict(model).items()}, norms
