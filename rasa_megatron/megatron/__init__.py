"""RaSA for Megatron-core models: tensor/sequence-parallel layers, pools sharded across pipeline
stages, injection into GPT models through the layer spec or after building (see parallel_layers.py,
spec.py and inject.py)."""
from .inject import apply_rasa_megatron, freeze_base_parameters, gather_hf_adapter, load_hf_adapter_, megatron_rasa_units
from .parallel_layers import (RaSAColumnParallelLinear, RaSARowParallelLinear, ShardedRankPool, ShardedRaSA,
                              check_megatron_ddp, finalize_model_grads_with_rasa, finalize_rasa_grads, gather_pipeline_pools,
                              reduce_scatter_pipeline_pool_grads)
from .spec import rasa_layer_spec

__all__ = ["RaSAColumnParallelLinear", "RaSARowParallelLinear", "ShardedRankPool", "ShardedRaSA",
           "apply_rasa_megatron", "check_megatron_ddp", "freeze_base_parameters", "finalize_model_grads_with_rasa", "finalize_rasa_grads",
           "gather_hf_adapter", "gather_pipeline_pools", "load_hf_adapter_", "megatron_rasa_units",
           "rasa_layer_spec", "reduce_scatter_pipeline_pool_grads"]
