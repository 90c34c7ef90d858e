"""The optimizer-step loop both engines run, and the single-process step of the default job.

An engine supplies one function, ``step_fn(step, global_batch) -> StepResult``, that runs one
optimizer step on this rank's share of ``global_batch`` (sample indices of the whole global batch,
from :class:`~rasa_megatron.training.data.TrainingData`); the loop owns what is the same everywhere:
the batch plan, timing, token counts, the metrics row and the periodic checkpoint.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch.distributed as dist

from .checkpoint import checkpoint_root, checkpoint_tags, select_checkpoint, set_aside_newer_checkpoints
from .control import EXIT_PREEMPTED, PREEMPTED_FILE, STOP_FILE, StopRequest, control_group
from .data import TrainingData
from .identity import COMPLETE_FILE, check_resume_identity
from .metrics import MetricsWriter, step_row
from .recipe import Recipe
from .state_io import write_json


@dataclass
class StepResult:
    """What an engine reports of one optimizer step: the global batch's mean loss, the global
    gradient norm before clipping (NaN when the engine did not compute one) and the step's LR."""
    loss: float
    grad_norm: float
    lr: float


@dataclass
class LoopResult:
    """The metric rows the writer logged (empty on ranks that do not log) and, when a stop request ended
    the loop early, the step after which it stopped (its checkpoint written)."""
    rows: list = field(default_factory=list)
    stopped_step: int | None = None


def run_steps(data: TrainingData, step_fn: Callable[[int, np.ndarray], StepResult], start: int, stop: int,
              world_size: int, writer: MetricsWriter, save_every: int | None = None,
              save_fn: Callable[[int], object] | None = None, stop_request: StopRequest | None = None) -> LoopResult:
    """Global steps ``start .. stop - 1``; after step ``s`` (1-based) a checkpoint is saved when
    ``save_every`` divides ``s`` and ``s < stop`` (the caller saves at ``stop``). After every step the
    ranks agree on ``stop_request``; when any rank was asked to stop, the checkpoint of that step is
    written (once) and the loop returns early. The request's signal handlers are restored at the end."""
    result = LoopResult()
    try:
        for step in range(start, stop):
            global_batch = data.global_batch(step)
            started = time.perf_counter()
            outcome = step_fn(step, global_batch)
            seconds = time.perf_counter() - started
            if writer.enabled:
                row = step_row(step + 1, data.steps_per_epoch, outcome.loss, outcome.lr, outcome.grad_norm,
                               data.tokens(global_batch), seconds, world_size)
                writer.write(row)
                result.rows.append(row)
            saved = bool(save_every and (step + 1) % save_every == 0 and step + 1 < stop)
            if saved:
                save_fn(step + 1)
            if stop_request is not None and step + 1 < stop and stop_request.agreed():
                if not saved:
                    save_fn(step + 1)
                result.stopped_step = step + 1
                break
    finally:
        if stop_request is not None:
            stop_request.close()
    return result


def stop_file_path(recipe: Recipe, control_dir: str | os.PathLike | None) -> Path:
    """``<control_dir or output.dir>/STOP``: a file whose appearance asks the run to stop (the SLURM
    templates' signal trap creates it). A stale one, older than this process (left from the run being
    resumed), is removed; one made while this run was starting up is honoured."""
    import psutil

    path = Path(control_dir or recipe.output.dir) / STOP_FILE
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            if path.stat().st_mtime < psutil.Process().create_time():
                path.unlink()
        except FileNotFoundError:
            pass
    if dist.is_initialized():
        dist.barrier(group=control_group())
    return path


def preempted(recipe: Recipe, control_dir: str | os.PathLike | None, result: LoopResult, stop: StopRequest) -> int:
    """After a honoured stop request: rank 0 writes ``<control_dir or output.dir>/preempted.json`` (what the
    SLURM templates requeue on) and every rank returns :data:`EXIT_PREEMPTED`."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        write_json(Path(control_dir or recipe.output.dir) / PREEMPTED_FILE,
                   {"step": result.stopped_step, "reason": stop.reason or "another rank's request"})
        print(f"stopped after step {result.stopped_step} ({stop.reason or 'requested on another rank'}); "
              f"checkpoint written; resume with --resume", file=sys.stderr, flush=True)
    if dist.is_initialized():  # no rank exits (and makes the launcher end the job) before the marker exists
        dist.barrier(group=control_group())
    return EXIT_PREEMPTED


def resume_directory(recipe: Recipe, resume: str | os.PathLike | None, stop: int,
                     identity: dict | None = None) -> Path | None:
    """The verified checkpoint to resume from (collective), or None to start afresh; the run about to
    train stops after global step ``stop``.

    ``resume``: None (start afresh); ``"latest"`` (the newest intact checkpoint of ``output.dir``: an
    error when there is none); ``"auto"`` (the same, or afresh when there is no checkpoint at all: what a
    requeued job passes; an error when there are only damaged ones); a checkpoints root (its newest
    intact checkpoint) or a ``step*`` directory (that one, refused naming the bad file when damaged).
    A checkpoint past ``stop``, or of another run than ``identity`` (see :mod:`.identity`), is refused;
    then checkpoints of ``output.dir`` newer than the chosen one are set aside (``abandoned.stepN``) and a
    previous ``complete.json`` is removed (this run rewrites it)."""
    chosen = None
    if resume is not None:
        own_root = checkpoint_root(recipe.output.dir)
        root = own_root if resume in ("latest", "auto") else Path(resume)
        if not root.exists() and resume != "auto":
            raise SystemExit(f"error: cannot resume: {root} does not exist")
        chosen = select_checkpoint(root) if root.exists() else None
        if chosen is None and (resume != "auto" or checkpoint_tags(root)):
            raise SystemExit(f"error: cannot resume: no intact checkpoint under {root}"
                             + (" (move the damaged ones aside to start afresh)" if checkpoint_tags(root) else ""))
        if chosen is not None:
            step = int(chosen.name[len("step"):])
            if step > stop:
                raise SystemExit(f"error: cannot resume from {chosen}: it is past step {stop}, where this run "
                                 "stops (train.max_steps / --stop-after)")
            if identity is not None:
                check_resume_identity(chosen, identity)
            if chosen.parent.resolve() == own_root.resolve():
                set_aside_newer_checkpoints(own_root, chosen.name)
    if not dist.is_initialized() or dist.get_rank() == 0:
        if chosen is not None:
            print(f"resuming from {chosen}", file=sys.stderr, flush=True)
        (Path(recipe.output.dir) / COMPLETE_FILE).unlink(missing_ok=True)
    if dist.is_initialized():
        dist.barrier(group=control_group())
    return chosen


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
