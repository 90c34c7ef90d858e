"""The Megatron-core GPTModel of a Hugging Face Llama/Mistral/Mixtral (local spec), as the engine and the
tests build it: Megatron's local layer spec with RMSNorms that allow sequence parallelism on CPU and,
where requested, the SDPA core attention of :mod:`rasa_megatron.megatron.cpu_attention`."""
from __future__ import annotations

from ..convert.megatron_weights import rope_theta
from .cpu_attention import TorchDotProductAttention, TorchRMSNorm


def build_gpt_model(transformer_config, hf_config, pre_process: bool = True, post_process: bool = True,
                    cpu_attention: bool = True, vp_stage: int | None = None, spec_transform=None):
    """A Megatron ``GPTModel`` (local spec) with the vocabulary, rope and embedding tying of ``hf_config``;
    ``spec_transform`` (e.g. ``lambda spec: rasa_layer_spec(spec, config, seed)``) rewrites the block spec."""
    from megatron.core.models.gpt import GPTModel

    spec = gpt_block_spec(transformer_config, cpu_attention, vp_stage)
    return GPTModel(config=transformer_config, transformer_layer_spec=spec_transform(spec) if spec_transform else spec,
                    vocab_size=hf_config.vocab_size, max_sequence_length=hf_config.max_position_embeddings,
                    pre_process=pre_process, post_process=post_process, position_embedding_type="rope",
                    rotary_base=rope_theta(hf_config),
                    share_embeddings_and_output_weights=bool(hf_config.tie_word_embeddings), vp_stage=vp_stage)


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
    """Megatron's local GPT layer spec (RMSNorm for Llama-style models, as ``WrappedTorchNorm`` without
    apex; a MoE layer with ``SequentialMLP`` experts when ``num_experts``), with the core attention
    replaced by :class:`TorchDotProductAttention` when ``cpu_attention``."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(num_experts=num_experts, normalization=normalization)
    if cpu_attention:
        spec.submodules.self_attention.submodules.core_attention = TorchDotProductAttention
    return spec
