"""Per-GPU memory of the busiest rank of an ``engine: megatron`` recipe (no weights, meta device)."""
from __future__ import annotations

from ..training.dry_run import memory_row

MEGATRON_TRAINABLE_BYTES = {"adamw": 16, "lion": 12}  # fp32 adapter + fp32 main_grad + moments


def megatron_memory_row(model, recipe) -> dict:
    """Per-GPU GiB of the busiest rank for ``engine: megatron`` (the first pipeline stage).

    Frozen bf16 weights (2 bytes): dense ones split over TP x PP, stacked experts over EP x PP
    (expert TP is 1). Adapters (fp32 value, fp32 ``main_grad`` of Megatron's DDP, optimizer moments:
    12 bytes with Lion, 16 with AdamW) counted as if replicated over TP (an upper bound: B of column
    and A of row layers are split). Activations (SDPA attention: no ``s^2`` term; Megatron's local
    attention adds :func:`attention_score_bytes`) with activation checkpointing at every layer and
    1F1B: the first stage keeps the checkpointed layer inputs of PP micro-batches in flight (``2 s b h``
    for each of its ``L / PP`` layers, ``PP`` times = ``L`` layers' worth), divided by TP under
    sequence parallelism; the recomputed layer ``34 s b h / TP``; logits ``6 s b V / TP`` (the last
    stage's, counted here too as an upper bound)."""
    mg, t = recipe.megatron, recipe.train
    tp, pp, ep = mg.tensor_model_parallel_size, mg.pipeline_model_parallel_size, mg.expert_model_parallel_size
    dense = experts = trainable_dense = trainable_experts = 0
    for name, param in model.named_parameters():
        is_expert = ".mlp.experts." in name
        if param.requires_grad:
            trainable_experts += param.numel() if is_expert else 0
            trainable_dense += 0 if is_expert else param.numel()
        elif is_expert:
            experts += param.numel()
        else:
            dense += param.numel()
    per_trainable = MEGATRON_TRAINABLE_BYTES[t.optimizer]
    states = (2 * dense / (tp * pp) + 2 * experts / (ep * pp)
              + per_trainable * (trainable_dense / pp + trainable_experts / (ep * pp)))
    config = model.config
    tokens = t.micro_batch_size * recipe.data.seq_len
    h, layers = config.hidden_size, config.num_hidden_layers
    kept = 2 * tokens * h * (layers if t.gradient_checkpointing else 17 * layers)
    activations = (kept / (tp if mg.sequence_parallel else 1) + 34 * tokens * h / tp
                   + 6 * tokens * config.vocab_size / tp + attention_score_bytes(recipe, config))
    layout = f"Megatron TP{tp} x PP{pp}" + (f" x EP{ep}" if ep > 1 else "") + (" + SP" if mg.sequence_parallel else "")
    return memory_row(layout, states, activations)


def attention_score_bytes(recipe, config) -> float:
    """The ``s^2`` tensors of Megatron's unfused ``DotProductAttention`` (``megatron.attention: local``):
    scores, softmax and dropout mask, ``5 a s^2 b`` bytes per layer over TP (Korthikanti et al. 2022),
    for the one recomputed layer (all ``L`` with 1F1B's in-flight micro-batches without recompute).
    The SDPA core attention (``sdpa``, the default) hands causal attention to flash / memory-efficient
    kernels and keeps none: 0."""
    mg, t = recipe.megatron, recipe.train
    if mg.attention != "local":
        return 0.0
    per_layer = 5 * config.num_attention_heads * recipe.data.seq_len ** 2 * t.micro_batch_size
    return per_layer / mg.tensor_model_parallel_size * (1 if t.gradient_checkpointing else config.num_hidden_layers)


def memory_rows(model, recipe, num_gpus: int) -> list[dict]:
    """The dry run's table for ``engine: megatron``: the busiest rank of the recipe's layout."""
    return [megatron_memory_row(model, recipe)]
