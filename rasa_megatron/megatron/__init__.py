"""RaSA for Megatron-core models: tensor/sequence-parallel layers (layers.py), pools sharded across
pipeline stages (pools.py), gradient finalisation (grads.py), injection into GPT models through the
layer spec (spec.py) or after building (inject.py), HF adapter <-> shards (hf_adapter.py), and the
``engine: megatron`` training engine (engine.py)."""
from .ddp import check_megatron_ddp
from .grads import finalize_model_grads_with_rasa, finalize_rasa_grads
from .hf_adapter import gather_hf_adapter, load_hf_adapter_
from .inject import apply_rasa_megatron, freeze_base_parameters, megatron_rasa_units
from .layers import RaSAColumnParallelLinear, RaSARowParallelLinear, ShardedRaSA
from .pools import ShardedRankPool, gather_pipeline_pools, reduce_scatter_pipeline_pool_grads
from .spec import rasa_layer_spec

__all__ = ["RaSAColumnParallelLinear", "RaSARowParallelLinear", "ShardedRankPool", "ShardedRaSA",
           "apply_rasa_megatron", "check_megatron_ddp", "freeze_base_parameters", "finalize_model_grads_with_rasa",
           "finalize_rasa_grads", "gather_hf_adapter", "gather_pipeline_pools", "load_hf_adapter_",
           "megatron_rasa_units", "rasa_layer_spec", "reduce_scatter_pipeline_pool_grads"]
