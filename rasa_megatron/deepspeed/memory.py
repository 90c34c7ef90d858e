"""Per-GPU memory of the DeepSpeed engine's ZeRO stages for a recipe (no weights, meta device).

Model states follow DeepSpeed's own estimator (``estimate_zero3_model_states_mem_needs`` /
``estimate_zero2_model_states_mem_needs``), generalised from "every parameter is trained with
Adam" to frozen + trainable parameters and to Lion:

* a frozen parameter costs its bf16 copy, 2 bytes (partitioned under ZeRO-3);
* a trainable one costs DeepSpeed's 18 bytes with AdamW (2 bf16 grad + 4 fp32 grad + 4 fp32
  master + 8 for two moments; partitioned under ZeRO-2 and -3, on top of its bf16 copy under
  ZeRO-2 as in DeepSpeed's estimator) and 14 bytes with Lion (one moment);
* ZeRO-3 keeps ``4 x largest layer`` bytes of gathered parameters live; optimizer offload moves
  everything but the bf16 parameters to CPU, parameter offload those too.

For full fine-tuning with AdamW the numbers equal DeepSpeed's estimator exactly (tested).
Activations assume activation checkpointing at every decoder layer and SDPA/flash attention
(no ``s^2`` term): ``2 s b h`` bytes kept per layer, ``34 s b h`` for the one layer being
recomputed (Korthikanti et al. 2022, Table 2, without the attention-score term), plus the logits
(``6 s b V``: bf16 logits and their fp32 copy for the loss).
"""
from __future__ import annotations

from ..training.dry_run import ParamCounts, count_model_params, memory_row

TRAINABLE_BYTES = {"adamw": 18, "lion": 14}


def model_states_bytes_per_gpu(counts: ParamCounts, num_gpus: int, stage: int, offload_optimizer: bool = False,
                               offload_params: bool = False, optimizer: str = "adamw") -> int:
    """GPU bytes for parameters, gradients and optimizer states (DeepSpeed's accounting)."""
    if optimizer not in TRAINABLE_BYTES:
        raise ValueError(f"optimizer={optimizer!r}; valid: {sorted(TRAINABLE_BYTES)}")
    frozen = counts.total - counts.trainable
    per_trainable = TRAINABLE_BYTES[optimizer]
    if stage == 3:
        live = 4 * counts.largest_layer
        if offload_params:
            return live
        if offload_optimizer:
            return live + int(2 * counts.total / num_gpus)
        return live + int((2 * frozen + per_trainable * counts.trainable) / num_gpus)
    if stage in (1, 2):
        if offload_optimizer:
            return 2 * counts.total
        return 2 * counts.total + int(per_trainable * counts.trainable / num_gpus)
    if stage == 0:
        return 2 * counts.total + per_trainable * counts.trainable
    raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3, got {stage}")


def activation_bytes_per_gpu(config, micro_batch_size: int, seq_len: int, checkpointing: bool = True) -> int:
    """Activation bytes of one micro-batch (bf16), see the module docstring."""
    h, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    tokens = micro_batch_size * seq_len
    logits = 6 * tokens * vocab
    if checkpointing:
        return 2 * tokens * h * layers + 34 * tokens * h + logits
    return 34 * tokens * h * layers + logits


def memory_table(counts: ParamCounts, model_config, micro_batch_size: int, seq_len: int, num_gpus: int,
                 optimizer: str, checkpointing: bool = True) -> list[dict]:
    """Per-GPU GiB for each ZeRO stage / offload choice at ``num_gpus`` GPUs."""
    activations = activation_bytes_per_gpu(model_config, micro_batch_size, seq_len, checkpointing)
    return [memory_row(label, model_states_bytes_per_gpu(counts, num_gpus, stage, off_opt, off_par, optimizer),
                       activations)
            for label, stage, off_opt, off_par in (("ZeRO-2", 2, False, False), ("ZeRO-3", 3, False, False),
                                                   ("ZeRO-3 + offload optimizer", 3, True, False),
                                                   ("ZeRO-3 + offload optimizer + params", 3, True, True))]


def memory_rows(model, recipe, num_gpus: int) -> list[dict]:
    """The dry run's table for ``engine: deepspeed``: :func:`memory_table` of the recipe's model."""
    t = recipe.train
    return memory_table(count_model_params(model), model.config, t.micro_batch_size, recipe.data.seq_len, num_gpus,
                        t.optimizer, t.gradient_checkpointing)


def deepspeed_zero3_estimate(counts: ParamCounts, nodes: int, gpus_per_node: int) -> int:
    """DeepSpeed's own ZeRO-3 model-states estimate per GPU (every parameter trained with Adam), bytes."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    _, gpu_bytes, _ = estimate_zero3_model_states_mem_needs(counts.total, counts.largest_layer, gpus_per_node, nodes,
                                                            cpu_offload=False, cpu_offload_params=False)
    return gpu_bytes
