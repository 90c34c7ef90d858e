"""The optimizer-step loop both engines run, and the single-process step of the default job.

An engine supplies one function, ``step_fn(step, global_batch) -> StepResult``, that runs one
optimizer step on this rank's share of ``global_batch`` (sample indices of the whole global batch,
from :class:`~rasa_megatron.training.data.TrainingData`); the loop owns what is the same everywhere:
the batch plan, timing, token counts, the metrics row and the periodic checkpoint.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .data import TrainingData
from .metrics import MetricsWriter, step_row


@dataclass
class StepResult:
    """What an engine reports of one optimizer step: the global batch's mean loss, the global
    gradient norm before clipping (NaN when the engine did not compute one) and the step's LR."""
    loss: float
    grad_norm: float
    lr: float


def run_steps(data: TrainingData, step_fn: Callable[[int, np.ndarray], StepResult], start: int, stop: int,
              world_size: int, writer: MetricsWriter, save_every: int | None = None,
              save_fn: Callable[[int], object] | None = None) -> list[dict]:
    """Global steps ``start .. stop - 1``; after step ``s`` (1-based) a checkpoint is saved when
    ``save_every`` divides ``s`` and ``s < stop`` (the caller saves at ``stop``). Returns the rows
    the writer logged (empty on ranks that do not log)."""
    rows = []
    for step in range(start, stop):
        global_batch = data.global_batch(step)
        started = time.perf_counter()
        result = step_fn(step, global_batch)
        seconds = time.perf_counter() - started
        if writer.enabled:
            row = step_row(step + 1, data.steps_per_epoch, result.loss, result.lr, result.grad_norm,
                           data.tokens(global_batch), seconds, world_size)
            writer.write(row)
            rows.append(row)
        if save_every and (step + 1) % save_every == 0 and step + 1 < stop:
            save_fn(step + 1)
    return rows


def sft_train_step(model, batch: dict, optimizer, scheduler=None, max_grad_norm: float | None = 1.0) -> float:
    """One single-process optimizer step on a causal-LM batch (``input_ids``, ``labels``,
    ``attention_mask``); returns the loss."""
    import torch

    device = next(model.parameters()).device
    loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
    loss.backward()
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_grad_norm)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()
