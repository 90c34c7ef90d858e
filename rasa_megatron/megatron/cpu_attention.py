"""A CPU-capable core attention for Megatron-core GPT layer specs (tests, CPU dry runs).

Megatron's local ``DotProductAttention`` calls ``torch.cuda``; this drop-in uses
``torch.nn.functional.scaled_dot_product_attention`` (causal, GQA) with the same constructor and
call signature. GPU training keeps Megatron's own attention (local or Transformer Engine).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule


class TorchDotProductAttention(MegatronModule):
    """Causal (or full) softmax attention on this rank's heads.

    Shapes: ``query [sq, b, np, hn]``, ``key``/``value`` ``[sk, b, ng, hn]`` (``np``, ``ng``: this
    TP rank's query heads and query groups) -> ``[sq, b, np * hn]``.
    """

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None):
        super().__init__(config=config)
        if getattr(config, "context_parallel_size", 1) != 1:
            raise ValueError("TorchDotProductAttention does not support context parallelism")
        self.attn_mask_type = attn_mask_type
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("TorchDotProductAttention supports neither packed sequences nor attention bias")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        repeat = query.shape[2] // key.shape[2]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, hn]
        if repeat > 1:
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        causal = getattr(mask_type, "name", str(mask_type)) == "causal"
        mask = None
        if attention_mask is not None and not causal:
            mask = ~attention_mask  # Megatron masks are True where attention is NOT allowed
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                             dropout_p=self.dropout_p if self.training else 0.0,
                                             scale=self.softmax_scale)
        sq, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(sq, b, -1)


class TorchRMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` with Megatron's norm constructor; unlike Megatron's WrappedTorchNorm it
    allows sequence parallelism (the weight is tagged ``sequence_parallel`` so Megatron's
    ``finalize_model_grads`` all-reduces its gradient over TP, as for its fused norms)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        self.weight.sequence_parallel = config.sequence_parallel


def gpt_block_spec(config, cpu_attention: bool = True, vp_stage: int | None = None):
    """TransformerBlockSubmodules for one GPTModel chunk: :func:`gpt_layer_spec` layers and RMSNorms
    that work under sequence parallelism on CPU."""
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    layer = gpt_layer_spec(cpu_attention, num_experts=config.num_moe_experts)
    layer.submodules.input_layernorm = TorchRMSNorm
    layer.submodules.pre_mlp_layernorm = TorchRMSNorm
    return TransformerBlockSubmodules(layer_specs=[layer] * get_num_layers_to_build(config, vp_stage),
                                      layer_norm=TorchRMSNorm)


def gpt_layer_spec(cpu_attention: bool = True, normalization: str = "RMSNorm", num_experts: int | None = None):
    """Megatron's local GPT layer spec (RMSNorm for Llama-style models; a MoE layer with
    ``SequentialMLP`` experts when ``num_experts``), with the core attention replaced by
    :class:`TorchDotProductAttention` when ``cpu_attention``."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(num_experts=num_experts, normalization=normalization)
    if cpu_attention:
        spec.submodules.self_attention.submodules.core_attention = TorchDotProductAttention
    return spec
