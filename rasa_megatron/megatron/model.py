"""The Megatron-core GPTModel of a Hugging Face Llama/Mistral/Mixtral (local spec), as the engine and the
tests build it: Megatron's local layer spec with the SDPA core attention of
:mod:`rasa_megatron.megatron.sdpa_attention` (or Megatron's own ``DotProductAttention``) and RMSNorms
in the model's dtype that allow sequence parallelism.

Without apex or Transformer Engine, Megatron's local spec builds its RMSNorms with ``WrappedTorchNorm``
(a ``torch.nn.RMSNorm`` in fp32 whatever ``params_dtype``, refusing sequence parallelism);
:func:`gpt_block_spec` puts :class:`TorchRMSNorm` in its place. Both keep the parameter name ``weight``.
"""
from __future__ import annotations

import torch

from ..convert.megatron_weights import rope_theta
from .sdpa_attention import SDPADotProductAttention


class TorchRMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` with Megatron's norm constructor, in ``config.params_dtype``; unlike
    Megatron's WrappedTorchNorm it allows sequence parallelism (the weight is tagged
    ``sequence_parallel`` so Megatron's ``finalize_model_grads`` all-reduces its gradient over TP,
    as for its fused norms)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        self.weight.sequence_parallel = config.sequence_parallel


def build_gpt_model(transformer_config, hf_config, pre_process: bool = True, post_process: bool = True,
                    sdpa_attention: bool = True, vp_stage: int | None = None, spec_transform=None):
    """A Megatron ``GPTModel`` (local spec) with the vocabulary, rope and embedding tying of ``hf_config``;
    ``spec_transform`` (e.g. ``lambda spec: rasa_layer_spec(spec, config, seed)``) rewrites the block spec."""
    from megatron.core.models.gpt import GPTModel

    spec = gpt_block_spec(transformer_config, sdpa_attention, vp_stage)
    return GPTModel(config=transformer_config, transformer_layer_spec=spec_transform(spec) if spec_transform else spec,
                    vocab_size=hf_config.vocab_size, max_sequence_length=hf_config.max_position_embeddings,
                    pre_process=pre_process, post_process=post_process, position_embedding_type="rope",
                    rotary_base=rope_theta(hf_config),
                    share_embeddings_and_output_weights=bool(hf_config.tie_word_embeddings), vp_stage=vp_stage)


def gpt_block_spec(config, sdpa_attention: bool = True, vp_stage: int | None = None):
    """TransformerBlockSubmodules for one GPTModel chunk: :func:`gpt_layer_spec` layers and
    :class:`TorchRMSNorm` norms."""
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    layer = gpt_layer_spec(sdpa_attention, num_experts=config.num_moe_experts)
    layer.submodules.input_layernorm = TorchRMSNorm
    layer.submodules.pre_mlp_layernorm = TorchRMSNorm
    return TransformerBlockSubmodules(layer_specs=[layer] * get_num_layers_to_build(config, vp_stage),
                                      layer_norm=TorchRMSNorm)


def gpt_layer_spec(sdpa_attention: bool = True, normalization: str = "RMSNorm", num_experts: int | None = None):
    """Megatron's local GPT layer spec (RMSNorm for Llama-style models, as ``WrappedTorchNorm`` without
    apex; a MoE layer with ``SequentialMLP`` experts when ``num_experts``), with the core attention
    replaced by :class:`SDPADotProductAttention` when ``sdpa_attention``."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(num_experts=num_experts, normalization=normalization)
    if sdpa_attention:
        spec.submodules.self_attention.submodules.core_attention = SDPADotProductAttention
    return spec
