"""DeepSpeed training of RaSA / LoRA / full fine-tuning from a :mod:`recipe` (examples/pretrain_rasa.py).

The flow: validate the recipe against the launch (before any work), build the model under
``zero.Init`` when ZeRO-3 is on (70B never materialises on one rank), add adapters, wrap in a
DeepSpeed engine with LionW and a cosine schedule with warm-up, make the pools resident, then run
global steps from a deterministic batch plan. Checkpoints are DeepSpeed engine checkpoints plus
per-rank RNG states; the adapter and the PEFT export are written from the gathered fp32 masters.
"""
from __future__ import annotations

import csv
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .data import collate, global_batch_plan, load_raw_dataset, micro_batches_for_rank, tokenize_dataset
from .inject import apply_rasa, rasa_config_of
from .recipe import Recipe, validate_recipe
from .train_utils import peak_rss_mib
from .zero3 import (keep_pools_resident, load_portable_state, resolve_checkpoint, save_portable_state, rng_file, rng_state, save_adapter_distributed,
                    set_rng_state)

CHECKPOINTS = "checkpoints"
PORTABLE = "portable"
METRICS = "metrics.csv"
METRIC_FIELDS = ("step", "epoch", "loss", "lr", "grad_norm", "tokens", "tokens_per_s_per_gpu", "step_seconds",
                 "peak_mem_mib")


def world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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


