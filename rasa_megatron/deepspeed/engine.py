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
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ..inject import rasa_config_of
from ..training.checkpoint import atomic_write_text, checkpoint_root, save_checkpoint_dir
from ..training.control import StopRequest
from ..training.data import TrainingData, collate, load_tokenizer, micro_batches_for_rank, prepare_training_data
from ..training.identity import mark_complete, run_identity, write_run_record
from ..training.loop import LoopResult, StepResult, preempted, resume_directory, run_steps, stop_file_path
from ..training.metrics import MetricsWriter
from ..training.model import build_hf_model
from ..training.optim import lr_scheduler, recipe_optimizer
from ..training.recipe import Recipe, validate_recipe
from ..training.rng import rng_state, set_rng_state
from ..training.state_io import load_state, save_state
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
    identity: dict
    resumed_from: int | None = None

    @property
    def total_steps(self) -> int:
        return self.data.total_steps


def setup(recipe: Recipe, dist_backend: str | None = None, resident_pools: bool = True) -> TrainState:
    """Initialise distributed, data, model and the DeepSpeed engine (recipe already validated)."""
    import deepspeed

    backend = dist_backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():  # before the process group and the first barrier: one GPU per local rank
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
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
    return TrainState(engine, recipe, tokenizer, data, grad_accum, run_identity(recipe, data.sha256))


def rng_name(rank: int) -> str:
    return f"rng_rank{rank:05d}"


def save_checkpoint(state: TrainState, step: int) -> Path:
    """The checkpoint after global step ``step`` through the shared save protocol (verified manifest,
    ``latest`` last, ``output.keep_last``): for adapters the portable state (fp32 masters, optimizer
    states, scheduler, step: safetensors + JSON); for full fine-tuning DeepSpeed's own engine
    checkpoint; every rank's RNG; the run's recipe and identity."""
    rank, world_size = world()
    recipe = state.recipe

    def write(directory: Path) -> None:
        if recipe.rasa_config() is None:
            state.engine.save_checkpoint(str(directory.parent), tag=directory.name,
                                         client_state={"global_step": step}, save_latest=False)
        else:
            save_portable_state(state.engine, directory / PORTABLE, {
                "global_step": step, "global_batch_size": recipe.train.global_batch_size, "world_size": world_size,
                "scheduler": state.engine.lr_scheduler.state_dict()})
        save_state(directory, rng_name(rank), rng_state())
        if rank == 0:
            write_run_record(directory, recipe, state.identity, step,
                             {"world_size": world_size, "zero_stage": state.engine.zero_optimization_stage()})
            if recipe.rasa_config() is not None:
                atomic_write_text(directory / RASA_CONFIG_FILE, json.dumps(rasa_config_of(state.engine.module).to_dict()))

    return save_checkpoint_dir(checkpoint_root(recipe.output.dir), step, write, recipe.output.keep_last)


def load_checkpoint(state: TrainState, tag_dir: Path, portable: bool = False) -> int:
    """Restore ``tag_dir`` (chosen, verified and identity-checked by :func:`resume_directory`); returns
    the global step to continue from. Adapters: the portable state (nothing unpickled), and each rank's RNG when the world
    size is the one that wrote it; another world size needs ``portable`` (the per-rank dropout streams
    cannot be carried over, so the continuation is statistically, not bitwise, the same). Full
    fine-tuning: DeepSpeed's own checkpoint (its format; the same world size)."""
    rank, world_size = world()
    if state.recipe.rasa_config() is None:
        load_path, client = state.engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
        if load_path is None:
            raise SystemExit(f"error: DeepSpeed found no checkpoint in {tag_dir}")
        step = int(client["global_step"])
    else:
        meta = load_portable_state(state.engine, tag_dir / PORTABLE)
        saved_world = meta.get("world_size", world_size)
        if saved_world != world_size and not portable:
            raise SystemExit(f"error: cannot resume: {tag_dir} was written by {saved_world} processes, this run has "
                             f"{world_size}; add --portable to continue on another world size (the per-rank dropout "
                             "streams are not carried over)")
        scheduler = state.engine.lr_scheduler
        scheduler.load_state_dict(meta["scheduler"])
        for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
            group["lr"] = lr  # load_state_dict restores the schedule's position, not the optimizer's lr
        step = int(meta["global_step"])
        state.engine.global_steps = step
        state.engine.global_samples = step * state.recipe.train.global_batch_size
        if saved_world != world_size:
            return step
    set_rng_state(load_state(tag_dir, rng_name(rank)))
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


def train(state: TrainState, start_step: int = 0, stop_step: int | None = None, progress: bool = True,
          stop: StopRequest | None = None) -> LoopResult:
    """Run global steps ``start_step .. stop_step`` (default: to the end), checkpointing every
    ``output.save_every`` steps and when ``stop`` is agreed on (then the loop ends early)."""
    rank, world_size = world()
    stop_at = state.total_steps if stop_step is None else min(stop_step, state.total_steps)
    writer = MetricsWriter(state.recipe.output.dir, stop_at, start_step, enabled=rank == 0, progress=progress)
    state.engine.train()
    try:
        return run_steps(state.data, lambda step, batch: train_step(state, batch), start_step, stop_at, world_size,
                         writer, state.recipe.output.save_every, lambda step: save_checkpoint(state, step), stop)
    finally:
        writer.close()


def finish(state: TrainState) -> None:
    """Final checkpoint (unless it is the one the run resumed from), adapter and PEFT export (fp32
    masters, atomic, rank 0 writes), then ``complete.json``."""
    out = Path(state.recipe.output.dir)
    if state.resumed_from != state.total_steps:
        save_checkpoint(state, state.total_steps)
    if state.recipe.rasa_config() is not None:
        save_adapter_distributed(state.engine, out / "adapter" if state.recipe.output.save_adapter else None,
                                 out / "peft_adapter" if state.recipe.output.export_peft else None)
    if world()[0] == 0:
        mark_complete(out, state.recipe, state.total_steps)
    dist.barrier()


def run(recipe: Recipe, stop_step: int | None = None, resume: str | os.PathLike | None = None,
        portable: bool = False, progress: bool = True, control_dir: str | os.PathLike | None = None) -> int:
    """``rasa-train`` with ``engine: deepspeed``: set up, resume (``"latest"``, ``"auto"`` or a path; see
    :func:`~rasa_megatron.training.loop.resume_directory`; ``portable``: onto another world size),
    train, then write a checkpoint at ``stop_step``, or on a stop request (then exit status
    ``EXIT_PREEMPTED``), or at the end the final checkpoint, adapter and PEFT export. Returns the exit status."""
    state = setup(recipe)
    stop = StopRequest(recipe.output.stop_signals, stop_file_path(recipe, control_dir), recipe.output.max_minutes)
    start = 0
    stop_at = state.total_steps if stop_step is None else min(state.total_steps, stop_step)
    tag_dir = resume_directory(recipe, resume, stop_at, state.identity)
    if tag_dir is not None:
        start = state.resumed_from = load_checkpoint(state, tag_dir, portable)
    result = train(state, start_step=start, stop_step=stop_step, progress=progress, stop=stop)
    if result.stopped_step is not None:
        return preempted(recipe, control_dir, result, stop)
    if stop_step is not None and stop_step < state.total_steps:
        if state.resumed_from != stop_step:
            save_checkpoint(state, stop_step)
    else:
        finish(state)
    return 0
