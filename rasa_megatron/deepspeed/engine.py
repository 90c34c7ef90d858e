"""The DeepSpeed engine of ``rasa-train`` (``engine: deepspeed``): RaSA / LoRA / full fine-tuning
under ZeRO-2/3 (with or without offload).

The flow: validate the recipe against the launch (before any work), build the model under
``zero.Init`` when ZeRO-3 is on (70B never materialises on one rank), add adapters, wrap in a
DeepSpeed engine with LionW and a cosine schedule with warm-up, make the pools resident, then run
the shared step loop (:mod:`rasa_megatron.training.loop`) over the deterministic batch plan.
Checkpoints are DeepSpeed engine checkpoints plus per-rank RNG states and the portable adapter
state; the adapter and the PEFT export are written from the gathered fp32 masters.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ..inject import rasa_config_of
from ..training.checkpoint import (atomic_torch_save, atomic_write_text, check_resume_recipe, checkpoint_root,
                                   resolve_checkpoint, step_tag, write_latest, write_recipe_record)
from ..training.data import TrainingData, collate, load_tokenizer, micro_batches_for_rank, prepare_training_data
from ..training.loop import StepResult, run_steps
from ..training.metrics import MetricsWriter
from ..training.model import build_hf_model
from ..training.optim import lr_scheduler, recipe_optimizer
from ..training.recipe import Recipe, validate_recipe
from ..training.rng import rng_state, set_rng_state
from .portable import load_portable_state, save_portable_state
from .zero3 import keep_pools_resident, save_adapter_distributed

PORTABLE = "portable"
RASA_CONFIG_FILE = "rasa_config.json"


def world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def deepspeed_config(recipe: Recipe, grad_accum: int) -> dict:
    """The DeepSpeed JSON of the recipe with batch sizes, precision and clipping filled in."""
    config = json.loads(Path(recipe.deepspeed).read_text())
    t = recipe.train
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        config.pop(key, None)
    config["train_micro_batch_size_per_gpu"] = t.micro_batch_size
    config["gradient_accumulation_steps"] = grad_accum
    config["train_batch_size"] = t.global_batch_size
    config["gradient_clipping"] = t.max_grad_norm
    config["bf16"] = {"enabled": t.precision == "bf16"}
    config.pop("fp16", None)
    config["zero_allow_untested_optimizer"] = True
    config.setdefault("steps_per_print", 10**9)
    config.setdefault("wall_clock_breakdown", False)
    return config


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def build_model(recipe: Recipe, ds_config: dict | None):
    """:func:`~rasa_megatron.training.model.build_hf_model` under ZeRO-3's ``zero.Init`` when
    ``ds_config`` enables stage 3 (transformers' DeepSpeed integration), with sparse-MoE blocks
    marked as ZeRO-3 leaf modules."""
    keep_alive = None
    zero3 = ds_config is not None and zero_stage(ds_config) == 3
    if zero3:
        from transformers.integrations import HfDeepSpeedConfig

        keep_alive = HfDeepSpeedConfig(ds_config)  # makes from_pretrained/from_config use zero.Init
    model = build_hf_model(recipe)
    model._rasa_hf_ds_config = keep_alive
    if zero3 and model.config.model_type in ("mixtral", "qwen2_moe", "qwen3_moe"):
        classes = mark_moe_blocks_as_leaf(model)
        if world()[0] == 0:
            print(f"ZeRO-3 leaf modules: {', '.join(c.__name__ for c in classes)}", flush=True)
    return model


def mark_moe_blocks_as_leaf(model) -> list[type]:
    """ZeRO-3 leaf modules for sparse-MoE blocks: gather the whole block at once, so a rank that
    routes no token to an expert still takes part in every gather (the known hang otherwise)."""
    from deepspeed.utils import set_z3_leaf_modules

    classes = sorted({type(m) for m in model.modules() if type(m).__name__.endswith("SparseMoeBlock")},
                     key=lambda c: c.__name__)
    if classes:
        set_z3_leaf_modules(model, classes)
    return classes


def make_optimizer(recipe: Recipe, params: list, ds_config: dict):
    """LionW (decoupled weight decay) or AdamW. On a CUDA device DeepSpeed's own fused optimizer
    is used through the config (and its CPU Lion/Adam under optimizer offload); elsewhere the
    maintained ``lion-pytorch`` package / torch AdamW as a client optimizer. Returns the client
    optimizer or None (with ``ds_config['optimizer']`` set)."""
    t = recipe.train
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") != "none"
    if torch.cuda.is_available() or offload:
        ds_config["optimizer"] = {"type": "Lion" if t.optimizer == "lion" else "AdamW",
                                  "params": {"lr": t.lr, "betas": list(t.betas), "weight_decay": t.weight_decay}}
        return None
    ds_config.pop("optimizer", None)
    return recipe_optimizer(t, params)


@dataclass
class TrainState:
    engine: object
    recipe: Recipe
    tokenizer: object
    data: TrainingData
    grad_accum: int

    @property
    def total_steps(self) -> int:
        return self.data.total_steps


def setup(recipe: Recipe, dist_backend: str | None = None, resident_pools: bool = True) -> TrainState:
    """Initialise distributed, data, model and the DeepSpeed engine (recipe already validated)."""
    import deepspeed

    backend = dist_backend or ("nccl" if torch.cuda.is_available() else "gloo")
    deepspeed.init_distributed(dist_backend=backend)
    rank, world_size = world()
    grad_accum = validate_recipe(recipe, world_size)
    ds_config = deepspeed_config(recipe, grad_accum)
    tokenizer = load_tokenizer(recipe)
    data = prepare_training_data(recipe, tokenizer, rank, barrier=dist.barrier)
    model = build_model(recipe, ds_config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(recipe, trainable, ds_config)
    scheduler = None if optimizer is None else lr_scheduler(optimizer, data.total_steps, recipe.train.warmup_ratio)
    engine, optimizer, _, scheduler = deepspeed.initialize(model=model, model_parameters=trainable, optimizer=optimizer,
                                                           lr_scheduler=scheduler, config=ds_config)
    if scheduler is None:  # DeepSpeed built the optimizer (fused / CPU Adam or Lion): schedule its torch optimizer
        # (DeepSpeed's ZeRO wrapper is not a torch.optim.Optimizer; its param_groups are the inner one's)
        scheduler = lr_scheduler(getattr(optimizer, "optimizer", optimizer), data.total_steps, recipe.train.warmup_ratio)
        engine.lr_scheduler = scheduler
    if recipe.rasa_config() is not None:
        keep_pools_resident(engine, persistent=resident_pools)
    return TrainState(engine, recipe, tokenizer, data, grad_accum)


def rng_file(checkpoint_dir: str | os.PathLike, tag: str, rank: int) -> Path:
    return Path(checkpoint_dir) / tag / f"rasa_rng_rank{rank:05d}.pt"


def save_checkpoint(state: TrainState, step: int) -> Path:
    """DeepSpeed engine checkpoint (model/optimizer/scheduler/step counters), this rank's RNG, the
    portable adapter state and the run's recipe; ``checkpoints/latest`` moves once all are written."""
    rank, _ = world()
    out = checkpoint_root(state.recipe.output.dir)
    tag = step_tag(step)
    state.engine.save_checkpoint(str(out), tag=tag, client_state={"global_step": step}, save_latest=False)
    atomic_torch_save(rng_state(), rng_file(out, tag, rank))
    if state.recipe.rasa_config() is not None:
        save_portable_state(state.engine, out / tag / PORTABLE, {
            "global_step": step, "global_batch_size": state.recipe.train.global_batch_size,
            "scheduler": state.engine.lr_scheduler.state_dict()})
    if rank == 0:
        write_recipe_record(out / tag, state.recipe)
        if state.recipe.rasa_config() is not None:
            atomic_write_text(out / tag / RASA_CONFIG_FILE, json.dumps(rasa_config_of(state.engine.module).to_dict()))
    dist.barrier()
    if rank == 0:
        write_latest(out, tag)
    dist.barrier()
    return out / tag


def _resolve(state: TrainState, path) -> tuple[Path, str]:
    try:
        root, tag = resolve_checkpoint(path or checkpoint_root(state.recipe.output.dir))
    except FileNotFoundError as err:
        raise SystemExit(f"error: cannot resume: {err}") from err
    check_resume_recipe(root / tag, state.recipe)
    return root, tag


def load_checkpoint(state: TrainState, path: str | os.PathLike | None = None) -> int:
    """Restore the latest (or given) checkpoint; returns the global step to continue from.

    Restores weights, optimizer, scheduler and step counters (DeepSpeed) and this rank's RNG; the
    data position follows from the step (the batch plan is a function of seed, epoch and step).
    """
    rank, _ = world()
    root, tag = _resolve(state, path)
    load_path, client = state.engine.load_checkpoint(str(root), tag=tag)
    if load_path is None:
        raise SystemExit(f"error: DeepSpeed found no checkpoint {tag!r} under {root}")
    step = int(client["global_step"])
    rng = rng_file(root, tag, rank)
    if rng.exists():
        set_rng_state(torch.load(rng, weights_only=False))
    elif rank == 0:
        print(f"warning: {rng} missing (resumed on another world size?); RNG not restored", file=sys.stderr)
    return step


def load_portable_checkpoint(state: TrainState, path: str | os.PathLike | None = None) -> int:
    """Resume on any world size from the portable state saved beside a checkpoint: adapter fp32
    masters, optimizer states, scheduler and step (not the per-rank RNG streams, which belong to
    the old ranks; with dropout the continuation is statistically, not bitwise, the same)."""
    root, tag = _resolve(state, path)
    meta = load_portable_state(state.engine, root / tag / PORTABLE)
    scheduler = state.engine.lr_scheduler
    scheduler.load_state_dict(meta["scheduler"])
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr  # load_state_dict restores the schedule's position, not the optimizer's lr
    step = int(meta["global_step"])
    state.engine.global_steps = step
    state.engine.global_samples = step * state.recipe.train.global_batch_size
    return step


def train_step(state: TrainState, global_batch) -> StepResult:
    """One optimizer step: this rank's micro-batches of ``global_batch`` through the engine; the
    loss is summed on the engine's device and all-reduced once (one host sync per step)."""
    engine, recipe = state.engine, state.recipe
    rank, world_size = world()
    lr = engine.get_lr()[0]
    loss_sum = torch.zeros((), dtype=torch.float64, device=engine.device)
    for indices in micro_batches_for_rank(global_batch, recipe.train.micro_batch_size, rank, world_size):
        batch = collate(state.data.samples(indices), state.tokenizer.pad_token_id)
        loss = engine(**{k: v.to(engine.device) for k, v in batch.items()}).loss
        engine.backward(loss)
        engine.step()
        loss_sum += loss.detach().double()
    dist.all_reduce(loss_sum)
    # the global gradient norm before clipping, as DeepSpeed computed it: a device tensor under ZeRO-3,
    # a float or None (not computed) otherwise; read back with the loss in the step's one host sync
    norm = engine.get_global_grad_norm()
    values = torch.stack([loss_sum, norm.detach().to(loss_sum)] if torch.is_tensor(norm) else [loss_sum]).tolist()
    grad_norm = values[1] if torch.is_tensor(norm) else float("nan") if norm is None else float(norm)
    return StepResult(values[0] / (state.grad_accum * world_size), grad_norm, lr)


def train(state: TrainState, start_step: int = 0, stop_step: int | None = None, progress: bool = True) -> list[dict]:
    """Run global steps ``start_step .. stop_step`` (default: to the end); returns the metric rows
    (rank 0; other ranks: [])."""
    rank, world_size = world()
    stop = state.total_steps if stop_step is None else min(stop_step, state.total_steps)
    writer = MetricsWriter(state.recipe.output.dir, stop, start_step, enabled=rank == 0, progress=progress)
    state.engine.train()
    try:
        return run_steps(state.data, lambda step, batch: train_step(state, batch), start_step, stop, world_size,
                         writer, state.recipe.output.save_every, lambda step: save_checkpoint(state, step))
    finally:
        writer.close()


def finish(state: TrainState) -> None:
    """Final checkpoint, adapter and PEFT export (fp32 masters, atomic, rank 0 writes)."""
    out = Path(state.recipe.output.dir)
    save_checkpoint(state, state.total_steps)
    if state.recipe.rasa_config() is not None:
        save_adapter_distributed(state.engine, out / "adapter" if state.recipe.output.save_adapter else None,
                                 out / "peft_adapter" if state.recipe.output.export_peft else None)


def run(recipe: Recipe, stop_step: int | None = None, resume: str | os.PathLike | None = None,
        portable: bool = False, progress: bool = True) -> None:
    """``rasa-train`` with ``engine: deepspeed``: set up, resume (``"latest"`` or a checkpoint path;
    ``portable``: from the world-size-independent state), train, then write a checkpoint at
    ``stop_step`` or, at the end, the final checkpoint, adapter and PEFT export."""
    state = setup(recipe)
    start = 0
    if resume:
        load = load_portable_checkpoint if portable else load_checkpoint
        start = load(state, None if resume == "latest" else resume)
    train(state, start_step=start, stop_step=stop_step, progress=progress)
    if stop_step is not None and stop_step < state.total_steps:
        save_checkpoint(state, stop_step)
    else:
        finish(state)