def load_tokenizer(recipe: Recipe):
    from transformers import AutoTokenizer

    m = recipe.model
    source = m.tokenizer or m.path
    kwargs = {"gguf_file": m.gguf_file} if m.gguf_file and source == m.path else {}
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_model(recipe: Recipe, ds_config: dict | None):
    """HF causal LM from ``model.path`` (weights) or ``model.config`` (random init), under ZeRO-3's
    ``zero.Init`` when ``ds_config`` enables stage 3 (transformers' DeepSpeed integration), with the
    recipe's adapter added (same seed on every rank, so every rank starts from the same adapter)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = torch.bfloat16 if recipe.train.precision == "bf16" else torch.float32
    keep_alive = None
    if ds_config is not None and zero_stage(ds_config) == 3:
        from transformers.integrations import HfDeepSpeedConfig

        keep_alive = HfDeepSpeedConfig(ds_config)  # makes from_pretrained/from_config use zero.Init
    m = recipe.model
    seed_everything(recipe.train.seed)
    if m.path is not None:
        kwargs = {"gguf_file": m.gguf_file} if m.gguf_file else {}
        model = AutoModelForCausalLM.from_pretrained(m.path, dtype=dtype, **kwargs)
    else:
        config = AutoConfig.from_pretrained(m.config)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model._rasa_hf_ds_config = keep_alive
    model.config.use_cache = False
    rasa_config = recipe.rasa_config()
    if rasa_config is not None:
        seed_everything(recipe.train.seed + 1)
        apply_rasa(model, rasa_config, adapter_dtype=dtype)
    if model.config.model_type in ("mixtral", "qwen2_moe", "qwen3_moe") and ds_config and zero_stage(ds_config) == 3:
        classes = mark_moe_blocks_as_leaf(model)
        if world()[0] == 0:
            print(f"ZeRO-3 leaf modules: {', '.join(c.__name__ for c in classes)}", flush=True)
    if recipe.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
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


def cosine_with_warmup(total_steps: int, warmup_ratio: float):
    """LR multiplier: linear warm-up over ``ceil(warmup_ratio * total)`` steps, then cosine to 0."""
    warmup = math.ceil(warmup_ratio * total_steps)

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return multiplier


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
    if t.optimizer == "lion":
        from lion_pytorch import Lion

        return Lion(params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
    return torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)


@dataclass
class TrainState:
    engine: object
    recipe: Recipe
    tokenizer: object
    dataset: object
    lengths: np.ndarray
    steps_per_epoch: int
    total_steps: int
    grad_accum: int


def setup(recipe: Recipe, dist_backend: str | None = None, resident_pools: bool = True) -> TrainState:
    """Initialise distributed, data, model and the DeepSpeed engine (recipe already validated)."""
    import deepspeed

    backend = dist_backend or ("nccl" if torch.cuda.is_available() else "gloo")
    deepspeed.init_distributed(dist_backend=backend)
    rank, world_size = world()
    grad_accum = validate_recipe(recipe, world_size)
    ds_config = deepspeed_config(recipe, grad_accum)
    tokenizer = load_tokenizer(recipe)
    # rank 0 builds the datasets cache first; the others then read it
    if rank != 0:
        dist.barrier()
    dataset = tokenize_dataset(load_raw_dataset(recipe.data.paths), tokenizer, recipe.data)
    if rank == 0:
        dist.barrier()
    lengths = np.array([len(ids) for ids in dataset["input_ids"]])
    steps_per_epoch = len(dataset) // recipe.train.global_batch_size
    if steps_per_epoch == 0:
        raise SystemExit(f"error: {len(dataset)} training samples is fewer than one global batch "
                         f"({recipe.train.global_batch_size})")
    total_steps = recipe.train.max_steps or math.ceil(recipe.train.epochs * steps_per_epoch)
    model = build_model(recipe, ds_config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(recipe, trainable, ds_config)
    scheduler = None
    if optimizer is not None:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(total_steps, recipe.train.warmup_ratio))
    engine, optimizer, _, scheduler = deepspeed.initialize(model=model, model_parameters=trainable, optimizer=optimizer,
                                                           lr_scheduler=scheduler, config=ds_config)
    if scheduler is None:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(total_steps, recipe.train.warmup_ratio))
        engine.lr_scheduler = scheduler
    if recipe.rasa_config() is not None:
        keep_pools_resident(engine, persistent=resident_pools)
    return TrainState(engine, recipe, tokenizer, dataset, lengths, steps_per_epoch, total_steps, grad_accum)


def _peak_memory_mib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return peak_rss_mib()


def save_checkpoint(state: TrainState, step: int) -> Path:
    """DeepSpeed engine checkpoint (model/optimizer/scheduler/step counters) + this rank's RNG."""
    rank, _ = world()
    out = Path(state.recipe.output.dir) / CHECKPOINTS
    tag = f"step{step:07d}"
    state.engine.save_checkpoint(str(out), tag=tag, client_state={"global_step": step})
    torch.save(rng_state(), rng_file(out, tag, rank))
    if state.recipe.rasa_config() is not None:
        save_portable_state(state.engine, out / tag / PORTABLE, {
            "global_step": step, "global_batch_size": state.recipe.train.global_batch_size,
            "scheduler": state.engine.lr_scheduler.state_dict()})
    if rank == 0:
        (out / tag / "recipe.json").write_text(json.dumps(state.recipe.to_dict(), indent=2))
        if state.recipe.rasa_config() is not None:
            (out / tag / "rasa_config.json").write_text(json.dumps(rasa_config_of(state.engine.module).to_dict()))
    dist.barrier()
    return out / tag


def load_checkpoint(state: TrainState, path: str | os.PathLike | None = None) -> int:
    """Restore the latest (or given) checkpoint; returns the global step to continue from.

    Restores weights, optimizer, scheduler and step counters (DeepSpeed) and this rank's RNG; the
    data position follows from the step (the batch plan is a function of seed, epoch and step).
    """
    rank, _ = world()
    try:
        root, tag = resolve_checkpoint(path or Path(state.recipe.output.dir) / CHECKPOINTS)
    except FileNotFoundError as err:
        raise SystemExit(f"error: cannot resume: {err}") from err
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
    try:
        root, tag = resolve_checkpoint(path or Path(state.recipe.output.dir) / CHECKPOINTS)
    except FileNotFoundError as err:
        raise SystemExit(f"error: cannot resume: {err}") from err
    meta = load_portable_state(state.engine, root / tag / PORTABLE)
    if meta["global_batch_size"] != state.recipe.train.global_batch_size:
        raise SystemExit(f"error: the checkpoint was trained with global batch {meta['global_batch_size']}, "
                         f"the recipe says {state.recipe.train.global_batch_size}; the data position would not match")
    scheduler = state.engine.lr_scheduler
    scheduler.load_state_dict(meta["scheduler"])
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr  # load_state_dict restores the schedule's position, not the optimizer's lr
    step = int(meta["global_step"])
    state.engine.global_steps = step
    state.engine.global_samples = step * state.recipe.train.global_batch_size
    return step


