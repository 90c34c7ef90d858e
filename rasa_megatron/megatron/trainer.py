"""``examples/pretrain_rasa.py`` with ``engine: megatron``: RaSA fine-tuning of a HF checkpoint as a
Megatron-core GPTModel on a TP x PP (x VPP) x DP layout, driven by Megatron's own pipeline schedules.

The model chunks are wrapped in Megatron's ``DistributedDataParallel`` (fp32 gradient buffers of
the adapter parameters only: the base is frozen). Per optimizer step: the pipeline-sharded pools are
all-gathered once, Megatron's ``get_forward_backward_func()`` runs the micro-batches of this
data-parallel rank, and the schedule's ``finalize_model_grads_func``
(:func:`finalize_model_grads_with_rasa`) finishes the RaSA gradients (PP reduce-scatter, TP all-reduce
of partial grads) and then runs Megatron's own, whose DDP averages over data-parallel ranks, expert
adapters (MoE, expert parallel) over the ranks holding the same experts; the global gradient norm is
clipped over the model-parallel and expert-parallel groups; the adapter parameters (fp32) step with
LionW/AdamW on their ``main_grad``, or (``megatron.use_distributed_optimizer``) with Megatron's
distributed optimizer, which shards the AdamW states and the step over data-parallel ranks and
clips with its own global norm. Same data plan, loss averaging, init
and schedule as the DeepSpeed path, so both match the single-process reference. At the end the
adapter is assembled on rank 0 (:func:`gather_hf_adapter`) and written in the project format and
as a PEFT LoRA export. Base weights stream from the checkpoint's safetensors: each rank reads only
the tensors its shards need.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..data import global_batch_plan, load_raw_dataset, micro_batches_for_rank, tokenize_dataset
from ..recipe import Recipe
from ..trainer import CHECKPOINTS
from .inject import apply_rasa_megatron, gather_hf_adapter
from .parallel_layers import finalize_model_grads_with_rasa, gather_pipeline_pools


class _StackedExperts:
    """Lazy ``[E, ...]`` view of one layer's experts in a Mixtral checkpoint as saved on disk (one
    tensor per expert); ``view[e]`` reads expert ``e`` only, so an expert-parallel rank reads its experts."""

    def __init__(self, checkpoint: "SafetensorsCheckpoint", keys_of_expert):
        self.checkpoint, self.keys_of_expert = checkpoint, keys_of_expert

    def __getitem__(self, expert: int) -> torch.Tensor:
        return torch.cat([self.checkpoint[key] for key in self.keys_of_expert(expert)])


class SafetensorsCheckpoint:
    """Read-on-access mapping over a HF checkpoint directory's ``*.safetensors`` (sharded or not).

    Keys are those of the transformers-5 model in memory. Mixtral checkpoints on disk (the hub's and
    what ``save_pretrained`` writes) keep the original names, which transformers converts at load time
    (its ``conversion_mapping``: ``block_sparse_moe.`` -> ``mlp.``, per-expert ``w1``/``w3`` -> rows
    ``[gate ; up]`` of ``experts.gate_up_proj[e]``, ``w2`` -> ``experts.down_proj[e]``); the same
    mapping is applied here, expert by expert (see :class:`_StackedExperts`).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            self.where = json.loads(index.read_text())["weight_map"]
        else:
            from safetensors import safe_open

            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"no *.safetensors weights in {self.path}")
            self.where = {}
            for file in files:
                with safe_open(file, "pt") as handle:
                    self.where.update({key: file.name for key in handle.keys()})

    def _on_disk(self, key: str):
        """The on-disk source of an in-memory Mixtral MoE key: a key, a :class:`_StackedExperts`, or None."""
        prefix, sep, leaf = key.partition(".mlp.")
        moe = f"{prefix}.block_sparse_moe."
        if not sep or f"{moe}gate.weight" not in self.where:
            return None
        if leaf == "gate.weight":
            return f"{moe}gate.weight"
        if leaf == "experts.gate_up_proj":
            return _StackedExperts(self, lambda e: (f"{moe}experts.{e}.w1.weight", f"{moe}experts.{e}.w3.weight"))
        if leaf == "experts.down_proj":
            return _StackedExperts(self, lambda e: (f"{moe}experts.{e}.w2.weight",))
        return None

    def __contains__(self, key) -> bool:
        return key in self.where or self._on_disk(key) is not None

    def __getitem__(self, key: str):
        from safetensors import safe_open

        if key not in self.where:
            source = self._on_disk(key)
            if source is None:
                raise KeyError(f"{key} not in the checkpoint {self.path}")
            return source if isinstance(source, _StackedExperts) else self[source]
        with safe_open(self.path / self.where[key], "pt") as handle:
            return handle.get_tensor(key)

    def get(self, key, default=None):
        return self[key] if key in self else default


