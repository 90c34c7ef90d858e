"""Core attention through ``torch.nn.functional.scaled_dot_product_attention`` for Megatron-core GPT
layer specs: the local spec's default in this project, on GPU and CPU alike.

Megatron's local ``DotProductAttention`` computes the scores unfused (``[b, heads, s, s]`` tensors,
~1 GB each at 4k tokens, softmax and dropout on them); this drop-in with the same constructor and
call signature hands plain causal attention to SDPA with ``is_causal`` (PyTorch's flash or
memory-efficient kernels on a GPU, no ``s^2`` tensor), and masks or sliding windows as a boolean
mask (the memory-efficient kernel). ``megatron.attention: local`` in a recipe keeps Megatron's own.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule

from ..parallel_layout import check_divisible


def _tensor_parallel_size(pg_collection) -> int:
    """TP size from ``pg_collection`` (Megatron's process groups when None; 1 without any)."""
    if pg_collection is None:
        from megatron.core.process_groups_config import ProcessGroupCollection

        pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
    tp_group = getattr(pg_collection, "tp", None)
    return tp_group.size() if tp_group is not None else 1


class SDPADotProductAttention(MegatronModule):
    """Softmax attention on this TP rank's heads (Megatron's ``DotProductAttention`` interface).

    Shapes: ``query [sq, b, np, hn]``, ``key``/``value`` ``[sk, b, ng, hn]`` with
    ``np = num_attention_heads / tp`` and ``ng = num_query_groups / tp`` -> ``[sq, b, np * hn]``.
    ``attention_mask`` (optional, bool, broadcastable to ``[b, np, sq, sk]``) is True where attention
    is NOT allowed. Masking follows Megatron's unfused softmax: a layer with a sliding window uses
    the window (and the given mask, if any); otherwise a given mask is used as is; a causal layer
    without a mask is causal (``sq == sk``; ``sq == 1`` attends to every key). Attention dropout
    (``config.attention_dropout``) applies in training, in Megatron's ``model-parallel-rng`` tracker
    state (the heads of a TP rank are its own) unless sequence parallelism is on, as Megatron's
    ``DotProductAttention`` does. ``apply_query_key_layer_scaling`` divides Megatron's scale by the
    layer number and multiplies the scores by it again, so it is left out.
    """

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None):
        super().__init__(config=config)
        from megatron.core.transformer.utils import is_layer_window_attention

        if getattr(config, "context_parallel_size", 1) != 1:
            raise ValueError(f"SDPADotProductAttention does not support context parallelism "
                             f"(context_parallel_size = {config.context_parallel_size})")
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise ValueError(f"SDPADotProductAttention supports softmax_type 'vanilla' only, not "
                             f"{config.softmax_type!r}")
        tp_size = _tensor_parallel_size(pg_collection)
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        self.num_attention_heads_per_partition = check_divisible(config.num_attention_heads, tp_size,
                                                                 "num_attention_heads", "tensor-parallel size")
        self.num_query_groups_per_partition = check_divisible(config.num_query_groups, tp_size, "num_query_groups",
                                                              "tensor-parallel size")
        self.hidden_size_per_attention_head = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        windowed = is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number)
        self.window_size = tuple(config.window_size) if windowed else None

    def _mask(self, attention_mask, attn_mask_type, sq: int, sk: int, device) -> tuple[torch.Tensor | None, bool]:
        """(allowed ``[.., sq, sk]`` bool mask or None, is_causal) for scaled_dot_product_attention."""
        if self.window_size is not None:
            left, right = self.window_size
            if right == 0 and sq == sk and left >= sk - 1 and attention_mask is None:
                return None, True  # the window covers the whole causal past
            ones = torch.ones(sq, sk, dtype=torch.bool, device=device)
            allowed = torch.tril(torch.triu(ones, diagonal=sk - sq - left), diagonal=sk - sq + right)
            return (allowed if attention_mask is None else allowed & ~attention_mask), False
        if attention_mask is not None:
            return ~attention_mask, False
        if getattr(attn_mask_type, "name", str(attn_mask_type)) == "causal" and sq > 1:
            if sq != sk:
                raise ValueError(f"a causal mask needs as many queries as keys, got sq = {sq}, sk = {sk}; "
                                 "pass attention_mask")
            return None, True
        return None, False

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        """``query [sq, b, np, hn]``, ``key``/``value`` ``[sk, b, ng, hn]`` -> ``[sq, b, np * hn]``."""
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPADotProductAttention supports neither packed sequences nor attention bias")
        sq, batch, heads, head_dim = query.shape
        groups = key.shape[2]
        if (heads, groups) != (self.num_attention_heads_per_partition, self.num_query_groups_per_partition):
            raise ValueError(f"query has {heads} heads and key {groups} groups; this TP rank expects "
                             f"{self.num_attention_heads_per_partition} and {self.num_query_groups_per_partition}")
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads or groups, s, hn]
        if heads > groups:
            k, v = k.repeat_interleave(heads // groups, dim=1), v.repeat_interleave(heads // groups, dim=1)
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        allowed, causal = self._mask(attention_mask, mask_type, sq, key.shape[0], query.device)
        rng = contextlib.nullcontext()
        if not self.config.sequence_parallel:  # this TP rank's heads: its own dropout stream (as Megatron's)
            from megatron.core import tensor_parallel

            rng = tensor_parallel.get_cuda_rng_tracker().fork()
        with rng:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, is_causal=causal,
                                                 dropout_p=self.dropout_p if self.training else 0.0,
                                                 scale=self.softmax_scale)
        return out.permute(2, 0, 1, 3).reshape(sq, batch, heads * head_dim)