def train(state: TrainState, start_step: int = 0, stop_step: int | None = None, progress: bool = True) -> list[dict]:
    """Run global steps ``start_step .. stop_step`` (default: to the end); returns the metric rows."""
    from tqdm.auto import tqdm

    engine, recipe = state.engine, state.recipe
    rank, world_size = world()
    device = engine.device
    stop = state.total_steps if stop_step is None else min(stop_step, state.total_steps)
    out_dir = Path(recipe.output.dir)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    plan_epoch, plan = None, None
    board = _tensorboard(out_dir) if rank == 0 else None
    bar = tqdm(total=stop, initial=start_step, desc="train", disable=not progress or rank != 0, dynamic_ncols=True)
    engine.train()
    for step in range(start_step, stop):
        epoch = step // state.steps_per_epoch
        if epoch != plan_epoch:
            plan = global_batch_plan(state.lengths, recipe.train.global_batch_size, recipe.train.seed, epoch,
                                     recipe.data.group_by_length)
            plan_epoch = epoch
        lr = engine.get_lr()[0]
        started = time.perf_counter()
        loss_sum = torch.zeros(2, dtype=torch.float64)
        for indices in micro_batches_for_rank(plan[step % state.steps_per_epoch], recipe.train.micro_batch_size,
                                              rank, world_size):
            batch = collate([state.dataset[int(i)] for i in indices], state.tokenizer.pad_token_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
            loss_sum += torch.tensor([loss.item(), batch["attention_mask"].sum().item()], dtype=torch.float64)
        dist.all_reduce(loss_sum)
        seconds = time.perf_counter() - started
        row = {"step": step + 1, "epoch": round((step + 1) / state.steps_per_epoch, 4),
               "loss": loss_sum[0].item() / (state.grad_accum * world_size), "lr": lr,
               "grad_norm": _global_grad_norm(engine),
               "tokens": int(loss_sum[1].item()), "tokens_per_s_per_gpu": loss_sum[1].item() / seconds / world_size,
               "step_seconds": seconds, "peak_mem_mib": _peak_memory_mib()}
        rows.append(row)
        if rank == 0:
            _append_metrics(out_dir / METRICS, row)
            if board is not None:
                for key in ("loss", "lr", "grad_norm", "tokens_per_s_per_gpu", "peak_mem_mib"):
                    board.add_scalar(f"train/{key}", row[key], row["step"])
            bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}", tok_s_gpu=f"{row['tokens_per_s_per_gpu']:.0f}",
                            mem=f"{row['peak_mem_mib']:.0f}MiB")
        bar.update(1)
        if recipe.output.save_every and (step + 1) % recipe.output.save_every == 0 and step + 1 < state.total_steps:
            save_checkpoint(state, step + 1)
    bar.close()
    if board is not None:
        board.close()
    return rows


def _global_grad_norm(engine) -> float:
    """The step's global gradient norm before clipping, as DeepSpeed computed it (NaN when it did not)."""
    norm = engine.get_global_grad_norm()
    return float("nan") if norm is None else float(norm)


def _tensorboard(out_dir: Path):
    """A TensorBoard writer under ``out_dir/tensorboard`` when the tensorboard package is installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out_dir / "tensorboard"))


def _append_metrics(path: Path, row: dict) -> None:
    """Append a row; rows from a previous run at or after this step are dropped (resume)."""
    rows = []
    if path.exists():
        with open(path, newline="") as handle:
            rows = [r for r in csv.DictReader(handle) if int(r["step"]) < row["step"]]
    rows.append(row)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=METRIC_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def finish(state: TrainState) -> None:
    """Final checkpoint, adapter and PEFT export (fp32 masters, atomic, rank 0 writes)."""
    out = Path(state.recipe.output.dir)
    save_checkpoint(state, state.total_steps)
    if state.recipe.rasa_config() is not None:
        save_adapter_distributed(state.engine, out / "adapter" if state.recipe.output.save_adapter else None,
                                 out / "peft_adapter" if state.recipe.output.export_peft else None)
