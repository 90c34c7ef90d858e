"""RankPool: the shared ``A_S`` / ``B_S`` of one module type (paper eq. 3)."""
from __future__ import annotations

import torch
from torch import nn

from .functional import kaiming_init_


class RankPool(nn.Module):
    """The pool of ``L*k`` ranks that every layer of one module type (e.g. all ``q_proj``) uses.

    It is registered once in the model (under ``rasa_pools``); each :class:`RaSALinear` of the
    module type holds an unregistered reference to it, so the pool appears once in the state dict
    and in the optimizer, and its gradient is the sum over layers.

    Attributes:
        A_shared: ``[pool_rank, in_features]``, Kaiming-uniform at init.
        B_shared: ``[out_features, pool_rank]``, zeros at init.
    """

    def __init__(self, in_features: int, out_features: int, pool_rank: int, num_layers: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        super().__init__()
        if pool_rank <= 0:
            raise ValueError(f"a RankPool needs pool_rank >= 1, got {pool_rank}")
        self.in_features = in_features
        self.out_features = out_features
        self.pool_rank = pool_rank
        self.num_layers = num_layers
        self.A_shared = nn.Parameter(torch.empty(pool_rank, in_features, dtype=dtype, device=device))
        self.B_shared = nn.Parameter(torch.empty(out_features, pool_rank, dtype=dtype, device=device))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        if self.A_shared.device.type == "meta":
            return
        kaiming_init_(self.A_shared, generator)
        self.B_shared.zero_()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"pool_rank={self.pool_rank} ({self.num_layers} layers)")
