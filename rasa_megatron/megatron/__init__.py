"""RaSA for Megatron-core models (tensor / sequence parallel layers; see parallel_layers.py)."""
from .parallel_layers import (RaSAColumnParallelLinear, RaSARowParallelLinear, ShardedRankPool, ShardedRaSA,
                              finalize_rasa_grads)

__all__ = ["RaSAColumnParallelLinear", "RaSARowParallelLinear", "ShardedRankPool", "ShardedRaSA",
           "finalize_rasa_grads"]