def _pad_micro_batch(features: list[dict], seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Fixed-length right padding (Megatron's p2p needs one activation shape). The dataset's labels
    are HF-style (aligned with the inputs, shifted inside the HF loss); Megatron's GPTModel scores
    position ``t`` against ``labels[t]``, so they are shifted here: ``labels[t] = hf_labels[t + 1]``,
    and ``loss_mask`` marks the positions whose next token has a label."""
    batch = len(features)
    input_ids = torch.full((batch, seq_len), pad_id, dtype=torch.long)
    labels = torch.zeros((batch, seq_len), dtype=torch.long)
    loss_mask = torch.zeros((batch, seq_len), dtype=torch.float32)
    for row, feature in enumerate(features):
        ids = torch.as_tensor(feature["input_ids"])[:seq_len]
        target = torch.as_tensor(feature["labels"])[1:seq_len + 1]  # next-token labels
        input_ids[row, :len(ids)] = ids
        valid = target >= 0
        labels[row, :len(target)] = torch.where(valid, target, torch.zeros_like(target))
        loss_mask[row, :len(target)] = valid.float()
    positions = torch.arange(seq_len).expand(batch, seq_len)
    return {"input_ids": input_ids, "labels": labels, "loss_mask": loss_mask, "position_ids": positions}


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    per_token = model(batch["input_ids"], batch["position_ids"], None, labels=batch["labels"])

    def loss_func(output):
        mask = batch["loss_mask"]
        loss = (output.float() * mask).sum() / mask.sum().clamp(min=1)
        return loss, {"loss": loss.detach().clone()}  # the schedule divides `loss` in place

    return per_token, loss_func


def global_grad_norm(params: list, parallel_state) -> float:
    """Global L2 norm of ``params``' gradients as Megatron's optimizers take it: its parameter filter
    (shared and TP-duplicate parameters dropped by their attributes) and ``get_grad_norm_fp32``, dense
    parameters over the model-parallel group, expert parameters (``allreduce = False``) over the
    expert tensor x expert x pipeline group, combined."""
    from megatron.core.optimizer.clip_grads import get_grad_norm_fp32
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
    from megatron.core.transformer.module import param_is_not_shared

    counted = [p for p in params if p.grad is not None and param_is_not_shared(p)
               and param_is_not_tensor_parallel_duplicate(p)]
    dense = get_grad_norm_fp32([p.grad for p in counted if getattr(p, "allreduce", True)],
                               grad_stats_parallel_group=parallel_state.get_model_parallel_group())
    expert = get_grad_norm_fp32([p.grad for p in counted if not getattr(p, "allreduce", True)],
                                grad_stats_parallel_group=parallel_state.get_expert_tensor_model_pipeline_parallel_group())
    return math.hypot(dense, expert)


def clip_grad_norm(params: list, max_norm: float, parallel_state) -> float:
    """:func:`global_grad_norm`, then Megatron's ``clip_grad_by_total_norm_fp32`` scales the grads in
    place when it is above ``max_norm``. Returns the norm before clipping."""
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    norm = global_grad_norm(params, parallel_state)
    if max_norm:
        clip_grad_by_total_norm_fp32([p for p in params if p.grad is not None], max_norm, norm)
    return norm


def build_optimizer(recipe: Recipe, ddp_chunks: list, params: list):
    """The adapter optimizer -> ``(optimizer, torch_optimizers)``: a torch LionW/AdamW over ``params``
    (then ``torch_optimizers == [optimizer]``), or with ``megatron.use_distributed_optimizer``
    Megatron's ``get_megatron_optimizer`` (AdamW, every parameter decayed as in the other paths,
    ``clip_grad = train.max_grad_norm``) over the DDP chunks, whose torch optimizers over this rank's
    shards (dense and expert parameters) take the LR schedule and the checkpointed state."""
    t = recipe.train
    if recipe.megatron.use_distributed_optimizer:
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        config = OptimizerConfig(optimizer="adam", lr=t.lr, weight_decay=t.weight_decay, adam_beta1=t.betas[0],
                                 adam_beta2=t.betas[1], adam_eps=1e-8, clip_grad=t.max_grad_norm or 0.0,
                                 use_distributed_optimizer=True, params_dtype=torch.float32)
        # config_overrides={}: no Megatron default of skipping weight decay on 1-D parameters (RaSA's D)
        optimizer = get_megatron_optimizer(config, ddp_chunks, config_overrides={})
        return optimizer, [o.optimizer for o in getattr(optimizer, "chained_optimizers", [optimizer])]
    if t.optimizer == "lion":
        from lion_pytorch import Lion

        optimizer = Lion(params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
    return optimizer, [optimizer]


def _hf_model_with_adapter(hf_config, rasa_config, tensors: dict):
    """A meta-device HF model carrying the real adapter tensors (for save_adapter / export_peft_lora)."""
    from transformers import AutoModelForCausalLM

    from ..inject import adapter_state_dict, apply_rasa

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    apply_rasa(model, rasa_config)
    for key, param in adapter_state_dict(model).items():
        owner_path, _, name = key.rpartition(".")
        owner = model.get_submodule(owner_path)
        owner._parameters[name] = torch.nn.Parameter(tensors[key].float(), requires_grad=False)
    return model


def _layout(parallel_state, distributed_optimizer: bool) -> dict:
    """What per-rank checkpoint state depends on: the parallel layout and the optimizer's sharding."""
    return {"world_size": dist.get_world_size(), "use_distributed_optimizer": distributed_optimizer,
            "tensor_model_parallel_size": parallel_state.get_tensor_model_parallel_world_size(),
            "pipeline_model_parallel_size": parallel_state.get_pipeline_model_parallel_world_size(),
            "virtual_pipeline_model_parallel_size": parallel_state.get_virtual_pipeline_model_parallel_world_size() or 1,
            "expert_model_parallel_size": parallel_state.get_expert_model_parallel_world_size()}


def check_resume_layout(saved: dict, current: dict) -> None:
    """Refuse to resume per-rank state on another parallel layout, naming what differs."""
    differ = {key: (saved.get(key), value) for key, value in current.items() if saved.get(key) != value}
    if differ:
        what = ", ".join(f"{key} {old} -> {new}" for key, (old, new) in differ.items())
        raise SystemExit(f"error: cannot resume: the checkpoint was written on another layout ({what}); "
                         "per-rank adapter and optimizer shards resume on the layout that wrote them")


def _adapter_parameters(chunks: list) -> dict[str, torch.nn.Parameter]:
    """``{"<chunk>.<name>": parameter}`` of the trainable (adapter) parameters: what a checkpoint holds."""
    return {f"{v}.{name}": p for v, chunk in enumerate(chunks) for name, p in chunk.named_parameters()
            if p.requires_grad}


def save_checkpoint(out_dir: Path, step: int, chunks: list, optimizers: list, schedulers: list, parallel_state,
                    distributed_optimizer: bool = False) -> Path:
    """Every rank writes its adapter shards, its torch optimizers' states (with Megatron's distributed
    optimizer: this rank's shards), the schedulers' states and RNG to
    ``checkpoints/step{step:07d}/rank{rank:05d}.pt`` (atomically: temporary file, then rename);
    after all ranks wrote, rank 0 writes ``layout.json`` and then ``checkpoints/latest``."""
    from ..zero3 import rng_state

    tag_dir = out_dir / CHECKPOINTS / f"step{step:07d}"
    tag_dir.mkdir(parents=True, exist_ok=True)
    state = {"step": step, "optimizers": [o.state_dict() for o in optimizers],
             "schedulers": [s.state_dict() for s in schedulers], "rng": rng_state(),
             "adapter": {name: p.detach().cpu() for name, p in _adapter_parameters(chunks).items()}}
    path = tag_dir / f"rank{dist.get_rank():05d}.pt"
    torch.save(state, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)
    dist.barrier()
    if dist.get_rank() == 0:
        (tag_dir / "layout.json").write_text(json.dumps(_layout(parallel_state, distributed_optimizer)))
        latest = out_dir / CHECKPOINTS / "latest"
        latest.with_suffix(".tmp").write_text(tag_dir.name)
        os.replace(latest.with_suffix(".tmp"), latest)
    dist.barrier()
    return tag_dir


def load_checkpoint(path: Path, chunks: list, optimizers: list, schedulers: list, parallel_state,
                    distributed_optimizer: bool = False) -> int:
    """Restore what :func:`save_checkpoint` wrote (``path``: the checkpoints root with ``latest``, or a
    ``step*`` directory) on the same layout; returns the global step to continue from."""
    from ..zero3 import set_rng_state

    path = Path(path)
    if (path / "latest").is_file():
        path = path / (path / "latest").read_text().strip()
    if not (path / "layout.json").is_file():
        raise SystemExit(f"error: cannot resume: {path} is not a Megatron-engine checkpoint (no layout.json; "
                         f"expected {CHECKPOINTS}/latest or a {CHECKPOINTS}/step* directory)")
    check_resume_layout(json.loads((path / "layout.json").read_text()), _layout(parallel_state, distributed_optimizer))
    state = torch.load(path / f"rank{dist.get_rank():05d}.pt", weights_only=False, map_location="cpu")
    params = _adapter_parameters(chunks)
    if set(params) != set(state["adapter"]):
        raise SystemExit(f"error: cannot resume: the checkpoint's adapter does not fit this model "
                         f"(differs in {sorted(set(params) ^ set(state['adapter']))[:3]})")
    with torch.no_grad():
        for name, param in params.items():
            if param.shape != state["adapter"][name].shape:
                raise SystemExit(f"error: cannot resume: {name} is {tuple(state['adapter'][name].shape)} in the "
                                 f"checkpoint, {tuple(param.shape)} in this model (another adapter config?)")
            param.copy_(state["adapter"][name])
    if len(state["optimizers"]) != len(optimizers):
        raise SystemExit(f"error: cannot resume: the checkpoint holds {len(state['optimizers'])} optimizer states, "
                         f"this run has {len(optimizers)}")
    for optimizer, saved in zip(optimizers, state["optimizers"]):
        optimizer.load_state_dict(saved)
    for scheduler, saved in zip(schedulers, state["schedulers"]):
        scheduler.load_state_dict(saved)
    set_rng_state(state["rng"])
    return int(state["step"])


def run(recipe: Recipe, stop_step: int | None = None, progress: bool = True,
        resume: str | os.PathLike | None = None) -> list[dict]:
    """Train with Megatron-core; returns the per-step metrics on the rank that logs (others: []).

    ``resume``: ``"latest"`` (``output.dir/checkpoints``) or a checkpoint path, same layout. A run
    stopped by ``stop_step`` before the end saves a checkpoint instead of the final adapter."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from transformers import AutoConfig

    from ..trainer import METRIC_FIELDS, _append_metrics, cosine_with_warmup, load_tokenizer, seed_everything
    from .convert import build_gpt_model, hf_to_megatron, transformer_config_from_hf
    from .cpu_compat import enable_cpu_megatron

    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    else:
        enable_cpu_megatron()
    mg, t, d = recipe.megatron, recipe.train, recipe.data
    vpp, ep = mg.virtual_pipeline_model_parallel_size, mg.expert_model_parallel_size
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=mg.tensor_model_parallel_size,
                                             pipeline_model_parallel_size=mg.pipeline_model_parallel_size,
                                             virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None,
                                             expert_model_parallel_size=ep, expert_tensor_parallel_size=1)
    tp, pp = mg.tensor_model_parallel_size, mg.pipeline_model_parallel_size
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    tp_rank, pp_rank = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_pipeline_model_parallel_rank()
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    dtype = torch.bfloat16 if t.precision == "bf16" else torch.float32
    hf_config = AutoConfig.from_pretrained(recipe.model.path or recipe.model.config)
    moe = bool(getattr(hf_config, "num_local_experts", None))
    tconfig = transformer_config_from_hf(hf_config, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                         sequence_parallel=mg.sequence_parallel, params_dtype=dtype,
                                         bf16=dtype == torch.bfloat16,
                                         **({"expert_model_parallel_size": ep, "expert_tensor_parallel_size": 1}
                                            if moe else {}),
                                         **({"virtual_pipeline_model_parallel_size": vpp} if vpp > 1 else {}))
    if t.gradient_checkpointing and cuda:
        tconfig.recompute_granularity, tconfig.recompute_method, tconfig.recompute_num_layers = "full", "uniform", 1
    seed_everything(t.seed)
    base = SafetensorsCheckpoint(recipe.model.path) if recipe.model.path else None
    chunks = []
    for v in range(vpp):
        model = build_gpt_model(tconfig, hf_config, pre_process=pp_rank == 0 and v == 0,
                                post_process=pp_rank == pp - 1 and v == vpp - 1, cpu_attention=not cuda,
                                vp_stage=v if vpp > 1 else None)
        if base is not None:
            state = hf_to_megatron(base, hf_config, tp_rank, tp, pp_rank, pp, v, vpp, ep_rank=ep_rank, ep_size=ep)
            missing, unexpected = model.load_state_dict(state, strict=False)
            missing = [m for m in missing if not m.endswith("_extra_state")]
            if missing or unexpected:
                raise RuntimeError(f"checkpoint does not fit the Megatron model: missing {missing[:3]}, "
                                   f"unexpected {unexpected[:3]}")
        chunks.append(model.cuda() if cuda else model)
    seed_everything(t.seed + 1)  # the DeepSpeed path's adapter seed: same init on every layout
    apply_rasa_megatron(chunks, recipe.rasa_config(), adapter_dtype=torch.float32)
    if cuda:
        for chunk in chunks:
            chunk.cuda()
    # Megatron's DDP over the adapter parameters (fp32 grad buffers; no overlap: check_megatron_ddp)
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               use_distributed_optimizer=mg.use_distributed_optimizer)
    ddp_chunks = [DistributedDataParallel(tconfig, ddp_config, chunk, disable_bucketing=v > 0)
                  for v, chunk in enumerate(chunks)]
    tconfig.finalize_model_grads_func = finalize_model_grads_with_rasa
    tconfig.batch_p2p_comm = cuda  # gloo has no batched isend/irecv
    params = [p for chunk in chunks for p in chunk.parameters() if p.requires_grad]
    optimizer, torch_optimizers = build_optimizer(recipe, ddp_chunks, params)

    tokenizer = load_tokenizer(recipe)
    dataset = tokenize_dataset(load_raw_dataset(d.paths), tokenizer, d)
    lengths = np.array([len(ids) for ids in dataset["input_ids"]])
    steps_per_epoch = len(dataset) // t.global_batch_size
    total = t.max_steps or math.ceil(t.epochs * steps_per_epoch)
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, cosine_with_warmup(total, t.warmup_ratio))
                  for o in torch_optimizers]
    forward_backward = get_forward_backward_func()
    out_dir = Path(recipe.output.dir)
    logs = pp_rank == pp - 1 and tp_rank == 0 and dp_rank == 0
    if logs:
        out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    start = 0
    if resume is not None:
        start = load_checkpoint(out_dir / CHECKPOINTS if resume == "latest" else Path(resume), chunks,
                                torch_optimizers, schedulers, parallel_state, mg.use_distributed_optimizer)
    stop = total if stop_step is None else min(total, stop_step)
    steps = range(start, stop)
    bar = None
    if logs and progress:
        from tqdm import tqdm

        bar = tqdm(total=stop, initial=start, desc="megatron", unit="step")
    for step in steps:
        step_start = time.perf_counter()
        epoch = step // steps_per_epoch
        plan = global_batch_plan(lengths, t.global_batch_size, t.seed, epoch, d.group_by_length)
        micro = micro_batches_for_rank(plan[step % steps_per_epoch], t.micro_batch_size, dp_rank, dp_size)
        batches = [_pad_micro_batch([dataset[int(i)] for i in indices], d.seq_len, tokenizer.pad_token_id)
                   for indices in micro]
        if cuda:
            batches = [{k: v.cuda() for k, v in b.items()} for b in batches]
        for chunk in ddp_chunks:
            chunk.zero_grad_buffer()
        gather_pipeline_pools(ddp_chunks)
        iterators = [iter(batches) for _ in chunks] if vpp > 1 else iter(batches)
        losses = forward_backward(forward_step_func=_forward_step, data_iterator=iterators,
                                  model=ddp_chunks if vpp > 1 else ddp_chunks[0], num_microbatches=len(batches),
                                  seq_length=d.seq_len, micro_batch_size=t.micro_batch_size, forward_only=False)
        lr = torch_optimizers[0].param_groups[0]["lr"]
        if mg.use_distributed_optimizer:  # Megatron's step: clip by its global norm, step the shards, gather
            _, norm, _ = optimizer.step()
        else:
            for param in params:  # the optimizer steps on DDP's reduced fp32 gradient (as Megatron's fp32 path)
                param.grad = param.main_grad
            norm = clip_grad_norm(params, t.max_grad_norm, parallel_state)
            optimizer.step()
        for scheduler in schedulers:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        # the step's loss: mean over this rank's micro-batches (last stage), then over data-parallel ranks
        loss = torch.tensor(sum(float(x["loss"]) for x in losses) / len(losses) if losses else 0.0,
                            dtype=torch.float64, device=params[0].device)
        dist.all_reduce(loss, group=parallel_state.get_data_parallel_group())
        loss = loss.item() / dp_size
        if logs:
            tokens = sum(int(b["loss_mask"].sum()) for b in batches) * dp_size
            seconds = time.perf_counter() - step_start
            peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else 0.0
            row = {"step": step + 1, "epoch": epoch, "loss": loss, "lr": lr, "grad_norm": float(norm), "tokens": tokens,
                   "tokens_per_s_per_gpu": tokens / seconds / dist.get_world_size(), "step_seconds": seconds,
                   "peak_mem_mib": peak}
            rows.append(row)
            _append_metrics(out_dir / "metrics.csv", {k: row[k] for k in METRIC_FIELDS})
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.4f}", grad_norm=f"{norm:.3f}")
                bar.update()
        if recipe.output.save_every and (step + 1) % recipe.output.save_every == 0 and step + 1 < stop:
            save_checkpoint(out_dir, step + 1, chunks, torch_optimizers, schedulers, parallel_state,
                            mg.use_distributed_optimizer)
    if bar is not None:
        bar.close()
    if stop < total:  # stopped early: a checkpoint to resume from, not the final adapter
        save_checkpoint(out_dir, stop, chunks, torch_optimizers, schedulers, parallel_state, mg.use_distributed_optimizer)
        return rows
    adapter = gather_hf_adapter(chunks)
    if adapter is not None and recipe.output.save_adapter:
        from ..adapter import export_peft_lora, save_adapter

        hf_model = _hf_model_with_adapter(hf_config, recipe.rasa_config(), adapter)
        save_adapter(hf_model, out_dir / "adapter")
        if recipe.output.export_peft:
            export_peft_lora(hf_model, out_dir / "peft_adapter", base_model_name_or_path=recipe.model.path)
    dist.barrier()
    return rows
